"""decontaminate: benchmark layouts (LLaVA-Bench, POPE, MME), the pHash and n-gram matchers, and select
dropping what the stage marked, with reasons that name the benchmark item."""

from __future__ import annotations

import io
import os
import json

import numpy as np
import pytest
from PIL import Image

from libcurate.pipeline import load_recipe, plan
from libcurate.runner import run_recipe
from libcurate.select import decontaminate_stage as DS
from libcurate.select.benchmarks import jsonl_items, load_items, mme_items
from libcurate.select.decontaminate import build_question_index, match_question, nearest_hashes, ngram_hashes
from libcurate.select.stage import read_decisions
from libcurate.stage import PermanentInputError, StageContext, raw_shards
from libcurate.storage import open_store

from .conftest import jpeg_bytes
from .test_ingest import llava, write_dataset

LLAVA_BENCH_Q = "What is the man holding in his left hand?"


def extra_photo(name):
    from skimage import data

    arr = getattr(data, name)()
    return Image.fromarray(arr).convert("RGB")


def png_bytes(img, size):
    buf = io.BytesIO()
    img.resize(size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def benchmarks(tmp_path, photos):
    """Small constructed copies of three real layouts."""
    root = tmp_path / "bench"
    # POPE: coco_pope_random.json is JSONL; images from COCO val2014
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "COCO_val2014_000000310196.jpg").write_bytes(jpeg_bytes(photos["astronaut"], (320, 320), 90))
    (root / "coco" / "COCO_val2014_000000210789.jpg").write_bytes(jpeg_bytes(photos["rocket"], (320, 320), 90))
    pope = [{"question_id": i + 1, "image": img, "text": f"Is there a {obj} in the image?", "label": lab}
            for i, (img, obj, lab) in enumerate([
                ("COCO_val2014_000000310196.jpg", "person", "yes"), ("COCO_val2014_000000310196.jpg", "dog", "no"),
                ("COCO_val2014_000000310196.jpg", "flag", "yes"), ("COCO_val2014_000000210789.jpg", "rocket", "yes"),
                ("COCO_val2014_000000210789.jpg", "cat", "no"), ("COCO_val2014_000000210789.jpg", "car", "no")])]
    (root / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in pope))
    # LLaVA-Bench (In-the-Wild): questions.jsonl + images/
    (root / "llava-bench" / "images").mkdir(parents=True)
    (root / "llava-bench" / "images" / "001.jpg").write_bytes(jpeg_bytes(photos["coffee"], (300, 200), 92))
    lb = [{"question_id": 0, "image": "001.jpg", "text": LLAVA_BENCH_Q, "category": "conv"},
          {"question_id": 1, "image": "001.jpg", "text": "Describe the drink on the table in detail.",
           "category": "detail"}]
    (root / "llava-bench" / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lb))
    # MME release folder: <task>/images + questions_answers_YN, or image and .txt side by side
    (root / "mme" / "artwork" / "images").mkdir(parents=True)
    (root / "mme" / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "mme" / "artwork" / "images" / "10002.jpg").write_bytes(jpeg_bytes(extra_photo("coins"), (256, 200)))
    (root / "mme" / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by albrecht durer? Please answer yes or no.\tYes\n"
        "Is this artwork created by vincent van gogh? Please answer yes or no.\tNo\n")
    (root / "mme" / "code_reasoning").mkdir(parents=True)
    (root / "mme" / "code_reasoning" / "0020.png").write_bytes(png_bytes(extra_photo("text"), (200, 120)))
    (root / "mme" / "code_reasoning" / "0020.txt").write_text(
        "Is a c++ code shown in the picture? Please answer yes or no.\tNo\n")
    (root / "mme" / "README.txt").write_text("notes, not a question file")
    return [
        {"name": "pope", "layout": "jsonl", "questions": str(root / "coco_pope_random.json"),
         "images": str(root / "coco"), "match": ["image"]},
        {"name": "llava_bench", "layout": "jsonl", "questions": str(root / "llava-bench" / "questions.jsonl"),
         "images": str(root / "llava-bench" / "images")},
        {"name": "mme", "layout": "mme", "root": str(root / "mme")},
    ]


