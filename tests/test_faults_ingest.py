"""Ingest under bad input (issue 11): every defect found by fault injection has a test here that failed
before its fix, and a bad-input corpus of more than 40 kinds goes through ingest (and export) in one
mixed file, LLaVA JSON and JSONL, with every record's outcome declared and checked exactly.

Never lose a sample silently: each record is written, or quarantined with a named reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tarfile
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from libcurate.audit import audit
from libcurate.formats import BadRecord, parse_annotations
from libcurate.ingest import IngestConfig, IngestStage
from libcurate.pipeline import load_recipe, plan
from libcurate.runner import run_recipe
from libcurate.shards import iter_samples
from libcurate.stage import PermanentInputError, is_done, raw_shards, read_quarantine
from libcurate.storage import open_store

from .conftest import jpeg_bytes


# -- helpers -----------------------------------------------------------------------------------------

def conv(q="<image>\nWhat is shown?", a="A photo."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def rec(rid, image="images/good.jpg", **extra):
    return {"id": rid, "image": image, "conversations": conv(), **extra}


def run(prefix, annotations, images, fmt="llava", shard_size=1000, stages=(), **extra):
    recipe = load_recipe({"storage": {"prefix": str(prefix)}, "workers": 1, "stages": [
        {"stage": "ingest", "with": {"format": fmt, "annotations": str(annotations), "images": str(images),
                                     "shard_size": shard_size, **extra}}, *stages]})
    run_recipe(recipe, progress=False)
    store = open_store(str(prefix))
    samples = [s for sh in raw_shards(store) for s in iter_samples(store, f"raw/{sh}")]
    quarantine = [q for sh in raw_shards(store) for q in read_quarantine(store, "raw", sh[:-4])]
    return store, samples, quarantine


def write_files(root, files: dict) -> None:
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def outcomes(samples, quarantine) -> dict[str, list[str]]:
    """original id -> sorted outcomes ("written" or the quarantine reason)."""
    out: dict[str, list[str]] = {}
    for s in samples:
        out.setdefault(s.source.original_id, []).append("written")
    for q in quarantine:
        out.setdefault(q["key"], []).append(q["reason"])
    return {k: sorted(v) for k, v in out.items()}


def strict_json(data: bytes):
    """json.loads that refuses NaN/Infinity (what a strict parser does) and lone surrogates."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    text = data.decode("utf-8")  # strict: fails on anything not UTF-8
    obj = json.loads(text, parse_constant=refuse)
    text.encode("utf-8")
    return obj


