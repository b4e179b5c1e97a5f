"""Annotation parsers: the common record types, the dispatcher and the helpers every format shares.

:func:`parse_annotations` turns one annotation file (bytes) into a stream of :class:`RawRecord` (a
parsed sample, images still unresolved) and :class:`BadRecord` (a record that cannot become a sample,
with a short machine ``reason``). The ingest stage resolves ``RawRecord.images`` against its images
root, decodes them, builds the :class:`~libcurate.records.Sample` and quarantines every BadRecord.

Accounting contract: every input record yields exactly one RawRecord or BadRecord, nothing is skipped
silently. Two documented exceptions: a file that cannot be decoded or parsed as a whole yields a single
BadRecord for the whole file (its record count is unknowable), and blank lines of JSONL files are not
records. MMInstruct counts QA *items*, not lines (see :mod:`libcurate.formats.mminstruct`).

Reasons vocabulary (``BadRecord.reason``):

file level
    ``non_utf8`` (the file or JSONL line is not valid UTF-8), ``bad_encoding`` (not valid in the
    ``encoding=`` the caller named), ``bad_json``, ``bad_layout`` (valid JSON of the wrong top-level shape)
record level
    ``malformed_record`` (wrong type of record or field), ``missing_field``, ``no_image``,
    ``bad_image_ref`` (empty, absolute, URL or ``..`` image path), ``image_token_mismatch`` (number of
    ``<image>`` tokens neither 0 nor the number of images)
conversation (mapped from :func:`libcurate.records.validate_conversation`)
    ``empty_conversation``, ``unknown_role``, ``roles_out_of_order``, ``no_answer`` (ends with a human
    turn), ``empty_answer``, ``empty_instruction``, ``invalid_conversation`` (any other schema error)
MMInstruct items
    ``generation_error``, ``no_items``, ``duplicate_tag``, ``missing_question_tag``,
    ``missing_answer_tag``, ``missing_options_tag``, ``invalid_options``, ``invalid_choice``,
    ``invalid_judge_answer``, ``judge_unbalanced``
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from libcurate.records import IMAGE_TOKEN, RecordError, Turn, validate_conversation

FORMATS = ("llava", "jsonl", "cc_sbu_align", "lrv", "mminstruct")

_BOM = b"\xef\xbb\xbf"


@dataclass
class RawRecord:
    """One parsed source record, before its images are loaded.

    Attributes:
        original_id: the record's id in the source (LLaVA ``id``, cc_sbu ``image_id``, LRV
            ``image_id#index``, MMInstruct ``image_path#qK``).
        images: image references relative to the images root, as the source names them.
        conversations: ``human``/``gpt`` turns, ``<image>`` tokens exactly where the source put them.
        task / type / domain: labels when the source has them.
        metadata: every other field the source carried (existing scores, prompts, ...).
        origin: only for records written by curate's own LLaVA exporter: the provenance it stored
            (``dataset``, ``original_id``, ``original_format`` of the first ingest, plus ``key``, the
            exported id). ``original_id`` is then restored from it. ``None`` for third-party data.
    """

    original_id: str
    images: list[str]
    conversations: list[Turn]
    task: str | None = None
    type: str | None = None
    domain: str | None = None
    metadata: dict = field(default_factory=dict)
    origin: dict | None = None


@dataclass
class BadRecord:
    """A source record that cannot become a sample.

    Attributes:
        original_id: the best id available, else ``<file>#<index>`` (JSON list position) or
            ``<file>:line N`` (JSONL, 1-based).
        reason: short machine reason from the vocabulary in this module's docstring.
        detail: a human-readable message.
    """

    original_id: str
    reason: str
    detail: str


class FormatError(Exception):
    """Raised inside a parser for one record; the parser turns it into a :class:`BadRecord`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_annotations(fmt: str, data: bytes, source_name: str, **options: Any) -> Iterator[RawRecord | BadRecord]:
    """Parse one annotation file of format ``fmt`` (one of :data:`FORMATS`).

    Args:
        fmt: the format name.
        data: the file's raw bytes.
        source_name: the file's name or path, used for fallback ids and (MMInstruct) domain/type hints.
        **options: format options; ``encoding`` (default ``utf-8``, BOM tolerated) is common to all.
            Unknown options raise ``ValueError`` (a typo in a recipe must not be ignored).

    Yields:
        One :class:`RawRecord` or :class:`BadRecord` per input record, in file order.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r} (want one of {list(FORMATS)})")
    module = importlib.import_module(f"libcurate.formats.{fmt}")
    allowed = [n for n, p in inspect.signature(module.parse).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for format {fmt!r} (allowed: {allowed})")
    check_encoding(options.get("encoding", "utf-8"))
    # Each module's parse checks its options eagerly and returns a lazy generator over the records.
    return module.parse(data, source_name, **options)


# -- decoding ---------------------------------------------------------------------------------------

def check_encoding(encoding: str) -> str:
    import codecs

    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None


def _decode_error(where: str, encoding: str, e: UnicodeDecodeError) -> BadRecord:
    reason = "non_utf8" if check_encoding(encoding) == "utf-8" else "bad_encoding"
    return BadRecord(where, reason, f"not valid {encoding}: byte {e.start} ({e.object[e.start:e.start + 4]!r}): {e.reason}")


def load_json_document(data: bytes, source_name: str, encoding: str = "utf-8") -> tuple[Any, BadRecord | None]:
    """Decode and parse a whole JSON file; on failure return ``(None, BadRecord)`` for the whole file."""
    check_encoding(encoding)
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        return None, _decode_error(source_name, encoding, e)
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, BadRecord(source_name, "bad_json", f"invalid JSON: {e}")


def iter_json_lines(data: bytes, source_name: str, encoding: str = "utf-8") -> Iterator[tuple[str, int, Any]]:
    """JSONL: yield ``(line_id, lineno, obj_or_BadRecord)`` for every non-blank line.

    Each line is decoded on its own, so one bad line does not spoil the file. Lines are split on
    ``\\n`` in bytes, so ``encoding`` must be ASCII-compatible (UTF-8, GB18030, Latin-1 are).
    """
    check_encoding(encoding)
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        line_id = f"{source_name}:line {lineno}"
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            yield line_id, lineno, _decode_error(line_id, encoding, e)
            continue
        try:
            yield line_id, lineno, json.loads(text)
        except json.JSONDecodeError as e:
            yield line_id, lineno, BadRecord(line_id, "bad_json", f"invalid JSON: {e}")


def record_list(obj: Any, source_name: str, wrapper: str = "annotations") -> tuple[list | None, BadRecord | None]:
    """Accept a bare list of records or ``{wrapper: [...]}``; anything else is ``bad_layout``."""
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), list):
        return obj[wrapper], None
    if isinstance(obj, list):
        return obj, None
    kind = f"object with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
    return None, BadRecord(source_name, "bad_layout", f"want a list of records or {{{wrapper!r}: [...]}}, got {kind}")


# -- record helpers ---------------------------------------------------------------------------------

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def norm_image_ref(ref: Any, strip_prefix: str = "") -> str:
    """A relative image path: ``./`` and ``strip_prefix`` removed; absolute, URL and ``..`` refused."""
    if not isinstance(ref, str) or not ref.strip():
        raise FormatError("bad_image_ref", f"image reference must be a non-empty string, got {ref!r}")
    path = ref.strip().replace("\\", "/")
    if strip_prefix and path.startswith(strip_prefix):
        path = path[len(strip_prefix):]
    while path.startswith("./"):
        path = path[2:]
    if path.startswith("/") or _URL_RE.match(path) or re.match(r"^[A-Za-z]:/", path):
        raise FormatError("bad_image_ref", f"image reference {ref!r} is not relative to the images root")
    parts = path.split("/")
    if any(p in ("", "..") for p in parts):
        raise FormatError("bad_image_ref", f"image reference {ref!r} has an empty or '..' component")
    return path


def safe_id(value: Any, name: str) -> str:
    """An id usable inside a file name (cc_sbu / LRV ``image_id``): str or int, no path separators."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FormatError("malformed_record", f"{name} must be a string or integer, got {value!r}")
    s = str(value).strip()
    if not s or "/" in s or "\\" in s or s in (".", ".."):
        raise FormatError("bad_image_ref", f"{name} {value!r} cannot name an image file")
    return s