# -- layouts ------------------------------------------------------------------------------------------

def test_layouts_read_every_item(benchmarks):
    pope = load_items("jsonl", questions=benchmarks[0]["questions"])
    assert [(i.id, i.image) for i in pope][:2] == [("1", "COCO_val2014_000000310196.jpg")] * 1 + \
        [("2", "COCO_val2014_000000310196.jpg")]
    assert len(pope) == 6 and pope[1].question == "Is there a dog in the image?"
    mme = load_items("mme", root=benchmarks[2]["root"])
    assert [(i.id, i.image) for i in mme] == [
        ("artwork/10002#0", "artwork/images/10002.jpg"), ("artwork/10002#1", "artwork/images/10002.jpg"),
        ("code_reasoning/0020#0", "code_reasoning/0020.png")]
    assert mme[2].question == "Is a c++ code shown in the picture? Please answer yes or no."
    # a JSON list works too; a repeated id stays unique; a record with neither question nor image is refused
    items = jsonl_items(json.dumps([{"question_id": 7, "image": "a.jpg", "question": "Q one?"},
                                    {"question_id": 7, "text": "Q two?"}]).encode(), "x.json")
    assert [(i.id, i.image, i.question) for i in items] == [("7", "a.jpg", "Q one?"), ("7@1", None, "Q two?")]
    with pytest.raises(PermanentInputError, match="record 0"):
        jsonl_items(b'{"question_id": 1}\n', "bad.jsonl")
    with pytest.raises(PermanentInputError, match="line 2"):
        jsonl_items(b'{"text": "ok"}\n{broken\n', "bad.jsonl")
    with pytest.raises(PermanentInputError, match="no <task>"):
        mme_items(["README.txt"], lambda n: "")


# -- matchers -----------------------------------------------------------------------------------------

def test_nearest_hashes_equals_brute_force():
    rng = np.random.default_rng(0)
    index = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    queries = np.concatenate([index[:5] ^ np.uint64(0b1011), rng.integers(0, 2**63, 50, dtype=np.int64).astype(np.uint64)])
    pos, dist = nearest_hashes(queries, index)
    for q, p, d in zip(queries.tolist(), pos.tolist(), dist.tolist()):
        brute = [bin(q ^ h).count("1") for h in index.tolist()]
        assert d == min(brute) and brute[p] == d
    assert dist[:5].tolist() == [3] * 5 and pos[:5].tolist() == list(range(5))
    assert nearest_hashes(queries, np.zeros(0, np.uint64))[1].tolist() == [65] * len(queries)


def test_question_overlap_paraphrase_and_templates():
    pope = [f"Is there a {o} in the image?" for o in ("dog", "cat", "car", "person", "cup", "chair", "bus")]
    qs = [LLAVA_BENCH_Q, "Describe the drink on the table in detail."] + pope
    idx = build_question_index(qs, n=3, max_df=0.05)
    q, o = match_question(idx, "<image>\nIn his left hand, what is the man holding?", 3, 3)
    assert q == 0 and o == pytest.approx(5 / 7)
    assert match_question(idx, LLAVA_BENCH_Q.upper(), 3, 3) == (0, 1.0)
    # POPE's template trigrams ("is there a", "a ... in", "in the image") are in every POPE question: ignored,
    # so an unrelated question of the same template overlaps nothing
    assert len(idx.template) >= 2
    assert match_question(idx, "Is there a horse in the image?", 3, 3)[1] == 0.0
    # too short to tell (fewer than min_ngrams informative trigrams)
    assert match_question(idx, "What is this?", 3, 3) == (-1, 0.0)
    assert ngram_hashes("a b", 3).size == 0 and ngram_hashes("A, b c!", 3).size == 1


