"""The ``train`` stage: run a trainer (:mod:`libcurate.train.contract`) once per unit of samples and
write each unit's label, and the trainer's per-sample outputs, as ordinary per-sample fields.

A recipe entry::

    - stage: train
      as: subset_train                    # the stage id: later stages read subset_train.label
      with:
        unit_by: cluster.cluster          # one unit per value of this field; or `all` (one unit)
        features: [score_clip.cosine, score_reward.reward]   # optional: features.npy, in THIS order
        formats: [llava]                  # what the trainer reads: llava, cc_sbu_align, webdataset
        eval: ../demo-run/source/eval.json   # fixed held-out evaluation set (LLaVA JSON), or null
        label: eval_loss                  # the result.json key that is the unit's label
        higher_is_better: false           # for `quality` (= -label here): higher is better everywhere
        outputs: []                       # per-sample outputs the trainer must give (e.g. [difficulty])
        trainer:
          command: [python, -m, libcurate.train.reference_vlm]
          args: [--data, "{data}", --workdir, "{workdir}", --eval, "{eval}"]
          gpus: 1
          timeout_s: 3600

It is a ``fit`` stage: the fit prepares and trains every unit whose signature has no done marker (a
unit already trained is read back, never trained again), then per-shard sidecars carry, per sample,
``unit``, ``label``, ``quality`` and each output (see the contract's docstring). Locally the trainer
runs as a subprocess, one unit after another. On Argo (:mod:`workflows.dag`) ``<id>-units`` lists the
undone units and ``<id>-train`` fans out one pod per unit (``python -m jobs.train_unit --unit U``) on
the stage's GPU profile; the ``<id>-fit`` pod then only collects (``CURATE_TRAIN_COLLECT_ONLY=1``).

Scalar features are min-max mapped to [-1, 1] over every sample that enters a unit (Self-Filter's
normalisation, one mapping for the whole run); embeddings are used as stored (unit-norm). Samples are
left out of every unit, with a reason in their sidecar (``excluded``), when an upstream stage
quarantined them, when they have no ``unit_by`` value, or when a feature is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

from ..columns import embedding_rel, gather
from ..formats.export import write_cc_sbu_align, write_llava
from ..select.fitstage import table_layout, write_rows
from ..shards import ShardWriter, iter_samples, shard_name
from ..stage import PermanentInputError, Reads, Stage, StageConfig, StageContext, raw_shards, unit_of
from ..storage import LocalStore, open_store, options_for_url, read_url
from . import contract as C

FORMATS = ("llava", "cc_sbu_align", "webdataset")
COLLECT_ONLY_ENV = "CURATE_TRAIN_COLLECT_ONLY"
UNITS_DIR = "_units"


@dataclass
class TrainConfig(StageConfig):
    """Settings of ``train``.

    Attributes:
        trainer: the command and its resources (:class:`~libcurate.train.contract.TrainerSpec`).
        unit_by: ``all`` (one unit of every sample) or ``<stage_id>.<field>`` (one unit per value).
        features: fields and embeddings written to ``features.npy``, in this one named order.
        formats: dataset layouts exported into each unit's ``data/``.
        eval: the held-out evaluation set (LLaVA JSON, images relative to it), passed as ``{eval}``.
        label: the ``result.json`` key that is the unit's label.
        higher_is_better: whether a larger label is better (``quality`` = label, else -label).
        outputs: per-sample fields the trainer must write to ``outputs.jsonl`` (e.g. ``[difficulty]``).
        min_unit_size: smaller units are not trained (their samples: ``excluded: unit_too_small``).
        profile: the unit pods' resource profile on Argo (``gpu``).
    """

    trainer: object = None
    unit_by: str = "all"
    features: tuple = ()
    formats: tuple = ("llava",)
    eval: str | None = None
    label: str = "eval_loss"
    higher_is_better: bool = False
    outputs: tuple = ()
    min_unit_size: int = 1
    profile: str = "gpu"

    UNHASHED = ("profile",)

    def __post_init__(self):
        if isinstance(self.trainer, dict):
            self.trainer = C.TrainerSpec.from_dict(self.trainer)
        if not isinstance(self.trainer, C.TrainerSpec):
            raise ValueError("train.trainer: want a mapping with at least 'command'")
        if self.unit_by != "all" and (not isinstance(self.unit_by, str) or "." not in self.unit_by):
            raise ValueError(f"train.unit_by: want 'all' or '<stage_id>.<field>', got {self.unit_by!r}")
        self.features, self.formats, self.outputs = tuple(self.features), tuple(self.formats), tuple(self.outputs)
        for f in self.features:
            if not isinstance(f, str) or "." not in f:
                raise ValueError(f"train.features: {f!r}: want '<stage_id>.<field or embedding>'")
        if len(set(self.features)) != len(self.features):
            raise ValueError("train.features: a feature is listed twice")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"train.formats {bad or '[]'}: want some of {list(FORMATS)}")
        reserved = {"unit", "label", "quality", "excluded", "key"}
        if any(not isinstance(o, str) or o in reserved for o in self.outputs):
            raise ValueError(f"train.outputs: names must be strings other than {sorted(reserved)}")
        if not isinstance(self.label, str) or not self.label:
            raise ValueError("train.label: want the result.json key of the unit's label")
        if self.min_unit_size < 1:
            raise ValueError("train.min_unit_size must be >= 1")


C.TrainerSpec.UNHASHED = ("memory", "cpu", "timeout_s")   # how it runs, not what it computes


@dataclass
class UnitPlan:
    """Every raw sample and the unit it belongs to.

    Attributes:
        layout: ``table_layout`` of the gathered table (keys, shards, offsets) for the sidecar writes.
        unit_of_row: int64 [n]: index into ``units`` (-1: in no unit).
        units: unit ids in order.
        rows: unit id -> row indices (raw order).
        excluded_code: int32 [n]: 0 for rows in a unit, else an index into ``reasons``.
        reasons: ``["", "quarantined: ...", "no_unit: cluster.cluster", "missing_feature: ...", ...]``.
        features: float32 [n, d] memmap (rows in no unit are zeros) and its names / dims.
        signatures: unit id -> signature.
        scratch: directory of the memory maps.
    """

    layout: dict
    unit_of_row: np.ndarray
    units: list[str]
    rows: dict[str, np.ndarray]
    excluded_code: np.ndarray
    reasons: list[str]
    features: np.ndarray | None = None
    names: list[str] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)
    signatures: dict[str, str] = field(default_factory=dict)
    scratch: str | None = None

    def close(self) -> None:
        """Drop the memory-mapped columns and their scratch directory."""
        self.features = None
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


def minmax_pm1(v: np.ndarray) -> np.ndarray:
    """Map to [-1, 1] by the column's min and max (a constant column maps to 0)."""
    lo, hi = float(np.min(v)), float(np.max(v))
    if hi <= lo:
        return np.zeros_like(v, dtype=np.float32)
    return (2.0 * (v - lo) / (hi - lo) - 1.0).astype(np.float32)


