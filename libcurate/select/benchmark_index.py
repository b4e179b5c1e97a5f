"""A benchmark index for ``decontaminate``: every item's name, its image's pHash and its question's n-grams.

Built once per content (:func:`fingerprint`) from the benchmark files (:mod:`libcurate.select.benchmarks`)
and stored as ``benchmark_index/<key>.arrays`` (curate's arrays blob: image hashes, question n-gram
postings) plus ``<key>.json`` (item names and counts, written last) in the run's store, where every shard
and every pod reads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ..columns import pack_arrays, unpack_arrays
from ..images import ImageProblem, open_images
from ..stage import PermanentInputError
from .benchmarks import Item, load_items
from .decontaminate import QuestionIndex, build_question_index
from .dedup import phash

INDEX_VERSION = "2"
INDEX_DIR = "benchmark_index"


def bench_items(b: dict) -> list[Item]:
    """The items of one benchmark (validated settings: ``DecontaminateConfig.benchmarks``)."""
    if b["layout"] == "jsonl":
        return load_items("jsonl", questions=b["questions"], id_field=b["id_field"], image_field=b["image_field"],
                          text_field=b["text_field"])
    return load_items("mme", root=b["root"])


def images_root(b: dict) -> str:
    """Where a benchmark's image references are relative to."""
    return b["images"] if b["layout"] == "jsonl" else b["root"]


def fingerprint(benchmarks: list[dict], ngram: int, max_df: float) -> str:
    """Content key of an index: the settings, the items (ids, image names, questions) and the images' byte
    sizes (one listing, no image read)."""
    h = hashlib.sha256(json.dumps({"v": INDEX_VERSION, "ngram": ngram, "max_df": max_df,
                                   "benchmarks": benchmarks}, sort_keys=True).encode())
    for b in benchmarks:
        items = bench_items(b)
        h.update(json.dumps([[i.id, i.image, i.question] for i in items]).encode())
        if "image" in b["match"]:
            refs = sorted({i.image for i in items if i.image})
            sizes = open_images(images_root(b)).sizes(refs)
            h.update(json.dumps([[r, sizes.get(r)] for r in refs]).encode())
    return h.hexdigest()[:20]


@dataclass
class BenchmarkIndex:
    """Attributes: items (``bench/id`` names), image_hashes uint64 [m] with image_item int32 [m] (the
    first item showing that image), questions (a :class:`QuestionIndex`) with question_item int32 [q]."""

    items: list[str]
    image_hashes: np.ndarray
    image_item: np.ndarray
    questions: QuestionIndex
    question_item: np.ndarray
    image_refs: list | None = None   # [benchmark position, image reference] per hashed image (to embed them)


def build_index(benchmarks: list[dict], ngram: int, max_df: float) -> tuple[BenchmarkIndex, dict]:
    """Read every benchmark (validated settings), hash its images, index its questions (word ``ngram``-grams,
    template n-grams above ``max_df``). Returns the index and its stats per benchmark."""
    names: list[str] = []
    hashes: list[int] = []
    h_item: list[int] = []
    texts: list[str] = []
    q_item: list[int] = []
    refs: list[list] = []
    stats = {}
    for bi, b in enumerate(benchmarks):
        items = bench_items(b)
        src = open_images(images_root(b)) if "image" in b["match"] else None
        by_ref: dict[str, int] = {}
        for it in items:
            k = len(names)
            names.append(f"{b['name']}/{it.id}")
            if src is not None and it.image and it.image not in by_ref:
                try:
                    by_ref[it.image] = phash(src.read(it.image))
                except (ImageProblem, ValueError) as e:
                    raise PermanentInputError(f"benchmark {b['name']}: item {it.id}: image {it.image}: {e}") from e
                hashes.append(by_ref[it.image])
                h_item.append(k)
                refs.append([bi, it.image])
            if "question" in b["match"] and it.question:
                texts.append(it.question)
                q_item.append(k)
        stats[b["name"]] = {"items": len(items), "images": len(by_ref),
                            "questions": sum(1 for i in items if i.question) if "question" in b["match"] else 0}
    q = build_question_index(texts, ngram, max_df)
    idx = BenchmarkIndex(names, np.array(hashes, np.uint64), np.array(h_item, np.int32), q,
                         np.array(q_item, np.int32), refs)
    stats["template_ngrams"] = int(len(q.template))
    return idx, stats


def save_index(store, key: str, idx: BenchmarkIndex, stats: dict) -> None:
    """``INDEX_DIR/<key>.arrays`` (numbers), then ``<key>.json`` (item names, stats)."""
    arrays = {"image_hashes": idx.image_hashes, "image_item": idx.image_item, "question_item": idx.question_item,
              **idx.questions.arrays()}
    store.write_bytes(f"{INDEX_DIR}/{key}.arrays", pack_arrays(arrays))
    # the JSON is written last: its presence means the index is complete
    store.write_text(f"{INDEX_DIR}/{key}.json", json.dumps({"items": idx.items, "image_refs": idx.image_refs,
                                                            "stats": stats}, ensure_ascii=False))


def load_index(store, key: str) -> BenchmarkIndex | None:
    """The stored index, or None when it is not (completely) there."""
    if not store.exists(f"{INDEX_DIR}/{key}.json"):
        return None
    meta = json.loads(store.read_text(f"{INDEX_DIR}/{key}.json"))
    a = unpack_arrays(store.read_bytes(f"{INDEX_DIR}/{key}.arrays"))
    return BenchmarkIndex(meta["items"], a["image_hashes"], a["image_item"], QuestionIndex.from_arrays(a),
                          a["question_item"], meta["image_refs"])


def embeddings_rel(key: str, model: str, pretrained: str | None) -> str:
    tag = hashlib.sha256(f"{model}|{pretrained}".encode()).hexdigest()[:10]
    return f"{INDEX_DIR}/{key}.clip-{tag}.npy"


def image_embeddings(store, key: str, idx: BenchmarkIndex, benchmarks: list[dict], model: str,
                     pretrained: str | None, device: str = "cpu") -> np.ndarray:
    """Unit-norm CLIP embeddings [m, d] (float32) of the index's images, in ``image_hashes`` order, by
    ``model`` / ``pretrained`` (the model that embedded the training samples); computed once and stored
    beside the index as ``<key>.clip-<model hash>.npy``."""
    from ..shards import npy_bytes, npy_load

    rel = embeddings_rel(key, model, pretrained)
    if store.exists(rel):
        return npy_load(store.read_bytes(rel))
    from ..generate.knn import encode_images
    from ..models.clip import load_clip

    sources = {}
    data = []
    for bi, ref in idx.image_refs:
        if bi not in sources:
            sources[bi] = open_images(images_root(benchmarks[bi]))
        data.append(sources[bi].read(ref))
    emb = encode_images(load_clip(model, pretrained, device), data) if data else np.zeros((0, 0), np.float32)
    store.write_bytes(rel, npy_bytes(emb.astype(np.float32)))
    return emb
