"""Plumbing shared by every LLM-backed per-shard stage (judge_score, judge_gavie, generate_*).

A subclass says what to ask for one sample (:meth:`LLMShardStage.plan` -> :class:`Plan` of requests, or
:class:`Reject`) and what to write once the replies are in (:meth:`LLMShardStage.record` -> sidecar dict,
or :class:`Reject`). This class streams the raw shard, keeps at most ``window`` samples in flight
(``4 x concurrency``; memory does not grow with the shard), writes sidecars in raw order, and:

* quarantines a sample whose calls finally failed (reason ``llm_call_failed``, detail = error) and writes
  one dead-letter line per failed request to ``<prefix>/_dead_letter/<unit>.jsonl``;
* aborts the shard as *retryable* (:class:`~libcurate.llm.client.LLMUnavailableError`, no done marker)
  when more than ``llm.max_failed_fraction`` (default 0.01) of its samples failed for transient reasons
  (an endpoint outage must not mark thousands of samples as bad; the response cache makes the retry
  cheap). One failed sample is tolerated in any shard unless every sample failed (:func:`too_many_failed`),
  so a single sample its endpoint always refuses is quarantined instead of failing every run;
* puts request/token/cost counters, the model ids and the prompt version into the shard's ``_stats``
  under ``llm``.

With ``llm.batch_api`` the shard's requests go through the OpenAI Batch API in one batch instead.
"""

from __future__ import annotations

import asyncio
import collections
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from ..records import Sample
from ..shards import iter_members, iter_samples
from ..stage import ShardOutput, Stage, StageContext, read_quarantine, unit_of
from .client import LLMClient, LLMRequest, LLMResult, LLMUnavailableError, UsageStats, image_part


@dataclass
class Plan:
    """The requests for one sample and any state :meth:`LLMShardStage.record` needs back."""

    requests: list[LLMRequest]
    state: Any = None


@dataclass
class Reject:
    """Quarantine the sample with this reason (never a made-up value)."""

    reason: str
    detail: str = ""


def call_failure(results: list[LLMResult]) -> Reject | None:
    """A :class:`Reject` naming the first failed call, or None if every call returned a reply."""
    bad = [r for r in results if not r.ok]
    if not bad:
        return None
    r = bad[0]
    return Reject("llm_call_failed", f"{len(bad)}/{len(results)} calls failed; first: {r.error_kind} "
                                     f"status={r.error_status} attempts={r.attempts}: {r.error}")


def sample_images(sample: Sample, max_side: int = 0, detail: str = "auto") -> list:
    return [image_part(im.data, im.format, im.sha256, max_side, detail) for im in sample.images]


def too_many_failed(failed: int, n: int, max_fraction: float) -> bool:
    """Whether ``failed`` of ``n`` samples failing for transient reasons aborts the shard: more than
    ``max_fraction`` of them and (unless ``max_fraction`` is 0) more than one or every one of them."""
    if not n or failed <= max_fraction * n:
        return False
    return max_fraction == 0 or failed > 1 or failed == n


def dead_letter_rel(prefix: str, unit: str) -> str:
    return f"{prefix}/_dead_letter/{unit}.jsonl"


def iter_with_upstream(ctx: StageContext, shard: str, stage_id: str,
                       with_images: bool) -> Iterator[tuple[Sample, dict | None]]:
    """Raw samples joined key-for-key with an earlier stage's sidecar JSON (``None`` where it quarantined)."""
    from ..shards import iter_aligned
    from ..stage import PermanentInputError

    if stage_id not in ctx.upstream:
        raise PermanentInputError(f"upstream stage {stage_id!r} is not in the recipe before this stage; "
                                  f"known: {sorted(ctx.upstream)}")
    prefix = ctx.upstream[stage_id]
    unit = unit_of(shard)
    side = iter_members(ctx.store.uri(f"{prefix}/{unit}.tar"))
    q = {d["key"] for d in read_quarantine(ctx.store, prefix, unit)}
    raw = iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}", with_images=with_images)
    for sample, joined in iter_aligned(raw, {stage_id: side}, {stage_id: q}):
        m = joined[stage_id]
        yield sample, (json.loads(m["json"]) if m is not None else None)


