"""Storage and shards on a local directory and on a moto S3 server (real boto3 over HTTP)."""

import hashlib
import io
import tarfile

import pytest

from libcurate.records import ImageRef, Sample, Source, Turn
from libcurate.shards import (AlignmentError, ShardReadError, ShardWriter, iter_aligned, iter_members,
                              iter_samples, read_keys)
from libcurate.storage import StorageError, open_store

from .conftest import jpeg_bytes


def make_sample(key, data, text="What is shown?"):
    return Sample(key=key, images=[ImageRef("jpeg", hashlib.sha256(data).hexdigest(), 64, 64, "x.jpg", data)],
                  conversations=[Turn("human", "<image>\n" + text), Turn("gpt", "A photo.")],
                  source=Source("t", key, "llava"))


def test_store_roundtrip(store_url):
    st = open_store(store_url)
    assert not st.exists("a/b.txt")
    st.write_text("a/b.txt", "hello")
    with st.open_write("a/c/d.bin") as f:
        f.write(b"\x00\x01")
    assert st.exists("a/b.txt") and st.read_text("a/b.txt") == "hello"
    assert st.list("a") == ["b.txt", "c/d.bin"]
    with st.open_read("a/c/d.bin") as f:
        assert f.read() == b"\x00\x01"
    st.delete("a/b.txt")
    assert not st.exists("a/b.txt")
    st.delete("a/b.txt")  # absent: ignored
    with pytest.raises(FileNotFoundError):
        st.read_bytes("nope")
    with pytest.raises(StorageError):
        st.read_bytes("../escape")


def test_atomic_write_discards_on_error(store_url):
    st = open_store(store_url)
    with pytest.raises(RuntimeError):
        with st.open_write("x.bin") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not st.exists("x.bin")
    assert st.list() == []


def test_shard_write_read_both_backends(store_url, photos):
    st = open_store(store_url)
    samples = [make_sample(f"k{i}", jpeg_bytes(p)) for i, p in enumerate(photos.values())]
    with ShardWriter(st, "raw/shard-000000.tar") as w:
        for s in samples:
            w.write_sample(s)
    back = list(iter_samples(st, "raw/shard-000000.tar"))
    assert [s.key for s in back] == [s.key for s in samples]
    assert [s.images[0].data for s in back] == [s.images[0].data for s in samples]
    assert back[0].to_dict() == samples[0].to_dict()
    assert read_keys(st, "raw/shard-000000.tar") == [s.key for s in samples]


def test_shards_are_reproducible(tmp_path, photos):
    st = open_store(str(tmp_path))
    s = make_sample("k0", jpeg_bytes(photos["coffee"]))
    for name in ("a.tar", "b.tar"):
        with ShardWriter(st, name) as w:
            w.write_sample(s)
    assert st.read_bytes("a.tar") == st.read_bytes("b.tar")


def test_sidecar_alignment(photos):
    samples = [make_sample(f"k{i}", jpeg_bytes(p)) for i, p in enumerate(photos.values())]
    side = [{"__key__": s.key, "json": b"{}"} for s in samples]
    assert len(list(iter_aligned(samples, {"a": side}))) == len(samples)
    # a quarantined key may be missing, but only if it was quarantined
    with pytest.raises(AlignmentError):
        list(iter_aligned(samples, {"a": side[1:]}))
    joined = list(iter_aligned(samples, {"a": side[1:]}, {"a": {"k0"}}))
    assert joined[0][1]["a"] is None
    with pytest.raises(AlignmentError):
        list(iter_aligned(samples, {"a": list(reversed(side))}))
    with pytest.raises(AlignmentError):
        list(iter_aligned(samples[:-1], {"a": side}))


def test_truncated_and_unsafe_shards(tmp_path, photos):
    st = open_store(str(tmp_path))
    with ShardWriter(st, "ok.tar") as w:
        for i in range(3):
            w.write_sample(make_sample(f"k{i}", jpeg_bytes(photos["coffee"], size=(128, 128))))
    data = st.read_bytes("ok.tar")
    st.write_bytes("trunc.tar", data[: len(data) // 2 + 100])
    with pytest.raises(ShardReadError):
        list(iter_members(st.uri("trunc.tar")))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("../evil.json", "/abs.json"):
            ti = tarfile.TarInfo(name)
            ti.size = 2
            tf.addfile(ti, io.BytesIO(b"{}"))
    st.write_bytes("evil.tar", buf.getvalue())
    with pytest.raises(ShardReadError, match="unsafe"):
        list(iter_members(st.uri("evil.tar")))


def test_clean_partial_spares_live_writers(tmp_path):
    import os
    import subprocess
    import sys

    st = open_store(str(tmp_path))
    d = tmp_path / "stage"
    d.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (d / f"a.tar.tmp-{dead}-x1").write_bytes(b"left by a killed writer")
        (d / f"b.tar.tmp-{live.pid}-x2").write_bytes(b"being written right now")
        (d / "c.tar").write_bytes(b"done")
        assert st.clean_partial("stage") == 1
        assert sorted(os.listdir(d)) == sorted([f"b.tar.tmp-{live.pid}-x2", "c.tar"])
    finally:
        live.kill()
        live.wait()
