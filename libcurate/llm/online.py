"""The online client: one async client for every LLM judge and generator (DESIGN.md, "LLM calls").

* Any OpenAI-compatible endpoint through the ``openai`` package: hosted API, vLLM, SGLang, Ollama. The
  endpoint is ``LLMSettings.base_url`` or ``$OPENAI_BASE_URL``; the key is read from the environment
  variable named by ``api_key_env`` (default ``OPENAI_API_KEY``), never from the recipe. A local endpoint
  without a key gets the placeholder ``"EMPTY"`` (vLLM's convention).
* asyncio with bounded concurrency (a semaphore around in-flight requests) and token-bucket limiters for
  requests and tokens per minute (:mod:`libcurate.llm.ratelimit`).
* Retries with exponential backoff and jitter on what :mod:`libcurate.llm.errors` calls transient (429,
  5xx, 408, 409, timeouts, connection failures); anything else fails at once. ``Retry-After`` (and
  ``retry-after-ms``) is honoured and pauses every request of the client, not only the one that got it.
  The openai client's own retries are off (``max_retries=0``) so these are the only ones.
* The response cache (:mod:`libcurate.llm.cache`): a re-run sends no request it has already made.
* Identical requests in flight at the same time share one: the first of a cache key sends, the others
  wait for its result (``UsageStats.shared``), so a shard with repeated prompts sends each once.
* A final failure is returned as an ``LLMResult(ok=False, ...)`` and appended to ``dead_letters``; the
  caller decides what to do with the sample. Nothing ever turns a failure into data.
* Tokens and cost (:func:`~libcurate.llm.cost.request_cost`: explicit ``price_*_per_1k``, ``llm.prices``
  or the dated table; unknown prices counted in ``unpriced_requests``) accumulate in
  :class:`~libcurate.llm.results.UsageStats`.
* :meth:`LLMClient.run_batch` sends through the OpenAI Batch API instead (:mod:`libcurate.llm.batch`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import random
import time
from typing import Iterable

from ..stage import PermanentInputError
from ..storage import Store
from . import batch
from .cache import ResponseCache
from .cost import request_cost
from .errors import classify, retry_after
from .messages import LLMRequest, _n_chars, _n_images, cache_key, chat_body
from .ratelimit import TokenBucket
from .results import LLMResult, UsageStats
from .settings import LLMSettings

log = logging.getLogger(__name__)


def completion_fields(reply) -> tuple[str, str | None, dict]:
    """(text, finish_reason, usage) of a chat completion's JSON; ``ValueError`` if it is not one (no
    choices, no message content, not an object): the caller classifies that as ``bad_response``."""
    try:
        choice = reply["choices"][0]
        text = choice["message"]["content"]
        usage = reply.get("usage") or {}
        finish_reason = choice.get("finish_reason")
    except (LookupError, TypeError, AttributeError) as e:
        raise ValueError(f"reply is not a chat completion: {type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise ValueError("reply has no message content")
    if not isinstance(usage, dict):
        usage = {}
    return text, finish_reason, usage


class LLMClient:
    """Async client; use ``async with LLMClient(settings, store) as c: await c.complete(req)``.

    Args:
        settings: :class:`LLMSettings`.
        store: the run's store for the response cache (``None``: no cache).
        stats: a :class:`UsageStats` to accumulate into (a new one by default).
    """

    def __init__(self, settings: LLMSettings, store: Store | None = None, stats: UsageStats | None = None):
        self.s = settings
        self.stats = stats or UsageStats()
        self.dead_letters: list[dict] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="llm-cache")
        self.cache = ResponseCache(store, settings.cache_prefix, self._executor) if (store is not None and settings.cache) else None
        self._store = store
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._rpm = TokenBucket(settings.requests_per_minute) if settings.requests_per_minute else None
        self._tpm = TokenBucket(settings.tokens_per_minute) if settings.tokens_per_minute else None
        self._pause_until = 0.0
        self._client = None
        self._inflight: dict[str, asyncio.Future] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def _api(self):
        """The openai client, created on first use so a fully cached run needs neither key nor endpoint.

        Its HTTP transport is aiohttp (openai's ``DefaultAioHttpClient``), not the default httpx/httpcore:
        httpcore's pool checks every pooled connection (a ``poll()`` and ``getpeername()`` each) whenever
        it assigns a request, so 64 connections cost O(64) syscalls per request, and its per-request
        Python overhead is higher. Measured on 2 cores against the test server
        (``bench/llm_judge.py --transports``, bench/RESULTS.md): ~630 us of client CPU per request with
        aiohttp and JSON replies, ~1,100 us with eight httpx pools of eight connections and ChatCompletion
        models (the client before), ~1,280 us with one pool. Same openai errors, timeouts and retries."""
        if self._client is None:
            import openai

            base_url = self.s.base_url or os.environ.get("OPENAI_BASE_URL") or None
            key = os.environ.get(self.s.api_key_env)
            if not key:
                if base_url is None:
                    raise PermanentInputError(
                        f"no API key: set ${self.s.api_key_env} (or llm.base_url for a keyless local endpoint)")
                key = "EMPTY"
            self._client = openai.AsyncOpenAI(
                api_key=key, base_url=base_url, max_retries=0, timeout=self.s.timeout_s,
                http_client=openai.DefaultAioHttpClient(timeout=self.s.timeout_s))
        return self._client

    async def __aenter__(self) -> "LLMClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self.cache is not None:
            self.cache.flush_nowait()  # on the loop's thread (it owns the buffer and its timer)
            await asyncio.get_running_loop().run_in_executor(None, self.cache.flush)
        self._executor.shutdown(wait=True)

    # -- one request -------------------------------------------------------------------------
    def _prepare(self, req: LLMRequest) -> tuple[str, dict, str]:
        model = req.model or self.s.model
        params = {**self.s.sampling(), **req.params}
        if req.variant:
            params["_variant"] = req.variant   # key only; stripped before sending
        return model, params, cache_key(model, req.template_version, req.messages, params)

    def _account(self, res: LLMResult, st: UsageStats) -> None:
        st.prompt_tokens += res.prompt_tokens
        st.completion_tokens += res.completion_tokens
        cost = request_cost(self.s, res.model, res.prompt_tokens, res.completion_tokens)
        if cost is None:
            st.unpriced_requests += 1  # no price for this model: the cost is unknown, not 0
        else:
            st.cost_usd += cost

    def _fail(self, res: LLMResult, req: LLMRequest, st: UsageStats | None = None) -> LLMResult:
        st = st or self.stats
        st.failed += 1
        st.failed_transient += int(res.transient)
        st.errors[res.error_kind] = st.errors.get(res.error_kind, 0) + 1
        self.dead_letters.append({
            "cache_key": res.cache_key, "model": res.model, "template_version": req.template_version,
            "error_kind": res.error_kind, "status": res.error_status, "error": (res.error or "")[:500],
            "attempts": res.attempts, "transient": res.transient, "time": time.time()})
        return res

    async def _cached(self, model: str, key: str, st: UsageStats | None = None) -> LLMResult | None:
        """The cached reply of ``key`` as a result (counted as a hit and a success), or None on a miss."""
        hit = await self.cache.get(key) if self.cache is not None else None
        if hit is None:
            return None
        st = st or self.stats
        st.cache_hits += 1
        st.succeeded += 1
        return LLMResult(ok=True, model=model, cache_key=key, text=hit["text"],
                         finish_reason=hit.get("finish_reason"), cached=True)

    def _succeed(self, res: LLMResult, template_version: str, n: int = 1, st: UsageStats | None = None,
                 **entry) -> None:
        """Account a reply (tokens, cost; ``n`` requests answered by it) and cache it (in the background:
        :meth:`ResponseCache.put_nowait`); ``entry`` adds fields to the cache entry."""
        st = st or self.stats
        self._account(res, st)
        st.succeeded += n
        if self.cache is not None:
            self.cache.put_nowait(res.cache_key, {"text": res.text, "finish_reason": res.finish_reason,
                                                 "model": res.model, "template_version": template_version,
                                                 "usage": {"prompt_tokens": res.prompt_tokens,
                                                           "completion_tokens": res.completion_tokens},
                                                 "time": time.time(), **entry})

    def _backoff(self, attempt: int) -> float:
        d = min(self.s.backoff_max_s, self.s.backoff_base_s * (2 ** (attempt - 1)))
        return d / 2 + random.random() * d / 2

    async def _wait_pause(self) -> None:
        while True:
            wait = self._pause_until - time.monotonic()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def complete(self, req: LLMRequest, stats: UsageStats | None = None) -> LLMResult:
        """Send one request (or answer it from the cache, or from an identical request in flight); never
        raises for API failures. ``stats``: count this request there instead of in ``self.stats`` (one
        client serving several shards, each with its own ``_stats``)."""
        st = stats or self.stats
        model, params, key = self._prepare(req)
        while (shared := self._inflight.get(key)) is not None:
            try:
                res = await asyncio.shield(shared)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if shared.cancelled() and not (task is not None and task.cancelling()):
                    continue  # the request we waited for was cancelled, not us: send it ourselves
                raise
            st.shared += 1
            res = dataclasses.replace(res, cached=False, shared=True)
            if res.ok:
                st.succeeded += 1
                return res
            return self._fail(res, req, st)
        # Registered before the first await (the cache lookup), so an identical request arriving while
        # this one looks up the cache waits for it instead of sending its own.
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            res = await self._complete(req, model, params, key, st)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(e)
                fut.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        else:
            fut.set_result(res)
            return res
        finally:
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    async def _complete(self, req: LLMRequest, model: str, params: dict, key: str, st: UsageStats) -> LLMResult:
        hit = await self._cached(model, key, st)
        if hit is not None:
            return hit
        body = chat_body(model, req.messages, params)
        est_tokens = _n_chars(req.messages) / 4 + body.get("max_tokens", 0) + 85 * _n_images(req.messages)
        res = LLMResult(ok=False, model=model, cache_key=key)
        for attempt in range(1, self.s.max_attempts + 1):
            res.attempts = attempt
            await self._wait_pause()
            if self._rpm:
                await self._rpm.acquire(1)
            if self._tpm:
                await self._tpm.acquire(est_tokens)
            try:
                async with self._sem:
                    st.requests += 1
                    # The plain POST of the openai client (same errors and timeouts as
                    # ``chat.completions.create``) without its per-call TypedDict transform of the
                    # messages (~1 ms of CPU per request: our messages are already plain API dicts) and
                    # without building the pydantic ChatCompletion (~0.3 ms): ``cast_to=object`` returns
                    # the reply's JSON as parsed, of which we read four fields. At hundreds of requests
                    # per second that CPU is the bottleneck.
                    resp = await self._api().post(
                        "/chat/completions", cast_to=object, body=body, options={"timeout": self.s.timeout_s})
                text, finish_reason, usage = completion_fields(resp)
            except PermanentInputError:
                raise
            except Exception as e:  # classified below; nothing escapes as a fake result
                kind, status, transient = classify(e)
                res.error_kind, res.error_status, res.error, res.transient = kind, status, f"{type(e).__name__}: {e}", transient
                if not transient or attempt == self.s.max_attempts:
                    return self._fail(res, req, st)
                ra = retry_after(e)
                if ra is not None:
                    delay = min(ra, self.s.retry_after_max_s)
                    # The server told everyone to wait: hold back all requests, not only this one.
                    self._pause_until = max(self._pause_until, time.monotonic() + delay)
                else:
                    delay = self._backoff(attempt)
                st.retries += 1
                log.debug("retry %d of %s after %s (%.3fs)", attempt, key[:12], kind, delay)
                await asyncio.sleep(delay)
                continue
            res.ok, res.text, res.finish_reason = True, text, finish_reason
            res.error_kind = res.error = res.error_status = None
            res.transient = False
            res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            res.completion_tokens = int(usage.get("completion_tokens") or 0)
            if self._tpm and usage:
                self._tpm.adjust(res.prompt_tokens + res.completion_tokens - est_tokens)
            self._succeed(res, req.template_version, st=st, response_model=resp.get("model"))
            return res
        raise AssertionError("unreachable")

    async def map(self, reqs: Iterable[LLMRequest]) -> list[LLMResult]:
        """All requests concurrently (bounded by ``concurrency``), results in input order."""
        reqs = list(reqs)
        if self.s.batch_api:
            return await self.run_batch(reqs)
        return list(await asyncio.gather(*(self.complete(r) for r in reqs)))

    async def run_batch(self, reqs: list[LLMRequest], stats: UsageStats | None = None) -> list[LLMResult]:
        """Answer ``reqs`` through the OpenAI Batch API (:func:`libcurate.llm.batch.run_batch`)."""
        return await batch.run_batch(self, reqs, stats)


def run_requests(settings: LLMSettings, store: Store | None, reqs: list[LLMRequest],
                 stats: UsageStats | None = None) -> tuple[list[LLMResult], list[dict]]:
    """Synchronous helper: (results in order, dead letters)."""
    async def go():
        async with LLMClient(settings, store, stats) as c:
            return await c.map(reqs), c.dead_letters

    return asyncio.run(go())
