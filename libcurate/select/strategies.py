"""Selection strategies: which eligible samples to keep under a budget, and why the others were not kept.

Plain functions over numpy columns (one row per sample): no storage, no I/O, no Python object per
sample, so they run on columns of millions of rows. The only per-sample Python loop is the greedy pick
loop of :func:`diversity_greedy`, which runs ``budget`` times.

Every strategy takes ``eligible`` (bool[n], the rows that survived earlier rules such as thresholds;
``None`` means all rows) and returns a :class:`Selection` covering all ``n`` rows. Ineligible rows are
never selected and get reason 0 here: what excluded them was decided, and recorded, elsewhere.

"Best first" means, everywhere: by score descending (ascending with ``descending=False``), NaN scores
last, ties broken by the lower row index. Ranks of selected rows follow that order unless a strategy
says otherwise (:func:`diversity_greedy` ranks by pick order).

Strategies:

- :func:`topk`: the best ``budget`` eligible rows.
- :func:`cluster_proportional`: InstructionGPT-4's final pick (SEEDS.md 1.8): per-cluster quotas
  ``max(1, floor(B * size / N))``, the best rows inside each cluster, then exactly ``budget`` rows.
- :func:`diversity_greedy`: Self-Filter stage 2 (SEEDS.md 2.5): greedy by difficulty, each pick lowers
  the difficulty of its nearest still-unselected neighbours.
- :func:`quotas`: per-label quotas from shares or counts (MMInstruct's instruction types, LRV's
  positive:negative ratio).

Helpers: :func:`normalize`, :func:`weighted_score`, :func:`cluster_quota`.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

REASON_OVER_BUDGET = 1
REASON_CLUSTER_QUOTA = 2
REASON_DIVERSITY_PENALTY = 3
REASON_QUOTA_FULL = 4

REASON_NAMES = {
    REASON_OVER_BUDGET: "over_budget",
    REASON_CLUSTER_QUOTA: "cluster_quota",
    REASON_DIVERSITY_PENALTY: "diversity_penalty",
    REASON_QUOTA_FULL: "quota_full",
}


@dataclass
class Selection:
    """What a strategy decided, for every one of the ``n`` input rows.

    Attributes:
        selected: bool[n], True for kept rows.
        rank: int64[n], 1-based order of selection for selected rows (1 = picked first / best), 0 for
            the others.
        reason: int8[n], why an eligible row was not kept (a ``REASON_*`` constant, named in
            ``REASON_NAMES``); 0 for selected rows and for ineligible rows (not decided here).
        detail: extra per-row arrays, name -> array[n] (e.g. ``quota``, ``final_difficulty``).
    """

    selected: np.ndarray
    rank: np.ndarray
    reason: np.ndarray
    detail: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def order(self) -> np.ndarray:
        """Row indices of the selected rows, rank 1 first."""
        rows = np.flatnonzero(self.selected)
        return rows[np.argsort(self.rank[rows], kind="stable")]


# --------------------------------------------------------------------------------------------------
# shared helpers


def _floats(values, name: str = "score") -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a


def _mask(eligible, n: int) -> np.ndarray:
    if eligible is None:
        return np.ones(n, dtype=bool)
    m = np.asarray(eligible)
    if m.dtype != bool or m.shape != (n,):
        raise ValueError(f"eligible must be a bool array of shape ({n},), got {m.dtype} {m.shape}")
    return m


def _check_budget(budget, name: str = "budget") -> None:
    if budget is not None and (int(budget) != budget or budget < 0):
        raise ValueError(f"{name} must be a non-negative integer or None, got {budget!r}")


def _best_first(score: np.ndarray, rows: np.ndarray, descending: bool) -> np.ndarray:
    """``rows`` sorted best first: NaN last, then by score, then by the lower row index."""
    s = score[rows]
    nan = np.isnan(s)
    key = np.where(nan, 0.0, -s if descending else s)
    return rows[np.lexsort((rows, key, nan))]


def _selection(n: int, picked_in_order: np.ndarray, reason: np.ndarray, detail=None) -> Selection:
    selected = np.zeros(n, dtype=bool)
    selected[picked_in_order] = True
    rank = np.zeros(n, dtype=np.int64)
    rank[picked_in_order] = np.arange(1, len(picked_in_order) + 1)
    reason[picked_in_order] = 0  # callers pass a fresh array
    return Selection(selected, rank, reason, dict(detail or {}))


def _group_quota_pick(group: np.ndarray, rows: np.ndarray, quota: np.ndarray, score: np.ndarray,
                      descending: bool) -> np.ndarray:
    """bool[len(rows)]: True for the best ``quota[g]`` rows of every group ``g``.

    ``group`` holds compact group ids (0..G-1) aligned with ``rows``. One lexsort by (group, best first)
    and each row's position inside its group; no loop over groups.
    """
    s = score[rows]
    nan = np.isnan(s)
    key = np.where(nan, 0.0, -s if descending else s)
    o = np.lexsort((rows, key, nan, group))
    g = group[o]
    sizes = np.bincount(group, minlength=len(quota))
    first = np.cumsum(sizes) - sizes
    position = np.arange(len(o)) - first[g]
    take = np.zeros(len(rows), dtype=bool)
    take[o] = position < quota[g]
    return take


def _trim_or_fill(score, picked, spare, target, descending, fill=True):
    """Bring the quota picks to exactly ``target`` rows (when possible).

    Too many: drop the globally worst picks. Too few (and ``fill``): add the globally best ``spare``
    rows. Returns (final rows best first, trimmed rows, filled rows).
    """
    picked = _best_first(score, picked, descending)
    empty = np.zeros(0, dtype=np.int64)
    if target is None or len(picked) == target:
        return picked, empty, empty
    if len(picked) > target:
        return picked[:target], picked[target:], empty
    if not fill:
        return picked, empty, empty
    filled = _best_first(score, spare, descending)[: target - len(picked)]
    return _best_first(score, np.concatenate([picked, filled]), descending), empty, filled


# --------------------------------------------------------------------------------------------------
# scores


def normalize(values, how: str = "minmax") -> np.ndarray:
    """One score column mapped to a common scale, as float64.

    NaN stays NaN and is ignored when computing the statistics.

    - ``minmax``: ``(v - min) / (max - min)``, in [0, 1].
    - ``zscore``: ``(v - mean) / std`` (population std, ddof 0).
    - ``rank``: average rank (ties share the mean of their ranks), scaled by ``(rank - 1) / (m - 1)`` to
      [0, 1] over the ``m`` non-NaN values.

    A constant column (all non-NaN values equal, including a single value) maps to 0 with ``minmax``
    and ``zscore`` (there is no spread to scale by) and to 0.5 with ``rank`` (every value ties at the
    middle rank). ``minmax`` and ``zscore`` reject infinite values; ``rank`` accepts them.
    """
    v = _floats(values, "values")
    out = np.full(v.shape, np.nan)
    ok = ~np.isnan(v)
    if not ok.any():
        if how not in ("minmax", "zscore", "rank"):
            raise ValueError(f"unknown normalisation {how!r}")
        return out
    x = v[ok]
    if how in ("minmax", "zscore") and np.isinf(x).any():
        raise ValueError(f"{how} normalisation needs finite values (or NaN)")
    if how == "minmax":
        lo, hi = x.min(), x.max()
        out[ok] = (x - lo) / (hi - lo) if hi > lo else 0.0
    elif how == "zscore":
        sd = x.std()
        out[ok] = (x - x.mean()) / sd if sd > 0 else 0.0
    elif how == "rank":
        m = len(x)
        order = np.argsort(x, kind="stable")
        xs = x[order]
        starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
        ends = np.r_[starts[1:], m]
        mean_rank = (starts + ends - 1) / 2.0  # 0-based mean rank of each tie group
        r = np.empty(m)
        r[order] = np.repeat(mean_rank, ends - starts)
        out[ok] = r / (m - 1) if m > 1 else 0.5
    else:
        raise ValueError(f"unknown normalisation {how!r}")
    return out


def weighted_score(columns: dict, weights: dict, how: str = "minmax") -> np.ndarray:
    """``sum(weight * normalize(columns[name], how))`` over the names in ``weights``, as float64.

    Only the columns named in ``weights`` are used (others in ``columns`` are ignored); a weight whose
    column is missing raises KeyError. A row is NaN when any used column is NaN there (also for a zero
    weight: the value is missing, not small).
    """
    if not weights:
        raise ValueError("weights is empty")
    total = None
    for name, w in weights.items():
        if name not in columns:
            raise KeyError(f"no column {name!r} for its weight")
        part = float(w) * normalize(columns[name], how)
        if total is not None and part.shape != total.shape:
            raise ValueError(f"column {name!r} has {part.shape[0]} rows, others {total.shape[0]}")
        total = part if total is None else total + part
    return total


# --------------------------------------------------------------------------------------------------
# top-k


def topk(score, budget: int | None, eligible, descending: bool = True) -> Selection:
    """The ``budget`` best eligible rows (``None``: all of them), ranked best first.

    Best first: score descending (ascending with ``descending=False``), NaN last, ties by the lower row
    index. Eligible rows beyond the budget get ``REASON_OVER_BUDGET``.
    """
    score = _floats(score)
    n = len(score)
    el = _mask(eligible, n)
    _check_budget(budget)
    order = _best_first(score, np.flatnonzero(el), descending)
    keep = order if budget is None else order[: int(budget)]
    reason = np.zeros(n, dtype=np.int8)
    reason[order[len(keep):]] = REASON_OVER_BUDGET
    return _selection(n, keep, reason)


# --------------------------------------------------------------------------------------------------
# InstructionGPT-4: per-cluster proportional quotas


def cluster_quota(sizes, budget: int, n_total: int | None = None) -> np.ndarray:
    """InstructionGPT-4's quota per cluster: ``max(1, floor(budget * size / n_total))``, 0 if empty.

    Integer arithmetic (no float rounding). ``n_total`` defaults to ``sum(sizes)``. The seed's shipped
    spectral clusters (sizes 880, 286, 325, 1234, 177, 300, 13, 85, 59, 80 in its file order) with
    budget 204 and 3,439 samples give 52+16+19+73+10+17+1+5+3+4 = 200. Note the ``max(1, ...)``: every
    non-empty cluster contributes, so quotas can sum to more than ``budget`` when there are many small
    clusters.
    """
    s = np.asarray(sizes, dtype=np.int64)
    if (s < 0).any():
        raise ValueError("cluster sizes must be >= 0")
    _check_budget(budget)
    total = int(s.sum()) if n_total is None else int(n_total)
    if total <= 0:
        return np.zeros(s.shape, dtype=np.int64)
    q = (int(budget) * s) // total
    return np.where(s > 0, np.maximum(q, 1), 0).astype(np.int64)


def cluster_proportional(score, cluster, budget: int | None, eligible, *, quota_budget: int | None = None,
                         descending: bool = True) -> Selection:
    """InstructionGPT-4's final selection (SEEDS.md 1.8), with the seed's weak points fixed.

    1. Quotas: :func:`cluster_quota` over the cluster sizes counted among *eligible* rows, with
       ``quota_budget`` (default ``budget``; the seed used 204 to end with 200) and ``n_total`` = the
       number of eligible rows.
    2. Inside each cluster, the best ``quota`` rows by the full float score (the seed truncated scores
       with ``int()``, which made most rows tie) — best first, ties by the lower row index.
    3. When ``budget`` is given the result has exactly ``min(budget, eligible)`` rows:

       - more quota picks than ``budget``: the globally worst picks are dropped, ``REASON_OVER_BUDGET``
         (as the seed's final sort-and-cut);
       - fewer (clusters too small, or quotas rounding down): the globally best remaining eligible rows
         fill the gap, whatever their cluster.

       With ``budget=None`` the quota picks are kept as they are.

    Eligible rows not kept because their cluster's quota was full get ``REASON_CLUSTER_QUOTA``. Ranks:
    best first over the final set. ``cluster`` may hold any integer ids (e.g. -1 for noise is just
    another cluster).

    detail: ``quota`` int64[n], the quota of the row's cluster (0 for ineligible rows).
    """
    score = _floats(score)
    n = len(score)
    cluster = np.asarray(cluster)
    if cluster.shape != (n,):
        raise ValueError(f"cluster must have shape ({n},), got {cluster.shape}")
    el = _mask(eligible, n)
    _check_budget(budget)
    _check_budget(quota_budget, "quota_budget")
    qb = budget if quota_budget is None else quota_budget
    if qb is None:
        raise ValueError("give budget or quota_budget")
    rows = np.flatnonzero(el)
    _, group = np.unique(cluster[rows], return_inverse=True)
    group = group.reshape(-1)
    sizes = np.bincount(group)
    q = cluster_quota(sizes, qb, len(rows))
    take = _group_quota_pick(group, rows, q, score, descending)

    quota = np.zeros(n, dtype=np.int64)
    quota[rows] = q[group]
    reason = np.zeros(n, dtype=np.int8)
    reason[rows[~take]] = REASON_CLUSTER_QUOTA
    final, trimmed, _ = _trim_or_fill(score, rows[take], rows[~take], budget, descending)
    reason[trimmed] = REASON_OVER_BUDGET
    return _selection(n, final, reason, {"quota": quota})


# --------------------------------------------------------------------------------------------------
# label quotas


def _apportion(shares: dict, budget: int) -> dict:
    """Largest-remainder split of ``budget`` by ``shares``: floor of each exact share, then one more
    for the labels with the largest fractional parts (ties: the label listed first). Exact arithmetic."""
    exact = {}
    for label, s in shares.items():
        f = Fraction(str(s)) if isinstance(s, float | np.floating) else Fraction(s)
        if f < 0:
            raise ValueError(f"share of {label!r} is negative")
        exact[label] = f
    total = sum(exact.values())
    if total <= 0:
        raise ValueError("shares sum to 0")
    exact = {label: f * int(budget) / total for label, f in exact.items()}
    counts = {label: math.floor(x) for label, x in exact.items()}
    left = int(budget) - sum(counts.values())
    by_fraction = sorted(enumerate(exact), key=lambda t: (-(exact[t[1]] - counts[t[1]]), t[0]))
    for _, label in by_fraction[:left]:
        counts[label] += 1
    return counts


def quotas(labels, score, budget: int | None, eligible, *, shares: dict | None = None,
           counts: dict | None = None, fill: bool = False, descending: bool = True) -> Selection:
    """Keep the best rows of each label up to its quota (task, instruction type, domain, polarity ...).

    Quotas, from one of:

    - ``shares`` (label -> weight, e.g. ``{"pos": 1, "neg": 1}`` for LRV's 1:1): ``budget`` is split
      by largest remainder: ``floor(share / sum(shares) * budget)`` each, then the remaining units one
      by one to the largest fractional parts (ties: the label listed first). Quotas sum to ``budget``.
    - ``counts`` (label -> int): used as given. With a ``budget``, the picks are cut to ``budget`` by
      dropping the globally worst ones (``REASON_OVER_BUDGET``).
    - neither: equal shares over the labels present among eligible rows.

    Labels not named in ``shares``/``counts`` have quota 0: all their rows get ``REASON_QUOTA_FULL``.
    Inside a label: best first, ties by the lower row index. Rows beyond their label's quota get
    ``REASON_QUOTA_FULL``.

    ``fill=True``: when labels have fewer rows than their quota, the unused places go to the globally
    best remaining rows of labels that have a positive quota, until the total reaches ``budget``
    (``sum(counts)`` when ``budget`` is None). Labels with quota 0 are never used to fill. With
    ``fill=False`` the shortfall stays unused.

    Ranks: best first over the final set. detail: ``quota`` int64[n], the quota of the row's label (0
    for ineligible rows).
    """
    score = _floats(score)
    n = len(score)
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    el = _mask(eligible, n)
    _check_budget(budget)
    if shares is not None and counts is not None:
        raise ValueError("give shares or counts, not both")
    rows = np.flatnonzero(el)
    present, group = np.unique(labels[rows], return_inverse=True)
    group = group.reshape(-1)
    present = present.tolist()
    if counts is None:
        if budget is None:
            raise ValueError("shares need a budget")
        counts = _apportion(shares if shares is not None else {lab: 1 for lab in present}, budget)
    for label, c in counts.items():
        if int(c) != c or c < 0:
            raise ValueError(f"count of {label!r} must be a non-negative integer, got {c!r}")
    q = np.array([int(counts.get(lab, 0)) for lab in present], dtype=np.int64)
    take = _group_quota_pick(group, rows, q, score, descending)

    quota = np.zeros(n, dtype=np.int64)
    quota[rows] = q[group]
    reason = np.zeros(n, dtype=np.int8)
    reason[rows[~take]] = REASON_QUOTA_FULL
    target = budget if budget is not None else (int(sum(counts.values())) if fill else None)
    spare = rows[~take & (q[group] > 0)]
    final, trimmed, _ = _trim_or_fill(score, rows[take], spare, target, descending, fill=fill)
    reason[trimmed] = REASON_OVER_BUDGET
    return _selection(n, final, reason, {"quota": quota})


# --------------------------------------------------------------------------------------------------
# Self-Filter stage 2: greedy difficulty with a diversity penalty

# float32 inner products of unit vectors are within ~d * 2**-24 of the float64 value; a candidate list
# is trusted to hold the k best float64 neighbours when k unselected entries beat its last entry by
# more than twice that (see _CosineKnn and diversity_greedy).
_SIM_TOL = 1e-4
_CHUNK = 8192  # rows converted to float32 at a time (bounds the temporary memory)
_TRAIN_PER_LIST = 16  # k-means training points per IVF list
_BATCH_MIN, _BATCH_DIV = 1024, 16


def _unit32(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows as float32, L2-normalised (zero rows stay zero), written into ``out`` when given."""
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    out[...] = x
    norm = np.sqrt(np.einsum("ij,ij->i", out, out))
    norm[norm == 0] = 1.0
    out /= norm[:, None]
    return out


def _top_k_rows(sims: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest entries of every row (unordered); all columns if fewer."""
    if sims.shape[1] <= k:
        return np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
    return np.argpartition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k:]


def _single_threaded_blas():
    """Context in which numpy's BLAS runs on one thread (threadpoolctl); a no-op without it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn, pinned here
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _default_threads() -> int:
    from ..cpus import available_cores

    return min(8, available_cores())


class _CosineKnn:
    """k nearest eligible rows by cosine similarity, on unit float32 copies of the eligible rows.

    ``nlist == 1``: exact brute force with ``faiss.knn`` (the computation ``IndexFlatIP.search`` runs).

    ``nlist > 1``: an inverted file. faiss spherical k-means on ``16 * nlist`` sampled rows gives
    ``nlist`` centroids; every row is stored in its nearest centroid's list, the lists contiguous in
    one float32 array. A query scans the ``nprobe`` lists whose centroids are most similar to it. The
    scan goes list by list: all queries of a batch probing list l are one matrix product against that
    list, then a partial sort. Why not faiss's ``IndexIVFFlat``: it scans each query separately, which
    at 1,536 dimensions is memory-bound (~15 s for 25K queries at nprobe 4 of 256 lists on 2 cores,
    against ~2 s here); and ``faiss.knn`` per list was slower than product + ``argpartition``.

    The per-list products are small (tens of queries x a few hundred rows), so they run on
    single-threaded BLAS spread over ``threads`` worker threads (as do the assignment and the copy at
    build time). Multi-threaded BLAS on such small
    products spins at a barrier on every call: on a shared 2-core machine one batch took 10-18 s that
    way against ~1 s with this arrangement (the same ~1 s when the machine is idle).
    """

    def __init__(self, emb: np.ndarray, rows: np.ndarray, n: int, nlist: int, seed: int, threads: int):
        import faiss

        self.faiss = faiss
        m, dim = len(rows), emb.shape[1]
        self.m, self.nlist, self.threads = m, nlist, threads
        chunks = [(s, min(m, s + _CHUNK)) for s in range(0, m, _CHUNK)]
        if nlist > 1:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(m, size=min(m, nlist * _TRAIN_PER_LIST), replace=False))
            km = faiss.Kmeans(dim, nlist, niter=8, spherical=True, seed=seed, min_points_per_centroid=1,
                              max_points_per_centroid=_TRAIN_PER_LIST + 1)
            km.train(_unit32(emb[rows[sample]]))
            self.centroids_t = np.ascontiguousarray(km.centroids.T)
            assign = np.empty(m, dtype=np.int64)

            def nearest_centroid(s, e):
                # argmax of the inner product: the row's norm does not change it, so rows are only cast
                assign[s:e] = (emb[rows[s:e]].astype(np.float32) @ self.centroids_t).argmax(axis=1)

            self._parallel(nearest_centroid, chunks)
            order = np.argsort(assign, kind="stable")
            sizes = np.bincount(assign, minlength=nlist)
        else:
            order = np.arange(m)
            sizes = np.array([m])
        self.offsets = np.r_[0, np.cumsum(sizes)]
        self.ids = rows[order]  # storage position -> row
        self.xs = np.empty((m, dim), dtype=np.float32)
        self._parallel(lambda s, e: _unit32(emb[self.ids[s:e]], self.xs[s:e]), chunks)
        self.pos = np.full(n, -1, dtype=np.int64)
        self.pos[self.ids] = np.arange(m)

    def _parallel(self, fn, spans):
        """``fn(start, end)`` for every span, on the worker threads, each with single-threaded BLAS.

        numpy releases the GIL in casts, products and partial sorts, so the workers run in parallel;
        the spans write disjoint outputs."""
        with _single_threaded_blas(), ThreadPoolExecutor(self.threads) as pool:
            for f in [pool.submit(fn, a, b) for a, b in spans]:
                f.result()

    def search(self, query_rows: np.ndarray, k: int, nprobe: int, pad: int):
        """(sims float32[q, k], rows int64[q, k]), most similar first; missing: sim -inf, row ``pad``."""
        q = self.xs[self.pos[query_rows]]
        k = min(k, self.m)
        if self.nlist == 1:
            d, i = self.faiss.knn(q, self.xs, k, metric=self.faiss.METRIC_INNER_PRODUCT)
            return d, self.ids[i]
        nprobe = min(nprobe, self.nlist)
        sims = np.empty((len(q), k), dtype=np.float32)
        out = np.empty((len(q), k), dtype=np.int64)
        ids_pad = np.r_[self.ids, pad]
        step = 4 * _CHUNK
        for s in range(0, len(q), step):
            qc = q[s:s + step]
            nq = len(qc)
            with _single_threaded_blas():
                probes = _top_k_rows(qc @ self.centroids_t, nprobe)
            dist = np.full((nq, nprobe, k), -np.inf, dtype=np.float32)
            pos = np.full((nq, nprobe, k), self.m, dtype=np.int64)
            flat = probes.ravel()
            by_list = np.argsort(flat, kind="stable")
            lists = flat[by_list]
            cuts = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1], True])

            def scan(a, b):
                # (query, probe) pairs are disjoint across lists: the writes never overlap.
                lo, hi = self.offsets[lists[a]], self.offsets[lists[a] + 1]
                if hi == lo:
                    return
                qi, slot = np.divmod(by_list[a:b], nprobe)
                block = qc[qi] @ self.xs[lo:hi].T
                top = _top_k_rows(block, k)
                kk = top.shape[1]
                dist[qi, slot, :kk] = np.take_along_axis(block, top, axis=1)
                pos[qi, slot, :kk] = top + lo

            self._parallel(scan, zip(cuts[:-1], cuts[1:]))
            dist = dist.reshape(nq, -1)
            pos = pos.reshape(nq, -1)
            top = _top_k_rows(dist, k)
            d_top = np.take_along_axis(dist, top, axis=1)
            srt = np.argsort(-d_top, axis=1, kind="stable")
            sims[s:s + nq] = np.take_along_axis(d_top, srt, axis=1)
            out[s:s + nq] = ids_pad[np.take_along_axis(np.take_along_axis(pos, top, axis=1), srt, axis=1)]
        return sims, out


