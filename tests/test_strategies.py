"""Selection strategies: known answers from the seeds, and an O(n^2) reference for the greedy."""

from __future__ import annotations

import numpy as np
import pytest

from libcurate.select.strategies import (
    REASON_CLUSTER_QUOTA,
    REASON_DIVERSITY_PENALTY,
    REASON_NAMES,
    REASON_OVER_BUDGET,
    REASON_QUOTA_FULL,
    cluster_proportional,
    cluster_quota,
    diversity_greedy,
    normalize,
    quotas,
    topk,
    weighted_score,
)

# InstructionGPT-4's shipped spectral clusters, in the order of its clustering_results.json (the order
# eval_clus.py walks them), and the quotas SEEDS.md 1.8 lists in that order.
SEED_SIZES = [880, 286, 325, 1234, 177, 300, 13, 85, 59, 80]
SEED_QUOTAS = [52, 16, 19, 73, 10, 17, 1, 5, 3, 4]


def test_reason_names():
    assert REASON_NAMES == {
        REASON_OVER_BUDGET: "over_budget",
        REASON_CLUSTER_QUOTA: "cluster_quota",
        REASON_DIVERSITY_PENALTY: "diversity_penalty",
        REASON_QUOTA_FULL: "quota_full",
    }
    assert len(set(REASON_NAMES)) == 4 and 0 not in REASON_NAMES


# --------------------------------------------------------------------------------------------------
# normalize / weighted_score / topk


def test_normalize_modes():
    v = np.array([1.0, np.nan, 3.0, 2.0, 2.0])
    np.testing.assert_allclose(normalize(v, "minmax"), [0, np.nan, 1, 0.5, 0.5])
    z = normalize(v, "zscore")
    x = np.array([1.0, 3.0, 2.0, 2.0])
    np.testing.assert_allclose(z[[0, 2, 3, 4]], (x - x.mean()) / x.std())
    assert np.isnan(z[1])
    # average ranks 0, 3, 1.5, 1.5 over m=4 -> /3
    np.testing.assert_allclose(normalize(v, "rank"), [0, np.nan, 1, 0.5, 0.5])
    np.testing.assert_allclose(normalize([4.0, 1.0, 9.0], "rank"), [0.5, 0, 1])


def test_normalize_constant_and_empty():
    c = np.array([2.0, 2.0, np.nan])
    np.testing.assert_array_equal(normalize(c, "minmax")[:2], [0, 0])
    np.testing.assert_array_equal(normalize(c, "zscore")[:2], [0, 0])
    np.testing.assert_array_equal(normalize(c, "rank")[:2], [0.5, 0.5])
    assert np.isnan(normalize([np.nan, np.nan], "minmax")).all()
    with pytest.raises(ValueError):
        normalize([1.0, 2.0], "softmax")
    with pytest.raises(ValueError):
        normalize([1.0, np.inf], "minmax")


def test_weighted_score():
    cols = {"clip": np.array([0.1, 0.3, 0.2, np.nan]), "len": np.array([10.0, 0.0, 5.0, 1.0]),
            "unused": np.array([np.nan] * 4)}
    s = weighted_score(cols, {"clip": 2.0, "len": 1.0})
    np.testing.assert_allclose(s[:3], [2 * 0 + 1, 2 * 1 + 0, 2 * 0.5 + 0.5])
    assert np.isnan(s[3])  # a used column is NaN there
    assert np.isnan(weighted_score(cols, {"clip": 0.0, "len": 1.0})[3])  # zero weight: still missing
    with pytest.raises(KeyError):
        weighted_score(cols, {"nope": 1.0})


def test_topk_ties_nan_and_budget():
    score = np.array([np.nan, 1.0, 3.0, 3.0, np.nan, 2.0])
    s = topk(score, 4, None)
    np.testing.assert_array_equal(s.order, [2, 3, 5, 1])  # 3.0 tie: lower index first
    np.testing.assert_array_equal(s.rank, [0, 4, 1, 2, 0, 3])
    np.testing.assert_array_equal(s.reason, [REASON_OVER_BUDGET, 0, 0, 0, REASON_OVER_BUDGET, 0])
    np.testing.assert_array_equal(topk(score, 5, None).order, [2, 3, 5, 1, 0])  # NaN last, by index
    np.testing.assert_array_equal(topk(score, None, None).order, [2, 3, 5, 1, 0, 4])
    asc = topk(score, 3, None, descending=False)
    np.testing.assert_array_equal(asc.order, [1, 5, 2])
    el = np.array([True, True, False, True, True, True])
    s = topk(score, 2, el)
    np.testing.assert_array_equal(s.order, [3, 5])
    assert s.reason[2] == 0 and not s.selected[2]  # ineligible: not decided here
    assert topk(score, 0, None).selected.sum() == 0


