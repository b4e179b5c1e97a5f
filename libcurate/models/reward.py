"""Text reward models: Hugging Face sequence classifiers with one logit, by hub id or local directory.

Names understood by :func:`load_reward`:

* ``test-tiny-reward``: a 2-layer, hidden-32 BERT classifier (``num_labels=1``) with **random** weights
  (seeded) and an offline WordPiece tokenizer built from a fixed vocabulary (letters, digits,
  punctuation, a few words; ``model_max_length`` 128). Meaningless scores, real plumbing.
* ``OpenAssistant/reward-model-deberta-v3-large-v2`` (InstructionGPT-4's reward, the production default)
  or any other hub id: loaded with ``from_pretrained`` (safetensors preferred; transformers reads
  ``.bin`` with ``weights_only=True``). Needs the hub cache or ``HF_HOME`` baked into the image.
* a local directory saved with ``save_pretrained``.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass

import torch

DEFAULT_REWARD_MODEL = "OpenAssistant/reward-model-deberta-v3-large-v2"
TEST_REWARD_MODELS = ("test-tiny-reward",)
TINY_WORDS = ("the", "a", "an", "is", "of", "in", "on", "and", "image", "picture", "photo", "describe",
              "this", "detail", "what", "there", "with", "cat", "dog", "man", "woman", "person", "red", "blue")


@dataclass
class RewardBundle:
    """A loaded reward model. Attributes: model (eval, on device), tokenizer, max_length (tokens per
    (instruction, response) pair including special tokens), name, device."""

    model: torch.nn.Module
    tokenizer: object
    max_length: int
    name: str
    device: str = "cpu"


def tiny_vocab() -> dict[str, int]:
    """The fixed vocabulary of ``test-tiny-reward``: specials, characters, ``##``-continuations, words."""
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    toks += list(string.ascii_lowercase + string.digits + string.punctuation)
    toks += ["##" + c for c in string.ascii_lowercase + string.digits]
    toks += [w for w in TINY_WORDS if w not in toks]
    return {t: i for i, t in enumerate(dict.fromkeys(toks))}


def _tiny_reward():
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    # transformers 5: BertTokenizer(vocab_file=...) silently ignores the file; pass the dict itself.
    tok = BertTokenizer(vocab=tiny_vocab(), model_max_length=128)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = BertForSequenceClassification(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model, tok


@functools.lru_cache(maxsize=2)
def load_reward(name: str = DEFAULT_REWARD_MODEL, device: str = "cpu") -> RewardBundle:
    """Load (once per process) reward model ``name`` onto ``device``; see the module doc for names."""
    if name == "test-tiny-reward":
        model, tok = _tiny_reward()
    elif name.startswith("test-"):
        raise ValueError(f"unknown test reward model {name!r}; known: {TEST_REWARD_MODELS}")
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name)
    if model.config.num_labels != 1:
        raise ValueError(f"{name}: a reward model has one output logit, this one has {model.config.num_labels}")
    limit = min(int(tok.model_max_length or 512), int(getattr(model.config, "max_position_embeddings", 512) or 512))
    return RewardBundle(model=model.to(device).eval().requires_grad_(False), tokenizer=tok, max_length=limit, name=name, device=device)