def diversity_greedy(difficulty, emb, budget: int | None, eligible, *, k_nearest: int = 10,
                     gamma: float = 1.0, negative: str = "shift", exact_below: int = 50_000,
                     nlist: int | None = None, nprobe: int = 16, seed: int = 0,
                     threads: int | None = None) -> Selection:
    """Self-Filter stage 2 (SEEDS.md 2.5): greedy by difficulty with a diversity penalty.

    Repeat ``budget`` times (``None``: until every eligible row is picked):

    1. pick the unselected eligible row ``j`` with the largest *current* difficulty (ties: lower row
       index) — as the seed, which re-sorts its live dict every iteration;
    2. ``d_j`` = j's *current* difficulty at pick time (the seed's ``difficulty`` is the value it just
       sorted on, already lowered by earlier picks — not the original one);
    3. for the ``k_nearest`` still-unselected eligible rows most similar to j by cosine on the
       L2-normalised ``emb`` (ties: lower row index): ``d_k -= f(d_j) * sim(j, k)**2 * gamma``.

    Ineligible rows are never picked, never penalised and never count among the ``k_nearest``. If fewer
    than ``k_nearest`` unselected eligible rows remain, all of them are penalised (the seed asserts).

    The sign trap: the seed uses ``f(d_j) = d_j``, so a negative ``d_j`` *raises* its neighbours.
    ``negative`` chooses:

    - ``"shift"`` (default): if the smallest eligible difficulty is below 0, subtract it from all
      eligible difficulties first (the order is unchanged, the minimum becomes 0), and use
      ``f(d_j) = max(d_j, 0)``. Penalties can push a row below 0; a pick can only have ``d_j < 0`` once
      every remaining row was pushed below 0, and then it penalises nothing. So every penalty lowers.
    - ``"clip"``: no shift, ``f(d_j) = max(d_j, 0)``: picks with negative difficulty penalise nothing.
    - ``"raw"``: ``f(d_j) = d_j`` exactly as the seed, for reproduction.

    Neighbours come from faiss-built indexes over unit float32 copies of the eligible rows:

    - ``eligible count <= exact_below``: exact kNN (brute force), and the result is the exact greedy.
      Penalty similarities are recomputed in float64 from ``emb``, and a row's candidate list
      (``3 * k_nearest + 1`` neighbours) is trusted only while ``k_nearest`` of its unselected entries
      beat its last entry by more than float32 error (1e-4); otherwise the row is searched again with
      twice the neighbours, up to all eligible rows. Cost ~ ``budget * eligible * dim * 2`` flops.
    - above: an inverted file (``nlist`` lists, default ``round(sqrt(eligible))`` capped to 1024,
      spherical k-means; ``nprobe`` lists scanned per query; float32 similarities). Approximate: a
      true neighbour in an unscanned list is missed and a farther one is penalised instead, and since
      the greedy is chaotic a few such misses change later picks. Search cost ~ ``nprobe / nlist`` of
      exact. Measured on the synthetic 158K x 1,536 benchmark (:func:`bench_self_filter_stage2`,
      397 lists): nprobe 4 / 8 / 16 find 98.6 / 99.2 / 99.7% of the 11 nearest and share 95.7 / 96.8 /
      97.9% of the 25K picks with the exact greedy. Raise ``nprobe`` for fidelity, lower it for speed;
      ``nprobe >= nlist`` scans everything (exact neighbours, float32 similarities). Neighbours with
      equal float32 similarity come in scan order, not by row index.

    Neighbour lists are computed only for rows that get picked, speculatively in batches of
    ``max(1024, budget // 16)``: first the rows with the largest difficulty, later (when a pick has no
    list yet) the unselected rows with the largest *current* difficulty that lack one. About 6% of the
    lists go unused at Self-Filter's scale. The best row comes from a heap of penalised rows (lazy
    invalidation: an entry is stale when its row was picked or its value changed) merged with the
    never-penalised rows in their original order; nothing is re-sorted per pick.

    Memory: a float32 copy of the eligible embeddings (``eligible * dim * 4`` bytes: 1 GB at 158K x
    1,536) plus a few int64[n] arrays.

    Reasons for eligible rows not picked: ``REASON_DIVERSITY_PENALTY`` when (a) their final difficulty
    is below their starting difficulty (after the shift), i.e. penalties lowered them, and (b) by
    starting difficulty alone they were within the first ``budget`` rows (best first, ties by lower
    index); otherwise ``REASON_OVER_BUDGET``.

    Args:
        difficulty: float[n]; eligible rows must be finite.
        emb: float[n, dim] (float16/32/64, may be a memmap); only eligible rows are read.
        budget: rows to pick; ``None`` = all eligible rows (in greedy order).
        eligible: bool[n] or None.
        k_nearest, gamma: as the seed (10, 1).
        negative: ``"shift"``, ``"clip"`` or ``"raw"`` (above).
        exact_below: largest eligible count searched exactly.
        nlist, nprobe: inverted-file settings above ``exact_below``.
        seed: k-means sampling and initialisation.
        threads: worker threads of the inverted-file scan (default: the CPUs this process may use, at
            most 8).

    detail: ``start_difficulty`` (after the shift) and ``final_difficulty``, float64[n], NaN for
    ineligible rows.
    """
    d = _floats(difficulty, "difficulty")
    n = len(d)
    el = _mask(eligible, n)
    _check_budget(budget)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"emb must have shape ({n}, dim), got {emb.shape}")
    if negative not in ("shift", "clip", "raw"):
        raise ValueError(f"negative must be 'shift', 'clip' or 'raw', got {negative!r}")
    if k_nearest < 0 or gamma < 0:
        raise ValueError("k_nearest and gamma must be >= 0")
    rows = np.flatnonzero(el)
    m = len(rows)
    if not np.isfinite(d[rows]).all():
        raise ValueError("eligible rows need a finite difficulty")
    n_pick = m if budget is None else min(int(budget), m)

    start = np.full(n, np.nan)
    start[rows] = d[rows]
    if negative == "shift" and m and start[rows].min() < 0:
        start[rows] = start[rows] - start[rows].min()
    cur = start.copy()
    stream = rows[np.lexsort((rows, -start[rows]))]  # never-penalised rows, best first

    # State. ``taken`` has one extra slot (index n) that stands for "no neighbour" in padded lists.
    taken = np.zeros(n + 1, dtype=bool)
    taken[n] = True
    touched = np.zeros(n, dtype=bool)
    heap: list[tuple[float, int]] = []
    picked = np.empty(n_pick, dtype=np.int64)
    p = 0

    k = int(k_nearest)
    need_neighbours = k > 0 and gamma > 0 and m > 1
    if need_neighbours:
        exact = m <= exact_below
        n_lists = 1 if exact else int(nlist or min(1024, max(1, round(math.sqrt(m)))))
        knn = _CosineKnn(emb, rows, n, n_lists, seed, threads or _default_threads())
        probe0 = 1 if exact else max(1, int(nprobe))
        k0 = min(m, 3 * k + 1)
        slot_of = np.full(n, -1, dtype=np.int64)
        lists: list = []  # slot -> [rows, sims32, k, nprobe, complete]

        def store(query_rows, kk, npb):
            sims, nbrs = knn.search(query_rows, kk, npb, pad=n)
            complete = kk >= m and (exact or npb >= n_lists)
            for i, r in enumerate(query_rows.tolist()):
                if slot_of[r] < 0:
                    slot_of[r] = len(lists)
                    lists.append(None)
                lists[slot_of[r]] = [nbrs[i], sims[i], kk, npb, complete]

        def fetch_batch(j):
            # Speculative: the unselected rows with the largest current difficulty that lack a list
            # get one, in one batch; most of them are picked soon after.
            size = min(m, max(_BATCH_MIN, n_pick // _BATCH_DIV))
            if not lists:
                batch = stream[:size]
            else:
                want = np.where(el & ~taken[:n] & (slot_of < 0), cur, -np.inf)
                top = np.argpartition(-want, size - 1)[:size] if size < n else np.arange(n)
                batch = top[np.isfinite(want[top])]
            store(np.union1d(batch, [j]), k0, probe0)

    def best() -> int:
        nonlocal p
        while heap and (taken[heap[0][1]] or cur[heap[0][1]] != -heap[0][0]):
            heapq.heappop(heap)
        while p < m and (taken[stream[p]] or touched[stream[p]]):
            p += 1
        if p < m:
            s = int(stream[p])
            if not heap or (-start[s], s) < heap[0]:
                p += 1
                return s
        return heapq.heappop(heap)[1]

    for t in range(n_pick):
        j = best()
        picked[t] = j
        taken[j] = True
        f = cur[j] if negative == "raw" else max(cur[j], 0.0)
        if not need_neighbours or f == 0.0:
            continue
        if slot_of[j] < 0:
            fetch_batch(j)
        nbrs, sims32, kk, npb, complete = lists[slot_of[j]]
        while True:
            free = ~taken[nbrs]
            if complete:
                break
            if exact:  # trust the list only where float32 error cannot reorder it (see docstring)
                enough = np.count_nonzero(free & (sims32 > sims32[-1] + _SIM_TOL)) >= k
            else:
                enough = np.count_nonzero(free) >= k
            if enough:
                break
            store(np.array([j]), min(m, 2 * kk), min(n_lists, 2 * npb))
            nbrs, sims32, kk, npb, complete = lists[slot_of[j]]
        cand = nbrs[free]
        if exact:
            x = emb[cand].astype(np.float64)
            y = emb[j].astype(np.float64)
            denom = np.sqrt(np.einsum("ij,ij->i", x, x)) * math.sqrt(y @ y)
            sim = np.divide(x @ y, denom, out=np.zeros(len(cand)), where=denom > 0)
            if len(cand) > k:
                best_k = np.lexsort((cand, -sim))[:k]
                cand, sim = cand[best_k], sim[best_k]
        else:
            cand = cand[:k]
            sim = sims32[free][:k].astype(np.float64)
        if len(cand) == 0:
            continue
        new = cur[cand] - f * sim**2 * gamma
        cur[cand] = new
        touched[cand] = True
        for v, r in zip(new.tolist(), cand.tolist()):
            heapq.heappush(heap, (-v, r))

    reason = np.zeros(n, dtype=np.int8)
    rest = el & ~taken[:n]
    start_rank = np.zeros(n, dtype=np.int64)
    start_rank[stream] = np.arange(1, m + 1)
    reason[rest] = REASON_OVER_BUDGET
    reason[rest & (cur < start) & (start_rank <= n_pick)] = REASON_DIVERSITY_PENALTY
    return _selection(n, picked, reason, {"start_difficulty": start, "final_difficulty": cur})


# --------------------------------------------------------------------------------------------------
# timing (not run on import)


def bench_self_filter_stage2(n: int = 158_000, d: int = 1536, budget: int = 25_000, seed: int = 0,
                             **kwargs) -> float:
    """Seconds :func:`diversity_greedy` takes at Self-Filter's scale (25K of 158K, 1,536-d float16).

    Synthetic data: ``n / 50`` random centres (float16), each row its centre plus uniform noise, so
    nearest neighbours are mostly rows of the same centre (cosine ~0.75) as in real CLIP features;
    difficulty ~ N(0, 1) (negative values exercise the shift). Data generation is not timed. Extra
    keyword arguments go to :func:`diversity_greedy`. Run: ``python -m libcurate.select.strategies``.

    Measured on a 2-core VM (Xeon, AVX-512), when no other job ran: 7.1-7.7 s with the defaults
    (nprobe 16; ~13 s of CPU time), ~5.5 s with ``nprobe=8``; about 6% more neighbour lists than picks.
    The exact greedy (``exact_below=10**6``) took 163 s on a busy machine.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), d), dtype=np.float32).astype(np.float16)
    which = rng.integers(0, len(centres), n)
    emb = np.empty((n, d), dtype=np.float16)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        noise = rng.integers(-127, 128, (e - s, d), dtype=np.int8).astype(np.float16) * np.float16(1 / 128)
        emb[s:e] = centres[which[s:e]] + noise
    difficulty = rng.standard_normal(n)
    t0 = time.perf_counter()
    diversity_greedy(difficulty, emb, budget, None, seed=seed, **kwargs)
    return time.perf_counter() - t0


if __name__ == "__main__":
    print(f"diversity_greedy 25K of 158K x 1536 fp16: {bench_self_filter_stage2():.2f} s")
