"""GAVIE: region formatting, the judge_gavie stage, and the eval CLI's leaderboard."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from libcurate.llm.gavie import (GavieConfig, GavieStage, add_eval_arguments, format_regions, leaderboard_markdown,
                                 run_eval)
from libcurate.llm.testing import Error, FakeOpenAIServer, make_sample, write_raw_shards
from libcurate.shards import iter_members
from libcurate.stage import StageContext, read_quarantine
from libcurate.storage import open_store

REGIONS = [{"caption": "a red bus", "bbox": [10, 20, 200, 100]}, {"caption": "a man in a blue shirt", "bbox": [5.4, 6, 30, 90]}]


def test_format_regions_uses_height_not_width():
    assert format_regions(REGIONS) == ("a red bus X: 10 Y: 20 Width: 200 Height: 100\n"
                                       "a man in a blue shirt X: 5 Y: 6 Width: 30 Height: 90")
    assert format_regions(REGIONS, max_regions=1).count("\n") == 0


def answers_in(body) -> list[str]:
    return re.findall(r"<answer\d+>\n(.*?)\n</answer\d+>", body["messages"][-1]["content"], re.DOTALL)


def gavie_judge(body):
    """Accuracy 9 for answers mentioning 'red', else 2; relevancy 8; for however many answers are in the prompt."""
    ans = answers_in(body)
    rel = "\n".join(f"score of answer{k}: 8\nreason: on topic" for k in range(1, len(ans) + 1))
    acc = "\n".join(f"score of answer{k}: {9 if 'red' in a else 2}\nreason: checked" for k, a in enumerate(ans, 1))
    return f"Relevancy:\n{rel}\nAccuracy:\n{acc}"


def llm(srv, **kw):
    return dict(model="judge", base_url=srv.base_url, backoff_base_s=0.002, max_attempts=2, timeout_s=2, **kw)


def test_stage_scores_every_turn_and_quarantines_missing_regions(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    s0 = make_sample(photos["coffee"], "What colour is the bus?", "The bus is red.", i=0,
                     metadata={"regions": REGIONS}, more_turns=[("Who is there?", "A man in a green coat.")])
    s1 = make_sample(photos["rocket"], "What is shown?", "A red bus.", i=1)          # regions from the file
    s2 = make_sample(photos["camera"], "What is shown?", "A camera.", i=2)           # no regions anywhere
    s1.source.original_id = "vg-77"
    write_raw_shards(store, [[s0, s1, s2]])
    store.write_text("ann/vg.json", json.dumps({"vg-77": REGIONS}))
    with FakeOpenAIServer(responder=gavie_judge) as srv:
        cfg = GavieConfig.from_dict({"regions_file": store.uri("ann/vg.json"), "llm": llm(srv)})
        stats = GavieStage(cfg).process_shard(StageContext(store=store, prefix="stages/g/x"), "shard-000000.tar")
        assert srv.count == 3
        body = srv.requests[0]["messages"][-1]["content"]
        assert "a red bus X: 10 Y: 20 Width: 200 Height: 100" in body and "<answer1>" in body
        assert "<answer2>" not in body  # one answer per prompt
    side = {m["__key__"]: json.loads(m["json"]) for m in iter_members(store.uri("stages/g/x/shard-000000.tar"))}
    assert side[s0.key]["n_turns"] == 2 and side[s0.key]["accuracy"] == pytest.approx(5.5)
    assert [t["accuracy"] for t in side[s0.key]["turns"]] == [9, 2] and side[s0.key]["relevancy"] == 8
    assert side[s1.key]["accuracy"] == 9
    q = read_quarantine(store, "stages/g/x", "shard-000000")
    assert [(d["key"], d["reason"]) for d in q] == [(s2.key, "no_regions")]
    assert stats["in"] == 3 and stats["out"] == 2


def test_stage_quarantines_unparseable_and_failed(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    a = make_sample(photos["coffee"], "Q?", "only relevancy", i=0, metadata={"regions": REGIONS})
    b = make_sample(photos["rocket"], "Q?", "bad request", i=1, metadata={"regions": REGIONS})
    write_raw_shards(store, [[a, b]])

    def judge(body):
        if "bad request" in body["messages"][-1]["content"]:
            return Error(400)
        return "Relevancy:\nscore of answer1: 7\nreason: ok\n"  # no accuracy section

    with FakeOpenAIServer(responder=judge) as srv:
        GavieStage(GavieConfig.from_dict({"llm": llm(srv)})).process_shard(
            StageContext(store=store, prefix="stages/g/x"), "shard-000000.tar")
    q = {d["key"]: d for d in read_quarantine(store, "stages/g/x", "shard-000000")}
    assert q[a.key]["reason"] == "unparseable_reply" and "missing_section" in q[a.key]["detail"]
    assert q[b.key]["reason"] == "llm_call_failed"


def _args(argv):
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    return p.parse_args(argv)


def test_eval_cli_leaderboard(tmp_path):
    ann = tmp_path / "vg.json"
    ann.write_text(json.dumps({"1": REGIONS, "2": REGIONS}))
    outs = tmp_path / "outs.jsonl"
    rows = []
    for img in ("1", "2"):
        for q in ("What colour is the bus?", "Describe the image."):
            rows.append({"image_id": img, "question": q, "answer": "A red bus.", "model": "good"})
            rows.append({"image_id": img, "question": q, "answer": "A green train.", "model": "bad"})
    outs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"image_id": 1, "instruction": "What colour is the bus?", "answer": "red"},
                                 {"image_id": 99, "instruction": "?", "answer": "red"}]))
    md, res = tmp_path / "board.md", tmp_path / "items.jsonl"
    with FakeOpenAIServer(responder=gavie_judge) as srv:
        rc = run_eval(_args(["--outputs", str(outs), "--outputs", f"third={other}", "--annotations", str(ann),
                             "--base-url", srv.base_url, "--judge-model", "j", "--out", str(md),
                             "--results", str(res), "--cache", str(tmp_path / "cache")]))
        # 9 items judged; image 99 has no regions: not sent. Images 1 and 2 have the same regions, so their
        # identical prompts (same question, same answer) share one request in flight: 5 sent
        assert rc == 0 and srv.count == 5
        board = md.read_text()
        lines = board.splitlines()
        assert lines[0] == "| model | accuracy | relevancy | judged | failed |"
        assert lines[2] == "| good | 9.00 | 8.00 | 4 | 0 |" and lines[3] == "| third | 9.00 | 8.00 | 1 | 1 |"
        assert lines[4] == "| bad | 2.00 | 8.00 | 4 | 0 |"
        items = [json.loads(l) for l in res.read_text().splitlines()]
        assert sum(i["status"] == "ok" for i in items) == 9 and items[-1]["status"].startswith("no_regions")
        # grouped mode: several answers per prompt, shuffled, mapped back to the right model
        md2 = tmp_path / "board2.md"
        rc = run_eval(_args(["--outputs", str(outs), "--annotations", str(ann), "--base-url", srv.base_url,
                             "--answers-per-prompt", "2", "--out", str(md2)]))
        assert rc == 0 and srv.count == 5 + 2  # 4 prompts, 2 distinct
        assert "| good | 9.00 | 8.00 | 4 | 0 |" in md2.read_text() and "| bad | 2.00 |" in md2.read_text()
        assert any(len(answers_in(b)) == 2 for b in srv.requests[5:])


def test_eval_cli_bad_input_exits_3(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "answer": "x"}]))
    ann = tmp_path / "vg.json"
    ann.write_text("{}")
    assert run_eval(_args(["--outputs", str(bad), "--annotations", str(ann), "--base-url", "http://127.0.0.1:9/v1"])) == 3


def test_leaderboard_markdown_handles_all_failed():
    md = leaderboard_markdown([{"model": "x", "accuracy": None, "relevancy": None, "n": 0, "failed": 3},
                               {"model": "y", "accuracy": 5.0, "relevancy": 6.0, "n": 2, "failed": 0}])
    assert md.splitlines()[2].startswith("| y | 5.00") and "| x | – | – | 0 | 3 |" in md


def test_config_pins_prompt_version_and_rejects_bad_regions_file(tmp_path):
    from libcurate.stage import PermanentInputError

    v = GavieConfig.from_dict({}).prompt_version
    assert v.startswith("gavie@") and GavieConfig.from_dict({"prompt_version": v}).prompt_version == v
    with pytest.raises(PermanentInputError, match="pinned, but the template is"):
        GavieConfig.from_dict({"prompt_version": "gavie@000000000000"})
    for content in ("{not json", "[1, 2]"):
        (tmp_path / "vg.json").write_text(content)
        stage = GavieStage(GavieConfig.from_dict({"regions_file": str(tmp_path / "vg.json")}))
        with pytest.raises(PermanentInputError, match="cannot read regions_file"):
            stage.setup(StageContext(store=open_store(str(tmp_path)), prefix="stages/judge_gavie/x"))
