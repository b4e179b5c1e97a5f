"""Chat messages and their two encodings: the API body (images as base64 data URLs) and the cache key
(images by their sha256, never their base64, so a key is cheap to compute and the same on every machine).

A message is ``{"role": ..., "content": str | [str | ImagePart, ...]}``; :class:`LLMRequest` is one chat
request built from such messages.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

CACHE_FORMAT = 1


@dataclass(frozen=True)
class ImagePart:
    """An image inside a message. ``key_id`` identifies it in the cache key (sha256 plus any resize)."""

    data: bytes = field(repr=False)
    mime: str
    key_id: str
    detail: str = "auto"

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"


def image_part(data: bytes, fmt: str, sha256: str | None = None, max_side: int = 0, detail: str = "auto") -> ImagePart:
    """An :class:`ImagePart` from encoded bytes; ``max_side > 0`` downsizes (LANCZOS) to fit, as
    MMInstruct did for GPT-4V (fewer image tokens, same cache key on every machine)."""
    sha = sha256 or hashlib.sha256(data).hexdigest()
    mime = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}[fmt]
    if max_side > 0:
        from PIL import Image

        im = Image.open(io.BytesIO(data))
        if max(im.size) > max_side:
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            data, mime = buf.getvalue(), "image/jpeg"
    return ImagePart(data=data, mime=mime, key_id=f"sha256:{sha}@{max_side}", detail=detail)


def _content_api(content) -> Any:
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        if isinstance(p, ImagePart):
            parts.append({"type": "image_url", "image_url": {"url": p.data_url(), "detail": p.detail}})
        else:
            parts.append({"type": "text", "text": p})
    return parts


def _content_key(content) -> Any:
    if isinstance(content, str):
        return content
    return [{"image": p.key_id, "detail": p.detail} if isinstance(p, ImagePart) else {"text": p} for p in content]


def _n_images(messages: list[dict]) -> int:
    return sum(isinstance(p, ImagePart) for m in messages if not isinstance(m["content"], str) for p in m["content"])


def _n_chars(messages: list[dict]) -> int:
    n = 0
    for m in messages:
        c = m["content"]
        n += len(c) if isinstance(c, str) else sum(len(p) for p in c if isinstance(p, str))
    return n


@dataclass
class LLMRequest:
    """One chat request.

    Attributes:
        messages: ``[{"role": ..., "content": str | [str | ImagePart, ...]}]``.
        template_version: the prompt template's version (part of the cache key).
        model: overrides ``LLMSettings.model`` (several judges in one stage).
        params: sampling parameters merged over the settings' (``response_format``, ``temperature``...).
        variant: distinguishes deliberate repeats of the same prompt (ask k times) in the cache key.
    """

    messages: list[dict]
    template_version: str
    model: str | None = None
    params: dict = field(default_factory=dict)
    variant: int = 0


def cache_key(model: str, template_version: str, messages: list[dict], params: dict) -> str:
    blob = {"v": CACHE_FORMAT, "model": model, "template": template_version,
            "messages": [{"role": m["role"], "content": _content_key(m["content"])} for m in messages],
            "params": params}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def chat_body(model: str, messages: list[dict], params: dict) -> dict:
    """The JSON body of a chat completion request: API messages (images as data URLs) and the sampling
    parameters, without the ``_``-keys that only go into the cache key (``_variant``)."""
    return {"model": model, "messages": [{"role": m["role"], "content": _content_api(m["content"])} for m in messages],
            **{k: v for k, v in params.items() if not k.startswith("_")}}
