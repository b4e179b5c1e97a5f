"""retrieve: exact faiss top-k over a prior run's CLIP image embeddings, written as this run's raw shards with
provenance; re-runs write nothing new."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from libcurate.audit import audit
from libcurate.columns import gather
from libcurate.generate.knn import encode_images, encode_texts, search_topk, unit_rows
from libcurate.generate.retrieve import MANIFEST, RetrieveConfig
from libcurate.models.clip import load_clip
from libcurate.pipeline import load_recipe, plan
from libcurate.runner import run_recipe
from libcurate.select.stage import read_decisions
from libcurate.shards import iter_samples
from libcurate.stage import PermanentInputError, StageContext, raw_shards
from libcurate.storage import open_store

from .conftest import jpeg_bytes
from .test_ingest import llava, write_dataset

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "clock",
         "hubble_deep_field", "immunohistochemistry", "retina", "grass", "gravel", "brick")


def photo(name):
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def brute_topk(pool, rows, q, k):
    """Plain numpy cosine top-k (ties by row): the reference."""
    sims = unit_rows(q) @ unit_rows(np.asarray(pool[rows], np.float32)).T
    order = np.lexsort((np.broadcast_to(rows, sims.shape), -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), rows[order]


def test_search_topk_equals_brute_force_across_blocks():
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((500, 32)).astype(np.float16)
    q = rng.standard_normal((7, 32)).astype(np.float32)
    rows = np.flatnonzero(rng.random(500) > 0.2)
    want_s, want_i = brute_topk(pool, rows, q, 10)
    for block in (1 << 20, 64, 7):  # one index, several, many tiny ones: the merge must be exact
        s, i = search_topk(pool, q, 10, rows, block_rows=block)
        assert np.array_equal(i, want_i) and np.allclose(s, want_s, atol=1e-5)
    assert search_topk(pool, q, 1000, rows[:3])[1].shape == (7, 3)


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory):
    """A prior run: 16 real photos ingested and embedded by score_clip (test-tiny-clip), 4 samples a shard."""
    root = tmp_path_factory.mktemp("pool")
    files = {f"{n}.jpg": jpeg_bytes(photo(n), (96, 96), 90) for n in NAMES}
    records = [llava(n, f"images/{n}.jpg", "Describe the image.", f"A photo of {n.replace('_', ' ')}.") for n in NAMES]
    write_dataset(str(root / "src"), records, files)
    prefix = str(root / "run")
    run_recipe(load_recipe({"storage": {"prefix": prefix}, "workers": 1, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": str(root / "src" / "data.json"),
                                     "images": str(root / "src"), "shard_size": 4}},
        {"stage": "score_clip", "with": {"model": "test-tiny-clip", "loader_workers": 0, "torch_threads": 1}}]}),
        progress=False)
    return prefix, root / "src"


def retrieve_recipe(prefix, pool, queries, **kw):
    return load_recipe({"storage": {"prefix": prefix}, "workers": 1, "stages": [
        {"stage": "retrieve", "with": {"pool": pool, "queries": str(queries), "k": 3, "shard_size": 2, **kw}},
        {"stage": "score_length"},
        {"stage": "select", "with": {"thresholds": {"retrieve.n_images": {"min": 1}}}}]})


def test_retrieve_top_k_provenance_images_and_rerun(tmp_path, pool_run):
    pool, src = pool_run
    qdir = tmp_path / "q"
    (qdir / "seed").mkdir(parents=True)
    (qdir / "seed" / "cat.jpg").write_bytes((src / "images" / "chelsea.jpg").read_bytes())  # a pool image
    queries = [{"id": "bus", "text": "a red double-decker bus"}, {"id": "cells", "text": "cells under a microscope"},
               {"id": "cat", "image": "seed/cat.jpg"}]
    (qdir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    prefix = str(tmp_path / "run")
    recipe = retrieve_recipe(prefix, pool, qdir / "queries.jsonl")
    run_recipe(recipe, progress=False)

    # the reference: the pool's stored embeddings, the queries through the same model, numpy top-3
    pstore = open_store(pool)
    sc = pstore.list_dirs("stages/score_clip")[0]
    t = gather(StageContext(store=pstore, prefix="", upstream={"score_clip": f"stages/score_clip/{sc}"}),
               embeddings=["score_clip.img_emb"])
    rows = np.flatnonzero(t.present["score_clip.img_emb"])
    assert len(rows) == len(NAMES)
    bundle = load_clip("test-tiny-clip")
    qv = np.concatenate([encode_texts(bundle, [q["text"] for q in queries[:2]]),
                         encode_images(bundle, [(qdir / "seed" / "cat.jpg").read_bytes()])])
    want_s, want_i = brute_topk(t.embeddings["score_clip.img_emb"], rows, qv, 3)
    want = {q["id"]: [t.keys[r].decode() for r in want_i[j]] for j, q in enumerate(queries)}

    store = open_store(prefix)
    got = [s for sh in raw_shards(store) for s in iter_samples(store, f"raw/{sh}")]
    by_query: dict[str, list] = {}
    for s in got:
        prov = s.metadata["retrieved"]
        assert prov["pool"] == pool and prov["pool_key"] == s.key
        for h in prov["hits"]:
            by_query.setdefault(h["query_id"], []).append((h["rank"], s.key, h["score"]))
    for j, q in enumerate(queries):
        hits = sorted(by_query[q["id"]])
        assert [k for _, k, _ in hits] == want[q["id"]]
        assert np.allclose([sc_ for _, _, sc_ in hits], want_s[j], atol=1e-4)
    # the image query is the pool's own chelsea photo: it comes back first (fp16-stored pool embedding)
    cat = sorted(by_query["cat"])[0]
    assert next(s for s in got if s.key == cat[1]).source.original_id == "chelsea" and cat[2] > 0.99
    # each pool sample once, with its images and conversation, in pool order; later stages see them
    assert len({s.key for s in got}) == len(got) == len({k for ks in want.values() for k in ks})
    pool_samples = {s.key: s for sh in raw_shards(pstore) for s in iter_samples(pstore, f"raw/{sh}")}
    for s in got:
        p = pool_samples[s.key]
        assert [im.data for im in s.images] == [im.data for im in p.images]
        assert s.conversations == p.conversations and s.source == p.source
    manifest = json.loads(store.read_text(MANIFEST))
    assert manifest["n_shards"] == len(raw_shards(store)) == -(-len(got) // 2)
    assert manifest["model"] == "test-tiny-clip" and manifest["n_queries"] == 3
    length = next(p for p in plan(recipe) if p.stage == "score_length").prefix
    assert all(store.exists(f"{length}/_done/{sh[:-4]}") for sh in raw_shards(store))
    # select reads the raw columns (its exact-duplicate rule: ingest.content) of retrieved shards too
    sel = next(p for p in plan(recipe) if p.stage == "select").prefix
    decisions = [d for sh in raw_shards(store) for d in read_decisions(store, sel, sh)]
    assert sorted(d["key"] for d in decisions if d["selected"]) == sorted(s.key for s in got)
    assert audit(store)["ok"]

    # a re-run is incremental: the same shards, nothing rewritten
    before = {f: os.stat(os.path.join(prefix, "raw", f)).st_mtime_ns for f in store.list("raw")}
    run_recipe(retrieve_recipe(prefix, pool, qdir / "queries.jsonl"), progress=False)
    assert {f: os.stat(os.path.join(prefix, "raw", f)).st_mtime_ns for f in store.list("raw")} == before
    # another config under the same prefix is refused, not mixed in
    with pytest.raises(PermanentInputError, match="another config"):
        run_recipe(retrieve_recipe(prefix, pool, qdir / "queries.jsonl", k=5), progress=False)


def test_seed_queries_and_model_checks(tmp_path, pool_run):
    pool, _ = pool_run
    prefix = str(tmp_path / "run")
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "x", "text": "a clock"}) + "\n")
    # seeds: the pool run itself; every seed's nearest pool sample is itself. k = 3 with min_score 0.999
    # keeps only that one (distinct photos are further apart, even for the random test model)
    run_recipe(load_recipe({"storage": {"prefix": prefix}, "workers": 1, "stages": [
        {"stage": "retrieve", "with": {"pool": pool, "seeds": pool, "k": 3, "min_score": 0.999}}]}), progress=False)
    store = open_store(prefix)
    got = [s for sh in raw_shards(store) for s in iter_samples(store, f"raw/{sh}", with_images=False)]
    assert len(got) == len(NAMES)
    assert all(s.metadata["retrieved"]["hits"] == [{"query_id": f"seed:{s.key}", "query": f"seed:{s.key}",
                                                     "score": s.metadata["retrieved"]["hits"][0]["score"], "rank": 1}]
               for s in got)
    with pytest.raises(PermanentInputError, match="share one CLIP model"):
        run_recipe(retrieve_recipe(str(tmp_path / "other"), pool, qfile, model="test-random-vit-b-32"), progress=False)
    with pytest.raises(PermanentInputError, match="queries"):
        RetrieveConfig.from_dict({"pool": pool})
    with pytest.raises(PermanentInputError, match="own prefix"):
        run_recipe(retrieve_recipe(pool, pool, qfile), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": "x", "image": "y.jpg"}) + "\n")
    with pytest.raises(PermanentInputError, match="exactly one of"):
        run_recipe(retrieve_recipe(str(tmp_path / "bad"), pool, bad), progress=False)


def test_renders_as_one_pod_of_its_own_image(tmp_path):
    """On Argo the search needs the CLIP towers (GPU image family): retrieve is one pod, no CPU list step."""
    from workflows import tables as T
    from workflows.dag import build

    (tmp_path / "r.yaml").write_text(json.dumps({"name": "ret", "storage": {"prefix": "s3://b/run"}, "stages": [
        {"stage": "retrieve", "with": {"pool": "s3://b/pool", "queries": "s3://b/q.jsonl", "k": 10}},
        {"stage": "score_length"}]}))
    d = build(str(tmp_path / "r.yaml"), prefix="s3://b/run").template.to_dict()
    templates = {t["name"]: t for t in d["spec"]["templates"]}
    assert "retrieve" in templates and "retrieve-fanout" not in templates
    main = next(t for t in d["spec"]["templates"] if t["name"] == "main")
    tasks = {t["name"]: t for t in main["dag"]["tasks"]}
    assert "retrieve-batches" not in tasks and tasks["retrieve"]["template"] == "retrieve"
    assert "score-length-batches" in tasks  # the stages after it fan out over its shards as usual
    ctr = templates["retrieve"]["container"]
    assert f"/{T.IMAGE_REPO['gpu']}:" in ctr["image"] and ctr["command"] == ["python", "-m", "jobs", "retrieve"]
