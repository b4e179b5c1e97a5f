"""LLM stages under faults (issue 11): identical prompts in flight share one request, one sample its
endpoint always refuses does not stop a run, and judge_score under random 429/500/timeouts/malformed and
unparseable replies (the fake OpenAI server, real HTTP) makes up no score, records every parse failure,
keeps its accounting, and a re-run sends nothing that is cached.

The chaos short form (one seed) runs in ``make test``; ``pytest -m faults tests/test_faults_llm.py``
runs more seeds and prints one ``LLMCHAOS`` JSON line per seed (bench/FAULTS.md).
"""

from __future__ import annotations

import collections
import json
import random
import threading

import pytest

from libcurate.llm.client import LLMRequest, LLMSettings, LLMUnavailableError, UsageStats, run_requests
from libcurate.llm.judge import JudgeScoreConfig, JudgeScoreStage
from libcurate.llm.stage import dead_letter_rel, too_many_failed
from libcurate.llm.testing import Error, FakeOpenAIServer, Malformed, Reply, Sleep, make_sample, write_raw_shards
from libcurate.shards import iter_members
from libcurate.stage import StageContext, is_done, read_quarantine
from libcurate.storage import open_store

from .test_faults_storage import long_faults
from .test_judge_score import caption_of


def req(text: str) -> LLMRequest:
    return LLMRequest([{"role": "user", "content": text}], "tpl@1")


def judge_llm(server, **kw) -> dict:
    d = dict(model="judge-a", base_url=server.base_url, backoff_base_s=0.002, backoff_max_s=0.01, timeout_s=0.5,
             max_attempts=4, concurrency=8)
    d.update(kw)
    return d


def expected_score(caption: str) -> int:
    return min(100, 10 * len(caption.split()))


def sidecar(store, prefix, unit):
    if not store.exists(f"{prefix}/{unit}.tar"):
        return {}
    return {m["__key__"]: json.loads(m["json"]) for m in iter_members(store.uri(f"{prefix}/{unit}.tar"))}


# -- identical prompts in flight ---------------------------------------------------------------------
@pytest.mark.parametrize("cached", [False, True])
def test_identical_prompts_in_flight_share_one_request(tmp_path, cached):
    """72 requests for 19 distinct prompts, all in flight at once: 19 are sent."""
    prompts = [f"prompt {i}" for i in range(19)]
    reqs = [req(p) for p in prompts] + [req(random.Random(i).choice(prompts)) for i in range(53)]
    random.Random(0).shuffle(reqs)
    store = open_store(str(tmp_path / "run")) if cached else None
    with FakeOpenAIServer(responder=lambda b: "answer to " + b["messages"][0]["content"], latency_s=0.2) as srv:
        st = UsageStats()
        results, dead = run_requests(LLMSettings(model="m", base_url=srv.base_url, concurrency=64, cache=cached),
                                     store, reqs, st)
        assert srv.count == 19
    assert dead == [] and all(r.ok for r in results)
    assert [r.text for r in results] == ["answer to " + r.messages[0]["content"] for r in reqs]
    assert st.requests == 19 and st.shared == 72 - 19 and st.succeeded == 72 and st.failed == 0


def test_a_shared_failure_is_a_failure_for_every_waiter():
    with FakeOpenAIServer(responder=lambda b: Error(400), latency_s=0.1) as srv:
        st = UsageStats()
        results, dead = run_requests(LLMSettings(model="m", base_url=srv.base_url, cache=False),
                                     None, [req("same")] * 5, st)
        assert srv.count == 1
    assert all(not r.ok and r.error_status == 400 and r.text is None for r in results)
    assert st.failed == 5 and st.succeeded == 0 and st.shared == 4


# -- max_failed_fraction: its default and its message ---------------------------------------------------
def _samples(photos, n, offset=0):
    names = sorted(photos)
    return [make_sample(photos[names[i % len(names)]], "Describe this image in detail.",
                        " ".join([f"w{i}"] + ["word"] * (i % 9)), i=i) for i in range(offset, offset + n)]


