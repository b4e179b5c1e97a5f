"""SIGKILL at random points (issue 11): ``curate run`` of the demo recipe in a subprocess, its whole
process group (the runner, its shard pool, the CLIP loader's workers: what a pod eviction kills) killed
with SIGKILL at a random time, re-run to completion, then compared byte for byte with a clean run at the
same prefix (the report names the run's prefix), ignoring only the wall-clock ``seconds`` in ``_stats``.
Every file of both runs is mode 0644 under umask 022 (nothing left at mkstemp's 0600).

Short form (``make test``): 3 trials, 1 worker. Long form: ``pytest -m faults tests/test_faults_kill.py``
(10 trials, the recipe's 2 workers), one ``KILL`` JSON line per trial (bench/FAULTS.md).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import time

import pytest

from libcurate.audit import audit
from libcurate.storage import open_store

from .test_faults_storage import CURATE, ROOT, comparable, demo_recipe, first_diff, long_faults


def dir_snapshot(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            with open(p, "rb") as fh:
                out[rel] = comparable(rel, fh.read())
    return out


def modes(root: str) -> set[int]:
    return {stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) for d, _, files in os.walk(root) for f in files}


def start(recipe: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(CURATE + ["run", recipe, "--no-progress"], cwd=ROOT, env=env, umask=0o022,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(recipe: str) -> None:
    p = start(recipe)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]


def progress(prefix: str) -> str:
    """Which stage outputs had done markers when the kill came (e.g. ``raw:2 score_length:1``)."""
    parts = []
    for d, _, files in sorted(os.walk(prefix)):
        if os.path.basename(d) == "_done" and files:
            stage_dir = os.path.relpath(os.path.dirname(d), prefix).split(os.sep)
            parts.append(f"{stage_dir[0] if stage_dir[0] == 'raw' else stage_dir[1]}:{len(files)}")
    return " ".join(parts) or "nothing done"


def kill_trials(tmp_path, demo_src: str, trials: int, seed: int, workers: int = 1) -> list[dict]:
    prefix = str(tmp_path / "run")
    recipe = demo_recipe(tmp_path / "demo.yaml", demo_src, prefix, workers=workers)
    t0 = time.monotonic()
    finish(recipe)
    clean_s = time.monotonic() - t0
    clean = dir_snapshot(prefix)
    assert modes(prefix) == {0o644}, "outputs must be readable by other users under umask 022"
    rng = random.Random(seed)
    results = []
    for trial in range(trials):
        shutil.rmtree(prefix)
        at = rng.uniform(0.05, 0.8) * clean_s
        p = start(recipe)
        try:
            p.wait(timeout=at)
            killed = False  # finished before the kill came
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            killed = True
        state = progress(prefix)
        time.sleep(0.2)  # let the killed group's sockets and pipes close
        finish(recipe)
        got = dir_snapshot(prefix)
        res = {"trial": trial, "seed": seed, "kill_at_s": round(at, 1), "clean_seconds": round(clean_s, 1),
               "killed": killed, "done_at_kill": state, "identical": got == clean}
        print("KILL " + json.dumps(res, sort_keys=True))
        results.append(res)
        assert got == clean, f"{res}: {first_diff(clean, got)}"
        assert modes(prefix) == {0o644}
        assert audit(open_store(prefix))["ok"]
    return results


def test_sigkill_at_random_points_then_rerun_is_identical(tmp_path, demo_src):
    """Short form (make test): 3 kills."""
    results = kill_trials(tmp_path, demo_src, trials=3, seed=11)
    assert sum(r["killed"] for r in results) >= 2


@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_many_trials(tmp_path, demo_src, request):
    """Long form: 10 kills with the recipe's 2 workers (the shard pool and the loader's workers die too)."""
    long_faults(request)
    results = kill_trials(tmp_path, demo_src, trials=10, seed=5, workers=2)
    assert all(r["identical"] for r in results)


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory):
    from libcurate.demo import build

    out = tmp_path_factory.mktemp("kill-demo") / "source"
    build(str(out), copies=1)
    return str(out)
