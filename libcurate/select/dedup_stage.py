"""The ``dedup`` stage: near-duplicate groups over every sample (a ``fit`` stage).

Fits once on columns gathered from every shard, then writes per shard::

    {"group": "<key of the group's best member>", "group_rank": 0, "similarity": 1.0}          kept member
    {"group": "<key>", "group_rank": 2, "similarity": 0.97, "duplicate_of": "<key>"}          duplicate
    {}                                                                                       no group

Two detectors, either or both; their pairs are joined into groups (connected components):

* ``hash``: a ``hash_image`` stage's pHash field (``hash_image.phash``): pairs within ``max_distance``
  differing bits (resized, re-encoded, slightly cropped copies); similarity = 1 - bits/64.
* ``embedding``: SemDeDup on pooled CLIP image embeddings (``score_clip.img_emb``): k-means buckets, then
  pairs in a bucket with cosine >= 1 - ``eps``; ``text_embedding`` does the same for text embeddings.

Each group keeps its best member by ``keep_by`` (ties and no ``keep_by``: raw order). ``select`` drops the
others with ``near_duplicate_of: <kept key> (similarity ...)``; if the best member is itself dropped by an
earlier rule, the next one in ``group_rank`` order is kept instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..columns import check_embedding, embedding_key, embedding_parts, gather, hex_digest
from ..stage import Reads, Stage, StageConfig, StageContext
from . import dedup as D
from .fitstage import present_rows, rows_of, table_layout, write_rows


@dataclass
class DedupConfig(StageConfig):
    """Settings of ``dedup``.

    Attributes:
        hash: pHash field of a ``hash_image`` stage (``hash_image.phash``), or None.
        max_distance: pHash pairs differing in at most this many of 64 bits are near-duplicates.
        embedding: image embedding for SemDeDup (default ``score_clip.img_emb``), or None; a list
            (``[score_clip.img_emb, score_clip.txt_emb]``) dedups on the parts side by side
            (``columns.concat_embeddings``: cosine = the mean of the parts' cosines).
        eps: SemDeDup threshold: cosine >= 1 - eps.
        text_embedding: optional text embedding for text near-duplicates (``score_clip.txt_emb``), or a list.
        text_eps: the threshold for ``text_embedding``.
        n_clusters: SemDeDup's k-means buckets (None: about sqrt(n)).
        keep_by: field whose best value keeps a group's member (None: the first in raw order).
        keep_descending: high ``keep_by`` values are better.
        seed: k-means seed.
        profile: resource profile of the fit pod (``fit`` = CPU, ``gpu``).
    """

    hash: str | None = None
    max_distance: int = D.PHASH_MAX_DISTANCE
    embedding: object = "score_clip.img_emb"
    eps: float = 0.02
    text_embedding: object = None
    text_eps: float = 0.02
    n_clusters: int | None = None
    keep_by: str | None = None
    keep_descending: bool = True
    seed: int = 0
    profile: str = "fit"

    UNHASHED = ("profile",)

    def __post_init__(self):
        for name in ("embedding", "text_embedding"):
            if getattr(self, name) is not None:
                setattr(self, name, check_embedding(getattr(self, name), f"dedup.{name}"))
        if not (self.hash or self.embedding or self.text_embedding):
            raise ValueError("dedup: give hash (e.g. hash_image.phash), embedding (e.g. score_clip.img_emb) "
                             "or text_embedding")
        for name in ("hash", "keep_by"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or "." not in v):
                raise ValueError(f"dedup.{name}: want '<stage_id>.<field>', got {v!r}")
        if not 0 <= self.max_distance <= 32:
            raise ValueError("dedup.max_distance must be in [0, 32]")
        for name in ("eps", "text_eps"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"dedup.{name} must be in [0, 1)")


class DedupStage(Stage):
    name = "dedup"
    Config = DedupConfig
    kind = "fit"
    profile = "fit"

    @classmethod
    def reads(cls, config: DedupConfig) -> Reads:
        fields = [f for f in (config.hash, config.keep_by) if f]
        embs = [p for e in (config.embedding, config.text_embedding) if e for p in embedding_parts(e)]
        return Reads.of(fields, embs)

    def fit(self, ctx: StageContext) -> dict:
        c = self.config
        fields = [f for f in (c.hash, c.keep_by) if f]
        embs = [embedding_key(e) for e in (c.embedding, c.text_embedding) if e]
        t = gather(ctx, fields=fields, embeddings=embs, quarantine_from=[])
        n = len(t)
        pairs: list[tuple[np.ndarray, np.ndarray]] = []
        stats: dict = {"samples": n}
        hashes = None
        if c.hash:
            hexes = t.values[c.hash]
            has = hexes != b"" if hexes.dtype.kind == "S" else np.zeros(n, bool)
            hashes = hex_digest(hexes) if hexes.dtype.kind == "S" else np.zeros(n, np.uint64)
            rows = np.flatnonzero(has)
            i, j, _dist = D.hash_pairs(hashes[rows], c.max_distance)
            pairs.append((rows[i], rows[j]))
            stats["hash_pairs"] = int(len(i))
        for spec, eps in ((c.embedding, c.eps), (c.text_embedding, c.text_eps)):
            if not spec:
                continue
            name = embedding_key(spec)
            rows = present_rows(t, name)
            i, j, _sim = D.semdedup_pairs(rows_of(t.embeddings[name], rows), eps, n_clusters=c.n_clusters,
                                          seed=c.seed)
            pairs.append((rows[i], rows[j]))
            stats[f"{name}_pairs"] = int(len(i))
        pi = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
        pj = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, np.int64)
        group = D.group_pairs(n, pi, pj)
        quality = t.values[c.keep_by] if c.keep_by else np.zeros(n)
        if quality.dtype.kind == "S":
            from ..stage import PermanentInputError
            raise PermanentInputError(f"dedup.keep_by: {c.keep_by} holds text labels, not numbers")
        kept = D.choose_keepers(group, quality, higher_is_better=c.keep_descending)
        # rank inside the group: the keeper first, then by quality, then raw order
        q = -quality if c.keep_descending else quality
        q = np.where(np.isnan(q), np.inf, q)
        order = np.lexsort((np.arange(n), q, group))
        g = group[order]
        start = np.r_[True, g[1:] != g[:-1]]
        pos = np.arange(n) - np.maximum.accumulate(np.where(start, np.arange(n), 0))
        grank = np.empty(n, np.int64)
        grank[order] = pos
        sizes = np.bincount(group, minlength=n)
        in_group = sizes[group] > 1
        sim = _similarity_to_keeper(t, kept, hashes, embs)
        stats.update(groups=int((sizes > 1).sum()), duplicates=int((in_group & (kept != np.arange(n))).sum()))
        return {**table_layout(t), "kept": kept.astype(np.int64), "group_rank": grank, "in_group": in_group,
                "similarity": sim, "marks_duplicates": True, "stats": stats}

    def write_shard(self, ctx: StageContext, shard: str, fitted: dict) -> dict:
        keys, kept, grank = fitted["keys"], fitted["kept"], fitted["group_rank"]
        in_group, sim = fitted["in_group"], fitted["similarity"]

        def row_json(row: int) -> dict:
            if not in_group[row]:
                return {}
            d = {"group": keys[kept[row]].decode(), "group_rank": int(grank[row]),
                 "similarity": round(float(sim[row]), 6)}
            if kept[row] != row:
                d["duplicate_of"] = keys[kept[row]].decode()
            return d

        return write_rows(ctx, shard, fitted, row_json)


def _similarity_to_keeper(t, kept: np.ndarray, hashes: np.ndarray | None, embs: list[str]) -> np.ndarray:
    """Each member's similarity to its group's kept member: cosine of the image embedding where both have
    one, else 1 - pHash bits/64; 1.0 for the keeper itself (:func:`dedup.pair_similarity_to_keeper`)."""
    dup = kept != np.arange(len(kept))
    sim = np.ones(len(kept), np.float64)
    if hashes is not None:
        sim[dup] = D.pair_similarity_to_keeper(kept, hashes=hashes)[dup]
    if embs:
        present = t.present[embs[0]]
        ok = dup & present & present[kept]
        sim[ok] = D.pair_similarity_to_keeper(kept, embeddings=t.embeddings[embs[0]])[ok]
    return sim
