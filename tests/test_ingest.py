"""Ingest: every record is written or quarantined with a reason, on local disk and on S3 (moto)."""

import io
import json
import os
import tarfile

import pytest
from PIL import Image

from libcurate.audit import audit
from libcurate.pipeline import load_recipe
from libcurate.records import IMAGE_TOKEN
from libcurate.runner import run_recipe
from libcurate.shards import iter_samples
from libcurate.stage import raw_shards, read_quarantine
from libcurate.storage import open_store

from .conftest import jpeg_bytes


def llava(rid, image, q="What is shown?", a="A photo.", before=True):
    human = f"{IMAGE_TOKEN}\n{q}" if before else f"{q}\n{IMAGE_TOKEN}"
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": a}]}


def ingest(prefix, annotations, images, fmt="llava", shard_size=4, workers=1, **extra):
    recipe = load_recipe({"storage": {"prefix": prefix}, "workers": workers, "stages": [
        {"stage": "ingest", "with": {"format": fmt, "annotations": annotations, "images": images,
                                     "shard_size": shard_size, **extra}}]})
    run_recipe(recipe, progress=False)
    store = open_store(prefix)
    samples = [s for sh in raw_shards(store) for s in iter_samples(store, f"raw/{sh}")]
    quarantine = [q for sh in raw_shards(store) for q in read_quarantine(store, "raw", sh[:-4])]
    return store, samples, quarantine


def write_dataset(root, records, files):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(root, "images", name), "wb") as f:
            f.write(data)
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def bomb_png() -> bytes:
    # A 1-bit PNG of 20000 x 20000 pixels compresses to a few KB but would decode to 400 MB.
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    return buf.getvalue()


