"""WebDataset tar shards on any :class:`~libcurate.storage.Store`: raw shards and key-aligned sidecars.

Writing uses ``webdataset.TarWriter`` with fixed owner, mode and mtime, so the same samples always give
byte-identical shards. Reading uses webdataset's tar iterators through ``gopen``; an ``s3://`` opener that
streams boto3's ``get_object`` body is registered on import (webdataset 1.0 has none of its own).

A sidecar shard holds, per key and in the raw shard's order, the outputs of one stage (``{key}.json``
scores, ``{key}.<name>.npy`` arrays). :func:`iter_aligned` joins a raw shard with its sidecars and raises
:class:`AlignmentError` on any mismatch instead of joining silently.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, Iterable, Iterator

import importlib

import numpy as np

from .records import KEY_RE, Sample
from .storage import Store, open_url

SHARD_NAME = "shard-{:06d}.tar"
TAR_MTIME = 0.0  # reproducible shards: every member gets the same mtime


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


# -- the s3:// opener for webdataset --------------------------------------------------------------
def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode[0] != "r":
        raise ValueError("the s3 opener only reads; writes go through libcurate.storage")
    # No options here: open_url takes those of the store the URL lies in (the recipe's storage.options,
    # registered when the run opened its store), and its reader resumes a GET cut partway through.
    return open_url(url)


_WDS = None


def _webdataset():
    """webdataset, imported on first use with the s3:// opener registered. Lazily: with torch installed,
    ``import webdataset`` imports torch (~0.5 GB, 1.5 s), which column-only stages (select) never need."""
    global _WDS
    if _WDS is None:
        wds = importlib.import_module("webdataset")
        importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _gopen_s3  # the attribute is the function
        _WDS = wds
    return _WDS


# -- writing ---------------------------------------------------------------------------------
class ShardWriter:
    """Write one tar shard atomically: nothing is visible at ``rel`` until :meth:`close` succeeds.

    Use as a context manager; an exception inside the block discards the partial shard.
    """

    def __init__(self, store: Store, rel: str):
        self.store, self.rel = store, rel
        self._ctx = store.open_write(rel)
        self._f = self._ctx.__enter__()
        self._tar = _webdataset().TarWriter(self._f, mtime=TAR_MTIME, user="curate", group="curate", mode=0o644)
        self.count = 0
        self.bytes = 0
        self._keys: set[str] = set()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: ``members`` maps suffix (``json``, ``img0.jpg``, ``clip.npy``) to bytes."""
        if not KEY_RE.match(key):
            raise ValueError(f"bad key {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in {self.rel}")
        self._keys.add(key)
        obj = {"__key__": key}
        obj.update(members)
        self.bytes += self._tar.write(obj)
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
        try:
            self._tar.tarstream.close()
        except Exception:
            pass
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# -- reading ---------------------------------------------------------------------------------
def _raise(exn: Exception) -> bool:
    raise exn


def iter_members(url: str) -> Iterator[dict[str, Any]]:
    """Samples of a shard as webdataset dicts (``__key__`` plus suffix -> bytes), in tar order.

    Raises :class:`ShardReadError` for a truncated or corrupt tar and for member names that are not
    plain ``key.suffix`` names (``../x``, absolute paths, directories): our own shards never hold such.
    """
    def check(fname: str) -> bool:
        if fname.startswith("/") or "/" in fname or "\\" in fname or fname.startswith(".."):
            raise ShardReadError(f"unsafe member name {fname!r} in {url}")
        return True

    try:
        tariterators = _webdataset().tariterators
        streams = tariterators.url_opener([{"url": url}], handler=_raise)
        files = tariterators.tar_file_expander(streams, handler=_raise, select_files=check)
        for sample in tariterators.group_by_keys(files, handler=_raise):
            key = sample["__key__"]
            if not KEY_RE.match(key):
                raise ShardReadError(f"bad sample key {key!r} in {url}")
            yield sample
    except ShardReadError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ShardReadError(f"cannot read shard {url}: {e}") from e


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
