"""Local execution of a planned recipe: the embedded default backend (no cluster).

Shards of a per-shard stage run in a process pool (``workers``); stages that batch across shards (GPU
models) run in this process over every undone shard; global stages (select, export) run once. Shards
whose ``_done`` marker exists are skipped, so a second run does no work.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .columns import pack_arrays, unpack_arrays
from .pipeline import PlannedStage, Recipe, plan
from .shards import shard_index
from .stage import FIT_UNIT, Stage, StageContext, done_rel, is_done, raw_shards, unit_of
from .storage import Store, open_store

# Set in the parent before the pool forks, so workers inherit the built stage (and, for ingest, the
# parsed annotations) instead of re-parsing or unpickling them per task.
_WORKER: dict = {}


def _run_one(shard: str) -> dict:
    return _run_in_process(_WORKER["stage"], _WORKER["ctx"], shard, _WORKER["fitted"])


def _write_fit_shard(stage: Stage, ctx: StageContext, shard: str, fitted: dict) -> dict:
    stats = stage.write_shard(ctx, shard, fitted)
    # The marker names the fit it belongs to: a re-fit (new raw shards) rewrites every shard.
    ctx.store.write_text(done_rel(ctx.prefix, unit_of(shard)), fitted["__signature__"])
    return stats


def parse_shard_spec(spec: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(out))


def format_shard_spec(indices: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0-3,7"`` (the inverse of :func:`parse_shard_spec`)."""
    parts, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def input_signature(store: Store, raw_prefix: str = "raw", upstream: dict[str, str] | None = None) -> str:
    """Identifies the set of complete raw shards a global stage decided on (those it sees: ``upstream``)."""
    names = "\n".join(raw_shards(store, raw_prefix, upstream))
    return "inputs:" + hashlib.sha256(names.encode()).hexdigest()


def undone_shards(stage: Stage, ctx: StageContext) -> list[str]:
    """The stage's shards without a done marker (for a ``fit`` stage: without one of its current fit)."""
    if stage.kind == "fit":
        sig = fit_signature(ctx)
        return [s for s in stage.units(ctx) if _marker(ctx.store, ctx.prefix, unit_of(s)) != sig]
    out_prefix = ctx.raw_prefix if stage.produces_raw else ctx.prefix
    return [s for s in stage.units(ctx) if not is_done(ctx.store, out_prefix, unit_of(s))]


def _marker(store: Store, prefix: str, unit: str) -> str | None:
    rel = done_rel(prefix, unit)
    return store.read_text(rel) if store.exists(rel) else None


def fit_signature(ctx: StageContext) -> str | None:
    """The signature of the fit a ``fit`` stage's shard outputs belong to (None: not fitted yet)."""
    return _marker(ctx.store, ctx.prefix, FIT_UNIT)


def fitted_rel(prefix: str) -> str:
    return f"{prefix}/{FIT_UNIT}/fitted.cols"


def save_fitted(store: Store, prefix: str, fitted: dict) -> None:
    """Arrays go to ``_fit/fitted.cols`` (:func:`columns.pack_arrays`, no pickle); everything else to
    ``_fit/fitted.json``."""
    arrays = {k: v for k, v in fitted.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in fitted.items() if not isinstance(v, np.ndarray)}
    store.write_bytes(fitted_rel(prefix), pack_arrays(arrays))
    store.write_text(f"{prefix}/{FIT_UNIT}/fitted.json", json.dumps(rest, sort_keys=True, indent=1, default=str))


def load_fitted(store: Store, prefix: str) -> dict:
    out: dict = unpack_arrays(store.read_bytes(fitted_rel(prefix)))
    out.update(json.loads(store.read_text(f"{prefix}/{FIT_UNIT}/fitted.json")))
    return out


def run_fit(stage: Stage, ctx: StageContext, force: bool = False) -> bool:
    """Fit a ``fit`` stage once for the current set of raw shards; False when already fitted for it."""
    sig = input_signature(ctx.store, ctx.raw_prefix, ctx.upstream)
    if not force and fit_signature(ctx) == sig:
        return False
    fitted = stage.fit(ctx)
    save_fitted(ctx.store, ctx.prefix, fitted)
    ctx.store.write_text(done_rel(ctx.prefix, FIT_UNIT), sig)  # last: the fit is complete
    return True


@dataclass
class StageRun:
    id: str
    prefix: str
    shards_done: int
    seconds: float
    skipped: bool


def build_stage(ps: PlannedStage, recipe: Recipe) -> Stage:
    return ps.cls.create(ps.config, recipe.storage_options)


def context(ps: PlannedStage, recipe: Recipe, store: Store, workers: int, device: str | None = None,
            progress: bool = False) -> StageContext:
    return StageContext(store=store, prefix=ps.prefix, upstream=ps.upstream, workers=workers,
                        device=device or recipe.device, progress=progress,
                        storage_options=dict(recipe.storage_options or {}))


