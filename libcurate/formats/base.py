"""Annotation parsers: the common record types, the dispatcher and the helpers every format shares.

:func:`parse_annotations` turns one annotation file (bytes) into a stream of :class:`RawRecord` (a
parsed sample, images still unresolved) and :class:`BadRecord` (a record that cannot become a sample,
with a short machine ``reason``). The ingest stage resolves ``RawRecord.images`` against its images
root, decodes them, builds the :class:`~libcurate.records.Sample` and quarantines every BadRecord.

Files are read as a stream (:func:`iter_json_array`, :func:`iter_json_lines`): a 1 GB annotations file is
never held whole, as bytes or as a parsed tree; records come out one at a time, in file order.

Accounting contract: every input record yields exactly one RawRecord or BadRecord, nothing is skipped
silently. Two documented exceptions: where a file stops being readable (not valid in its encoding, not
JSON, cut short) the records before that point are yielded and one BadRecord named after the file stands
for the rest (whose record count is unknowable; a file broken from its start is that one BadRecord), and
blank lines of JSONL files are not records. One pathological record inside a well-formed JSON list
(nesting too deep for the parser) is that record's BadRecord; the rest of the list is read. MMInstruct
counts QA *items*, not lines (see :mod:`libcurate.formats.mminstruct`).

Reasons vocabulary (``BadRecord.reason``):

file level
    ``non_utf8`` (the file or JSONL line is not valid UTF-8), ``bad_encoding`` (not valid in the
    ``encoding=`` the caller named), ``bad_json``, ``bad_layout`` (valid JSON of the wrong top-level shape)
record level
    ``malformed_record`` (wrong type of record or field), ``missing_field``, ``no_image``,
    ``bad_image_ref`` (empty, absolute, URL or ``..`` image path, or one holding a control character
    such as NUL), ``image_token_mismatch`` (number of ``<image>`` tokens neither 0 nor the number of
    images)
record values (:func:`libcurate.records.json_value_problem`; checked on every record before its fields)
    ``invalid_unicode`` (a lone surrogate escape such as ``"\\ud800"``: the text cannot be stored as
    UTF-8), ``non_finite_number`` (``NaN``, ``Infinity``, or a float that overflows: not strict JSON, so
    such a record is quarantined rather than exported as JSON other parsers reject), ``huge_integer``
    (more than 4300 digits), ``too_deep`` (nested more than 64 levels; deeper than the JSON parser can
    go, the record is ``too_deep`` too)
conversation (mapped from :func:`libcurate.records.validate_conversation`)
    ``empty_conversation``, ``unknown_role``, ``roles_out_of_order``, ``no_answer`` (ends with a human
    turn), ``empty_answer``, ``empty_instruction``, ``invalid_conversation`` (any other schema error)
MMInstruct items
    ``generation_error``, ``no_items``, ``duplicate_tag``, ``missing_question_tag``,
    ``missing_answer_tag``, ``missing_options_tag``, ``invalid_options``, ``invalid_choice``,
    ``invalid_judge_answer``, ``judge_unbalanced``
"""

from __future__ import annotations

import codecs
import importlib
import inspect
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator

from libcurate.records import IMAGE_TOKEN, RecordError, Turn, json_value_problem, parse_int, validate_conversation

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


def parse_annotations(fmt: str, data: bytes | BinaryIO, source_name: str, **options: Any) -> Iterator[RawRecord | BadRecord]:
    """Parse one annotation file of format ``fmt`` (one of :data:`FORMATS`).

    Args:
        fmt: the format name.
        data: the file's raw bytes, or a binary stream (anything with ``read(n)``: a file, an S3 body),
            read incrementally.
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


def _decode_error(where: str, encoding: str, e: UnicodeDecodeError, offset: int = 0) -> BadRecord:
    reason = "non_utf8" if check_encoding(encoding) == "utf-8" else "bad_encoding"
    return BadRecord(where, reason, f"not valid {encoding}: byte {offset + e.start} "
                                    f"({e.object[e.start:e.start + 4]!r}): {e.reason}")


def as_stream(data: bytes | BinaryIO) -> BinaryIO:
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data


def _json_error(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply for the JSON parser"
    return str(e)


def iter_json_lines(data: bytes | BinaryIO, source_name: str, encoding: str = "utf-8") -> Iterator[tuple[str, int, Any]]:
    """JSONL: yield ``(line_id, lineno, obj_or_BadRecord)`` for every non-blank line, reading ``data``
    (bytes or a binary stream) one line at a time.

    Each line is decoded and parsed on its own, so one bad line (not valid in the encoding, not JSON,
    nested too deeply, a lone surrogate, NaN, ...) is that line's BadRecord and the rest of the file is
    read. Lines are split on ``\\n`` in bytes, so ``encoding`` must be ASCII-compatible (UTF-8, GB18030,
    Latin-1 are).
    """
    check_encoding(encoding)
    for lineno, raw in enumerate(_iter_byte_lines(as_stream(data)), start=1):
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        if not raw.strip():
            continue
        line_id = f"{source_name}:line {lineno}"
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            yield line_id, lineno, _decode_error(line_id, encoding, e)
            continue
        try:
            obj = _DECODER.decode(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            reason = "too_deep" if isinstance(e, RecursionError) else "bad_json"
            yield line_id, lineno, BadRecord(line_id, reason, f"invalid JSON: {_json_error(e)}")
            continue
        yield line_id, lineno, obj


def _iter_byte_lines(f: BinaryIO, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream without their ``\\n`` (any reader with ``read(n)``, e.g. an S3 body);
    a line longer than a chunk is gathered in pieces (joined once)."""
    pending: list[bytes] = []
    while True:
        block = f.read(chunk)
        if not block:
            break
        start = 0
        while True:
            nl = block.find(b"\n", start)
            if nl < 0:
                pending.append(block[start:])
                break
            pending.append(block[start:nl])
            yield b"".join(pending)
            pending = []
            start = nl + 1
    yield b"".join(pending)


