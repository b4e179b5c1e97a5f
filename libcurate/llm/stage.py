"""Plumbing shared by every LLM-backed per-shard stage (judge_score, judge_gavie, generate_*).

A subclass says which prompt templates it renders (:meth:`LLMShardStage.prompt_names`; loaded once into
``self.templates``, their versions go into ``_stats.llm``), what to ask for one sample
(:meth:`LLMShardStage.plan` -> :class:`Plan` of requests, or :class:`Reject`) and what to write once the
replies are in (:meth:`LLMShardStage.record` -> sidecar dict, or :class:`Reject`).

This class runs all the shards of a stage run (the runner's ``process_shards``: ``spans_shards``) in ONE
event loop with ONE client, so the request window stays full across shard boundaries: the next shard
starts reading as soon as the previous one has read its last sample, while that one's last replies are
still in flight. At most ``window`` samples (``max(64, 4 x concurrency)``) are in flight across all shards
(memory does not grow with the shards). Each shard still completes on its own, in the stage contract's
order (sidecar in raw order, column file, quarantine, ``_stats``, done marker last) as soon as its last
reply is in, with its own request/token counters. A shard that fails is left without a done marker (the
others finish), no further shard is started, and the first failure is raised once the started ones end.

Per shard, this class:

* quarantines a sample whose calls finally failed (reason ``llm_call_failed``, detail = error) and writes
  one dead-letter line per failed request to ``<prefix>/_dead_letter/<unit>.jsonl``;
* aborts the shard as *retryable* (:class:`~libcurate.llm.errors.LLMUnavailableError`, no done marker)
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
import functools
import json
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from ..records import Sample
from ..shards import iter_members, iter_samples
from ..stage import ShardOutput, Stage, StageContext, read_quarantine, unit_of
from .errors import LLMUnavailableError
from .messages import LLMRequest, image_part
from .online import LLMClient
from .prompts import PromptTemplate, load_template
from .results import LLMResult, UsageStats


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


async def _one(coro) -> list:
    return [await coro]


async def _until_set(event: asyncio.Event, task: asyncio.Task) -> None:
    """Wait until ``event`` is set or ``task`` is done; clear the event."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    event.clear()


