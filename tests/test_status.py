"""``curate status``: progress, throughput and ETA read from the markers of a run in progress, on a local
directory and on S3 (moto), with an injected clock; ``--watch`` ends when every stage is done."""

import json
import os
import subprocess
import sys

import pytest

from libcurate.pipeline import load_recipe
from libcurate.runner import run_recipe
from libcurate.status import StageSpec, StatusReader, format_status, planned_specs, watch
from libcurate.storage import open_store, split_s3_url

from .conftest import jpeg_bytes
from .test_ingest import llava, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURATE = [sys.executable, "-m", "libcurate.cli"]
T0 = 1_800_000_000.0

# A run caught mid-way: ingest planned 4 shards of 10 records and finished them (1 quarantined each);
# score_length finished 2 of 4; dedup fitted, then wrote 1 shard (one more marker predates the fit);
# select has not started; an older configuration of score_length is left under the prefix.
SPECS = [StageSpec("raw", "raw", "ingest"), StageSpec("score_length", "stages/score_length/aaaa", "shard"),
         StageSpec("dedup", "stages/dedup/bbbb", "fit"), StageSpec("select", "select/select/cccc", "global")]


def put(store, rel, obj, t=None):
    store.write_text(rel, obj if isinstance(obj, str) else json.dumps(obj))
    if t is not None and not store.url.startswith("s3://"):
        os.utime(store.uri(rel), (t, t))


def unit(store, prefix, i, t, n_in, out, seconds, marker=""):
    u = f"shard-{i:06d}"
    put(store, f"{prefix}/_stats/{u}.json", {"in": n_in, "out": out, "quarantined": n_in - out, "dropped": 0,
                                             "seconds": seconds})
    put(store, f"{prefix}/_done/{u}", marker, t)


def build_partial_run(store, s3_sleep=lambda: None):
    put(store, "raw/_ingest.json", {"n_shards": 4, "n_records": 40, "segments": []})
    for i in range(4):  # raw markers at T0+10..40, each shard took 5 s
        unit(store, "raw", i, T0 + 10 * (i + 1), 10, 9, 5.0)
    unit(store, "stages/score_length/aaaa", 0, T0 + 100, 9, 9, 10.0)
    unit(store, "stages/score_length/aaaa", 1, T0 + 110, 9, 9, 10.0)
    unit(store, "stages/score_length/zzzz", 0, T0 + 100, 9, 9, 1.0)   # older configuration
    unit(store, "stages/dedup/bbbb", 3, T0 + 150, 9, 9, 1.0)            # from an older fit
    s3_sleep()  # S3 stamps whole seconds: keep the fit strictly after the stale marker
    put(store, "stages/dedup/bbbb/_done/_fit", "inputs:x", T0 + 200)
    s3_sleep()
    unit(store, "stages/dedup/bbbb", 0, T0 + 210, 9, 9, 2.0)


def by_id(st):
    return {s["id"]: s for s in st["stages"]}


def test_partial_local_run_counts_throughput_eta(tmp_path):
    store = open_store(str(tmp_path / "run"))
    build_partial_run(store)
    st = StatusReader(store, SPECS, now=lambda: T0 + 130).read()
    s = by_id(st)
    raw = s["raw"]
    assert (raw["state"], raw["units_done"], raw["units_total"]) == ("done", 4, 4)
    assert (raw["samples_done"], raw["samples_total"], raw["out"], raw["quarantined"]) == (40, 40, 36, 4)
    # started at the first marker minus its 5 s of work (T0+5), complete at T0+40: 40 samples in 35 s
    assert raw["started_at"] == T0 + 5 and raw["elapsed_s"] == 35
    assert raw["throughput_sps"] == pytest.approx(40 / 35) and raw["eta_s"] == 0
    sl = s["score_length"]
    assert (sl["state"], sl["units_done"], sl["units_total"]) == ("running", 2, 4)
    # 18 of the 36 samples raw kept; running since T0+90, now T0+130: 0.45 samples/s, 18 left: 40 s
    assert (sl["samples_done"], sl["samples_total"], sl["samples_total_estimated"]) == (18, 36, False)
    assert sl["throughput_sps"] == pytest.approx(0.45) and sl["eta_s"] == pytest.approx(40)
    d = s["dedup"]
    assert (d["state"], d["units_done"], d["stale_units"], d["fitted_at"]) == ("running", 1, 1, T0 + 200)
    # one shard of 9 since T0+208 (its marker minus 2 s); the clock is behind that marker: elapsed 2 s
    assert d["samples_done"] == 9 and d["throughput_sps"] == pytest.approx(4.5)
    assert d["eta_s"] == pytest.approx(27 / 4.5)
    sel = s["select"]
    assert (sel["state"], sel["units_done"], sel["units_total"], sel["throughput_sps"], sel["eta_s"]) == \
        ("pending", 0, 1, None, None)
    assert st["complete"] is False and st["not_counted"] == ["stages/score_length/zzzz"]
    assert d["units_trained"] is None
    text = "\n".join(format_status(st))
    assert "1 shard(s) from an older fit" in text and "stages/score_length/zzzz" in text
    # the clock moves on with no new marker: throughput falls and the ETA grows
    later = by_id(StatusReader(store, SPECS, now=lambda: T0 + 170).read())["score_length"]
    assert later["throughput_sps"] == pytest.approx(18 / 80) and later["eta_s"] == pytest.approx(80)


