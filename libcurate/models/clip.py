"""CLIP models by name: open_clip architectures + pretrained tags, ``hf-hub:`` ids, local dirs, test configs.

Names understood by :func:`load_clip` (``model`` / ``pretrained``):

* ``test-tiny-clip``: a 2-layer, width-64 CLIP (224 px, patch 32, 77-token context, open_clip's BPE
  tokenizer) with **random** weights seeded by ``torch.manual_seed(0)``: the same model in every process,
  meaningless scores. For tests, demos and benchmarks of the plumbing.
* ``test-random-vit-b-32``: open_clip ``ViT-B-32`` with random weights (seeded): real cost, no meaning.
* an open_clip architecture with a pretrained tag, e.g. ``ViT-L-14`` / ``openai`` or ``ViT-bigG-14`` /
  ``laion2b_s39b_b160k`` (InstructionGPT-4's scorer). Downloads through open_clip's cache
  (``HF_HOME``); bake the weights into the image for offline nodes.
* an architecture with ``pretrained`` = a local weights file (``.safetensors`` preferred; ``.bin``/``.pt``
  are read with ``weights_only=True``).
* ``hf-hub:org/repo`` (open_clip's own hub format) or a local directory holding ``open_clip_config.json``
  and ``open_clip_model.safetensors`` (``local-dir:`` in open_clip).

Every loaded model is cached per process (:func:`load_clip` returns the same object for the same
arguments), so a stage that scores many shards loads its model once.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

TEST_MODELS = ("test-tiny-clip", "test-random-vit-b-32")

TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass
class ClipBundle:
    """A loaded CLIP model and what it needs around it.

    Attributes:
        model: the open_clip model in eval mode on ``device``.
        preprocess: open_clip's validation transform (PIL image -> normalised float tensor [3, H, W]).
        tokenizer: open_clip tokenizer (list of str -> LongTensor [N, context_length]).
        context_length: text encoder context (tokens, including start and end tokens).
        image_size: (H, W) the model expects.
        mean / std: the normalisation ``preprocess`` applies (per channel, 0-1 scale).
        name / pretrained: what was asked for (recorded in sidecars).
        device: where the model lives.
    """

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Any
    context_length: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    pretrained: str | None
    device: str = "cpu"
    info: dict = field(default_factory=dict)

    def pil_transform(self) -> Callable:
        """The PIL part of ``preprocess`` (resize, crop, RGB) ending in a uint8 tensor [3, H, W].

        Normalisation is left to the consumer (done on the device, on a whole batch): ``ToTensor`` +
        ``Normalize`` of ``preprocess`` equals ``(x / 255 - mean) / std`` of this uint8 tensor.
        """
        from torchvision import transforms as T

        steps = []
        for t in self.preprocess.transforms:
            if isinstance(t, (T.ToTensor, T.Normalize)):
                break
            steps.append(t)
        steps.append(T.PILToTensor())
        return T.Compose(steps)


class FloatStaging:
    """uint8 -> float32 into one reused buffer on CPU (same shape and memory format as the input).

    ``x.float()`` allocates a fresh 38 MB tensor per batch of 64 224-px images; converting into a kept
    buffer measured 1.8 ms against 5.6-8.9 ms per batch on one core. The buffer is overwritten by the next
    call: the tower's first op (the patch conv) reads it and writes its own output. On GPU: ``x.float()``.
    """

    def __init__(self):
        self.buf: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch.is_grad_enabled():
            return x.float()
        if self.buf is None or self.buf.shape != x.shape or self.buf.stride() != x.stride():
            self.buf = torch.empty_like(x, dtype=torch.float32)  # keeps a dense input's memory format
        return self.buf.copy_(x)


def uint8_image_encoder(bundle: "ClipBundle") -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode_image`` that takes the uint8 pixels [N, 3, H, W] of :meth:`ClipBundle.pil_transform` and
    normalises them without a separate pass over the batch.

    For an open_clip ``VisionTransformer`` the normalisation is folded into the patch embedding:
    ``conv(W, (x / 255 - m) / s) = conv(W / (255 s), x) - sum(W * m / s)`` exactly (the patch conv has no
    padding, so every input pixel sees the same affine map), and the model only converts uint8 to float.
    Integers 0-255 are exact in fp32, bf16 and fp16, so the folded conv is as exact as the plain one.
    Other towers (ModifiedResNet, timm) get the normalisation as one fused in-place pass
    (``x.float().mul_(1 / (255 s)).sub_(m / s)``). The cached bundle's model is not modified: the folded
    tower is a shallow copy sharing every other parameter. Measured on CPU (test-tiny-clip, batch 64):
    the plain ``(x.float() - mean) / std`` cost 39% of the main process.
    """
    import copy

    visual = bundle.model.visual
    param = next(bundle.model.parameters(), None)
    dev = param.device if param is not None else torch.device(bundle.device)
    mean = torch.tensor(bundle.mean, dtype=torch.float32, device=dev)
    std = torch.tensor(bundle.std, dtype=torch.float32, device=dev)
    conv = getattr(visual, "conv1", None)
    if (isinstance(conv, torch.nn.Conv2d) and conv.in_channels == 3 and conv.groups == 1
            and conv.padding in ((0, 0), 0, "valid") and conv.padding_mode == "zeros"):
        with torch.no_grad():
            w = conv.weight.float()
            folded = torch.nn.Conv2d(3, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                     bias=True, device=dev, dtype=conv.weight.dtype)
            folded.weight.copy_(w / (255.0 * std).view(1, 3, 1, 1))
            shift = (w * (mean / std).view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
            base = conv.bias.float() if conv.bias is not None else 0.0
            folded.bias.copy_(base - shift)
        folded.requires_grad_(False)
        tower = copy.copy(visual)
        tower._modules = dict(visual._modules)  # own module table: the cached model keeps its conv1
        tower.conv1 = folded
        staging = FloatStaging()
        return lambda x: tower(staging(x))
    scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
    shift = (mean / std).view(1, 3, 1, 1)
    return lambda x: bundle.model.encode_image(x.to(torch.float32, copy=True).mul_(scale).sub_(shift))


def short_text_encoder(bundle: "ClipBundle") -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode_text`` that runs the text tower only up to the batch's last end-of-text token.

    open_clip's CLIP text tower is causal (each position attends to itself and earlier ones) and pools
    the end-of-text position (``argmax`` pooling: the highest token id), so the padding after the
    longest text of a batch cannot change the result: cutting the tokens, positional embedding and mask
    to ``L`` = that position + 1 computes the same features (up to float rounding of smaller matrix
    products) at ~``L / 77`` of the cost; a caption is ~15-30 tokens. Towers that are not causal with
    ``argmax`` pooling (HF text towers, CoCa) use ``encode_text`` as it is.
    """
    import open_clip
    from open_clip.transformer import text_global_pool

    m = bundle.model
    mask = getattr(m, "attn_mask", None)
    causal = (mask is not None and mask.dim() == 2 and bool(torch.isneginf(mask.triu(1)[0, 1:]).all())
              and not bool(mask.tril().ne(0).any()))
    if type(m) is not open_clip.CLIP or getattr(m, "text_pool_type", None) != "argmax" or not causal:
        return m.encode_text

    def encode(text: torch.Tensor) -> torch.Tensor:
        if not len(text):
            return m.encode_text(text)
        n = int(text.argmax(dim=-1).max()) + 1
        text = text[:, :n]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast) + m.positional_embedding[:n].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = text_global_pool(m.ln_final(x), text, m.text_pool_type)
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x

    return encode


def _seeded(fn: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    # Random test models must be identical in every process: seed, build, restore the global RNG state.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        return fn()
    finally:
        torch.random.set_rng_state(state)


def _build(name: str, pretrained: str | None):
    import open_clip

    if name == "test-tiny-clip":
        model = _seeded(lambda: open_clip.CLIP(**TINY_CLIP_CFG))
        preprocess = open_clip.image_transform(TINY_CLIP_CFG["vision_cfg"]["image_size"], is_train=False)
        tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CFG["text_cfg"]["context_length"])
        return model, preprocess, tokenizer
    if name == "test-random-vit-b-32":
        model = _seeded(lambda: open_clip.create_model("ViT-B-32", pretrained=None))
        preprocess = open_clip.image_transform(model.visual.preprocess_cfg["size"], is_train=False,
                                               mean=model.visual.preprocess_cfg.get("mean"),
                                               std=model.visual.preprocess_cfg.get("std"))
        return model, preprocess, open_clip.get_tokenizer("ViT-B-32")
    if name.startswith("test-"):
        raise ValueError(f"unknown test model {name!r}; known: {TEST_MODELS}")
    if os.path.isdir(name):
        name = f"local-dir:{name}"
    if pretrained and os.path.isfile(pretrained):
        # A local weights file: build the architecture empty, then load safely ourselves.
        from .weights import load_state_dict

        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        model.load_state_dict(load_state_dict(pretrained))
        return model, preprocess, open_clip.get_tokenizer(name)
    # open_clip reads safetensors when present and uses torch.load(weights_only=True) otherwise.
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
    return model, preprocess, open_clip.get_tokenizer(name)


@functools.lru_cache(maxsize=4)
def load_clip(name: str, pretrained: str | None = None, device: str = "cpu") -> ClipBundle:
    """Load (once per process) the CLIP model ``name`` / ``pretrained`` onto ``device``; see module doc."""
    model, preprocess, tokenizer = _build(name, pretrained)
    model = model.to(device).eval().requires_grad_(False)
    norm = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    size = getattr(model.visual, "image_size", None) or TINY_CLIP_CFG["vision_cfg"]["image_size"]
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    ctx = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77))
    return ClipBundle(model=model, preprocess=preprocess, tokenizer=tokenizer, context_length=ctx,
                      image_size=size, mean=tuple(float(x) for x in norm.mean),
                      std=tuple(float(x) for x in norm.std), name=name, pretrained=pretrained, device=device)


def tokenize(tokenizer, texts: list[str], context_length: int) -> tuple[torch.Tensor, list[int]]:
    """Token ids [N, context_length] as open_clip makes them, plus each text's untruncated token count.

    The count includes the start and end tokens, so ``count > context_length`` means the text was cut
    (open_clip keeps the first ``context_length - 1`` tokens and puts the end token last).
    """
    from open_clip.tokenizer import SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None:
        ids = [[tokenizer.sot_token_id] + tokenizer.encode(t) + [tokenizer.eot_token_id] for t in texts]
        out = torch.zeros(len(ids), context_length, dtype=torch.long)
        for i, toks in enumerate(ids):
            if len(toks) > context_length:
                toks = toks[:context_length]
                toks[-1] = tokenizer.eot_token_id
            out[i, : len(toks)] = torch.tensor(toks)
        return out, [len(t) for t in ids]
    # Other tokenizers (HF-based): count with the underlying tokenizer, tokenise with open_clip's.
    inner = getattr(tokenizer, "tokenizer", None)
    counts = [len(inner(t)["input_ids"]) for t in texts] if inner is not None else [-1] * len(texts)
    return tokenizer(texts, context_length=context_length), counts