def save(im, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def garble_scan(jpeg: bytes, at: float = 0.5, n: int = 16) -> bytes:
    """Flip ``n`` bytes in the middle of the entropy-coded scan (never making an 0xFF, so no marker is
    created or destroyed): the file keeps its structure, its pixels go wrong from there on."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")
    end = len(jpeg) - 2  # EOI
    out = bytearray(jpeg)
    p = start + int((end - start) * at)
    for i in range(p, p + n):
        if out[i] != 0xFF and (i == 0 or out[i - 1] != 0xFF):
            v = out[i] ^ 0x5A
            out[i] = v if v != 0xFF else 0xFE
    return bytes(out)


def bomb_png(side=2000) -> bytes:
    return save(Image.new("1", (side, side)), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_size(w: int, h: int) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def pics(photos):
    small = {k: v.resize((64, 48)) for k, v in photos.items()}
    return {"jpeg": jpeg_bytes(photos["coffee"]), "jpeg2": jpeg_bytes(photos["rocket"]),
            "png": save(small["chelsea"], "PNG"), "small": small,
            "garbled": garble_scan(save(photos["coffee"].resize((256, 192)), "JPEG", quality=90))}


# -- defect 1: a NUL byte in an image path -----------------------------------------------------------

def test_nul_byte_in_image_path_is_quarantined_and_later_shards_are_written(tmp_path, pics):
    write_files(tmp_path / "src", {"images/good.jpg": pics["jpeg"]})
    recs = [rec("a"), rec("nul", "images/go\x00od.jpg"), rec("b"), rec("nl", "images/good.jpg\nx"), rec("c"), rec("d")]
    (tmp_path / "data.json").write_text(json.dumps(recs))
    store, samples, quarantine = run(tmp_path / "run", tmp_path / "data.json", tmp_path / "src", shard_size=2)
    assert outcomes(samples, quarantine) == {"a": ["written"], "b": ["written"], "c": ["written"], "d": ["written"],
                                             "nul": ["bad_image_ref"], "nl": ["bad_image_ref"]}
    assert all(is_done(store, "raw", f"shard-{i:06d}") for i in range(3))
    assert audit(store)["ok"]


# -- defect 2: lone surrogates -------------------------------------------------------------------------

def test_lone_surrogate_is_quarantined_in_json_and_only_its_line_in_jsonl(tmp_path, pics):
    write_files(tmp_path / "src", {"images/good.jpg": pics["jpeg"]})
    recs = [rec("ok1"), {**rec("s-answer"), "conversations": conv(a="bad \ud800 text")}, rec("\udc00-id"),
            rec("s-meta", metadata={"k\udfff": 1}), rec("pair", metadata={"emoji": "\ud83d\ude00"}), rec("ok2")]
    (tmp_path / "data.json").write_text(json.dumps(recs))  # ensure_ascii: the file holds "\ud800" escapes
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for name, fmt, fallback in [("data.json", "llava", "data.json#2"), ("data.jsonl", "jsonl", "data.jsonl:line 3")]:
        store, samples, quarantine = run(tmp_path / f"run-{fmt}", tmp_path / name, tmp_path / "src", fmt=fmt)
        assert outcomes(samples, quarantine) == {
            "ok1": ["written"], "ok2": ["written"], "pair": ["written"], "s-answer": ["invalid_unicode"],
            fallback: ["invalid_unicode"], "s-meta": ["invalid_unicode"]}
        pair = next(s for s in samples if s.source.original_id == "pair")
        assert pair.metadata == {"emoji": "\U0001F600"}  # a valid surrogate pair is one character
        assert audit(store)["ok"]


# -- defect 3: pathological JSON -------------------------------------------------------------------------

def test_deep_nesting_and_huge_integers_quarantine_the_record_or_line(tmp_path, pics):
    write_files(tmp_path / "src", {"images/good.jpg": pics["jpeg"]})
    good = json.dumps(rec("ok"))
    deep = good[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    deep100 = good[:-1].replace('"ok"', '"deep100"') + ', "x": ' + "[" * 100 + "]" * 100 + "}"
    huge = good[:-1].replace('"ok"', '"huge"') + ', "n": ' + "9" * 5000 + "}"
    (tmp_path / "data.json").write_text("[" + ", ".join([deep, good, huge, deep100, good]) + "]")
    (tmp_path / "data.jsonl").write_text("\n".join([deep, good, huge, deep100, good]) + "\n")
    want = {"ok": ["written", "written"], "huge": ["huge_integer"], "deep100": ["too_deep"]}
    for name, fmt, fallback in [("data.json", "llava", "data.json#0"), ("data.jsonl", "jsonl", "data.jsonl:line 1")]:
        store, samples, quarantine = run(tmp_path / f"run-{fmt}", tmp_path / name, tmp_path / "src", fmt=fmt)
        assert outcomes(samples, quarantine) == {**want, fallback: ["too_deep"]}
        assert audit(store)["ok"]
    # A document that is not JSON at all stays one clear entry for the whole file.
    (tmp_path / "broken.json").write_text("[" + good + ", {]")
    _, samples, quarantine = run(tmp_path / "run-broken", tmp_path / "broken.json", tmp_path / "src")
    assert [s.source.original_id for s in samples] == ["ok"]
    assert [(q["key"], q["reason"]) for q in quarantine] == [("broken.json", "bad_json")]
    assert "line 1" in quarantine[0]["detail"] and "cannot be read past" in quarantine[0]["detail"]


# -- defect 4: symlinks out of the images root ------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["llava", "cc_sbu_align"])
def test_symlinks_leading_out_of_the_images_root_are_refused(tmp_path, pics, fmt):
    secret = tmp_path / "outside"
    write_files(secret, {"secret.jpg": pics["jpeg2"], "dir/secret.jpg": pics["jpeg2"]})
    src = tmp_path / "src"
    folder = "images" if fmt == "llava" else "image"
    write_files(src, {f"{folder}/good.jpg": pics["jpeg"]})
    os.symlink(secret / "secret.jpg", src / folder / "filelink.jpg")
    os.symlink(secret / "dir", src / folder / "dirlink")
    os.symlink(src / folder / "good.jpg", src / folder / "inside.jpg")  # stays inside the root: fine
    os.symlink(src / folder / "loop.jpg", src / folder / "loop.jpg")  # a link to itself: ELOOP
    names = ["good", "filelink", "dirlink/secret", "inside", "loop"]
    if fmt == "llava":
        recs = [rec(n, f"images/{n}.jpg") for n in names]
    else:
        recs = {"annotations": [{"image_id": n, "caption": "A photo of something."} for n in names]}
    (tmp_path / "ann.json").write_text(json.dumps(recs))
    store, samples, quarantine = run(tmp_path / "run", tmp_path / "ann.json", src, fmt=fmt)
    assert outcomes(samples, quarantine) == {
        "good": ["written"], "inside": ["written"], "filelink": ["unsafe_image_path"], "loop": ["bad_image_ref"],
        # cc_sbu_align names images by id, and an id with a "/" names no file of image/ (nor the record)
        **({"dirlink/secret": ["unsafe_image_path"]} if fmt == "llava" else {"ann.json#2": ["bad_image_ref"]})}
    assert pics["jpeg2"] not in [im.data for s in samples for im in s.images]
    assert audit(store)["ok"]


# -- defect 5: a JPEG whose scan is garbled -----------------------------------------------------------------

def test_garbled_jpeg_scan_is_corrupt_image(tmp_path, pics, photos):
    good = save(photos["coffee"].resize((256, 192)), "JPEG", quality=90)
    bad = pics["garbled"]
    # What made it slip through: PIL decodes it without a word, but the pixels are wrong.
    with Image.open(io.BytesIO(bad)) as im:
        im.load()
        damaged = np.asarray(im.convert("RGB"), dtype=int)
    clean = np.asarray(Image.open(io.BytesIO(good)).convert("RGB"), dtype=int)
    assert (np.abs(damaged - clean).max(axis=(1, 2)) > 40).sum() > 20
    write_files(tmp_path / "src", {"images/good.jpg": good, "images/garbled.jpg": bad})
    (tmp_path / "data.json").write_text(json.dumps([rec("good"), rec("garbled", "images/garbled.jpg")]))
    store, samples, quarantine = run(tmp_path / "run", tmp_path / "data.json", tmp_path / "src")
    assert outcomes(samples, quarantine) == {"good": ["written"], "garbled": ["corrupt_image"]}
    assert "Corrupt JPEG data" in quarantine[0]["detail"]


def test_valid_jpegs_of_every_kind_are_not_rejected(photos):
    from libcurate.images import ImageLimits, inspect_image

    n = 0
    for name, photo in photos.items():
        for mode in ("RGB", "L", "CMYK"):
            im = photo.convert(mode).resize((160, 120))
            for q in (10, 50, 90, 100):
                for kw in ({}, {"progressive": True}, {"optimize": True}, {"subsampling": 0},
                           {"subsampling": 1}, {"restart_marker_blocks": 5}):
                    data = save(im, "JPEG", quality=q, **kw)
                    for tail in (b"", b"\0trailer after EOI"):
                        ref = inspect_image(data + tail, "x.jpg", ImageLimits())
                        assert ref.format == "jpeg" and (ref.width, ref.height) == (160, 120)
                        n += 1
    assert n == len(photos) * 3 * 4 * 6 * 2


# -- defect 6: NaN and Infinity --------------------------------------------------------------------------

def test_non_finite_numbers_are_quarantined_and_exports_are_strict_json(tmp_path, pics):
    write_files(tmp_path / "src", {"images/good.jpg": pics["jpeg"]})
    ok = json.dumps(rec("ok", metadata={"score": 0.5, "big": 1e308}))
    lines = [ok, ok.replace('"ok"', '"nan"').replace("0.5", "NaN"), ok.replace('"ok"', '"inf"').replace("0.5", "Infinity"),
             ok.replace('"ok"', '"ninf"').replace("0.5", "-Infinity"), ok.replace('"ok"', '"overflow"').replace("1e+308", "1e400")]
    (tmp_path / "data.json").write_text("[" + ",\n".join(lines) + "]")
    store, samples, quarantine = run(tmp_path / "run", tmp_path / "data.json", tmp_path / "src",
                                     stages=[{"stage": "export", "with": {"formats": ["webdataset", "llava", "cc_sbu_align"]}}])
    assert outcomes(samples, quarantine) == {"ok": ["written"], "nan": ["non_finite_number"], "inf": ["non_finite_number"],
                                             "ninf": ["non_finite_number"], "overflow": ["non_finite_number"]}
    exported = [p for p in store.list("export") if p.endswith(("data.json", "filter_cap.json", "summary.json"))]
    assert len(exported) == 3
    for rel in exported:
        strict_json(store.read_bytes(f"export/{rel}"))
    assert audit(store)["ok"]


def test_exporters_refuse_non_finite_metadata(tmp_path, pics):
    from libcurate.formats.export import write_cc_sbu_align, write_llava
    from libcurate.records import ImageRef, Sample, Source, Turn
    import hashlib

    data = pics["jpeg"]
    s = Sample("k1", [ImageRef("jpeg", hashlib.sha256(data).hexdigest(), 64, 64, "a.jpg", data)],
               [Turn("human", "<image>\nQ"), Turn("gpt", "A")], Source("d", "1", "llava"), metadata={"x": float("nan")})
    store = open_store(str(tmp_path))
    for write in (write_llava, lambda ss, st, p: write_cc_sbu_align(ss, st, p)):
        with pytest.raises(ValueError, match="not a finite number"):
            write([s], store, "out")
    with pytest.raises(ValueError):
        s.to_json()
    assert not store.exists("out/data.json") and not store.exists("out/filter_cap.json")


# -- defect 10: export through symlinks; ambiguous tar members ------------------------------------------------

def test_export_never_writes_through_a_directory_symlink(tmp_path, pics):
    write_files(tmp_path / "src", {"images/good.jpg": pics["jpeg"], "images/b.jpg": pics["jpeg2"]})
    (tmp_path / "data.json").write_text(json.dumps([rec("a"), rec("b", "images/b.jpg")]))
    recipe = load_recipe({"storage": {"prefix": str(tmp_path / "run")}, "workers": 1, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": str(tmp_path / "data.json"),
                                     "images": str(tmp_path / "src")}},
        {"stage": "export", "with": {"formats": ["webdataset", "llava", "cc_sbu_align"]}}]})
    export_prefix = next(p.prefix for p in plan(recipe) if p.stage == "export")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.makedirs(tmp_path / "run" / export_prefix / "llava")
    os.symlink(elsewhere, tmp_path / "run" / export_prefix / "llava" / "images")
    with pytest.raises(PermanentInputError, match="symbolic link"):
        run_recipe(recipe, progress=False)
    assert list(elsewhere.iterdir()) == []  # nothing was written outside the export folder

    # The writers guard themselves too, and a link as the target's own parent (the user's layout) is fine.
    from libcurate.formats.export import LinkInExportError, write_llava

    store = open_store(str(tmp_path / "run"))
    samples = [s for sh in raw_shards(store) for s in iter_samples(store, f"raw/{sh}")]
    out = tmp_path / "out"
    (out / "x").mkdir(parents=True)
    os.symlink(elsewhere, out / "x" / "images")
    with pytest.raises(LinkInExportError):
        write_llava(samples, open_store(str(out)), "x")
    assert list(elsewhere.iterdir()) == []
    os.symlink(tmp_path / "real", out / "linked")
    (tmp_path / "real").mkdir()
    assert write_llava(samples, open_store(str(out)), "linked") == 2
    assert len(list((tmp_path / "real" / "images").iterdir())) == 2


def test_duplicate_tar_member_names_are_ambiguous(tmp_path, pics):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in [("images/a.jpg", pics["jpeg"]), ("images/dup.jpg", pics["jpeg"]),
                           ("images/dup.jpg", pics["jpeg2"]), ("./images/dot.jpg", pics["jpeg"]),
                           ("images/dot.jpg", pics["jpeg2"])]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    (tmp_path / "images.tar").write_bytes(buf.getvalue())
    import gzip

    (tmp_path / "images.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    (tmp_path / "data.json").write_text(json.dumps([rec("a", "images/a.jpg"), rec("dup", "images/dup.jpg"),
                                                    rec("dot", "images/dot.jpg")]))
    for archive in ("images.tar", "images.tar.gz"):
        store, samples, quarantine = run(tmp_path / f"run-{archive}", tmp_path / "data.json", tmp_path / archive)
        assert outcomes(samples, quarantine) == {"a": ["written"], "dup": ["ambiguous_tar_member"],
                                                 "dot": ["ambiguous_tar_member"]}
        assert "2 archive members" in quarantine[0]["detail"]


# -- scale: streamed annotations, byte-sized shards --------------------------------------------------------

def test_annotations_are_parsed_as_a_stream_not_held_whole(tmp_path):
    """The parse holds neither the file's bytes nor its parsed tree: peak memory is a fraction of the file
    (before: bytes + text + tree, about 3.5x the file)."""
    recs = [{"id": f"r{i}", "image": f"images/{i % 7}.jpg", "conversations": conv(
        "<image>\n" + "Describe the scene in detail. " * 10, f"Answer {i}: " + "A cup of coffee on a saucer. " * 40)}
        for i in range(5000)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(recs))
    size = path.stat().st_size
    stage = IngestStage(IngestConfig(annotations=str(path), images=str(tmp_path), shard_size=100))
    tracemalloc.start()
    try:
        parsed = stage.records()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 8_000_000 and len(parsed) == 5000
    assert not parsed._buf  # all on disk before the runner forks: workers only pread the spill file
    assert peak < 0.5 * size, f"parsing a {size / 1e6:.1f} MB file peaked at {peak / 1e6:.1f} MB"
    assert [r.original_id for r in parsed[4998:5000]] == ["r4998", "r4999"]
    assert parsed[17:18][0].conversations[1].value == recs[17]["conversations"][1]["value"]


class _Dribble(io.RawIOBase):
    """A stream that returns at most a few bytes per read (an S3 body can return short reads)."""

    def __init__(self, data: bytes, step: int = 7):
        self.data, self.at, self.step = data, 0, step

    def read(self, n=-1):
        out = self.data[self.at:self.at + min(self.step, n if n >= 0 else self.step)]
        self.at += len(out)
        return out


def test_stream_reader_agrees_with_json_loads_on_short_reads():
    records = [rec(f"é{i}", metadata={"s": "x\\\"]}" * i, "n": [i, -i, 1.5e-7], "u": "\u2028\U0001F600"}) for i in range(30)]
    for text in (json.dumps(records), json.dumps(records, ensure_ascii=False, indent=2)):
        for step in (1, 3, 4096):
            got = list(parse_annotations("llava", _Dribble(text.encode("utf-8"), step), "s.json"))
            assert [r.original_id for r in got] == [r["id"] for r in records]
            assert [r.metadata for r in got] == [r["metadata"] for r in records]
    wrapped = {"info": {"x": [1, {"y": "]"}]}, "annotations": [{"image_id": str(i), "caption": "A cat."} for i in range(5)],
               "licenses": []}
    got = list(parse_annotations("cc_sbu_align", _Dribble(json.dumps(wrapped).encode(), 5), "f.json"))
    assert [r.original_id for r in got] == ["0", "1", "2", "3", "4"]
    # a file cut short keeps the records before the cut and names the rest
    cut = json.dumps(records)[:-500].encode()
    got = list(parse_annotations("llava", _Dribble(cut, 64), "cut.json"))
    assert all(not isinstance(r, BadRecord) for r in got[:-1]) and got[-1].reason == "bad_json"
    assert got[-1].original_id == "cut.json" and len(got) < len(records) + 1


def _write_recipe(tmp_path, name, cfg) -> str:
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "storage": {"prefix": str(tmp_path / name)}, "workers": 1,
                                    "stages": [{"stage": "ingest", "with": cfg}]}))
    return str(path)


def test_shards_are_sized_by_bytes_too_and_the_layout_is_fixed_before_images_are_read(tmp_path, photos):
    from jobs._main import main as job_main
    from jobs.plan_batches import main as plan_main

    src = tmp_path / "src"
    sizes = {}
    for i, (name, photo) in enumerate(sorted(photos.items())):
        for side in (48, 96, 160):
            data = jpeg_bytes(photo, size=(side, side), quality=90)
            write_files(src, {f"images/{name}{side}.jpg": data})
            sizes[f"images/{name}{side}.jpg"] = len(data)
    names = sorted(sizes)
    recs = [rec(f"r{i}", names[(i * 7) % len(names)]) for i in range(40)] + [rec("gone", "images/none.jpg")]
    (src / "data.json").write_text(json.dumps(recs))
    budget = 3 * max(sizes.values())
    cfg = {"format": "llava", "annotations": str(src / "data.json"), "images": str(src), "shard_size": 10,
           "shard_bytes": budget}
    fan, one = _write_recipe(tmp_path, "fan", cfg), _write_recipe(tmp_path, "one", cfg)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the list step fixes the layout (no image is decoded there)
        assert plan_main(["--recipe", fan, "--stage-id", "ingest", "--batch-size", "2"]) == 0
    batches = json.loads(buf.getvalue())
    manifest = json.loads((tmp_path / "fan" / "raw" / "_ingest.json").read_text())
    (seg,) = manifest["segments"]
    assert len(seg) == 4 and seg[:3] == [0, 41, 0] and seg[3][0] == 0
    starts = seg[3] + [41]
    assert len(starts) - 1 > -(-41 // 10)  # more shards than the count alone makes
    for lo, hi in zip(starts, starts[1:]):
        assert 1 <= hi - lo <= 10
        if hi - lo > 1:
            assert sum(sizes.get(r["image"], 0) for r in recs[lo:hi]) <= budget
        # the next record would not have fit (count or bytes): shards are filled greedily
        if hi < 41 and hi - lo < 10:
            assert sum(sizes.get(r["image"], 0) for r in recs[lo:hi + 1]) > budget - 2000 * (hi - lo + 1)
    for b in reversed(batches):  # pods, in any order
        assert job_main("ingest", ["--recipe", fan, "--stage-id", "ingest", "--shards", b["shards"]]) == 0
    assert job_main("ingest", ["--recipe", one, "--stage-id", "ingest"]) == 0

    def contents(prefix):
        store = open_store(str(tmp_path / prefix))
        shards = {sh: [s.source.original_id for s in iter_samples(store, f"raw/{sh}", with_images=False)]
                  for sh in raw_shards(store)}
        return store.read_text("raw/_ingest.json"), shards, audit(store)["ok"]

    m, shards, ok = contents("fan")
    assert (m, shards, ok) == contents("one") and ok
    assert [len(v) for v in shards.values()] == [hi - lo for lo, hi in zip(starts, starts[1:])][:-1] + [starts[-1] - starts[-2] - 1]

    # appended records: a new segment, laid out by bytes as well; done shards do not move
    biggest = max(sizes, key=sizes.get)
    (src / "data.json").write_text(json.dumps(recs + [rec(f"new{i}", biggest) for i in range(8)]))
    assert job_main("ingest", ["--recipe", one, "--stage-id", "ingest"]) == 0
    segs = json.loads((tmp_path / "one" / "raw" / "_ingest.json").read_text())["segments"]
    # the record JSON counts too: under 3x the biggest image, two records naming it fit, not three
    assert segs[0] == seg and segs[1] == [41, 49, len(seg[3]), [41, 43, 45, 47]]


def test_shard_bytes_setting_and_config_hash():
    base = {"annotations": "a.json", "images": "im"}
    default = IngestConfig(**base)
    # the default is not part of the config dict, so prefixes of runs from before the setting stay
    assert "shard_bytes" not in default.to_dict() and "shard_bytes" not in default.hash_dict()
    assert IngestConfig(**base, shard_bytes=1 << 30).to_dict() == default.to_dict()
    assert IngestConfig(**base, shard_bytes=0).to_dict()["shard_bytes"] == 0
    with pytest.raises(ValueError, match="shard_bytes"):
        IngestConfig(**base, shard_bytes=-1)


# -- the bad-input corpus -------------------------------------------------------------------------------------

class Raw:
    """A record given as JSON text (NaN, 5000-digit numbers, 100,000 levels: what json.dumps cannot write)."""

    def __init__(self, text: str):
        self.text = text


W = "written"
FALLBACK = object()  # the record has no usable id: it is named after its place in the file


def _corpus(pics, src, outside) -> list[tuple[str, object, str, object]]:
    """``(kind, record, expected outcome, expected id)`` for every kind; writes the images into ``src``."""
    p = pics["small"]
    good, png = pics["jpeg"], pics["png"]
    frames = [p["astronaut"].rotate(a) for a in (0, 90, 180)]
    agif = io.BytesIO()
    frames[0].save(agif, "GIF", save_all=True, append_images=frames[1:])
    agif = agif.getvalue()
    gif = save(p["rocket"], "GIF")
    webp = save(p["coffee"], "WEBP")
    i_idat = png.index(b"IDAT")
    files = {
        "good.jpg": good, "good.png": png, "good.webp": webp, "lossless.webp": save(p["camera"], "WEBP", lossless=True),
        "static.gif": gif, "animated.gif": agif, "animated_cut.gif": agif[: len(agif) * 2 // 3],
        "photo.bmp": save(p["chelsea"], "BMP"), "photo.tiff": save(p["rocket"], "TIFF"), "icon.ico": save(p["coffee"], "ICO"),
        "deep16.png": save(p["camera"].convert("I;16"), "PNG"),
        "palette.png": save(p["coffee"].convert("P"), "PNG", transparency=0), "gray_alpha.png": save(p["camera"].convert("LA"), "PNG"),
        "rgba.webp": save(p["chelsea"].convert("RGBA"), "WEBP"), "gray.jpg": save(p["camera"].convert("L"), "JPEG"),
        "cmyk.jpg": save(p["coffee"].convert("CMYK"), "JPEG"), "progressive.jpg": save(p["rocket"], "JPEG", progressive=True),
        "trailing.jpg": good + b"\0camera maker data after EOI", "twice.jpg": good + pics["jpeg2"],
        "png_named.jpg": png, "one.png": save(p["coffee"].resize((1, 1)), "PNG"), "b.jpg": pics["jpeg2"],
        "café photo.jpg": good,
        "empty.jpg": b"", "truncated.jpg": good[: len(good) // 3], "garbled.jpg": pics["garbled"],
        "text.jpg": b"this is not an image\n", "drawing.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        "zero_width.png": png_of_size(0, 10),
        "bad_idat.png": png[:i_idat + 20] + bytes(b ^ 0x55 for b in png[i_idat + 20:i_idat + 60]) + png[i_idat + 60:],
        "truncated.png": png[: len(png) // 2], "truncated.gif": gif[: len(gif) // 2], "truncated.webp": webp[: len(webp) // 2],
        "bomb.png": bomb_png(), "a_directory/inner.jpg": good,
    }
    write_files(src / "images", files)
    write_files(outside, {"secret.jpg": pics["jpeg2"], "dir/secret.jpg": pics["jpeg2"]})
    os.symlink(outside / "secret.jpg", src / "images" / "link_out.jpg")
    os.symlink(outside / "dir", src / "images" / "link_dir")
    os.symlink(src / "images" / "good.jpg", src / "images" / "link_in.jpg")

    def r(kind, image="images/good.jpg", q="<image>\nWhat is shown?", a="A photo.", **extra):
        return {"id": kind, "image": image, "conversations": conv(q, a), **extra}

    def turns(*pairs):
        return [{"from": f, "value": v} for f, v in pairs]

    def raw(kind, fragment):  # a good record with one more field written as raw JSON text
        return Raw(json.dumps(r(kind))[:-1] + f', "x": {fragment}}}')

    two = "<image>\n<image>\nCompare the two images."
    K = []

    def k(kind, record, expected, rid=None):
        K.append((kind, record, expected, kind if rid is None else rid))

    # images that are fine, in every shape datasets ship them
    for kind, name in [("good_jpeg", "good.jpg"), ("good_png", "good.png"), ("good_webp", "good.webp"),
                       ("webp_lossless", "lossless.webp"), ("gif_static", "static.gif"), ("gif_animated", "animated.gif"),
                       # frame 0 (what is kept, re-encoded as PNG) is whole; later frames are cut
                       ("gif_animated_later_frames_cut", "animated_cut.gif"),
                       ("bmp", "photo.bmp"), ("tiff", "photo.tiff"), ("ico", "icon.ico"), ("png_16_bit", "deep16.png"),
                       ("png_palette_transparency", "palette.png"), ("png_gray_alpha", "gray_alpha.png"),
                       ("webp_rgba", "rgba.webp"), ("jpeg_gray", "gray.jpg"), ("jpeg_cmyk", "cmyk.jpg"),
                       ("jpeg_progressive", "progressive.jpg"), ("jpeg_bytes_after_eoi", "trailing.jpg"),
                       ("jpeg_two_concatenated", "twice.jpg"), ("png_bytes_named_jpg", "png_named.jpg"),
                       ("image_1x1", "one.png"), ("symlink_inside_root", "link_in.jpg"), ("unicode_space_name", "café photo.jpg")]:
        k(kind, r(kind, f"images/{name}"), W)
    k("dot_slash_path", r("dot_slash_path", "./images/good.jpg"), W)
    # records that are fine
    k("multi_image", {"id": "multi_image", "image": ["images/good.jpg", "images/b.jpg"], "conversations": conv(two)}, W)
    k("multi_image_no_tokens", {"id": "multi_image_no_tokens", "images": ["images/good.jpg", "images/b.jpg"],
                                "conversations": conv("Compare them.")}, W)
    k("token_after_question", r("token_after_question", q="What is shown?\n<image>"), W)
    k("no_image_token", r("no_image_token", q="What is shown?"), W)
    k("multi_turn", {"id": "multi_turn", "image": "images/good.jpg", "conversations": conv() + conv("And then?", "Nothing.")}, W)
    k("role_aliases", {"id": "role_aliases", "image": "images/good.jpg",
                       "conversations": turns(("user", "<image>\nQ?"), ("ASSISTANT", "A."))}, W)
    k("integer_id", {**r("x"), "id": 157}, W, "157")
    k("control_chars_in_text", r("control_chars_in_text", q="<image>\nBell\x07 escape\x1b tab\t?"), W)
    k("nul_char_in_text", r("nul_char_in_text", a="before\x00after"), W)
    k("huge_answer_1mb", r("huge_answer_1mb", a="long " * 200_000), W)
    k("valid_surrogate_pair", r("valid_surrogate_pair", a="emoji \ud83d\ude00"), W)
    k("finite_metadata", r("finite_metadata", metadata={"clip": 31.5, "big": 1e308, "tiny": -5e-324, "n": [1, {"a": None}]}), W)
    k("unknown_fields_kept", r("unknown_fields_kept", clip_score=30.1, source="coco", task=["not", "a", "label"]), W)
    k("duplicate", r("duplicate"), W)
    k("duplicate", r("duplicate"), W)  # the same record twice: two samples with distinct keys
    # bad images
    for kind, name, reason in [("missing_image", "nope.jpg", "missing_image"), ("empty_file", "empty.jpg", "empty_image"),
                               ("jpeg_truncated", "truncated.jpg", "corrupt_image"),
                               ("jpeg_scan_garbled", "garbled.jpg", "corrupt_image"),
                               ("text_named_jpg", "text.jpg", "corrupt_image"), ("svg", "drawing.svg", "corrupt_image"),
                               ("png_zero_width", "zero_width.png", "corrupt_image"),
                               ("png_garbled_idat", "bad_idat.png", "corrupt_image"),
                               ("png_truncated", "truncated.png", "corrupt_image"),
                               ("gif_truncated", "truncated.gif", "corrupt_image"),
                               ("webp_truncated", "truncated.webp", "corrupt_image"),
                               ("decompression_bomb", "bomb.png", "decompression_bomb"),
                               ("image_is_a_directory", "a_directory", "missing_image"),
                               ("symlink_file_out_of_root", "link_out.jpg", "unsafe_image_path"),
                               ("symlink_dir_out_of_root", "link_dir/secret.jpg", "unsafe_image_path"),
                               ("name_too_long", "x" * 300 + ".jpg", "bad_image_ref")]:
        k(kind, r(kind, f"images/{name}"), reason)
    # bad image references
    for kind, ref in [("path_dotdot", "../outside/secret.jpg"), ("path_absolute", "/etc/passwd"),
                      ("path_url", "https://example.com/a.jpg"), ("path_empty", ""), ("path_nul_byte", "images/go\x00od.jpg"),
                      ("path_newline", "images/good.jpg\nimages/b.jpg"), ("path_not_a_string", 5)]:
        k(kind, r(kind, ref), "bad_image_ref")
    # bad conversations and records
    k("roles_out_of_order", {"id": "roles_out_of_order", "image": "images/good.jpg",
                             "conversations": conv()[::-1]}, "roles_out_of_order")
    k("empty_answer", r("empty_answer", a="  "), "empty_answer")
    k("ends_with_question", {"id": "ends_with_question", "image": "images/good.jpg",
                             "conversations": conv()[:1]}, "no_answer")
    k("system_role", {"id": "system_role", "image": "images/good.jpg",
                      "conversations": turns(("system", "Be brief."), *[(t["from"], t["value"]) for t in conv()])}, "unknown_role")
    k("role_not_a_string", {"id": "role_not_a_string", "image": "images/good.jpg",
                            "conversations": turns((5, "<image>\nQ"), ("gpt", "A"))}, "unknown_role")
    k("empty_conversation", {"id": "empty_conversation", "image": "images/good.jpg", "conversations": []}, "empty_conversation")
    k("empty_second_question", {"id": "empty_second_question", "image": "images/good.jpg",
                                "conversations": conv() + conv(" ", "Nothing.")}, "empty_instruction")
    k("value_not_a_string", {"id": "value_not_a_string", "image": "images/good.jpg",
                             "conversations": turns(("human", "<image>\nHow many?"), ("gpt", 3))}, "malformed_record")
    k("conversations_not_a_list", {"id": "conversations_not_a_list", "image": "images/good.jpg",
                                   "conversations": "Q: what? A: that."}, "malformed_record")
    k("record_not_an_object", "just a string", "malformed_record", FALLBACK)
    k("no_conversations", {"id": "no_conversations", "image": "images/good.jpg"}, "missing_field")
    k("turn_without_value", {"id": "turn_without_value", "image": "images/good.jpg",
                             "conversations": [{"from": "human"}, {"from": "gpt", "value": "A."}]}, "missing_field")
    k("no_image_field", {"id": "no_image_field", "conversations": conv("What is shown?")}, "no_image")
    k("empty_image_list", r("empty_image_list", []), "no_image")
    k("image_and_images", {**r("image_and_images"), "images": ["images/good.jpg"]}, "malformed_record")
    k("two_tokens_one_image", r("two_tokens_one_image", q=two), "image_token_mismatch")
    k("two_images_one_token", {"id": "two_images_one_token", "image": ["images/good.jpg", "images/b.jpg"],
                               "conversations": conv()}, "image_token_mismatch")
    k("second_image_missing", {"id": "second_image_missing", "image": ["images/good.jpg", "images/nope.jpg"],
                               "conversations": conv(two)}, "missing_image")
    # values that cannot be stored or exported as strict UTF-8 JSON
    k("lone_surrogate_in_answer", r("lone_surrogate_in_answer", a="broken \ud800 text"), "invalid_unicode")
    k("lone_surrogate_in_id", r("\udc01"), "invalid_unicode", FALLBACK)
    k("lone_surrogate_in_metadata_key", r("lone_surrogate_in_metadata_key", metadata={"k\udfff": 1}), "invalid_unicode")
    k("lone_surrogate_upper_case_escape", raw("lone_surrogate_upper_case_escape", '"\\uDBFF!"'), "invalid_unicode")
    k("float_overflow_without_exponent", raw("float_overflow_without_exponent", "1" + "0" * 400 + ".5"), "non_finite_number")
    k("nan", raw("nan", "NaN"), "non_finite_number")
    k("infinity", raw("infinity", "Infinity"), "non_finite_number")
    k("minus_infinity", raw("minus_infinity", "[-Infinity]"), "non_finite_number")
    k("float_overflow", raw("float_overflow", "1e400"), "non_finite_number")
    k("integer_5000_digits", raw("integer_5000_digits", "9" * 5000), "huge_integer")
    k("nested_100000_deep", raw("nested_100000_deep", "[" * 100_000 + "]" * 100_000), "too_deep", FALLBACK)
    k("nested_100_deep", raw("nested_100_deep", '{"a":' * 100 + "1" + "}" * 100), "too_deep")
    return K


def _corpus_text(kinds) -> list[str]:
    return [x.text if isinstance(x, Raw) else json.dumps(x) for _, x, _, _ in kinds]


@pytest.mark.parametrize("fmt", ["llava", "jsonl"])
def test_bad_input_corpus_every_outcome_exact(tmp_path, pics, fmt):
    src, outside = tmp_path / "src", tmp_path / "outside"
    kinds = _corpus(pics, src, outside)
    texts = _corpus_text(kinds)
    if fmt == "llava":
        name = "corpus.json"
        (src / name).write_text("[\n" + ",\n".join(texts) + "\n]\n")
        fallback = [f"{name}#{i}" for i in range(len(texts))]
        n_records = len(texts)
    else:  # JSONL adds kinds of its own: lines that are not JSON or not UTF-8, and blank lines (not records)
        name = "corpus.jsonl"
        lines = [t.encode() for t in texts]
        extra = [(b'{"id": "bad_json_line", "image": ', "bad_json"), (b'{"id": "latin1", "caption": "caf\xe9"}', "non_utf8"),
                 (b"   ", None), (b"", None)]
        fallback = [f"{name}:line {i + 1}" for i in range(len(lines))]
        for raw_line, reason in extra:
            lines.append(raw_line)
            if reason:
                kinds.append((reason + "_line", None, reason, f"{name}:line {len(lines)}"))
        (src / name).write_bytes(b"\n".join(lines) + b"\n")
        n_records = len(texts) + 2
    expected: dict[str, list[str]] = {}
    for i, (_, _, outcome, rid) in enumerate(kinds):
        expected.setdefault(fallback[i] if rid is FALLBACK else rid, []).append(outcome)
    distinct = {kind for kind, *_ in kinds}
    assert len(distinct) >= 40 + (fmt == "jsonl") * 2

    store, samples, quarantine = run(
        tmp_path / "run", src / name, src, fmt=fmt, shard_size=16, max_pixels=1_000_000,
        stages=[{"stage": "export", "with": {"formats": ["webdataset", "llava", "cc_sbu_align"]}}])
    assert outcomes(samples, quarantine) == {k: sorted(v) for k, v in expected.items()}
    assert len(samples) + len(quarantine) == n_records  # in = out + quarantined, exactly
    assert all(q["reason"] and q["detail"] for q in quarantine)
    rep = audit(store)
    assert rep["ok"]

    by_id = {s.source.original_id: s for s in samples}
    assert by_id["gif_animated"].images[0].format == "png" and by_id["png_bytes_named_jpg"].images[0].format == "png"
    assert by_id["good_jpeg"].images[0].data == pics["jpeg"]  # JPEG bytes are kept as they are
    assert by_id["valid_surrogate_pair"].conversations[1].value == "emoji \U0001F600"
    dups = [s.key for s in samples if s.source.original_id == "duplicate"]
    assert len(dups) == 2 and len(set(dups)) == 2

    # Export what was written: every JSON an exporter wrote is strict and valid UTF-8.
    (export,) = {p.split("/")[0] + "/" + p.split("/")[1] for p in store.list("export") if p.endswith("summary.json")}
    llava = strict_json(store.read_bytes(f"export/{export}/llava/data.json"))
    assert sorted(r["source"]["original_id"] for r in llava) == sorted(s.source.original_id for s in samples)
    strict_json(store.read_bytes(f"export/{export}/cc_sbu_align/filter_cap.json"))
    strict_json(store.read_bytes(f"export/{export}/summary.json"))
    from libcurate.shards import iter_members

    n = 0
    for rel in store.list(f"export/{export}/webdataset"):
        for m in iter_members(store.uri(f"export/{export}/webdataset/{rel}")):
            strict_json(m["json"])
            n += 1
    assert n == len(samples)
