"""``curate inspect``: a sample's journey says what the run's files say (decision, cluster, duplicate group,
quarantine) and where the export really put it."""

from __future__ import annotations

import glob
import json

import pytest
import webdataset as wds

from libcurate.cli import main
from libcurate.columns import KEY_COL, read_columns
from libcurate.pipeline import load_recipe, plan
from libcurate.select.stage import read_decisions
from libcurate.shards import iter_samples
from libcurate.stage import raw_shards
from libcurate.storage import open_store
from tests.report_run import curated_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = curated_run(tmp_path_factory)
    store = open_store(r["prefix"])
    p = {x.id: x for x in plan(load_recipe(r["recipe"]))}
    decisions, source, shard_of = {}, {}, {}
    for sh in raw_shards(store):
        for d in read_decisions(store, p["select"].prefix, sh):
            decisions[d["key"]] = d
            shard_of[d["key"]] = sh
        for s in iter_samples(store, f"raw/{sh}", with_images=False):
            source[s.key] = s.source.original_id
    cluster = {}
    for sh in raw_shards(store):
        cols = read_columns(store, p["cluster"].prefix, sh)
        cluster.update(zip(cols[KEY_COL].astype(str).tolist(), cols["f:cluster"].astype(int).tolist()))
    r.update(store=store, plan=p, decisions=decisions, source=source, cluster=cluster, shard_of=shard_of)
    return r


def journey(capsys, *args) -> dict | list:
    capsys.readouterr()
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dropped_sample(run, capsys):
    key, d = next((k, d) for k, d in run["decisions"].items() if d["reason"] and
                  d["reason"].startswith("near_duplicate_of"))
    j = journey(capsys, run["prefix"], key)
    assert j["key"] == key and j["raw_shard"] == run["shard_of"][key]
    assert j["selection"] == {"prefix": run["plan"]["select"].prefix, "selected": False, "rank": None,
                              "score": d["score"], "reason": d["reason"]}
    assert j["cluster"]["cluster"] == run["cluster"][key]
    assert j["duplicate_group"]["group"] == j["stages"]["dedup"]["fields"]["group"]
    assert d["reason"].split()[1] == j["duplicate_group"]["group"] or j["duplicate_group"]["group_rank"] > 0
    assert j["export"] == {"prefix": run["plan"]["export"].prefix, "exported": False}
    assert j["source"]["original_id"] == run["source"][key] and j["source"]["format"] == "llava"
    assert set(j["stages"]) == {"score_length", "score_clip", "hash_image", "dedup", "cluster", "judge_score"}
    capsys.readouterr()
    assert main(["inspect", run["prefix"], key]) == 0
    assert f"selection: DROPPED: {d['reason']}" in capsys.readouterr().out


def test_kept_sample_and_where_it_was_exported(run, capsys):
    key, d = next((k, d) for k, d in run["decisions"].items() if d["selected"] and d["rank"] == 3)
    j = journey(capsys, run["prefix"], key)
    assert j["selection"]["selected"] is True and j["selection"]["rank"] == 3 and j["quarantined"] is None
    assert j["cluster"]["cluster"] == run["cluster"][key]
    ex = j["export"]
    root = run["prefix"] + "/"
    tar = wds.WebDataset(root + ex["webdataset"]["shard"], shardshuffle=False)
    assert [m["__key__"] for m in tar][ex["webdataset"]["position"]] == key
    llava = json.load(open(root + ex["llava"]["file"]))
    assert llava[ex["llava"]["index"]]["id"] == key
    capsys.readouterr()
    assert main(["inspect", run["prefix"], key]) == 0
    assert "selection: KEPT, rank 3" in capsys.readouterr().out
    # the same sample found by its id in the source dataset
    found = journey(capsys, run["prefix"], "--source-id", run["source"][key])
    assert [x["key"] for x in found] == [key] and found[0] == j


