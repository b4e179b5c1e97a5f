"""Benchmark contamination: which training samples show a benchmark's image or ask a benchmark's question.

Two matchers over numpy arrays (nothing here reads storage; the ``decontaminate`` stage does):

* **images**: 64-bit pHashes (:func:`libcurate.select.dedup.phash`). :func:`nearest_hashes` gives every
  query hash its nearest benchmark hash by Hamming distance: XOR + popcount over a ``[queries, m]`` block
  in numpy, in blocks of about 16 MB. Exact, and linear in ``m`` per query: benchmarks are small
  (POPE: 500 distinct COCO images, MME: about 1,200, LLaVA-Bench: 24 to 90), so a shard of 1,000
  samples against 10,000 benchmark images is 10M popcounts, tens of milliseconds. (For an index of
  millions of hashes, multi-index hashing as in :func:`libcurate.select.dedup.hash_pairs` would be the
  next step.) Re-encoding and resizing move a pHash by 0-4 bits; distinct photos are 20+ bits apart
  (see :data:`~libcurate.select.dedup.PHASH_MAX_DISTANCE`).
* **questions**: word n-grams. A question is lower-cased, the ``<image>`` token dropped, split into
  ``[a-z0-9]+`` words, and every run of ``n`` words hashed to a uint64 (BLAKE2b, stable across machines).
  N-grams that occur in many benchmark questions are *template* n-grams ("is there a", "in the image"
  in every POPE question) and are ignored on both sides: they say nothing about which item a question
  copies. The overlap of a sample question with a benchmark question is ``shared / min(len(a), len(b))``
  over their informative n-grams (the overlap coefficient: a question that contains a benchmark question,
  or is contained in it, scores 1); pairs where either side has fewer than ``min_ngrams`` informative
  n-grams are not compared (too short to tell a copy from a coincidence). Reordering a few words keeps most
  trigrams: "What is the man holding in his left hand?" vs "In his left hand, what is the man holding?"
  share 5 of 7.

:class:`QuestionIndex` keeps the informative n-grams sorted with their postings (which questions hold
them), so a lookup is a ``searchsorted`` plus a count over the postings of the grams it shares: no
comparison with every benchmark question.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from .dedup import _popcount

_WORD = re.compile(r"[a-z0-9]+")
_BLOCK = 1 << 24   # bytes of one [queries, m] distance block


def words(text: str) -> list[str]:
    """Lower-cased ``[a-z0-9]+`` words of ``text`` without the ``<image>`` token."""
    return _WORD.findall(text.replace("<image>", " ").lower())


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Sorted unique uint64 hashes of the word ``n``-grams of ``text`` (empty if it has fewer than n words)."""
    w = words(text)
    grams = {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}
    if not grams:
        return np.zeros(0, np.uint64)
    blob = b"".join(hashlib.blake2b(g.encode(), digest_size=8).digest() for g in sorted(grams))
    return np.unique(np.frombuffer(blob, dtype=">u8").astype(np.uint64))


@dataclass
class QuestionIndex:
    """Informative n-grams of benchmark questions with their postings.

    Attributes:
        grams: uint64 [g] sorted informative n-gram hashes.
        starts: int64 [g + 1]: question ids holding ``grams[i]`` are ``postings[starts[i]:starts[i + 1]]``.
        postings: int32 question ids.
        sizes: int32 [q] informative n-grams per question.
        template: uint64 sorted n-grams left out as template (too frequent to identify a question).
    """

    grams: np.ndarray
    starts: np.ndarray
    postings: np.ndarray
    sizes: np.ndarray
    template: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"q_grams": self.grams, "q_starts": self.starts, "q_postings": self.postings,
                "q_sizes": self.sizes, "q_template": self.template}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "QuestionIndex":
        return cls(a["q_grams"], a["q_starts"], a["q_postings"], a["q_sizes"], a["q_template"])


def build_question_index(questions: list[str | None], n: int, max_df: float, min_df: int = 5) -> QuestionIndex:
    """Index ``questions`` (None: an item without a question). An n-gram held by more than
    ``max(max_df * len(questions), min_df)`` questions is a template n-gram."""
    per_q = [ngram_hashes(q, n) if q else np.zeros(0, np.uint64) for q in questions]
    qid = (np.concatenate([np.full(len(g), i, np.int32) for i, g in enumerate(per_q)]) if per_q
           else np.zeros(0, np.int32))
    allg = np.concatenate(per_q) if per_q else np.zeros(0, np.uint64)
    uniq, counts = np.unique(allg, return_counts=True)
    limit = max(max_df * len(questions), min_df)
    template = uniq[counts > limit]
    keep = ~np.isin(allg, template)
    allg, qid = allg[keep], qid[keep]
    order = np.lexsort((qid, allg))
    allg, qid = allg[order], qid[order]
    grams, first = np.unique(allg, return_index=True)
    starts = np.append(first, len(allg)).astype(np.int64)
    sizes = np.bincount(qid, minlength=len(questions)).astype(np.int32)
    return QuestionIndex(grams, starts, qid.astype(np.int32), sizes, template)


def match_question(index: QuestionIndex, text: str, n: int, min_ngrams: int) -> tuple[int, float]:
    """The benchmark question ``text`` overlaps most: ``(question id, overlap)``, or ``(-1, 0.0)``."""
    g = ngram_hashes(text, n)
    g = g[~np.isin(g, index.template)]
    if len(g) < min_ngrams or not len(index.grams):
        return -1, 0.0
    pos = np.searchsorted(index.grams, g)
    pos = pos[(pos < len(index.grams)) & (index.grams[np.minimum(pos, len(index.grams) - 1)] == g)]
    if not len(pos):
        return -1, 0.0
    cand = np.concatenate([index.postings[index.starts[p]:index.starts[p + 1]] for p in pos])
    qs, shared = np.unique(cand, return_counts=True)
    denom = np.minimum(index.sizes[qs], len(g))
    ok = denom >= min_ngrams
    if not ok.any():
        return -1, 0.0
    overlap = np.where(ok, shared / np.maximum(denom, 1), 0.0)
    best = int(np.argmax(overlap))
    return int(qs[best]), float(overlap[best])


def nearest_hashes(queries: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every uint64 query hash, the position of its nearest ``index`` hash and the Hamming distance
    (``-1`` and ``65`` when the index is empty). Vectorised in blocks of about 16 MB."""
    queries = np.asarray(queries, np.uint64)
    index = np.asarray(index, np.uint64)
    best = np.full(len(queries), -1, np.int64)
    dist = np.full(len(queries), 65, np.int16)
    if not len(index) or not len(queries):
        return best, dist
    step = max(1, _BLOCK // len(index))
    for lo in range(0, len(queries), step):
        d = _popcount(np.bitwise_xor(queries[lo:lo + step, None], index[None, :]))
        best[lo:lo + step] = np.argmin(d, axis=1)
        dist[lo:lo + step] = d[np.arange(len(d)), best[lo:lo + step]]
    return best, dist
