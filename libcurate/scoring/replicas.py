"""Data-parallel model replicas on CPU: ``R`` processes, one model thread each, pulling whole shards.

On a CPU the cheapest way to use ``C`` cores for a model scorer is ``C`` single-threaded replicas that
each read, decode, run the model and write their own shards: no core waits at an OpenMP barrier, no batch
crosses a process boundary, and decode on one core overlaps the model on the others (see
:mod:`libcurate.scoring.clip_split` for the rule that picks this). This module runs that plan:

* this process is replica 0; ``R - 1`` more are forked from it after the model is loaded, so the weights
  are shared copy-on-write, not loaded again;
* the shards are handed out from one shared counter in the given order, one at a time, so a replica that
  finishes early takes the next shard (the imbalance at the end is at most one shard);
* every replica writes its shards' outputs itself (sidecar, columns, stats, done marker: the stage
  contract per shard), so a shard finished by any replica survives a later failure of another;
* a replica that raises sends its exception (pickled when it can be) and the first failure is re-raised
  here after the others are stopped; a replica that dies without a word (OOM kill, signal) is an error
  naming its exit code; replicas die with this process (``PR_SET_PDEATHSIG``), so a killed stage leaves
  no orphans writing behind it (their partial files are the dead writers' leftovers the store cleans).

Forked children only run the model single-threaded (``torch.set_num_threads(1)``): GNU OpenMP is not
fork-safe for parallel regions, which torch's DataLoader workers avoid the same way.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback
from typing import Callable, Iterator


def shard_source(shards: list[str], counter, lock) -> Iterator[str]:
    """Yields the next unclaimed shard of ``shards`` (claimed through the shared ``counter``) until none
    is left."""
    while True:
        with lock:
            i = counter.value
            if i >= len(shards):
                return
            counter.value = i + 1
        yield shards[i]


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not fatal: the parent still terminates replicas on its own failure
        pass


def _child(index: int, work, source, conn) -> None:
    _die_with_parent()
    try:
        import torch

        torch.set_num_threads(1)
        result = work(source, index)
        msg = ("ok", result)
    except BaseException as e:  # report anything, even KeyboardInterrupt, then exit
        detail = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        try:
            pickle.dumps(e)
            msg = ("error", e, detail)
        except Exception:
            msg = ("error", None, detail)
    try:
        conn.send(msg)
    finally:
        conn.close()
        os._exit(0)


class ReplicaError(RuntimeError):
    """A replica process failed without an exception that could be passed back."""


def run_replicas(n: int, shards: list[str], work: Callable[[Iterator[str], int], dict]) -> list[dict]:
    """Runs ``work(source, replica_index)`` in ``n`` processes (this one included) over ``shards``.

    ``work`` consumes ``source`` (an iterator of shard names that hands every shard to exactly one
    replica) and returns ``{"stats": {shard: stats}, ...}``; any other keys are per-replica extras. Returns
    the ``n`` results, this process's first. Raises the first replica failure (after stopping the rest).
    """
    import multiprocessing as mp

    import torch

    if n < 1:
        raise ValueError(f"need at least one replica, got {n}")
    ctx = mp.get_context("fork")
    counter, lock = ctx.Value("q", 0, lock=False), ctx.Lock()
    procs, conns = [], []
    for i in range(1, n):
        recv, send = ctx.Pipe(duplex=False)
        # not daemonic: a replica may start processes of its own (torch.compile's workers); it still dies
        # with this process (PR_SET_PDEATHSIG) and is stopped on any failure here
        p = ctx.Process(target=_child, args=(i, work, shard_source(shards, counter, lock), send),
                        name=f"curate-replica-{i}", daemon=False)
        p.start()
        send.close()
        procs.append(p)
        conns.append(recv)
    before = torch.get_num_threads()
    results: list[dict | None] = [None] * n
    failure: BaseException | None = None
    try:
        torch.set_num_threads(1)
        results[0] = work(shard_source(shards, counter, lock), 0)
    except BaseException as e:
        failure = e
    finally:
        torch.set_num_threads(before)
    if failure is not None:
        _stop(procs)
        raise failure
    try:
        for i, (p, conn) in enumerate(zip(procs, conns), start=1):
            try:
                msg = conn.recv()
            except EOFError:
                p.join()
                hint = (" (SIGKILL: often the kernel's OOM killer; every replica holds its own activations, "
                        "so set `replicas` or `batch_size` lower)" if p.exitcode == -9 else "")
                msg = ("error", None, f"replica {i} died with exit code {p.exitcode} before reporting{hint}")
            finally:
                conn.close()
            p.join()
            if msg[0] == "ok":
                results[i] = msg[1]
                continue
            exc, detail = msg[1], msg[2]
            if isinstance(exc, BaseException):
                raise exc from ReplicaError(f"replica {i} failed:\n{detail}")
            raise ReplicaError(f"replica {i} failed:\n{detail}")
    except BaseException:  # a replica's failure, or an interrupt while waiting: stop the others
        _stop(procs)
        raise
    return results  # type: ignore[return-value]


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join()


def run_split(stage, shards: list[str], work) -> list[dict]:
    """Runs ``work(shard_source, replica)`` (which returns :func:`.common.timed_loop`'s result) under
    ``stage.split``: in this process with its threads, or in ``split.replicas`` replicas
    (:func:`run_replicas`), whose own timings then complete ``stage.split``.
    Returns the stats of ``shards`` in order."""
    import torch

    split = stage.split
    if split.replicas > 1:
        from .clip_split import replica_fill

        results = run_replicas(split.replicas, shards, work)
        n = sum(r.get("images", 0) for r in results)
        if n and split.timings.get("measured") == "during the run":
            d = sum(r["load_s"] for r in results) / n
            m = sum(r["model_s"] + r["write_s"] for r in results) / n
            _, fill = replica_fill(split.replicas, len(shards))
            split.timings.update(decode_ms=round(d * 1e3, 3), model_ms_1t=round(m * 1e3, 3))
            split.predicted_sps = fill * split.replicas / (d + m)
        stats = {shard: st for r in results for shard, st in r["stats"].items()}
    else:
        if split.threads:
            # On CPU, model threads + busy loader workers beyond the core count thrash (OpenMP spins):
            # measured 2.5x slower end-to-end on 2 cores with 2 model threads + 1 worker.
            torch.set_num_threads(split.threads)
        stats = work(shards, 0)["stats"]
    return [stats[s] for s in shards]