def test_every_kept_sample_is_found_where_the_export_wrote_it(run):
    from libcurate.inspect import inspect
    from libcurate.report.run import locate

    root = run["prefix"] + "/"
    exp = run["plan"]["export"].prefix
    tars = {}
    for i in range(len(glob.glob(f"{root}{exp}/webdataset/*.tar"))):
        name = f"{exp}/webdataset/shard-{i:06d}.tar"
        tars[name] = [m["__key__"] for m in wds.WebDataset(root + name, shardshuffle=False)]
    llava = [x["id"] for x in json.load(open(f"{root}{exp}/llava/data.json"))]
    view = locate(run["store"])
    kept = [k for k, d in run["decisions"].items() if d["selected"]]
    assert len(kept) == 12 and len(tars) == 3
    for key in kept:
        ex = inspect(view, key=key)[0]["export"]
        assert tars[ex["webdataset"]["shard"]][ex["webdataset"]["position"]] == key
        assert llava[ex["llava"]["index"]] == key


def test_quarantined_sample_names_the_stage_and_reason(run, capsys):
    key = next(k for k, d in run["decisions"].items()
               if not d["selected"] and d["reason"].startswith("quarantined: judge_score"))
    j = journey(capsys, run["prefix"], key)
    assert j["quarantined"] == "judge_score: unparseable_reply"
    assert j["stages"]["judge_score"]["status"] == "quarantined"
    assert j["selection"]["reason"] == "quarantined: judge_score: unparseable_reply"


def test_unknown_key_is_a_clear_error(run, capsys):
    assert main(["inspect", run["prefix"], "0" * 24]) == 3
    assert "no sample with key 000000000000000000000000" in capsys.readouterr().err
    assert main(["inspect", run["prefix"], "--source-id", "no-such-id"]) == 3
    assert main(["inspect", run["prefix"]]) == 2


@pytest.mark.slow
def test_export_place_counts_the_generated_samples_before_it(tmp_path):
    """Generated samples are raw samples of the run: inspect finds the exported place of kept ingested and
    kept generated samples alike."""
    from libcurate.demo import build
    from libcurate.inspect import inspect
    from libcurate.llm.testing import FakeOpenAIServer
    from libcurate.report.run import locate
    from libcurate.runner import run_recipe

    src = str(tmp_path / "src")
    build(src, copies=1)
    prefix = str(tmp_path / "run")
    with FakeOpenAIServer(default_text="A detailed caption " + " ".join(["word"] * 40)) as srv:
        d = {"storage": {"prefix": prefix}, "stages": [
            {"stage": "ingest", "with": {"format": "llava", "annotations": f"{src}/data.json", "images": src,
                                         "shard_size": 8}},
            {"stage": "generate_caption", "with": {"llm": {"model": "gen", "base_url": srv.base_url,
                                                           "backoff_base_s": 0.002, "max_attempts": 2}}},
            {"stage": "score_length"},
            {"stage": "select", "with": {"score": "score_length.words", "budget": 20}},
            {"stage": "export", "with": {"formats": ["webdataset", "llava"], "shard_size": 4}}]}
        run_recipe(load_recipe(d), progress=False)
    store = open_store(prefix)
    exp = next(p for p in plan(load_recipe(d)) if p.stage == "export").prefix
    tars = {f"{exp}/webdataset/{n}": [m["__key__"] for m in wds.WebDataset(f"{prefix}/{exp}/webdataset/{n}",
                                                                             shardshuffle=False)]
            for n in store.list(f"{exp}/webdataset")}
    llava = [x["id"] for x in json.load(open(f"{prefix}/{exp}/llava/data.json"))]
    flags = [x["generated"] for x in json.load(open(f"{prefix}/{exp}/llava/data.json"))]
    assert len(llava) == 20 and 0 < sum(flags) < 20   # kept ingested and kept generated samples
    view = locate(store)
    sel = next(p for p in plan(load_recipe(d)) if p.stage == "select").prefix
    kept = [x["key"] for sh in raw_shards(store) for x in read_decisions(store, sel, sh) if x["selected"]]
    for key in kept:
        ex = inspect(view, key=key)[0]["export"]
        assert tars[ex["webdataset"]["shard"]][ex["webdataset"]["position"]] == key
        assert llava[ex["llava"]["index"]] == key
