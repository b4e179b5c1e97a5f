"""Columnar reads: any stage's fields and embeddings as numpy arrays aligned with the raw shards' keys.

Global decisions (selection, dedup, clusters, learned selectors) work on columns, never on one Python
object per sample: 10M samples x a few fields is tens of MB, while 10M parsed JSON records is ~9 GB.

Layout. Beside every per-shard output the stage contract writes a column file (``ShardOutput`` does it
for every stage, ingest included)::

    <prefix>/_columns/shard-000000.cols         __key__ (S24) + one array per leaf of the sidecar JSON:
                                                f:<path> float64 (NaN where absent), s:<path> str
    <prefix>/_columns/shard-000000.<name>.npy   one pooled embedding row per key (float16 [n, d])

``<path>`` is the dotted path of a leaf in the sample's JSON (``cosine``, ``per_image.0``,
``source.dataset``). Numbers become ``f:`` columns; strings and booleans (``"true"``/``"false"``)
become ``s:`` labels (UTF-8 bytes, numpy ``S``: a 24-character content hash takes 24 bytes a row,
not 96 as a unicode array would). An embedding member ``{key}.<name>.npy`` of shape [rows, d] (one row per image or
text) is pooled to one unit-norm row per sample (mean of rows, renormalised).

Reading. :func:`gather` walks the raw shards in order and returns a :class:`Table`: one row per raw
sample, every requested column aligned to it, ``NaN``/``""`` where a stage quarantined the sample or
stored no such leaf, plus the upstream quarantine reason per row. Shards written before column files
existed are read from their tar/JSONL (slow path, same result). Embeddings are gathered into one
memory-mapped ``.npy`` in a scratch directory, so a 10M x 512 fp16 matrix (10 GB) never sits in RAM.

Embedding lists. A setting ``embedding: [score_clip.img_emb, score_clip.txt_emb]`` reads one column, the
parts side by side, each part's row L2-normalised and the whole row renormalised
(:func:`concat_embeddings`; :func:`check_embedding` validates the setting, :func:`embedding_key` names it).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .shards import npy_bytes, npy_load
from .stage import (PermanentInputError, StageContext, generator_ids, processed_by, raw_shards, read_quarantine,
                    unit_of)

KEY_COL = "__key__"
KEY_DTYPE = "S24"          # records.make_key: 24 hex characters
RAW_STAGE = "ingest"


class ColumnError(ValueError):
    """A column file does not match its shard (keys, lengths) or a field is addressed wrongly."""


def columns_rel(prefix: str, unit: str) -> str:
    return f"{prefix}/_columns/{unit}.cols"


ARRAYS_MAGIC = b"CURATE-ARRAYS 1\n"


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as one blob: a magic line, a JSON index line ``{name: [offset, length]}``, then each
    array's ``.npy`` bytes. Not ``np.savez``: its zip headers differ between Python patch releases, and
    every file a run writes must be byte-identical wherever it runs (a pod's image vs a laptop)."""
    blobs, index, offset = [], {}, 0
    for name in sorted(arrays):
        b = npy_bytes(arrays[name])
        index[name] = [offset, len(b)]
        blobs.append(b)
        offset += len(b)
    head = json.dumps(index, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return ARRAYS_MAGIC + head + b"".join(blobs)


def unpack_arrays(data: bytes, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The inverse of :func:`pack_arrays` (only ``names`` when given)."""
    if not data.startswith(ARRAYS_MAGIC):
        raise ColumnError("not a curate arrays file")
    nl = data.index(b"\n", len(ARRAYS_MAGIC))
    index = json.loads(data[len(ARRAYS_MAGIC):nl])
    base = nl + 1
    wanted = index if names is None else [n for n in names if n in index]
    view = memoryview(data)  # no copy of each array's bytes before it is parsed
    return {n: npy_load(view[base + index[n][0]: base + index[n][0] + index[n][1]]) for n in wanted}


def embedding_rel(prefix: str, unit: str, name: str) -> str:
    return f"{prefix}/_columns/{unit}.{name}.npy"


# -- writing -------------------------------------------------------------------------------------
def flatten(obj, prefix: str = "", out: dict | None = None) -> dict:
    """``{"a": {"b": 1}, "c": [2, "x"]}`` -> ``{"a.b": 1, "c.0": 2, "c.1": "x"}`` (leaves only)."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}{k}.", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}{i}.", out)
    elif obj is not None:
        out[prefix[:-1]] = obj
    return out


def pool_embedding(arr: np.ndarray) -> np.ndarray:
    """[rows, d] (or [d]) -> one unit-norm float32 row: the mean of the rows, renormalised."""
    a = np.asarray(arr, dtype=np.float32)
    v = a.reshape(-1, a.shape[-1]).mean(axis=0) if a.ndim > 1 else a
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


# -- embeddings named as a list: one concatenated column ---------------------------------------------
CONCAT_SEP = "+"   # ``a.img_emb+a.txt_emb``: the Table key of the list [a.img_emb, a.txt_emb]


def check_embedding(value, where: str):
    """A config's ``embedding`` setting: one ``<stage_id>.<name>``, or a list of them whose rows are
    concatenated (:func:`concat_embeddings`), e.g. ``[score_clip.img_emb, score_clip.txt_emb]``.

    Returns the name, or the list (>= 2 distinct names; a one-item list is that name, which gives the
    same rows). Raises ValueError (a ``PermanentInputError`` once ``from_dict`` wraps it) otherwise."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: the list is empty; name one embedding '<stage_id>.<name>' or a "
                             "list of them, e.g. [score_clip.img_emb, score_clip.txt_emb]")
        parts = list(value)
    else:
        parts = [value]
    for p in parts:
        if not isinstance(p, str) or "." not in p or p.startswith(".") or p.endswith(".") or CONCAT_SEP in p:
            raise ValueError(f"{where}: {p!r}: want '<stage_id>.<name>' (e.g. score_clip.img_emb) or a "
                             "list of them")
    dup = sorted({p for p in parts if parts.count(p) > 1})
    if dup:
        raise ValueError(f"{where}: {dup} listed twice")
    return parts[0] if len(parts) == 1 else parts


def embedding_parts(spec) -> list[str]:
    """The embedding columns an ``embedding`` setting (or its Table key) reads, in order."""
    return list(spec) if isinstance(spec, (list, tuple)) else str(spec).split(CONCAT_SEP)


def embedding_key(spec) -> str:
    """The :class:`Table` key under which :func:`gather` returns an ``embedding`` setting's rows."""
    return CONCAT_SEP.join(embedding_parts(spec))


def concat_embeddings(parts, out: np.ndarray | None = None, chunk: int | None = None) -> np.ndarray:
    """Rows of several embeddings side by side: ``[n, d1], [n, d2], ... -> [n, d1 + d2 + ...]``.

    Each part's row is L2-normalised first, so no part outweighs another by its scale, then the whole
    row is renormalised: the cosine of two such rows is the mean of the parts' cosines (for two parts,
    (cos_1 + cos_2) / 2), and with CLIP ViT-L/14's image and text features it is Self-Filter's 1,536-d
    [image; text] feature. A zero part row stays zero (a missing embedding is not invented).

    Args:
        parts: [n, d_i] float arrays (memmaps and column slices of ``out`` are fine), in the listed order.
        out: where to write ([n, sum d_i], any float dtype); default a new float32 array. ``parts`` may be
            views into ``out``: each chunk is read whole before it is written.
        chunk: rows per chunk (default: 16 MiB of float32; smaller chunks stay in cache and ran faster
            than 256 MiB ones), so a 10M-row memmap never sits in RAM.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("concat_embeddings: no parts")
    for p in parts:
        if getattr(p, "ndim", None) != 2:
            raise ValueError(f"concat_embeddings: want [n, d] arrays, got shape {getattr(p, 'shape', None)}")
    rows = {p.shape[0] for p in parts}
    if len(rows) > 1:
        raise ValueError(f"concat_embeddings: the parts have different row counts {[p.shape[0] for p in parts]}")
    n = rows.pop()
    widths = [p.shape[1] for p in parts]
    total = sum(widths)
    if out is None:
        out = np.empty((n, total), np.float32)
    elif out.shape != (n, total):
        raise ValueError(f"concat_embeddings: out has shape {out.shape}, want {(n, total)}")
    step = chunk or max(1, (1 << 22) // max(total, 1))
    buf = np.empty((min(step, n), total), np.float32)     # reused: one chunk's rows, never more
    for s in range(0, n, step):
        e = min(n, s + step)
        b = buf[:e - s]
        inv, off = [], 0
        for p, d in zip(parts, widths):
            x = b[:, off:off + d]
            x[...] = p[s:e]
            inv.append(_inverse_norms(x))
            off += d
        # once each part is unit, a row's norm is sqrt(its number of non-zero parts): the row's
        # renormalisation is folded into the one multiply per part
        row_inv = _inverse_norms(np.stack([(v > 0).astype(np.float32) for v in inv], axis=1))
        off = 0
        for d, v in zip(widths, inv):
            b[:, off:off + d] *= (v * row_inv)[:, None]
            off += d
        out[s:e] = b
    return out


def _inverse_norms(x: np.ndarray) -> np.ndarray:
    """float32 [rows]: 1 / the L2 norm of each row of ``x``, 0 for a zero row (which so stays zero)."""
    norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0).astype(np.float32)


class ColumnBuilder:
    """Collects one shard's per-key leaves and embeddings; :meth:`save` writes the column files."""

    def __init__(self):
        self.keys: list[str] = []
        self.leaves: list[dict] = []
        self.embeddings: dict[str, list[np.ndarray]] = {}

    def add(self, key: str, obj: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.keys.append(key)
        self.leaves.append(flatten(obj))
        for name, arr in (arrays or {}).items():
            rows = self.embeddings.setdefault(name, [])
            if len(rows) != len(self.keys) - 1:
                raise ColumnError(f"embedding {name!r} missing for some keys before {key}")
            rows.append(pool_embedding(arr))

    def to_arrays(self) -> dict[str, np.ndarray]:
        n = len(self.keys)
        cols: dict[str, np.ndarray] = {KEY_COL: np.array(self.keys, dtype=KEY_DTYPE)}
        names = sorted({k for leaf in self.leaves for k in leaf})
        for name in names:
            vals = [leaf.get(name) for leaf in self.leaves]
            if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in vals):
                cols[f"f:{name}"] = np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
            else:
                cols[f"s:{name}"] = np.array([b"" if v is None else _label(v).encode("utf-8") for v in vals],
                                             dtype=np.bytes_)
        assert all(len(v) == n for v in cols.values())
        return cols

    def save(self, store, prefix: str, unit: str) -> None:
        for name, rows in sorted(self.embeddings.items()):
            if len(rows) != len(self.keys):
                raise ColumnError(f"embedding {name!r}: {len(rows)} rows for {len(self.keys)} keys")
            d = rows[0].shape[-1] if rows else 0
            mat = np.stack(rows).astype(np.float16) if rows else np.zeros((0, d), np.float16)
            store.write_bytes(embedding_rel(prefix, unit, name), npy_bytes(mat))
        store.write_bytes(columns_rel(prefix, unit), pack_arrays(self.to_arrays()))


def _label(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


# -- reading one shard -----------------------------------------------------------------------------
def read_columns(store, prefix: str, shard: str, raw: bool = False) -> dict[str, np.ndarray]:
    """One shard's column arrays (``__key__`` first). Without a column file, rebuilt from the shard."""
    unit = unit_of(shard)
    rel = columns_rel(prefix, unit)
    if store.exists(rel):
        return unpack_arrays(store.read_bytes(rel))
    return _rebuild(store, prefix, shard, raw).to_arrays()


def _rebuild(store, prefix: str, shard: str, raw: bool) -> ColumnBuilder:
    """Slow path for outputs written before column files: parse the record index / sidecar tar."""
    from .shards import iter_members, iter_samples

    b = ColumnBuilder()
    if raw:
        for s in iter_samples(store, f"{prefix}/{shard}", with_images=False):
            b.add(s.key, raw_leaves(s))
        return b
    for m in iter_members(store.uri(f"{prefix}/{shard}")):
        arrays = {k[:-4]: npy_load(v) for k, v in m.items() if k.endswith(".npy")}
        b.add(m["__key__"], json.loads(m["json"]) if "json" in m else {}, arrays)
    return b


def raw_leaves(sample) -> dict:
    """The columns ingest stores per raw sample: labels, source, image count, metadata and a content
    signature (images + conversation, without the key's salt) for exact-duplicate detection."""
    from .records import make_key

    return {"task": sample.task, "type": sample.type, "domain": sample.domain,
            "source": {"dataset": sample.source.dataset, "original_id": sample.source.original_id},
            "n_images": len(sample.images), "metadata": sample.metadata,
            "content": make_key([im.sha256 for im in sample.images], sample.conversations)}


def read_embedding(store, prefix: str, shard: str, name: str, scratch: str) -> np.ndarray | None:
    """One shard's pooled embedding matrix (memory-mapped when the store is local), or None."""
    rel = embedding_rel(prefix, unit_of(shard), name)
    if store.exists(rel):
        uri = store.uri(rel)
        if not uri.startswith("s3://"):
            return np.load(uri, mmap_mode="r", allow_pickle=False)
        path = os.path.join(scratch, f"dl-{unit_of(shard)}-{name}.npy")
        with open(path, "wb") as f:
            f.write(store.read_bytes(rel))
        return np.load(path, mmap_mode="r", allow_pickle=False)
    b = _rebuild(store, prefix, shard, raw=False)
    if name not in b.embeddings:
        return None
    return np.stack(b.embeddings[name]).astype(np.float16) if b.embeddings[name] else None


# -- the aligned table -----------------------------------------------------------------------------
@dataclass
class Table:
    """Every raw sample of a run, one row each, with the requested columns.

    Attributes:
        keys: S24 [n] sample keys in raw order.
        shard_offsets: [n_shards + 1] row offsets; rows of ``shards[i]`` are ``offsets[i]:offsets[i+1]``.
        shards: raw shard names, in order.
        values: field -> float64 [n] (NaN where missing) or UTF-8 bytes [n] (b"" where missing).
        quarantine: int32 [n] index into ``quarantine_reasons`` (0 = not quarantined upstream).
        quarantine_reasons: ``["", "score_clip: undecodable_image", ...]``.
        embeddings: field -> float16 [n, d] memmap (zero rows where missing); ``present[field]`` bool [n].
            A list's key (``a.img_emb+a.txt_emb``) holds the concatenation (:func:`concat_embeddings`).
    """

    keys: np.ndarray
    shard_offsets: np.ndarray
    shards: list[str]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    quarantine: np.ndarray | None = None
    quarantine_reasons: list[str] = field(default_factory=lambda: [""])
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    present: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.shard_offsets[-1])

    def shard_rows(self, i: int) -> slice:
        return slice(int(self.shard_offsets[i]), int(self.shard_offsets[i + 1]))

    def quarantined(self) -> np.ndarray:
        return self.quarantine > 0


def split_field(name: str, upstream: dict[str, str]) -> tuple[str, str]:
    """``score_clip.cosine`` -> (``score_clip``, ``cosine``); the stage id must be an earlier stage."""
    sid, _, rest = str(name).partition(".")
    if sid not in upstream or not rest:
        raise PermanentInputError(f"field {name!r}: want '<stage_id>.<field>' with a stage id among "
                                  f"{sorted(upstream)}")
    return sid, rest


def _align(raw_keys: np.ndarray, side_keys: np.ndarray, quarantined: set, where: str) -> np.ndarray:
    """Positions in the raw shard of the sidecar's keys; the sidecar is raw minus quarantined, in order."""
    if len(side_keys) == len(raw_keys) and np.array_equal(side_keys, raw_keys):
        return np.arange(len(raw_keys))
    keep = ~np.isin(raw_keys, np.array(sorted(quarantined), dtype=KEY_DTYPE)) if quarantined else \
        np.ones(len(raw_keys), bool)
    pos = np.flatnonzero(keep)
    if len(pos) != len(side_keys) or not np.array_equal(raw_keys[pos], side_keys):
        raise ColumnError(f"{where}: keys do not match the raw shard minus its quarantined keys")
    return pos


def hex_digest(col: np.ndarray) -> np.ndarray:
    """Hex strings (``records.make_key``) -> uint64 of their first 16 hex digits (b"" -> 0): 8 bytes a row
    instead of 24; a collision among 10M digests has odds of about 1 in 300,000."""
    out = np.zeros(len(col), np.uint64)
    ok = np.flatnonzero(np.char.str_len(col) >= 16) if len(col) else np.zeros(0, np.int64)
    if len(ok):
        blob = bytes.fromhex(b"".join(x[:16] for x in col[ok].tolist()).decode("ascii"))
        out[ok] = np.frombuffer(blob, dtype=">u8")
    return out


def read_keys(store, raw_prefix: str, shard: str) -> np.ndarray:
    """One raw shard's keys (S24), from its column file (or its record index)."""
    unit = unit_of(shard)
    rel = columns_rel(raw_prefix, unit)
    if store.exists(rel):
        return unpack_arrays(store.read_bytes(rel), [KEY_COL])[KEY_COL]
    return read_columns(store, raw_prefix, shard, raw=True)[KEY_COL]


def gather(ctx: StageContext, fields: Iterable[str] = (), embeddings: Iterable[str] = (),
           scratch: str | None = None, shards: list[str] | None = None,
           quarantine_from: Iterable[str] | None = None, with_keys: bool = True,
           digests: Iterable[str] = ()) -> Table:
    """Read ``fields`` (``<stage_id>.<path>``) and ``embeddings`` (``<stage_id>.<name>``) of every raw
    sample, shard by shard, aligned by key.

    Args:
        ctx: the reading stage's context (its ``upstream`` maps stage ids to prefixes).
        fields: scalar fields; ``ingest.<path>`` addresses the raw record's columns.
        embeddings: pooled embedding columns; gathered into a memmap under ``scratch``. A key joining
            names with ``+`` (:func:`embedding_key` of a list) is one column of the parts side by side,
            normalised as :func:`concat_embeddings` does, present where every part is; it is written
            part by part into one memmap and joined in place, chunk by chunk (no part's own copy).
        scratch: directory for embedding memmaps and S3 downloads, kept by the caller. By default a
            temporary directory is made only when embeddings are asked for, and its files are unlinked
            (and the directory removed) before returning: the memmaps stay readable until closed, since
            an unlinked file lives as long as a mapping of it, and nothing is left behind in /tmp.
        shards: raw shards to read (default: every complete raw shard).
        quarantine_from: stage ids whose quarantines mark rows (default: every upstream sidecar stage).
        with_keys: keep every key in memory (24 bytes a row); False leaves ``keys`` empty: a caller that
            writes per shard reads them again with :func:`read_keys` (10M keys are 240 MB).
        digests: label fields (hex hashes, e.g. ``ingest.content``) to keep as uint64 digests
            (:func:`hex_digest`), converted shard by shard.
    """
    embeddings = list(embeddings)
    if scratch is not None or not embeddings:
        return _gather(ctx, fields, embeddings, scratch, shards, quarantine_from, with_keys, digests)
    scratch = tempfile.mkdtemp(prefix="curate-columns-")
    try:
        return _gather(ctx, fields, embeddings, scratch, shards, quarantine_from, with_keys, digests)
    finally:
        for name in os.listdir(scratch):
            os.unlink(os.path.join(scratch, name))
        os.rmdir(scratch)


def _gather(ctx: StageContext, fields: Iterable[str], embeddings: Iterable[str], scratch: str | None,
            shards: list[str] | None, quarantine_from: Iterable[str] | None, with_keys: bool,
            digests: Iterable[str]) -> Table:
    digests = set(digests)
    fields, embeddings = list(dict.fromkeys(fields)), list(dict.fromkeys(embeddings))
    up = dict(ctx.upstream)
    raw_id = next((sid for sid, p in up.items() if p == ctx.raw_prefix), RAW_STAGE)
    up.setdefault(raw_id, ctx.raw_prefix)
    # ``ingest.<path>`` names the raw columns whichever stage wrote raw/ (ingest, or retrieve)
    up.setdefault(RAW_STAGE, ctx.raw_prefix)
    parsed = {f: split_field(f, up) for f in fields}
    parsed = {f: (raw_id if up[sid] == ctx.raw_prefix else sid, path) for f, (sid, path) in parsed.items()}
    part_names = list(dict.fromkeys(p for e in embeddings for p in embedding_parts(e)))
    parsed_emb = {e: split_field(e, up) for e in part_names}
    side = {sid: p for sid, p in up.items() if p.startswith("stages/")}
    qfrom = list(side) if quarantine_from is None else [s for s in quarantine_from if s in side]
    shards = raw_shards(ctx.store, ctx.raw_prefix, ctx.upstream) if shards is None else shards
    generators = generator_ids(up, shards)

    keys_parts: list[np.ndarray] = []
    offsets = [0]
    value_parts: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    q_parts: list[np.ndarray] = []
    reasons: dict[str, int] = {"": 0}
    emb_parts: dict[str, list[tuple[int, np.ndarray | None, np.ndarray]]] = {e: [] for e in part_names}
    for shard in shards:
        unit = unit_of(shard)
        raw_cols = read_columns(ctx.store, ctx.raw_prefix, shard, raw=True)
        rk = raw_cols[KEY_COL]
        n = len(rk)
        qcode = np.zeros(n, np.int32)
        stage_cols: dict[str, dict[str, np.ndarray]] = {raw_id: raw_cols}
        positions: dict[str, np.ndarray] = {raw_id: np.arange(n)}
        needed = {sid for sid, _ in parsed.values()} | {sid for sid, _ in parsed_emb.values()} | set(qfrom)
        for sid in sorted(needed - {raw_id}):
            prefix = up[sid]
            if not prefix.startswith("stages/"):
                raise PermanentInputError(f"stage {sid!r} writes no per-sample columns ({prefix})")
            if not ctx.store.exists(f"{prefix}/_done/{unit}"):
                if not processed_by(up, sid, shard, generators):
                    # a generated shard this stage never sees (it runs before the generator): no values
                    stage_cols[sid], positions[sid] = {}, np.zeros(0, np.int64)
                    continue
                raise PermanentInputError(f"stage {sid!r} has not completed {unit} ({prefix})")
            q = {r["key"]: r["reason"] for r in read_quarantine(ctx.store, prefix, unit)}
            if sid in qfrom and q:
                hit = np.isin(rk, np.array(sorted(q), dtype=KEY_DTYPE)) & (qcode == 0)
                for i in np.flatnonzero(hit):
                    r = f"{sid}: {q[rk[i].decode()]}"
                    qcode[i] = reasons.setdefault(r, len(reasons))
            if any(s == sid for s, _ in parsed.values()) or any(s == sid for s, _ in parsed_emb.values()):
                cols = read_columns(ctx.store, prefix, shard)
                positions[sid] = _align(rk, cols[KEY_COL], set(q), f"{prefix}/{unit}")
                stage_cols[sid] = cols
        for f, (sid, path) in parsed.items():
            cols, pos = stage_cols[sid], positions[sid]
            if f"f:{path}" in cols:
                v = np.full(n, np.nan)
                v[pos] = cols[f"f:{path}"]
            elif f"s:{path}" in cols:
                v = np.full(n, b"", dtype=cols[f"s:{path}"].dtype)
                v[pos] = cols[f"s:{path}"]
            else:
                v = np.full(n, np.nan)
            if f in digests:
                v = hex_digest(v) if v.dtype.kind == "S" else np.zeros(n, np.uint64)
            value_parts[f].append(v)
        for e, (sid, name) in parsed_emb.items():
            mat = read_embedding(ctx.store, up[sid], shard, name, scratch) if stage_cols.get(sid) != {} else None
            emb_parts[e].append((n, mat, positions[sid]))
        if with_keys:
            keys_parts.append(rk.astype(KEY_DTYPE))
        q_parts.append(qcode)
        offsets.append(offsets[-1] + n)

    keys_parts = _concat_free(keys_parts, KEY_DTYPE)
    t = Table(keys=keys_parts,
              shard_offsets=np.array(offsets, np.int64), shards=list(shards),
              quarantine=_concat_free(q_parts, np.int32),
              quarantine_reasons=list(reasons))
    for f, parts in value_parts.items():
        kinds = {p.dtype.kind for p in parts}
        if "S" in kinds:  # a label column: a shard where it was absent (all NaN) becomes b""
            parts = [p if p.dtype.kind == "S" else np.full(len(p), b"", dtype="S1") for p in parts]
        t.values[f] = _concat_free(parts, np.float64)
    value_parts.clear()
    dims = {}
    for e, parts in emb_parts.items():
        ds = {m.shape[1] for _, m, _ in parts if m is not None and len(m)}
        if len(ds) > 1:
            raise ColumnError(f"embedding {e}: dimensions differ across shards {sorted(ds)}")
        dims[e] = ds.pop() if ds else 0
    for p, parts in emb_parts.items():
        rows = sum(len(pos) for _, _, pos in parts)
        if dims[p] == 0 and rows:  # the stage has rows, none holds it: a typo must not drop every sample
            raise PermanentInputError(
                f"embedding {p!r}: stage {p.split('.', 1)[0]!r} has {rows} rows and none stores {p.split('.', 1)[1]!r} "
                "(a wrong name, or a stage that stores no embeddings: save_embeddings false?)")
    for e in embeddings:
        names = embedding_parts(e)
        unstored = [p for p in names if dims[p] == 0]
        if len(names) > 1 and unstored and len(unstored) < len(names):
            raise PermanentInputError(
                f"embedding list {names}: no shard stores a row of {unstored} while the others have rows "
                "(a wrong name, or a stage that stores no embeddings: save_embeddings false?)")
        widths = [dims[p] for p in names]
        path = os.path.join(scratch, f"{e.replace('/', '_')}.npy")
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(t), sum(widths)))
        present, anywhere, off = np.ones(len(t), bool), np.zeros(len(t), bool), 0
        for p, d in zip(names, widths):
            got = _fill_embedding(mm, off, d, emb_parts[p], p)
            present &= got
            anywhere |= got
            off += d
        if len(names) > 1:
            # a row needs every part (else it is missing, a zero row); then the parts are normalised and
            # joined in place, chunk by chunk
            mm[np.flatnonzero(anywhere & ~present)] = 0
            offs = np.cumsum([0] + widths)
            concat_embeddings([mm[:, offs[i]:offs[i + 1]] for i in range(len(names))], out=mm)
        mm.flush()
        t.embeddings[e], t.present[e] = mm, present
    return t


def _fill_embedding(mm: np.ndarray, off: int, d: int, parts: list, name: str) -> np.ndarray:
    """Write one embedding's shard matrices into columns ``off:off + d`` of ``mm``; rows present."""
    present = np.zeros(len(mm), bool)
    start = 0
    for n, mat, pos in parts:
        if mat is not None and len(mat):
            if len(mat) != len(pos):
                raise ColumnError(f"embedding {name}: {len(mat)} rows for {len(pos)} keys")
            mm[start + pos, off:off + d] = mat
            present[start + pos] = True
        start += n
    return present


def _concat_free(parts: list, dtype) -> np.ndarray:
    """Concatenate and empty ``parts`` (so a column is never held twice longer than needed)."""
    out = np.concatenate(parts) if parts else np.zeros(0, dtype)
    parts.clear()
    return out