# --------------------------------------------------------------------------------------------------
# InstructionGPT-4: cluster quotas


def test_cluster_quota_known_answer():
    q = cluster_quota(SEED_SIZES, 204, 3439)
    np.testing.assert_array_equal(q, SEED_QUOTAS)
    assert q.sum() == 200
    by_size = sorted(SEED_SIZES, reverse=True)  # 1234, 880, 325, 300, 286, 177, 85, 80, 59, 13
    np.testing.assert_array_equal(cluster_quota(by_size, 204, 3439), [73, 52, 19, 17, 16, 10, 5, 4, 3, 1])
    np.testing.assert_array_equal(cluster_quota([0, 5, 100], 10, 105), [0, 1, 9])  # empty: 0; small: 1


def _seed_like_clusters(rng):
    cluster = np.repeat(np.arange(10), SEED_SIZES)
    rng.shuffle(cluster)
    return cluster, rng.random(len(cluster))


def test_cluster_proportional_known_answer():
    rng = np.random.default_rng(0)
    cluster, score = _seed_like_clusters(rng)
    s = cluster_proportional(score, cluster, 200, None, quota_budget=204)
    assert s.selected.sum() == 200
    counts = np.bincount(cluster[s.selected], minlength=10)
    np.testing.assert_array_equal(counts, SEED_QUOTAS)
    np.testing.assert_array_equal(s.detail["quota"], np.array(SEED_QUOTAS)[cluster])
    for c in range(10):  # the best rows of each cluster
        inside = cluster == c
        assert score[inside & s.selected].min() > score[inside & ~s.selected].max()
    assert (s.reason[~s.selected] == REASON_CLUSTER_QUOTA).all()
    np.testing.assert_array_equal(s.order, s.order[np.argsort(-score[s.order])])  # ranked by score
    # quota_budget defaults to budget: 204 quota-units, then cut to exactly 204
    assert cluster_proportional(score, cluster, 204, None).selected.sum() == 204


def test_cluster_proportional_trims_to_budget():
    # 50 clusters of 2 each get max(1, 0) = 1; one cluster of 100 gets 5: 55 quota picks for budget 10.
    rng = np.random.default_rng(1)
    cluster = np.r_[np.repeat(np.arange(50), 2), np.full(100, 99)]
    score = rng.random(len(cluster))
    s = cluster_proportional(score, cluster, 10, None)
    assert s.selected.sum() == 10
    by_quota = cluster_proportional(score, cluster, None, None, quota_budget=10)
    assert by_quota.selected.sum() == 55
    quota_picks = np.flatnonzero(by_quota.selected)
    best10 = quota_picks[np.argsort(-score[quota_picks])][:10]
    np.testing.assert_array_equal(np.sort(s.order), np.sort(best10))
    dropped = by_quota.selected & ~s.selected
    assert (s.reason[dropped] == REASON_OVER_BUDGET).all() and dropped.sum() == 45
    assert (s.reason[~by_quota.selected] == REASON_CLUSTER_QUOTA).all()


def test_cluster_proportional_fills_to_budget():
    # three clusters of 10, budget 10: quotas 3+3+3 = 9, the best remaining row fills the 10th place
    score = np.r_[np.linspace(0.9, 0.0, 10), np.linspace(0.5, 0.41, 10), np.linspace(0.3, 0.21, 10)]
    cluster = np.repeat([0, 1, 2], 10)
    s = cluster_proportional(score, cluster, 10, None)
    assert s.selected.sum() == 10
    np.testing.assert_array_equal(np.bincount(cluster[s.selected]), [4, 3, 3])
    assert s.selected[3] and s.reason[3] == 0  # row 3 (0.6) is the globally best leftover
    assert (s.reason[~s.selected] == REASON_CLUSTER_QUOTA).all()
    assert cluster_proportional(score, cluster, None, None, quota_budget=10).selected.sum() == 9
    assert cluster_proportional(score, cluster, 100, None).selected.sum() == 30  # all there is


