"""The local runner and the stage contract end to end: re-runs, crashes, audit, select, export round trip."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from libcurate.audit import audit
from libcurate.demo import build
from libcurate.pipeline import load_recipe, plan
from libcurate.runner import format_shard_spec, parse_shard_spec, run_recipe
from libcurate.select.stage import read_decisions
from libcurate.shards import iter_members, iter_samples
from libcurate.stage import raw_shards
from libcurate.storage import open_store

from .test_ingest import ingest, llava, write_dataset
from .conftest import jpeg_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURATE = [sys.executable, "-m", "libcurate.cli"]


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "source"
    build(str(out), copies=3)
    return str(out)


def recipe_dict(prefix, src, workers=2, budget=30, shard_size=8):
    return {"name": "t", "storage": {"prefix": prefix}, "workers": workers, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": f"{src}/data.json", "images": src,
                                     "shard_size": shard_size}},
        {"stage": "score_length"},
        {"stage": "select", "with": {"thresholds": {"score_length.words": {"min": 3}},
                                     "rank_by": "score_length.words", "budget": budget}},
        {"stage": "export", "with": {"formats": ["webdataset", "llava", "cc_sbu_align"], "shard_size": 10}}]}


def snapshot(root):
    """path -> (bytes, mtime_ns) of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


def comparable(snap):
    """Contents with the wall-clock timings in stats removed (they legitimately differ run to run)."""
    out = {}
    for k, (data, _) in snap.items():
        if "/_stats/" in f"/{k}" and k.endswith(".json"):
            d = json.loads(data)
            d.pop("seconds", None)
            data = json.dumps(d, sort_keys=True).encode()
        out[k] = data
    return out


