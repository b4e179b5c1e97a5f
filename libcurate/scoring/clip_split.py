"""How ``score_clip`` splits the CPU cores between model threads, loader worker processes and model replicas.

The right split depends on the model's cost against the decode cost, so it is measured, not guessed:
:func:`measure_costs` times, on the first real samples of the run, the loader's work per image
(read + decode + resize/crop + tokenise, one core) and the main process's work per image (the image and
text forward) at 1 thread and at all cores; :func:`choose_split` then predicts each candidate's rate and
takes the best. The rule (``C`` cores, ``d`` loader seconds per image, ``m_T`` main-process seconds per
image with ``T`` threads):

* ``W = 0`` workers (decode in the main process, ``T = C`` threads): ``1 / (d + m_C)``; the two run
  one after the other.
* ``W >= 1`` workers with ``T`` threads: ``min(W / d, 1 / m_T, C / (d + T * m_T))``: the slower of the
  two pipeline ends, and no faster than the cores can do the total work.
* ``R`` replicas (:mod:`libcurate.scoring.replicas`: ``R`` forked processes with one model thread
  each, each reading, decoding and scoring whole shards): ``f * R / (d + m_1)`` with ``R = min(C,
  shards)`` and ``f = shards / (R * ceil(shards / R))`` (the last round of shards leaves replicas idle).
* Candidates: ``T = 1`` with ``W = 1 .. C`` (single-threaded processes only time-share the cores), and
  ``T > 1`` only with ``T + W <= C``. A multi-threaded model beside a busy worker on the same cores is
  never chosen: OpenMP's parallel regions wait for the thread the worker displaced (measured 2.5x slower
  end-to-end on 2 cores, test-tiny-clip, 2 threads + 1 worker).

When replicas can fill every core (``R = C`` and ``f >= 0.95``: the shards divide evenly among the
cores, or there are about 20 or more per replica) they win under this rule whatever ``d`` and ``m`` are: ``T`` threads never
do more than ``T`` times the work of one (``T m_T >= m_1``), so every other candidate's rate is at most
``C / (d + m_1)``. The stage then skips the start-up measurement (:func:`replicas_without_measurement`)
and records ``d`` and ``m_1`` from the replicas' own work instead. With fewer shards the measurement
decides.

Examples on 2 cores with one shard (no replicas possible): test-tiny-clip (``d`` ~3 ms, ``m_1`` ~0.5 ms)
gets 2 workers + 1 thread; a random ViT-B-32 (``d`` ~4 ms, ``m_2`` ~33 ms) gets 0 workers + 2 threads.
With an even number of shards (or many) both get 2 replicas without a measurement.

On CUDA the model's threads do not matter; workers are sized to keep the GPU fed:
``W = clamp(ceil(d / m), 1, C - 1)`` (one core left to the main process), ``T`` = torch's default.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class Split:
    """The chosen ``threads`` (torch intra-op threads of the main process; 0 = torch's default) and
    ``workers`` (DataLoader processes), the rate the rule predicts, and the timings it used."""

    threads: int
    workers: int
    predicted_sps: float
    timings: dict = field(default_factory=dict)
    replicas: int = 1

    def as_dict(self) -> dict:
        return {"threads": self.threads, "workers": self.workers, "replicas": self.replicas,
                "predicted_sps": round(self.predicted_sps, 2), **self.timings}


def predicted_rate(cores: int, decode_s: float, model_s: dict[int, float], threads: int, workers: int) -> float:
    """Samples/s the rule predicts for ``threads`` model threads and ``workers`` loader processes."""
    m = model_s[threads]
    if workers == 0:
        return 1.0 / (decode_s + m)
    return min(workers / decode_s, 1.0 / m, cores / (decode_s + threads * m))


def replica_fill(cores: int, n_shards: int) -> tuple[int, float]:
    """``(R, f)``: how many replicas ``n_shards`` shards can keep busy on ``cores`` cores, and the share of
    the replicas' time they are busy when each takes whole shards in turn."""
    r = max(1, min(cores, n_shards))
    rounds = -(-max(n_shards, 1) // r)
    return r, max(n_shards, 1) / (r * rounds)


def replicas_without_measurement(cores: int, n_shards: int, cuda: bool = False) -> int:
    """The replica count when replicas win whatever the timings (see the module doc), else 0."""
    if cuda:
        return 0
    r, fill = replica_fill(cores, n_shards)
    return r if r == cores and r > 1 and fill >= 0.95 else 0


def replica_split(requested: int, cores: int, n_shards: int, cuda: bool = False, hand_set: bool = False,
                  note: dict | None = None) -> Split | None:
    """The replica split a model stage runs without measuring, or ``None``: ``requested`` replicas when set
    by hand (``N > 1``, at most one per shard), else on auto (``0``, and no thread/worker setting given by
    hand) one per core when they fill every core (:func:`replicas_without_measurement`). Never on CUDA.
    ``note``: the split's timings entry for the auto case (default: recorded from the replicas' work)."""
    if cuda:
        return None
    if requested > 1:
        return Split(1, 0, float("nan"), {"configured": True}, replicas=max(1, min(requested, n_shards)))
    r = replicas_without_measurement(cores, n_shards) if requested == 0 and not hand_set else 0
    return Split(1, 0, float("nan"), dict(note or {"measured": "during the run"}), replicas=r) if r else None


def choose_split(cores: int, decode_s: float, model_s: dict[int, float], cuda: bool = False,
                 max_workers: int | None = None, replicas: bool = True) -> Split:
    """The best (threads, workers) by the module's rule.

    Args:
        cores: CPU cores this process may use.
        decode_s: loader seconds per image on one core (> 0).
        model_s: main-process seconds per image by thread count; on CPU it must hold 1 and ``cores``;
            on CUDA one entry (any key) with the GPU forward's seconds per image.
        cuda: the model runs on a GPU.
        max_workers: upper bound on workers and replicas (the number of shards: each owns whole shards).
        replicas: whether replicas are a candidate (not on CUDA, not when the user turned them off).
    """
    cores = max(1, cores)
    decode_s = max(decode_s, 1e-9)
    cap = cores if max_workers is None else max(0, min(cores, max_workers))
    timings = {"decode_ms": round(decode_s * 1e3, 3),
               **{f"model_ms_{t}t": round(s * 1e3, 3) for t, s in sorted(model_s.items())}}
    if cuda:
        m = max(min(model_s.values()), 1e-9)
        w = min(max(1, math.ceil(decode_s / m)), max(1, cores - 1), max(cap, 0))
        rate = 1.0 / max(m, decode_s / w) if w else 1.0 / (m + decode_s)
        return Split(0, w, rate, timings)
    best: Split | None = None
    candidates = [(t, 0) for t in sorted(model_s)] + [(1, w) for w in range(1, cap + 1)]
    candidates += [(t, w) for t in sorted(model_s) if t > 1 for w in range(1, cap + 1) if t + w <= cores]
    for t, w in candidates:
        if t not in model_s:
            continue
        rate = predicted_rate(cores, decode_s, model_s, t, w)
        if best is None or rate > best.predicted_sps * 1.000001:
            best = Split(t, w, rate, timings)
    assert best is not None, "model_s must hold at least one thread count"
    if replicas and 1 in model_s and max_workers != 0:
        r, fill = replica_fill(cores, cores if max_workers is None else max_workers)
        rate = fill * r / (decode_s + model_s[1])
        if r > 1 and rate > best.predicted_sps * 1.000001:
            best = Split(1, 0, rate, timings, replicas=r)
    return best


def time_per_item(fn, n_items: int, repeats: int = 1) -> float:
    """Seconds per item of ``fn()`` (which processes ``n_items``), best of ``repeats``."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / max(1, n_items)
