"""Benchmark the selection engine against the issue's goals, each beside the plain alternative.

    .venv/bin/python bench/select.py --json              # all four figures (about 10 min on 2 cores)
    .venv/bin/python bench/select.py --only select_10m   # one of: self_filter, self_filter_list, kmeans,
                                                         # semdedup, select_10m

Figures (the last line with ``--json`` holds them all):

* ``self_filter_stage2_s``: Self-Filter stage 2, 25,000 of 158,000 samples, 1,536-d fp16 features
  (``strategies.diversity_greedy``); beside it ``self_filter_seed_pick_s``: the seed's loop (re-sort of
  the whole dict per pick), timed on its first 200 picks and extrapolated to 25,000.
* ``self_filter_list_stage2_s``: the same stage 2 with ``embedding: [img, txt]`` (two 768-d parts joined
  and normalised in place, then the greedy) against ``self_filter_single_stage2_s``: one 1,536-d column
  holding the same rows; ``self_filter_list_over_single`` is the ratio (``--only self_filter_list``).
* ``kmeans_1m_s``: k-means++ into 30 clusters, 1M x 512 fp16 (memory-mapped), every sample assigned;
  beside it ``kmeans_sklearn_1m_s``: scikit-learn's KMeans (one init, 20 iterations) on the same rows.
* ``semdedup_1m_s``: SemDeDup on the same 1M x 512 (k-means buckets, then in-bucket cosine pairs), with
  the planted near-duplicates it found; beside it ``semdedup_bruteforce_est_s``: exact all-pairs cosine
  with numpy, one 200-row block timed and scaled to 1M rows.
* ``select_10m_s`` / ``select_10m_peak_rss_mb``: the ``select`` stage over 10M synthetic samples in 1,000
  shards (column files of 3 score fields, a cluster id and the raw content signature), thresholds +
  a weighted, normalised score + ``cluster_proportional`` to a 1M budget, decision files written. Run
  in a child process so its peak RSS is its own.

Synthetic data: embeddings are unit vectors around 64 random centres (so clusters and near-duplicates
exist); scores are uniform; 1% of samples are exact duplicates.
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/<name>.py`, this directory comes first on the import path, where bench/select.py
# would shadow the standard library's `select` (imported by subprocess): put the repository root there.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import resource
import subprocess
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def clustered_embeddings(path: str, n: int, d: int, centres: int = 64, seed: int = 0,
                         chunk: int = 100_000) -> np.ndarray:
    """A float16 [n, d] memmap of unit vectors scattered around ``centres`` random directions."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)).astype(np.float32)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        x = c[rng.integers(0, centres, hi - lo)] + 0.6 * rng.normal(size=(hi - lo, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        mm[lo:hi] = x
    mm.flush()
    return mm


# -- Self-Filter stage 2 --------------------------------------------------------------------------
def seed_greedy_pick_time(difficulty: np.ndarray, feats: np.ndarray, picks: int, k: int = 10,
                          gamma: float = 1.0) -> float:
    """The seed's stage 2 loop (SEEDS.md 2.5), for comparison: a dict re-sorted for every pick, cosine
    against all samples per pick. Returns the seconds for ``picks`` picks."""
    scores = {i: float(v) for i, v in enumerate(difficulty)}
    selected = set()
    t0 = time.perf_counter()
    for _ in range(picks):
        j = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[0][0]
        selected.add(j)
        dj = scores.pop(j)
        sims = feats @ feats[j].astype(np.float32)
        order = np.argsort(-sims)
        taken = 0
        for o in order:
            if o == j or o in selected:
                continue
            scores[int(o)] -= dj * float(sims[o]) ** 2 * gamma
            taken += 1
            if taken == k:
                break
    return time.perf_counter() - t0


def bench_self_filter(tmp: str, n: int = 158_000, d: int = 1536, budget: int = 25_000) -> dict:
    from libcurate.select import strategies as S

    emb = clustered_embeddings(os.path.join(tmp, "sf.npy"), n, d, seed=1)
    difficulty = np.random.default_rng(2).normal(size=n)
    eligible = np.ones(n, bool)
    t0 = time.perf_counter()
    sel = S.diversity_greedy(difficulty, emb, budget, eligible, k_nearest=10, gamma=1.0)
    ours = time.perf_counter() - t0
    assert int(sel.selected.sum()) == budget
    feats = np.asarray(emb[:n], np.float32)
    seed_200 = seed_greedy_pick_time(difficulty, feats, 200)
    return {"self_filter_stage2_s": round(ours, 2), "self_filter_seed_pick_s": round(seed_200 * budget / 200, 1),
            "self_filter_n": n, "self_filter_budget": budget}


