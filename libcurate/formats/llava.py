"""LLaVA conversation lists: ``[{"id", "image", "conversations": [{"from", "value"}, ...]}, ...]``.

Record shape (also used per line by :mod:`libcurate.formats.jsonl`):

- ``image``: one path (LLaVA-Instruct-150K) or a list of paths (LLaVA-NeXT / OneVision multi-image,
  whose dataset class accepts ``"image": [...]``); ``images`` (list or string) is accepted as an alias.
  Both present -> ``malformed_record``. No image -> ``no_image`` (curate samples need one; text-only
  records of LLaVA mixes are reported, not dropped).
- ``conversations``: roles ``human``/``gpt``; the aliases ``user``/``assistant`` (any case) are
  normalised; any other role (``system``...) -> ``unknown_role``. Values are kept byte for byte.
- ``id``: original id (ints are stringified); missing -> ``<file>#<index>``.
- curate's exporter adds ``source`` ({dataset, original_id, original_format}), ``task``, ``type``,
  ``domain``, ``metadata``; these are restored (``original_id`` from ``source``, the rest of ``source``
  and the exported ``id`` into :attr:`RawRecord.origin`). A ``source`` of another shape, labels that
  are not strings, a ``metadata`` that is not an object, and every other unknown field go to ``metadata`` (a key already in the record's ``metadata`` dict wins; the
  clashing field is kept under ``metadata["_extra"]``).
"""

from __future__ import annotations

from typing import Any, Iterator

from libcurate.formats.base import (
    BadRecord,
    FormatError,
    RawRecord,
    check_conversation,
    check_values,
    clean_id,
    iter_json_array,
    norm_image_ref,
    unparsed,
)
from libcurate.records import Turn

ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
# "generated": curate's export flag (derived from source and metadata, so not stored again on re-ingest)
_KNOWN = {"id", "image", "images", "conversations", "source", "task", "type", "domain", "metadata", "generated"}
_SOURCE_KEYS = {"dataset", "original_id", "original_format"}


def parse(data, source_name: str, *, encoding: str = "utf-8", image_prefix_strip: str = "") -> Iterator[RawRecord | BadRecord]:
    """Parse a LLaVA JSON list (bytes or a binary stream, read incrementally). Options: ``encoding``;
    ``image_prefix_strip`` (removed from the start of every image path, e.g. ``"coco/train2017/"`` when
    the images root is that folder)."""
    for item in iter_json_array(data, source_name, encoding):
        if isinstance(item, BadRecord):  # the file stops being readable here
            yield item
            return
        i, rec, text = item
        if isinstance(text, BadRecord):  # one record the parser could not take
            yield unparsed(text, f"{source_name}#{i}")
        else:
            yield record_from_dict(rec, f"{source_name}#{i}", image_prefix_strip)


def record_from_dict(rec: Any, fallback_id: str, image_prefix_strip: str = "") -> RawRecord | BadRecord:
    """One LLaVA-shaped record -> RawRecord, or BadRecord with the reason."""
    if not isinstance(rec, dict):
        return BadRecord(fallback_id, "malformed_record", f"record must be an object, got {type(rec).__name__}")
    oid = clean_id(rec.get("id")) or fallback_id
    try:
        check_values(rec)
        return _record(rec, oid, image_prefix_strip)
    except FormatError as e:
        return BadRecord(oid, e.reason, e.detail)


def _record(rec: dict, oid: str, strip: str) -> RawRecord:
    if "image" in rec and "images" in rec:
        raise FormatError("malformed_record", "record has both 'image' and 'images'")
    ref = rec.get("image", rec.get("images"))
    refs = ref if isinstance(ref, list) else ([] if ref is None else [ref])
    if not refs:
        raise FormatError("no_image", "record has no image")
    images = [norm_image_ref(r, strip) for r in refs]

    conv = rec.get("conversations")
    if conv is None:
        raise FormatError("missing_field", "record has no 'conversations'")
    if not isinstance(conv, list):
        raise FormatError("malformed_record", f"'conversations' must be a list, got {type(conv).__name__}")
    turns = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict):
            raise FormatError("malformed_record", f"turn {j} must be an object")
        if "from" not in t or "value" not in t:
            raise FormatError("missing_field", f"turn {j} needs 'from' and 'value'")
        role = ROLE_ALIASES.get(t["from"].lower()) if isinstance(t["from"], str) else None
        if role is None:
            raise FormatError("unknown_role", f"turn {j}: unknown role {t['from']!r} (want human/gpt or user/assistant)")
        turns.append(Turn(role, t["value"]))
    check_conversation(turns, len(images))

    # Third-party data may use these names for other things: a value of another type is kept as an
    # ordinary extra field rather than rejecting an otherwise good record.
    extras = {k: v for k, v in rec.items() if k not in _KNOWN}
    labels = {}
    for name in ("task", "type", "domain"):
        v = rec.get(name)
        if v is None or isinstance(v, str):
            labels[name] = v
        else:
            extras[name] = v
    md = rec.get("metadata")
    if md is not None and not isinstance(md, dict):
        extras["metadata"] = md
        md = None
    metadata = dict(md or {})
    origin = None
    src = rec.get("source")
    if isinstance(src, dict) and set(src) == _SOURCE_KEYS and all(isinstance(v, str) for v in src.values()):
        origin = dict(src, key=oid)
        oid = src["original_id"]
    elif src is not None:
        extras["source"] = src
    for k, v in extras.items():
        if k in metadata:
            metadata.setdefault("_extra", {})[k] = v
        else:
            metadata[k] = v
    return RawRecord(original_id=oid, images=images, conversations=turns, metadata=metadata, origin=origin, **labels)
