"""LRV-Instruction: records ``{"image_id", "question", "answer", "task"}``, as a bare JSON list or wrapped
in ``{"annotations": [...]}`` (the layout of LRV's MiniGPT-4 ``cc_sbu_align/filter_cap.json``).

Images are Visual Genome files named by id: ``RawRecord.images = [image_pattern.format(image_id=...)]``
with ``image_pattern`` default ``"{image_id}.jpg"`` relative to the images root (use
``"image/{image_id}.jpg"`` for the wrapped MiniGPT-4 layout). One image carries many instructions, so
``original_id = f"{image_id}#{index}"`` (index = position in the file). Human turn =
``"<image>\\n" + question`` (unless the question already holds the token), gpt = ``answer``;
``task`` (e.g. ``"negative"``) -> :attr:`RawRecord.task`; other fields -> ``metadata``.
"""

from __future__ import annotations

from typing import Iterator

from libcurate.formats.base import (
    BadRecord,
    FormatError,
    RawRecord,
    check_conversation,
    human_turn,
    image_id_records,
    require_str,
)
from libcurate.records import Turn

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
        return RawRecord(original_id=oid, images=[image_pattern.format(image_id=image_id)], conversations=turns,
                         task=task, metadata=metadata)

    return image_id_records(data, source_name, encoding, build, id_of=lambda i, image_id: f"{image_id}#{i}")