def test_without_a_recipe_every_output_counts_and_totals_are_estimated(tmp_path):
    store = open_store(str(tmp_path / "run"))
    build_partial_run(store)
    os.remove(store.uri("raw/_done/shard-000003"))  # ingest still running: downstream totals are estimates
    st = StatusReader(store, now=lambda: T0 + 130).read()
    s = {x["prefix"]: x for x in st["stages"]}
    assert set(s) == {"raw", "stages/score_length/aaaa", "stages/score_length/zzzz", "stages/dedup/bbbb"}
    assert st["not_counted"] == [] and s["stages/dedup/bbbb"]["kind"] == "fit"
    assert (s["raw"]["state"], s["raw"]["units_done"], s["raw"]["samples_total"]) == ("running", 3, 40)
    sl = s["stages/score_length/aaaa"]
    assert sl["units_total"] == 4 and sl["samples_total"] == 36 and sl["samples_total_estimated"] is True


def test_stale_global_and_missing_stats(tmp_path):
    store = open_store(str(tmp_path / "run"))
    build_partial_run(store)
    put(store, "select/select/cccc/_stats/all.json", {"in": 36, "out": 20, "quarantined": 0, "dropped": 16,
                                                      "seconds": 3.0})
    put(store, "select/select/cccc/_done/all", "inputs:x", T0 + 300)
    s = by_id(StatusReader(store, SPECS, now=lambda: T0 + 400).read())["select"]
    assert (s["state"], s["units_done"], s["samples_done"], s["dropped"]) == ("done", 1, 36, 16)
    assert s["throughput_sps"] == pytest.approx(12.0)
    unit(store, "raw", 4, T0 + 350, 10, 10, 1.0)  # a scheduled re-curation added a raw shard
    s = by_id(StatusReader(store, SPECS, now=lambda: T0 + 400).read())["select"]
    assert (s["state"], s["units_done"]) == ("stale", 0)
    put(store, "stages/score_length/aaaa/_done/shard-000002", "", T0 + 120)  # a marker without its stats
    s = by_id(StatusReader(store, SPECS, now=lambda: T0 + 400).read())["score_length"]
    assert s["units_done"] == 3 and s["problems"] == ["shard-000002: done marker without readable stats"]


def test_s3_partial_run_lists_once_per_stage(s3_bucket):
    import time

    store = open_store(f"{s3_bucket}/run")
    build_partial_run(store, s3_sleep=lambda: time.sleep(1.05))
    client = store.client
    bucket, _ = split_s3_url(s3_bucket)
    calls = []

    def count(model, **_):
        calls.append(model.name)

    client.meta.events.register("before-call.s3", count)
    try:
        marker_t = client.head_object(Bucket=bucket, Key="run/stages/score_length/aaaa/_done/shard-000001")
        now = marker_t["LastModified"].timestamp() + 20
        reader = StatusReader(store, SPECS, now=lambda: now)
        calls.clear()
        s = by_id(reader.read())
        first = list(calls)
        calls.clear()
        reader.read()
        second = list(calls)
    finally:
        client.meta.events.unregister("before-call.s3", count)
    assert (s["raw"]["units_done"], s["raw"]["samples_done"], s["raw"]["state"]) == (4, 40, "done")
    sl = s["score_length"]
    assert (sl["units_done"], sl["samples_done"], sl["samples_total"]) == (2, 18, 36)
    # both markers were written within a second or two; the stats' 10 s of work dominate the elapsed time
    assert sl["elapsed_s"] == pytest.approx(30, abs=3) and sl["throughput_sps"] == pytest.approx(18 / sl["elapsed_s"])
    assert sl["eta_s"] == pytest.approx(18 / sl["throughput_sps"])
    d = s["dedup"]
    assert (d["units_done"], d["stale_units"], d["state"]) == (1, 1, "running")
    # one listing of _done per stage (raw, 3 stages), the delimiter listings that find outputs (3 roots,
    # 2 stage ids) and one of the fit stage's trainer units: none per shard
    assert first.count("ListObjectsV2") == 4 + 5 + 1
    # a GET per done unit's stats (4 raw + 2 + 1) and of the ingest manifest (after its HEAD)
    assert first.count("GetObject") == 4 + 2 + 1 + 1 and first.count("HeadObject") == 1
    # a refresh re-lists but reads no stats it already has
    assert second.count("GetObject") == 1 and second.count("ListObjectsV2") == first.count("ListObjectsV2")


