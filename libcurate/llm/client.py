"""The public face of the LLM client layer: one import for every LLM judge and generator.

The layer is split by concern (DESIGN.md, "LLM calls"); this module re-exports its public names so
``from libcurate.llm.client import ...`` keeps working:

* :mod:`.settings` — :class:`LLMSettings` (endpoint, limits, retries, sampling, cost, cache);
* :mod:`.messages` — :class:`ImagePart`, :func:`image_part`, :class:`LLMRequest`, the API body
  (:func:`chat_body`) and the cache key (:func:`cache_key`);
* :mod:`.results` — :class:`LLMResult`, :class:`UsageStats`;
* :mod:`.ratelimit` — :class:`TokenBucket`;
* :mod:`.errors` — the one status classifier (:func:`classify_status`, :func:`classify`),
  ``Retry-After``, :class:`LLMUnavailableError`;
* :mod:`.cache` — :class:`ResponseCache`;
* :mod:`.online` — :class:`LLMClient`, :func:`run_requests`;
* :mod:`.batch` — the OpenAI Batch API path (:meth:`LLMClient.run_batch`).
"""

from __future__ import annotations

from .cache import ResponseCache
from .errors import TRANSIENT_STATUSES, LLMUnavailableError, classify, classify_status, retry_after
from .messages import CACHE_FORMAT, ImagePart, LLMRequest, cache_key, chat_body, image_part
from .online import LLMClient, run_requests
from .ratelimit import TokenBucket
from .results import LLMResult, UsageStats
from .settings import LLMSettings

__all__ = [
    "CACHE_FORMAT", "TRANSIENT_STATUSES", "ImagePart", "LLMClient", "LLMRequest", "LLMResult", "LLMSettings",
    "LLMUnavailableError", "ResponseCache", "TokenBucket", "UsageStats", "cache_key", "chat_body", "classify",
    "classify_status", "image_part", "retry_after", "run_requests",
]
