"""Shard tar and .npy I/O without tarfile/np.save per member: byte-for-byte what the plain tools write, read
back the same as webdataset reads them, and every corrupt or truncated shard an error."""

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from libcurate.columns import columns_rel, embedding_rel, pack_arrays, unpack_arrays
from libcurate.shards import ShardReadError, ShardWriter, iter_members, npy_bytes, npy_load
from libcurate.stage import ShardOutput
from libcurate.storage import open_store
from libcurate.tario import TarFormatError, iter_files

LONG_KEY = "k" * 128                      # KEY_RE allows 128 characters: the member name passes ustar's 100
SAMPLES = {
    "k0": {"json": b'{"a": 1}', "img0.jpg": bytes(range(256)) * 7, "img_emb.npy": b"\x93" * 513},
    LONG_KEY: {"json": b"{}", "empty": b""},
    "k2": {"caf\u00e9.txt": "h\u00e9".encode(), "json": b"[]"},
}


def _plain_tar(samples: dict, fmt=tarfile.PAX_FORMAT, mtime=0) -> bytes:
    """The archive tarfile writes for the same members (webdataset's TarWriter order: sorted suffixes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=fmt) as tf:
        for key, members in samples.items():
            for suffix in sorted(members):
                ti = tarfile.TarInfo(f"{key}.{suffix}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(members[suffix]), mtime, 0o644, "curate", "curate"
                tf.addfile(ti, io.BytesIO(members[suffix]))
    return buf.getvalue()


def _write(store, rel, samples=SAMPLES) -> bytes:
    with ShardWriter(store, rel) as w:
        for key, members in samples.items():
            w.write(key, members)
    return store.read_bytes(rel)


def _wds(path) -> list[dict]:
    import webdataset as wds
    return list(wds.tariterators.tarfile_samples([{"url": path}]))


def _plain(samples: dict, url: str) -> list[dict]:
    return [{"__key__": k, "__url__": url, **{s.lower(): v for s, v in m.items()}} for k, m in samples.items()]


def test_writer_matches_tarfile_and_every_reader_reads_it(tmp_path):
    store = open_store(str(tmp_path))
    data = _write(store, "a.tar")
    assert data == _plain_tar(SAMPLES)        # ustar headers, pax only for the long and the non-ASCII names
    assert data == _write(store, "b.tar")     # reproducible
    assert len(data) % 10240 == 0 and data.endswith(bytes(1024))
    path = store.uri("a.tar")
    with tarfile.open(path) as tf:
        assert [(m.name, m.size, m.mtime, m.uname, m.mode) for m in tf.getmembers()][:2] == [
            ("k0.img0.jpg", 1792, 0, "curate", 0o644), ("k0.img_emb.npy", 513, 0, "curate", 0o644)]
        assert tf.extractfile(f"{LONG_KEY}.json").read() == b"{}"
    want = _plain(SAMPLES, path)
    assert list(iter_members(path)) == want == _wds(path)
    if shutil.which("tar"):
        out = subprocess.run(["tar", "tvf", path], capture_output=True, text=True, check=True)
        assert f"{LONG_KEY}.empty" in out.stdout and "caf\u00e9.txt" in out.stdout and not out.stderr


def test_writer_checks_and_abort(tmp_path):
    store = open_store(str(tmp_path))
    with pytest.raises(ValueError, match="not bytes"):
        with ShardWriter(store, "x.tar") as w:
            w.write("k0", {"json": b"{}"})
            w.write("k1", {"json": {"a": 1}})
    assert not store.exists("x.tar") and store.list() == []   # the partial shard is discarded
    with ShardWriter(store, "y.tar") as w:
        w.write("k0", {"json": "{}", "__url__": "meta", "b": memoryview(b"ab")})
        with pytest.raises(ValueError, match="duplicate key"):
            w.write("k0", {"json": b"{}"})
        with pytest.raises(ValueError, match="bad key"):
            w.write("a.b", {"json": b"{}"})
    assert w.bytes == 4 and w.count == 1
    assert list(iter_members(store.uri("y.tar"))) == _plain({"k0": {"b": b"ab", "json": b"{}"}}, store.uri("y.tar"))


@pytest.mark.parametrize("fmt", ["pax_float_mtime", "gnu", "ustar", "gzip"])
def test_reader_reads_tarfile_archives_as_webdataset_does(tmp_path, fmt):
    samples = dict(SAMPLES) if fmt != "ustar" else {k: v for k, v in SAMPLES.items() if k == "k0"}
    samples["k3"] = {"JSON": b"{}", "x.cls": b"1"}           # suffixes are lower-cased, as webdataset does
    if fmt == "ustar":
        samples = {"BZh91k": {"json": b"{}"}, **samples}     # starts like bzip2's magic, but is a tar header
    if fmt == "pax_float_mtime":        # the shards curate wrote before: webdataset's TarWriter, mtime 0.0
        data = _plain_tar(samples, tarfile.PAX_FORMAT, 0.0)
        assert data.count(b"mtime=0.0") == sum(len(m) for m in samples.values())
    elif fmt == "gnu":
        data = _plain_tar(samples, tarfile.GNU_FORMAT)
        assert b"././@LongLink" in data
    elif fmt == "gzip":
        data = gzip.compress(_plain_tar(samples), mtime=0)
    else:
        data = _plain_tar(samples, tarfile.USTAR_FORMAT)
    path = str(tmp_path / "s.tar")
    with open(path, "wb") as f:
        f.write(data)
    assert list(iter_members(path)) == _plain(samples, path) == _wds(path)


def _tar_of(entries) -> bytes:
    """A tar built member by member with tarfile: ``(TarInfo kwargs, data)``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kw, data in entries:
            ti = tarfile.TarInfo(kw.pop("name"))
            ti.size = len(data) if ti.isreg() else 0
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def test_reader_follows_tarfile_on_member_kinds_and_names(tmp_path):
    entries = [({"name": "d", "type": tarfile.DIRTYPE}, b""),
               # a link's size field is not followed by data blocks (tarfile reads none)
               ({"name": "k0.lnk", "type": tarfile.SYMTYPE, "linkname": "k0.json", "size": 700}, b""),
               ({"name": "k0.json"}, b"{}"),
               ({"name": "__meta__"}, b"m"),                                 # webdataset metadata: skipped
               ({"name": "__k1.x__"}, b"m"),
               ({"name": "noext"}, b"x"),                                    # no key.suffix form: skipped
               ({"name": "k1." + "s" * 150}, b"long"),
               ({"name": "k1.json", "pax_headers": {"comment": "x"}}, b"1")]
    data = _tar_of(entries)
    path = str(tmp_path / "s.tar")
    with open(path, "wb") as f:
        f.write(data)
    assert list(iter_members(path)) == _wds(path) == [
        {"__key__": "k0", "__url__": path, "json": b"{}"},
        {"__key__": "k1", "__url__": path, "s" * 150: b"long", "json": b"1"}]
    # the ustar prefix field, a global header and base-256 sizes, read by the tar layer itself
    ti = tarfile.TarInfo("p" * 120 + "/name.txt")
    ti.size = 3
    head = bytearray(ti.tobuf(tarfile.USTAR_FORMAT))
    head[124:136] = b"\x80" + (3).to_bytes(11, "big")
    head[148:156] = b"%06o\0 " % (sum(head[:148]) + sum(head[156:]) + 256)
    glob = tarfile.TarInfo("g")._create_pax_generic_header({"comment": "global"}, tarfile.XGLTYPE, "utf-8")
    stream = glob + bytes(head) + b"abc" + bytes(509) + bytes(1024)
    assert list(iter_files(io.BytesIO(stream))) == [("p" * 120 + "/name.txt", b"abc")]