def unit_label(v) -> str:
    """A column value as a unit id: 3.0 -> ``"3"``, b"a" -> ``"a"``."""
    if isinstance(v, (bytes, np.bytes_)):
        return v.decode("utf-8")
    f = float(v)
    return str(int(f)) if f.is_integer() else repr(f)


class TrainStage(Stage):
    name = "train"
    Config = TrainConfig
    kind = "fit"
    profile = "gpu"
    # The list, collect and per-shard write pods need no torch: the slim image. The unit pods run the
    # trainer's image (trainer.image, default curate's GPU image): workflows/dag.py.
    image = "cpu"
    unit_fanout = True     # workflows.dag: <id>-units -> <id>-train (one pod per unit) -> <id>-fit

    @classmethod
    def reads(cls, config: TrainConfig) -> Reads:
        fields = ([] if config.unit_by == "all" else [config.unit_by]) + list(config.features)
        return Reads.of(fields=fields)

    @classmethod
    def prepare_settings(cls, settings: dict, resolve) -> dict:
        if settings.get("eval"):
            settings = {**settings, "eval": resolve(str(settings["eval"]))}
        return settings

    # -- units ---------------------------------------------------------------------------------
    def _split_features(self, ctx: StageContext) -> tuple[list[str], list[str]]:
        """Which features are embeddings (an ``.npy`` column exists) and which scalar fields."""
        shards = raw_shards(ctx.store, ctx.raw_prefix)
        fields, embs = [], []
        for f in self.config.features:
            sid, _, name = f.partition(".")
            prefix = ctx.upstream.get(sid)
            if prefix is None:
                raise PermanentInputError(f"train.features: {f!r}: {sid!r} is not an earlier stage")
            is_emb = bool(shards) and prefix.startswith("stages/") and any(
                ctx.store.exists(embedding_rel(prefix, unit_of(s), name)) for s in shards[:1])
            (embs if is_emb else fields).append(f)
        return fields, embs

    def unit_plan(self, ctx: StageContext) -> UnitPlan:
        """Which unit every raw sample belongs to, its features and every unit's signature; decided on
        columns (no Python object per sample). Embedding features stay memory-mapped in ``plan.scratch``
        (remove it with :meth:`UnitPlan.close`)."""
        c = self.config
        fields, embs = self._split_features(ctx)
        unit_field = [] if c.unit_by == "all" else [c.unit_by]
        scratch = tempfile.mkdtemp(prefix="curate-train-")
        t = gather(ctx, fields=unit_field + fields, embeddings=embs, scratch=scratch)
        n = len(t)
        # Per row: 0 = in a unit, else 1 + index into `reasons` (the first reason that applies wins).
        code = np.zeros(n, np.int32)
        reasons: list[str] = []

        def exclude(mask: np.ndarray, reason: str) -> None:
            hit = mask & (code == 0)
            if hit.any():
                reasons.append(reason)
                code[hit] = len(reasons)

        q = t.quarantine
        for j in np.unique(q[q > 0]):
            exclude(q == j, f"quarantined: {t.quarantine_reasons[int(j)]}")
        if c.unit_by == "all":
            inverse, values = np.zeros(n, np.int64), np.array(["all"], dtype=object)
        else:
            col = t.values[c.unit_by]
            exclude((col == b"") if col.dtype.kind == "S" else np.isnan(col), f"no_unit: {c.unit_by}")
            present = code == 0
            uniq, inv = np.unique(col[present], return_inverse=True)   # numbers sort numerically
            inverse = np.full(n, -1, np.int64)
            inverse[present] = inv
            values = np.array([unit_label(v) for v in uniq], dtype=object)
        for f in c.features:
            if f in t.values and t.values[f].dtype.kind != "f":
                raise PermanentInputError(f"train.features: {f!r} holds labels, not numbers")
            exclude(np.isnan(t.values[f]) if f in t.values else ~t.present[f], f"missing_feature: {f}")
        sizes = np.bincount(inverse[code == 0], minlength=len(values))
        for j in np.flatnonzero((sizes > 0) & (sizes < c.min_unit_size)):
            exclude(inverse == j, f"unit_too_small: {values[j]} has {sizes[j]} < {c.min_unit_size}")
        ok = code == 0
        kept = np.flatnonzero(np.bincount(inverse[ok], minlength=len(values)) > 0)
        units = [str(values[j]) for j in kept]
        remap = np.full(len(values), -1, np.int64)
        remap[kept] = np.arange(len(kept))
        unit_of_row = np.where(ok, remap[np.maximum(inverse, 0)], -1)
        order = np.argsort(unit_of_row, kind="stable")
        bounds = np.searchsorted(unit_of_row[order], np.arange(len(units) + 1))
        rows = {u: np.sort(order[bounds[j]:bounds[j + 1]]) for j, u in enumerate(units)}
        plan = UnitPlan(table_layout(t), unit_of_row, units, rows, code, [""] + reasons, scratch=scratch)
        if c.features:
            dims = [t.embeddings[f].shape[1] if f in t.embeddings else 1 for f in c.features]
            feats = np.lib.format.open_memmap(os.path.join(scratch, "features.npy"), mode="w+", dtype=np.float32,
                                              shape=(n, sum(dims)))
            col0 = 0
            for f, d in zip(c.features, dims):
                if f in t.embeddings:
                    for lo in range(0, n, 65536):           # fp16 memmap -> fp32 in blocks
                        feats[lo:lo + 65536, col0:col0 + d] = t.embeddings[f][lo:lo + 65536]
                elif ok.any():
                    feats[ok, col0] = minmax_pm1(t.values[f][ok])
                col0 += d
            feats[~ok] = 0.0
            plan.features, plan.names, plan.dims = feats, list(c.features), dims
        upstream = {sid: ctx.upstream[sid] for sid in sorted(self.reads(c).stages) if sid in ctx.upstream}
        upstream["__raw__"] = ctx.raw_prefix
        trainer = {"stage": c.hash_dict(), "eval_sha256": self._eval_digest()}
        keys = plan.layout["keys"]
        for u, r in rows.items():
            extra = {}
            if plan.features is not None:
                # Scalars are normalised over the whole run: a unit's features change when others do.
                extra["features_sha256"] = hashlib.sha256(np.ascontiguousarray(plan.features[r]).tobytes()).hexdigest()
            plan.signatures[u] = C.unit_signature(u, [k.decode() for k in keys[r]], upstream, trainer, extra)
        return plan

    def _eval_digest(self) -> str | None:
        if not self.config.eval:
            return None
        try:
            return hashlib.sha256(read_url(self.config.eval)).hexdigest()
        except Exception as e:  # noqa: BLE001 - any unreadable eval set is the recipe's error
            raise PermanentInputError(f"train.eval {self.config.eval!r} cannot be read: {e}") from e

    def unit_rel(self, ctx: StageContext, unit: str) -> str:
        return f"{ctx.prefix}/{UNITS_DIR}/{C.unit_dir_name(unit)}"

    def is_unit_done(self, ctx: StageContext, plan: UnitPlan, unit: str) -> bool:
        rel = f"{self.unit_rel(ctx, unit)}/_done"
        return ctx.store.exists(rel) and ctx.store.read_text(rel) == plan.signatures[unit]

    def undone_units(self, ctx: StageContext, plan: UnitPlan | None = None) -> list[str]:
        plan = plan or self.unit_plan(ctx)
        return [u for u in plan.units if not self.is_unit_done(ctx, plan, u)]

    # -- one unit ------------------------------------------------------------------------------
    def run_unit(self, ctx: StageContext, plan: UnitPlan, unit: str) -> C.UnitResult:
        """Prepare ``unit``'s working directory, run the trainer, check and keep its results (skipped,
        and the stored result read back, when the unit is already done for its signature)."""
        rows = plan.rows[unit]
        keys = [k.decode() for k in plan.layout["keys"][rows]]
        rel = self.unit_rel(ctx, unit)
        if self.is_unit_done(ctx, plan, unit):
            return self._read_stored(ctx, rel, unit, keys)
        local = isinstance(ctx.store, LocalStore)
        workdir = ctx.store.uri(rel) if local else tempfile.mkdtemp(prefix="curate-unit-")
        try:
            if os.path.isdir(workdir):
                shutil.rmtree(workdir)   # a failed earlier attempt's result.json must never be read
            os.makedirs(os.path.join(workdir, C.DATA_DIR))
            self._prepare(ctx, plan, unit, rows, keys, workdir)
            spec = self.config.trainer
            if ctx.progress:
                print(f"{ctx.prefix}: unit {unit!r} ({len(keys)} samples): training; log: "
                      f"{os.path.join(workdir, C.LOG_FILE)}", file=sys.stderr, flush=True)
            values = {"data": os.path.join(workdir, C.DATA_DIR), "workdir": workdir,
                      "eval": self._local_eval(workdir), "world_size": spec.world_size, "unit": unit,
                      "seed": spec.seed, "features": os.path.join(workdir, C.DATA_DIR, C.FEATURES_FILE)}
            env = {**spec.env, "CURATE_UNIT": unit, "CURATE_WORKDIR": workdir,
                   "CURATE_WORLD_SIZE": str(spec.world_size)}
            try:
                C.run_command(C.expand(spec, values), workdir, spec.timeout_s, env)
            finally:
                C.trim_log(os.path.join(workdir, C.LOG_FILE))
                if not local:
                    self._upload(ctx, workdir, rel, with_results=False)
            res = C.read_result(workdir, unit, keys, self.config.label, self.config.outputs)
            if not local:
                self._upload(ctx, workdir, rel, with_results=True)
            ctx.store.write_text(f"{rel}/_done", plan.signatures[unit])   # last: the unit is complete
            return res
        finally:
            if not local:
                shutil.rmtree(workdir, ignore_errors=True)

    def _read_stored(self, ctx: StageContext, rel: str, unit: str, keys: list[str]) -> C.UnitResult:
        with tempfile.TemporaryDirectory(prefix="curate-unit-") as tmp:
            for name in (C.RESULT_FILE, C.OUTPUTS_FILE):
                if ctx.store.exists(f"{rel}/{name}"):
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(ctx.store.read_bytes(f"{rel}/{name}"))
            return C.read_result(tmp, unit, keys, self.config.label, self.config.outputs)

    def _prepare(self, ctx: StageContext, plan: UnitPlan, unit: str, rows: np.ndarray, keys: list[str],
                 workdir: str) -> None:
        data = os.path.join(workdir, C.DATA_DIR)
        with open(os.path.join(data, C.KEYS_FILE), "w", encoding="utf-8") as f:
            f.write("".join(k + "\n" for k in keys))
        if plan.features is not None:
            C.write_features(data, plan.features[rows], plan.names, plan.dims)
        local = LocalStore(workdir)
        info: dict = {"unit": unit, "signature": plan.signatures[unit], "samples": len(keys),
                      "trainer": self.config.trainer.to_dict(), "formats": {}}
        for fmt in self.config.formats:
            samples = self._samples(ctx, plan, rows)
            if fmt == "llava":
                info["formats"][fmt] = write_llava(samples, local, f"{C.DATA_DIR}/llava")
            elif fmt == "cc_sbu_align":
                n, skipped = write_cc_sbu_align(samples, local, f"{C.DATA_DIR}/cc_sbu_align")
                info["formats"][fmt] = n
                info["cc_sbu_align_skipped"] = [{"key": k, "reason": r} for k, r in skipped]
            else:
                info["formats"][fmt] = _write_webdataset(samples, local, f"{C.DATA_DIR}/webdataset")
        with open(os.path.join(workdir, C.UNIT_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1, sort_keys=True, default=str)

    def _samples(self, ctx: StageContext, plan: UnitPlan, rows: np.ndarray):
        """The unit's samples with their images, in raw order; only shards holding some are read."""
        offsets, shards, keys = plan.layout["shard_offsets"], plan.layout["shards"], plan.layout["keys"]
        for i, shard in enumerate(shards):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            mine = rows[(rows >= lo) & (rows < hi)]
            if not len(mine):
                continue
            want = {k.decode() for k in keys[mine]}
            found = 0
            for s in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}"):
                if s.key in want:
                    found += 1
                    yield s
            if found != len(want):
                raise PermanentInputError(f"{shard}: {len(want) - found} of the unit's keys are not in the raw shard")

    def _local_eval(self, workdir: str) -> str:
        """The eval set as a local path: as given, or downloaded (JSON + its images) from s3://."""
        ev = self.config.eval
        if not ev:
            return ""
        if not ev.startswith("s3://"):
            return ev
        base, name = ev.rsplit("/", 1)
        dst = os.path.join(workdir, "eval")
        os.makedirs(dst, exist_ok=True)
        text = read_url(ev)
        with open(os.path.join(dst, name), "wb") as f:
            f.write(text)
        src = open_store(base, options_for_url(ev))   # the endpoint registered for that bucket
        for rec in json.loads(text):
            imgs = rec.get("image") or []
            for img in [imgs] if isinstance(imgs, str) else imgs:
                path = os.path.join(dst, *img.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(src.read_bytes(img))
        return os.path.join(dst, name)

    def _upload(self, ctx: StageContext, workdir: str, rel: str, with_results: bool) -> None:
        """Copy what the trainer wrote (not the staged data, not the eval copy) to the store; result
        files only once they were checked."""
        results = {C.RESULT_FILE, C.OUTPUTS_FILE}
        for root, dirs, files in os.walk(workdir):
            r = os.path.relpath(root, workdir)
            if r == ".":
                dirs[:] = [d for d in dirs if d not in (C.DATA_DIR, "eval")]
            for name in files:
                path = os.path.normpath(os.path.join(r, name)).replace(os.sep, "/")
                if (path in results) != with_results:
                    continue
                with open(os.path.join(root, name), "rb") as f:
                    ctx.store.write_bytes(f"{rel}/{path}", f.read())

    # -- the fit and the per-shard writes -------------------------------------------------------
    def fit(self, ctx: StageContext) -> dict:
        c = self.config
        plan = self.unit_plan(ctx)
        try:
            if os.environ.get(COLLECT_ONLY_ENV) == "1":
                undone = self.undone_units(ctx, plan)
                if undone:
                    raise RuntimeError(f"{len(undone)} unit(s) have no result for their current samples "
                                       f"({undone[:5]}): their train pods did not finish, or the samples changed "
                                       "since the unit list was made; re-run the workflow")
            n = len(plan.unit_of_row)
            labels = np.full(len(plan.units), np.nan)
            outputs = {f"out:{o}": np.full(n, np.nan) for o in c.outputs}
            results = {}
            for j, u in enumerate(plan.units):
                res = self.run_unit(ctx, plan, u)
                labels[j] = res.label
                results[u] = res.result
                for o in c.outputs:
                    outputs[f"out:{o}"][plan.rows[u]] = res.outputs[o]
        finally:
            plan.close()
        quality = labels if c.higher_is_better else -labels
        counts = np.bincount(plan.excluded_code, minlength=len(plan.reasons))
        by_kind: dict[str, int] = {}
        for r, k in zip(plan.reasons[1:], counts[1:]):
            by_kind[r.split(":", 1)[0]] = by_kind.get(r.split(":", 1)[0], 0) + int(k)
        return {**plan.layout, "unit_of_row": plan.unit_of_row, "labels": labels, "quality": quality,
                "excluded_code": plan.excluded_code, **outputs, "units": plan.units,
                "excluded_reasons": plan.reasons, "results": results,
                "stats": {"units": len(plan.units), "sizes": {u: int(len(plan.rows[u])) for u in plan.units},
                          "excluded": by_kind, "label": c.label}}

    def write_shard(self, ctx: StageContext, shard: str, fitted: dict) -> dict:
        unit_of_row, units = fitted["unit_of_row"], fitted["units"]
        labels, quality = fitted["labels"], fitted["quality"]
        excl, reasons = fitted["excluded_code"], fitted["excluded_reasons"]
        outs = {k[len("out:"):]: v for k, v in fitted.items() if k.startswith("out:")}

        def row_json(row: int) -> dict:
            j = int(unit_of_row[row])
            if j < 0:
                return {"excluded": reasons[int(excl[row])]}
            d = {"unit": units[j], "label": float(labels[j]), "quality": float(quality[j])}
            d.update({o: float(v[row]) for o, v in outs.items()})
            return d

        return write_rows(ctx, shard, fitted, row_json)


def _write_webdataset(samples, store, prefix: str, shard_size: int = 1000) -> int:
    n, w, idx = 0, None, 0
    try:
        for s in samples:
            if w is None:
                w = ShardWriter(store, f"{prefix}/{shard_name(idx)}")
            w.write_sample(s)
            n += 1
            if w.count >= shard_size:
                w.close()
                w, idx = None, idx + 1
        if w is not None:
            w.close()
    except BaseException as e:
        if w is not None:
            w.abort(e)
        raise
    return n
