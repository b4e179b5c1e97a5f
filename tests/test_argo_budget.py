"""``max_cost`` on Argo, executed: the rendered workflow runs through tests/argo_exec.py against moto S3
and the LLM test server, and refuses exactly where ``curate run`` refuses (same check, same message,
exit 3, no request sent); within budget it runs and its store equals ``curate run``'s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from libcurate.llm.cost import ensure_raw, estimate_recipe
from libcurate.llm.testing import FakeOpenAIServer
from libcurate.pipeline import load_recipe

from tests.argo_exec import ArgoExecutor
from tests.test_cost import caption_or_grade_reply, make_src
from tests.test_argo_exec import (ROOT, curate_run, demo_src, objects, ok, render_docs,  # noqa: F401
                                  s3_secret, small_batches, store_diff)


def secrets() -> dict:
    return {**s3_secret(), "curate-llm": {"OPENAI_API_KEY": "sk-test"}}


def ingest(demo_src: Path) -> dict:
    return {"stage": "ingest", "with": {"format": "llava", "annotations": str(demo_src / "data.json"),
                                        "images": str(demo_src), "shard_size": 16}}


def judge(sid: str, prompt: str, srv) -> dict:
    return {"stage": "judge_score", "as": sid, "with": {"prompt": prompt, "llm": {"base_url": srv.base_url,
                                                                                   "max_attempts": 1}}}


def estimate(recipe: dict, tmp_path: Path, prefix: str) -> dict[str, float]:
    """Per-stage expected cost (and ``requests``: distinct requests in all) over a fresh copy of the run
    (its ingest only), as `curate estimate`."""
    path = tmp_path / "estimate.yaml"
    path.write_text(json.dumps(recipe))
    r = load_recipe(str(path), prefix=prefix)
    ensure_raw(r)
    est = estimate_recipe(r)
    return {**{e["id"]: e["cost_usd"] for e in est["stages"]}, "requests": est["total"]["requests"]}


def assert_same_store_and_cache(argo: str, local: str) -> None:
    """The stores are equal byte for byte (tests/test_argo_exec.py's rule), except that an LLM response
    cache entry records when it was written (``time``): those are equal without it."""
    _, diff = store_diff(argo, local)
    a, b = objects(argo), objects(local)
    cache = [k for k in diff if k.startswith("llm_cache/")]
    assert cache and all(json.loads(a[k]).pop("time") and json.loads(b[k]).pop("time") for k in cache)
    assert [k for k in cache if {**json.loads(a[k]), "time": 0} != {**json.loads(b[k]), "time": 0}] == []
    assert [k for k in diff if k not in cache] == [], [(k, a[k][:3000], b[k][:3000]) for k in diff if k not in cache and "report" not in k]


def curate_run_refused(recipe_path: str, prefix: str) -> str:
    r = subprocess.run([sys.executable, "-m", "libcurate.cli", "run", recipe_path, "--prefix", prefix,
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stderr


def refusal(text: str) -> str:
    """The message of the max_cost error (the dollar figures and where it stopped) from a log."""
    (line,) = [ln for ln in text.splitlines() if "exceeds max_cost" in ln]
    return line[line.index("estimated LLM cost"):]


def test_over_budget_fails_at_the_check_step_like_curate_run(tmp_path, demo_src, s3_bucket, monkeypatch):  # noqa: F811
    """A budget below the judge's estimate: the check step exits 3 once (not retried), the judge's list
    step and pods never start, the LLM server sees no request; `curate run` stops with the same message."""
    small_batches(monkeypatch, 2)
    argo, local = f"{s3_bucket}/argo", f"{s3_bucket}/local"
    with FakeOpenAIServer(default_text="7") as srv:
        recipe = {"name": "over", "storage": {"prefix": argo}, "workers": 1, "max_cost": 1e-6, "stages": [
            ingest(demo_src), judge("judge", "caption_quality_100", srv), {"stage": "export"}]}
        docs, path = render_docs(recipe, tmp_path, argo)
        run = ArgoExecutor(docs, secrets=secrets(), max_pods=2, backoff_scale=0.01,
                           workdir=str(tmp_path / "exec")).run()
        print(run.summary())
        assert run.phase == "Failed"
        (check,) = run.pods_of("check-budget")
        assert [a.exit_code for a in check.attempts] == [3]
        assert run.nodes["main.judge-budget"] == "Failed"
        assert run.nodes["main.judge-batches"] == run.nodes["main.judge"] == "Omitted", run.nodes
        assert not run.pods_of("judge") and srv.count == 0
        argo_msg = refusal(Path(check.attempts[0].log).read_text())
        assert "Stopped before judge sent anything" in argo_msg

        local_msg = refusal(curate_run_refused(path, local))
        assert srv.count == 0
    assert argo_msg == local_msg          # the same check over the same store: the same figures


def test_check_before_each_llm_stage_sees_generated_samples(tmp_path, demo_src, s3_bucket, monkeypatch):  # noqa: F811
    """Why one check per LLM stage, not one before the first: the generator's check passes (the judge is
    counted over the ingested samples only), the generator runs, and the judge's check, which now sees
    the generated samples too and adds the generator's expected cost (``spent``), exits 3 before the
    judge sends anything; `curate run` stops at the same place with the same figures."""
    small_batches(monkeypatch, 2)
    argo, local = f"{s3_bucket}/argo", f"{s3_bucket}/local"

    with FakeOpenAIServer(responder=caption_or_grade_reply) as srv:
        llm = {"base_url": srv.base_url, "max_attempts": 1}
        recipe = {"name": "gen", "storage": {"prefix": argo}, "workers": 1, "stages": [
            ingest(demo_src), {"stage": "generate_caption", "as": "gen", "with": {"min_words": 3, "llm": llm}},
            {"stage": "judge_score", "as": "judge", "with": {"prompt": "alpagasus_5", "llm": llm}}]}
        est = estimate(recipe, tmp_path, f"{s3_bucket}/estimate")
        recipe["max_cost"] = est["gen"] + 1.5 * est["judge"]     # enough for the judge over raw/ only
        docs, path = render_docs(recipe, tmp_path, argo)
        run = ArgoExecutor(docs, secrets=secrets(), max_pods=2, workdir=str(tmp_path / "exec")).run()
        print(run.summary())
        assert run.phase == "Failed"
        checks = {p.node.rsplit(".", 1)[-1]: p for p in run.pods_of("check-budget")}
        first, second = checks["gen-budget"], checks["judge-budget"]
        assert [a.exit_code for a in first.attempts] == [0] and [a.exit_code for a in second.attempts] == [3]
        assert float(first.result) == est["gen"]
        assert run.pods_of("gen") and not run.pods_of("judge")
        sent = srv.count
        assert sent > 0 and all("Grade" not in json.dumps(b) for b in srv.requests)
        argo_msg = refusal(Path(second.attempts[0].log).read_text())
        assert "Stopped before judge sent anything" in argo_msg

        local_msg = refusal(curate_run_refused(path, local))
        assert all("Grade" not in json.dumps(b) for b in srv.requests)
    assert argo_msg == local_msg


def test_within_budget_runs_and_equals_curate_run(tmp_path, photos, s3_bucket, monkeypatch):
    """Two LLM stages side by side under a sufficient budget: each check passes on what the previous one
    printed (the first the judge's expected cost, the second both), every request is sent once, and the
    store equals `curate run`'s. (Six records whose requests all differ over three shards: a request
    repeated on shards of two pods is sent by each, which the usage totals in summary.json would show.)"""
    small_batches(monkeypatch, 2)
    argo, local = f"{s3_bucket}/argo", f"{s3_bucket}/local"
    ann, images = make_src(tmp_path, photos)
    with FakeOpenAIServer(default_text="7") as srv:
        recipe = {"name": "within", "storage": {"prefix": argo}, "workers": 1, "stages": [
            {"stage": "ingest", "with": {"format": "llava", "annotations": ann, "images": images,
                                         "shard_size": 2}},
            judge("judge_a", "caption_quality_100", srv),
            judge("judge_b", "conversation_quality_10", srv), {"stage": "export", "with": {"formats": ["llava"]}}]}
        est = estimate(recipe, tmp_path, f"{s3_bucket}/estimate")
        recipe["max_cost"] = 1.01 * (est["judge_a"] + est["judge_b"])
        docs, path = render_docs(recipe, tmp_path, argo)
        run = ArgoExecutor(docs, secrets=secrets(), max_pods=2, workdir=str(tmp_path / "exec")).run()
        ok(run)
        checks = {p.node.rsplit(".", 1)[-1]: p for p in run.pods_of("check-budget")}
        assert float(checks["judge-a-budget"].result) == est["judge_a"]
        assert float(checks["judge-b-budget"].result) == est["judge_a"] + est["judge_b"]
        sent = srv.count
        assert sent == est["requests"] == 12 and len(run.pods_of("judge-a")) == len(run.pods_of("judge-b")) == 2
        curate_run(path, local)
        assert srv.count == 2 * sent          # the local run sent the same requests once more
    assert_same_store_and_cache(argo, local)


def test_check_budget_entrypoint(tmp_path, photos, capsys):
    """``python -m jobs.check_budget`` in-process: the check counts this LLM stage and every later one
    (a budget that covers the first but not both stops before the first), prints ``--spent`` plus this
    stage's expected cost, and answers bad input with exit 3."""
    from jobs.check_budget import main

    ann, images = make_src(tmp_path, photos)
    recipe = {"name": "entry", "storage": {"prefix": str(tmp_path / "run")}, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": ann, "images": images}},
        {"stage": "judge_score", "as": "a", "with": {"prompt": "caption_quality_100"}},
        {"stage": "judge_score", "as": "b", "with": {"prompt": "conversation_quality_10"}}]}
    est = estimate(recipe, tmp_path, str(tmp_path / "run"))
    a, b = est["a"], est["b"]
    assert a > 0 and b > 0

    def check(budget, *argv):
        path = tmp_path / "r.yaml"
        path.write_text(json.dumps({**recipe, "max_cost": budget}))
        capsys.readouterr()
        code = main(["--recipe", str(path), *argv])
        return code, capsys.readouterr().out.strip()

    assert check(a + 0.5 * b, "--stage-id", "a") == (3, "")          # b counts too, before a sends anything
    assert check(a + b, "--stage-id", "a") == (0, repr(a))
    assert check(a + b, "--stage-id", "b", "--spent", repr(a)) == (0, repr(a + b))
    assert check(a + b, "--stage-id", "b", "--spent", repr(2 * a))[0] == 3   # what a was expected to cost
    assert check(a + b, "--stage-id", "b", "--spent", "nan")[0] == 3
    assert check(a + b, "--stage-id", "ingest")[0] == 3                       # not an LLM stage
