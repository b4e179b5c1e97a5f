"""The LLM client against the fake OpenAI-compatible server: real HTTP, the real ``openai`` client."""

from __future__ import annotations

import time

import pytest

from libcurate.llm.client import LLMRequest, LLMSettings, cache_key, image_part, run_requests
from libcurate.llm.testing import Error, FakeOpenAIServer, Malformed, Reply, Sleep
from libcurate.storage import open_store


@pytest.fixture
def server():
    with FakeOpenAIServer(default_text="42") as s:
        yield s


def settings(server, **kw) -> LLMSettings:
    d = dict(model="m", base_url=server.base_url, backoff_base_s=0.005, backoff_max_s=0.02, timeout_s=1.0,
             max_attempts=4, cache=False)
    d.update(kw)
    return LLMSettings(**d)


def req(text="hello", **kw) -> LLMRequest:
    return LLMRequest([{"role": "user", "content": text}], "tpl@1", **kw)


@pytest.mark.parametrize("action,kind", [
    (Error(429), "rate_limited"), (Error(500), "server_error"), (Error(503), "server_error"),
    (Sleep(1.5), "timeout")])
def test_transient_errors_are_retried(server, action, kind):
    server.script(action, Reply("7"))
    (res,), dead = run_requests(settings(server, timeout_s=0.3), None, [req()])
    assert res.ok and res.text == "7" and res.attempts == 2
    assert server.count == 2 and dead == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(server, status):
    server.script(Error(status))
    (res,), dead = run_requests(settings(server), None, [req()])
    assert not res.ok and res.error_kind == "client_error" and res.error_status == status
    assert not res.transient and res.attempts == 1 and server.count == 1
    assert len(dead) == 1 and dead[0]["status"] == status


@pytest.mark.parametrize("body", ['{"id": "x", "choices": ', '{"foo": 1}', "not json"])
def test_malformed_replies_fail_without_retry(server, body):
    server.script(Malformed(body))
    (res,), dead = run_requests(settings(server), None, [req()])
    assert not res.ok and res.error_kind == "bad_response" and res.attempts == 1 and server.count == 1
    assert res.text is None  # nothing is made up


def test_max_attempts_then_dead_letter(server):
    server.script(*[Error(500)] * 10)
    (res,), dead = run_requests(settings(server, max_attempts=3), None, [req()])
    assert not res.ok and res.transient and res.attempts == 3 and server.count == 3
    assert dead[0]["error_kind"] == "server_error" and dead[0]["attempts"] == 3


def test_retry_after_is_honoured(server):
    server.script(Error(429, retry_after=0.4), Reply("1"))
    t0 = time.monotonic()
    (res,), _ = run_requests(settings(server, backoff_base_s=0.001), None, [req()])
    assert res.ok and time.monotonic() - t0 >= 0.38


def test_retry_after_is_capped(server):
    server.script(Error(429, retry_after=30), Reply("1"))
    t0 = time.monotonic()
    (res,), _ = run_requests(settings(server, retry_after_max_s=0.05), None, [req()])
    assert res.ok and time.monotonic() - t0 < 5


def test_truncated_reply_is_returned_with_its_finish_reason(server):
    server.script(Reply("8", finish_reason="length"))
    (res,), _ = run_requests(settings(server), None, [req()])
    assert res.ok and res.finish_reason == "length" and res.attempts == 1


def test_cache_rerun_sends_nothing(server, tmp_path):
    store = open_store(str(tmp_path / "run"))
    s = settings(server, cache=True, price_prompt_per_1k=1.0, price_completion_per_1k=2.0)
    reqs = [req(f"q{i}") for i in range(20)]
    from libcurate.llm.client import UsageStats

    st1 = UsageStats()
    r1, _ = run_requests(s, store, reqs, st1)
    assert server.count == 20 and st1.cache_hits == 0 and st1.cost_usd > 0
    assert len(store.list("llm_cache")) == 20
    st2 = UsageStats()
    r2, _ = run_requests(s, store, reqs, st2)
    assert server.count == 20, "a re-run must not send a request it already made"
    assert st2.cache_hits == 20 and st2.requests == 0 and st2.cost_usd == 0
    assert [r.text for r in r1] == [r.text for r in r2] and all(r.cached for r in r2)


def test_failures_are_not_cached(server, tmp_path):
    store = open_store(str(tmp_path / "run"))
    server.script(Error(400))
    run_requests(settings(server, cache=True), store, [req()])
    assert store.list("llm_cache") == []
    (res,), _ = run_requests(settings(server, cache=True), store, [req()])
    assert res.ok and server.count == 2