def run_stage(ps: PlannedStage, recipe: Recipe, store: Store, workers: int = 1, shards: list[int] | None = None,
              progress: bool = True, device: str | None = None, phase: str = "all") -> StageRun:
    """Run one planned stage.

    Args:
        shards: restrict a per-shard stage (or a fit stage's writes) to these indices (one Argo batch).
        phase: for ``fit`` stages: ``fit`` (only the global fit: its own pod on Argo), ``write`` (only
            the per-shard writes of an existing fit) or ``all``.
    """
    t0 = time.monotonic()
    stage = build_stage(ps, recipe)
    ctx = context(ps, recipe, store, workers, device, progress)
    store.clean_partial(ps.prefix)  # a killed earlier run may have left half-written temp files
    if stage.kind == "global":
        # A global stage is done for one set of input shards: when new raw shards arrive (scheduled
        # re-curation), selection and export run again over everything.
        sig = input_signature(store, ctx.raw_prefix, ctx.upstream)
        if is_done(store, ps.prefix, "all") and store.read_text(done_rel(ps.prefix, "all")) == sig:
            return StageRun(ps.id, ps.prefix, 0, 0.0, True)
        stage.run_global(ctx)
        store.write_text(done_rel(ps.prefix, "all"), sig)
        return StageRun(ps.id, ps.prefix, 1, time.monotonic() - t0, False)
    fitted_now = False
    if stage.kind == "fit":
        if phase in ("fit", "all"):
            fitted_now = run_fit(stage, ctx)
        if phase == "fit":
            return StageRun(ps.id, ps.prefix, int(fitted_now), time.monotonic() - t0, not fitted_now)
        if fit_signature(ctx) != input_signature(store, ctx.raw_prefix, ctx.upstream):
            raise RuntimeError(f"{ps.id}: no fit for the current raw shards; run its fit step first")
    stage.prepare(ctx, fanout_batch=shards is not None)
    todo = undone_shards(stage, ctx)
    if shards is not None:
        units = stage.units(ctx)  # batch specs are positions in the stage's units (generated shards too)
        wanted = {units[i] for i in shards if i < len(units)}
        todo = [s for s in todo if s in wanted]
    if not todo:
        return StageRun(ps.id, ps.prefix, int(fitted_now), time.monotonic() - t0, not fitted_now)
    fitted = None
    if stage.kind == "fit":
        fitted = load_fitted(store, ps.prefix)
        fitted["__signature__"] = fit_signature(ctx)
    bar = tqdm(total=len(todo), desc=f"{ps.id:<14}", unit="shard", disable=not progress, file=sys.stderr)
    if stage.spans_shards:
        for _ in stage.process_shards(ctx, todo):
            bar.update(1)
    elif workers <= 1 or len(todo) == 1:
        for s in todo:
            _run_in_process(stage, ctx, s, fitted)
            bar.update(1)
    else:
        _WORKER.update(stage=stage, ctx=ctx, fitted=fitted)
        stage.before_fork(ctx, todo)
        try:
            with mp.get_context("fork").Pool(min(workers, len(todo))) as pool:
                for _ in pool.imap_unordered(_run_one, todo):
                    bar.update(1)
        finally:
            _WORKER.clear()
    bar.close()
    return StageRun(ps.id, ps.prefix, len(todo), time.monotonic() - t0, False)


def _run_in_process(stage: Stage, ctx: StageContext, shard: str, fitted: dict | None) -> dict:
    if stage.kind == "fit":
        return _write_fit_shard(stage, ctx, shard, fitted)
    return stage.process_shard(ctx, shard)


def run_recipe(recipe: Recipe, workers: int | None = None, progress: bool = True,
               only: list[str] | None = None) -> list[StageRun]:
    """Run every stage of a recipe in order (or only the stage ids in ``only``)."""
    store = open_store(recipe.prefix, recipe.storage_options)
    runs = []
    planned = plan(recipe)
    spent = 0.0  # max_cost: expected cost of the LLM stages run so far (their estimate when checked)
    for ps in planned:
        if only and ps.id not in only:
            continue
        if recipe.max_cost is not None and getattr(ps.cls, "llm", False):
            # estimated from the inputs now in the store, before this stage's first request (the same
            # check an Argo run's `<stage>-budget` step makes: python -m jobs.check_budget)
            from .llm.cost import check_before_stage

            spent = check_before_stage(recipe, planned, ps.id, spent, only)
        runs.append(run_stage(ps, recipe, store, workers or recipe.workers, progress=progress))
    return runs


def shard_indices(shards: list[str], units: list[str] | None = None) -> list[int]:
    """Positions of ``shards`` in the stage's ``units`` (what a batch spec names); without ``units``,
    the numbers in ``shard-NNNNNN.tar``."""
    if units is None:
        return [shard_index(s) for s in shards]
    pos = {u: i for i, u in enumerate(units)}
    return [pos[s] for s in shards]