# -- the stage through select and export -----------------------------------------------------------------

def _recipe(tmp_path, src, benchmarks, run="run", before=(), **deco):
    return load_recipe({"storage": {"prefix": str(tmp_path / run)}, "workers": 1, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": f"{src}/data.json", "images": src}},
        *before,
        {"stage": "decontaminate", "with": {"benchmarks": benchmarks, **deco}},
        {"stage": "select"},
        {"stage": "export", "with": {"formats": ["llava"]}}]})


@pytest.fixture
def training(tmp_path, photos):
    astro = photos["astronaut"]
    files = {
        # the POPE image, re-encoded at another quality and slightly resized
        "planted.jpg": jpeg_bytes(astro, (300, 300), 45),
        # the MME image, re-encoded as PNG at another size
        "planted_mme.png": png_bytes(extra_photo("coins"), (230, 180)),
        "clean1.jpg": jpeg_bytes(photos["chelsea"], (120, 100)),
        "clean2.jpg": jpeg_bytes(photos["camera"], (100, 100)),
        "clean3.jpg": jpeg_bytes(extra_photo("hubble_deep_field"), (100, 100)),
    }
    records = [
        llava("planted", "images/planted.jpg", "What is the person wearing?", "A white space suit."),
        llava("planted_mme", "images/planted_mme.png", "What is shown?", "Coins."),
        llava("paraphrase", "images/clean1.jpg", "In his left hand, what is the man holding?", "A cup."),
        llava("clean_pope_template", "images/clean2.jpg", "Is there a horse in the image?", "No."),
        llava("clean", "images/clean3.jpg", "How many galaxies can you count in this deep field?", "Hundreds."),
    ]
    src = tmp_path / "src"
    write_dataset(str(src), records, files)
    return str(src)


def test_planted_items_are_dropped_with_their_names(tmp_path, benchmarks, training):
    recipe = _recipe(tmp_path, training, benchmarks)
    run_recipe(recipe, progress=False)
    store = open_store(str(tmp_path / "run"))
    steps = {p.stage: p for p in plan(recipe)}
    by_id = {}
    from libcurate.shards import iter_members, iter_samples
    ids = {s.key: s.source.original_id for sh in raw_shards(store) for s in iter_samples(store, f"raw/{sh}", False)}
    for sh in raw_shards(store):
        for d in read_decisions(store, steps["select"].prefix, sh):
            by_id[ids[d["key"]]] = d
    assert {k for k, d in by_id.items() if d["selected"]} == {"clean", "clean_pope_template"}
    assert by_id["planted"]["reason"].startswith("contaminated: pope/1 image phash dist ")
    dist = int(by_id["planted"]["reason"].split("dist ")[1].split(";")[0])
    assert 0 <= dist <= 8
    assert by_id["planted_mme"]["reason"].startswith("contaminated: mme/artwork/10002#0 image phash dist ")
    assert by_id["paraphrase"]["reason"] == "contaminated: llava_bench/0 question 3-gram overlap 0.71"
    # the evidence is stored for every sample, clean ones included
    side = {ids[m["__key__"]]: json.loads(m["json"]) for sh in raw_shards(store)
            for m in iter_members(store.uri(f"{steps['decontaminate'].prefix}/{sh}"))}
    assert side["clean"]["hit"] is False and side["clean"]["image_distance"] > 8
    assert side["clean_pope_template"]["hit"] is False
    # export and audit see the same decision: only the clean samples are exported
    data = json.loads(store.read_text(f"{steps['export'].prefix}/llava/data.json"))
    assert {r["source"]["original_id"] for r in data} == {"clean", "clean_pope_template"}
    sel_stats = json.loads(store.read_text(f"{steps['select'].prefix}/_stats/all.json"))
    assert sel_stats["drop_reasons"] == {"contaminated": 3}


