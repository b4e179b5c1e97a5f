"""Re-ask on a parse failure: when a reply cannot be parsed, ask again (bounded) with the reply and the
reason it failed, so a judge that wrapped its score in prose gets one more chance instead of costing the
sample.

:class:`ReaskingClient` wraps the stage's :class:`~libcurate.llm.online.LLMClient` (same ``complete``
signature). A follow-up request is the original conversation plus the unparseable reply as the
assistant's turn and a user turn naming the failure and restating the reply format; it goes through the
same client, so it is cached, rate-limited and counted like any other request (a cached re-run re-asks
nothing). Each re-ask adds one to ``UsageStats.reasks`` (``_stats.llm.reasks``), and the final
:class:`~libcurate.llm.results.LLMResult` carries ``reasks``: one ``{"raw", "reason"}`` per reply that
failed before it, which the stage stores in its sidecar. At most ``max_reasks`` follow-ups per request.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .messages import LLMRequest
from .results import LLMResult, UsageStats

RAW_MAX = 2000
MAX_REASKS = 3


def followup(req: LLMRequest, reply: str, reason: str, instruction: str) -> LLMRequest:
    """The re-ask request: ``req``'s messages, the failed reply, then what was wrong and what to send."""
    msgs = list(req.messages) + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": f"Your reply could not be read ({reason}). {instruction}"}]
    return LLMRequest(msgs, req.template_version, model=req.model, params=dict(req.params), variant=req.variant)


class ReaskingClient:
    """An LLM client that re-asks up to ``max_reasks`` times when ``why_unparsed(text)`` names a failure.

    Args:
        client: the wrapped client (``await client.complete(req, stats)``).
        why_unparsed: ``text -> None`` when the reply parses, else a short reason.
        instruction: the reply-format instruction restated in the follow-up.
        max_reasks: follow-ups per request (0 turns re-asking off).
    """

    def __init__(self, client, why_unparsed: Callable[[str | None], str | None], instruction: str,
                 max_reasks: int):
        if not 0 <= max_reasks <= MAX_REASKS:
            raise ValueError(f"reask must be in [0, {MAX_REASKS}]")
        self.client = client
        self.why_unparsed = why_unparsed
        self.instruction = instruction
        self.max_reasks = max_reasks

    async def complete(self, req: LLMRequest, stats: UsageStats | None = None) -> LLMResult:
        res = await self.client.complete(req, stats)
        history: list[dict] = []
        cur = req
        for _ in range(self.max_reasks):
            if not res.ok:
                break
            why = self.why_unparsed(res.text)
            if why is None:
                break
            history.append({"raw": (res.text or "")[:RAW_MAX], "reason": why})
            cur = followup(cur, res.text or "", why, self.instruction)
            if stats is not None:
                stats.reasks += 1
            res = await self.client.complete(cur, stats)
        return dataclasses.replace(res, reasks=history) if history else res
