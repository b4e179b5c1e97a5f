"""Writers: curate Samples (image bytes attached) -> the layouts trainers read, through a :class:`Store`.

Both writers stream: images are written one by one, the annotation JSON is built incrementally in a
local temporary file and copied into place with one atomic ``store.open_write`` *after* every image,
so a reader that sees the JSON sees a complete export. Samples are validated first (an invalid or
image-less sample here is a programming error upstream and raises ``ValueError``). The JSON is strict
(``allow_nan=False``: no ``NaN``/``Infinity``, which most JSON parsers reject; ingest quarantines records
holding them) and valid UTF-8.

On a local directory, :func:`no_link_store` refuses to write through a symbolic link inside the export
target (a linked ``images/`` folder would put the images outside the export).

LLaVA layout (``write_llava``)::

    {prefix}/data.json              [{"id": key, "image": ..., "conversations": [...], "source": {...},
                                      "task", "type", "domain", "metadata", "generated"}, ...]
    {prefix}/images/{key}.img{i}.{ext}

``image`` is a string for one image and a list for several: LLaVA-NeXT / OneVision's dataset class
(``llava/train/train.py``) branches on ``type(image_file) is list``; the original LLaVA-1.5 trainer
reads single-image records only. Paths are relative to ``{prefix}``, so train with
``--image_folder {prefix}``. Image bytes are copied unchanged (``ext`` from the real format). The
extra fields are ignored by trainers and restored by :mod:`libcurate.formats.llava` on re-ingest.

cc_sbu_align layout (``write_cc_sbu_align``, MiniGPT-4 stage 2 / InstructionGPT-4)::

    {prefix}/filter_cap.json        {"annotations": [{"image_id": id, "caption": answer}, ...]}
    {prefix}/image/{id}.jpg

``id`` is the source's image id when the sample has one (:func:`libcurate.formats.lrv.image_id_of`: a
cc_sbu_align ``image_id``, an LRV Visual Genome id), so a curated subset keeps the ids of the dataset it
came from and re-ingests under them; several records may name one image (LRV's layout: many
instructions per image; the file is written once). Samples without a source image id, with one that
cannot name a file (a ``/``, a control character), or whose id already names a *different* image in this
export (two datasets both with an image ``5``) get curate's key instead: stable across runs, unique.

Only single-image, single-turn samples fit. A sample whose instruction is not the fixed
"Describe this image in detail." gets a ``question`` field (what LRV's MiniGPT-4 loader reads; the
leading ``<image>\\n`` is dropped, any other token placement is kept verbatim) unless
``keep_question=False``, which rejects it instead. MiniGPT-4 opens ``<image_id>.jpg`` with PIL, so
non-JPEG images are re-encoded to JPEG (RGB, alpha composited on white, quality ``jpeg_quality``); their
bytes, and so their key on re-ingest, change. Rejected samples come back as ``(key, reason)`` with
reasons ``multi_image``, ``multi_turn``, ``not_a_caption_sample``, ``image_reencode_failed``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import IO, Iterable

from libcurate.formats.base import FormatError, safe_id
from libcurate.formats.cc_sbu_align import DEFAULT_INSTRUCTION
from libcurate.formats.lrv import image_id_of
from libcurate.records import IMAGE_TOKEN, Sample
from libcurate.shards import ShardWriter, shard_name
from libcurate.storage import LocalStore, Store


class LinkInExportError(ValueError):
    """An export would write through a symbolic link (to wherever the link points)."""


class NoLinkStore(Store):
    """A local store that refuses writes through a symbolic link below ``guard`` (the export folder,
    relative to the root): every directory between it and a written file must be a real directory. The file itself may be
    a link: the atomic write replaces the link, never writes into its target. Reads are delegated."""

    def __init__(self, inner: LocalStore, guard: str = ""):
        self.inner, self.url, self.root = inner, inner.url, inner.root
        self.guard = guard.strip("/")
        self._checked: set[str] = set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def uri(self, rel: str) -> str:
        return self.inner.uri(rel)

    def exists(self, rel: str) -> bool:
        return self.inner.exists(rel)

    def list(self, rel: str = "") -> list[str]:
        return self.inner.list(rel)

    def open_read(self, rel: str):
        return self.inner.open_read(rel)

    def delete(self, rel: str) -> None:
        self.inner.delete(rel)

    def clean_partial(self, rel: str) -> int:
        return self.inner.clean_partial(rel)

    def check(self, rel: str) -> None:
        """Raise :class:`LinkInExportError` if a directory on the way to ``rel`` below the guard is a link
        (the guard folder itself and its parents are where the user chose to export: links allowed)."""
        parts = rel.strip("/").split("/")[:-1]
        skip = len(self.guard.split("/")) if self.guard else 0
        for i in range(skip, len(parts)):
            d = "/".join(parts[:i + 1])
            if d in self._checked:
                continue
            path = os.path.join(self.root, *parts[:i + 1])
            if os.path.islink(path):
                raise LinkInExportError(
                    f"refusing to write {rel}: {path} is a symbolic link (to {os.readlink(path)!r}); an export "
                    "never writes through links. Remove the link or export to another folder")
            if os.path.isdir(path):
                self._checked.add(d)

    @contextlib.contextmanager
    def open_write(self, rel: str):
        self.check(rel)
        with self.inner.open_write(rel) as f:
            yield f

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.check(rel)
        self.inner.write_bytes(rel, data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))


def no_link_store(store: Store, guard: str = "") -> Store:
    """``store`` wrapped in :class:`NoLinkStore` when it is a local directory (object stores have no links)."""
    if isinstance(store, NoLinkStore) or not isinstance(store, LocalStore):
        return store
    return NoLinkStore(store, guard)


def _join(prefix: str, rel: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{rel}" if prefix else rel


def _checked(s: Sample) -> Sample:
    s.validate()
    for i, im in enumerate(s.images):
        if im.data is None:
            raise ValueError(f"sample {s.key}: image {i} has no bytes attached (load with with_images=True)")
    return s


class _JsonListWriter:
    """Writes a JSON list element by element to a local temp file; ``commit`` copies it atomically."""

    def __init__(self, head: str = "[", tail: str = "]\n"):
        self.f: IO[bytes] = tempfile.TemporaryFile()
        self.tail = tail
        self.n = 0
        self.f.write(head.encode())

    def add(self, obj: dict) -> None:
        self.f.write(b"\n" if self.n == 0 else b",\n")
        self.f.write(json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        self.n += 1

    def commit(self, store: Store, rel: str) -> None:
        self.f.write(((b"\n" if self.n else b"") + self.tail.encode()))
        self.f.seek(0)
        with store.open_write(rel) as out:
            shutil.copyfileobj(self.f, out, 1 << 20)
        self.f.close()

    def close(self) -> None:
        self.f.close()


def llava_record(s: Sample, image_paths: list[str]) -> dict:
    """The LLaVA record written for a sample (``image_paths`` relative to the export root)."""
    return {
        "id": s.key,
        "image": image_paths[0] if len(image_paths) == 1 else image_paths,
        "conversations": [{"from": t.role, "value": t.value} for t in s.conversations],
        "source": {"dataset": s.source.dataset, "original_id": s.source.original_id,
                   "original_format": s.source.original_format},
        "task": s.task,
        "type": s.type,
        "domain": s.domain,
        "metadata": s.metadata,
        # True for a sample a generation stage wrote (provenance in metadata), False for an ingested one
        "generated": s.source.original_format == "generated" and "generated_from" in s.metadata,
    }


def write_llava(samples: Iterable[Sample], store: Store, prefix: str) -> int:
    """Write ``{prefix}/data.json`` + ``{prefix}/images/``; returns the number of samples written."""
    store = no_link_store(store, prefix)
    w = _JsonListWriter()
    try:
        for s in samples:
            _checked(s)
            paths = []
            for i, im in enumerate(s.images):
                rel = f"images/{s.key}.img{i}.{im.ext}"
                store.write_bytes(_join(prefix, rel), im.data)
                paths.append(rel)
            w.add(llava_record(s, paths))
        w.commit(store, _join(prefix, "data.json"))
        return w.n
    finally:
        w.close()


def write_webdataset(samples: Iterable[Sample], store: Store, prefix: str, shard_size: int = 1000,
                     shard_bytes: int = 0, sizes: list[int] | None = None) -> int:
    """curate's WebDataset layout (``{key}.json`` + images) under ``prefix``: a new shard after
    ``shard_size`` samples or, when ``shard_bytes`` > 0, once a shard holds that many bytes. ``sizes``
    (if given) gets the number of samples of each shard written. A failure aborts the open shard."""
    n, w, idx = 0, None, 0
    sizes = sizes if sizes is not None else []
    try:
        for s in samples:
            if w is None:
                w = ShardWriter(store, f"{prefix}/{shard_name(idx)}")
            w.write_sample(s)
            n += 1
            if w.count >= shard_size or 0 < shard_bytes <= w.bytes:
                w.close()
                sizes.append(w.count)
                w, idx = None, idx + 1
        if w is not None:
            w.close()
            sizes.append(w.count)
    except BaseException as e:
        if w is not None:
            w.abort(e)
        raise
    return n


def to_jpeg(data: bytes, quality: int = 95) -> bytes:
    """Re-encode any PIL-readable image as RGB JPEG (transparent pixels become white)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.getchannel("A"))
            im = bg
        elif im.mode != "RGB":
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def cc_sbu_question(s: Sample) -> tuple[str | None, str | None]:
    """``(question, None)`` where ``question`` is ``None`` for the default instruction, or
    ``(None, reason)`` when the sample cannot be a cc_sbu_align record."""
    if len(s.images) != 1:
        return None, "multi_image"
    if len(s.conversations) != 2:
        return None, "multi_turn"
    human = s.conversations[0].value
    if human == f"{IMAGE_TOKEN}\n{DEFAULT_INSTRUCTION}":
        return None, None
    if human.startswith(f"{IMAGE_TOKEN}\n") and human.count(IMAGE_TOKEN) == 1:
        return human[len(IMAGE_TOKEN) + 1:], None
    return human, None


