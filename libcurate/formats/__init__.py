"""Annotation formats: parsers (:func:`parse_annotations`) for ingest, writers (:mod:`.export`) for export."""

from libcurate.formats.base import FORMATS, BadRecord, RawRecord, parse_annotations

__all__ = ["FORMATS", "BadRecord", "RawRecord", "parse_annotations"]