def test_cluster_proportional_full_float_score_and_ties():
    # The seed sorted by int(final_score): 0.1 and 0.9 both became 0 and file order won.
    s = cluster_proportional(np.array([0.1, 0.9, 5.0]), np.array([0, 0, 1]), 2, None)
    np.testing.assert_array_equal(s.order, [2, 1])
    assert s.reason[0] == REASON_CLUSTER_QUOTA and s.detail["quota"][0] == 1
    # exact ties: lower index wins, always
    tie = cluster_proportional(np.ones(6), np.array([1, 0, 1, 0, 1, 0]), 2, None)
    np.testing.assert_array_equal(tie.order, [0, 1])
    el = np.array([True, False, True, True, True, True])
    tie = cluster_proportional(np.ones(6), np.array([1, 0, 1, 0, 1, 0]), 2, el)
    np.testing.assert_array_equal(tie.order, [0, 3])
    assert tie.detail["quota"][1] == 0 and tie.reason[1] == 0


# --------------------------------------------------------------------------------------------------
# label quotas


def test_quotas_shares_one_to_one():
    labels = np.array(["pos"] * 8 + ["neg"] * 4)
    score = np.r_[np.linspace(1.0, 0.3, 8), np.linspace(0.25, 0.1, 4)]
    s = quotas(labels, score, 6, None, shares={"pos": 1, "neg": 1})
    assert (labels[s.selected] == "pos").sum() == 3 and (labels[s.selected] == "neg").sum() == 3
    np.testing.assert_array_equal(s.order, [0, 1, 2, 8, 9, 10])
    assert (s.reason[3:8] == REASON_QUOTA_FULL).all() and s.reason[11] == REASON_QUOTA_FULL
    assert (s.detail["quota"] == 3).all()


def test_quotas_apportion_and_unlisted_labels():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 10)
    score = np.arange(30.0)[::-1]
    s = quotas(labels, score, 10, None, shares={0: 1, 1: 2})  # 3.33 / 6.67 -> 3 + 7; label 2 gets 0
    np.testing.assert_array_equal(np.bincount(labels[s.selected], minlength=3), [3, 7, 0])
    assert (s.reason[labels == 2] == REASON_QUOTA_FULL).all() and (s.detail["quota"][labels == 2] == 0).all()
    s = quotas(labels, score, 10, None, shares={2: 1, 0: 1, 1: 1})  # 3.33 each: the first listed gets 4
    np.testing.assert_array_equal(np.bincount(labels[s.selected]), [3, 3, 4])
    s = quotas(labels, score, 10, None)  # default: equal shares over present labels, sorted order
    np.testing.assert_array_equal(np.bincount(labels[s.selected]), [4, 3, 3])
    s = quotas(labels, score, 10, None, shares={0: 0.1, 1: 0.2, 2: 0.7})  # exact decimal arithmetic
    np.testing.assert_array_equal(np.bincount(labels[s.selected]), [1, 2, 7])


def test_quotas_counts_fill_and_trim():
    labels = np.array(["a"] * 2 + ["b"] * 10 + ["c"] * 5)
    score = np.r_[[0.1, 0.2], np.linspace(0.9, 0.45, 10), np.linspace(0.99, 0.95, 5)]
    counts = {"a": 5, "b": 5}
    s = quotas(labels, score, None, None, counts=counts)
    assert s.selected.sum() == 7  # "a" has only 2 rows
    assert not s.selected[labels == "c"].any() and (s.reason[labels == "c"] == REASON_QUOTA_FULL).all()
    f = quotas(labels, score, None, None, counts=counts, fill=True)
    assert f.selected.sum() == 10  # the 3 unused places go to the best remaining "b" rows, never "c"
    np.testing.assert_array_equal(np.flatnonzero(f.selected & (labels == "b")), np.arange(2, 10))
    assert not f.selected[labels == "c"].any()
    nf = quotas(labels, score, 10, None, shares={"a": 1, "b": 1})
    assert nf.selected.sum() == 7
    assert quotas(labels, score, 10, None, shares={"a": 1, "b": 1}, fill=True).selected.sum() == 10
    t = quotas(labels, score, 4, None, counts=counts)  # 7 quota picks cut to the best 4
    np.testing.assert_array_equal(t.order, [2, 3, 4, 5])
    assert (t.reason[[0, 1, 6]] == REASON_OVER_BUDGET).all()
    assert t.reason[7] == REASON_QUOTA_FULL
    with pytest.raises(ValueError):
        quotas(labels, score, 4, None, shares={"a": 1}, counts={"a": 1})


# --------------------------------------------------------------------------------------------------
# Self-Filter stage 2