def test_quarantine_reasons(tmp_path, photos):
    good = jpeg_bytes(photos["coffee"])
    files = {"good.jpg": good, "corrupt.jpg": good[: len(good) // 3], "zero.jpg": b"", "bomb.png": bomb_png(),
             "other.jpg": jpeg_bytes(photos["rocket"])}
    swapped = llava("swapped", "images/good.jpg")
    swapped["conversations"].reverse()
    records = [llava("ok", "images/good.jpg"), llava("corrupt", "images/corrupt.jpg"),
               llava("zero", "images/zero.jpg"), llava("missing", "images/nope.jpg"),
               llava("bomb", "images/bomb.png"), swapped, llava("escape", "../secret.jpg"),
               llava("absolute", "/etc/passwd"), llava("after", "images/other.jpg", before=False),
               {"id": "malformed", "conversations": "not a list"}]
    ann = write_dataset(tmp_path / "src", records, files)
    store, samples, quarantine = ingest(str(tmp_path / "run"), ann, str(tmp_path / "src"), max_pixels=50_000_000)
    reasons = {q["key"]: q["reason"] for q in quarantine}
    assert reasons["corrupt"] == "corrupt_image"
    assert reasons["zero"] == "empty_image"
    assert reasons["missing"] == "missing_image"
    assert reasons["bomb"] == "decompression_bomb"
    assert reasons["swapped"] == "roles_out_of_order"
    assert reasons["escape"] == "bad_image_ref" and reasons["absolute"] == "bad_image_ref"
    assert "malformed" in reasons
    assert all(q["detail"] for q in quarantine)
    assert sorted(s.source.original_id for s in samples) == ["after", "ok"]
    after = next(s for s in samples if s.source.original_id == "after")
    assert after.conversations[0].value.endswith(IMAGE_TOKEN)  # placement kept
    assert len(samples) + len(quarantine) == len(records)
    assert audit(store)["ok"]


def test_non_utf8_annotations_quarantined(tmp_path, photos):
    files = {"a.jpg": jpeg_bytes(photos["coffee"])}
    write_dataset(tmp_path / "src", [], files)
    ann = tmp_path / "src" / "bad.json"
    ann.write_bytes(json.dumps([llava("x", "images/a.jpg", q="caf\u00e9")]).encode("latin-1").replace(b"\\u00e9", b"\xe9"))
    store, samples, quarantine = ingest(str(tmp_path / "run"), str(ann), str(tmp_path / "src"))
    assert samples == []
    assert [q["reason"] for q in quarantine] == ["non_utf8"]
    assert audit(store)["ok"]


def test_images_from_tar_archive_with_unsafe_and_truncated_members(tmp_path, photos):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in [("images/a.jpg", jpeg_bytes(photos["coffee"])), ("../evil.jpg", jpeg_bytes(photos["camera"])),
                           ("/abs.jpg", jpeg_bytes(photos["rocket"])),
                           ("images/b.jpg", jpeg_bytes(photos["chelsea"], size=(256, 256)))]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    full = buf.getvalue()
    (tmp_path / "images.tar").write_bytes(full)
    cut = full.index(b"images/b.jpg") + 2000  # inside b.jpg's data: the archive is truncated
    (tmp_path / "trunc.tar").write_bytes(full[:cut])
    records = [llava("a", "images/a.jpg"), llava("evil", "evil.jpg"), llava("dotdot", "../evil.jpg"),
               llava("abs", "abs.jpg"), llava("b", "images/b.jpg")]
    ann = tmp_path / "data.json"
    ann.write_text(json.dumps(records))
    _, samples, quarantine = ingest(str(tmp_path / "run1"), str(ann), str(tmp_path / "images.tar"))
    reasons = {q["key"]: q["reason"] for q in quarantine}
    assert sorted(s.source.original_id for s in samples) == ["a", "b"]
    assert reasons == {"evil": "unsafe_member_name", "dotdot": "bad_image_ref", "abs": "unsafe_member_name"}
    _, samples, quarantine = ingest(str(tmp_path / "run2"), str(ann), str(tmp_path / "trunc.tar"))
    reasons = {q["key"]: q["reason"] for q in quarantine}
    assert [s.source.original_id for s in samples] == ["a"]
    assert reasons["b"] == "truncated_tar"
    # the same archives gzipped take the streaming path
    import gzip

    (tmp_path / "images.tar.gz").write_bytes(gzip.compress(full))
    (tmp_path / "trunc.tar.gz").write_bytes(gzip.compress(full)[:-3000])
    _, samples, quarantine = ingest(str(tmp_path / "run3"), str(ann), str(tmp_path / "images.tar.gz"))
    assert sorted(s.source.original_id for s in samples) == ["a", "b"] and len(quarantine) == 3
    _, samples, quarantine = ingest(str(tmp_path / "run4"), str(ann), str(tmp_path / "trunc.tar.gz"))
    assert {q["key"]: q["reason"] for q in quarantine}["b"] == "truncated_tar"


def test_multi_image_and_multi_turn(tmp_path, photos):
    files = {"a.jpg": jpeg_bytes(photos["coffee"]), "b.jpg": jpeg_bytes(photos["rocket"])}
    rec = {"id": "mi", "image": ["images/a.jpg", "images/b.jpg"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nCompare the two images."},
        {"from": "gpt", "value": "A cup and a rocket."},
        {"from": "human", "value": "Which is taller?"}, {"from": "gpt", "value": "The rocket."}]}
    ann = write_dataset(tmp_path / "src", [rec], files)
    _, samples, quarantine = ingest(str(tmp_path / "run"), ann, str(tmp_path / "src"))
    assert quarantine == []
    (s,) = samples
    assert len(s.images) == 2 and [im.data for im in s.images] == [files["a.jpg"], files["b.jpg"]]
    assert [t.role for t in s.conversations] == ["human", "gpt", "human", "gpt"]
    assert s.images[0].width == 64 and s.images[0].format == "jpeg"


def test_duplicates_get_distinct_stable_keys(tmp_path, photos):
    files = {"a.jpg": jpeg_bytes(photos["coffee"]), "a2.jpg": jpeg_bytes(photos["coffee"])}
    recs = [llava("1", "images/a.jpg"), llava("2", "images/a2.jpg"), llava("3", "images/a.jpg", a="Other.")]
    ann = write_dataset(tmp_path / "src", recs, files)
    _, s1, _ = ingest(str(tmp_path / "r1"), ann, str(tmp_path / "src"))
    _, s2, _ = ingest(str(tmp_path / "r2"), ann, str(tmp_path / "src"))
    keys = [s.key for s in s1]
    assert len(set(keys)) == 3  # exact duplicates under other ids still get their own key
    assert keys == [s.key for s in s2]  # and keys are stable across runs


def test_ingest_s3_to_s3(s3_bucket, tmp_path, photos):
    """Annotations, images and output all on the moto S3 server."""
    src = open_store(f"{s3_bucket}/src")
    recs = [llava(f"r{i}", f"images/{n}.jpg") for i, n in enumerate(photos)] + [llava("gone", "images/none.jpg")]
    for n, p in photos.items():
        src.write_bytes(f"images/{n}.jpg", jpeg_bytes(p))
    src.write_text("data.json", json.dumps(recs))
    store, samples, quarantine = ingest(f"{s3_bucket}/run", f"{s3_bucket}/src/data.json", f"{s3_bucket}/src",
                                        shard_size=2, workers=2)
    assert len(samples) == len(photos) and [q["reason"] for q in quarantine] == ["missing_image"]
    assert len(raw_shards(store)) == 3
    assert audit(store)["ok"]


def test_changed_ingest_config_is_refused(tmp_path, photos):
    from libcurate.stage import PermanentInputError

    ann = write_dataset(tmp_path / "src", [llava("1", "images/a.jpg")], {"a.jpg": jpeg_bytes(photos["coffee"])})
    ingest(str(tmp_path / "run"), ann, str(tmp_path / "src"), shard_size=4)
    with pytest.raises(PermanentInputError, match="different config"):
        ingest(str(tmp_path / "run"), ann, str(tmp_path / "src"), shard_size=8)


def test_record_index_matches_the_shard(tmp_path, photos):
    """Text-only readers get the same records from the index as from the tar, without image bytes."""
    from libcurate.shards import index_rel, iter_members

    files = {f"{n}.jpg": jpeg_bytes(p) for n, p in photos.items()}
    recs = [llava(n, f"images/{n}.jpg") for n in photos] + [llava("gone", "images/none.jpg")]
    ann = write_dataset(tmp_path / "src", recs, files)
    store, samples, _ = ingest(str(tmp_path / "run"), ann, str(tmp_path / "src"), shard_size=3)
    for shard in raw_shards(store):
        assert store.exists(index_rel(f"raw/{shard}"))
        from_index = list(iter_samples(store, f"raw/{shard}", with_images=False))
        from_tar = [json.loads(m["json"]) for m in iter_members(store.uri(f"raw/{shard}"))]
        assert [s.to_dict() for s in from_index] == from_tar
        assert all(im.data is None for s in from_index for im in s.images)