class LLMShardStage(Stage):
    """Base of the LLM stages; the subclass's ``Config`` has an ``llm`` field (:class:`LLMSettings`)."""

    profile: ClassVar[str] = "cpu"
    llm: ClassVar[bool] = True     # HTTP to an OpenAI-compatible endpoint, no torch: the slim CPU image

    # -- what a subclass implements ------------------------------------------------------------
    def needs_images(self) -> bool:
        return False

    def setup(self, ctx: StageContext) -> None:
        """Load side inputs (annotation files) once per process."""

    def inputs(self, ctx: StageContext, shard: str) -> Iterator[tuple[Sample, Any]]:
        for s in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}", with_images=self.needs_images()):
            yield s, None

    def plan(self, sample: Sample, extra: Any) -> Plan | Reject:
        raise NotImplementedError

    def record(self, sample: Sample, plan: Plan, results: list[LLMResult]) -> dict | Reject:
        raise NotImplementedError

    def stats_extra(self) -> dict:
        """Extra fields for ``_stats.llm`` (prompt versions, model ids)."""
        return {}

    # -- the shared loop -----------------------------------------------------------------------
    def process_shard(self, ctx: StageContext, shard: str) -> dict:
        unit = unit_of(shard)
        self.setup(ctx)
        out = ShardOutput(ctx.store, ctx.prefix, unit)
        try:
            n = asyncio.run(self._run(ctx, shard, out))
            return out.finish(n)
        except BaseException as e:
            out.abort(e)
            raise

    async def _run(self, ctx: StageContext, shard: str, out: ShardOutput) -> int:
        settings = self.config.llm
        stats = UsageStats()
        dead: list[dict] = []
        counts = {"n": 0, "transient_failed": 0}
        extra_reasons: collections.Counter = collections.Counter()

        def emit(sample: Sample, plan, results: list[LLMResult] | None) -> None:
            rec = plan if isinstance(plan, Reject) else None
            if rec is None:
                for r in results:
                    if not r.ok:
                        dead.append({"key": sample.key, "cache_key": r.cache_key, "model": r.model,
                                     "error_kind": r.error_kind, "status": r.error_status,
                                     "error": (r.error or "")[:500], "attempts": r.attempts,
                                     "transient": r.transient})
                failed = call_failure(results)
                if failed is not None and any(r.transient for r in results if not r.ok):
                    counts["transient_failed"] += 1
                rec = failed if failed is not None and not self.tolerates_partial_failure() else None
                if rec is None:
                    rec = self.record(sample, plan, results)
            if isinstance(rec, Reject):
                extra_reasons[rec.reason] += 1
                out.quarantine(sample.key, rec.reason, rec.detail)
            else:
                out.write_json(sample.key, rec)

        async with LLMClient(settings, ctx.store, stats) as client:
            if settings.batch_api:
                items = []
                for sample, extra in self.inputs(ctx, shard):
                    counts["n"] += 1
                    items.append((sample, self.plan(sample, extra)))
                reqs = [r for _, p in items if isinstance(p, Plan) for r in p.requests]
                results = await client.run_batch(reqs)
                i = 0
                for sample, p in items:
                    if isinstance(p, Plan):
                        emit(sample, p, results[i:i + len(p.requests)])
                        i += len(p.requests)
                    else:
                        emit(sample, p, None)
            else:
                window: collections.deque = collections.deque()
                limit = max(64, 4 * settings.concurrency)
                for sample, extra in self.inputs(ctx, shard):
                    counts["n"] += 1
                    p = self.plan(sample, extra)
                    fut = (asyncio.ensure_future(asyncio.gather(*(client.complete(r) for r in p.requests)))
                           if isinstance(p, Plan) else None)
                    window.append((sample, p, fut))
                    await asyncio.sleep(0)  # let in-flight requests progress while we read the shard
                    while window and (len(window) > limit or window[0][2] is None or window[0][2].done()):
                        s, p0, f = window.popleft()
                        emit(s, p0, await f if f is not None else None)
                while window:
                    s, p0, f = window.popleft()
                    emit(s, p0, await f if f is not None else None)
        n = counts["n"]
        out.extra["llm"] = {**stats.as_extra(), "model": settings.model, "quarantined_by_reason": dict(extra_reasons),
                            "failed_samples": counts["transient_failed"], **self.stats_extra()}
        if dead:
            ctx.store.write_text(dead_letter_rel(ctx.prefix, out.unit),
                                 "".join(json.dumps(d, sort_keys=True) + "\n" for d in dead))
        else:
            ctx.store.delete(dead_letter_rel(ctx.prefix, out.unit))  # a stale file from an aborted attempt
        if too_many_failed(counts["transient_failed"], n, settings.max_failed_fraction):
            raise LLMUnavailableError(
                f"{out.unit}: {counts['transient_failed']}/{n} samples failed for transient reasons (429, 5xx, "
                f"timeouts after {settings.max_attempts} attempts), more than llm.max_failed_fraction="
                f"{settings.max_failed_fraction} allows; the shard is left undone and a re-run retries it "
                f"(cached replies are not sent again). If the endpoint is up and these samples keep failing, "
                f"raise llm.max_failed_fraction in the stage's `llm:` settings (it does not change the "
                f"stage's output prefix): they are then quarantined as llm_call_failed. Failed requests: "
                f"{dead_letter_rel(ctx.prefix, out.unit)}")
        return n

    def tolerates_partial_failure(self) -> bool:
        """True when :meth:`record` handles failed calls itself (e.g. k repeats where some failed)."""
        return False
