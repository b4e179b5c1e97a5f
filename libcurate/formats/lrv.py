"""LRV-Instruction: records ``{"image_id", "question", "answer", "task"}``, as a bare JSON list or wrapped
in ``{"annotations": [...]}`` (the layout of LRV's MiniGPT-4 ``cc_sbu_align/filter_cap.json``).

Images are Visual Genome files named by id: ``RawRecord.images = [image_pattern.format(image_id=...)]``
with ``image_pattern`` default ``"{image_id}.jpg"`` relative to the images root (use
``"image/{image_id}.jpg"`` for the wrapped MiniGPT-4 layout). One image carries many instructions, so
``original_id = f"{image_id}#{index}"`` (index = position in the file) and the plain Visual Genome id is
kept in ``metadata["image_id"]``: region captions (``judge_gavie``, ``generate_lrv``) and the
cc_sbu_align export look the image up by it (:func:`image_id_of`, :func:`lookup_regions`). Human turn =
``"<image>\\n" + question`` (unless the question already holds the token), gpt = ``answer``;
``task`` (e.g. ``"negative"``) -> :attr:`RawRecord.task`; other fields -> ``metadata``.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from libcurate.formats.base import (
    BadRecord,
    FormatError,
    RawRecord,
    check_conversation,
    clean_id,
    human_turn,
    image_id_records,
    require_str,
)
from libcurate.records import Sample, Turn

_FIELDS = ("image_id", "question", "answer", "task")


def parse(data: bytes, source_name: str, *, encoding: str = "utf-8",
          image_pattern: str = "{image_id}.jpg") -> Iterator[RawRecord | BadRecord]:
    """Parse an LRV instruction file. Options: ``encoding``, ``image_pattern``."""
    if "{image_id}" not in image_pattern:
        raise ValueError(f"image_pattern {image_pattern!r} must contain '{{image_id}}'")
    return _parse(data, source_name, encoding, image_pattern)


def _parse(data: bytes, source_name: str, encoding: str, image_pattern: str) -> Iterator[RawRecord | BadRecord]:
    def build(rec: dict, image_id: str, oid: str) -> RawRecord:
        turns = [Turn("human", human_turn(require_str(rec, "question"))), Turn("gpt", require_str(rec, "answer"))]
        check_conversation(turns, 1)
        task = rec.get("task")
        if task is not None and not isinstance(task, str):
            raise FormatError("malformed_record", "'task' must be a string")
        metadata = {k: v for k, v in rec.items() if k not in _FIELDS}
        metadata["image_id"] = image_id
        return RawRecord(original_id=oid, images=[image_pattern.format(image_id=image_id)], conversations=turns,
                         task=task, metadata=metadata)

    return image_id_records(data, source_name, encoding, build, id_of=lambda i, image_id: f"{image_id}#{i}")


# -- the source image id of a stored sample ---------------------------------------------------------

def image_id_of(sample: Sample) -> str | None:
    """The id the source dataset gave this sample's image, or ``None`` when it gave none.

    In order: ``metadata["image_id"]`` (LRV ingest stores it; any source record carrying an ``image_id``
    field keeps it there), the ``original_id`` of a cc_sbu_align sample (one record per image, so the
    record id is the image id), and the part of an LRV ``original_id`` before its last ``#`` (samples
    ingested before ingest stored the metadata field). LLaVA, JSONL and MMInstruct ids name records, not
    images: ``None``.
    """
    mid = clean_id(sample.metadata.get("image_id"))
    if mid is not None:
        return mid
    oid, fmt = str(sample.source.original_id), sample.source.original_format
    if fmt == "cc_sbu_align":
        return oid
    if fmt == "lrv" and "#" in oid:
        return oid.rpartition("#")[0]
    return None


def region_ids(sample: Sample) -> list[str]:
    """The ids under which a regions file (``image_id -> [{caption, bbox}]``) may hold this sample's image,
    best first: :func:`image_id_of`, then ``original_id`` (a file keyed by record id), then ``original_id``
    up to its last ``#`` (a sample generated from an LRV record carries the parent's ``image_id#index``)."""
    oid = str(sample.source.original_id)
    ids = [image_id_of(sample), oid, oid.rpartition("#")[0] if "#" in oid else None]
    return list(dict.fromkeys(i for i in ids if i))


def lookup_regions(regions: Mapping[str, Any], sample: Sample) -> Any:
    """The regions entry of ``sample``'s image (keys compared as strings), or ``None``."""
    for i in region_ids(sample):
        if i in regions:
            return regions[i]
    return None