def test_watch_stops_when_every_stage_is_done(tmp_path):
    store = open_store(str(tmp_path / "run"))
    build_partial_run(store)
    specs = SPECS[:2]
    clock = [T0 + 130]
    pending = [2, 3]
    seen = []

    def sleep(s):  # the next shard completes while we wait
        clock[0] += s
        if pending:
            unit(store, "stages/score_length/aaaa", pending.pop(0), clock[0], 9, 9, 10.0)

    st = watch(StatusReader(store, specs, now=lambda: clock[0]), 10, seen.append, sleep=sleep, max_refreshes=10)
    assert st["complete"] is True and len(seen) == 3
    assert [by_id(x)["score_length"]["units_done"] for x in seen] == [2, 3, 4]
    assert by_id(st)["score_length"]["eta_s"] == 0
    # an unfinished run stops at the bound
    seen.clear()
    st = watch(StatusReader(store, SPECS, now=lambda: clock[0]), 10, seen.append, sleep=lambda s: None,
               max_refreshes=3)
    assert st["complete"] is False and len(seen) == 3


def tiny_recipe(prefix, src, budget=6):
    return {"name": "t", "storage": {"prefix": prefix}, "workers": 1, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": f"{src}/data.json", "images": src,
                                     "shard_size": 4}},
        {"stage": "score_length"},
        {"stage": "select", "with": {"thresholds": {"score_length.words": {"min": 1}},
                                     "rank_by": "score_length.words", "budget": budget}},
        {"stage": "export", "with": {"formats": ["llava"], "shard_size": 10}}]}


