"""``LLMSettings``: endpoint, limits, retries, sampling defaults, cost and cache of an LLM-backed stage.

What a recipe's ``llm:`` block parses into; validated once at config time so a bad value fails before any
request is sent. The fields in ``UNHASHED`` change how fast or how robustly a stage runs, not what it
produces, so they are left out of the stage's config hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class LLMSettings:
    """Endpoint, limits, retries, sampling defaults, cost and cache of an LLM-backed stage.

    Attributes:
        model: model id sent to the endpoint (e.g. ``gpt-4o-mini``, a vLLM served name).
        base_url: endpoint ending in ``/v1``; ``None`` -> ``$OPENAI_BASE_URL`` -> the openai default.
        api_key_env: name of the environment variable that holds the key (the key itself never lives in a
            recipe).
        concurrency: requests in flight at once, per process; an LLM stage runs all the shards of a run
            (or of one Argo pod) in one process and one event loop, so this is its whole window.
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
        price_prompt_per_1k / price_completion_per_1k: USD per 1K tokens, for the cost in the stats; when
            both are 0 (the default) the price comes from ``prices`` or the dated table in
            :mod:`libcurate.llm.cost` (a model in neither: cost unknown, ``unpriced_requests`` counted).
        prices: ``model -> {input_per_1m, output_per_1m}`` overrides (the recipe's top-level ``prices:`` is
            merged in under them at plan time).
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
        "batch_timeout_s", "max_failed_fraction", "prices")

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
    prices: dict = field(default_factory=dict)

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
        from .cost import parse_prices

        self.prices = parse_prices(self.prices)
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
