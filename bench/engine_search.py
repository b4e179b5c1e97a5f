"""Benchmark the searches of ``decontaminate`` and ``retrieve``, each beside the plain alternative.

    .venv/bin/python bench/engine_search.py --json      # a few seconds on 2 cores

Figures (the last line with ``--json`` holds them all):

* ``phash_nearest_ms``: :func:`libcurate.select.decontaminate.nearest_hashes`, 1,000 sample hashes against
  10,000 benchmark hashes (a shard against a benchmark 20x POPE's 500 images); beside it
  ``phash_python_ms``: the Python loop ``min(bin(a ^ b).count("1") for b in index)``, timed on 50 queries
  and scaled to 1,000.
* ``question_match_ms``: :func:`libcurate.select.decontaminate.match_question` for 1,000 questions against
  an index of 10,000 benchmark questions; beside it ``question_pairwise_ms``: the overlap of every
  (sample, benchmark) pair from Python sets of n-grams, timed on 20 questions and scaled to 1,000.
* ``topk_faiss_ms``: :func:`libcurate.generate.knn.search_topk`, 100 queries, top-50 of a 200,000 x 512
  fp16 pool in blocks of 65,536 rows; beside it ``topk_numpy_ms``: one float32 matmul + argpartition over
  the whole pool (what the test compares against), same rows; ``topk_equal``: both returned the same rows.

Synthetic data: random 64-bit hashes; questions of 12 random words from a 2,000-word vocabulary; unit
Gaussian embeddings. ``--threads`` (default 1) caps faiss's OpenMP and numpy's BLAS threads alike: on a
shared 2-core machine two spinning OpenMP threads measured 7x slower than one (other processes hold the
cores), which says nothing about either method.
"""

from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import time

import numpy as np


def timed(fn, repeat: int = 3) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1000


def bench_phash(rng) -> dict:
    from libcurate.select.decontaminate import nearest_hashes

    index = rng.integers(0, 2**63, 10_000, dtype=np.int64).astype(np.uint64)
    queries = rng.integers(0, 2**63, 1_000, dtype=np.int64).astype(np.uint64)
    fast = timed(lambda: nearest_hashes(queries, index))
    ql, il = queries[:50].tolist(), index.tolist()
    t = time.perf_counter()
    for a in ql:
        min(bin(a ^ b).count("1") for b in il)
    plain = (time.perf_counter() - t) * 1000 * (len(queries) / len(ql))
    return {"phash_nearest_ms": round(fast, 2), "phash_python_ms": round(plain, 1)}


def bench_questions(rng) -> dict:
    from libcurate.select.decontaminate import build_question_index, match_question, words

    vocab = [f"w{i}" for i in range(2000)]
    bench = [" ".join(rng.choice(vocab, 12)) for _ in range(10_000)]
    samples = [" ".join(rng.choice(vocab, 12)) for _ in range(1_000)]
    idx = build_question_index(bench, 3, 0.05)
    fast = timed(lambda: [match_question(idx, q, 3, 3) for q in samples], repeat=1)

    def grams(t):
        w = words(t)
        return {" ".join(w[i:i + 3]) for i in range(len(w) - 2)}
    bench_g = [grams(b) for b in bench]
    t = time.perf_counter()
    for q in samples[:20]:
        g = grams(q)
        max(len(g & b) / max(1, min(len(g), len(b))) for b in bench_g)
    plain = (time.perf_counter() - t) * 1000 * (len(samples) / 20)
    return {"question_match_ms": round(fast, 1), "question_pairwise_ms": round(plain, 1)}


def bench_topk(rng) -> dict:
    from libcurate.generate.knn import search_topk, unit_rows

    pool = rng.standard_normal((200_000, 512)).astype(np.float16)
    q = unit_rows(rng.standard_normal((100, 512)))
    fast = timed(lambda: search_topk(pool, q, 50, block_rows=65_536), repeat=1)

    def numpy_topk():
        sims = q @ unit_rows(pool).T
        part = np.argpartition(-sims, 50, axis=1)[:, :50]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        return np.take_along_axis(part, order, 1)
    plain = timed(numpy_topk, repeat=1)
    same = bool(np.array_equal(np.sort(search_topk(pool, q, 50, block_rows=65_536)[1], axis=1),
                               np.sort(numpy_topk(), axis=1)))
    return {"topk_faiss_ms": round(fast, 1), "topk_numpy_ms": round(plain, 1), "topk_equal": same}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP and BLAS threads (both paths)")
    args = p.parse_args(argv)
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    threadpool_limits(args.threads)
    rng = np.random.default_rng(0)
    out = {}
    for part in (bench_phash, bench_questions, bench_topk):
        out.update(part(rng))
        if not args.json:
            print(part.__name__, {k: v for k, v in out.items()}, flush=True)
    out["threads"] = args.threads
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
