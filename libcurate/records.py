"""The sample schema: one image–instruction sample, lossless across every format curate reads or writes.

A :class:`Sample` has a stable ``key`` (a content hash of its images and conversation, so the same sample
ingested twice gets the same key), one or more :class:`ImageRef` (bytes, format, sha256, size), the
conversation as LLaVA turns (``human`` / ``gpt``, the ``<image>`` token kept where the source put it),
its :class:`Source`, optional task/type/domain labels and free ``metadata`` (e.g. scores that came with
the source).

In a shard a sample is ``{key}.json`` (this record without image bytes) plus ``{key}.img{i}.{ext}`` per
image. :meth:`Sample.to_json` / :meth:`Sample.from_json` are the only (de)serialisers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
IMAGE_FORMATS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# WebDataset splits a member name at its first dot, so a key must not contain one; it must also be
# safe as a file name everywhere (no slashes, no "..").
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
SCHEMA_VERSION = 1
# Deepest nesting a record (or its metadata) may have: LLaVA records nest 3-4 levels; far deeper ones
# exhaust recursive parsers and serialisers downstream (json, PyArrow, JavaScript).
MAX_JSON_DEPTH = 64
# Longest integer literal accepted (Python's default int-parsing limit; fixed here so the outcome does
# not depend on the interpreter's PYTHONINTMAXSTRDIGITS).
MAX_INT_DIGITS = 4300


class RecordError(ValueError):
    """A record that violates the schema; the message says which field and why."""


@dataclass
class ImageRef:
    """One image of a sample.

    Attributes:
        format: ``jpeg``, ``png`` or ``webp`` (what the bytes are, not what the file name said).
        sha256: hex digest of ``data``.
        width / height: pixels, read from the decoded image at ingest.
        name: the image's path or id in the source dataset (provenance only).
        data: the encoded bytes; ``None`` when only the record is loaded.
    """

    format: str
    sha256: str
    width: int
    height: int
    name: str = ""
    data: bytes | None = field(default=None, repr=False)

    @property
    def ext(self) -> str:
        return IMAGE_FORMATS[self.format]

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("data")
        return d


@dataclass
class Turn:
    role: str  # "human" | "gpt"
    value: str


@dataclass
class Source:
    """Where a sample came from. Attributes: dataset, original_id, original_format (ingest format)."""

    dataset: str
    original_id: str
    original_format: str


@dataclass
class Sample:
    key: str
    images: list[ImageRef]
    conversations: list[Turn]
    source: Source
    task: str | None = None
    type: str | None = None
    domain: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- derived views ------------------------------------------------------------------------
    def turn_pairs(self) -> list[tuple[str, str]]:
        """(instruction, response) pairs with the ``<image>`` token removed from instructions."""
        out = []
        for i in range(0, len(self.conversations) - 1, 2):
            out.append((strip_image_token(self.conversations[i].value), self.conversations[i + 1].value))
        return out

    @property
    def first_instruction(self) -> str:
        return strip_image_token(self.conversations[0].value)

    @property
    def responses(self) -> list[str]:
        return [t.value for t in self.conversations if t.role == "gpt"]

    def member_names(self) -> list[str]:
        """Tar member suffixes (after ``{key}.``) of this sample's images."""
        return [f"img{i}.{im.ext}" for i, im in enumerate(self.images)]

    # -- validation and (de)serialisation --------------------------------------------------------
    def validate(self) -> "Sample":
        validate_key(self.key)
        if not self.images:
            raise RecordError("a sample needs at least one image")
        for i, im in enumerate(self.images):
            if im.format not in IMAGE_FORMATS:
                raise RecordError(f"image {i}: unsupported format {im.format!r} (want one of {sorted(IMAGE_FORMATS)})")
            if not (isinstance(im.width, int) and isinstance(im.height, int) and im.width > 0 and im.height > 0):
                raise RecordError(f"image {i}: width and height must be positive integers")
            if im.data is not None and hashlib.sha256(im.data).hexdigest() != im.sha256:
                raise RecordError(f"image {i}: sha256 does not match the bytes")
        validate_conversation(self.conversations)
        n_tokens = sum(t.value.count(IMAGE_TOKEN) for t in self.conversations)
        if n_tokens not in (0, len(self.images)):
            raise RecordError(f"{n_tokens} {IMAGE_TOKEN} tokens for {len(self.images)} images")
        # what to_json writes beyond the checks above must be strict, UTF-8-encodable JSON
        problem = json_value_problem([[t.value for t in self.conversations], self.task, self.type, self.domain,
                                      asdict(self.source), [im.name for im in self.images], self.metadata])
        if problem is not None:
            raise RecordError(f"{problem[1]} ({problem[0]})")
        return self

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "key": self.key,
            "images": [im.meta() for im in self.images],
            "conversations": [{"from": t.role, "value": t.value} for t in self.conversations],
            "source": asdict(self.source),
            "task": self.task,
            "type": self.type,
            "domain": self.domain,
            "metadata": self.metadata,
        }

    def to_json(self) -> bytes:
        """Strict JSON (no NaN/Infinity) in UTF-8; :meth:`validate` refuses what cannot be written."""
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True, allow_nan=False).encode("utf-8")

    @classmethod
    def from_dict(cls, d: dict, images: list[bytes] | None = None) -> "Sample":
        try:
            ims = [ImageRef(**m) for m in d["images"]]
            if images is not None:
                if len(images) != len(ims):
                    raise RecordError(f"record lists {len(ims)} images but {len(images)} were found")
                for im, data in zip(ims, images):
                    im.data = data
            s = cls(
                key=d["key"],
                images=ims,
                conversations=[Turn(t["from"], t["value"]) for t in d["conversations"]],
                source=Source(**d["source"]),
                task=d.get("task"),
                type=d.get("type"),
                domain=d.get("domain"),
                metadata=d.get("metadata") or {},
            )
        except (KeyError, TypeError) as e:
            raise RecordError(f"malformed record: {e!r}") from e
        return s

    @classmethod
    def from_json(cls, data: bytes, images: list[bytes] | None = None) -> "Sample":
        return cls.from_dict(json.loads(data), images)


