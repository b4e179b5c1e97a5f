"""The stage contract (DESIGN.md): markers, stats, quarantine, accounting, config hashes, exit codes.

A stage reads the run's raw shards (and, for decisions, other stages' sidecars) and writes under its own
output prefix ``stages/<stage>/<cfg>/``::

    shard-000000.tar                 sidecar: same keys, same order as raw, minus quarantined keys
    _stats/shard-000000.json         {"in", "out", "quarantined", "dropped", "seconds", ...}
    _quarantine/shard-000000.jsonl   one line per rejected sample: {"key", "reason", "detail"}
    _done/shard-000000               written last; its presence means the shard is complete

:class:`ShardOutput` enforces the order and the invariant ``in = out + quarantined + dropped`` before the
marker is written. ``dropped`` is only for deliberate decisions (a selection's reject, with its reason);
scoring stages never drop.

Exit codes for job entrypoints: 0 success, 3 permanent input error (:class:`PermanentInputError`; the
workflow does not retry it), anything else retryable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import numpy as np

from .shards import ShardWriter, npy_bytes, npy_load, shard_stem
from .storage import Store

EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_PERMANENT = 3
CONTRACT_VERSION = "1"
FIT_UNIT = "_fit"    # a fit stage's global unit: <prefix>/_fit/ and the done marker _done/_fit


class PermanentInputError(Exception):
    """Bad input that a retry cannot fix (a malformed recipe, a missing annotations file)."""


class AccountingError(RuntimeError):
    """in != out + quarantined + dropped: a sample would be lost; the done marker is not written."""


def config_hash(name: str, config: dict, upstream: str | None) -> str:
    """Short hash of a stage's config chained with its upstream stage's hash."""
    blob = json.dumps({"stage": name, "config": config, "upstream": upstream, "contract": CONTRACT_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def done_rel(prefix: str, unit: str) -> str:
    return f"{prefix}/_done/{unit}"


def stats_rel(prefix: str, unit: str) -> str:
    return f"{prefix}/_stats/{unit}.json"


def quarantine_rel(prefix: str, unit: str) -> str:
    return f"{prefix}/_quarantine/{unit}.jsonl"


def is_done(store: Store, prefix: str, unit: str) -> bool:
    return store.exists(done_rel(prefix, unit))


class ShardOutput:
    """Everything one stage writes for one shard (or one global unit), in the contract's order.

    Args:
        store: the run's store.
        prefix: the stage's output prefix, e.g. ``stages/score_clip/3fa2c1d0e9``.
        unit: ``shard-000000`` (or ``all`` for a global stage).
        sidecar: open a sidecar tar writer at ``{prefix}/{unit}.tar``.
    """

    def __init__(self, store: Store, prefix: str, unit: str, sidecar: bool = True):
        self.store, self.prefix, self.unit = store, prefix, unit
        self.n_in = 0
        self.n_out = 0
        self.dropped = 0
        self.quarantine_lines: list[dict] = []
        self.extra: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self.writer = ShardWriter(store, f"{prefix}/{unit}.tar") if sidecar else None
        # Every per-sample output also lands in a column file (libcurate.columns) so that global
        # decisions read numpy arrays instead of parsing one JSON record per sample.
        from .columns import ColumnBuilder
        self.columns = ColumnBuilder() if sidecar else None

    # -- per-sample accounting ------------------------------------------------------------------
    def write(self, key: str, members: dict[str, bytes]) -> None:
        assert self.writer is not None
        self.writer.write(key, members)
        self.n_out += 1

    def write_json(self, key: str, obj: dict, arrays: dict[str, np.ndarray | bytes] | None = None) -> None:
        """Write ``{key}.json`` (``obj``) and ``arrays`` (``{"img_emb.npy": ...}``) to the sidecar and record
        both for the column file. An array given as an ndarray is serialised once (:func:`npy_bytes`) and
        the same array goes to the columns; given as ``.npy`` bytes, it is decoded again for them."""
        members = {"json": json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()}
        cols = {}
        for name, v in (arrays or {}).items():
            if isinstance(v, np.ndarray):
                if not name.endswith(".npy"):
                    raise ValueError(f"array member {name!r} of {key} must be named *.npy")
                v = np.ascontiguousarray(v)  # what npy_bytes stores (and what decoding its bytes gave)
                members[name] = npy_bytes(v)
                cols[name[:-len(".npy")]] = v
            else:
                members[name] = v
                if name.endswith(".npy"):
                    cols[name[:-len(".npy")]] = npy_load(v)
        self.write(key, members)
        self.add_columns(key, obj, cols)

    def add_columns(self, key: str, obj: dict, arrays: dict | None = None) -> None:
        """Record a sample's fields (and embeddings) for the shard's column file."""
        if self.columns is not None:
            self.columns.add(key, obj, arrays)

    def count_out(self, n: int = 1) -> None:
        """Count samples written somewhere other than the sidecar (e.g. a raw shard written by ingest)."""
        self.n_out += n

    def quarantine(self, key: str, reason: str, detail: str = "") -> None:
        self.quarantine_lines.append({"key": key, "reason": reason, "detail": str(detail)[:2000]})

    def drop(self, n: int = 1) -> None:
        self.dropped += n

    @property
    def n_quarantined(self) -> int:
        return len(self.quarantine_lines)

    # -- completion --------------------------------------------------------------------------
    def finish(self, n_in: int | None = None) -> dict:
        """Close the sidecar, check accounting, write quarantine, stats, then the done marker (last)."""
        if n_in is not None:
            self.n_in = n_in
        if self.writer is not None:
            self.writer.close()
        if self.columns is not None:
            self.columns.save(self.store, self.prefix, self.unit)
        if self.n_in != self.n_out + self.n_quarantined + self.dropped:
            raise AccountingError(
                f"{self.prefix}/{self.unit}: in={self.n_in} but out={self.n_out} + quarantined="
                f"{self.n_quarantined} + dropped={self.dropped}")
        body = "".join(json.dumps(q, ensure_ascii=False, sort_keys=True) + "\n" for q in self.quarantine_lines)
        self.store.write_text(quarantine_rel(self.prefix, self.unit), body)
        stats = {"in": self.n_in, "out": self.n_out, "quarantined": self.n_quarantined, "dropped": self.dropped,
                 "seconds": round(time.monotonic() - self._t0, 3), **self.extra}
        self.store.write_text(stats_rel(self.prefix, self.unit), json.dumps(stats, sort_keys=True, indent=1))
        self.store.write_text(done_rel(self.prefix, self.unit), "")
        return stats

    def abort(self, exc: BaseException) -> None:
        if self.writer is not None:
            self.writer.abort(exc)


def read_quarantine(store: Store, prefix: str, unit: str) -> list[dict]:
    rel = quarantine_rel(prefix, unit)
    if not store.exists(rel):
        return []
    return [json.loads(line) for line in store.read_text(rel).splitlines() if line.strip()]


GEN_SHARD_PREFIX = "gen-"  # raw/gen-<stage id>-<cfg>-shard-NNNNNN.tar: samples a generation stage wrote


def gen_unit(stage_prefix: str, source_unit: str) -> str:
    """The raw unit holding what the generation stage at ``stages/<id>/<cfg>`` generated from the source
    shard ``source_unit``: ``gen-<id>-<cfg>-<source_unit>``."""
    _, sid, cfg = stage_prefix.strip("/").split("/")[-3:]
    return f"{GEN_SHARD_PREFIX}{sid}-{cfg}-{source_unit}"


def is_generated_shard(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(GEN_SHARD_PREFIX)


def _gen_tag(sid: str, prefix: str) -> str | None:
    """``gen-<id>-<cfg>-``: how the raw shards of the generation stage ``sid`` at ``prefix`` begin."""
    if prefix.startswith("stages/") and prefix.count("/") == 2:
        return f"{GEN_SHARD_PREFIX}{sid}-{prefix.rsplit('/', 1)[-1]}-"
    return None


def generator_ids(upstream: dict[str, str], shards: list[str]) -> set[str]:
    """The ids in ``upstream`` that wrote some of ``shards`` (the generation stages)."""
    tags = {sid: t for sid, p in upstream.items() if (t := _gen_tag(sid, p))}
    return {sid for sid, t in tags.items() if any(s.startswith(t) for s in shards)}


def processed_by(upstream: dict[str, str], sid: str, shard: str, generators: set[str]) -> bool:
    """Whether stage ``sid`` of ``upstream`` (in recipe order) has an output for the raw ``shard``: every
    stage processes the ingested shards; a generated shard only the stages after its generator that are
    not generators themselves (generators read source shards only)."""
    if not is_generated_shard(shard):
        return True
    if sid in generators:
        return False
    order = list(upstream)
    born = next((i for i, (g, p) in enumerate(upstream.items()) if (t := _gen_tag(g, p)) and shard.startswith(t)),
                None)
    return born is not None and sid in upstream and order.index(sid) > born


def raw_shards(store: Store, raw_prefix: str = "raw", upstream: dict[str, str] | None = None) -> list[str]:
    """Complete raw shards (those with a done marker), sorted.

    With ``upstream`` (a stage's id -> prefix of every earlier stage), generated shards are visible only
    when the generation stage that wrote them is earlier in the recipe *with its current config*: a stage
    before the generator does not see them, and a generator whose config changed (a new ``<cfg>``) leaves
    its old set unseen. Without ``upstream`` (audit, tools): every complete raw shard."""
    # ingested (or retrieved) shards first, then generated ones: exports list sources before generations
    names = sorted((f"{name}.tar" for name in store.list(f"{raw_prefix}/_done")),
                   key=lambda n: (is_generated_shard(n), n))
    if upstream is None:
        return names
    visible = tuple(t for sid, p in upstream.items() if (t := _gen_tag(sid, p)))
    return [n for n in names if not is_generated_shard(n) or n.startswith(visible)]


def unit_of(shard: str) -> str:
    return shard_stem(shard)


# -- stage configs ---------------------------------------------------------------------------
class StageConfig:
    """Mixin for stage config dataclasses: strict ``from_dict`` (unknown keys are an error)."""

    @classmethod
    def from_dict(cls, d: dict | None):
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PermanentInputError(f"{cls.__name__}: unknown setting(s) {unknown}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        for k, v in list(d.items()):
            if isinstance(v, list) and "tuple" in str(hints.get(k, "")):
                d[k] = tuple(v)
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise PermanentInputError(f"{cls.__name__}: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash_dict(self) -> dict:
        """The settings that define the output: ``to_dict()`` without the fields a dataclass lists in
        its ``UNHASHED`` class attribute (concurrency, rate limits, loader threads: how fast, not what),
        so tuning them does not re-run the stage under a new prefix."""
        return _hashable(self)


def _hashable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        skip = set(getattr(obj, "UNHASHED", ()))
        return {f.name: _hashable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}
    if isinstance(obj, dict):
        return {k: _hashable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_hashable(v) for v in obj]
    return obj


@dataclass
class StageContext:
    """What the runner hands a stage.

    Attributes:
        store: the run's store (local directory or S3 prefix).
        prefix: this stage's output prefix (``stages/<name>/<cfg>``, ``select/<cfg>``, ...).
        raw_prefix: where the raw shards are (``raw``).
        upstream: name -> output prefix of every earlier stage in the recipe (for joins).
        workers: processes/threads the stage may use for decoding.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        out_store: write outputs here instead of ``store`` (``curate export --out``).
    """

    store: Store
    prefix: str
    raw_prefix: str = "raw"
    upstream: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    device: str = "cpu"
    progress: bool = False
    out_store: Store | None = None
    storage_options: dict = field(default_factory=dict)

    def raw_shards(self) -> list[str]:
        """The complete raw shards this stage sees: ingested ones and those earlier generation stages
        wrote (:func:`raw_shards` with ``upstream``)."""
        return raw_shards(self.store, self.raw_prefix, self.upstream)

    @property
    def output(self) -> Store:
        """Where the stage writes: the run's store unless a separate output store was given."""
        return self.out_store or self.store


@dataclass(frozen=True)
class Reads:
    """What a stage reads besides the raw shards: declared, so that the DAG and the docs derive from it.

    Attributes:
        stages: ids of earlier stages whose outputs it reads (fields, embeddings, sidecars, decisions).
        fields: ``<stage_id>.<path>`` scalar fields it reads as columns.
        embeddings: ``<stage_id>.<name>`` embedding columns it reads.
    """

    stages: frozenset = frozenset()
    fields: tuple = ()
    embeddings: tuple = ()

    @classmethod
    def of(cls, fields=(), embeddings=(), stages=()) -> "Reads":
        fields, embeddings = tuple(dict.fromkeys(fields)), tuple(dict.fromkeys(embeddings))
        ids = {str(f).partition(".")[0] for f in fields + embeddings} | set(stages)
        return cls(frozenset(ids), fields, embeddings)


class Stage:
    """Base of every stage. A subclass sets ``name``, ``Config`` and its declarations, and implements one of:

    * ``process_shard(ctx, shard)`` for ``kind = "shard"`` (the runner parallelises over shards), or
      ``process_shards(ctx, shards)`` with ``spans_shards = True`` (GPU models batch across shards);
    * ``run_global(ctx)`` for ``kind = "global"`` stages that decide once over every shard (select, export);
    * ``fit(ctx) -> dict`` and ``write_shard(ctx, shard, fitted)`` for ``kind = "fit"``: fit once on
      columns gathered from every shard (a duplicate graph, cluster centroids), then write an ordinary
      per-shard sidecar that later stages read as plain fields.

    Declarations (class attributes; the Argo templates and ``docs/CONTRIBUTING.md`` derive from them):
    ``profile`` (the resource profile in ``workflows/tables.PROFILES``), ``image`` (the image family),
    ``llm`` (calls an LLM endpoint: gets the LLM Secret), ``produces_raw`` (writes ``raw/``: ingest),
    ``generates_raw`` (adds ``raw/gen-<id>-<cfg>-*`` shards mid-recipe: the generation stages),
    ``fans_out`` (False: on Argo the stage runs as one pod of its own image, not a list step plus a
    fan-out: retrieve, whose shards exist only after a search that needs its image) and :meth:`reads`
    (what it reads from earlier stages).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    kind: ClassVar[str] = "shard"      # "shard" | "global" | "fit"
    profile: ClassVar[str] = "cpu"     # a workflows.tables.PROFILES key
    image: ClassVar[str] = "cpu"       # "cpu" | "gpu" image family
    llm: ClassVar[bool] = False
    produces_raw: ClassVar[bool] = False
    generates_raw: ClassVar[bool] = False
    fans_out: ClassVar[bool] = True
    spans_shards: ClassVar[bool] = False
    output_root: ClassVar[str] = "stages"

    def __init__(self, config):
        self.config = config

    # -- declarations -------------------------------------------------------------------------
    @classmethod
    def create(cls, config, storage_options: dict | None = None) -> "Stage":
        """Build the stage for a run (``storage_options``: the recipe's S3 options)."""
        return cls(config)

    @classmethod
    def prepare_settings(cls, settings: dict, resolve) -> dict:
        """Recipe settings before validation; ``resolve(path)`` makes a path relative to the recipe."""
        return settings

    @classmethod
    def reads(cls, config) -> Reads:
        """What this stage reads from earlier stages (default: only the raw shards)."""
        return Reads()

    @classmethod
    def image_for(cls, config) -> str:
        """The image family this configuration needs (a setting may pull torch into a slim stage; a stage
        placed on the GPU profile runs in the GPU image)."""
        return "gpu" if getattr(config, "profile", None) == "gpu" else cls.image

    # -- hooks of the runner (defaults: units are the complete raw shards) ---------------------
    def units(self, ctx: "StageContext") -> list[str]:
        """The shards this stage writes, in order."""
        return ctx.raw_shards()

    def prepare(self, ctx: "StageContext", fanout_batch: bool = False) -> None:
        """Called once before processing (``fanout_batch``: one batch of an Argo fan-out)."""

    def plan_units(self, ctx: "StageContext", todo: list[str]) -> None:
        """Called by the fan-out's list step with the shards its pods will process."""

    def before_fork(self, ctx: "StageContext", todo: list[str]) -> None:
        """Called in the parent before a process pool forks (load what every worker shares)."""

    # -- work ---------------------------------------------------------------------------------
    def process_shard(self, ctx: StageContext, shard: str) -> dict:
        if self.spans_shards:
            return self.process_shards(ctx, [shard])[0]
        raise NotImplementedError

    def process_shards(self, ctx: StageContext, shards: Iterable[str]) -> list[dict]:
        return [self.process_shard(ctx, s) for s in shards]

    def run_global(self, ctx: StageContext) -> dict:
        raise NotImplementedError

    def fit(self, ctx: StageContext) -> dict:
        """``kind = "fit"``: decide once over every shard; return what :meth:`write_shard` needs."""
        raise NotImplementedError

    def write_shard(self, ctx: StageContext, shard: str, fitted: dict) -> dict:
        raise NotImplementedError
