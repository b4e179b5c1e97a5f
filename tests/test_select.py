"""``select`` on columns: every drop reason (each test fails if its rule is removed), plan-time validation,
and the column reader it stands on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from libcurate.columns import gather, read_columns
from libcurate.pipeline import load_recipe, plan
from libcurate.select.stage import SelectConfig, SelectStage, read_decisions
from libcurate.shards import npy_bytes
from libcurate.stage import PermanentInputError, ShardOutput, StageContext, raw_shards, unit_of

from .conftest import jpeg_bytes
from .test_ingest import ingest, llava, write_dataset

N = 12


@pytest.fixture
def run(tmp_path, photos):
    """12 ingested samples over 3 raw shards: distinct photos, sizes and answers; sample 11 repeats
    sample 0 exactly (same image bytes, same conversation)."""
    names = sorted(photos)
    files, recs = {}, []
    for i in range(N - 1):
        name = f"{i}.jpg"
        files[name] = jpeg_bytes(photos[names[i % len(names)]], size=(40 + 8 * i, 48))
        recs.append(llava(f"r{i}", f"images/{name}", a=f"Answer number {i} " + "word " * i))
    files["dup.jpg"] = files["0.jpg"]
    recs.append(llava("r11", "images/dup.jpg", a=recs[0]["conversations"][1]["value"]))
    ann = write_dataset(tmp_path / "src", recs, files)
    store, samples, quarantine = ingest(str(tmp_path / "run"), ann, str(tmp_path / "src"), shard_size=4)
    assert not quarantine and len(samples) == N
    return store, [s.key for s in samples]


def fake_stage(store, prefix: str, rows: dict, arrays: dict | None = None, quarantine: dict | None = None):
    """Write a sidecar stage under ``prefix`` for every raw shard: ``rows[key]`` (default {}) as JSON,
    ``arrays[key]`` as ``emb.npy``, keys in ``quarantine`` quarantined with that reason."""
    from libcurate.shards import iter_samples

    for shard in raw_shards(store):
        out = ShardOutput(store, prefix, unit_of(shard))
        n = 0
        for s in iter_samples(store, f"raw/{shard}", with_images=False):
            n += 1
            if quarantine and s.key in quarantine:
                out.quarantine(s.key, quarantine[s.key])
                continue
            extra = {"emb.npy": npy_bytes(arrays[s.key])} if arrays and s.key in arrays else None
            out.write_json(s.key, rows.get(s.key, {}), extra)
        out.finish(n)


def select(store, upstream: dict, **cfg) -> dict[str, dict]:
    prefix = "select/sel/x"
    ctx = StageContext(store=store, prefix=prefix, upstream={"ingest": "raw", **upstream})
    SelectStage(SelectConfig.from_dict(cfg)).run_global(ctx)
    return {d["key"]: d for sh in raw_shards(store) for d in read_decisions(store, prefix, sh)}


def reason(d: dict) -> str:
    return "" if d["selected"] else d["reason"].split(":")[0]


def test_columns_align_with_raw_order_and_quarantine(run):
    store, keys = run
    score = {k: {"s": float(i), "nested": {"x": i * 2}, "label": "ab"[i % 2]} for i, k in enumerate(keys)}
    fake_stage(store, "stages/a/1", score, quarantine={keys[3]: "broken"})
    ctx = StageContext(store=store, prefix="select/x/1", upstream={"ingest": "raw", "a": "stages/a/1"})
    t = gather(ctx, ["a.s", "a.nested.x", "a.label", "ingest.content"])
    assert [k.decode() for k in t.keys] == keys
    s = t.values["a.s"]
    assert np.isnan(s[3]) and s[4] == 4.0 and t.values["a.nested.x"][5] == 10.0
    assert t.values["a.label"][1] == b"b" and t.values["a.label"][3] == b""
    assert t.quarantine_reasons[t.quarantine[3]] == "a: broken" and t.quarantined().sum() == 1
    assert t.values["ingest.content"][0] == t.values["ingest.content"][11] != t.values["ingest.content"][1]
    # the column file is what the stage wrote; a missing column file is rebuilt from the tar identically
    cols = read_columns(store, "stages/a/1", raw_shards(store)[0])
    store.delete("stages/a/1/_columns/shard-000000.cols")
    again = read_columns(store, "stages/a/1", raw_shards(store)[0])
    assert sorted(cols) == sorted(again) and all(np.array_equal(cols[k], again[k], equal_nan=cols[k].dtype.kind == "f")
                                                 for k in cols)



def test_gather_leaves_no_scratch_behind(run, tmp_path, monkeypatch):
    """gather's own scratch (embeddings asked for, no scratch given) is gone when it returns, while the
    embedding memmap stays readable; fields alone make no scratch at all."""
    import tempfile

    store, keys = run
    emb = {k: np.eye(4, dtype=np.float16)[[i % 4]] for i, k in enumerate(keys)}
    fake_stage(store, "stages/a/1", {k: {"s": 1.0} for k in keys}, arrays=emb)
    ctx = StageContext(store=store, prefix="select/x/1", upstream={"ingest": "raw", "a": "stages/a/1"})
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    t = gather(ctx, ["a.s"], embeddings=["a.emb"])
    assert list(tmp.iterdir()) == []
    assert t.present["a.emb"].all()
    assert np.argmax(t.embeddings["a.emb"], axis=1).tolist() == [i % 4 for i in range(N)]
    gather(ctx, ["a.s"])
    assert list(tmp.iterdir()) == []

def test_rule_reasons_quarantine_missing_thresholds(run):
    store, keys = run
    rows = {k: {"s": float(i)} for i, k in enumerate(keys)}
    del rows[keys[2]]["s"]                      # missing
    fake_stage(store, "stages/a/1", rows, quarantine={keys[1]: "undecodable_image"})
    d = select(store, {"a": "stages/a/1"}, thresholds={"a.s": {"min": 4, "max": 9}}, dedup_exact=False)
    assert d[keys[1]]["reason"] == "quarantined: a: undecodable_image"
    assert d[keys[2]]["reason"] == "missing_score: a.s"
    assert d[keys[3]]["reason"] == "below_min: a.s=3 < 4"
    assert d[keys[10]]["reason"] == "above_max: a.s=10 > 9"
    assert [k for k in keys if d[k]["selected"]] == keys[4:10]
    # keep_missing keeps the sample without the field (the threshold cannot judge it)
    d = select(store, {"a": "stages/a/1"}, thresholds={"a.s": {"min": 4}}, keep_missing=True, dedup_exact=False)
    assert d[keys[2]]["selected"]


def test_exact_duplicate_and_topk_budget(run):
    store, keys = run
    fake_stage(store, "stages/a/1", {k: {"s": float(i)} for i, k in enumerate(keys)})
    d = select(store, {"a": "stages/a/1"}, score="a.s", budget=5)
    assert d[keys[11]]["reason"] == f"exact_duplicate: same images and text as {keys[0]}"
    kept = sorted((x for x in d.values() if x["selected"]), key=lambda x: x["rank"])
    assert [x["key"] for x in kept] == [keys[i] for i in (10, 9, 8, 7, 6)]
    assert d[keys[5]]["reason"] == "over_budget: rank 6 > 5" and d[keys[5]]["score"] == 5.0
    assert sum(reason(x) == "over_budget" for x in d.values()) == 11 - 5


def test_decision_lines_are_plain_json(run):
    store, keys = run
    fake_stage(store, "stages/a/1", {k: {"s": 0.1 * i} for i, k in enumerate(keys)})
    select(store, {"a": "stages/a/1"}, score="a.s", budget=3)
    for sh in raw_shards(store):
        for line in store.read_text(f"select/sel/x/decisions/{unit_of(sh)}.jsonl").splitlines():
            assert line == json.dumps(json.loads(line), sort_keys=True)


def test_near_duplicates_from_a_dedup_stage(run):
    store, keys = run
    # keys 4,5,6 form a group led by 5 (group_rank 0); 5 then fails the threshold, so 4 (rank 1) is kept
    grp = {keys[5]: (0, 1.0), keys[4]: (1, 0.97), keys[6]: (2, 0.95)}
    rows = {k: {"group": keys[5], "group_rank": r, "similarity": s} for k, (r, s) in grp.items()}
    fake_stage(store, "stages/dd/1", rows)
    store.write_text("stages/dd/1/_fit/fitted.json", json.dumps({"marks_duplicates": True}))
    fake_stage(store, "stages/a/1", {k: {"s": 0.0 if k == keys[5] else 1.0} for k in keys})
    d = select(store, {"a": "stages/a/1", "dd": "stages/dd/1"}, thresholds={"a.s": {"min": 0.5}})
    assert d[keys[5]]["reason"].startswith("below_min")
    assert d[keys[4]]["selected"]
    assert d[keys[6]]["reason"] == f"near_duplicate_of: {keys[4]} (similarity 0.9500, dd)"
    # near_duplicates: [] turns it off
    d = select(store, {"a": "stages/a/1", "dd": "stages/dd/1"}, near_duplicates=[])
    assert d[keys[6]]["selected"]


def test_cluster_quota(run):
    store, keys = run
    # clusters: 0 -> 8 samples, 1 -> 3 samples (keys 8, 9, 10); scores rise with the index
    rows = {k: {"s": float(i), "c": 0 if i < 8 else 1} for i, k in enumerate(keys)}
    fake_stage(store, "stages/a/1", rows)
    # 11 eligible (11 repeats 0); quotas max(1, floor(3 * size / 11)): cluster 0 -> 2, cluster 1 -> 1
    d = select(store, {"a": "stages/a/1"}, score="a.s", budget=3,
               strategy={"kind": "cluster_proportional", "cluster": "a.c"})
    kept = {k for k, x in d.items() if x["selected"]}
    assert kept == {keys[10], keys[7], keys[6]}   # cluster 1 gets its quota and no more; topk would keep 9, 8
    assert d[keys[9]]["reason"].startswith("cluster_quota: cluster 1 quota 1")


def test_diversity_penalty(run):
    store, keys = run
    rng = np.random.default_rng(0)
    base = rng.normal(size=(N, 16)).astype(np.float32)
    base[1] = base[0] + 0.01                   # 1 is nearly 0: picking 0 penalises 1 below the others
    emb = {k: (base[i] / np.linalg.norm(base[i])).astype(np.float16)[None] for i, k in enumerate(keys)}
    diff = {k: {"d": 10.0 - 0.1 * i} for i, k in enumerate(keys)}
    fake_stage(store, "stages/a/1", diff, arrays=emb)
    d = select(store, {"a": "stages/a/1"}, score="a.d", budget=3, dedup_exact=False,
               strategy={"kind": "diversity_greedy", "embedding": "a.emb", "k_nearest": 2})
    kept = sorted((x for x in d.values() if x["selected"]), key=lambda x: x["rank"])
    assert [x["key"] for x in kept] == [keys[0], keys[2], keys[3]]
    assert d[keys[1]]["reason"].startswith("diversity_penalty")
    # topk on the same score would have kept 1
    d = select(store, {"a": "stages/a/1"}, score="a.d", budget=3, dedup_exact=False)
    assert d[keys[1]]["selected"]


def test_quota_full(run):
    store, keys = run
    rows = {k: {"s": float(i), "t": "neg" if i < 9 else "pos"} for i, k in enumerate(keys)}
    fake_stage(store, "stages/a/1", rows)
    d = select(store, {"a": "stages/a/1"}, score="a.s", budget=4, dedup_exact=False,
               strategy={"kind": "quotas", "label": "a.t", "shares": {"pos": 1, "neg": 1}})
    kept = [k for k in keys if d[k]["selected"]]
    assert kept == [keys[7], keys[8], keys[10], keys[11]]      # 2 of each label, the best of each
    assert d[keys[6]]["reason"].startswith("quota_full: a.t=neg quota 2")
    assert d[keys[9]]["reason"].startswith("quota_full: a.t=pos quota 2")


@pytest.mark.parametrize("bad, message", [
    ({"rank_by": ["score_length.words"]}, "rank_by must be one field name"),
    ({"score": {"weights": {"score_length.words": "high"}}}, "score.weights"),
    ({"score": {"weights": {"score_length.words": 1}, "normalize": "log"}}, "score.normalize"),
    ({"score": 3}, "score"),
    ({"strategy": "best"}, "strategy"),
    ({"strategy": {"kind": "diversity_greedy"}}, "embedding"),
    ({"strategy": {"kind": "quotas", "label": "score_length.words"}}, "shares or counts"),
    ({"thresholds": {"score_length.words": {"min": "3"}}}, "numeric"),
    ({"score": "nope.words"}, "not earlier stages"),
])
def test_malformed_select_fails_at_plan(tmp_path, bad, message):
    recipe = load_recipe({"storage": {"prefix": str(tmp_path)}, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": "a.json", "images": "."}},
        {"stage": "score_length"}, {"stage": "select", "with": bad}]})
    with pytest.raises(PermanentInputError, match=message):
        plan(recipe)


def test_dedup_stage_semdedup_groups_then_select_names_the_kept_member(run):
    """The dedup fit on embeddings (SemDeDup path): 3 and 7 are near copies of 2; the best by `q` is kept."""
    from libcurate.runner import input_signature, load_fitted, save_fitted
    from libcurate.select.dedup_stage import DedupConfig, DedupStage

    store, keys = run
    rng = np.random.default_rng(1)
    base = rng.normal(size=(N, 32)).astype(np.float32)
    base[3] = base[2] + 0.01 * rng.normal(size=32)
    base[7] = base[2] + 0.01 * rng.normal(size=32)
    emb = {k: (base[i] / np.linalg.norm(base[i])).astype(np.float16)[None] for i, k in enumerate(keys)}
    q = {k: {"q": 1.0 if i == 7 else 0.5} for i, k in enumerate(keys)}
    fake_stage(store, "stages/a/1", q, arrays=emb)
    up = {"ingest": "raw", "a": "stages/a/1"}
    stage = DedupStage(DedupConfig.from_dict({"embedding": "a.emb", "eps": 0.02, "keep_by": "a.q", "n_clusters": 2}))
    ctx = StageContext(store=store, prefix="stages/dd/1", upstream=up)
    fitted = stage.fit(ctx)
    save_fitted(store, ctx.prefix, fitted)
    fitted = load_fitted(store, ctx.prefix)
    for sh in raw_shards(store):
        stage.write_shard(ctx, sh, fitted)
    d = select(store, {**up, "dd": "stages/dd/1"}, dedup_exact=False)
    assert d[keys[7]]["selected"]
    for i in (2, 3):
        why = d[keys[i]]["reason"]
        assert why.startswith(f"near_duplicate_of: {keys[7]} (similarity ") and why.endswith(", dd)"), why
        assert float(why.split("similarity ")[1].split(",")[0]) >= 0.98
    assert sum(not x["selected"] for x in d.values()) == 2    # distinct random vectors are not grouped
