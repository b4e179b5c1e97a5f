"""Image bytes -> the uint8 pixels [3, S, S] a CLIP model takes, and how far each fast path is from exact.

Decoders (``score_clip``'s ``decode`` setting):

* ``pil`` (the default): open_clip's own validation transform, step by step: decode, resize the short
  side to ``S`` (bicubic), center-crop ``S x S``, RGB.
* ``pil_box``: the same decode and the same bicubic filter, but the center crop is applied *inside* the
  resize (PIL's ``resize(box=...)``): only the ``S x S`` output pixels that survive the crop are
  computed, from the same source centres with the same filter support; resize + crop costs ~40% less.
  Pillow hands the box to its C code as 32-bit floats, which moves the sampling centres by ~1e-5 px and
  ~1% of the pixels by one level (no box is both float32-exact and equal to the full resize's
  double-precision centres, so no one-resample crop through Pillow is exact); on the benchmark's 64 photos
  (test-tiny-clip) the largest score change was 1.8e-4 (mean 6e-6) against 8e-5 from storing the exact
  embedding as fp16, so by :func:`decode_deviation`'s rule it is not negligible: opt-in.
* ``pil_draft``: JPEGs are first decoded at a reduced DCT scale (libjpeg's scaling through PIL's
  ``draft``: 1/2, 1/4 or 1/8, never below ``S`` on the short side), then resized as ``pil_box``: decode and
  resize are much cheaper on big photos, but the pixels differ (the DCT downscale is a different
  filter): opt-in; see its deviation with :func:`decode_deviation`.
* ``torchvision``: ``decode_jpeg`` on the stage's device (nvJPEG on GPU), handled by the stage.

``pil_box`` and ``pil_draft`` resize in one step only when the transform is exactly "Resize(S) +
CenterCrop(S) + RGB" with a bicubic or bilinear filter and the image is RGB; anything else (palette
images, other resize modes) goes through the exact transform.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

FAST_DECODERS = ("pil_box", "pil_draft")


@dataclass(frozen=True)
class CropResize:
    """A transform that is "resize the short side to ``size``, center-crop ``size x size``"."""

    size: int
    resample: int  # a PIL resampling filter


def crop_resize_plan(transform) -> CropResize | None:
    """The :class:`CropResize` that ``transform`` (a ``ClipBundle.pil_transform()``) performs, or
    ``None`` if it does anything else (then only the exact transform is used)."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    steps = list(getattr(transform, "transforms", []))
    names = [type(t).__name__ for t in steps]
    if len(steps) != 4 or not isinstance(steps[0], T.Resize) or not isinstance(steps[1], T.CenterCrop):
        return None
    if names[2] not in ("MaybeConvertMode", "_convert_to_rgb", "Lambda") or not isinstance(steps[3], T.PILToTensor):
        return None
    resize, crop = steps[0], steps[1]
    size = resize.size[0] if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1 else resize.size
    filters = {InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.BILINEAR: Image.BILINEAR}
    if (not isinstance(size, int) or resize.max_size is not None or resize.interpolation not in filters
            or tuple(crop.size) != (size, size)):
        return None
    return CropResize(size, filters[resize.interpolation])


def crop_resize(img, plan: CropResize):
    """The ``S x S`` center of ``img`` resized so that its short side is ``S``, computed in one
    resample (see the module doc); ``img`` must be RGB. Returns a PIL image."""
    w, h = img.size
    s = plan.size
    # torchvision's Resize(S): short side S, long side int(S * long / short); CenterCrop rounds the offset
    nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
    sx, sy = w / nw, h / nh
    return img.resize((s, s), plan.resample, box=(left * sx, top * sy, (left + s) * sx, (top + s) * sy))