def test_index_is_built_once_and_keyed_by_content(tmp_path, benchmarks, training, monkeypatch):
    recipe = _recipe(tmp_path, training, benchmarks)
    run_recipe(recipe, progress=False)
    store = open_store(str(tmp_path / "run"))
    step = next(p for p in plan(recipe) if p.stage == "decontaminate")
    key = step.config.index_key
    assert store.exists(f"benchmark_index/{key}.json") and store.exists(f"benchmark_index/{key}.arrays")
    meta = json.loads(store.read_text(f"benchmark_index/{key}.json"))
    assert meta["stats"]["pope"] == {"items": 6, "images": 2, "questions": 0}
    assert meta["stats"]["mme"] == {"items": 3, "images": 2, "questions": 3}

    def no_build(*args):
        raise AssertionError("the index was rebuilt")
    monkeypatch.setattr(DS, "build_index", no_build)
    stage = step.build()
    idx = stage.index(StageContext(store=store, prefix=step.prefix))
    assert len(idx.image_hashes) == 5 and idx.items[0] == "pope/1"
    # an edited benchmark file changes the key (and so the stage's config hash): every shard is re-checked
    monkeypatch.undo()
    path = benchmarks[1]["questions"]
    with open(path, "a") as f:
        f.write(json.dumps({"question_id": 2, "image": "001.jpg", "text": "What brand is the cup?"}) + "\n")
    again = next(p for p in plan(_recipe(tmp_path, training, benchmarks)) if p.stage == "decontaminate")
    assert again.config.index_key != key and again.prefix != step.prefix


def test_config_errors(benchmarks):
    with pytest.raises(PermanentInputError, match="non-empty"):
        DS.DecontaminateConfig.from_dict({"benchmarks": []})
    with pytest.raises(PermanentInputError, match="needs 'questions'"):
        DS.DecontaminateConfig.from_dict({"benchmarks": [{"name": "x", "layout": "jsonl"}]})
    with pytest.raises(PermanentInputError, match="distinct"):
        DS.DecontaminateConfig.from_dict({"benchmarks": [benchmarks[0], benchmarks[0]]})
    with pytest.raises(PermanentInputError, match="unknown setting"):
        DS.DecontaminateConfig.from_dict({"benchmarks": [dict(benchmarks[0], imgs="x")]})
    with pytest.raises(PermanentInputError, match="not found"):
        DS.DecontaminateConfig.from_dict({"benchmarks": [dict(benchmarks[0], questions="/nonexistent.jsonl")]})


def test_images_from_a_tar_shard_index_like_a_folder(tmp_path, benchmarks):
    import tarfile

    folder = benchmarks[0]["images"]
    tar_path = tmp_path / "coco_val2014.tar"
    with tarfile.open(tar_path, "w") as tf:
        for name in sorted(os.listdir(folder)):
            tf.add(os.path.join(folder, name), arcname=name)
    def build(bench):
        c = DS.DecontaminateConfig.from_dict({"benchmarks": [bench]})
        return DS.build_index(c.benchmarks, c.ngram, c.max_df)
    a, _ = build(benchmarks[0])
    b, stats = build(dict(benchmarks[0], images=str(tar_path)))
    assert stats["pope"] == {"items": 6, "images": 2, "questions": 0}
    assert np.array_equal(a.image_hashes, b.image_hashes) and a.items == b.items
    # an item whose image is missing refuses the benchmark (never a silently smaller index)
    q = tmp_path / "pope_missing.json"
    q.write_text(json.dumps({"question_id": 9, "image": "COCO_val2014_000000999999.jpg", "text": "Is there a cat?"}) + "\n")
    with pytest.raises(PermanentInputError, match="item 9"):
        build(dict(benchmarks[0], questions=str(q)))


