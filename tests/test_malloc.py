"""libcurate.malloc: CPU scoring stages keep freed activations for the next batch."""

from __future__ import annotations

import ctypes
import sys

import pytest

import libcurate.malloc as malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_sets_glibc_thresholds_once(monkeypatch):
    calls = []

    class FakeLibc:
        def __init__(self):
            self.mallopt = self

        def __call__(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(malloc, "_done", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: FakeLibc())
    assert malloc.keep_freed_memory() is True
    assert calls == [(malloc.M_MMAP_THRESHOLD, malloc.MMAP_THRESHOLD), (malloc.M_TRIM_THRESHOLD, malloc.TRIM_THRESHOLD)]
    assert malloc.keep_freed_memory() is True and len(calls) == 2  # once per process


def test_real_glibc_accepts_the_thresholds():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt"):
        pytest.skip("not glibc")
    assert libc.mallopt(malloc.M_MMAP_THRESHOLD, malloc.MMAP_THRESHOLD) == 1


def test_cpu_scoring_stages_call_it(tmp_path, photos, monkeypatch):
    import libcurate.scoring.common as common
    from libcurate.scoring.clip import ClipConfig, ClipStage
    from libcurate.stage import StageContext
    from libcurate.storage import open_store

    from .test_scoring_clip import PREFIX, photo_samples, write_shard

    called = []
    monkeypatch.setattr(common, "keep_freed_memory", lambda: called.append(1) or True)
    store = open_store(str(tmp_path / "run"))
    shards = [write_shard(store, 0, photo_samples(photos, 3))]
    ClipStage(ClipConfig.from_dict({"model": "test-tiny-clip", "replicas": 1, "loader_workers": 0})).process_shards(
        StageContext(store=store, prefix=PREFIX, workers=1), shards)
    assert called == [1]