def open_image(data: bytes, fmt: str, mode: str, size: int | None):
    """Decode once: a loaded PIL image (for ``pil_draft`` JPEGs at the largest DCT scale still >= ``size``
    on both sides). Several scorers' pixels can then be made from it with :func:`to_pixels`."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if mode == "pil_draft" and fmt == "jpeg" and size:
        img.draft("RGB", (size, size))
    img.load()
    return img


def to_pixels(img, mode: str, transform, plan: CropResize | None):
    """uint8 tensor [3, S, S] of a decoded image under decoder ``mode`` and a model's transform."""
    import numpy as np
    import torch

    if mode in FAST_DECODERS and plan is not None and img.mode == "RGB":
        arr = np.asarray(crop_resize(img, plan))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return transform(img.convert("RGB") if img.mode != "RGB" else img)


def stack_pixels(images: list):
    """uint8 [N, 3, H, W] of per-image [3, H, W] tensors, channels-last in memory.

    Both :func:`to_pixels` and torchvision's ``PILToTensor`` return HWC memory viewed as CHW; stacking
    those views directly is a strided gather (measured 5 ms/image, half the loader's time); stacking
    the HWC memory is one copy per image, and the NCHW result is a view of it (channels_last, which the
    folded patch conv takes as it is, and which CUDA prefers)."""
    import torch

    return torch.stack([t.permute(1, 2, 0) for t in images]).permute(0, 3, 1, 2)


def decode_pixels(data: bytes, fmt: str, mode: str, transform, plan: CropResize | None):
    """uint8 tensor [3, S, S] of one image under decoder ``mode`` (``pil``, ``pil_box``, ``pil_draft``)."""
    img = open_image(data, fmt, mode, plan.size if plan is not None else None)
    return to_pixels(img, mode, transform, plan)


def decode_deviation(bundle, images: list[bytes], modes=("pil_box", "pil_draft"), fmt: str = "jpeg") -> dict:
    """How far each fast decoder's scores are from the exact open_clip preprocessing.

    Encodes every image with the exact transform (``pil``) and with each mode in ``modes``, and
    returns per mode the max and mean absolute difference of cos(image embedding, exact image embedding)
    from 1 (``max_abs_cos_diff``, ``mean_abs_cos_diff``: how far the embedding moved) and the max and mean
    absolute difference of the image-text cosine against a fixed caption (``max_abs_score_diff``,
    ``mean_abs_score_diff``: how far a score moves), plus ``pixels_changed`` (fraction of uint8 pixels
    that differ from the exact ones). A mode is ``negligible`` when its largest score change is no
    larger than the one fp16 storage of the exact embedding causes (``fp16_storage_max_abs_score_diff``).
    """
    import torch

    from ..models.clip import uint8_image_encoder

    transform = bundle.pil_transform()
    plan = crop_resize_plan(transform)
    enc = uint8_image_encoder(bundle)
    with torch.inference_mode():
        txt = torch.nn.functional.normalize(bundle.model.encode_text(bundle.tokenizer(["a photo"])), dim=-1)[0]

        def embed(mode):
            px = torch.stack([decode_pixels(d, fmt, mode, transform, plan) for d in images])
            return px, torch.nn.functional.normalize(enc(px.to(bundle.device)).float(), dim=-1)

        ref_px, ref = embed("pil")
        # the yardstick: how far a score moves when the exact embedding is stored as fp16, as every
        # score_clip sidecar stores it (a later stage reading img_emb.npy sees this much noise anyway)
        fp16 = float(((ref.half().float() - ref) @ txt).abs().max())
        out = {"n_images": len(images), "model": bundle.name, "fp16_storage_max_abs_score_diff": fp16}
        for mode in modes:
            px, emb = embed(mode)
            move = (1.0 - (emb * ref).sum(-1)).abs()
            score = ((emb - ref) @ txt).abs()
            out[mode] = {"max_abs_cos_diff": float(move.max()), "mean_abs_cos_diff": float(move.mean()),
                         "max_abs_score_diff": float(score.max()), "mean_abs_score_diff": float(score.mean()),
                         "pixels_changed": float((px != ref_px).float().mean())}
            out[mode]["negligible"] = out[mode]["max_abs_score_diff"] <= fp16
    return out
