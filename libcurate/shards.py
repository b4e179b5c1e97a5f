"""WebDataset tar shards on any :class:`~libcurate.storage.Store`: raw shards and key-aligned sidecars.

The tar members go in and out through :mod:`libcurate.tario` (plain ustar headers, no ``tarfile`` object
per member): writing gives fixed owner, mode and an integer mtime, so the same samples always give
byte-identical shards that tarfile, webdataset and GNU tar read; reading streams the object from
:func:`~libcurate.storage.open_url` (local file or S3 body, never seeking) and groups members into
samples the way webdataset's ``group_by_keys`` does. ``.npy`` members are written and parsed here too
(:func:`npy_bytes`, :func:`npy_load`), byte-identical to ``np.save`` without its per-call header work.

A sidecar shard holds, per key and in the raw shard's order, the outputs of one stage (``{key}.json``
scores, ``{key}.<name>.npy`` arrays). :func:`iter_aligned` joins a raw shard with its sidecars and raises
:class:`AlignmentError` on any mismatch instead of joining silently.
"""

from __future__ import annotations

import io
import json
import math
import re
from typing import Any, Iterable, Iterator

import numpy as np

from .records import KEY_RE, Sample
from .storage import Store, open_url
from .tario import TarFormatError, TarStreamWriter, iter_files

SHARD_NAME = "shard-{:06d}.tar"
TAR_MTIME = 0  # reproducible shards: every member gets the same mtime (an int: a float costs a pax header each)
TAR_OWNER = "curate"
TAR_MODE = 0o644


class ShardReadError(Exception):
    """A shard could not be read (truncated, corrupt, unsafe member names)."""


class AlignmentError(ShardReadError):
    """A sidecar's keys do not match its raw shard key-for-key."""


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index)


def shard_index(name: str) -> int:
    base = name.rsplit("/", 1)[-1]
    if not (base.startswith("shard-") and base.endswith(".tar")):
        raise ValueError(f"not a shard name: {name!r}")
    return int(base[len("shard-"):-len(".tar")])


def shard_stem(name: str) -> str:
    return name.rsplit("/", 1)[-1][: -len(".tar")]