def test_benchmark_paths_resolve_against_the_recipe(tmp_path, benchmarks):
    import yaml

    rel = {"name": "pope", "layout": "jsonl", "questions": "bench/coco_pope_random.json", "images": "bench/coco",
           "match": ["image"]}
    stages = [{"stage": "ingest", "with": {"format": "llava", "annotations": "a.json", "images": "."}},
              {"stage": "decontaminate", "with": {"benchmarks": [rel]}}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"storage": {"prefix": "run"}, "stages": stages}))
    recipe = load_recipe(str(tmp_path / "r.yaml"))
    cfg = next(p for p in plan(recipe) if p.stage == "decontaminate").config
    assert cfg.benchmarks[0]["questions"] == benchmarks[0]["questions"]
    assert cfg.benchmarks[0]["images"] == benchmarks[0]["images"]
    assert recipe.stages[1]["with"]["benchmarks"][0]["questions"] == "bench/coco_pope_random.json"


def _reasons(tmp_path, recipe, run):
    store = open_store(str(tmp_path / run))
    sel = next(p for p in plan(recipe) if p.stage == "select").prefix
    return {d["key"]: d.get("reason") for sh in raw_shards(store) for d in read_decisions(store, sel, sh)}


def test_stored_hashes_of_hash_image_give_the_same_decisions(tmp_path, benchmarks, training, monkeypatch):
    plain = _recipe(tmp_path, training, benchmarks, run="a")
    run_recipe(plain, progress=False)
    reuse = _recipe(tmp_path, training, benchmarks, run="b", before=[{"stage": "hash_image"}], hashes="hash_image")
    reads = []
    real_iter = DS.iter_samples

    def spy(store, rel, with_images=True):
        reads.append(with_images)
        return real_iter(store, rel, with_images)
    monkeypatch.setattr(DS, "iter_samples", spy)
    run_recipe(reuse, progress=False)
    assert reads and not any(reads)  # the record index only: no image bytes read, none decoded
    assert _reasons(tmp_path, reuse, "b") == _reasons(tmp_path, plain, "a")
    assert sum(r is not None and r.startswith("contaminated") for r in _reasons(tmp_path, reuse, "b").values()) == 3
    with pytest.raises(PermanentInputError, match="not earlier stages"):
        plan(_recipe(tmp_path, training, benchmarks, run="c", hashes="hash_image"))


def test_clip_embedding_matches_a_planted_image(tmp_path, benchmarks, training):
    """embedding: score_clip: the benchmark images are embedded by the run's own CLIP model (test-tiny-clip,
    random weights: a re-encoded copy is > 0.998 cosine, distinct photos <= 0.986 here) and compared."""
    clip = {"stage": "score_clip", "with": {"model": "test-tiny-clip", "loader_workers": 0, "torch_threads": 1}}
    recipe = _recipe(tmp_path, training, [benchmarks[0]], before=[clip], embedding="score_clip",
                     min_cosine=0.995, phash_max_distance=0)
    assert next(p for p in plan(recipe) if p.stage == "decontaminate").image == "gpu"
    run_recipe(recipe, progress=False)
    store = open_store(str(tmp_path / "run"))
    step = next(p for p in plan(recipe) if p.stage == "decontaminate")
    from libcurate.shards import iter_members, iter_samples
    ids = {s.key: s.source.original_id for sh in raw_shards(store) for s in iter_samples(store, f"raw/{sh}", False)}
    side = {ids[m["__key__"]]: json.loads(m["json"]) for sh in raw_shards(store)
            for m in iter_members(store.uri(f"{step.prefix}/{sh}"))}
    assert side["planted"]["embedding_item"] == "pope/1" and side["planted"]["embedding_cosine"] >= 0.995
    assert "pope/1 image clip cos" in side["planted"]["reason"]
    assert all(not d["hit"] and d["embedding_cosine"] < 0.995 for k, d in side.items() if k != "planted")
    reasons = _reasons(tmp_path, recipe, "run")
    assert sum(r is not None and r.startswith("contaminated") for r in reasons.values()) == 1
    # the benchmark embeddings are stored beside the index, once per model
    assert [f for f in store.list("benchmark_index") if ".clip-" in f]
