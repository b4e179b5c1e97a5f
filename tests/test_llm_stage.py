"""The shared LLM stage base: all shards of a run in one event loop, per-shard contract, one template home."""

from __future__ import annotations

import pytest

from libcurate.llm.client import LLMUnavailableError
from libcurate.llm.judge import JudgeScoreConfig, JudgeScoreStage
from libcurate.llm.testing import Error, FakeOpenAIServer, Reply, make_sample, write_raw_shards
from libcurate.shards import iter_members
from libcurate.stage import StageContext, is_done, read_quarantine
from libcurate.storage import open_store

PREFIX = "stages/judge_score/x"


def build(store, photos, n_shards: int, per: int, tag=lambda si, j: "") -> None:
    img = photos[sorted(photos)[0]]
    write_raw_shards(store, [[make_sample(img, "Describe this image.", f"caption {si}-{j} {tag(si, j)}", i=si * per + j)
                              for j in range(per)] for si in range(n_shards)])


def config(server, **kw) -> JudgeScoreConfig:
    llm = dict(model="j", base_url=server.base_url, concurrency=8, max_attempts=1, timeout_s=5.0,
               backoff_base_s=0.001, backoff_max_s=0.002)
    llm.update(kw)
    return JudgeScoreConfig.from_dict({"llm": llm})


def test_window_stays_full_across_shard_boundaries(tmp_path, photos):
    """Shards of 4 samples at concurrency 8: run one after another, at most 4 requests would ever be in
    flight; in one loop the next shard's requests join the previous one's, so 8 are."""
    store = open_store(str(tmp_path / "run"))
    build(store, photos, n_shards=3, per=4)
    with FakeOpenAIServer(default_text="70\nfine", latency_s=0.4) as srv:  # margin for a busy machine
        stats = list(JudgeScoreStage(config(srv)).process_shards(StageContext(store=store, prefix=PREFIX),
                                                                 [f"shard-{i:06d}.tar" for i in range(3)]))
        assert srv.max_in_flight == 8 and srv.count == 12
    # each shard completes on its own, with its own accounting and counters
    assert [s["out"] for s in stats] == [4, 4, 4] and [s["llm"]["requests"] for s in stats] == [4, 4, 4]
    for i in range(3):
        unit = f"shard-{i:06d}"
        assert is_done(store, PREFIX, unit)
        keys = [m["__key__"] for m in iter_members(store.uri(f"{PREFIX}/{unit}.tar"))]
        assert len(keys) == 4 and not read_quarantine(store, PREFIX, unit)


def test_each_shard_is_reported_as_soon_as_it_is_done(tmp_path, photos):
    """process_shards yields shard by shard (the runner's progress bar), not once at the end: when the
    first shard is reported, it is done and the last one is still in flight."""
    store = open_store(str(tmp_path / "run"))
    build(store, photos, n_shards=3, per=4)
    ctx = StageContext(store=store, prefix=PREFIX)
    with FakeOpenAIServer(default_text="70\nfine", latency_s=0.3) as srv:
        gen = JudgeScoreStage(config(srv)).process_shards(ctx, [f"shard-{i:06d}.tar" for i in range(3)])
        try:
            first = next(gen)
            assert first["out"] == 4 and is_done(store, PREFIX, "shard-000000")
            assert not is_done(store, PREFIX, "shard-000002")
            assert [s["out"] for s in gen] == [4, 4]
        finally:
            gen.close()
    assert all(is_done(store, PREFIX, f"shard-{i:06d}") for i in range(3))


def test_a_failing_shard_is_left_undone_and_the_others_complete(tmp_path, photos):
    store = open_store(str(tmp_path / "run"))
    build(store, photos, n_shards=2, per=4, tag=lambda si, j: "OUTAGE" if si == 0 else "")

    def responder(body):
        # shard 1's replies are still in flight when shard 0 fails: they must still be written
        return Error(500) if "OUTAGE" in body["messages"][-1]["content"] else Reply("60\nok", delay_s=0.3)

    ctx = StageContext(store=store, prefix=PREFIX)
    shards = ["shard-000000.tar", "shard-000001.tar"]
    with FakeOpenAIServer(responder=responder, latency_s=0.05) as srv:
        with pytest.raises(LLMUnavailableError, match="shard-000000"):
            list(JudgeScoreStage(config(srv)).process_shards(ctx, shards))
    assert not is_done(store, PREFIX, "shard-000000") and not store.exists(f"{PREFIX}/shard-000000.tar")
    assert is_done(store, PREFIX, "shard-000001")
    # a re-run with the endpoint back does the failed shard only; the done one is untouched
    with FakeOpenAIServer(default_text="55\nok") as srv:
        (st,) = JudgeScoreStage(config(srv)).process_shards(ctx, ["shard-000000.tar"])  # exhausts it
        assert srv.count == 4 and st["out"] == 4 and is_done(store, PREFIX, "shard-000000")


