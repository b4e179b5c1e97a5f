"""Embedding lists (``embedding: [score_clip.img_emb, score_clip.txt_emb]``): the concatenation each
strategy, dedup and cluster stage reads (Self-Filter's [image; text] feature), against hand computations
and a brute-force greedy."""

from __future__ import annotations

import numpy as np
import pytest

from libcurate.columns import concat_embeddings, embedding_key, gather
from libcurate.pipeline import load_recipe, plan
from libcurate.select import strategies as S
from libcurate.select.stage import SelectConfig
from libcurate.shards import iter_samples, npy_bytes
from libcurate.stage import PermanentInputError, ShardOutput, StageContext, config_hash, raw_shards, unit_of

from .test_select import N, run, select  # noqa: F401  (run: the 12-sample fixture)

LIST = ["a.img_emb", "a.txt_emb"]


def test_concat_equals_hand_computation():
    img = np.array([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]], np.float32)
    txt = np.array([[0.0, 0.0, 5.0], [1.0, 2.0, 2.0], [2.0, 0.0, 0.0]], np.float32)
    r = 1 / np.sqrt(2)
    want = np.array([[0.6 * r, 0.8 * r, 0, 0, r],               # each part unit, then the row: / sqrt(2)
                     [0, r, r / 3, 2 * r / 3, 2 * r / 3],
                     [0, 0, 1, 0, 0]], np.float32)              # a zero part stays zero; the row is unit
    got = concat_embeddings([img, txt])
    assert got.dtype == np.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(got, want, atol=1e-7)
    # in chunks of one row, into float16 (the gather path's memmap dtype), from float16 memmaps alike
    out = np.zeros((3, 5), np.float16)
    concat_embeddings([img.astype(np.float16), txt.astype(np.float16)], out=out, chunk=1)
    np.testing.assert_allclose(out, want, atol=1e-3)


def test_cosine_on_concat_is_the_mean_of_part_cosines():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8)) * rng.uniform(0.2, 5, (20, 1))
    b = rng.normal(size=(20, 5)) * rng.uniform(0.2, 5, (20, 1))
    x = concat_embeddings([a, b], chunk=7)
    au = a / np.linalg.norm(a, axis=1, keepdims=True)
    bu = b / np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(x.astype(np.float64) @ x.T, (au @ au.T + bu @ bu.T) / 2, atol=1e-6)
    # three parts: the mean of three cosines
    x3 = concat_embeddings([a, b, a[:, :3]])
    cu = a[:, :3] / np.linalg.norm(a[:, :3], axis=1, keepdims=True)
    np.testing.assert_allclose(x3.astype(np.float64) @ x3.T, (au @ au.T + bu @ bu.T + cu @ cu.T) / 3, atol=1e-6)


def test_concat_rejects_mismatched_or_no_parts():
    with pytest.raises(ValueError, match="different row counts"):
        concat_embeddings([np.ones((3, 2)), np.ones((4, 2))])
    with pytest.raises(ValueError, match="no parts"):
        concat_embeddings([])


def brute_greedy(difficulty: np.ndarray, feats: np.ndarray, budget: int, k: int, gamma: float = 1.0) -> list[int]:
    """Self-Filter stage 2 written plainly (negative: shift): cosine against every remaining row per pick."""
    d = difficulty.astype(np.float64).copy()
    if d.min() < 0:
        d -= d.min()
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    left = list(range(len(d)))
    picked = []
    for _ in range(budget):
        j = min(left, key=lambda i: (-d[i], i))
        picked.append(j)
        left.remove(j)
        f = max(d[j], 0.0)
        if f == 0 or not left:
            continue
        sims = unit[left] @ unit[j]
        near = sorted(range(len(left)), key=lambda i: (-sims[i], left[i]))[:k]
        for i in near:
            d[left[i]] -= f * sims[i] ** 2 * gamma
    return picked