def test_real_run_with_recipe_and_cli(tmp_path, photos):
    import yaml

    src = tmp_path / "src"
    images = {f"{n}.jpg": jpeg_bytes(img) for n, img in photos.items()}
    recs = [llava(f"r{i}", f"images/{n}", a="word " * (i + 1)) for i, n in enumerate(list(images) * 2)]
    recs.append(llava("broken", "images/missing.jpg"))
    write_dataset(str(src), recs, images)
    prefix = str(tmp_path / "run")
    run_recipe(load_recipe(tiny_recipe(prefix, str(src))), progress=False)
    store = open_store(prefix)
    st = StatusReader(store, planned_specs(load_recipe(tiny_recipe(prefix, str(src))))).read()
    s = by_id(st)
    assert st["complete"] and [x["state"] for x in st["stages"]] == ["done"] * 4
    assert (s["ingest"]["units_done"], s["ingest"]["samples_done"], s["ingest"]["quarantined"]) == (3, 11, 1)
    assert (s["score_length"]["units_done"], s["score_length"]["samples_done"]) == (3, 10)
    assert (s["select"]["kind"], s["select"]["out"], s["select"]["dropped"]) == ("global", 6, 4)
    assert all(x["throughput_sps"] > 0 for x in st["stages"])
    # a changed budget is a new configuration of select and export: they have not run yet
    rpath = tmp_path / "recipe.yaml"
    rpath.write_text(yaml.safe_dump(tiny_recipe(prefix, str(src), budget=3)))
    r = subprocess.run(CURATE + ["status", prefix, "--recipe", str(rpath), "--json"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert [x["state"] for x in j["stages"]] == ["done", "done", "pending", "pending"] and not j["complete"]
    assert sorted(p.split("/")[0] for p in j["not_counted"]) == ["export", "select"]
    # text output; --watch returns at once on a complete run
    r = subprocess.run(CURATE + ["status", prefix, "--watch", "0.01"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0 and "complete" in r.stdout.splitlines()[0] and "score_length" in r.stdout
    r = subprocess.run(CURATE + ["status", prefix, "--watch", "0.01", "--json"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 1 and json.loads(lines[0])["complete"] is True


def test_llm_counters_and_batches_in_flight(tmp_path):
    store = open_store(str(tmp_path / "run"))
    build_partial_run(store)
    prefix = "stages/judge_score/dddd"
    for i, (tokens, cost) in enumerate([(1000, 0.25), (500, 0.125)]):
        put(store, f"{prefix}/_stats/shard-{i:06d}.json", {
            "in": 9, "out": 8, "quarantined": 1, "dropped": 0, "seconds": 30.0,
            "llm": {"requests": 10, "cache_hits": 2, "prompt_tokens": tokens, "completion_tokens": 100,
                    "cost_usd": cost, "model": "m", "errors": {}}})
        put(store, f"{prefix}/_done/shard-{i:06d}", "", T0 + 300 + i)
    put(store, "judge_cache/_batches/abc.json", {"batch_id": "batch_1", "n": 7, "created": T0 + 250})
    specs = SPECS[:1] + [StageSpec("judge_score", prefix, "shard", llm_cache="judge_cache")]
    st = StatusReader(store, specs, now=lambda: T0 + 310).read()
    s = by_id(st)["judge_score"]
    assert s["llm"] == {"requests": 20, "cache_hits": 4, "shared": 0, "retries": 0, "succeeded": 0, "failed": 0,
                        "prompt_tokens": 1500, "completion_tokens": 200, "cost_usd": 0.375}
    assert (s["quarantined"], s["samples_done"]) == (2, 18)
    assert st["llm_batches"] == [{"cache": "judge_cache", "batch_id": "batch_1", "requests": 7,
                                  "submitted_at": T0 + 250, "age_s": 60.0}]
    text = "\n".join(format_status(st))
    assert "llm: 20 requests, 4 cached, 1,700 tokens, $0.3750" in text
    assert "LLM batches in flight: 1 (7 requests), oldest submitted 1m00s ago" in text


def test_training_units_of_a_train_stage(tmp_path):
    store = open_store(str(tmp_path / "run"))
    build_partial_run(store)
    units = "stages/dedup/bbbb/_units"
    put(store, f"{units}/3/_done", "sig")
    put(store, f"{units}/3/result.json", {"eval_loss": 1.0})
    put(store, f"{units}/7/trainer.log", "running")   # uploaded logs of a unit not finished
    st = StatusReader(store, SPECS, now=lambda: T0 + 300).read()
    assert by_id(st)["dedup"]["units_trained"] == 1
    assert "1 training unit(s) finished" in "\n".join(format_status(st))


@pytest.mark.slow
def test_status_follows_an_argo_run_on_s3(tmp_path, photos, s3_bucket, monkeypatch):
    """The rendered workflow executed pod by pod against moto S3 (tests/argo_exec.py) while ``status``
    polls the store: progress only grows, some refresh sees the run part-way, the last one is complete
    and agrees with ``curate audit``."""
    import threading
    import time

    from libcurate.audit import audit, current_prefixes

    from .argo_exec import ArgoExecutor
    from .test_argo_exec import ok, render_docs, s3_secret, small_batches, upload

    src = tmp_path / "src"
    images = {f"{n}.jpg": jpeg_bytes(img) for n, img in photos.items()}
    write_dataset(str(src), [llava(f"r{i}", f"images/{n}", a="word " * (i + 1))
                             for i, n in enumerate(list(images) * 3)], images)
    upload(src, f"{s3_bucket}/src")
    argo = f"{s3_bucket}/argo"
    small_batches(monkeypatch, 1)  # one pod per shard: markers appear one by one
    docs, path = render_docs(tiny_recipe(argo, f"{s3_bucket}/src"), tmp_path, argo)
    recipe = load_recipe(path)
    reader = StatusReader(open_store(argo), planned_specs(recipe))
    result, snaps = [], []
    pods = threading.Thread(target=lambda: result.append(
        ArgoExecutor(docs, secrets=s3_secret(), max_pods=2, workdir=str(tmp_path / "exec")).run()))
    pods.start()
    while pods.is_alive():
        snaps.append(reader.read())
        time.sleep(0.2)
    pods.join()
    ok(result[0])
    final = reader.read()
    assert final["complete"] and [s["state"] for s in final["stages"]] == ["done"] * 4
    assert any(not s["complete"] and any(x["units_done"] for x in s["stages"]) for s in snaps), len(snaps)
    for i in range(4):
        seq = [s["stages"][i]["units_done"] for s in snaps + [final]]
        assert seq == sorted(seq), (final["stages"][i]["id"], seq)
    rep = audit(open_store(argo), current_prefixes(recipe))
    for s in final["stages"]:
        a = rep["stages"][s["prefix"]]
        assert (s["units_done"], s["samples_done"], s["out"], s["quarantined"], s["dropped"]) == \
            (a["units_done"], a["in"], a["out"], a["quarantined"], a["dropped"])
    assert final["stages"][0]["units_total"] == 4 and all(s["throughput_sps"] > 0 for s in final["stages"])


def test_raw_planned_by_retrieve(tmp_path):
    store = open_store(str(tmp_path / "run"))
    put(store, "raw/_retrieve.json", {"n_shards": 3, "n_records": 25})
    unit(store, "raw", 0, T0 + 10, 10, 10, 5.0)
    s = by_id(StatusReader(store, SPECS[:1], now=lambda: T0 + 15).read())["raw"]
    assert (s["units_done"], s["units_total"], s["samples_done"], s["samples_total"]) == (1, 3, 10, 25)
    # 10 samples in 10 s: 15 left take 15 s
    assert s["throughput_sps"] == pytest.approx(1.0) and s["eta_s"] == pytest.approx(15)
