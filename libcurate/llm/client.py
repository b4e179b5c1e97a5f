"""One client layer for every LLM judge and generator (DESIGN.md, "LLM calls").

* Any OpenAI-compatible endpoint through the ``openai`` package: hosted API, vLLM, SGLang, Ollama. The
  endpoint is ``LLMSettings.base_url`` or ``$OPENAI_BASE_URL``; the key is read from the environment
  variable named by ``api_key_env`` (default ``OPENAI_API_KEY``), never from the recipe. A local endpoint
  without a key gets the placeholder ``"EMPTY"`` (vLLM's convention).
* asyncio with bounded concurrency (a semaphore around in-flight requests) and token-bucket limiters for
  requests and tokens per minute.
* Retries with exponential backoff and jitter on 429, 5xx, timeouts and connection failures only; a 400,
  401, 403, 404, 422, or a reply that is not a chat completion, fails at once. ``Retry-After`` (and
  ``retry-after-ms``) is honoured and pauses every request of the client, not only the one that got it.
  The openai client's own retries are off (``max_retries=0``) so these are the only ones.
* A content-addressed response cache in the run's object store:
  ``<cache_prefix>/<aa>/<sha256>.json`` keyed by model, prompt-template version, the full messages (images
  by their sha256, never their base64) and every sampling parameter. Every pod shares it, so a re-run
  sends no request it has already made. Only successful HTTP replies are cached.
* Identical requests in flight at the same time share one: the first of a cache key sends, the others
  wait for its result (``UsageStats.shared``), so a shard with repeated prompts sends each once.
* A final failure is returned as an ``LLMResult(ok=False, ...)`` and appended to ``dead_letters``; the
  caller decides what to do with the sample. Nothing ever turns a failure into data.
* Tokens and cost (``price_*_per_1k``) accumulate in :class:`UsageStats`, which a stage puts into its
  ``_stats`` (``ShardOutput.extra``).
* :meth:`LLMClient.run_batch` uses the OpenAI Batch API for large offline jobs (JSONL upload, create,
  poll, map results back by ``custom_id``); the batch id is recorded in the store so a restarted pod
  resumes polling instead of submitting (and paying for) the same batch twice.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import email.utils
import hashlib
import io
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterable

from ..stage import PermanentInputError
from ..storage import Store

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Statuses that a retry can fix. 408 (request timeout) and 409 (conflict/lock) are what OpenAI itself
# retries besides 429/5xx; they are timeouts/transients in all but name.
TRANSIENT_STATUSES = {408, 409, 429}


class LLMUnavailableError(RuntimeError):
    """Too many requests of a shard failed for transient reasons; the shard is retryable (not done)."""


@dataclass
class LLMSettings:
    """Endpoint, limits, retries, sampling defaults, cost and cache of an LLM-backed stage.

    Attributes:
        model: model id sent to the endpoint (e.g. ``gpt-4o-mini``, a vLLM served name).
        base_url: endpoint ending in ``/v1``; ``None`` -> ``$OPENAI_BASE_URL`` -> the openai default.
        api_key_env: name of the environment variable that holds the key (the key itself never lives in a
            recipe).
        concurrency: requests in flight at once (per process).
        requests_per_minute / tokens_per_minute: token-bucket limits; 0 means unlimited. Tokens are
            estimated before a request (characters / 4 + ``max_tokens`` + 85 per image) and corrected with
            the reply's ``usage``.
        timeout_s: per-request timeout (connect + read).
        max_attempts: total attempts per request, first one included.
        backoff_base_s / backoff_max_s: exponential backoff ``base * 2**(attempt-1)`` capped at max, with
            "equal jitter" (a uniform draw in [d/2, d]).
        retry_after_max_s: cap on a server's ``Retry-After``.
        temperature / max_tokens / seed / top_p: sampling parameters (part of the cache key).
        structured_output: send ``response_format`` with a JSON schema where a stage has one (only for
            endpoints that support it: OpenAI, vLLM, SGLang).
        price_prompt_per_1k / price_completion_per_1k: USD per 1K tokens, for the cost in the stats.
        cache: use the response cache. cache_prefix: its location in the run's store.
        batch_api: send a shard's requests through the OpenAI Batch API instead of online calls.
        batch_poll_s / batch_timeout_s: polling period and give-up time of a batch.
        max_failed_fraction: fraction of a shard's samples whose calls may finally fail for transient
            reasons (429/5xx/timeouts after all attempts) before the shard is aborted as retryable
            (:class:`LLMUnavailableError`, no done marker; the cache makes the retry cheap). Up to it those
            samples are quarantined (``llm_call_failed``) and counted in ``_stats.llm.failed_samples``.
            Default 0.01: one sample that its endpoint always refuses does not stop a long run, an outage
            (most samples failing) still aborts the shard. Whatever the fraction, a shard tolerates one
            failed sample unless every sample failed, so small shards behave like large ones. Permanent
            failures (400...) are always quarantined.
    """

    # How fast and how robustly, not what: excluded from the stage's config hash (see StageConfig.hash_dict).
    UNHASHED: ClassVar[tuple[str, ...]] = (
        "concurrency", "requests_per_minute", "tokens_per_minute", "timeout_s", "max_attempts", "backoff_base_s",
        "backoff_max_s", "retry_after_max_s", "price_prompt_per_1k", "price_completion_per_1k", "batch_poll_s",
        "batch_timeout_s", "max_failed_fraction")

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    requests_per_minute: float = 0.0
    tokens_per_minute: float = 0.0
    timeout_s: float = 60.0
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0
    temperature: float = 0.0
    max_tokens: int = 512
    seed: int | None = None
    top_p: float | None = None
    structured_output: bool = False
    price_prompt_per_1k: float = 0.0
    price_completion_per_1k: float = 0.0
    cache: bool = True
    cache_prefix: str = "llm_cache"
    batch_api: bool = False
    batch_poll_s: float = 30.0
    batch_timeout_s: float = 86400.0
    max_failed_fraction: float = 0.01

    def __post_init__(self):
        if not self.model:
            raise ValueError("llm.model must be set")
        if self.concurrency < 1:
            raise ValueError("llm.concurrency must be >= 1")
        if self.max_attempts < 1:
            raise ValueError("llm.max_attempts must be >= 1")
        for name in ("requests_per_minute", "tokens_per_minute", "backoff_base_s", "backoff_max_s",
                     "retry_after_max_s", "price_prompt_per_1k", "price_completion_per_1k"):
            if getattr(self, name) < 0:
                raise ValueError(f"llm.{name} must be >= 0")
        if self.timeout_s <= 0 or self.batch_poll_s <= 0 or self.batch_timeout_s <= 0:
            raise ValueError("llm.timeout_s, batch_poll_s and batch_timeout_s must be > 0")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("llm.temperature must be in [0, 2]")
        if self.max_tokens < 1:
            raise ValueError("llm.max_tokens must be >= 1")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ValueError("llm.max_failed_fraction must be in [0, 1]")
        if not self.cache_prefix or self.cache_prefix.startswith("/") or ".." in self.cache_prefix:
            raise ValueError("llm.cache_prefix must be a relative path in the run's store")

    @classmethod
    def from_any(cls, v: "LLMSettings | dict | None") -> "LLMSettings":
        if isinstance(v, cls):
            return v
        d = dict(v or {})
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"llm: unknown setting(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def sampling(self) -> dict:
        p: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.seed is not None:
            p["seed"] = self.seed
        if self.top_p is not None:
            p["top_p"] = self.top_p
        return p


# -- messages ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePart:
    """An image inside a message. ``key_id`` identifies it in the cache key (sha256 plus any resize)."""

    data: bytes = field(repr=False)
    mime: str
    key_id: str
    detail: str = "auto"

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"


def image_part(data: bytes, fmt: str, sha256: str | None = None, max_side: int = 0, detail: str = "auto") -> ImagePart:
    """An :class:`ImagePart` from encoded bytes; ``max_side > 0`` downsizes (LANCZOS) to fit, as
    MMInstruct did for GPT-4V (fewer image tokens, same cache key on every machine)."""
    sha = sha256 or hashlib.sha256(data).hexdigest()
    mime = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}[fmt]
    if max_side > 0:
        from PIL import Image

        im = Image.open(io.BytesIO(data))
        if max(im.size) > max_side:
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            data, mime = buf.getvalue(), "image/jpeg"
    return ImagePart(data=data, mime=mime, key_id=f"sha256:{sha}@{max_side}", detail=detail)


def _content_api(content) -> Any:
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        if isinstance(p, ImagePart):
            parts.append({"type": "image_url", "image_url": {"url": p.data_url(), "detail": p.detail}})
        else:
            parts.append({"type": "text", "text": p})
    return parts


def _content_key(content) -> Any:
    if isinstance(content, str):
        return content
    return [{"image": p.key_id, "detail": p.detail} if isinstance(p, ImagePart) else {"text": p} for p in content]


def _n_images(messages: list[dict]) -> int:
    return sum(isinstance(p, ImagePart) for m in messages if not isinstance(m["content"], str) for p in m["content"])


def _n_chars(messages: list[dict]) -> int:
    n = 0
    for m in messages:
        c = m["content"]
        n += len(c) if isinstance(c, str) else sum(len(p) for p in c if isinstance(p, str))
    return n


@dataclass
class LLMRequest:
    """One chat request.

    Attributes:
        messages: ``[{"role": ..., "content": str | [str | ImagePart, ...]}]``.
        template_version: the prompt template's version (part of the cache key).
        model: overrides ``LLMSettings.model`` (several judges in one stage).
        params: sampling parameters merged over the settings' (``response_format``, ``temperature``...).
        variant: distinguishes deliberate repeats of the same prompt (ask k times) in the cache key.
    """

    messages: list[dict]
    template_version: str
    model: str | None = None
    params: dict = field(default_factory=dict)
    variant: int = 0


@dataclass
class LLMResult:
    """The outcome of one request after all attempts.

    ``ok`` is True when an HTTP reply with a message arrived (the text may still be unparseable: the
    caller's parser decides). ``error_kind`` is one of ``rate_limited``, ``server_error``, ``timeout``,
    ``connection``, ``client_error``, ``bad_response``; ``transient`` tells whether a later retry could help.
    """

    ok: bool
    model: str
    cache_key: str
    text: str | None = None
    finish_reason: str | None = None
    cached: bool = False
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_kind: str | None = None
    error_status: int | None = None
    error: str | None = None
    transient: bool = False
    shared: bool = False


@dataclass
class UsageStats:
    """Counters of one stage run (or one shard); ``as_extra()`` goes into the shard's ``_stats``."""

    requests: int = 0           # HTTP attempts sent
    cache_hits: int = 0
    shared: int = 0             # answered by an identical request already in flight (not sent)
    retries: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_transient: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    errors: dict = field(default_factory=dict)

    def as_extra(self) -> dict:
        d = asdict(self)
        d["cost_usd"] = round(d["cost_usd"], 6)
        return d


class TokenBucket:
    """Async token bucket: ``per_minute`` tokens refill continuously; capacity one second's worth (>= 1)."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.last = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now

    async def acquire(self, n: float = 1.0) -> None:
        n = min(n, self.capacity)
        # Holding the lock while waiting makes waiters FIFO: no request starves behind smaller ones.
        async with self._lock:
            while True:
                self._refill()
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)

    def adjust(self, delta: float) -> None:
        """Charge (positive) or refund (negative) tokens after the fact; may go negative (a debt)."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens - delta)


def cache_key(model: str, template_version: str, messages: list[dict], params: dict) -> str:
    blob = {"v": CACHE_FORMAT, "model": model, "template": template_version,
            "messages": [{"role": m["role"], "content": _content_key(m["content"])} for m in messages],
            "params": params}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def chat_body(model: str, messages: list[dict], params: dict) -> dict:
    """The JSON body of a chat completion request: API messages (images as data URLs) and the sampling
    parameters, without the ``_``-keys that only go into the cache key (``_variant``)."""
    return {"model": model, "messages": [{"role": m["role"], "content": _content_api(m["content"])} for m in messages],
            **{k: v for k, v in params.items() if not k.startswith("_")}}


def _retry_after(exc) -> float | None:
    resp = getattr(exc, "response", None)
    if resp is None:
        return None
    h = resp.headers
    try:
        if h.get("retry-after-ms"):
            return float(h["retry-after-ms"]) / 1000.0
        v = h.get("retry-after")
        if not v:
            return None
        try:
            return max(0.0, float(v))
        except ValueError:
            dt = email.utils.parsedate_to_datetime(v)
            return max(0.0, dt.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def classify(exc: BaseException) -> tuple[str, int | None, bool]:
    """(error_kind, HTTP status or None, transient?) of an exception raised by the openai client."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None, True
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None, True
    if isinstance(exc, openai.APIStatusError):
        s = exc.status_code
        if s == 429:
            return "rate_limited", s, True
        if s >= 500:
            return "server_error", s, True
        if s in TRANSIENT_STATUSES:
            return "timeout" if s == 408 else "conflict", s, True
        return "client_error", s, False
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", None, True
    # APIResponseValidationError, JSON decode errors of a 200 body, an empty choices list ...
    return "bad_response", None, False


def _chat_completion_type():
    from openai.types.chat import ChatCompletion

    return ChatCompletion


class ResponseCache:
    """``<prefix>/<aa>/<key>.json`` in a :class:`Store`; I/O runs in a thread pool (S3 calls block)."""

    def __init__(self, store: Store, prefix: str, executor: concurrent.futures.Executor):
        self.store, self.prefix, self.executor = store, prefix.strip("/"), executor

    def rel(self, key: str) -> str:
        return f"{self.prefix}/{key[:2]}/{key}.json"

    def _get(self, key: str) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self.rel(key)))
        except (FileNotFoundError, KeyError):
            return None
        except ValueError:
            return None  # a corrupt entry is a miss; it will be overwritten

    async def get(self, key: str) -> dict | None:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._get, key)

    async def put(self, key: str, entry: dict) -> None:
        data = json.dumps(entry, sort_keys=True, ensure_ascii=False).encode()
        await asyncio.get_running_loop().run_in_executor(self.executor, self.store.write_bytes, self.rel(key), data)


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
        self._clients: list = []
        self._next_slot = 0
        self._inflight: dict[str, asyncio.Future] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    # httpcore's pool checks every pooled connection (a poll() and getpeername() each) whenever it assigns
    # a request, so one pool of 64 connections costs O(64) syscalls per request and caps a 2-core client
    # near 150 req/s. Several small pools (one openai client each, <= CONNS_PER_POOL connections in use)
    # make that cost constant.
    CONNS_PER_POOL = 8

    def _api(self, slot: int = 0):
        """An openai client, created on first use so a fully cached run needs neither key nor endpoint."""
        if not self._clients:
            import openai

            base_url = self.s.base_url or os.environ.get("OPENAI_BASE_URL") or None
            key = os.environ.get(self.s.api_key_env)
            if not key:
                if base_url is None:
                    raise PermanentInputError(
                        f"no API key: set ${self.s.api_key_env} (or llm.base_url for a keyless local endpoint)")
                key = "EMPTY"
            n = max(1, -(-self.s.concurrency // self.CONNS_PER_POOL))
            self._clients = [openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0,
                                                timeout=self.s.timeout_s) for _ in range(n)]
        return self._clients[slot % len(self._clients)]

    async def __aenter__(self) -> "LLMClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for c in self._clients:
            await c.close()
        self._clients = []
        self._executor.shutdown(wait=True)

    # -- one request -------------------------------------------------------------------------
    def _prepare(self, req: LLMRequest) -> tuple[str, dict, str]:
        model = req.model or self.s.model
        params = {**self.s.sampling(), **req.params}
        if req.variant:
            params["_variant"] = req.variant   # key only; stripped before sending
        return model, params, cache_key(model, req.template_version, req.messages, params)

    def _account(self, res: LLMResult) -> None:
        st = self.stats
        st.prompt_tokens += res.prompt_tokens
        st.completion_tokens += res.completion_tokens
        st.cost_usd += (res.prompt_tokens * self.s.price_prompt_per_1k
                        + res.completion_tokens * self.s.price_completion_per_1k) / 1000.0

    def _fail(self, res: LLMResult, req: LLMRequest) -> LLMResult:
        self.stats.failed += 1
        self.stats.failed_transient += int(res.transient)
        self.stats.errors[res.error_kind] = self.stats.errors.get(res.error_kind, 0) + 1
        self.dead_letters.append({
            "cache_key": res.cache_key, "model": res.model, "template_version": req.template_version,
            "error_kind": res.error_kind, "status": res.error_status, "error": (res.error or "")[:500],
            "attempts": res.attempts, "transient": res.transient, "time": time.time()})
        return res

    async def _cached(self, model: str, key: str) -> LLMResult | None:
        """The cached reply of ``key`` as a result (counted as a hit and a success), or None on a miss."""
        hit = await self.cache.get(key) if self.cache is not None else None
        if hit is None:
            return None
        self.stats.cache_hits += 1
        self.stats.succeeded += 1
        return LLMResult(ok=True, model=model, cache_key=key, text=hit["text"],
                         finish_reason=hit.get("finish_reason"), cached=True)

    async def _succeed(self, res: LLMResult, template_version: str, n: int = 1, **entry) -> None:
        """Account a reply (tokens, cost; ``n`` requests answered by it) and cache it; ``entry`` adds fields
        to the cache entry."""
        self._account(res)
        self.stats.succeeded += n
        if self.cache is not None:
            await self.cache.put(res.cache_key, {"text": res.text, "finish_reason": res.finish_reason,
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

    async def complete(self, req: LLMRequest) -> LLMResult:
        """Send one request (or answer it from the cache, or from an identical request in flight); never
        raises for API failures."""
        model, params, key = self._prepare(req)
        while (shared := self._inflight.get(key)) is not None:
            try:
                res = await asyncio.shield(shared)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if shared.cancelled() and not (task is not None and task.cancelling()):
                    continue  # the request we waited for was cancelled, not us: send it ourselves
                raise
            self.stats.shared += 1
            res = dataclasses.replace(res, cached=False, shared=True)
            if res.ok:
                self.stats.succeeded += 1
                return res
            return self._fail(res, req)
        # Registered before the first await (the cache lookup), so an identical request arriving while
        # this one looks up the cache waits for it instead of sending its own.
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            res = await self._complete(req, model, params, key)
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

    async def _complete(self, req: LLMRequest, model: str, params: dict, key: str) -> LLMResult:
        hit = await self._cached(model, key)
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
                    self.stats.requests += 1
                    self._next_slot += 1
                    # The plain POST of the openai client (same errors, timeouts and response model as
                    # ``chat.completions.create``) without its per-call TypedDict transform of the
                    # messages, which costs ~1 ms of CPU per request: our messages are already plain
                    # API dicts, and at hundreds of requests per second that CPU is the bottleneck.
                    resp = await self._api(self._next_slot).post(
                        "/chat/completions", cast_to=_chat_completion_type(),
                        body=body,
                        options={"timeout": self.s.timeout_s})
                choice = resp.choices[0]
                text = choice.message.content
                if text is None:
                    raise ValueError("reply has no message content")
            except PermanentInputError:
                raise
            except Exception as e:  # classified below; nothing escapes as a fake result
                kind, status, transient = classify(e)
                res.error_kind, res.error_status, res.error, res.transient = kind, status, f"{type(e).__name__}: {e}", transient
                if not transient or attempt == self.s.max_attempts:
                    return self._fail(res, req)
                ra = _retry_after(e)
                if ra is not None:
                    delay = min(ra, self.s.retry_after_max_s)
                    # The server told everyone to wait: hold back all requests, not only this one.
                    self._pause_until = max(self._pause_until, time.monotonic() + delay)
                else:
                    delay = self._backoff(attempt)
                self.stats.retries += 1
                log.debug("retry %d of %s after %s (%.3fs)", attempt, key[:12], kind, delay)
                await asyncio.sleep(delay)
                continue
            usage = getattr(resp, "usage", None)
            res.ok, res.text, res.finish_reason = True, text, choice.finish_reason
            res.error_kind = res.error = res.error_status = None
            res.transient = False
            res.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            res.completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            if self._tpm and usage is not None:
                self._tpm.adjust(res.prompt_tokens + res.completion_tokens - est_tokens)
            await self._succeed(res, req.template_version, response_model=getattr(resp, "model", None))
            return res
        raise AssertionError("unreachable")

    async def map(self, reqs: Iterable[LLMRequest]) -> list[LLMResult]:
        """All requests concurrently (bounded by ``concurrency``), results in input order."""
        reqs = list(reqs)
        if self.s.batch_api:
            return await self.run_batch(reqs)
        return list(await asyncio.gather(*(self.complete(r) for r in reqs)))

    # -- Batch API ---------------------------------------------------------------------------
    async def run_batch(self, reqs: list[LLMRequest]) -> list[LLMResult]:
        """Answer ``reqs`` through the Batch API (cache hits are not sent). Results in input order.

        Lines missing from the batch output, and lines in its error file, become failed results
        (``transient`` for 429/5xx/missing, as a later batch could answer them).
        """
        prepared = [self._prepare(r) for r in reqs]
        results: list[LLMResult | None] = [None] * len(reqs)
        todo: dict[str, list[int]] = {}
        for i, (model, params, key) in enumerate(prepared):
            results[i] = await self._cached(model, key)
            if results[i] is None:
                todo.setdefault(key, []).append(i)
        if todo:
            answers = await self._batch_roundtrip(todo, reqs, prepared)
            for key, idxs in todo.items():
                i0 = idxs[0]
                model = prepared[i0][0]
                line = answers.get(key)
                res = LLMResult(ok=False, model=model, cache_key=key, attempts=1)
                if line is None:
                    res.error_kind, res.error, res.transient = "batch_missing", "no line in the batch output", True
                else:
                    resp = line.get("response") or {}
                    status = resp.get("status_code")
                    body = resp.get("body") or {}
                    try:
                        if status != 200:
                            raise LookupError(status)
                        choice = body["choices"][0]
                        text = choice["message"]["content"]
                        if text is None:
                            raise ValueError("no content")
                        res.ok, res.text, res.finish_reason = True, text, choice.get("finish_reason")
                        usage = body.get("usage") or {}
                        res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        res.completion_tokens = int(usage.get("completion_tokens") or 0)
                    except LookupError:
                        st = status if isinstance(status, int) else None
                        transient = st is None or st == 429 or st >= 500 or st in TRANSIENT_STATUSES
                        res.error_kind = "rate_limited" if st == 429 else ("server_error" if (st or 0) >= 500 else
                                                                          ("client_error" if st else "bad_response"))
                        res.error_status, res.transient = st, transient
                        res.error = json.dumps(line.get("error") or body.get("error") or body)[:500]
                    except (KeyError, TypeError, ValueError) as e:
                        res.error_kind, res.error = "bad_response", repr(e)
                if res.ok:
                    await self._succeed(res, reqs[i0].template_version, n=len(idxs), batch=True)
                else:
                    self._fail(res, reqs[i0])
                for i in idxs:
                    results[i] = res
        return results  # type: ignore[return-value]

    async def _batch_roundtrip(self, todo: dict[str, list[int]], reqs, prepared) -> dict[str, dict]:
        api = self._api()
        set_id = hashlib.sha256("\n".join(sorted(todo)).encode()).hexdigest()
        state_rel = f"{self.s.cache_prefix}/_batches/{set_id}.json"
        state = None
        if self._store is not None and self._store.exists(state_rel):
            state = json.loads(self._store.read_text(state_rel))
        if state is None:
            lines = []
            for key, idxs in todo.items():
                model, params, _ = prepared[idxs[0]]
                body = chat_body(model, reqs[idxs[0]].messages, params)
                lines.append(json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                                         "body": body}, ensure_ascii=False))
            data = ("\n".join(lines) + "\n").encode()
            self.stats.requests += 1
            f = await api.files.create(file=(f"batch-{set_id[:12]}.jsonl", data, "application/jsonl"),
                                       purpose="batch")
            b = await api.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                         completion_window="24h")
            state = {"batch_id": b.id, "input_file_id": f.id, "n": len(lines), "created": time.time()}
            if self._store is not None:
                self._store.write_text(state_rel, json.dumps(state))
        t0 = time.monotonic()
        while True:
            b = await api.batches.retrieve(state["batch_id"])
            if b.status in ("completed", "failed", "expired", "cancelled"):
                break
            if time.monotonic() - t0 > self.s.batch_timeout_s:
                raise LLMUnavailableError(f"batch {b.id} still {b.status} after {self.s.batch_timeout_s}s")
            await asyncio.sleep(self.s.batch_poll_s)
        answers: dict[str, dict] = {}
        for fid in (b.error_file_id, b.output_file_id):  # output last: a success wins
            if not fid:
                continue
            content = await api.files.content(fid)
            text = content.text if hasattr(content, "text") else content.read().decode()
            for line in text.splitlines():
                if line.strip():
                    row = json.loads(line)
                    answers[row["custom_id"]] = row
        if self._store is not None:
            # Finished: the next run of the same set must submit afresh for anything still missing.
            self._store.delete(state_rel)
        return answers


def run_requests(settings: LLMSettings, store: Store | None, reqs: list[LLMRequest],
                 stats: UsageStats | None = None) -> tuple[list[LLMResult], list[dict]]:
    """Synchronous helper: (results in order, dead letters)."""
    async def go():
        async with LLMClient(settings, store, stats) as c:
            return await c.map(reqs), c.dead_letters

    return asyncio.run(go())
