"""Evaluation benchmarks as flat lists of items (id, image reference, question), for decontamination.

Two layouts are read; each names where its images are (a local folder, an ``s3://`` prefix, or a
``.tar``/WebDataset-style archive of image files: :func:`libcurate.images.open_images`).

``jsonl``: one question file (JSONL, or a JSON list) plus an images root. A record is
``{"question_id": ..., "image": "<path under the images root>", "text": "<question>"}`` (the field names
are settings: ``id_field``, ``image_field``, ``text_field``; ``question`` is read when ``text`` is absent).
This is the layout of

* **LLaVA-Bench** (In-the-Wild: ``questions.jsonl`` + ``images/``; COCO: ``qa90_questions.jsonl`` + COCO
  val2014 images),
* **POPE** (``coco_pope_{random,popular,adversarial}.json``, one JSON object a line despite the name,
  ``{"question_id", "image": "COCO_val2014_....jpg", "text": "Is there a ... in the image?", "label"}``,
  images from COCO val2014), and LLaVA's converted ``llava_pope_test.jsonl`` / ``llava_mme.jsonl``.

``mme``: MME's release folder (``MME_Benchmark_release_version/``): one folder per subtask, either
``<task>/images/<stem>.<ext>`` with ``<task>/questions_answers_YN/<stem>.txt``, or ``<task>/<stem>.<ext>``
beside ``<task>/<stem>.txt``. Each line of a ``.txt`` is ``question<TAB>answer``; an item is
``<task>/<stem>#<line>`` (two yes/no questions per image).

Every item of a file is returned, or the file is refused with :class:`PermanentInputError` naming the
record: a benchmark that cannot be read completely must not let contaminated samples through silently.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from ..stage import PermanentInputError
from ..storage import open_store, read_url

LAYOUTS = ("jsonl", "mme")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass
class Item:
    """One benchmark item. Attributes: id (unique in its benchmark), image (reference under the images
    root, or None), question (text, or None)."""

    id: str
    image: str | None
    question: str | None


def read_records(data: bytes, where: str) -> list[dict]:
    """A JSON list, or JSON objects one a line (POPE's ``.json`` files are JSONL)."""
    text = data.decode("utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            recs = json.loads(text)
        except ValueError as e:
            raise PermanentInputError(f"{where}: invalid JSON: {e}") from None
    else:
        recs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except ValueError as e:
                    raise PermanentInputError(f"{where}: line {n}: invalid JSON: {e}") from None
    if not all(isinstance(r, dict) for r in recs):
        raise PermanentInputError(f"{where}: want objects, one a line or in a list")
    return recs


def jsonl_items(data: bytes, where: str, id_field: str = "question_id", image_field: str = "image",
                text_field: str = "text") -> list[Item]:
    """Items of a ``jsonl``-layout question file (see the module docstring)."""
    items, seen = [], set()
    for n, r in enumerate(read_records(data, where)):
        text = r.get(text_field, r.get("question"))
        image = r.get(image_field)
        if text is not None and not isinstance(text, str):
            raise PermanentInputError(f"{where}: record {n}: {text_field!r} must be a string")
        if image is not None and not isinstance(image, str):
            raise PermanentInputError(f"{where}: record {n}: {image_field!r} must be a string")
        if not text and not image:
            raise PermanentInputError(f"{where}: record {n} has neither {text_field!r} nor {image_field!r}")
        iid = str(r.get(id_field, n))
        if iid in seen:  # POPE numbers each file from 1; ids are made unique by position
            iid = f"{iid}@{n}"
        seen.add(iid)
        items.append(Item(iid, image or None, text or None))
    return items


def mme_items(names: list[str], read_text) -> list[Item]:
    """Items of an MME release folder, given its file list (relative paths) and a reader."""
    images = {}
    for name in names:
        stem, ext = posixpath.splitext(name)
        if ext.lower() in IMAGE_EXTS:
            d, base = posixpath.split(stem)
            task_dir = d[: -len("/images")] if d.endswith("/images") else d
            images[(task_dir, base)] = name
    items = []
    for name in names:
        if not name.endswith(".txt"):
            continue
        d, base = posixpath.split(name[:-4])
        task_dir = d[: -len("/questions_answers_YN")] if d.endswith("/questions_answers_YN") else d
        image = images.get((task_dir, base))
        if image is None:
            continue  # a README or notes file, not a question file
        for n, line in enumerate(read_text(name).splitlines()):
            if not line.strip():
                continue
            question = line.split("\t")[0].strip()
            if not question:
                raise PermanentInputError(f"{name}: line {n + 1}: no question before the tab")
            items.append(Item(f"{task_dir}/{base}#{n}", image, question))
    if not items:
        raise PermanentInputError("MME layout: no <task>/[images/]<stem>.<ext> with a matching .txt found")
    return items


def load_items(layout: str, questions: str = "", root: str = "", storage_options: dict | None = None,
               **fields) -> list[Item]:
    """The items of one benchmark: ``questions`` (a file URL) for ``jsonl``, ``root`` (a folder URL) for ``mme``."""
    if layout == "jsonl":
        try:
            data = read_url(questions, storage_options)
        except FileNotFoundError:
            raise PermanentInputError(f"benchmark questions not found: {questions}") from None
        return jsonl_items(data, questions, **fields)
    if layout == "mme":
        store = open_store(root, storage_options)
        return mme_items(store.list(), store.read_text)
    raise PermanentInputError(f"unknown benchmark layout {layout!r}; known: {list(LAYOUTS)}")