def test_identical_prompts_in_two_shards_are_sent_once(tmp_path, photos):
    """One client for the run: an identical request in flight in another shard is shared, and each shard
    still counts its own successes."""
    store = open_store(str(tmp_path / "run"))
    img = photos[sorted(photos)[0]]
    same = [make_sample(img, "Describe this image.", "the same caption", i=0)]
    write_raw_shards(store, [same, same])
    with FakeOpenAIServer(default_text="80\nok", latency_s=0.1) as srv:
        stats = list(JudgeScoreStage(config(srv)).process_shards(StageContext(store=store, prefix=PREFIX),
                                                                 ["shard-000000.tar", "shard-000001.tar"]))
        assert srv.count == 1
    assert [s["llm"]["succeeded"] for s in stats] == [1, 1]
    assert sorted(s["llm"]["requests"] + s["llm"]["shared"] for s in stats) == [1, 1]


def _stage_classes():
    from libcurate.generate.caption import CaptionConfig, CaptionStage
    from libcurate.generate.lrv import LrvConfig, LrvStage
    from libcurate.generate.mminstruct import MMInstructConfig, MMInstructStage
    from libcurate.llm.gavie import GavieConfig, GavieStage

    return [(JudgeScoreStage, JudgeScoreConfig), (GavieStage, GavieConfig), (CaptionStage, CaptionConfig),
            (LrvStage, LrvConfig), (MMInstructStage, MMInstructConfig)]


@pytest.mark.parametrize("stage_cls,config_cls", _stage_classes())
def test_every_llm_stage_reports_the_versions_of_the_templates_it_renders(stage_cls, config_cls):
    cfg = config_cls.from_dict({})
    stage = stage_cls(cfg)
    extra = stage.stats_extra()
    if hasattr(cfg, "prompt_versions"):
        assert extra["prompt_versions"] == list(cfg.prompt_versions) == [t.version for t in stage.templates.values()]
    else:
        assert extra["prompt_version"] == cfg.prompt_version == stage.template.version
    assert stage_cls.profile == "cpu" and stage_cls.llm and stage_cls.spans_shards


KILL_SCRIPT = r"""
import sys
from libcurate.llm.judge import JudgeScoreConfig, JudgeScoreStage
from libcurate.stage import StageContext
from libcurate.storage import open_store
root, base_url = sys.argv[1], sys.argv[2]
cfg = JudgeScoreConfig.from_dict({"llm": {"model": "j", "base_url": base_url, "concurrency": 8}})
list(JudgeScoreStage(cfg).process_shards(StageContext(store=open_store(root), prefix="%s"),
                                         [f"shard-{i:06d}.tar" for i in range(4)]))
""" % PREFIX


def _outputs(store) -> dict:
    out = {}
    for i in range(4):
        unit = f"shard-{i:06d}"
        recs = [(m["__key__"], m["json"]) for m in iter_members(store.uri(f"{PREFIX}/{unit}.tar"))]
        out[unit] = (recs, read_quarantine(store, PREFIX, unit))
    return out


def test_sigkill_mid_run_then_rerun_matches_a_clean_run(tmp_path, photos, kill_after_s=0.5):
    """Killed while shards overlap in the one event loop: a re-run finishes exactly the shards without a
    done marker (no half-written sidecar is ever taken as done) and the outputs equal a clean run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    killed, clean = open_store(str(tmp_path / "killed")), open_store(str(tmp_path / "clean"))
    for st in (killed, clean):
        build(st, photos, n_shards=4, per=10)   # 40 samples, 8 in flight, 0.2 s each: ~1 s
    with FakeOpenAIServer(responder=lambda body: Reply("70\nfine"), latency_s=0.2) as srv:
        p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "killed"), srv.base_url], cwd=root,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 30
        while srv.count == 0 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.01)
        time.sleep(kill_after_s)
        assert p.poll() is None, "the run ended before the kill: nothing was tested"
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert 0 < srv.count < 40
        done_before = [is_done(killed, PREFIX, f"shard-{i:06d}") for i in range(4)]
        assert not all(done_before), "the kill came after the run finished: nothing was tested"
        killed.clean_partial(PREFIX)
        todo = [f"shard-{i:06d}.tar" for i in range(4) if not done_before[i]]
        list(JudgeScoreStage(config(srv)).process_shards(StageContext(store=killed, prefix=PREFIX), todo))
        list(JudgeScoreStage(config(srv)).process_shards(StageContext(store=clean, prefix=PREFIX),
                                                         [f"shard-{i:06d}.tar" for i in range(4)]))
    assert all(is_done(killed, PREFIX, f"shard-{i:06d}") for i in range(4))
    assert _outputs(killed) == _outputs(clean)
