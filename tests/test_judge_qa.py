"""Judge QA: the statistics on textbook data, `curate eval judge` on a real judge run (fake server over HTTP),
the bounded re-ask, and the position-bias swap of `curate eval gavie --swap-order`."""

from __future__ import annotations

import argparse
import json
import math
import re

import numpy as np
import pytest

from libcurate.cli import main as cli_main
from libcurate.llm.gavie import add_eval_arguments, run_eval
from libcurate.llm.judge import JudgeScoreConfig, JudgeScoreStage
from libcurate.llm.judge_qa import (icc, judge_report, krippendorff_alpha_interval, mae, position_bias, spearman)
from libcurate.llm.testing import FakeOpenAIServer, make_sample, write_raw_shards
from libcurate.shards import iter_members
from libcurate.stage import StageContext
from libcurate.storage import open_store

N = math.nan
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", 4 observers x 12 units with gaps:
# interval alpha = 0.849.
KRIPP = [[1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
         [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
         [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
         [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]]
# Shrout & Fleiss (1979), Table 2: 6 targets x 4 judges; ICC(1,1)=.17, ICC(2,1)=.29, ICC(3,1)=.71.
SHROUT = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]


def test_krippendorff_alpha_textbook():
    assert krippendorff_alpha_interval(KRIPP) == pytest.approx(0.849, abs=5e-4)
    assert krippendorff_alpha_interval([[1, 2, 3], [1, 2, 3]]) == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha_interval([[1, N], [N, 2]]))  # nothing pairable


def test_icc_textbook():
    assert round(icc(SHROUT, "1,1"), 2) == 0.17
    assert round(icc(SHROUT, "2,1"), 2) == 0.29
    assert round(icc(SHROUT, "3,1"), 2) == 0.71


def test_spearman_and_mae_match_scipy():
    from scipy.stats import spearmanr

    a = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    b = [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)


def sample_index(body) -> int:
    return int(re.search(r"\bw(\d+)\b", body["messages"][1]["content"]).group(1))


def test_eval_judge_on_a_run_gives_the_textbook_alpha_and_counts_reasks(photos, tmp_path, capsys):
    """Four judges score 12 samples with the values of Krippendorff's example; a gap is a reply that
    does not parse (re-asked once, still unparseable). The report's inter-judge alpha is 0.849."""
    store = open_store(str(tmp_path / "run"))
    names = sorted(photos)
    samples = [make_sample(photos[names[i % len(names)]], "Describe.", f"w{i} caption", i=i) for i in range(12)]
    write_raw_shards(store, [samples])
    models = ["c1", "c2", "c3", "c4"]

    def judge(body):
        if body["messages"][-1]["role"] == "user" and "could not be read" in body["messages"][-1]["content"]:
            return "still no number, sorry"
        v = KRIPP[models.index(body["model"])][sample_index(body)]
        return "I cannot say." if math.isnan(v) else f"{v:g}\nreason"

    with FakeOpenAIServer(responder=judge) as srv:
        cfg = JudgeScoreConfig.from_dict({"prompt": "conversation_quality_10", "judges": models, "reask": 1,
                                          "llm": {"model": "c1", "base_url": srv.base_url, "max_attempts": 1}})
        st = JudgeScoreStage(cfg).process_shard(StageContext(store=store, prefix="stages/judge/h1"),
                                                "shard-000000.tar")
        gaps = int(np.isnan(np.array(KRIPP)).sum())
        assert srv.count == 48 + gaps  # every gap re-asked exactly once (bounded)
        reasked = [b for b in srv.requests if b["messages"][-1]["content"].startswith("Your reply could not")]
        assert len(reasked) == gaps and all(b["messages"][-2]["role"] == "assistant" for b in reasked)
    assert st["llm"]["reasks"] == gaps
    # calibration reference: the per-sample mean of the four judges, shifted by 1 on half of them
    means = np.nanmean(np.array(KRIPP), axis=0)
    ref_scores = means + np.where(np.arange(12) % 2 == 0, 1.0, 0.0)
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"key": s.key, "score": float(r)}) + "\n" for s, r in zip(samples, ref_scores)))
    rep = judge_report(store, reference_path=str(ref))
    r = rep["stages"]["stages/judge/h1"]
    assert r["inter_judge_alpha"] == pytest.approx(0.849, abs=5e-4)
    assert r["repeat_alpha"] == {m: None for m in models}  # one repeat: no repeat agreement
    assert r["parse"]["replies_unparsed_in_kept_samples"] == gaps and r["parse"]["reasks"] == gaps
    assert r["calibration"]["n"] == 12 and r["calibration"]["mae"] == pytest.approx(0.5)
    from scipy.stats import spearmanr

    assert r["calibration"]["spearman"] == pytest.approx(spearmanr(means, ref_scores).statistic, abs=1e-6)
    side = {m["__key__"]: json.loads(m["json"]) for m in iter_members(store.uri("stages/judge/h1/shard-000000.tar"))}
    assert side[samples[9].key]["replies"][0]["reasks"][0]["raw"] == "I cannot say."
    # the CLI prints the same as JSON
    assert cli_main(["eval", "judge", str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stages"]["stages/judge/h1"]["inter_judge_alpha"] == pytest.approx(0.849, abs=5e-4)


def test_reask_rescues_a_reply_and_repeats_give_repeat_agreement(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    samples = [make_sample(photos[n], "Describe.", f"w{i} caption", i=i) for i, n in enumerate(sorted(photos)[:3])]
    write_raw_shards(store, [samples])
    asked: dict = {}

    def judge(body):
        last = body["messages"][-1]["content"]
        if last.startswith("Your reply could not"):
            return "7"
        i = sample_index(body)
        k = asked.setdefault(i, 0)
        asked[i] += 1
        return "Hmm, good." if (i, k) == (0, 0) else str(3 + i)  # both repeats agree on every sample

    with FakeOpenAIServer(responder=judge) as srv:
        cfg = JudgeScoreConfig.from_dict({"prompt": "conversation_quality_10", "repeats": 2, "reask": 2,
                                          "llm": {"model": "m", "base_url": srv.base_url, "temperature": 0.5}})
        st = JudgeScoreStage(cfg).process_shard(StageContext(store=store, prefix="stages/judge/h2"),
                                                "shard-000000.tar")
        assert srv.count == 7 and st["llm"]["reasks"] == 1
    side = {m["__key__"]: json.loads(m["json"]) for m in iter_members(store.uri("stages/judge/h2/shard-000000.tar"))}
    rec = side[samples[0].key]
    assert sorted(rec["values"]) == [3, 7] and rec["status"] == "ok"
    assert [r.get("reasks") for r in rec["replies"]][0] == [{"raw": "Hmm, good.", "reason": rec["replies"][0]
                                                            ["reasks"][0]["reason"]}]
    rep = judge_report(store)["stages"]["stages/judge/h2"]
    # repeat agreement over 3 samples: (3,7), (4,4), (5,5) -> alpha from the formula on that matrix
    assert rep["repeat_alpha"]["m"] == pytest.approx(krippendorff_alpha_interval([[7, 4, 5], [3, 4, 5]]), abs=1e-6)


def test_reask_off_keeps_the_config_hash():
    a = JudgeScoreConfig.from_dict({}).hash_dict()
    assert "reask" not in a and "reask" in JudgeScoreConfig.from_dict({"reask": 1}).hash_dict()


def _args(argv):
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    return p.parse_args(argv)


def test_swap_order_asks_both_orders_and_stores_the_mean(tmp_path):
    """A judge that adds 2 to whatever answer stands first: with --swap-order the server sees every pair in
    both orders, each item's score is its unbiased value + 1 (the mean), both orders are kept, and the
    paired position bias measured from the results is 2."""
    regions = {"1": [{"caption": "a red bus", "bbox": [1, 2, 3, 4]}]}
    outs = [{"image_id": "1", "question": "What is it?", "answer": "red bus", "model": "m1"},
            {"image_id": "1", "question": "What is it?", "answer": "green car", "model": "m2"}]
    (tmp_path / "o.json").write_text(json.dumps(outs))
    (tmp_path / "ann.json").write_text(json.dumps(regions))
    base = {"red bus": 7, "green car": 3}

    def judge(body):
        ans = re.findall(r"<answer\d+>\n(.*?)\n</answer\d+>", body["messages"][-1]["content"], re.DOTALL)
        rel = "\n".join(f"score of answer{k}: 5\nreason: r" for k in range(1, len(ans) + 1))
        acc = "\n".join(f"score of answer{k}: {base[a] + (2 if k == 1 else 0)}\nreason: r"
                        for k, a in enumerate(ans, 1))
        return f"Relevancy:\n{rel}\nAccuracy:\n{acc}"

    with FakeOpenAIServer(responder=judge) as srv:
        rc = run_eval(_args(["--outputs", str(tmp_path / "o.json"), "--annotations", str(tmp_path / "ann.json"),
                             "--base-url", srv.base_url, "--answers-per-prompt", "2", "--swap-order",
                             "--results", str(tmp_path / "res.jsonl"), "--out", str(tmp_path / "lb.md")]))
        assert rc == 0
        orders = [tuple(re.findall(r"<answer\d+>\n(.*?)\n</answer\d+>", b["messages"][-1]["content"]))
                  for b in srv.requests]
    assert sorted(orders) == [("green car", "red bus"), ("red bus", "green car")]
    rows = [json.loads(x) for x in (tmp_path / "res.jsonl").read_text().splitlines()]
    by = {r["answer"]: r for r in rows}
    assert by["red bus"]["accuracy"] == pytest.approx(8.0) and by["green car"]["accuracy"] == pytest.approx(4.0)
    assert {o["position"] for o in by["red bus"]["by_order"].values()} == {1, 2}
    pb = position_bias(rows)
    assert pb["paired_first_minus_last"] == pytest.approx(2.0) and pb["paired_n"] == 2


def test_two_gavie_judges_agreement_across_stages_and_text_report(photos, tmp_path, capsys):
    """Two judge_gavie stages (different judge models) over the same samples: the cross-stage alpha is the
    formula's on their accuracy / 10, and the text report prints it."""
    from libcurate.llm.gavie import GavieConfig, GavieStage

    store = open_store(str(tmp_path / "run"))
    regions = [{"caption": "a red bus", "bbox": [1, 2, 3, 4]}]
    samples = [make_sample(photos[n], "What is shown?", f"answer {i}", i=i, metadata={"regions": regions})
               for i, n in enumerate(sorted(photos)[:4])]
    write_raw_shards(store, [samples])
    acc = {"a": [2, 4, 6, 8], "b": [3, 4, 7, 9]}

    def judge(body):
        i = int(re.search(r"answer (\d+)", body["messages"][-1]["content"]).group(1))
        return f"Relevancy:\nscore of answer1: 5\nreason: r\nAccuracy:\nscore of answer1: {acc[body['model']][i]}\nreason: r"

    with FakeOpenAIServer(responder=judge) as srv:
        for m in ("a", "b"):
            GavieStage(GavieConfig.from_dict({"llm": {"model": m, "base_url": srv.base_url}})).process_shard(
                StageContext(store=store, prefix=f"stages/gavie_{m}/h"), "shard-000000.tar")
    rep = judge_report(store)
    assert {r["kind"] for r in rep["stages"].values()} == {"judge_gavie"}
    want = krippendorff_alpha_interval(np.array([acc["a"], acc["b"]]) / 10.0)
    assert rep["cross_stage"]["alpha"] == pytest.approx(want, abs=1e-6) and 0 < want < 1
    assert rep["cross_stage"]["icc2_1"] == pytest.approx(icc((np.array([acc["a"], acc["b"]]) / 10.0).T), abs=1e-6)
    assert cli_main(["eval", "judge", str(tmp_path / "run")]) == 0
    assert f"alpha={want:.3f}" in capsys.readouterr().out