class LLMShardStage(Stage):
    """Base of the LLM stages; the subclass's ``Config`` has an ``llm`` field (:class:`LLMSettings`)."""

    profile: ClassVar[str] = "cpu"
    llm: ClassVar[bool] = True     # HTTP to an OpenAI-compatible endpoint, no torch: the slim CPU image
    spans_shards: ClassVar[bool] = True  # one event loop over all the shards of a run (see the module doc)

    def __init__(self, config):
        super().__init__(config)
        self.templates: dict[str, PromptTemplate] = {role: load_template(name)
                                                     for role, name in self.prompt_names().items()}

    # -- what a subclass implements ------------------------------------------------------------
    def prompt_names(self) -> dict[str, str]:
        """The templates the stage renders, ``role -> built-in name or path``; by default the config's
        ``prompt`` under the role ``""`` (:attr:`template`)."""
        name = getattr(self.config, "prompt", None)
        return {"": name} if name else {}

    @property
    def template(self) -> PromptTemplate:
        """The stage's one template (role ``""``)."""
        return self.templates[""]

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
        """Extra fields for ``_stats.llm``: the template version (``prompt_version``, one template) or
        versions (``prompt_versions``, in :meth:`prompt_names` order); a subclass may add model ids."""
        versions = [t.version for t in self.templates.values()]
        if list(self.templates) == [""]:
            return {"prompt_version": versions[0]}
        return {"prompt_versions": versions} if versions else {}

    def before_finish(self, ctx: StageContext, shard: str, out: ShardOutput) -> None:
        """Called once a shard's records are written, before its done marker (the generation stages
        write their generated samples as raw shards here)."""

    def tolerates_partial_failure(self) -> bool:
        """True when :meth:`record` handles failed calls itself (e.g. k repeats where some failed)."""
        return False

    # -- the shared loop -----------------------------------------------------------------------
    def process_shard(self, ctx: StageContext, shard: str) -> dict:
        (stats,) = self.process_shards(ctx, [shard])
        return stats

    def process_shards(self, ctx: StageContext, shards) -> Iterator[dict]:
        """Process ``shards`` in one event loop (see the module docstring). Yields each shard's ``_stats``
        in input order as soon as it and the shards before it are done (the runner's progress bar moves
        shard by shard, not once at the end); raises the first failure once the started shards ended."""
        shards = list(shards)
        if not shards:
            return
        self.setup(ctx)
        finished: dict[int, dict] = {}
        runner = asyncio.Runner()
        try:
            progress = asyncio.Event()
            main = runner.get_loop().create_task(self._run_shards(ctx, shards, finished, progress))
            nxt = 0
            while True:
                # The loop runs until a shard finishes (or all end); between runs it pauses only for the
                # consumer's bookkeeping (a progress bar update).
                runner.run(_until_set(progress, main))
                while nxt in finished:
                    yield finished.pop(nxt)
                    nxt += 1
                if main.done():
                    break
            main.result()
        finally:
            # Closing cancels unfinished shards (each aborts its output: no done marker) and closes the
            # client. A generator dropped mid-way and collected only at interpreter exit is left as is:
            # asyncio cannot start its executor-shutdown thread then (it would hang), and an unfinished
            # shard has no done marker either way.
            if not sys.is_finalizing():
                runner.close()

    async def _run_shards(self, ctx: StageContext, shards: list[str], finished: dict[int, dict],
                          progress: asyncio.Event) -> None:
        settings = self.config.llm

        def on_done(i: int, t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is None:
                finished[i] = t.result()
            progress.set()

        flow = asyncio.Semaphore(max(64, 4 * settings.concurrency))  # samples in flight, all shards
        tasks: list[asyncio.Task] = []
        async with LLMClient(settings, ctx.store) as client:
            try:
                for shard in shards:
                    read_done = asyncio.Event()
                    task = asyncio.create_task(self._shard(ctx, shard, client, flow, read_done))
                    task.add_done_callback(functools.partial(on_done, len(tasks)))
                    tasks.append(task)
                    if settings.batch_api:
                        # One batch per shard, one shard after another: a batch is polled for minutes to
                        # hours, and a restarted pod finds each shard's batch id by its request set.
                        await asyncio.wait([task])
                    else:
                        waiter = asyncio.create_task(read_done.wait())
                        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                        waiter.cancel()
                    if any(t.done() and not t.cancelled() and t.exception() is not None for t in tasks):
                        break  # a shard failed: start no new one; the started ones finish
                await asyncio.wait(tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()  # each aborts its own output (no done marker)
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        for t in tasks:
            if t.exception() is not None:
                raise t.exception()

    async def _shard(self, ctx: StageContext, shard: str, client: LLMClient, flow: asyncio.Semaphore,
                     read_done: asyncio.Event) -> dict:
        out = ShardOutput(ctx.store, ctx.prefix, unit_of(shard))
        try:
            n = await self._run(ctx, shard, out, client, flow, read_done)
            self.before_finish(ctx, shard, out)
            return out.finish(n)
        except BaseException as e:
            out.abort(e)
            raise
        finally:
            read_done.set()

    async def _run(self, ctx: StageContext, shard: str, out: ShardOutput, client: LLMClient,
                   flow: asyncio.Semaphore, read_done: asyncio.Event) -> int:
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

        if settings.batch_api:
            items = []
            for sample, extra in self.inputs(ctx, shard):
                counts["n"] += 1
                items.append((sample, self.plan(sample, extra)))
            read_done.set()
            reqs = [r for _, p in items if isinstance(p, Plan) for r in p.requests]
            results = await client.run_batch(reqs, stats)
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
            try:
                await self._stream(ctx, shard, client, flow, read_done, window, limit, counts, stats, emit)
            except BaseException:
                for _, _, f in window:  # this shard failed: stop its requests (the others go on)
                    if f is not None:
                        f.cancel()
                raise
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

    async def _stream(self, ctx, shard, client, flow, read_done, window, limit, counts, stats, emit) -> None:
        """Read ``shard``, send each sample's requests (at most ``limit`` samples in flight across all
        shards: ``flow``) and emit replies in raw order as they complete."""

        def release(_fut) -> None:
            flow.release()

        for sample, extra in self.inputs(ctx, shard):
            counts["n"] += 1
            p = self.plan(sample, extra)
            fut = None
            if isinstance(p, Plan):
                # Wait for a slot in the window shared by all shards (released when a sample's
                # replies are in, not when it is written, so a slow head of one shard cannot block
                # the others).
                await flow.acquire()
                if len(p.requests) == 1:  # the common case: one task, no gather future around it
                    fut = asyncio.ensure_future(_one(client.complete(p.requests[0], stats)))
                else:
                    fut = asyncio.ensure_future(asyncio.gather(*(client.complete(r, stats) for r in p.requests)))
                fut.add_done_callback(release)
            window.append((sample, p, fut))
            await asyncio.sleep(0)  # let in-flight requests progress while we read the shard
            while window and (len(window) > limit or window[0][2] is None or window[0][2].done()):
                s, p0, f = window.popleft()
                emit(s, p0, await f if f is not None else None)
        read_done.set()  # the next shard may start reading while our last replies arrive
        while window:
            s, p0, f = window.popleft()
            emit(s, p0, await f if f is not None else None)