def test_shard_spec_roundtrip():
    assert parse_shard_spec("0-3,7, 9-10") == [0, 1, 2, 3, 7, 9, 10]
    assert format_shard_spec([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    assert format_shard_spec([]) == ""


def test_second_run_does_no_work_and_is_byte_identical(tmp_path, demo_src):
    prefix = str(tmp_path / "run")
    recipe = load_recipe(recipe_dict(prefix, demo_src))
    runs = run_recipe(recipe, progress=False)
    assert not any(r.skipped for r in runs)
    before = snapshot(prefix)
    runs2 = run_recipe(recipe, progress=False)
    assert all(r.skipped for r in runs2)
    assert snapshot(prefix) == before  # same bytes and untouched mtimes
    rep = audit(open_store(prefix))
    assert rep["ok"]
    raw = rep["stages"]["raw"]
    planted = json.load(open(os.path.join(demo_src, "planted.json")))
    broken = sum(len(planted[k]) for k in ("corrupt_image", "empty_image", "missing_image", "empty_answer",
                                           "roles_out_of_order"))
    assert raw["quarantined"] == broken and raw["in"] == raw["out"] + broken


def test_select_thresholds_budget_and_reasons(tmp_path, demo_src):
    prefix = str(tmp_path / "run")
    recipe = load_recipe(recipe_dict(prefix, demo_src, budget=12))
    run_recipe(recipe, progress=False)
    store = open_store(prefix)
    sel = next(p for p in plan(recipe) if p.stage == "select").prefix
    decisions = [d for sh in raw_shards(store) for d in read_decisions(store, sel, sh)]
    kept = sorted((d for d in decisions if d["selected"]), key=lambda d: d["rank"])
    assert len(kept) == 12 and [d["rank"] for d in kept] == list(range(1, 13))
    assert all(a["score"] >= b["score"] for a, b in zip(kept, kept[1:]))
    dropped = [d for d in decisions if not d["selected"]]
    assert dropped and all(d["reason"] for d in dropped)
    over = [d for d in dropped if d["reason"].startswith("over_budget")]
    assert over and max(d["score"] for d in over) <= kept[-1]["score"]
    assert len(decisions) == audit(store)["stages"]["raw"]["out"]
    planted = json.load(open(os.path.join(demo_src, "planted.json")))
    dups = [d for d in dropped if d["reason"].startswith("exact_duplicate")]
    assert len(dups) == len(planted["exact_duplicate"])


def test_threshold_drops_short_answers(tmp_path, photos):
    files = {"a.jpg": jpeg_bytes(photos["coffee"]), "b.jpg": jpeg_bytes(photos["rocket"])}
    ann = write_dataset(tmp_path / "src", [llava("short", "images/a.jpg", a="Cup."),
                                           llava("long", "images/b.jpg", a="A rocket on its launch pad.")], files)
    prefix = str(tmp_path / "run")
    run_recipe(load_recipe({"storage": {"prefix": prefix}, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": ann, "images": str(tmp_path / "src")}},
        {"stage": "score_length"},
        {"stage": "select", "with": {"thresholds": {"score_length.words": {"min": 3}}}}]}), progress=False)
    store = open_store(prefix)
    sel = [p for p in store.list("select") if "/decisions/" in p]
    (d1, d2) = [json.loads(x) for x in store.read_text("select/" + sel[0]).splitlines()]
    assert (d1["selected"], d2["selected"]) == (False, True)
    assert d1["reason"].startswith("below_min: score_length.words=1")


def test_export_roundtrip_llava_gives_same_records(tmp_path, demo_src):
    prefix = str(tmp_path / "run")
    recipe = load_recipe(recipe_dict(prefix, demo_src, budget=1000))
    run_recipe(recipe, progress=False)
    store = open_store(prefix)
    exp = next(p for p in plan(recipe) if p.stage == "export").prefix
    summary = json.loads(store.read_text(f"{exp}/summary.json"))
    n = summary["formats"]["llava"]
    assert n == summary["formats"]["webdataset"] == summary["selected"]
    assert store.exists(f"{exp}/report.html") and store.exists(f"{exp}/cc_sbu_align/filter_cap.json")
    # multi-turn samples do not fit cc_sbu_align: listed with a reason, never silently skipped
    assert summary["formats"]["cc_sbu_align"] + len(summary["cc_sbu_align_skipped"]) == n
    _, back, quarantine = ingest(str(tmp_path / "again"), store.uri(f"{exp}/llava/data.json"),
                                 store.uri(f"{exp}/llava"), shard_size=1000)
    assert quarantine == []
    sel = next(p for p in plan(recipe) if p.stage == "select").prefix
    kept = {d["key"] for sh in raw_shards(store) for d in read_decisions(store, sel, sh) if d["selected"]}
    orig = {s.key: s for sh in raw_shards(store) for s in iter_samples(store, f"raw/{sh}") if s.key in kept}
    assert {s.key for s in back} == set(orig)
    def record(s):  # the image's file name is provenance of the copy, not part of the sample
        d = s.to_dict()
        for im in d["images"]:
            im.pop("name")
        return d

    for s in back:
        assert record(s) == record(orig[s.key])
        assert [im.data for im in s.images] == [im.data for im in orig[s.key].images]


def test_cli_audit_json_and_status(tmp_path, demo_src):
    prefix = str(tmp_path / "run")
    run_recipe(load_recipe(recipe_dict(prefix, demo_src)), progress=False)
    r = subprocess.run(CURATE + ["audit", prefix, "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] is True and set(rep["stages"]["raw"]) >= {"in", "out", "quarantined"}
    r = subprocess.run(CURATE + ["status", prefix], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "raw" in r.stdout
    # break the accounting: audit must say so and exit non-zero
    stats = next((tmp_path / "run" / "raw" / "_stats").iterdir())
    d = json.loads(stats.read_text())
    d["in"] += 1
    stats.write_text(json.dumps(d))
    r = subprocess.run(CURATE + ["audit", prefix, "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False


def test_job_entrypoint_exit_codes_and_batches(tmp_path, demo_src):
    prefix = str(tmp_path / "run")
    rpath = tmp_path / "recipe.yaml"
    import yaml

    rpath.write_text(yaml.safe_dump(recipe_dict(prefix, demo_src)))
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], capture_output=True, text=True, cwd=ROOT)
    assert run("jobs", "ingest", "--recipe", str(rpath)).returncode == 0
    r = run("jobs.plan_batches", "--recipe", str(rpath), "--stage-id", "score_length", "--batch-size", "3")
    batches = json.loads(r.stdout)
    n = len(raw_shards(open_store(prefix)))
    assert sum(len(parse_shard_spec(b["shards"])) for b in batches) == n and len(batches) == -(-n // 3)
    assert run("jobs", "score_length", "--recipe", str(rpath), "--shards", batches[0]["shards"]).returncode == 0
    r = run("jobs.plan_batches", "--recipe", str(rpath), "--stage-id", "score_length", "--batch-size", "3")
    assert len(json.loads(r.stdout)) == len(batches) - 1  # the done batch is no longer listed
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{stage: ingest, with: {format: nope}}]\nstorage: {prefix: x}\n")
    assert run("jobs", "ingest", "--recipe", str(bad)).returncode == 3


def test_sigkill_mid_stage_then_rerun_is_identical(tmp_path, photos):
    """Kill ingest with SIGKILL after its first shard completes; the re-run ends identical to a clean run."""
    files, recs = {}, []
    names = list(photos)
    for i in range(240):
        name = f"{i}.jpg"
        files[name] = jpeg_bytes(photos[names[i % len(names)]], size=(160 + i % 40, 120))
        recs.append(llava(str(i), f"images/{name}", a=f"Photo number {i}."))
    ann = write_dataset(tmp_path / "src", recs, files)
    import yaml

    def recipe(prefix):
        p = tmp_path / f"{os.path.basename(prefix)}.yaml"
        p.write_text(yaml.safe_dump({"storage": {"prefix": prefix}, "workers": 1, "stages": [
            {"stage": "ingest", "with": {"format": "llava", "annotations": ann, "images": str(tmp_path / "src"),
                                         "shard_size": 20}},
            {"stage": "score_length"}]}))
        return str(p)

    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    subprocess.run(CURATE + ["run", recipe(clean), "--no-progress"], check=True, cwd=ROOT, capture_output=True)
    proc = subprocess.Popen(CURATE + ["run", recipe(crashed), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = os.path.join(crashed, "raw", "_done")
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.isdir(done_dir) and os.listdir(done_dir)):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(os.listdir(done_dir)) < 12, "the kill came too late to interrupt the stage"
    subprocess.run(CURATE + ["run", recipe(crashed), "--no-progress"], check=True, cwd=ROOT, capture_output=True)
    a, b = comparable(snapshot(clean)), comparable(snapshot(crashed))
    assert a.keys() == b.keys()
    assert a == b
    assert audit(open_store(crashed))["ok"]


def test_appended_records_are_new_shards_and_selection_reruns(tmp_path, photos):
    """Scheduled re-curation: records appended to the annotations land in new shards (done shards never
    change), only those are scored, and select/export run again over everything."""
    names = list(photos)
    files = {f"{i}.jpg": jpeg_bytes(photos[names[i % len(names)]], size=(64 + i, 64)) for i in range(14)}
    recs = [llava(str(i), f"images/{i}.jpg", a=f"Photo number {i} of the set.") for i in range(14)]
    ann = write_dataset(tmp_path / "src", recs[:10], files)
    prefix = str(tmp_path / "run")
    recipe = load_recipe(recipe_dict(prefix, str(tmp_path / "src"), shard_size=4, budget=100))
    recipe.stages[0]["with"]["annotations"] = ann
    run_recipe(recipe, progress=False)
    store = open_store(prefix)
    first = snapshot(os.path.join(prefix, "raw"))
    assert raw_shards(store) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    json.dump(recs, open(ann, "w"))  # 4 records appended
    runs = {r.id: r for r in run_recipe(recipe, progress=False)}
    assert runs["ingest"].shards_done == 1 and runs["score_length"].shards_done == 1
    assert not runs["select"].skipped and not runs["export"].skipped
    after = snapshot(os.path.join(prefix, "raw"))
    assert all(after[k] == v for k, v in first.items() if "shard-00000" in k and "_ingest" not in k)
    rep = audit(store)
    assert rep["ok"] and rep["stages"]["raw"]["out"] == 14
    sel = next(a for p, a in rep["stages"].items() if p.startswith("select/"))
    assert sel["in"] == 14
    assert all(r.skipped for r in run_recipe(recipe, progress=False))
    json.dump(recs[1:], open(ann, "w"))  # an edit, not an append: refused
    from libcurate.stage import PermanentInputError

    with pytest.raises(PermanentInputError, match="changed"):
        run_recipe(recipe, progress=False)


def test_operational_llm_settings_do_not_change_the_config_hash(tmp_path):
    def judge_hash(llm):
        r = load_recipe({"storage": {"prefix": str(tmp_path)}, "stages": [
            {"stage": "ingest", "with": {"format": "llava", "annotations": "a.json", "images": "."}},
            {"stage": "judge_score", "with": {"llm": llm}}]})
        return plan(r)[1].cfg_hash

    base = judge_hash({"model": "m"})
    assert judge_hash({"model": "m", "concurrency": 128, "requests_per_minute": 600, "timeout_s": 5}) == base
    assert judge_hash({"model": "m2"}) != base
    assert judge_hash({"model": "m", "temperature": 0.7}) != base


def test_export_includes_generated_samples(tmp_path, demo_src):
    """ingest -> generate_caption (fake OpenAI server) -> score_length -> select -> export: the captions
    are raw samples of the run (scored and selected like ingested ones) and the export marks them."""
    from libcurate.llm.testing import FakeOpenAIServer
    caption = "A detailed caption " + " ".join(["word"] * 40)
    prefix = str(tmp_path / "run")
    with FakeOpenAIServer(default_text=caption) as srv:
        d = recipe_dict(prefix, demo_src, budget=100)
        d["stages"].insert(1, {"stage": "generate_caption", "with": {"llm": {
            "model": "gen", "base_url": srv.base_url, "backoff_base_s": 0.002, "max_attempts": 2}}})
        recipe = load_recipe(d)
        run_recipe(recipe, progress=False)
    store = open_store(prefix)
    exp = next(p for p in plan(recipe) if p.stage == "export").prefix
    summary = json.loads(store.read_text(f"{exp}/summary.json"))
    out = [s for name in store.list(f"{exp}/webdataset") for s in iter_samples(store, f"{exp}/webdataset/{name}")]
    gen = [s for s in out if s.source.original_format == "generated"]
    src = [s for s in out if s.source.original_format != "generated"]
    assert summary["generated_exported"] == len(gen) > 0 and summary["source_exported"] == len(src) > 0
    assert summary["generated_by_stage"] == {"generate_caption": len(gen)} and summary["exported"] == len(out)
    assert len({s.key for s in out}) == len(out)
    from libcurate.stage import is_generated_shard, raw_shards
    raw_keys = {s.key for name in raw_shards(store) if not is_generated_shard(name)
                for s in iter_samples(store, f"raw/{name}", with_images=False)}
    assert all(s.metadata["generated_from"] in raw_keys and s.conversations[1].value == caption for s in gen)
    llava = json.loads(store.read_text(f"{exp}/llava/data.json"))
    assert sum(r["generated"] for r in llava) == len(gen) and len(llava) == len(out)
    assert audit(store)["ok"]


def test_records_appended_to_an_empty_file_are_not_lost(tmp_path, photos):
    ann = write_dataset(tmp_path / "src", [], {"a.jpg": jpeg_bytes(photos["coffee"])})
    prefix = str(tmp_path / "run")
    _, samples, _ = ingest(prefix, ann, str(tmp_path / "src"))
    assert samples == []
    json.dump([llava("1", "images/a.jpg")], open(ann, "w"))
    _, samples, quarantine = ingest(prefix, ann, str(tmp_path / "src"))
    assert [s.source.original_id for s in samples] == ["1"] and quarantine == []
    assert audit(open_store(prefix))["ok"]


def test_audit_with_recipe_ignores_outputs_of_old_configurations(tmp_path, demo_src):
    from libcurate.audit import current_prefixes

    prefix = str(tmp_path / "run")
    old = load_recipe(recipe_dict(prefix, demo_src, budget=5))
    run_recipe(old, progress=False, only=["ingest", "score_length"])
    store = open_store(prefix)
    length = next(p for p in plan(old) if p.stage == "score_length").prefix
    store.delete(f"{length}/_done/shard-000000")  # the old configuration never finished
    new = load_recipe(recipe_dict(prefix, demo_src, budget=5))
    new.stages[1] = {"stage": "score_length", "with": {"tokenizer": "whitespace"}}
    run_recipe(new, progress=False)
    assert not audit(store)["ok"]  # without the recipe, the half-done old output counts
    rep = audit(store, current_prefixes(new))
    assert rep["ok"] and rep["stages"][length]["current"] is False
    r = subprocess.run(CURATE + ["audit", prefix, "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1


def test_fanout_ingest_pods_read_their_plan_not_the_annotations(tmp_path, photos):
    """The list step parses once and leaves per-shard plans; a pod then ingests without the file."""
    import yaml

    from jobs._main import main as job_main
    from jobs.plan_batches import main as plan_main

    names = list(photos)
    files = {f"{i}.jpg": jpeg_bytes(photos[names[i % len(names)]], size=(64 + i, 64)) for i in range(9)}
    recs = [llava(str(i), f"images/{i}.jpg", a=f"Photo {i} of the set.") for i in range(9)]
    ann = write_dataset(tmp_path / "src", recs, files)
    rpath = tmp_path / "r.yaml"
    rpath.write_text(yaml.safe_dump({"storage": {"prefix": str(tmp_path / "run")}, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": ann, "images": str(tmp_path / "src"),
                                     "shard_size": 4}}]}))
    assert plan_main(["--recipe", str(rpath), "--stage-id", "ingest", "--batch-size", "2"]) == 0
    store = open_store(str(tmp_path / "run"))
    assert store.list("raw/_plan") == ["shard-000000.jsonl", "shard-000001.jsonl", "shard-000002.jsonl"]
    os.rename(ann, ann + ".moved")  # the pods must not need the annotations file
    assert job_main("ingest", ["--recipe", str(rpath), "--shards", "0-2"]) == 0
    assert store.list("raw/_plan") == []
    clean = str(tmp_path / "clean")
    os.rename(ann + ".moved", ann)
    _, want, _ = ingest(clean, ann, str(tmp_path / "src"))
    got = [s for sh in raw_shards(store) for s in iter_samples(store, f"raw/{sh}")]
    assert [s.to_dict() for s in got] == [s.to_dict() for s in want]
    assert audit(store)["ok"]


def test_export_reshards_by_count_and_by_bytes(tmp_path, demo_src):
    prefix = str(tmp_path / "run")
    d = recipe_dict(prefix, demo_src, budget=1000)
    d["stages"][-1]["with"].update(formats=["webdataset"], shard_size=1000, shard_bytes=60_000)
    recipe = load_recipe(d)
    run_recipe(recipe, progress=False)
    store = open_store(prefix)
    exp = next(p for p in plan(recipe) if p.stage == "export").prefix
    names = store.list(f"{exp}/webdataset")
    sizes = [len(store.read_bytes(f"{exp}/webdataset/{n}")) for n in names]
    counts = [sum(1 for _ in iter_samples(store, f"{exp}/webdataset/{name}")) for name in names]
    # every shard but the last was closed by the byte limit (the count limit is far away), none is empty
    assert len(names) > 1 and all(s >= 60_000 for s in sizes[:-1]) and min(counts) >= 1
    assert sum(counts) == json.loads(store.read_text(f"{exp}/summary.json"))["formats"]["webdataset"]


def test_select_normalised_length_uses_the_dataset_maximum(tmp_path, demo_src):
    """``score_length.chars@norm`` is InstructionGPT-4's 10 * len / max with the max taken from the data."""
    prefix = str(tmp_path / "run")
    d = recipe_dict(prefix, demo_src, budget=None)
    d["stages"][2]["with"] = {"thresholds": {"score_length.chars@norm": {"min": 5}},
                              "rank_by": "score_length.chars@norm"}
    recipe = load_recipe(d)
    run_recipe(recipe, progress=False)
    store = open_store(prefix)
    sel = next(p for p in plan(recipe) if p.stage == "select").prefix
    length = next(p for p in plan(recipe) if p.stage == "score_length").prefix
    chars = {m["__key__"]: json.loads(m["json"])["chars"] for sh in raw_shards(store)
             for m in iter_members(store.uri(f"{length}/{sh}"))}
    top = max(chars.values())
    decisions = [d for sh in raw_shards(store) for d in read_decisions(store, sel, sh)]
    for d in decisions:
        want = 10 * chars[d["key"]] / top
        assert d["score"] == pytest.approx(want)
        if want < 5:
            assert not d["selected"] and d["reason"].startswith("below_min: score_length.chars@norm=")
        else:
            assert d["selected"] or d["reason"].startswith("exact_duplicate")
    assert max(d["score"] for d in decisions) == pytest.approx(10.0)
    stats = json.loads(store.read_text(f"{sel}/_stats/all.json"))
    assert stats["norm_max"] == {"score_length.chars@norm": top}
