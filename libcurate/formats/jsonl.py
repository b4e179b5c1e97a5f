"""JSONL: one LLaVA-shaped record per line (``{"id"?, "image"|"images", "conversations"}``).

Same record rules as :mod:`libcurate.formats.llava`; each line is decoded and parsed on its own, so a
non-UTF-8 or invalid line yields one BadRecord (``<file>:line N``) and the rest of the file is read.
Blank lines are not records.
"""

from __future__ import annotations

from typing import Iterator

from libcurate.formats.base import BadRecord, RawRecord, iter_json_lines
from libcurate.formats.llava import record_from_dict


def parse(data, source_name: str, *, encoding: str = "utf-8", image_prefix_strip: str = "") -> Iterator[RawRecord | BadRecord]:
    """Parse a JSONL file (bytes or a binary stream, read line by line). Options as for ``llava``."""
    for line_id, _, obj in iter_json_lines(data, source_name, encoding):
        yield obj if isinstance(obj, BadRecord) else record_from_dict(obj, line_id, image_prefix_strip)
