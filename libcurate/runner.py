"""Local execution of a planned recipe: the embedded default backend (no cluster).

Shards of a per-shard stage run in a process pool (``workers``); stages that batch across shards (GPU
models) run in this process over every undone shard; global stages (select, export) run once. Shards
whose ``_done`` marker exists are skipped, so a second run does no work.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from .ingest import IngestStage, undone_ingest_shards
from .pipeline import PlannedStage, Recipe, plan
from .shards import shard_index, shard_name
from .stage import Stage, StageContext, done_rel, is_done, raw_shards, unit_of
from .storage import Store, open_store

# Set in the parent before the pool forks, so workers inherit the built stage (and, for ingest, the
# parsed annotations) instead of re-parsing or unpickling them per task.
_WORKER: dict = {}


def _run_one(shard: str) -> dict:
    stage, ctx = _WORKER["stage"], _WORKER["ctx"]
    return stage.process_shard(ctx, shard)


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


def input_signature(store: Store, raw_prefix: str = "raw") -> str:
    """Identifies the set of complete raw shards a global stage decided on."""
    names = "\n".join(raw_shards(store, raw_prefix))
    return "inputs:" + hashlib.sha256(names.encode()).hexdigest()


def undone_shards(stage: Stage, ctx: StageContext) -> list[str]:
    if isinstance(stage, IngestStage):
        return undone_ingest_shards(stage, ctx)
    return [s for s in raw_shards(ctx.store, ctx.raw_prefix) if not is_done(ctx.store, ctx.prefix, unit_of(s))]


@dataclass
class StageRun:
    id: str
    prefix: str
    shards_done: int
    seconds: float
    skipped: bool


def build_stage(ps: PlannedStage, recipe: Recipe) -> Stage:
    if ps.stage == "ingest":
        return IngestStage(ps.config, recipe.storage_options)
    return ps.build()


def context(ps: PlannedStage, recipe: Recipe, store: Store, workers: int, device: str | None = None,
            progress: bool = False) -> StageContext:
    return StageContext(store=store, prefix=ps.prefix, upstream=ps.upstream, workers=workers,
                        device=device or recipe.device, progress=progress)


def run_stage(ps: PlannedStage, recipe: Recipe, store: Store, workers: int = 1, shards: list[int] | None = None,
              progress: bool = True, device: str | None = None) -> StageRun:
    """Run one planned stage; ``shards`` restricts a per-shard stage to those indices (one Argo batch)."""
    t0 = time.monotonic()
    stage = build_stage(ps, recipe)
    ctx = context(ps, recipe, store, workers, device, progress)
    store.clean_partial(ps.prefix)  # a killed earlier run may have left half-written temp files
    if stage.kind == "global":
        # A global stage is done for one set of input shards: when new raw shards arrive (scheduled
        # re-curation), selection and export run again over everything.
        sig = input_signature(store, ctx.raw_prefix)
        if is_done(store, ps.prefix, "all") and store.read_text(done_rel(ps.prefix, "all")) == sig:
            return StageRun(ps.id, ps.prefix, 0, 0.0, True)
        stage.run_global(ctx)
        store.write_text(done_rel(ps.prefix, "all"), sig)
        return StageRun(ps.id, ps.prefix, 1, time.monotonic() - t0, False)
    if isinstance(stage, IngestStage):
        # A batch of a fan-out (shards given) keeps the layout its list step fixed (jobs.plan_batches).
        stage.check_manifest(ctx, extend=shards is None)
    todo = undone_shards(stage, ctx)
    if shards is not None:
        wanted = {shard_name(i) for i in shards}
        todo = [s for s in todo if s in wanted]
    if not todo:
        return StageRun(ps.id, ps.prefix, 0, 0.0, True)
    bar = tqdm(total=len(todo), desc=f"{ps.id:<14}", unit="shard", disable=not progress, file=sys.stderr)
    if stage.spans_shards or workers <= 1 or len(todo) == 1:
        if stage.spans_shards:
            for _ in stage.process_shards(ctx, todo):
                bar.update(1)
        else:
            for s in todo:
                stage.process_shard(ctx, s)
                bar.update(1)
    else:
        _WORKER.update(stage=stage, ctx=ctx)
        if isinstance(stage, IngestStage) and stage.needs_parse(ctx, todo):
            stage.records()  # parse once, before the fork
        try:
            with mp.get_context("fork").Pool(min(workers, len(todo))) as pool:
                for _ in pool.imap_unordered(_run_one, todo):
                    bar.update(1)
        finally:
            _WORKER.clear()
    bar.close()
    return StageRun(ps.id, ps.prefix, len(todo), time.monotonic() - t0, False)


def run_recipe(recipe: Recipe, workers: int | None = None, progress: bool = True,
               only: list[str] | None = None) -> list[StageRun]:
    """Run every stage of a recipe in order (or only the stage ids in ``only``)."""
    store = open_store(recipe.prefix, recipe.storage_options)
    runs = []
    for ps in plan(recipe):
        if only and ps.id not in only:
            continue
        runs.append(run_stage(ps, recipe, store, workers or recipe.workers, progress=progress))
    return runs


def shard_indices(shards: list[str]) -> list[int]:
    return [shard_index(s) for s in shards]