def reference_greedy(difficulty, emb, budget, eligible, k=10, gamma=1.0, negative="shift"):
    """SEEDS.md 2.5 taken literally, O(n^2): every pick re-scans all rows and sorts all similarities."""
    emb = emb.astype(np.float64)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    cur = np.where(eligible, difficulty, np.nan).astype(np.float64)
    if negative == "shift" and np.nanmin(cur) < 0:
        cur = cur - np.nanmin(cur)
    selected = np.zeros(len(cur), dtype=bool)
    picks = []
    for _ in range(min(budget, eligible.sum())):
        avail = np.flatnonzero(eligible & ~selected)
        j = avail[np.argmax(cur[avail])]  # first maximum: the lower index on ties
        picks.append(j)
        selected[j] = True
        d_j = cur[j] if negative == "raw" else max(cur[j], 0.0)  # current value, at pick time
        rest = np.flatnonzero(eligible & ~selected)
        nearest = rest[np.lexsort((rest, -sim[j, rest]))][:k]
        cur[nearest] -= d_j * sim[j, nearest] ** 2 * gamma
    return np.array(picks, dtype=np.int64), cur


def clustered(rng, n, d, n_centres, noise):
    centres = rng.standard_normal((n_centres, d))
    return (centres[rng.integers(0, n_centres, n)] + noise * rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("negative", ["shift", "clip", "raw"])
@pytest.mark.parametrize("n,d,seed", [(200, 16, 0), (900, 32, 1), (2000, 64, 2)])
def test_diversity_greedy_matches_reference(n, d, seed, negative):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(seed)
    emb = clustered(rng, n, d, max(2, n // 20), 0.5)  # near neighbours at cosine ~0.8: strong penalties
    difficulty = rng.standard_normal(n) + 0.5  # some negative difficulties
    eligible = rng.random(n) < 0.9
    budget = int(eligible.sum()) * 2 // 3
    got = diversity_greedy(difficulty, emb, budget, eligible, negative=negative)
    picks, final = reference_greedy(difficulty, emb, budget, eligible, negative=negative)
    np.testing.assert_array_equal(got.order, picks)
    np.testing.assert_allclose(got.detail["final_difficulty"], final, rtol=0, atol=1e-9)
    # the penalty changed the outcome (else this test would not guard it)
    assert not np.array_equal(np.sort(picks), np.sort(topk(difficulty, budget, eligible).order))
    # reasons: diversity_penalty iff lowered and within the budget by starting difficulty
    start = got.detail["start_difficulty"]
    within = np.zeros(n, dtype=bool)
    within[topk(start, budget, eligible).order] = True
    rest = eligible & ~got.selected
    expect = np.where(rest & (final < start) & within, REASON_DIVERSITY_PENALTY,
                      np.where(rest, REASON_OVER_BUDGET, 0))
    np.testing.assert_array_equal(got.reason, expect)
    assert np.isnan(got.detail["final_difficulty"][~eligible]).all()


def test_diversity_greedy_all_and_small_k():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    emb = clustered(rng, 300, 8, 10, 0.3)
    difficulty = rng.random(300)
    el = np.ones(300, dtype=bool)
    for k, gamma in [(1, 0.5), (3, 2.0)]:
        got = diversity_greedy(difficulty, emb, None, None, k_nearest=k, gamma=gamma)
        picks, _ = reference_greedy(difficulty, emb, 300, el, k=k, gamma=gamma)
        np.testing.assert_array_equal(got.order, picks)
    plain = diversity_greedy(difficulty, emb, 50, None, gamma=0.0)  # no penalty: top-k by difficulty
    np.testing.assert_array_equal(plain.order, topk(difficulty, 50, None).order)


def test_diversity_greedy_negative_modes_known_answer():
    pytest.importorskip("faiss")
    # three rows on one direction (cosine 1) and one orthogonal row; all difficulties negative
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    d = np.array([-1.0, -2.0, -3.0, -2.5])
    raw = diversity_greedy(d, emb, 1, None, k_nearest=2, negative="raw")
    # pick row 0 (-1); its two nearest get d - (-1) * 1 = d + 1: the seed *raises* them
    np.testing.assert_allclose(raw.detail["final_difficulty"], [-1.0, -1.0, -2.0, -2.5])
    clip = diversity_greedy(d, emb, 1, None, k_nearest=2, negative="clip")
    np.testing.assert_allclose(clip.detail["final_difficulty"], d)
    shift = diversity_greedy(d, emb, 1, None, k_nearest=2, negative="shift")
    # shifted: [2, 1, 0, 0.5]; pick row 0 (2), nearest rows 1 and 2 (cosine 1) lose 2
    np.testing.assert_allclose(shift.detail["start_difficulty"], [2.0, 1.0, 0.0, 0.5])
    np.testing.assert_allclose(shift.detail["final_difficulty"], [2.0, -1.0, -2.0, 0.5])
    np.testing.assert_array_equal(diversity_greedy(d, emb, 2, None, k_nearest=2, negative="raw").order, [0, 1])
    np.testing.assert_array_equal(diversity_greedy(d, emb, 2, None, k_nearest=2).order, [0, 3])
    s = diversity_greedy(d, emb, 2, None, k_nearest=2)
    assert s.reason[1] == REASON_DIVERSITY_PENALTY and s.reason[2] == REASON_OVER_BUDGET


def test_diversity_greedy_ineligible_rows_untouched():
    pytest.importorskip("faiss")
    # row 1 duplicates row 0 but is ineligible: it is neither picked nor penalised, nor counted in k
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    d = np.array([3.0, 9.0, 2.0, 1.0])
    el = np.array([True, False, True, True])
    s = diversity_greedy(d, emb, 2, el, k_nearest=1)
    assert not s.selected[1] and s.reason[1] == 0 and np.isnan(s.detail["final_difficulty"][1])
    # pick 0 (3.0): its nearest eligible row is 2; then pick 3 (1.0): its nearest unselected is 2 again
    cos_02, cos_32 = 0.9 / np.hypot(0.9, 0.1), 0.1 / np.hypot(0.9, 0.1)
    expect = [3.0, 2.0 - 3.0 * cos_02**2 - 1.0 * cos_32**2, 1.0]
    np.testing.assert_allclose(s.detail["final_difficulty"][[0, 2, 3]], expect)
    np.testing.assert_array_equal(s.order, [0, 3])


def test_diversity_greedy_ivf_close_to_exact():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    n, budget = 6000, 1500
    emb = clustered(rng, n, 64, 300, 0.6)
    difficulty = rng.standard_normal(n)
    exact = diversity_greedy(difficulty, emb, budget, None)
    ivf = diversity_greedy(difficulty, emb, budget, None, exact_below=100)  # nlist 77, nprobe 16
    overlap = len(np.intersect1d(exact.order, ivf.order)) / budget
    print(f"IVF vs exact greedy: {overlap:.1%} of the picks shared")
    assert overlap >= 0.95
    assert ivf.selected.sum() == budget and not np.array_equal(ivf.order, exact.order)
    one = diversity_greedy(difficulty, emb, budget, None, exact_below=100, threads=1)
    np.testing.assert_array_equal(one.order, ivf.order)  # the threaded scan is deterministic
    every_list = diversity_greedy(difficulty, emb, budget, None, exact_below=100, nprobe=10_000)
    assert len(np.intersect1d(exact.order, every_list.order)) / budget >= 0.99


@pytest.mark.parametrize("negative", ["shift", "clip", "raw"])
def test_diversity_greedy_exact_ties(negative):
    pytest.importorskip("faiss")
    # one-hot rows: similarities are exactly 0 or 1, integer difficulties: penalised and untouched rows
    # tie exactly, and so do neighbours; every tie must go to the lower row index, as in the reference
    rng = np.random.default_rng(5)
    n = 90
    emb = np.eye(6, dtype=np.float32)[np.arange(n) % 6]
    difficulty = rng.integers(-2, 5, n).astype(np.float64)
    eligible = rng.random(n) < 0.9
    for k, budget in [(3, 40), (20, 70)]:
        got = diversity_greedy(difficulty, emb, budget, eligible, k_nearest=k, negative=negative)
        picks, final = reference_greedy(difficulty, emb, budget, eligible, k=k, negative=negative)
        np.testing.assert_array_equal(got.order, picks)
        np.testing.assert_allclose(got.detail["final_difficulty"], final, atol=1e-12)


def test_diversity_greedy_tie_between_penalised_and_untouched_rows():
    pytest.importorskip("faiss")
    e = np.eye(3, dtype=np.float32)
    # row 1 (a copy of row 0) is penalised to exactly 1.5 = the untouched rows 2 and 3: row 1 goes first
    emb, d = e[[0, 0, 1, 2]], np.array([5.0, 4.0, 1.5, 1.5])
    got = diversity_greedy(d, emb, 4, None, k_nearest=1, gamma=0.5)
    np.testing.assert_array_equal(got.order, [0, 1, 2, 3])
    np.testing.assert_array_equal(got.order, reference_greedy(d, emb, 4, np.ones(4, bool), 1, 0.5)[0])
    # now the untouched row has the lower index
    emb, d = e[[0, 1, 0, 2]], np.array([5.0, 1.5, 4.0, 1.5])
    got = diversity_greedy(d, emb, 4, None, k_nearest=1, gamma=0.5)
    np.testing.assert_array_equal(got.order, [0, 1, 2, 3])
    np.testing.assert_array_equal(got.order, reference_greedy(d, emb, 4, np.ones(4, bool), 1, 0.5)[0])