class _Trickle(io.RawIOBase):
    """A stream that returns at most 7 bytes a read and cannot seek (like a slow S3 body)."""

    def __init__(self, data):
        super().__init__()
        self._b = io.BytesIO(data)

    def readable(self):
        return True

    def seekable(self):
        return False

    def read(self, n=-1):
        return self._b.read(min(n, 7) if n >= 0 else 7)


def test_reader_streams_without_seeking():
    data = _plain_tar(SAMPLES)
    names = [n for n, _ in iter_files(_Trickle(data))]
    assert names == [f"{k}.{s}" for k, m in SAMPLES.items() for s in sorted(m)]


def test_corrupt_and_truncated_shards_raise(tmp_path):
    store = open_store(str(tmp_path))
    data = _write(store, "ok.tar")
    second = 512 + 2048                  # k0.img0.jpg: a header and 1792 bytes (4 blocks) of data
    assert data[second:second + 14] == b"k0.img_emb.npy"
    bad_size = bytearray(data[second:second + 512])
    bad_size[130] = ord("9")                                               # a non-octal size digit
    bad_size[148:156] = b"%06o\0 " % (sum(bad_size[:148]) + sum(bad_size[156:]) + 256)
    cases = {
        "empty": (b"", "empty file"),
        "not_a_tar": (b"hello world" * 100, "not a tar"),
        "bad_checksum": (data[:second + 3] + b"X" + data[second + 4:], "checksum at byte 2560"),  # a flipped byte
        "bad_number": (data[:second] + bytes(bad_size) + data[second + 512:], "not a tar header"),
        "cut_in_member": (data[:second + 512 + 100], "member 'k0.img_emb.npy' ends early"),
        "cut_in_header": (data[:second + 200], "truncated tar header at byte 2560"),
        "cut_at_member_end": (data[:second], "no end-of-archive block"),
        "bad_pax": (_plain_tar(SAMPLES).replace(b"path=", b"path:"), "invalid pax header record"),
    }
    for name, (body, match) in cases.items():
        store.write_bytes(f"{name}.tar", body)
        with pytest.raises(ShardReadError, match=f"cannot read shard .*{match}"):
            list(iter_members(store.uri(f"{name}.tar")))
    with pytest.raises(ShardReadError, match="cannot read shard"):
        list(iter_members(store.uri("missing.tar")))


