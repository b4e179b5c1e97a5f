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

Which samples form which unit, and their features: :mod:`libcurate.train.units`; a unit's working
directory: :mod:`libcurate.train.workdir`. Samples left out of every unit carry the reason in their
sidecar (``excluded``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from ..columns import embedding_rel, gather
from ..select.fitstage import write_rows
from ..stage import PermanentInputError, Reads, Stage, StageConfig, StageContext, raw_shards, unit_of
from ..storage import LocalStore, read_url
from . import contract as C
from . import units as U
from . import workdir as W

FORMATS = ("llava", "cc_sbu_align", "webdataset")
# The default trainer: the reference VLM (libcurate.train.reference_vlm), small enough for a CPU.
REFERENCE_TRAINER = {"command": ["python", "-m", "libcurate.train.reference_vlm"],
                     "args": ["--data", "{data}", "--workdir", "{workdir}", "--eval", "{eval}", "--seed", "{seed}"]}
COLLECT_ONLY_ENV = "CURATE_TRAIN_COLLECT_ONLY"
UNITS_DIR = "_units"


@dataclass
class TrainConfig(StageConfig):
    """Settings of ``train``.

    Attributes:
        trainer: the command and its resources (:class:`~libcurate.train.contract.TrainerSpec`); default:
            the reference VLM (:data:`REFERENCE_TRAINER`), which reports ``eval_loss`` when ``eval`` is set.
        unit_by: ``all`` (one unit of every sample) or ``<stage_id>.<field>`` (one unit per value).
        features: fields and embeddings written to ``features.npy``, in this one named order.
        formats: dataset layouts exported into each unit's ``data/``.
        eval: the held-out evaluation set (LLaVA JSON, images relative to it), passed as ``{eval}``.
        label: the ``result.json`` key that is the unit's label.
        higher_is_better: whether a larger label is better (``quality`` = label, else -label).
        outputs: per-sample fields the trainer must write to ``outputs.jsonl`` (e.g. ``[difficulty]``).
        min_unit_size: smaller units are not trained (their samples: ``excluded: unit_too_small``).
        keep_data: keep a trained unit's staged ``data/`` (a copy of its images) in a local run root, to
            inspect or re-run the trainer by hand; by default it is removed once the unit is done, so a
            local run does not hold every image twice (an S3 run root never receives it).
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
    keep_data: bool = False
    profile: str = "gpu"

    UNHASHED = ("profile", "keep_data")

    def __post_init__(self):
        if self.trainer is None:
            self.trainer = dict(REFERENCE_TRAINER)
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


C.TrainerSpec.UNHASHED = ("memory", "cpu", "scratch", "timeout_s")   # how it runs, not what it computes


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

    def unit_plan(self, ctx: StageContext) -> U.UnitPlan:
        """Which unit every raw sample belongs to, its features and every unit's signature; decided on
        columns (no Python object per sample). Embedding features stay memory-mapped in ``plan.scratch``
        (remove it with :meth:`U.UnitPlan.close`)."""
        c = self.config
        fields, embs = self._split_features(ctx)
        unit_field = [] if c.unit_by == "all" else [c.unit_by]
        scratch = tempfile.mkdtemp(prefix="curate-train-")
        t = gather(ctx, fields=unit_field + fields, embeddings=embs, scratch=scratch)
        try:
            plan = U.plan_units(t, c.unit_by, c.features, c.min_unit_size, scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        upstream = {sid: ctx.upstream[sid] for sid in sorted(self.reads(c).stages) if sid in ctx.upstream}
        upstream["__raw__"] = ctx.raw_prefix
        trainer = {"stage": c.hash_dict(), "eval_sha256": self._eval_digest()}
        keys = plan.layout["keys"]
        for u, r in plan.rows.items():
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

    def is_unit_done(self, ctx: StageContext, plan: U.UnitPlan, unit: str) -> bool:
        rel = f"{self.unit_rel(ctx, unit)}/_done"
        return ctx.store.exists(rel) and ctx.store.read_text(rel) == plan.signatures[unit]

    def undone_units(self, ctx: StageContext, plan: U.UnitPlan | None = None) -> list[str]:
        plan = plan or self.unit_plan(ctx)
        return [u for u in plan.units if not self.is_unit_done(ctx, plan, u)]

    # -- one unit ------------------------------------------------------------------------------
    def run_unit(self, ctx: StageContext, plan: U.UnitPlan, unit: str) -> C.UnitResult:
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
            W.prepare(ctx, plan, unit, rows, keys, workdir, self.config.formats, self.config.trainer.to_dict())
            spec = self.config.trainer
            if ctx.progress:
                print(f"{ctx.prefix}: unit {unit!r} ({len(keys)} samples): training; log: "
                      f"{os.path.join(workdir, C.LOG_FILE)}", file=sys.stderr, flush=True)
            values = {"data": os.path.join(workdir, C.DATA_DIR), "workdir": workdir,
                      "eval": W.local_eval(self.config.eval, workdir), "world_size": spec.world_size, "unit": unit,
                      "seed": spec.seed, "features": os.path.join(workdir, C.DATA_DIR, C.FEATURES_FILE)}
            env = {**spec.env, "CURATE_UNIT": unit, "CURATE_WORKDIR": workdir,
                   "CURATE_WORLD_SIZE": str(spec.world_size)}
            try:
                C.run_command(C.expand(spec, values), workdir, spec.timeout_s, env)
            finally:
                C.trim_log(os.path.join(workdir, C.LOG_FILE))
                if not local:
                    W.upload(ctx.store, workdir, rel, with_results=False)
            res = C.read_result(workdir, unit, keys, self.config.label, self.config.outputs)
            if not local:
                W.upload(ctx.store, workdir, rel, with_results=True)
            ctx.store.write_text(f"{rel}/_done", plan.signatures[unit])   # last: the unit is complete
            if local and not self.config.keep_data:
                shutil.rmtree(os.path.join(workdir, C.DATA_DIR), ignore_errors=True)
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
