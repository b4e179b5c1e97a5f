"""Bounded summaries of a stream of columns: what lets the report stay the same size at 10M samples.

* :class:`StreamingHistogram`: exact counts in at most ``max_bins`` equal bins, computed in one pass
  over values arriving shard by shard, with the range unknown in advance. Bins are aligned to multiples
  of a power-of-two width; when a value falls outside, the width doubles (pairs of bins merge) until
  everything fits. Counts are kept per group (kept / dropped), on the same bins.
* :class:`BottomK`: a uniform sample of fixed size: every row gets a pseudo-random priority from a hash
  of its key and a seed (:func:`priorities`), and the ``k`` lowest priorities are kept with their
  payload. The sample does not depend on shard order or on how many shards there are, and the same run
  gives the same sample every time.
"""

from __future__ import annotations

import math

import numpy as np

from ..columns import hex_digest

_MIX = np.uint64(0x9E3779B97F4A7C15)   # odd: multiplication by it permutes the 64-bit integers


def priorities(keys: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint64 priority of each hex key (S24), mixed with ``seed``; a key's priority never changes."""
    with np.errstate(over="ignore"):
        h = hex_digest(np.asarray(keys, dtype="S24")) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        h = h * _MIX
        h ^= h >> np.uint64(29)
        return h * _MIX


class StreamingHistogram:
    """Counts of finite values in equal bins over a range that grows as values arrive.

    Args:
        max_bins: at most this many bins (at least ``max_bins / 2`` once the values span the range).
        groups: independent count rows on the same bins (0 = kept, 1 = dropped in the report).

    Attributes:
        width: bin width (a power of two), None before the first finite value.
        k0: index of the first bin; bin ``i`` covers ``[(k0 + i) * width, (k0 + i + 1) * width)``.
        counts: int64 [groups, n_bins].
        n_missing: values that were NaN (absent) per group.
    """

    def __init__(self, max_bins: int = 40, groups: int = 2):
        if max_bins < 2:
            raise ValueError("max_bins must be >= 2")
        self.max_bins, self.groups = max_bins, groups
        self.width: float | None = None
        self.k0 = 0
        self.counts = np.zeros((groups, 0), np.int64)
        self.n_missing = np.zeros(groups, np.int64)
        self.lo = math.inf
        self.hi = -math.inf
        self.integers = True

    def add(self, values: np.ndarray, group: np.ndarray | int = 0) -> None:
        """Count ``values`` (float) into ``group`` (an int, or an int array of the same length)."""
        v = np.asarray(values, dtype=np.float64)
        g = np.broadcast_to(np.asarray(group, dtype=np.int64), v.shape)
        ok = np.isfinite(v)
        self.n_missing += np.bincount(g[~ok], minlength=self.groups)[: self.groups]
        v, g = v[ok], g[ok]
        if not len(v):
            return
        vmin, vmax = float(v.min()), float(v.max())
        self.lo, self.hi = min(self.lo, vmin), max(self.hi, vmax)
        self.integers = self.integers and bool(np.all(v == np.floor(v)))
        if self.width is None:
            span = vmax - vmin
            if span > 0:
                self.width = 2.0 ** math.ceil(math.log2(span / (self.max_bins - 1)))
            else:
                self.width = 2.0 ** (math.floor(math.log2(abs(vmin))) - 4) if vmin else 2.0 ** -20
            self.k0 = math.floor(vmin / self.width)
        while True:
            ks = np.floor(v / self.width).astype(np.int64)
            lo = min(self.k0, int(ks.min())) if self.counts.shape[1] else int(ks.min())
            hi = max(self.k0 + self.counts.shape[1] - 1, int(ks.max())) if self.counts.shape[1] else int(ks.max())
            if hi - lo + 1 <= self.max_bins:
                break
            self._coarsen()
        if not self.counts.shape[1]:
            self.k0 = lo
        if lo < self.k0 or hi >= self.k0 + self.counts.shape[1]:
            grown = np.zeros((self.groups, hi - lo + 1), np.int64)
            if self.counts.shape[1]:
                grown[:, self.k0 - lo: self.k0 - lo + self.counts.shape[1]] = self.counts
            self.counts, self.k0 = grown, lo
        nb = self.counts.shape[1]
        self.counts += np.bincount(g * nb + (ks - self.k0), minlength=self.groups * nb).reshape(self.groups, nb)

    def _coarsen(self) -> None:
        """Double the width: bin k goes to k // 2 (floor, so negative indices merge pairwise too)."""
        n = self.counts.shape[1]
        if n:
            new_k0 = self.k0 // 2
            new_n = (self.k0 + n - 1) // 2 - new_k0 + 1
            merged = np.zeros((self.groups, new_n), np.int64)
            idx = (self.k0 + np.arange(n)) // 2 - new_k0
            for gi in range(self.groups):
                np.add.at(merged[gi], idx, self.counts[gi])
            self.counts, self.k0 = merged, new_k0
        self.width *= 2.0

    def binned(self) -> tuple[np.ndarray, np.ndarray]:
        """``(edges, counts)`` to show: integer-valued data (words, tokens) gets bins at least 1 wide, so
        the bars do not alternate with empty bins between integers."""
        if self.width is None or not self.integers or self.width >= 1:
            return self.edges, self.counts
        h = StreamingHistogram(self.max_bins, self.groups)
        h.width, h.k0, h.counts = self.width, self.k0, self.counts.copy()
        while h.width < 1:
            h._coarsen()
        return h.edges, h.counts

    @property
    def edges(self) -> np.ndarray:
        if self.width is None:
            return np.zeros(0)
        return (self.k0 + np.arange(self.counts.shape[1] + 1)) * self.width

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def to_dict(self) -> dict:
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(), "missing": self.n_missing.tolist(),
                "min": None if self.width is None else self.lo, "max": None if self.width is None else self.hi}


class BottomK:
    """The ``k`` rows with the lowest priorities seen so far, with their payload columns.

    ``offer(prio, col=array, ...)`` merges a batch; ``payload[col]`` then holds the kept rows, ordered by
    priority (ties by arrival). Payload columns may be 2-D (embedding rows)."""

    def __init__(self, k: int):
        self.k = k
        self.prio = np.zeros(0, np.uint64)
        self.payload: dict[str, np.ndarray] = {}

    def cutoff(self) -> int | None:
        """Rows with a priority >= this cannot enter (None while there is room)."""
        return int(self.prio[-1]) if len(self.prio) >= self.k else None

    def offer(self, prio: np.ndarray, **cols) -> None:
        if not len(prio) or self.k <= 0:
            return
        c = self.cutoff()
        take = np.flatnonzero(prio < np.uint64(c)) if c is not None else np.arange(len(prio))
        if not len(take):
            return
        if len(take) > self.k:  # only this batch's k best can enter
            take = take[np.argsort(prio[take], kind="stable")[: self.k]]
        p = np.concatenate([self.prio, prio[take]])
        merged = {name: (np.concatenate([self.payload[name], np.asarray(a)[take]]) if name in self.payload
                         else np.asarray(a)[take]) for name, a in cols.items()}
        order = np.argsort(p, kind="stable")[: self.k]
        self.prio = p[order]
        self.payload = {name: a[order] for name, a in merged.items()}

    def __len__(self) -> int:
        return len(self.prio)