def hand_concat(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    return np.hstack([img / np.linalg.norm(img, axis=1, keepdims=True),
                      txt / np.linalg.norm(txt, axis=1, keepdims=True)]) / np.sqrt(2)


def test_diversity_greedy_on_the_list_equals_brute_force_on_the_concatenation():
    rng = np.random.default_rng(3)
    n = 80
    img = rng.normal(size=(n, 6)) * rng.uniform(0.5, 3, (n, 1))     # few dims: close neighbours
    txt = rng.normal(size=(n, 4)) * rng.uniform(0.5, 3, (n, 1))
    diff = rng.normal(size=n)
    sel = S.diversity_greedy(diff, concat_embeddings([img, txt]), 25, None, k_nearest=5)
    ours = np.flatnonzero(sel.selected)[np.argsort(sel.rank[sel.selected])].tolist()
    assert ours == brute_greedy(diff, hand_concat(img, txt), 25, 5)
    assert ours != brute_greedy(diff, img, 25, 5)   # the text half changes the picks: the test can tell


def write_two_embeddings(store, prefix: str, rows: dict, img: dict, txt: dict):
    """A sidecar stage with ``img_emb.npy`` and ``txt_emb.npy`` members (a whole shard may lack ``txt``)."""
    for shard in raw_shards(store):
        out = ShardOutput(store, prefix, unit_of(shard))
        n = 0
        for s in iter_samples(store, f"raw/{shard}", with_images=False):
            n += 1
            extra = {"img_emb.npy": npy_bytes(img[s.key])}
            if s.key in txt:
                extra["txt_emb.npy"] = npy_bytes(txt[s.key])
            out.write_json(s.key, rows.get(s.key, {}), extra)
        out.finish(n)


def test_select_diversity_greedy_with_a_list_reads_the_concatenation(run):  # noqa: F811
    store, keys = run
    rng = np.random.default_rng(5)
    img = rng.normal(size=(N, 4)).astype(np.float32)
    txt = rng.normal(size=(N, 3)).astype(np.float32)
    diff = np.linspace(2.0, 0.2, N) + rng.normal(size=N) * 0.3
    lacks_txt = [4, 5, 6, 7]                # the second raw shard (4 samples a shard) stores no txt_emb
    write_two_embeddings(store, "stages/a/1", {k: {"d": float(diff[i])} for i, k in enumerate(keys)},
                         {k: img[i].astype(np.float16)[None] for i, k in enumerate(keys)},
                         {k: txt[i].astype(np.float16)[None] for i, k in enumerate(keys) if i not in lacks_txt})
    up = {"ingest": "raw", "a": "stages/a/1"}
    ctx = StageContext(store=store, prefix="select/x/1", upstream=up)
    t = gather(ctx, embeddings=[embedding_key(LIST)])
    mm = t.embeddings["a.img_emb+a.txt_emb"]
    assert mm.shape == (N, 7) and t.present["a.img_emb+a.txt_emb"].tolist() == [i not in lacks_txt for i in range(N)]
    assert not mm[lacks_txt].any()          # a row lacking a part is missing: a zero row, not half a row
    ok = [i for i in range(N) if i not in lacks_txt]
    want = hand_concat(img.astype(np.float16).astype(np.float64), txt.astype(np.float16).astype(np.float64))
    np.testing.assert_allclose(mm[ok].astype(np.float64), want[ok], atol=2e-3)

    budget, k = 4, 2
    d = select(store, up, score="a.d", budget=budget, dedup_exact=False,
               strategy={"kind": "diversity_greedy", "embedding": LIST, "k_nearest": k})
    kept = [keys.index(x["key"]) for x in sorted((x for x in d.values() if x["selected"]), key=lambda x: x["rank"])]
    sub = np.array(ok)
    ref = [int(sub[i]) for i in brute_greedy(diff[sub], want[sub], budget, k)]
    assert kept == ref
    assert kept != [int(sub[i]) for i in brute_greedy(diff[sub], img[sub].astype(np.float64), budget, k)]
    assert all(d[keys[i]]["reason"] == "missing_score: a.img_emb+a.txt_emb" for i in lacks_txt)


def test_gather_names_a_part_no_shard_stores(run):  # noqa: F811
    store, keys = run
    one = {k: np.ones((1, 3), np.float16) for k in keys}
    write_two_embeddings(store, "stages/a/1", {}, one, one)
    ctx = StageContext(store=store, prefix="select/x/1", upstream={"ingest": "raw", "a": "stages/a/1"})
    with pytest.raises(PermanentInputError, match=r"'a.tx_emb': stage 'a' has 12 rows and none stores 'tx_emb'"):
        gather(ctx, embeddings=["a.img_emb+a.tx_emb"])
    # a single misspelt name too: the stage has rows, none stores it (it used to drop every sample as
    # missing_score)
    with pytest.raises(PermanentInputError, match=r"'a.im_emb': stage 'a' has 12 rows and none stores 'im_emb'"):
        gather(ctx, embeddings=["a.im_emb"])
    with pytest.raises(PermanentInputError, match="stage id among"):
        gather(ctx, embeddings=["a.img_emb+b.txt_emb"])


def _plan(tmp_path, stage: dict):
    recipe = load_recipe({"storage": {"prefix": str(tmp_path)}, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": "a.json", "images": "."}},
        {"stage": "score_clip"}, stage]})
    return plan(recipe)


