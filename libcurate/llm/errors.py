"""What a failed LLM call was, and whether a retry can fix it: ONE classifier for every path.

:func:`classify_status` maps an HTTP status to ``(error_kind, transient)``. The online client uses it
through :func:`classify` (an exception of the ``openai`` client) and the Batch API path uses it directly on
each output line's ``status_code``, so the same status is the same kind of failure on both paths (a 408 is
a transient ``timeout`` either way).

Transient (retried online; a later batch or run may answer it): 429 (``rate_limited``), 5xx
(``server_error``), 408 (``timeout``), 409 (``conflict``), timeouts and connection failures. Everything else
fails at once: other 4xx (``client_error``), and a reply that is not a chat completion (``bad_response``).
"""

from __future__ import annotations

import asyncio
import email.utils
import time

# Statuses that a retry can fix besides 429/5xx: 408 (request timeout) and 409 (conflict/lock) are what
# OpenAI itself retries; they are timeouts/transients in all but name.
TRANSIENT_STATUSES = {408, 409, 429}


class LLMUnavailableError(RuntimeError):
    """Too many requests of a shard failed for transient reasons; the shard is retryable (not done)."""


def classify_status(status: int) -> tuple[str, bool]:
    """``(error_kind, transient?)`` of a non-success HTTP status."""
    if status == 429:
        return "rate_limited", True
    if status >= 500:
        return "server_error", True
    if status == 408:
        return "timeout", True
    if status == 409:
        return "conflict", True
    if 400 <= status < 500:
        return "client_error", False
    return "bad_response", False  # 1xx/2xx/3xx without a usable completion


def classify(exc: BaseException) -> tuple[str, int | None, bool]:
    """(error_kind, HTTP status or None, transient?) of an exception raised by the openai client."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None, True
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None, True
    if isinstance(exc, openai.APIStatusError):
        kind, transient = classify_status(exc.status_code)
        return kind, exc.status_code, transient
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", None, True
    # APIResponseValidationError, JSON decode errors of a 200 body, an empty choices list ...
    return "bad_response", None, False


def retry_after(exc) -> float | None:
    """Seconds a server asked us to wait (``retry-after-ms`` or ``Retry-After``, seconds or HTTP date)."""
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
