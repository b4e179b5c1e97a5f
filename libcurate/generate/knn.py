"""Exact top-k cosine search of query embeddings in a pool of CLIP image embeddings, with faiss.

The pool is a ``[n, d]`` float16 matrix (a memory map from :func:`libcurate.columns.gather`: 10M x 512 is
10 GB, never held in RAM as float32). :func:`search_topk` walks it in blocks of ``block_rows`` rows; each
block becomes a faiss ``IndexFlatIP`` (float32, rows renormalised so inner product = cosine), every query
is searched in it, and the per-block top-k lists are merged. The result is the exact top-k, with memory
bounded by one block (``block_rows * d * 4`` bytes: 2 GB at 1M x 512), not by the pool.

Query encoders (:func:`encode_texts`, :func:`encode_images`) run the CLIP text / image tower of a loaded
:class:`~libcurate.models.clip.ClipBundle` and return unit-norm float32 rows. Nothing here reads storage.
"""

from __future__ import annotations

import io

import numpy as np


def unit_rows(x) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def search_topk(pool: np.ndarray, queries: np.ndarray, k: int, rows: np.ndarray | None = None,
                block_rows: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` pool rows by cosine for every query.

    Args:
        pool: [n, d] embeddings (any float dtype, a memmap is fine).
        queries: [q, d] embeddings (renormalised here).
        k: neighbours per query.
        rows: pool rows that may be returned (default: all), e.g. those with an embedding.
        block_rows: pool rows per faiss index.

    Returns:
        ``(scores, idx)``, both [q, min(k, len(rows))]: cosine (float32, descending) and pool row numbers
        (int64); equal scores are ordered by row number.
    """
    import faiss

    q = unit_rows(queries)
    rows = np.arange(len(pool)) if rows is None else np.asarray(rows, np.int64)
    k = min(int(k), len(rows))
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    if k <= 0 or not len(q):
        return np.zeros((len(q), max(k, 0)), np.float32), np.zeros((len(q), max(k, 0)), np.int64)
    # faiss-cpu 1.15 computes inner products with a scalar SIMD loop below 128,000 queries and with BLAS
    # (one matrix product) above; for tens to thousands of queries BLAS is ~14x faster (measured: 100
    # queries x 65,536 x 512 rows, 2.97 s -> 0.21 s, same neighbours; bench/engine_search.py).
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    try:
        for lo in range(0, len(rows), block_rows):
            r = rows[lo:lo + block_rows]
            index = faiss.IndexFlatIP(q.shape[1])
            index.add(unit_rows(pool[r]))
            s, i = index.search(q, min(k, len(r)))
            s = np.where(i >= 0, s, -np.inf).astype(np.float32)
            i = np.where(i >= 0, r[np.maximum(i, 0)], np.iinfo(np.int64).max)
            cat_s, cat_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1)
            order = np.lexsort((cat_i, -cat_s), axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)
    finally:
        faiss.cvar.distance_compute_blas_threshold = old
    return best_s, best_i


def encode_texts(bundle, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Unit-norm CLIP text embeddings [len(texts), d] (float32)."""
    import torch

    from ..models.clip import tokenize

    out = []
    for lo in range(0, len(texts), batch_size):
        ids, _ = tokenize(bundle.tokenizer, texts[lo:lo + batch_size], bundle.context_length)
        with torch.no_grad():
            out.append(bundle.model.encode_text(ids.to(bundle.device)).float().cpu().numpy())
    return unit_rows(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)


def encode_images(bundle, images: list[bytes], batch_size: int = 64) -> np.ndarray:
    """Unit-norm CLIP image embeddings [len(images), d] (float32) of encoded image bytes, through the
    model's own preprocessing (as ``score_clip`` embeds the pool)."""
    import torch
    from PIL import Image

    out = []
    for lo in range(0, len(images), batch_size):
        batch = []
        for data in images[lo:lo + batch_size]:
            with Image.open(io.BytesIO(data)) as im:
                batch.append(bundle.preprocess(im.convert("RGB")))
        with torch.no_grad():
            out.append(bundle.model.encode_image(torch.stack(batch).to(bundle.device)).float().cpu().numpy())
    return unit_rows(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)