def test_unsafe_bad_and_duplicate_names_raise(tmp_path):
    for names, match in [(["k0.json", "../k1.json"], "unsafe"), (["/abs.json"], "unsafe"),
                         (["a\\b.json"], "unsafe"), (["k0.json", "k0.JSON"], "duplicate"),
                         (["k 0.json"], "bad sample key")]:
        path = str(tmp_path / "s.tar")
        with open(path, "wb") as f:
            f.write(_tar_of([({"name": n}, b"{}") for n in names]))
        with pytest.raises(ShardReadError, match=match):
            list(iter_members(path))


NPY_CASES = [np.float32(2.5), np.array(7), np.zeros((0, 4), np.float16), np.zeros(0, np.int64),
             np.random.default_rng(0).random((3, 5)).astype(np.float16), np.arange(12.0).reshape(2, 3, 2),
             np.arange(10, dtype=np.int32), np.arange(5, dtype=">u2"), np.array([True, False, True]),
             np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.arange(20.0)[::3],
             np.array([b"abc", b"de"]), np.array(["h\u00e9", "x"]), np.arange(4, dtype=np.complex64)]


@pytest.mark.parametrize("arr", NPY_CASES, ids=lambda a: f"{a.dtype}{list(np.shape(a))}")
def test_npy_is_np_save_and_np_load(arr):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    assert npy_bytes(arr) == npy_bytes(arr) == buf.getvalue()   # the second call uses the cached header
    for data in (buf.getvalue(), _fortran_npy(arr)):
        got, want = npy_load(data), np.load(io.BytesIO(data), allow_pickle=False)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert got.flags.writeable and got.flags.f_contiguous == want.flags.f_contiguous


def _fortran_npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(arr), allow_pickle=False)
    return buf.getvalue()


def test_npy_fallbacks_keep_numpy_behaviour():
    rec = np.zeros(2, dtype=[("a", "<f4"), ("b", "<i2")])
    assert npy_load(npy_bytes(rec)).tolist() == rec.tolist()
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.arange(3.0), version=(2, 0))
    assert npy_load(buf.getvalue()).tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        npy_bytes(np.array([{}], dtype=object))
    with pytest.raises(ValueError):
        npy_load(npy_bytes(np.arange(4.0))[:-3])                  # truncated data: numpy's own error
    blob = pack_arrays({"b": np.arange(3), "a": np.array([b"x"])})
    assert {k: v.tolist() for k, v in unpack_arrays(blob).items()} == {"a": [b"x"], "b": [0, 1, 2]}


def test_write_json_takes_arrays_or_their_bytes(tmp_path):
    store = open_store(str(tmp_path))
    rng = np.random.default_rng(1)
    rows = [(f"k{i}", {"score": float(i), "tag": "t"}, {"img_emb.npy": rng.random((2, 8)).astype(np.float16),
                                                       "txt_emb.npy": rng.random((1, 8)).astype(np.float16)})
            for i in range(4)]
    for prefix, as_bytes in (("a", True), ("b", False)):
        out = ShardOutput(store, prefix, "shard-000000")
        for key, obj, arrays in rows:
            out.write_json(key, obj, {n: npy_bytes(a) for n, a in arrays.items()} if as_bytes else arrays)
        out.finish(n_in=len(rows))
    for rel in ("shard-000000.tar", columns_rel("", "shard-000000")[1:],
                embedding_rel("", "shard-000000", "img_emb")[1:], embedding_rel("", "shard-000000", "txt_emb")[1:]):
        assert store.read_bytes(f"a/{rel}") == store.read_bytes(f"b/{rel}"), rel
    side = list(iter_members(store.uri("b/shard-000000.tar")))
    assert json.loads(side[1]["json"]) == rows[1][1]
    assert np.array_equal(npy_load(side[1]["img_emb.npy"]), rows[1][2]["img_emb.npy"])
    with pytest.raises(ValueError, match=r"\*\.npy"):
        ShardOutput(store, "c", "shard-000000").write_json("k0", {}, {"emb": np.zeros(2)})


def test_file_object_stays_sequential(tmp_path):
    """The writer never seeks or tells: it writes to a plain stream (an S3 spool, a pipe)."""
    class Sink(io.RawIOBase):
        def __init__(self):
            super().__init__()
            self.parts = []

        def writable(self):
            return True

        def seekable(self):
            return False

        def write(self, b):
            self.parts.append(bytes(b))
            return len(b)

    from libcurate.tario import TarStreamWriter
    sink = Sink()
    w = TarStreamWriter(sink, "curate", "curate")
    for key, members in SAMPLES.items():
        for suffix in sorted(members):
            w.add(f"{key}.{suffix}", members[suffix])
    w.close()
    assert b"".join(sink.parts) == _plain_tar(SAMPLES) and w.offset == len(_plain_tar(SAMPLES))
    assert not os.listdir(tmp_path)