def bench_self_filter_list(tmp: str, n: int = 158_000, d: int = 768, budget: int = 25_000, rounds: int = 3) -> dict:
    """Stage 2 with ``embedding: [img, txt]`` (two d-dim parts) against one 2d-dim embedding, same rows.

    The list form costs what the single one does plus the join: ``gather`` writes each part into its
    column slice of one memmap (the same bytes a single 2d-dim column writes) and then normalises it in
    place (:func:`libcurate.columns.concat_embeddings`); that pass is timed here, beside
    ``diversity_greedy`` on the joined rows. The single embedding is those very rows stored as one column,
    so the greedy's work is identical and the ratio is the join's overhead. Best of ``rounds`` (the two
    greedies alternate which runs first)."""
    from libcurate.columns import concat_embeddings
    from libcurate.select import strategies as S

    img = clustered_embeddings(os.path.join(tmp, "sfl-img.npy"), n, d, seed=1)
    txt = clustered_embeddings(os.path.join(tmp, "sfl-txt.npy"), n, d, seed=7)
    difficulty = np.random.default_rng(2).normal(size=n)
    single = list_join = list_greedy = float("inf")
    for r in range(rounds):
        joined = np.lib.format.open_memmap(os.path.join(tmp, f"sfl-joined-{r}.npy"), mode="w+", dtype=np.float16,
                                           shape=(n, 2 * d))
        for lo in range(0, n, 100_000):      # what gather writes for the parts (the same for one column)
            joined[lo:lo + 100_000, :d] = img[lo:lo + 100_000]
            joined[lo:lo + 100_000, d:] = txt[lo:lo + 100_000]
        t0 = time.perf_counter()
        concat_embeddings([joined[:, :d], joined[:, d:]], out=joined)
        joined.flush()
        list_join = min(list_join, time.perf_counter() - t0)
        # the same rows as one column, written as gather writes a single embedding (a w+ memmap alike)
        one = np.lib.format.open_memmap(os.path.join(tmp, f"sfl-one-{r}.npy"), mode="w+", dtype=np.float16,
                                        shape=(n, 2 * d))
        for lo in range(0, n, 100_000):
            one[lo:lo + 100_000] = joined[lo:lo + 100_000]
        got = {}
        for which in (("list", "single") if r % 2 == 0 else ("single", "list")):   # alternate the order
            t0 = time.perf_counter()
            got[which] = S.diversity_greedy(difficulty, joined if which == "list" else one, budget, None,
                                            k_nearest=10, gamma=1.0)
            if which == "list":
                list_greedy = min(list_greedy, time.perf_counter() - t0)
            else:
                single = min(single, time.perf_counter() - t0)
        assert np.array_equal(got["list"].selected, got["single"].selected)
        assert int(got["list"].selected.sum()) == budget
        del joined, one
    total = list_join + list_greedy
    return {"self_filter_list_join_s": round(list_join, 2), "self_filter_list_stage2_s": round(total, 2),
            "self_filter_list_greedy_s": round(list_greedy, 2), "self_filter_single_stage2_s": round(single, 2),
            "self_filter_list_over_single": round(total / single, 3),
            "self_filter_list_dims": [d, d], "self_filter_list_n": n}


# -- k-means and SemDeDup at 1M -------------------------------------------------------------------
def bench_kmeans(tmp: str, n: int = 1_000_000, d: int = 512) -> dict:
    from libcurate.select import cluster as C

    emb = clustered_embeddings(os.path.join(tmp, "km.npy"), n, d, seed=3)
    t0 = time.perf_counter()
    r = C.kmeans(emb, 30, seed=0, n_init=1)
    s = time.perf_counter() - t0
    assert len(r.labels) == n and r.labels.min() >= 0
    # the plain alternative: scikit-learn's KMeans (k-means++, one init, 20 iterations) on the same rows
    from sklearn.cluster import KMeans

    x = np.asarray(emb, np.float32)
    t0 = time.perf_counter()
    KMeans(30, n_init=1, max_iter=20, random_state=0).fit(x)
    return {"kmeans_1m_s": round(s, 1), "kmeans_sklearn_1m_s": round(time.perf_counter() - t0, 1), "kmeans_n": n}


