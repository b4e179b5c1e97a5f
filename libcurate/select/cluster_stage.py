"""The ``cluster`` stage: cluster ids over every sample's embedding (a ``fit`` stage).

Per sample it writes ``{"cluster": 3, "distance": 0.41}`` (``{}`` for a sample without the embedding), so
``select`` reads ``<id>.cluster`` like any score (``cluster_proportional``) and later stages can split by it.

Methods (features are L2-normalised first):

* ``kmeans``: k-means++ with a seed and ``n_init`` restarts (faiss), distance = 1 - cosine to the centroid;
* ``balanced``: InstructionGPT-4's split into N equal subsets (3,439 -> 30 x 114), but assigned by distance
  to the k-means centroids under equal capacities, and every sample assigned (the seed moved surplus
  samples by list order and dropped 19);
* ``spectral``: InstructionGPT-4's diversity clusters (10 clusters, nearest-neighbour affinity) on a sparse
  kNN graph, or on k-means anchors above ``max_direct`` samples so that it scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..columns import check_embedding, embedding_key, embedding_parts, gather
from ..stage import Reads, Stage, StageConfig, StageContext
from . import cluster as C
from .fitstage import present_rows, rows_of, table_layout, write_rows

METHODS = ("kmeans", "balanced", "spectral")


@dataclass
class ClusterConfig(StageConfig):
    """Settings of ``cluster``.

    Attributes:
        embedding: the embedding column to cluster (``score_clip.img_emb``), or a list of them clustered
            side by side (``[score_clip.img_emb, score_clip.txt_emb]``: ``columns.concat_embeddings``).
        method: kmeans | balanced | spectral.
        n_clusters: clusters (or subsets, for ``balanced``).
        seed: random seed (k-means++ init, spectral's eigensolver).
        n_init: k-means restarts; the lowest inertia wins.
        n_neighbors: spectral: neighbours in the kNN affinity graph.
        max_direct: spectral: above this many samples, cluster k-means anchors instead of samples.
        profile: resource profile of the fit pod (``fit`` = CPU, ``gpu``).
    """

    embedding: object = "score_clip.img_emb"
    method: str = "kmeans"
    n_clusters: int = 10
    seed: int = 0
    n_init: int = 10
    n_neighbors: int = 10
    max_direct: int = 20000
    profile: str = "fit"

    UNHASHED = ("profile",)

    def __post_init__(self):
        self.embedding = check_embedding(self.embedding, "cluster.embedding")
        if self.method not in METHODS:
            raise ValueError(f"cluster.method {self.method!r}: want one of {list(METHODS)}")
        if self.n_clusters < 1 or self.n_init < 1 or self.n_neighbors < 1:
            raise ValueError("cluster: n_clusters, n_init and n_neighbors must be >= 1")


class ClusterStage(Stage):
    name = "cluster"
    Config = ClusterConfig
    kind = "fit"
    profile = "fit"

    @classmethod
    def reads(cls, config: ClusterConfig) -> Reads:
        return Reads.of(embeddings=embedding_parts(config.embedding))

    def fit(self, ctx: StageContext) -> dict:
        c = self.config
        key = embedding_key(c.embedding)
        t = gather(ctx, embeddings=[key], quarantine_from=[])
        rows = present_rows(t, key)
        x = rows_of(t.embeddings[key], rows)
        n = len(t)
        labels = np.full(n, -1, np.int64)
        dist = np.full(n, np.nan, np.float64)
        k = min(c.n_clusters, len(rows))
        if k >= 1:
            if c.method == "kmeans":
                r = C.kmeans(x, k, seed=c.seed, n_init=c.n_init)
            elif c.method == "balanced":
                r = C.balanced_split(x, k, seed=c.seed, n_init=c.n_init)
            else:
                r = C.spectral(x, k, seed=c.seed, n_neighbors=c.n_neighbors, max_direct=c.max_direct)
            labels[rows] = r.labels
            d = getattr(r, "distances", None)
            if d is not None:
                dist[rows] = d
        sizes = np.bincount(labels[labels >= 0], minlength=max(k, 0)).tolist()
        return {**table_layout(t), "labels": labels, "distances": dist,
                "stats": {"samples": n, "clustered": int(len(rows)), "sizes": sizes, "method": c.method}}

    def write_shard(self, ctx: StageContext, shard: str, fitted: dict) -> dict:
        labels, dist = fitted["labels"], fitted["distances"]

        def row_json(row: int) -> dict:
            if labels[row] < 0:
                return {}
            d = {"cluster": int(labels[row])}
            if np.isfinite(dist[row]):
                d["distance"] = round(float(dist[row]), 6)
            return d

        return write_rows(ctx, shard, fitted, row_json)
