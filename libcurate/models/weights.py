"""Safe weight loading: safetensors first, ``torch.load(weights_only=True)`` otherwise, never a pickle.

Model code never touches storage: a checkpoint is a local path (a job copies it from the object store
before it builds a model, or the image bakes it in).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SAFE_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def load_state_dict(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (a ``.safetensors``, ``.bin``/``.pt``/``.pth`` file, or a directory).

    A directory picks ``*.safetensors`` before any pickle-format file. Pickle-format files are read with
    ``torch.load(weights_only=True)``, which refuses arbitrary objects, so a hostile checkpoint cannot run
    code. A checkpoint wrapped as ``{"state_dict": ...}`` is unwrapped.
    """
    p = Path(path)
    if p.is_dir():
        p = find_checkpoint(p)
    if p.suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        sd = load_file(str(p), device=device)
    elif p.suffix in TORCH_SUFFIXES:
        sd = torch.load(str(p), map_location=device, weights_only=True)
    else:
        raise ValueError(f"unknown checkpoint format {p.name!r}: want one of {SAFE_SUFFIXES + TORCH_SUFFIXES}")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{p}: not a state dict (got {type(sd).__name__})")
    return sd


def find_checkpoint(d: Path) -> Path:
    """The weights file in directory ``d``: safetensors preferred, then torch files, sorted by name."""
    for suffixes in (SAFE_SUFFIXES, TORCH_SUFFIXES):
        found = sorted(f for f in d.iterdir() if f.suffix in suffixes and f.is_file())
        if found:
            return found[0]
    raise FileNotFoundError(f"no checkpoint (*.safetensors, *.bin, *.pt, *.pth) in {d}")