def test_default_tolerates_one_sample_its_endpoint_always_refuses(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    shard = _samples(photos, 20)
    write_raw_shards(store, [shard])
    bad = shard[7].responses[0]
    with FakeOpenAIServer(responder=lambda b: Error(500) if caption_of(b) == bad else "61") as srv:
        stage = JudgeScoreStage(JudgeScoreConfig.from_dict({"llm": judge_llm(srv)}))  # default max_failed_fraction
        stats = stage.process_shard(StageContext(store=store, prefix="stages/j/x"), "shard-000000.tar")
    q = read_quarantine(store, "stages/j/x", "shard-000000")
    assert [(d["key"], d["reason"]) for d in q] == [(shard[7].key, "llm_call_failed")]
    assert stats["out"] == 19 and stats["llm"]["failed_samples"] == 1 and stats["llm"]["failed_transient"] == 1
    assert is_done(store, "stages/j/x", "shard-000000")


def test_outage_still_aborts_and_says_how_to_raise_the_limit(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    write_raw_shards(store, [_samples(photos, 6)])
    with FakeOpenAIServer(responder=lambda b: Error(503)) as srv:
        stage = JudgeScoreStage(JudgeScoreConfig.from_dict({"llm": judge_llm(srv, max_attempts=2)}))
        with pytest.raises(LLMUnavailableError) as ei:
            stage.process_shard(StageContext(store=store, prefix="stages/j/x"), "shard-000000.tar")
    msg = str(ei.value)
    assert "6/6" in msg and "raise llm.max_failed_fraction" in msg and "_dead_letter" in msg
    assert not is_done(store, "stages/j/x", "shard-000000")


@pytest.mark.parametrize("failed,n,frac,abort", [
    (0, 10, 0.0, False), (1, 10, 0.0, True), (1, 20, 0.01, False), (1, 1, 0.01, True), (2, 20, 0.01, True),
    (10, 1000, 0.01, False), (11, 1000, 0.01, True), (20, 20, 1.0, False), (3, 4, 0.5, True), (2, 4, 0.5, False)])
def test_too_many_failed(failed, n, frac, abort):
    assert too_many_failed(failed, n, frac) is abort


# -- chaos ------------------------------------------------------------------------------------------
class Chaos:
    """A seeded responder: a fault with probability ``rate`` (429 with Retry-After, 500, a timeout, a
    malformed 200, an unparseable reply), else the true score of the caption. Remembers what it gave."""

    def __init__(self, seed: int, rate: float, timeout_s: float):
        self.rng, self.rate, self.timeout_s = random.Random(seed), rate, timeout_s
        self.lock = threading.Lock()
        self.given: collections.Counter = collections.Counter()
        self.last: dict[str, str] = {}   # caption -> kind of the last action given for it
        self.on = True

    def __call__(self, body):
        cap = caption_of(body)
        with self.lock:
            kind = "reply"
            if self.on and self.rng.random() < self.rate:
                kind = self.rng.choice(["429", "500", "timeout", "malformed", "unparseable"])
            self.given[kind] += 1
            self.last[cap] = kind
        if kind == "429":
            return Error(429, retry_after=0.01)
        if kind == "500":
            return Error(500)
        if kind == "timeout":
            return Sleep(self.timeout_s + 0.3)
        if kind == "malformed":
            return Malformed()
        if kind == "unparseable":
            return Reply("I would rather not give a number for this one.")
        return Reply(f"{expected_score(cap)}\nExplanation follows.")


def llm_chaos(photos, tmp_path, seed: int, n_shards: int = 3, per: int = 16, rate: float = 0.4,
              max_attempts: int = 4) -> dict:
    store = open_store(str(tmp_path / f"run-{seed}"))
    shards = [_samples(photos, per, si * per) for si in range(n_shards)]
    # repeated prompts across and inside shards (the same caption twice): one cache key, one request
    shards[0][-1] = make_sample(photos[sorted(photos)[0]], "Describe this image in detail.",
                                shards[0][0].responses[0], i=per * n_shards + 1)
    write_raw_shards(store, shards)
    units = [f"shard-{i:06d}" for i in range(n_shards)]
    prefix = "stages/judge_score/chaos"
    chaos = Chaos(seed, rate, timeout_s=0.5)
    aborted = 0
    with FakeOpenAIServer(responder=chaos) as srv:
        cfg = JudgeScoreConfig.from_dict({"llm": judge_llm(srv, max_attempts=max_attempts)})
        stats = {}
        for unit in units:
            for _attempt in range(5):  # as Argo would retry a shard that aborted (LLMUnavailableError)
                before = srv.count
                try:
                    st = JudgeScoreStage(cfg).process_shard(StageContext(store=store, prefix=prefix), f"{unit}.tar")
                except LLMUnavailableError:
                    aborted += 1
                    continue
                # accounting: every HTTP request of this attempt is in its stats; every planned request
                # ended as a success or a failure; each was a cache hit, shared, or sent (with retries)
                ll = st["llm"]
                assert ll["requests"] == srv.count - before
                assert ll["succeeded"] + ll["failed"] == per
                assert ll["cache_hits"] + ll["shared"] + ll["requests"] - ll["retries"] == per
                assert st["in"] == st["out"] + st["quarantined"] == per
                stats[unit] = st
                break
        assert set(stats) == set(units), f"shards never finished: {set(units) - set(stats)}"
        sent_first = srv.count
        by_sample = {s.key: s for sh in shards for s in sh}
        reasons = collections.Counter()
        outputs = {}
        failed_keys = set()
        for unit in units:
            side = sidecar(store, prefix, unit)
            outputs[unit] = side
            for key, rec in side.items():  # no made-up score: it is the judge's real answer
                assert rec["score"] == expected_score(by_sample[key].responses[0]) and rec["status"] == "ok"
            q = read_quarantine(store, prefix, unit)
            for d in q:
                reasons[d["reason"]] += 1
                assert d["reason"] in ("llm_call_failed", "unparseable_reply"), d
                cap = by_sample[d["key"]].responses[0]
                if d["reason"] == "unparseable_reply":  # the judge really said no number; recorded
                    assert chaos.last[cap] == "unparseable" and "no_score" in d["detail"], d
                else:
                    assert chaos.last[cap] in ("429", "500", "timeout", "malformed"), d
            assert len(side) + len(q) == per
            if store.exists(dead_letter_rel(prefix, unit)):
                failed_keys |= {json.loads(line)["cache_key"]
                                for line in store.read_text(dead_letter_rel(prefix, unit)).splitlines()}
        # re-run of done shards: nothing to do; re-run from scratch (outputs gone, cache kept, endpoint
        # healthy): only what failed is sent, and what was answered is answered identically
        chaos.on = False
        before = srv.count
        for unit in units:
            for rel in store.list(prefix):
                store.delete(f"{prefix}/{rel}")
        rerun_stats = [JudgeScoreStage(cfg).process_shard(StageContext(store=store, prefix=prefix), f"{u}.tar")
                       for u in units]
        resent = srv.count - before
        assert resent == len(failed_keys), (resent, len(failed_keys))
        assert sum(s["llm"]["requests"] for s in rerun_stats) == resent
        for unit in units:
            side = sidecar(store, prefix, unit)
            assert all(side[k] == rec for k, rec in outputs[unit].items())
        before = srv.count
        for unit in units:
            for rel in store.list(prefix):
                store.delete(f"{prefix}/{rel}")
        third = [JudgeScoreStage(cfg).process_shard(StageContext(store=store, prefix=prefix), f"{u}.tar")
                 for u in units]
        assert srv.count == before and all(s["llm"]["requests"] == 0 for s in third)  # all cached now
    res = {"seed": seed, "max_attempts": max_attempts, "samples": n_shards * per, "requests_first_run": sent_first,
           "faults_given": {k: v for k, v in sorted(chaos.given.items()) if k != "reply"},
           "shard_aborts_retried": aborted, "quarantined": dict(sorted(reasons.items())),
           "failed_cache_keys": len(failed_keys), "resent_on_rerun": resent, "sent_on_third_run": 0}
    print("LLMCHAOS " + json.dumps(res, sort_keys=True))
    return res


def test_judge_score_under_llm_chaos(photos, tmp_path):
    """Short form (make test): one seed, 3 shards of 16, 40% of replies are faults."""
    res = llm_chaos(photos, tmp_path, seed=3)
    assert len(res["faults_given"]) >= 4 and sum(res["faults_given"].values()) >= 10, res


@pytest.mark.slow
@pytest.mark.faults
def test_judge_score_under_llm_chaos_many_seeds(photos, tmp_path, request):
    """Long form: 10 seeds, 4 shards of 16; with 2 attempts per request, transient failures pile up
    and shards abort (LLMUnavailableError) and are retried as Argo would."""
    long_faults(request)
    results = [llm_chaos(photos, tmp_path, seed=seed, n_shards=4, per=16, rate=0.4,
                         max_attempts=4 if seed < 7 else 2) for seed in range(2, 12)]
    assert sum(r["shard_aborts_retried"] for r in results) > 0