@pytest.mark.parametrize("emb, message", [
    ([], "the list is empty"),
    (["score_clip.img_emb", "nope.txt_emb"], "not earlier stages"),
    (["score_clip.img_emb", "txt_emb"], r"'txt_emb': want '<stage_id>.<name>'"),
    (["score_clip.img_emb", 3], "3: want"),
    (["score_clip.img_emb", "score_clip.img_emb"], "listed twice"),
])
@pytest.mark.parametrize("where", ["select", "cluster", "dedup"])
def test_bad_embedding_lists_fail_at_plan(tmp_path, where, emb, message):
    stage = {"select": {"stage": "select", "with": {"strategy": {"kind": "diversity_greedy", "embedding": emb}}},
             "cluster": {"stage": "cluster", "with": {"embedding": emb}},
             "dedup": {"stage": "dedup", "with": {"embedding": emb}}}[where]
    with pytest.raises(PermanentInputError, match=message):
        _plan(tmp_path, stage)


def test_config_hash_follows_the_list():
    def h(emb):
        cfg = SelectConfig.from_dict({"score": "t.d", "strategy": {"kind": "diversity_greedy", "embedding": emb}})
        return config_hash("select", cfg.hash_dict(), "up")

    single, pair = h("score_clip.img_emb"), h(["score_clip.img_emb", "score_clip.txt_emb"])
    assert single != pair != h(["score_clip.txt_emb", "score_clip.img_emb"])   # the order is the layout
    assert h(["score_clip.img_emb"]) == single                                  # a one-item list is that name


def test_cluster_and_dedup_stages_read_the_concatenation(run):  # noqa: F811
    """Rows 0 and 1 share an image embedding but not a text one: SemDeDup on the image alone groups them,
    on [image; text] it does not (cosine ~0.5); k-means on the list clusters by both halves."""
    from libcurate.select.cluster_stage import ClusterConfig, ClusterStage
    from libcurate.select.dedup_stage import DedupConfig, DedupStage

    store, keys = run
    rng = np.random.default_rng(2)
    img = rng.normal(size=(N, 16)).astype(np.float32)
    txt = rng.normal(size=(N, 16)).astype(np.float32)
    img[1] = img[0]
    write_two_embeddings(store, "stages/a/1", {}, {k: img[i].astype(np.float16)[None] for i, k in enumerate(keys)},
                         {k: txt[i].astype(np.float16)[None] for i, k in enumerate(keys)})
    ctx = StageContext(store=store, prefix="stages/dd/1", upstream={"ingest": "raw", "a": "stages/a/1"})

    def groups(emb):
        f = DedupStage(DedupConfig.from_dict({"embedding": emb, "eps": 0.02, "n_clusters": 1})).fit(ctx)
        return int(f["stats"]["groups"])

    assert groups("a.img_emb") == 1 and groups(LIST) == 0
    # cluster: the same labels as k-means on the hand-made concatenation
    from libcurate.select.cluster import kmeans

    fitted = ClusterStage(ClusterConfig.from_dict({"embedding": LIST, "n_clusters": 3, "n_init": 2})).fit(ctx)
    want = kmeans(hand_concat(img.astype(np.float16).astype(np.float32), txt.astype(np.float16).astype(np.float32))
                  .astype(np.float16), 3, seed=0, n_init=2).labels
    assert fitted["labels"].tolist() == want.tolist()
