"""How ``score_clip`` splits the CPU cores between model threads and loader worker processes.

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
* Candidates: ``T = 1`` with ``W = 1 .. C`` (single-threaded processes only time-share the cores), and
  ``T > 1`` only with ``T + W <= C``. A multi-threaded model beside a busy worker on the same cores is
  never chosen: OpenMP's parallel regions wait for the thread the worker displaced (measured 2.5x slower
  end-to-end on 2 cores, test-tiny-clip, 2 threads + 1 worker).

Examples on 2 cores: test-tiny-clip (``d`` ~5 ms, ``m_1`` ~1 ms) gets 2 workers + 1 thread; a random
ViT-B-32 (``d`` ~8 ms, ``m_2`` ~150 ms) gets 0 workers + 2 threads, within ~5% of the bare forward.

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

    def as_dict(self) -> dict:
        return {"threads": self.threads, "workers": self.workers,
                "predicted_sps": round(self.predicted_sps, 2), **self.timings}


def predicted_rate(cores: int, decode_s: float, model_s: dict[int, float], threads: int, workers: int) -> float:
    """Samples/s the rule predicts for ``threads`` model threads and ``workers`` loader processes."""
    m = model_s[threads]
    if workers == 0:
        return 1.0 / (decode_s + m)
    return min(workers / decode_s, 1.0 / m, cores / (decode_s + threads * m))


def choose_split(cores: int, decode_s: float, model_s: dict[int, float], cuda: bool = False,
                 max_workers: int | None = None) -> Split:
    """The best (threads, workers) by the module's rule.

    Args:
        cores: CPU cores this process may use.
        decode_s: loader seconds per image on one core (> 0).
        model_s: main-process seconds per image by thread count; on CPU it must hold 1 and ``cores``;
            on CUDA one entry (any key) with the GPU forward's seconds per image.
        cuda: the model runs on a GPU.
        max_workers: upper bound on workers (e.g. the number of shards: a worker owns whole shards).
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
    return best


def time_per_item(fn, n_items: int, repeats: int = 1) -> float:
    """Seconds per item of ``fn()`` (which processes ``n_items``), best of ``repeats``."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / max(1, n_items)
