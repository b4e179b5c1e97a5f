"""MiniGPT-4 ``cc_sbu_align``: ``filter_cap.json`` = ``{"annotations": [{"image_id", "caption", ...}]}``.

Images live beside the JSON in ``image/<image_id>.jpg``. Convention: the images root given to ingest is
the folder that holds ``filter_cap.json`` and ``image/``, so ``RawRecord.images`` is
``["image/<image_id>.jpg"]`` (option ``image_pattern``, default ``"image/{image_id}.jpg"``).

Each record becomes a single-turn sample: human ``"<image>\\nDescribe this image in detail."`` (the
seed's fixed instruction; option ``instruction``), gpt = ``caption`` verbatim. A record with a
``question`` field (written by curate's exporter for samples with another instruction, the same field
LRV's MiniGPT-4 loader reads) uses that question instead. ``original_id`` = ``image_id``. Every other
field (``clip_score``, ``reward_score``, ``gpt_score``, ``length``...) goes to ``metadata``; string
``task``/``type``/``domain`` fields become labels. A bare list of records (InstructionGPT-4's
``full_score_data.json`` style) is accepted too.
"""

from __future__ import annotations

from typing import Iterator

from libcurate.formats.base import (
    BadRecord,
    RawRecord,
    check_conversation,
    human_turn,
    image_id_records,
    require_str,
)
from libcurate.records import Turn

DEFAULT_INSTRUCTION = "Describe this image in detail."
_LABELS = ("task", "type", "domain")


def parse(data: bytes, source_name: str, *, encoding: str = "utf-8", image_pattern: str = "image/{image_id}.jpg",
          instruction: str = DEFAULT_INSTRUCTION) -> Iterator[RawRecord | BadRecord]:
    """Parse a cc_sbu_align annotation file. Options: ``encoding``, ``image_pattern`` (``str.format``
    with ``image_id``), ``instruction`` (the implicit human turn, without the image token)."""
    if "{image_id}" not in image_pattern:
        raise ValueError(f"image_pattern {image_pattern!r} must contain '{{image_id}}'")
    return _parse(data, source_name, encoding, image_pattern, instruction)


def _parse(data: bytes, source_name: str, encoding: str, image_pattern: str, instruction: str) -> Iterator[RawRecord | BadRecord]:
    def build(rec: dict, image_id: str, oid: str) -> RawRecord:
        caption = require_str(rec, "caption")
        question = require_str(rec, "question") if rec.get("question") is not None else instruction
        turns = [Turn("human", human_turn(question)), Turn("gpt", caption)]
        check_conversation(turns, 1)
        labels = {k: rec[k] for k in _LABELS if isinstance(rec.get(k), str)}
        metadata = {k: v for k, v in rec.items() if k not in ("image_id", "caption", "question") and k not in labels}
        return RawRecord(original_id=oid, images=[image_pattern.format(image_id=image_id)], conversations=turns,
                         metadata=metadata, **labels)

    return image_id_records(data, source_name, encoding, build, id_of=lambda i, image_id: image_id)