def strip_image_token(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip()


def validate_key(key: str) -> None:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise RecordError(f"bad key {key!r}: want 1-128 of [A-Za-z0-9_-]")


def validate_conversation(turns: list[Turn]) -> None:
    """Turns must alternate human, gpt, human, gpt ... and end with a non-empty gpt answer."""
    if not turns:
        raise RecordError("empty conversation")
    for i, t in enumerate(turns):
        want = ROLES[i % 2]
        if t.role not in ROLES:
            raise RecordError(f"turn {i}: unknown role {t.role!r} (want 'human' or 'gpt')")
        if t.role != want:
            raise RecordError(f"turn {i}: roles out of order: got {t.role!r}, expected {want!r}")
        if not isinstance(t.value, str):
            raise RecordError(f"turn {i}: value must be a string")
    if len(turns) % 2:
        raise RecordError("conversation ends with a human turn (no answer)")
    for i, t in enumerate(turns):
        if t.role == "gpt" and not t.value.strip():
            raise RecordError(f"turn {i}: empty answer")
        if t.role == "human" and not strip_image_token(t.value) and i > 0:
            raise RecordError(f"turn {i}: empty instruction")


class HugeInteger:
    """Stands for an integer literal longer than :data:`MAX_INT_DIGITS` digits in a parsed record (see
    :func:`parse_int`), so the record can be refused with its own id instead of failing the parse."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def parse_int(text: str):
    """``json`` ``parse_int`` hook: ints as usual, over-long literals as :class:`HugeInteger`."""
    n = len(text) - (text[0] == "-")
    if n > MAX_INT_DIGITS:
        return HugeInteger(n)
    return int(text)


def json_value_problem(obj: Any, max_depth: int = MAX_JSON_DEPTH) -> tuple[str, str] | None:
    """The first reason a parsed JSON value cannot be stored and exported as strict UTF-8 JSON, as
    ``(reason, detail)``, or ``None``. Iterative (no recursion), so any depth is safe to check.

    Reasons: ``invalid_unicode`` (a string or key holds a lone surrogate such as ``"\\ud800"``: not
    encodable as UTF-8), ``non_finite_number`` (NaN, Infinity, or a float literal too large for a
    double), ``huge_integer`` (an integer literal of more than :data:`MAX_INT_DIGITS` digits, see
    :func:`parse_int`), ``too_deep`` (nesting deeper than ``max_depth``).
    """
    if _walk(obj, max_depth, None) is None:
        return None
    return _walk(obj, max_depth, "$")  # again, naming where (paths cost time on the good path)


def _walk(obj: Any, max_depth: int, root: str | None) -> tuple[str, str] | None:
    stack: list[tuple[Any, str | None, int]] = [(obj, root, 1)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and not _encodable(v):  # isascii() is O(1): most text costs nothing here
                return "invalid_unicode", f"{path}: string holds a lone UTF-16 surrogate (not encodable as UTF-8)"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return "non_finite_number", f"{path}: {v!r} is not a finite number (not valid strict JSON)"
        elif isinstance(v, HugeInteger):
            return "huge_integer", f"{path}: an integer of {v.digits} digits (more than {MAX_INT_DIGITS})"
        elif isinstance(v, (dict, list, tuple)):
            if depth > max_depth:
                return "too_deep", f"{path}: nested more than {max_depth} levels deep"
            if isinstance(v, dict):
                for k, x in v.items():
                    if isinstance(k, str) and not k.isascii() and not _encodable(k):
                        return "invalid_unicode", f"{path}: a key holds a lone UTF-16 surrogate"
                    stack.append((x, path and f"{path}.{_printable(k)}", depth + 1))
            else:
                stack.extend((x, path and f"{path}[{i}]", depth + 1) for i, x in enumerate(v))
    return None


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(k: Any) -> str:
    return str(k).encode("utf-8", "backslashreplace").decode("utf-8")[:64]


def make_key(image_hashes: list[str], turns: list[Turn], salt: str = "") -> str:
    """Content-addressed key: the same images, conversation and ``salt`` give the same key everywhere.

    Ingest salts with the record's original id and its occurrence number in the source, so exact
    duplicates under different ids (or a repeated id) still get distinct, stable keys.
    """
    h = hashlib.sha256(salt.encode("utf-8") + b"\3")
    for s in image_hashes:
        h.update(s.encode())
        h.update(b"\0")
    for t in turns:
        h.update(t.role.encode())
        h.update(b"\1")
        h.update(t.value.encode("utf-8"))
        h.update(b"\2")
    return h.hexdigest()[:24]
