"""The OpenAI Batch API path of :class:`~libcurate.llm.online.LLMClient` (``llm.batch_api``).

A shard's requests that the cache cannot answer go into one JSONL upload (one line per distinct cache key,
``custom_id`` = the key), one batch is created and polled, and the output and error files are mapped back
by ``custom_id``. The batch id is recorded in the store (``<cache_prefix>/_batches/<set id>.json``) so a
restarted pod resumes polling instead of submitting (and paying for) the same batch twice.

Failures are classified by :func:`~libcurate.llm.errors.classify_status`, the same classifier as the
online path. A line missing from both files is a transient ``batch_missing`` (a later batch can answer it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import TYPE_CHECKING

from .errors import LLMUnavailableError, classify_status
from .messages import LLMRequest, chat_body
from .results import LLMResult, UsageStats

if TYPE_CHECKING:
    from .online import LLMClient


def batch_line_result(line: dict | None, model: str, key: str) -> LLMResult:
    """The :class:`LLMResult` of one batch output/error line (``None``: the line is missing)."""
    res = LLMResult(ok=False, model=model, cache_key=key, attempts=1)
    if line is None:
        res.error_kind, res.error, res.transient = "batch_missing", "no line in the batch output", True
        return res
    resp = line.get("response") or {}
    status = resp.get("status_code")
    body = resp.get("body") or {}
    if not isinstance(status, int) or isinstance(status, bool):
        # No status at all: a malformed line; a later batch could answer the request.
        res.error_kind, res.transient = "bad_response", True
        res.error = json.dumps(line.get("error") or body)[:500]
        return res
    if status != 200:
        res.error_kind, res.transient = classify_status(status)
        res.error_status = status
        res.error = json.dumps(line.get("error") or (body.get("error") if isinstance(body, dict) else None)
                               or body)[:500]
        return res
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"]
        if text is None:
            raise ValueError("no content")
        usage = body.get("usage") or {}
        res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        res.completion_tokens = int(usage.get("completion_tokens") or 0)
    except (LookupError, TypeError, ValueError, AttributeError) as e:
        res.error_kind, res.error = "bad_response", f"{type(e).__name__}: {e}"[:500]
        res.prompt_tokens = res.completion_tokens = 0
        return res
    res.ok, res.text, res.finish_reason = True, text, choice.get("finish_reason")
    return res


async def run_batch(client: "LLMClient", reqs: list[LLMRequest], stats: UsageStats | None = None) -> list[LLMResult]:
    """Answer ``reqs`` through the Batch API (cache hits are not sent). Results in input order.

    Lines missing from the batch output, and lines in its error file, become failed results
    (``transient`` as :func:`~libcurate.llm.errors.classify_status` says, or for a missing line).
    """
    st = stats or client.stats
    prepared = [client._prepare(r) for r in reqs]
    results: list[LLMResult | None] = [None] * len(reqs)
    todo: dict[str, list[int]] = {}
    for i, (model, params, key) in enumerate(prepared):
        results[i] = await client._cached(model, key, st)
        if results[i] is None:
            todo.setdefault(key, []).append(i)
    if todo:
        answers = await _batch_roundtrip(client, todo, reqs, prepared, st)
        for key, idxs in todo.items():
            i0 = idxs[0]
            res = batch_line_result(answers.get(key), prepared[i0][0], key)
            if res.ok:
                client._succeed(res, reqs[i0].template_version, n=len(idxs), st=st, batch=True)
            else:
                client._fail(res, reqs[i0], st)
            for i in idxs:
                results[i] = res
    return results  # type: ignore[return-value]


async def _batch_roundtrip(client: "LLMClient", todo: dict[str, list[int]], reqs, prepared,
                           st: UsageStats) -> dict[str, dict]:
    s, store = client.s, client._store
    api = client._api()
    set_id = hashlib.sha256("\n".join(sorted(todo)).encode()).hexdigest()
    state_rel = f"{s.cache_prefix}/_batches/{set_id}.json"
    state = None
    if store is not None and store.exists(state_rel):
        state = json.loads(store.read_text(state_rel))
    if state is None:
        lines = []
        for key, idxs in todo.items():
            model, params, _ = prepared[idxs[0]]
            body = chat_body(model, reqs[idxs[0]].messages, params)
            lines.append(json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                                     "body": body}, ensure_ascii=False))
        data = ("\n".join(lines) + "\n").encode()
        st.requests += 1
        f = await api.files.create(file=(f"batch-{set_id[:12]}.jsonl", data, "application/jsonl"),
                                   purpose="batch")
        b = await api.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        state = {"batch_id": b.id, "input_file_id": f.id, "n": len(lines), "created": time.time()}
        if store is not None:
            store.write_text(state_rel, json.dumps(state))
    t0 = time.monotonic()
    while True:
        b = await api.batches.retrieve(state["batch_id"])
        if b.status in ("completed", "failed", "expired", "cancelled"):
            break
        if time.monotonic() - t0 > s.batch_timeout_s:
            raise LLMUnavailableError(f"batch {b.id} still {b.status} after {s.batch_timeout_s}s")
        await asyncio.sleep(s.batch_poll_s)
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
    if store is not None:
        # Finished: the next run of the same set must submit afresh for anything still missing.
        store.delete(state_rel)
    return answers