def cc_sbu_image_id(s: Sample, used: dict[str, str]) -> str:
    """The ``image_id`` a sample is exported under: the source's image id when it has a usable one not
    yet taken by another image (``used``: id -> sha256 of the image written under it), else its key."""
    sid = image_id_of(s)
    if sid is not None:
        try:
            sid = safe_id(sid, "image_id")
        except FormatError:
            sid = None
    if sid is None or used.get(sid, s.images[0].sha256) != s.images[0].sha256:
        return s.key
    return sid


def write_cc_sbu_align(samples: Iterable[Sample], store: Store, prefix: str, *, keep_question: bool = True,
                       jpeg_quality: int = 95) -> tuple[int, list[tuple[str, str]]]:
    """Write ``{prefix}/filter_cap.json`` + ``{prefix}/image/<image_id>.jpg`` (the source's image id, else the
    key: see the module docstring).

    Returns ``(n_written, rejected)`` with ``rejected`` = ``[(key, reason), ...]`` for samples that do
    not fit the layout, so the caller records them.
    """
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    store = no_link_store(store, prefix)
    w = _JsonListWriter('{"annotations": [', "]}\n")
    rejected: list[tuple[str, str]] = []
    used: dict[str, str] = {}  # image_id -> sha256 of the source image written under it
    try:
        for s in samples:
            _checked(s)
            question, reason = cc_sbu_question(s)
            if reason is None and question is not None and not keep_question:
                reason = "not_a_caption_sample"
            if reason is not None:
                rejected.append((s.key, reason))
                continue
            im = s.images[0]
            image_id = cc_sbu_image_id(s, used)
            if image_id not in used:
                data = im.data
                if im.format != "jpeg":
                    try:
                        data = to_jpeg(data, jpeg_quality)
                    except Exception:  # a corrupt image must not abort the whole export
                        rejected.append((s.key, "image_reencode_failed"))
                        continue
                store.write_bytes(_join(prefix, f"image/{image_id}.jpg"), data)
                used[image_id] = im.sha256
            rec = {"image_id": image_id, "caption": s.conversations[1].value}
            if question is not None:
                rec["question"] = question
            w.add(rec)
        w.commit(store, _join(prefix, "filter_cap.json"))
        return w.n, rejected
    finally:
        w.close()
