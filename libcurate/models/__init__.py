"""Model registry: names -> loaded models. Knows nothing of storage (no boto3, no webdataset).

* :func:`~libcurate.models.clip.load_clip` — open_clip CLIP models (``test-tiny-clip``,
  ``test-random-vit-b-32``, ``ViT-L-14``/``openai``, ``ViT-bigG-14``/``laion2b_s39b_b160k``, ``hf-hub:...``,
  local dirs).
* :func:`~libcurate.models.reward.load_reward` — one-logit sequence classifiers (``test-tiny-reward``,
  ``OpenAssistant/reward-model-deberta-v3-large-v2``, local dirs).
* :func:`~libcurate.models.text.load_text_embedder` — sentence-transformers (``all-MiniLM-L6-v2`` offline).
* :func:`~libcurate.models.weights.load_state_dict` — safetensors or ``torch.load(weights_only=True)``.

Names starting with ``test-`` are randomly initialised (seeded) and only good for tests and demos. To use
real models in a recipe, name them::

    - stage: score_clip
      with: {model: ViT-L-14, pretrained: openai, device: cuda}
    - stage: score_reward
      with: {model: OpenAssistant/reward-model-deberta-v3-large-v2, device: cuda}

Imports are lazy (torch, open_clip and transformers load only when a loader is called).
"""

from __future__ import annotations


def load_clip(*a, **kw):
    from .clip import load_clip as f

    return f(*a, **kw)


def load_reward(*a, **kw):
    from .reward import load_reward as f

    return f(*a, **kw)


def load_text_embedder(*a, **kw):
    from .text import load_text_embedder as f

    return f(*a, **kw)


__all__ = ["load_clip", "load_reward", "load_text_embedder"]