# -- streaming JSON list reader -----------------------------------------------------------------------

_DECODER = json.JSONDecoder(parse_int=parse_int)
_WS = re.compile(r"[ \t\n\r]*")
_STRUCT = re.compile(r'["\[\]{}]')
_SCALAR_END = re.compile(r"[,\]}\s]")
_CHUNK = 1 << 20


class _Unreadable(Exception):
    """The file stops being readable here; ``bad`` is the BadRecord that stands for the rest of it."""

    def __init__(self, bad: BadRecord):
        super().__init__(bad.detail)
        self.bad = bad


class _Window:
    """A decoded text window over a binary stream: ``buf[pos:]`` is text not yet consumed; earlier text is
    dropped as the reader moves on, so memory stays at about one chunk plus the current record."""

    def __init__(self, f: BinaryIO, source_name: str, encoding: str):
        self.f, self.source_name, self.encoding = f, source_name, encoding
        self.decoder = codecs.getincrementaldecoder(encoding)("strict")
        self.buf, self.pos, self.eof = "", 0, False
        self.bytes_in = 0                  # bytes handed to the decoder so far
        self.dropped = 0                   # characters dropped from the front of buf
        self.dropped_lines = 0             # newlines among them
        self.dropped_col = 0               # characters after the last of them
        self.first = True

    def fill(self, at_least: int = _CHUNK) -> bool:
        """Append at least ``at_least`` more bytes' worth of text; False at the end of the file."""
        if self.eof:
            return False
        if self.pos > len(self.buf) // 2:
            self._drop()
        got = []
        want = max(at_least, _CHUNK)
        while want > 0:
            block = self.f.read(min(want, 64 << 20))
            if not block:
                break
            if self.first:
                self.first = False
                if block.startswith(_BOM):
                    block = block[len(_BOM):]
            want -= len(block)
            try:
                got.append(self.decoder.decode(block))
            except UnicodeDecodeError as e:
                raise _Unreadable(_decode_error(self.source_name, self.encoding, e, self.bytes_in)) from None
            self.bytes_in += len(block)
        if want > 0:  # the stream ended
            try:
                got.append(self.decoder.decode(b"", final=True))
            except UnicodeDecodeError as e:
                raise _Unreadable(_decode_error(self.source_name, self.encoding, e, self.bytes_in)) from None
            self.eof = True
        text = "".join(got)
        if text:
            self.buf += text
        return bool(text) or not self.eof

    def _drop(self) -> None:
        gone = self.buf[:self.pos]
        n_lines = gone.count("\n")
        self.dropped_col = (len(gone) - gone.rfind("\n") - 1) if n_lines else self.dropped_col + len(gone)
        self.dropped_lines += n_lines
        self.dropped += len(gone)
        self.buf, self.pos = self.buf[self.pos:], 0

    def where(self, i: int) -> str:
        """``line L column C (char N)`` of buffer index ``i``, counted from the start of the file."""
        nl = self.buf.rfind("\n", 0, i)
        line = self.dropped_lines + self.buf.count("\n", 0, i) + 1
        col = i - nl if nl >= 0 else self.dropped_col + i + 1
        return f"line {line} column {col} (char {self.dropped + i})"

    def skip_ws(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def broken(self, msg: str, i: int | None = None) -> _Unreadable:
        where = self.where(self.pos if i is None else i)
        return _Unreadable(BadRecord(self.source_name, "bad_json",
                                     f"invalid JSON: {msg}: {where}; the file cannot be read past this point"))


_BROKEN = -1


def _extent(buf: str, pos: int) -> int | None:
    """End index of the JSON value starting at ``buf[pos]`` found by bracket matching alone (strings
    and escapes respected, no recursion: any depth); ``None`` if it runs past the end of ``buf``,
    ``_BROKEN`` if its brackets do not match."""
    c = buf[pos]
    if c not in '[{"':
        m = _SCALAR_END.search(buf, pos)
        return m.start() if m else None
    stack: list[str] = []
    i = pos
    while True:
        m = _STRUCT.search(buf, i)
        if m is None:
            return None
        ch, i = m.group(), m.end()
        if ch == '"':
            while True:
                k = buf.find('"', i)
                if k < 0:
                    return None
                b = k
                while buf[b - 1] == "\\":
                    b -= 1
                i = k + 1
                if (k - b) % 2 == 0:  # an even run of backslashes: the quote is not escaped
                    break
            if not stack:
                return i
        elif ch in "[{":
            stack.append(ch)
        else:
            if not stack or stack.pop() != ("[" if ch == "]" else "{"):
                return _BROKEN
            if not stack:
                return i


def _next_value(w: _Window) -> tuple[Any, str] | tuple[None, BadRecord]:
    """Parse the value at ``w.pos`` (reading more of the file as needed): ``(obj, text)``, or
    ``(None, BadRecord)`` for a well-delimited value the parser cannot take (too deep); raises
    :class:`_Unreadable` where the file stops being JSON."""
    while True:
        start = w.pos
        # (too_deep, message, position) of a failed parse; the exception itself is not kept: it holds
        # the whole window (JSONDecodeError.doc) in a reference cycle through its traceback.
        failure: tuple[bool, str, int] | None = None
        try:
            obj, end = _DECODER.raw_decode(w.buf, start)
            if end < len(w.buf) or w.eof:  # a number at the window's end may go on in the next chunk
                w.pos = end
                return obj, w.buf[start:end]
        except json.JSONDecodeError as e:
            failure = (False, e.msg, e.pos)
        except RecursionError:
            failure = (True, "nested too deeply for the JSON parser", start)
        except ValueError as e:
            failure = (False, str(e), start)
        ext = _extent(w.buf, start)
        if ext is None or (failure is None and ext >= len(w.buf)):
            if not w.fill(len(w.buf) - start):  # the value runs past the window: read more (doubling)
                raise w.broken(f"the file ends inside a value ({failure[1] if failure else 'cut short'})")
            continue
        if ext != _BROKEN and failure is not None and failure[0]:
            w.pos = ext
            return None, BadRecord("", "too_deep", f"{failure[1]} ({ext - start} characters at {w.where(start)})")
        raise w.broken(failure[1] if failure else "unexpected data", failure[2] if failure else start)


def iter_json_array(data: bytes | BinaryIO, source_name: str, encoding: str = "utf-8",
                    wrapper: str | None = None) -> Iterator[tuple[int, Any, str] | BadRecord]:
    """Stream the records of a JSON list (or of ``{wrapper: [...], ...}`` when ``wrapper`` is given),
    one at a time, without holding the file: yields ``(index, obj, text)`` per record (``text``: its
    JSON source; for a record the parser cannot take, ``obj`` is ``None`` and ``text`` a
    :class:`BadRecord` with ``original_id`` ``""`` for the caller to name) and, where the file stops
    being readable, one final BadRecord named after the file (reasons ``non_utf8``/``bad_encoding``,
    ``bad_json``, ``bad_layout``).

    Uses :meth:`json.JSONDecoder.raw_decode` over a window of about 1 MiB of decoded text; a record
    larger than the window grows it (reads double) until the record fits.
    """
    check_encoding(encoding)
    w = _Window(as_stream(data), source_name, encoding)
    want = "a JSON list of records" + (f" or {{{wrapper!r}: [...]}}" if wrapper else "")
    try:
        c = w.skip_ws()
        if c == "[":
            yield from _array_items(w)
        elif c == "{" and wrapper:
            found = yield from _wrapped_items(w, wrapper)
            if not found:
                yield BadRecord(source_name, "bad_layout", f"want {want}, got an object without a {wrapper!r} list")
                return
        elif c == "":
            raise w.broken("Expecting value (the file is empty)")
        else:
            obj, text = _next_value(w)
            if obj is None and isinstance(text, BadRecord):
                raise w.broken(text.detail)
            kind = f"object with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
            yield BadRecord(source_name, "bad_layout", f"want {want}, got {kind}")
            return
        if w.skip_ws() != "":
            raise w.broken("Extra data after the top-level value")
    except _Unreadable as e:
        yield e.bad


def _array_items(w: _Window) -> Iterator[tuple[int, Any, str] | BadRecord]:
    w.pos += 1  # "["
    i = 0
    if w.skip_ws() == "]":
        w.pos += 1
        return
    while True:
        if w.skip_ws() == "":
            raise w.broken("the file ends inside the list")
        obj, text = _next_value(w)
        yield i, obj, text
        i += 1
        c = w.skip_ws()
        if c == ",":
            w.pos += 1
        elif c == "]":
            w.pos += 1
            return
        else:
            raise w.broken("Expecting ',' delimiter" if c else "the file ends inside the list")


def _wrapped_items(w: _Window, wrapper: str):
    """Members of the top-level object; the ``wrapper`` list's items are streamed, other values parsed
    and dropped. Returns whether the wrapper list was found (a repeated wrapper key is refused)."""
    w.pos += 1  # "{"
    found = False
    if w.skip_ws() == "}":
        w.pos += 1
        return False
    while True:
        if w.skip_ws() != '"':
            raise w.broken("Expecting property name enclosed in double quotes")
        key, _ = _next_value(w)
        if w.skip_ws() != ":":
            raise w.broken("Expecting ':' delimiter")
        w.pos += 1
        c = w.skip_ws()
        if key == wrapper and found:
            raise w.broken(f"a second {wrapper!r} key")
        if key == wrapper and c == "[":
            found = True
            yield from _array_items(w)
        else:
            obj, text = _next_value(w)
            if obj is None and isinstance(text, BadRecord):
                raise w.broken(text.detail)
        c = w.skip_ws()
        if c == ",":
            w.pos += 1
        elif c == "}":
            w.pos += 1
            return found
        else:
            raise w.broken("Expecting ',' delimiter")


def check_values(rec: Any) -> None:
    """Raise :class:`FormatError` if a parsed record holds a value that cannot be stored and exported as
    strict UTF-8 JSON (see :func:`libcurate.records.json_value_problem` for the reasons)."""
    problem = json_value_problem(rec)
    if problem is not None:
        raise FormatError(*problem)


def clean_id(value: Any) -> str | None:
    """A record id usable as an original id (str or int, non-empty, UTF-8-encodable), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    s = str(value)
    return s if s and json_value_problem(s) is None else None


# -- record helpers ---------------------------------------------------------------------------------

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def norm_image_ref(ref: Any, strip_prefix: str = "") -> str:
    """A relative image path: ``./`` and ``strip_prefix`` removed; absolute, URL, ``..`` and paths holding
    control characters (NUL, newline, ...) refused."""
    if not isinstance(ref, str) or not ref.strip():
        raise FormatError("bad_image_ref", f"image reference must be a non-empty string, got {ref!r}")
    path = ref.strip().replace("\\", "/")
    if _CONTROL.search(path):  # NUL, newline, ... inside a path: no file system opens it as meant
        raise FormatError("bad_image_ref", f"image reference {ref!r} holds a control character")
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
    if not s or "/" in s or "\\" in s or s in (".", "..") or _CONTROL.search(s):
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


def unparsed(item: BadRecord, fallback_id: str) -> BadRecord:
    """Name a record :func:`iter_json_array` could not parse after its place in the file."""
    item.original_id = item.original_id or fallback_id
    return item


def image_id_records(data, source_name: str, encoding: str, build: Callable[[dict, str, str], RawRecord],
                     id_of: Callable[[int, str], str]) -> Iterator[RawRecord | BadRecord]:
    """Shared loop of the formats keyed by ``image_id`` (cc_sbu_align, LRV): one JSON document (bytes
    or a binary stream, read incrementally), a list of records (optionally under ``annotations``);
    ``id_of(index, image_id)`` names a record and ``build(record, image_id, original_id)`` makes its
    RawRecord or raises :class:`FormatError`, which becomes that record's :class:`BadRecord`."""
    for item in iter_json_array(data, source_name, encoding, wrapper="annotations"):
        if isinstance(item, BadRecord):
            yield item
            return
        i, rec, text = item
        oid = f"{source_name}#{i}"
        if isinstance(text, BadRecord):
            yield unparsed(text, oid)
            continue
        try:
            if not isinstance(rec, dict):
                raise FormatError("malformed_record", f"record must be an object, got {type(rec).__name__}")
            if "image_id" not in rec:
                raise FormatError("missing_field", "record has no 'image_id'")
            image_id = safe_id(rec["image_id"], "image_id")
            if clean_id(image_id) is not None:  # else it cannot name the record (a lone surrogate)
                oid = id_of(i, image_id)
            check_values(rec)
            yield build(rec, image_id, oid)
        except FormatError as e:
            yield BadRecord(oid, e.reason, e.detail)
