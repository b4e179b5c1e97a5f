"""Model replicas (libcurate.scoring.replicas): every shard to exactly one replica, failures passed back,
no replica outlives the run."""

from __future__ import annotations

import os
import time

import pytest

from libcurate.scoring.replicas import ReplicaError, run_replicas, shard_source


def _record(source, replica):
    import torch

    done = {}
    for shard in source:
        done[shard] = {"pid": os.getpid(), "threads": torch.get_num_threads()}
        time.sleep(0.01)  # let the other replicas take their share
    return {"stats": done, "replica": replica}


def test_every_shard_goes_to_exactly_one_replica_in_single_threaded_processes():
    shards = [f"shard-{i:06d}.tar" for i in range(9)]
    results = run_replicas(3, shards, _record)
    assert [r["replica"] for r in results] == [0, 1, 2]
    seen = [s for r in results for s in r["stats"]]
    assert sorted(seen) == shards and len(seen) == len(set(seen))
    pids = {st["pid"] for r in results for st in r["stats"].values()}
    assert os.getpid() in pids and len(pids) >= 2  # this process is replica 0, the others are forks
    assert all(st["threads"] == 1 for r in results for st in r["stats"].values())


def test_shard_source_hands_out_in_order_until_empty():
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    counter, lock = ctx.Value("q", 0, lock=False), ctx.Lock()
    a, b = shard_source(["x", "y", "z"], counter, lock), shard_source(["x", "y", "z"], counter, lock)
    assert [next(a), next(b), next(a)] == ["x", "y", "z"]
    assert list(a) == [] and list(b) == []


class ShardBroke(ValueError):
    pass


def _fail_on(bad):
    def work(source, replica):
        done = {}
        for shard in source:
            if shard == bad:
                if replica == 0:
                    time.sleep(0.2)  # let a forked replica claim it first most of the time
                raise ShardBroke(f"cannot score {shard}")
            done[shard] = {"replica": replica}
        return {"stats": done}
    return work


def test_a_replicas_exception_reaches_the_caller_with_its_type():
    shards = [f"s{i}" for i in range(4)]
    with pytest.raises(ShardBroke, match="cannot score s1"):
        run_replicas(2, shards, _fail_on("s1"))


def _die(source, replica):
    for _ in source:
        if replica == 1:
            os._exit(7)  # an OOM kill or a segfault: no report
        time.sleep(0.1)  # leave shards for the forked replica
    return {"stats": {}}


def test_a_replica_that_dies_silently_is_an_error_naming_its_exit_code():
    with pytest.raises(ReplicaError, match="exit code 7 before reporting$"):
        run_replicas(2, [f"s{i}" for i in range(6)], _die)


def _oom(source, replica):
    import signal

    for _ in source:
        if replica == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
        time.sleep(0.1)
    return {"stats": {}}


def test_a_replica_killed_by_sigkill_says_what_to_lower():
    with pytest.raises(ReplicaError, match=r"exit code -9 .*OOM killer.*`replicas` or `batch_size` lower"):
        run_replicas(2, [f"s{i}" for i in range(6)], _oom)


def test_no_replica_is_left_running():
    import multiprocessing as mp

    run_replicas(3, [f"s{i}" for i in range(6)], _record)
    with pytest.raises(ShardBroke):
        run_replicas(3, [f"s{i}" for i in range(6)], _fail_on("s0"))
    assert [p for p in mp.active_children() if p.name.startswith("curate-replica")] == []


def test_rejects_zero_replicas():
    with pytest.raises(ValueError):
        run_replicas(0, ["s0"], _record)


def _spawn_child(source, replica):
    import subprocess
    import sys

    done = {}
    for shard in source:
        # a replica may start processes of its own (torch.compile's compile workers do)
        out = subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True, check=True)
        done[shard] = out.stdout.strip()
        time.sleep(0.02)
    return {"stats": done}


def test_a_replica_may_start_processes_of_its_own():
    import multiprocessing as mp

    def work(source, replica):
        r = _spawn_child(source, replica)
        if replica:
            ctx = mp.get_context("fork")
            p = ctx.Process(target=time.sleep, args=(0,))
            p.start()  # a daemonic replica could not: "daemonic processes are not allowed to have children"
            p.join()
        return r

    results = run_replicas(2, [f"s{i}" for i in range(6)], work)
    assert sorted(s for r in results for s in r["stats"]) == [f"s{i}" for i in range(6)]
    assert {v for r in results for v in r["stats"].values()} == {"ok"}