# -- writing ---------------------------------------------------------------------------------
class ShardWriter:
    """Write one tar shard atomically: nothing is visible at ``rel`` until :meth:`close` succeeds.

    Use as a context manager; an exception inside the block discards the partial shard.
    """

    def __init__(self, store: Store, rel: str):
        self.store, self.rel = store, rel
        self._ctx = store.open_write(rel)
        self._f = self._ctx.__enter__()
        self._tar = TarStreamWriter(self._f, uname=TAR_OWNER, gname=TAR_OWNER, mode=TAR_MODE, mtime=TAR_MTIME)
        self.count = 0
        self.bytes = 0
        self._keys: set[str] = set()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: ``members`` maps suffix (``json``, ``img0.jpg``, ``clip.npy``) to bytes (a str is
        written as UTF-8). Members go in suffix order (as webdataset's ``TarWriter`` sorts them); suffixes
        starting with ``_`` are metadata and are not written."""
        if not KEY_RE.match(key):
            raise ValueError(f"bad key {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in {self.rel}")
        items = []
        for suffix in sorted(members):
            if not suffix:
                raise ValueError(f"empty member suffix for key {key!r}")
            if suffix[0] == "_":
                continue
            v = members[suffix]
            if isinstance(v, str):
                v = v.encode("utf-8")
            elif isinstance(v, memoryview):
                v = v.tobytes()
            elif not isinstance(v, (bytes, bytearray)):
                raise ValueError(f"member {suffix!r} of {key!r} is {type(v).__name__}, not bytes")
            items.append((f"{key}.{suffix}", v))
        self._keys.add(key)
        for name, v in items:
            self._tar.add(name, v)
            self.bytes += len(v)
        self.count += 1

    def write_sample(self, sample: Sample) -> None:
        members = {"json": sample.to_json()}
        for suffix, im in zip(sample.member_names(), sample.images):
            members[suffix] = im.data
        self.write(sample.key, members)

    def close(self) -> None:
        self._tar.close()
        self._ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        """Discard the partial shard (the store removes its temporary object)."""
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


# -- .npy members ------------------------------------------------------------------------------
# np.save formats a header dict per call and np.load parses it back with ast.literal_eval (a compile()
# per array); a shard's arrays share a handful of (dtype, shape) pairs, so headers are made once.
_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_NPY_CACHE_MAX = 4096
_NPY_V1 = b"\x93NUMPY\x01\x00"
# The header np.save writes for a simple dtype (version 1.0: dict, space padding, newline).
_NPY_HEADER_RE = re.compile(r"\{'descr': '([<>|=]?[biufcSU]\d+)', 'fortran_order': (True|False), "
                            r"'shape': \(((?:\d+, )*\d+,?|)\), \} *\n")
_NPY_DTYPES: dict[str, np.dtype] = {}


def _np_save(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` (made C-contiguous) as ``.npy`` bytes, byte-identical to ``np.save``'s; the header of each
    (dtype, shape) is np.save's own, taken from its first output and reused."""
    a = np.ascontiguousarray(arr)
    dt = a.dtype
    if dt.names is not None or dt.hasobject:
        return _np_save(a)  # structured / object dtypes: rare, and np.save decides (object raises)
    key = (dt.str, a.shape)
    head = _NPY_HEADERS.get(key)
    if head is None:
        full = _np_save(a)
        if len(_NPY_HEADERS) >= _NPY_CACHE_MAX:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[key] = full[:len(full) - a.nbytes]
        return full
    return head + a.tobytes()


def npy_load(data: bytes) -> np.ndarray:
    """The array in ``.npy`` bytes (a new, writable array, as ``np.load`` returns). The header np.save writes
    for numbers, bools and fixed-size strings is parsed directly; anything else (other versions or
    dtypes, a size mismatch) goes to ``np.load``, whose errors are the errors."""
    if data[:8] == _NPY_V1 and len(data) >= 10:
        start = 10 + (data[8] | data[9] << 8)
        m = _NPY_HEADER_RE.fullmatch(bytes(data[10:start]).decode("latin-1"))
        if m is not None:
            descr, fortran, dims = m.groups()
            dt = _NPY_DTYPES.get(descr)
            if dt is None:
                dt = _NPY_DTYPES[descr] = np.dtype(descr)
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
            count = math.prod(shape)
            if len(data) - start == count * dt.itemsize:
                flat = np.frombuffer(data, dt, count, start).copy()
                if fortran == "True":
                    return flat.reshape(shape[::-1]).transpose()
                return flat.reshape(shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


# -- reading ---------------------------------------------------------------------------------
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (``__x__``), skipped as it does


def iter_members(url: str) -> Iterator[dict[str, Any]]:
    """Samples of a shard as webdataset dicts (``__key__``, ``__url__`` plus suffix -> bytes), in tar order.

    Consecutive members ``<key>.<suffix>`` form one sample (key: the name up to its first ``.``; suffix
    lower-cased), as webdataset's ``group_by_keys`` groups them; names without a ``.`` and non-regular
    members are passed over as it does. Raises :class:`ShardReadError` for a truncated or corrupt tar,
    a suffix repeated within a sample, and member names that are not plain ``key.suffix`` names
    (``../x``, absolute paths, directories) or bad keys: our own shards never hold such.
    """
    try:
        with open_url(url) as f:
            # an S3 body is a raw stream: 512-byte header reads go through a buffer, not one call each
            src = f if isinstance(f, io.BufferedIOBase) else io.BufferedReader(f, 1 << 16)
            sample: dict[str, Any] | None = None
            for fname, data in iter_files(src):
                if fname.startswith("__") and (("/" not in fname and fname.endswith("__"))
                                               or _META_RE.match(fname)):
                    continue
                if fname.startswith("/") or "/" in fname or "\\" in fname or fname.startswith(".."):
                    raise ShardReadError(f"unsafe member name {fname!r} in {url}")
                key, dot, suffix = fname.partition(".")
                if not dot or not key:
                    continue
                suffix = suffix.lower()
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield _checked(sample, url)
                    sample = {"__key__": key, "__url__": url}
                if suffix in sample:
                    raise ShardReadError(f"duplicate member {fname!r} in {url}")
                sample[suffix] = data
            if sample is not None:
                yield _checked(sample, url)
    except ShardReadError:
        raise
    except (TarFormatError, EOFError, OSError, ValueError) as e:
        raise ShardReadError(f"cannot read shard {url}: {e}") from e


def _checked(sample: dict[str, Any], url: str) -> dict[str, Any]:
    if not KEY_RE.match(sample["__key__"]):
        raise ShardReadError(f"bad sample key {sample['__key__']!r} in {url}")
    return sample


def index_rel(rel: str) -> str:
    """``raw/shard-000001.tar`` -> ``raw/_index/shard-000001.jsonl``: the shard's records without images."""
    parent, _, name = rel.rpartition("/")
    return f"{parent}/_index/{name[:-len('.tar')]}.jsonl" if parent else f"_index/{name[:-len('.tar')]}.jsonl"


def index_bytes(samples: Iterable[Sample]) -> bytes:
    return b"".join(s.to_json() + b"\n" for s in samples)


def iter_samples(store: Store, rel: str, with_images: bool = True) -> Iterator[Sample]:
    """Raw-shard samples as :class:`Sample` objects (images attached unless ``with_images`` is False).

    Without images, the shard's record index (written by ingest beside the tar) is read when present,
    so text-only stages and selection never download the image bytes.
    """
    if not with_images and store.exists(index_rel(rel)):
        for line in store.read_bytes(index_rel(rel)).splitlines():
            yield Sample.from_json(line)
        return
    for m in iter_members(store.uri(rel)):
        rec = json.loads(m["json"])
        images = None
        if with_images:
            s = Sample.from_dict(rec)
            images = [m.get(suffix) for suffix in s.member_names()]
            if any(b is None for b in images):
                raise ShardReadError(f"sample {m['__key__']} in {rel} misses an image member")
        yield Sample.from_dict(rec, images)


def read_keys(store: Store, rel: str) -> list[str]:
    return [m["__key__"] for m in iter_members(store.uri(rel))]


def iter_aligned(raw: Iterable[Sample], sidecars: dict[str, Iterable[dict]],
                 quarantined: dict[str, set[str]] | None = None) -> Iterator[tuple[Sample, dict[str, dict | None]]]:
    """Join raw samples with sidecar members key-for-key.

    ``sidecars`` maps a stage name to its sidecar member iterator; ``quarantined`` maps the stage name to
    the keys that stage quarantined (those are absent from its sidecar and yield ``None``). Any other gap,
    extra key or reordering raises :class:`AlignmentError`.
    """
    quarantined = quarantined or {}
    its = {name: iter(it) for name, it in sidecars.items()}
    pending: dict[str, dict | None] = {name: next(it, None) for name, it in its.items()}
    for sample in raw:
        joined: dict[str, dict | None] = {}
        for name, it in its.items():
            cur = pending[name]
            if cur is not None and cur["__key__"] == sample.key:
                joined[name] = cur
                pending[name] = next(it, None)
            elif sample.key in quarantined.get(name, ()):
                joined[name] = None
            else:
                got = cur["__key__"] if cur is not None else "end of shard"
                raise AlignmentError(f"sidecar {name!r} is misaligned: raw key {sample.key!r}, sidecar has {got!r}")
        yield sample, joined
    for name, cur in pending.items():
        if cur is not None:
            raise AlignmentError(f"sidecar {name!r} has extra key {cur['__key__']!r} after the raw shard ended")