def test_cache_key_uses_image_hash_and_all_params(photos):
    import io

    buf = io.BytesIO()
    photos["coffee"].save(buf, format="JPEG")
    im = image_part(buf.getvalue(), "jpeg")
    msgs = [{"role": "user", "content": [im, "rate"]}]
    k = cache_key("m", "t@1", msgs, {"temperature": 0})
    assert k == cache_key("m", "t@1", [{"role": "user", "content": [image_part(buf.getvalue(), "jpeg"), "rate"]}],
                          {"temperature": 0})
    assert k != cache_key("m", "t@2", msgs, {"temperature": 0})
    assert k != cache_key("m2", "t@1", msgs, {"temperature": 0})
    assert k != cache_key("m", "t@1", msgs, {"temperature": 0.5})
    assert k != cache_key("m", "t@1", [{"role": "user", "content": [image_part(buf.getvalue(), "jpeg", max_side=16), "rate"]}],
                          {"temperature": 0})
    assert im.data_url().startswith("data:image/jpeg;base64,")


def test_image_is_sent_as_data_url(server, photos):
    import io

    buf = io.BytesIO()
    photos["rocket"].save(buf, format="PNG")
    r = LLMRequest([{"role": "user", "content": [image_part(buf.getvalue(), "png", max_side=32), "describe"]}], "t")
    (res,), _ = run_requests(settings(server), None, [r])
    parts = server.requests[0]["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert parts[1] == {"type": "text", "text": "describe"}


def test_concurrency_is_bounded(server):
    server.responder = lambda body: Reply("1", delay_s=0.05)
    t0 = time.monotonic()
    results, _ = run_requests(settings(server, concurrency=4), None, [req(f"x{i}") for i in range(16)])
    elapsed = time.monotonic() - t0
    assert all(r.ok for r in results)
    # 16 requests of >= 50 ms with 4 in flight take >= 4 rounds; unbounded they would take one
    assert elapsed >= 0.19


def test_requests_per_minute_limit(server):
    t0 = time.monotonic()
    results, _ = run_requests(settings(server, requests_per_minute=600), None, [req(f"x{i}") for i in range(15)])
    # 10 per second, bucket of 10: 15 requests need >= 0.5 s
    assert all(r.ok for r in results) and time.monotonic() - t0 >= 0.45


def test_tokens_per_minute_limit(server):
    t0 = time.monotonic()
    s = settings(server, tokens_per_minute=60 * 400, max_tokens=100)
    results, _ = run_requests(s, None, [req("x" * 400) for _ in range(1)] + [req(f"{i}" + "y" * 400) for i in range(5)])
    # ~200 estimated tokens each, 400 tokens per second: 6 requests need >= ~2 s of budget minus the burst
    assert all(r.ok for r in results) and time.monotonic() - t0 >= 1.0


def test_missing_key_without_endpoint_is_a_permanent_error(monkeypatch):
    from libcurate.stage import PermanentInputError

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(PermanentInputError):
        run_requests(LLMSettings(model="m", cache=False), None, [req()])


def test_settings_validation():
    with pytest.raises(ValueError):
        LLMSettings(concurrency=0)
    with pytest.raises(ValueError):
        LLMSettings(max_attempts=0)
    with pytest.raises(ValueError):
        LLMSettings.from_any({"modle": "x"})


def test_batch_api_roundtrip_and_cache(server, tmp_path):
    store = open_store(str(tmp_path / "run"))
    s = settings(server, cache=True, batch_api=True, batch_poll_s=0.01)
    server.responder = lambda body: Reply("B:" + body["messages"][0]["content"])
    reqs = [req(f"q{i}") for i in range(5)] + [req("q0")]
    results, dead = run_requests(s, store, reqs)
    assert [r.text for r in results] == [f"B:q{i}" for i in range(5)] + ["B:q0"]
    assert server.batch_lines == 5 and server.count == 0 and dead == []
    assert not store.list("llm_cache/_batches")
    results2, _ = run_requests(s, store, reqs)
    assert server.batch_lines == 5 and [r.text for r in results2] == [r.text for r in results]


def test_batch_api_errors_become_failures(server, tmp_path):
    store = open_store(str(tmp_path / "run"))
    s = settings(server, cache=True, batch_api=True, batch_poll_s=0.01)
    server.script(Reply("ok"), Error(400), Sleep(0))  # third line goes missing from the output
    results, dead = run_requests(s, store, [req("a"), req("b"), req("c")])
    assert results[0].ok and results[0].text == "ok"
    assert not results[1].ok and results[1].error_status == 400 and not results[1].transient
    assert not results[2].ok and results[2].error_kind == "batch_missing" and results[2].transient
    assert len(dead) == 2


@pytest.mark.parametrize("batch", [False, True])
def test_cache_entry_and_success_counts(server, tmp_path, batch):
    import json

    from libcurate.llm.client import UsageStats

    store = open_store(str(tmp_path / "run"))
    s = settings(server, cache=True, batch_api=batch, batch_poll_s=0.01, price_prompt_per_1k=1.0)
    reqs = [req("q0"), req("q1"), req("q0", variant=1)] + ([req("q0")] if batch else [])
    st = UsageStats()
    results, _ = run_requests(s, store, reqs, st)
    assert all(r.ok and not r.cached for r in results) and st.succeeded == len(reqs) and st.cost_usd > 0
    entry = json.loads(store.read_text(f"llm_cache/{results[0].cache_key[:2]}/{results[0].cache_key}.json"))
    assert entry["text"] == "42" and entry["model"] == "m" and entry["template_version"] == "tpl@1"
    assert entry["finish_reason"] == "stop" and entry["usage"]["prompt_tokens"] == results[0].prompt_tokens > 0
    assert entry.get("batch") is (True if batch else None) and ("response_model" in entry) is (not batch)
    # the cache-only variant key is never sent
    sent = server.requests if not batch else []
    assert all("_variant" not in b for b in sent) and len({r.cache_key for r in results}) == 3
    st2 = UsageStats()
    again, _ = run_requests(s, store, reqs, st2)
    assert st2.cache_hits == st2.succeeded == len(reqs) and all(r.cached for r in again)
    assert [r.text for r in again] == [r.text for r in results]


STATUSES = [400, 401, 403, 404, 408, 409, 422, 429, 500, 502, 503]


def test_online_and_batch_classify_every_status_the_same_way(server, tmp_path):
    """One status classifier: a status is the same error kind and transience online and in a batch."""
    online = {}
    for st in STATUSES:
        server.script(Error(st))
        (res,), _ = run_requests(settings(server, max_attempts=1), None, [req(f"on{st}")])
        online[st] = (res.ok, res.error_kind, res.error_status, res.transient)
    server.script(*[Error(st) for st in STATUSES])
    s = settings(server, batch_api=True, batch_poll_s=0.01)
    results, dead = run_requests(s, open_store(str(tmp_path / "run")), [req(f"b{st}") for st in STATUSES])
    batch = {st: (r.ok, r.error_kind, r.error_status, r.transient) for st, r in zip(STATUSES, results)}
    assert batch == online and len(dead) == len(STATUSES)
    assert online[408] == (False, "timeout", 408, True) and online[409][3] and online[429][3]
    assert online[404] == (False, "client_error", 404, False) and online[500] == (False, "server_error", 500, True)


def test_batch_line_that_is_not_a_completion_is_a_bad_response():
    from libcurate.llm.batch import batch_line_result

    r = batch_line_result({"custom_id": "k", "response": {"status_code": 200, "body": {"foo": 1}}}, "m", "k")
    assert not r.ok and r.error_kind == "bad_response" and not r.transient and r.text is None
    ok = batch_line_result({"custom_id": "k", "response": {"status_code": 200, "body": {
        "choices": [{"message": {"content": "7"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}}}, "m", "k")
    assert ok.ok and ok.text == "7" and ok.prompt_tokens == 3


def test_cache_answers_an_entry_whose_write_is_still_pending(server, tmp_path):
    """Writes are batched in the background; until one lands, its entry is answered from memory, so an
    identical later request is a hit and nothing is sent twice."""
    import asyncio

    from libcurate.llm.client import LLMClient, UsageStats

    store = open_store(str(tmp_path / "run"))

    async def go():
        st = UsageStats()
        async with LLMClient(settings(server, cache=True), store, st) as c:
            first = await c.complete(req("same"))
            rel = c.cache.rel(first.cache_key)
            pending = not store.exists(rel)       # still buffered (batch of 32, 0.5 s delay)
            second = await c.complete(req("same"))
        return first, second, pending, store.exists(rel), st

    first, second, pending, written, st = asyncio.run(go())
    assert pending and written  # buffered during the run, on disk once the client closed
    assert first.ok and not first.cached and second.cached and second.text == first.text
    assert server.count == 1 and st.cache_hits == 1 and st.succeeded == 2


def test_cache_write_failure_keeps_the_reply_and_is_counted(server, tmp_path, monkeypatch, caplog):
    import asyncio

    from libcurate.llm.cache import ResponseCache
    from libcurate.llm.client import LLMClient

    def broken(self, rel, data):
        raise OSError("disk full")

    monkeypatch.setattr(ResponseCache, "_write", broken)
    store = open_store(str(tmp_path / "run"))

    async def go():
        async with LLMClient(settings(server, cache=True), store) as c:
            res = await c.complete(req("q"))
        return res, c.cache.write_errors

    res, errors = asyncio.run(go())
    assert res.ok and res.text == "42" and errors == 1
    assert "response cache write" in caplog.text and not store.list("llm_cache")


def test_torn_cache_entry_is_a_miss_and_is_rewritten(server, tmp_path):
    store = open_store(str(tmp_path / "run"))
    s = settings(server, cache=True)
    (first,), _ = run_requests(s, store, [req("q")])
    rel = f"llm_cache/{first.cache_key[:2]}/{first.cache_key}.json"
    store.write_bytes(rel, b'{"text": "4')   # what a power cut can leave without fsync
    (again,), _ = run_requests(s, store, [req("q")])
    assert again.ok and not again.cached and server.count == 2
    (third,), _ = run_requests(s, store, [req("q")])
    assert third.cached and server.count == 2
