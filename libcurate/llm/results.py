"""What a request comes back as (:class:`LLMResult`) and what a run counts (:class:`UsageStats`).

Shared by the online client and the Batch API path, so a stage reads both the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    reasks: list = field(default_factory=list)  # replies that failed to parse before this one (llm.reask)


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
    reasks: int = 0             # follow-up requests sent after an unparseable reply (llm.reask)
    unpriced_requests: int = 0  # replies of a model without a known price (llm.cost): cost_usd leaves them out

    def as_extra(self) -> dict:
        d = asdict(self)
        d["cost_usd"] = round(d["cost_usd"], 6)
        return d