def require_str(rec: dict, name: str) -> str:
    if name not in rec or rec[name] is None:
        raise FormatError("missing_field", f"record has no {name!r}")
    v = rec[name]
    if not isinstance(v, str):
        raise FormatError("malformed_record", f"{name!r} must be a string, got {type(v).__name__}")
    return v


def human_turn(question: str) -> str:
    """The first human turn for sources without image tokens: ``<image>\\n`` + question, unless the
    question already places the token itself."""
    return question if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n{question}"


_CONV_REASONS = (
    ("empty conversation", "empty_conversation"),
    ("unknown role", "unknown_role"),
    ("roles out of order", "roles_out_of_order"),
    ("ends with a human turn", "no_answer"),
    ("empty answer", "empty_answer"),
    ("empty instruction", "empty_instruction"),
    ("must be a string", "malformed_record"),
)


def check_conversation(turns: list[Turn], n_images: int) -> None:
    """Validate with :func:`libcurate.records.validate_conversation` and the image-token count; raise
    :class:`FormatError` with a precise reason."""
    try:
        validate_conversation(turns)
    except RecordError as e:
        msg = str(e)
        reason = next((r for needle, r in _CONV_REASONS if needle in msg), "invalid_conversation")
        raise FormatError(reason, msg) from None
    n_tokens = sum(t.value.count(IMAGE_TOKEN) for t in turns)
    if n_tokens not in (0, n_images):
        raise FormatError("image_token_mismatch", f"{n_tokens} {IMAGE_TOKEN} tokens for {n_images} image(s)")


def image_id_records(data: bytes, source_name: str, encoding: str, build: Callable[[dict, str, str], RawRecord],
                     id_of: Callable[[int, str], str]) -> Iterator[RawRecord | BadRecord]:
    """Shared loop of the formats keyed by ``image_id`` (cc_sbu_align, LRV): one JSON document, a list
    of records (optionally under ``annotations``); ``id_of(index, image_id)`` names a record and
    ``build(record, image_id, original_id)`` makes its RawRecord or raises :class:`FormatError`, which
    becomes that record's :class:`BadRecord`."""
    obj, bad = load_json_document(data, source_name, encoding)
    if bad is None:
        records, bad = record_list(obj, source_name)
    if bad is not None:
        yield bad
        return
    for i, rec in enumerate(records):
        oid = f"{source_name}#{i}"
        try:
            if not isinstance(rec, dict):
                raise FormatError("malformed_record", f"record must be an object, got {type(rec).__name__}")
            if "image_id" not in rec:
                raise FormatError("missing_field", "record has no 'image_id'")
            image_id = safe_id(rec["image_id"], "image_id")
            oid = id_of(i, image_id)
            yield build(rec, image_id, oid)
        except FormatError as e:
            yield BadRecord(oid, e.reason, e.detail)