def bench_semdedup(tmp: str, n: int = 1_000_000, d: int = 512) -> dict:
    from libcurate.select import dedup as D

    emb = clustered_embeddings(os.path.join(tmp, "sd.npy"), n, d, seed=4)
    # plant 1% near-duplicates: copies of random rows with a little noise
    rng = np.random.default_rng(5)
    src = rng.integers(0, n, n // 100)
    dst = rng.choice(n, n // 100, replace=False)
    # noise of norm ~0.07: cosine ~0.9977 with the original, inside eps 0.02
    x = np.asarray(emb[src], np.float32) + 0.003 * rng.normal(size=(len(src), d)).astype(np.float32)
    emb[dst] = x / np.linalg.norm(x, axis=1, keepdims=True)
    emb.flush()
    t0 = time.perf_counter()
    i, j, sim = D.semdedup_pairs(emb, 0.02, seed=0)
    s = time.perf_counter() - t0
    # the plain alternative: exact all-pairs cosine, timed on one 200-row block against all n rows
    # and scaled to n rows (the O(n^2 d) a user would write with numpy)
    x = np.asarray(emb[:], np.float32)
    t0 = time.perf_counter()
    block = x[:200] @ x.T
    np.argwhere(block >= 0.98)
    brute = (time.perf_counter() - t0) * n / 200
    del x, block
    found = set(zip(np.minimum(i, j).tolist(), np.maximum(i, j).tolist()))
    planted = {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist()) if a != b}
    # a planted copy may itself be overwritten by a later copy; count the pairs that still hold
    return {"semdedup_1m_s": round(s, 1), "semdedup_bruteforce_est_s": round(brute), "semdedup_pairs": int(len(i)),
            "semdedup_planted_found": len(planted & found), "semdedup_planted": len(planted), "semdedup_n": n}


# -- select over 10M ------------------------------------------------------------------------------
def make_select_store(root: str, n_shards: int = 1000, per_shard: int = 10_000, seed: int = 6) -> None:
    """Column files (no tars: select reads only columns) for ``n_shards`` raw shards and one score stage."""

    from libcurate.columns import KEY_COL, columns_rel, pack_arrays
    from libcurate.stage import done_rel
    from libcurate.storage import open_store

    store = open_store(root)
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        unit = f"shard-{s:06d}"
        keys = np.frombuffer(rng.bytes(12 * per_shard), dtype="S12")
        hexkeys = np.array([k.hex().encode() for k in keys.tolist()], dtype="S24")
        content = hexkeys.copy()
        dup = rng.random(per_shard) < 0.01
        content[dup] = content[0]
        for prefix, cols in (("raw", {KEY_COL: hexkeys, "s:content": content}),
                             ("stages/score/1", {KEY_COL: hexkeys, "f:a": rng.random(per_shard),
                                                 "f:b": rng.random(per_shard), "f:c": rng.random(per_shard),
                                                 "f:cluster": rng.integers(0, 30, per_shard).astype(np.float64)})):
            store.write_bytes(columns_rel(prefix, unit), pack_arrays(cols))
            store.write_text(done_rel(prefix, unit), "")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that across fork+exec,
    so a child started by a big parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _select_child(root: str) -> None:
    from libcurate.select.stage import SelectConfig, SelectStage
    from libcurate.stage import StageContext
    from libcurate.storage import open_store

    cfg = SelectConfig.from_dict({
        "thresholds": {"score.a": {"min": 0.05}},
        "score": {"weights": {"score.a": 1.0, "score.b": 0.5, "score.c": 0.25}, "normalize": "minmax"},
        "budget": 1_000_000,
        "strategy": {"kind": "cluster_proportional", "cluster": "score.cluster"}})
    ctx = StageContext(store=open_store(root), prefix="select/sel/x", upstream={"ingest": "raw", "score": "stages/score/1"})
    t0 = time.perf_counter()
    stats = SelectStage(cfg).run_global(ctx)
    s = time.perf_counter() - t0
    rss = peak_rss_mb()
    print(json.dumps({"select_10m_s": round(s, 1), "select_10m_peak_rss_mb": round(rss),
                      "select_10m_selected": stats["out"], "select_10m_in": stats["in"]}))


def bench_select_10m(tmp: str, n_shards: int = 1000, per_shard: int = 10_000) -> dict:
    root = os.path.join(tmp, "sel10m")
    make_select_store(root, n_shards, per_shard)
    r = subprocess.run([sys.executable, __file__, "--child-select", root], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


BENCHES = {"self_filter": bench_self_filter, "self_filter_list": bench_self_filter_list, "kmeans": bench_kmeans, "semdedup": bench_semdedup,
           "select_10m": bench_select_10m}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", choices=sorted(BENCHES), action="append")
    p.add_argument("--child-select", help=argparse.SUPPRESS)
    p.add_argument("--shards", type=int, default=1000, help="select_10m: shards of 10,000 samples")
    args = p.parse_args()
    if args.child_select:
        _select_child(args.child_select)
        return
    out: dict = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="curate-bench-select-") as tmp:
        for name in args.only or list(BENCHES):
            t0 = time.perf_counter()
            kw = {"n_shards": args.shards} if name == "select_10m" else {}
            out.update(BENCHES[name](tmp, **kw))
            print(f"{name}: {time.perf_counter() - t0:.1f}s total", file=sys.stderr)
    print(json.dumps(out) if args.json else out)


if __name__ == "__main__":
    main()
