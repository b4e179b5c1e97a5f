"""``retrieve``: MMInstruct's image collection step (a) by CLIP similarity search over a pool we own.

MMInstruct queried the public LAION kNN service (now gone) with seed images. Here the pool is a prior
curate run (``pool``: its prefix, local or ``s3://``) whose ``score_clip`` stage stored every image's
embedding; this stage searches it exactly with faiss (:func:`libcurate.generate.knn.search_topk`) and
writes the top-``k`` pool samples of every query as the **raw shards of this run**, so every later stage
(captioning, instruction generation, judging, selection, export) treats them as ingested samples. Like
``ingest``, it is the first stage of its recipe (``produces_raw``).

Queries (one or both):

* ``queries``: a JSONL file (or a JSON list) of ``{"id": ..., "text": "a red double-decker bus"}`` and/or
  ``{"id": ..., "image": "seed/bus.jpg"}`` (relative to ``query_images``, default: the file's folder).
  Texts go through the CLIP text tower, images through the image tower, of the **same model** that
  embedded the pool (read from the pool's ``score_clip`` fields; a different ``model`` is refused).
* ``seeds``: another run's prefix: each of its samples is an image query with the embedding its own
  ``score_clip`` stored (same model required).

A pool sample retrieved by several queries is written once. Every written sample keeps the pool
sample's key, images, conversation, labels and source; ``metadata["retrieved"]`` holds the provenance::

    {"pool": "<pool prefix>", "pool_key": "<key>", "pool_shard": "shard-000003.tar",
     "hits": [{"query_id": "q7", "query": "a red bus" | "image:seed/bus.jpg" | "seed:<key>",
               "score": 0.3121, "rank": 1}, ...]}

Layout and re-runs. The search runs once; its result is fixed in ``raw/_retrieve.json`` (config hash,
the pool's shards and the chosen samples in pool order, ``shard_size`` per raw shard), so a re-run, a
killed run and every pod of a fan-out write the same shards, and done shards are skipped. A different
config or a changed pool under the same prefix is refused (use a new storage prefix), as ingest does.
A pool sample that can no longer be read is quarantined (``pool_sample_missing``).

Cost. The search reads the pool's embedding columns once (gathered into a scratch memory map, 2 bytes x d
per pool sample). Writing reads only the pool shards that hold a hit, each streamed once by every output
shard holding one of its hits; the hits are laid out in pool order, so that is one or two output shards
unless a pool shard holds more than ``shard_size`` hits (the whole tar is streamed: a pool shard holding
one hit costs a full read).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..columns import gather, raw_leaves
from ..shards import index_bytes, index_rel, iter_samples, shard_name
from ..stage import (PermanentInputError, ShardOutput, Stage, StageConfig, StageContext, config_hash,
                     raw_shards, unit_of)
from ..storage import open_store, read_url
from .knn import encode_images, encode_texts, search_topk

MANIFEST = "raw/_retrieve.json"


@dataclass
class RetrieveConfig(StageConfig):
    """Settings of ``retrieve``.

    Attributes:
        pool: prefix of the run whose samples are searched (local directory or ``s3://``).
        pool_stage: the pool run's stage holding ``img_emb``: a stage id (``score_clip``; its one
            configuration under ``stages/<id>/`` is used) or a full prefix ``stages/score_clip/<cfg>``.
        queries: JSONL / JSON list of ``{"id", "text"}`` or ``{"id", "image"}`` queries.
        query_images: root of the query images (default: the queries file's folder).
        seeds: prefix of a run whose samples are image queries (their stored embeddings).
        seeds_stage: like ``pool_stage``, for ``seeds``.
        k: pool samples per query.
        min_score: leave out hits with a lower cosine (None: keep all k).
        model / pretrained: the CLIP model for query embeddings; empty = the pool's (anything else must
            equal it).
        device: where the query towers run.
        shard_size: retrieved samples per raw shard.
        block_rows: pool rows per faiss block (memory, not results: not hashed).
    """

    UNHASHED: ClassVar[tuple[str, ...]] = ("block_rows", "device")

    pool: str = ""
    pool_stage: str = "score_clip"
    queries: str = ""
    query_images: str = ""
    seeds: str = ""
    seeds_stage: str = "score_clip"
    k: int = 50
    min_score: float | None = None
    model: str = ""
    pretrained: str | None = None
    device: str = "cpu"
    shard_size: int = 1000
    block_rows: int = 1 << 20

    def __post_init__(self):
        if not self.pool:
            raise ValueError("retrieve needs 'pool' (the prefix of a run with CLIP image embeddings)")
        if not self.queries and not self.seeds:
            raise ValueError("retrieve needs 'queries' (a file) and/or 'seeds' (a run prefix)")
        if self.k < 1 or self.shard_size < 1 or self.block_rows < 1:
            raise ValueError("k, shard_size and block_rows must be >= 1")


def stage_prefix(store, stage: str, what: str) -> str:
    """``stages/<id>/<cfg>`` of a finished run: given whole, or the one configuration of stage ``<id>``."""
    if "/" in stage:
        return stage.strip("/")
    cfgs = store.list_dirs(f"stages/{stage}")
    if len(cfgs) != 1:
        raise PermanentInputError(f"{what}: {store.url} has {len(cfgs)} configurations of stage {stage!r} "
                                  f"({cfgs}); name one as stages/{stage}/<cfg>")
    return f"stages/{stage}/{cfgs[0]}"


def read_embeddings(url: str, stage: str, what: str, scratch: str, storage_options: dict | None = None):
    """``(table, matrix, model, pretrained)`` of a run's pooled image embeddings (one row per raw sample;
    ``table.present`` marks rows that have one)."""
    store = open_store(url, storage_options)
    prefix = stage_prefix(store, stage, what)
    if not raw_shards(store):
        raise PermanentInputError(f"{what}: {url} has no raw shards")
    ctx = StageContext(store=store, prefix="", upstream={"emb": prefix})
    t = gather(ctx, fields=["emb.model", "emb.pretrained"], embeddings=["emb.img_emb"], scratch=scratch)
    present = t.present["emb.img_emb"]
    if not present.any():
        raise PermanentInputError(f"{what}: {url}/{prefix} stored no image embeddings (save_embeddings: false?)")
    def labels(col):  # a label column; absent everywhere (pretrained: None) reads as NaN
        col = t.values[col][present]
        return [x.decode() or None for x in col.tolist()] if col.dtype.kind == "S" else [None] * len(col)

    models = set(zip(labels("emb.model"), labels("emb.pretrained")))
    if len(models) != 1 or None in next(iter(models))[:1]:
        raise PermanentInputError(f"{what}: want embeddings of one named model in {url}/{prefix}, "
                                  f"found {sorted(models, key=str)}")
    (model, pretrained), = models
    return t, t.embeddings["emb.img_emb"], model, pretrained


def read_queries(url: str, images_root: str, storage_options: dict | None = None) -> list[dict]:
    """Query records ``{"id", "text"}`` / ``{"id", "image"}`` (JSONL or a JSON list), checked."""
    from ..select.benchmarks import read_records

    try:
        recs = read_records(read_url(url, storage_options), url)
    except FileNotFoundError:
        raise PermanentInputError(f"queries not found: {url}") from None
    out, seen = [], set()
    for n, r in enumerate(recs):
        qid = str(r.get("id", n))
        kinds = [k for k in ("text", "image") if isinstance(r.get(k), str) and r[k].strip()]
        if len(kinds) != 1 or qid in seen:
            raise PermanentInputError(f"{url}: query {n}: want a unique 'id' and exactly one of 'text' or 'image'")
        seen.add(qid)
        out.append({"id": qid, kinds[0]: r[kinds[0]]})
    if not out:
        raise PermanentInputError(f"{url}: no queries")
    return out


class RetrieveStage(Stage):
    """Top-k pool samples per query, written as this run's raw shards (see the module docstring)."""

    name = "retrieve"
    Config = RetrieveConfig
    profile = "cpu"
    image = "gpu"          # the CLIP towers need torch (the GPU image family has it; a CPU node runs it)
    produces_raw = True
    fans_out = False       # one pod: the search (query towers, the pool's embeddings) runs once, then the writes

    def __init__(self, config: RetrieveConfig, storage_options: dict | None = None):
        super().__init__(config)
        self.storage_options = storage_options
        self._manifest: dict | None = None

    @classmethod
    def create(cls, config, storage_options: dict | None = None) -> "RetrieveStage":
        return cls(config, storage_options)

    @classmethod
    def prepare_settings(cls, settings: dict, resolve) -> dict:
        for k in ("pool", "queries", "query_images", "seeds"):
            if isinstance(settings.get(k), str) and settings[k]:
                settings[k] = resolve(settings[k])
        return settings

    # -- the search, once ---------------------------------------------------------------------
    def _hash(self) -> str:
        return config_hash(self.name, self.config.hash_dict(), None)

    def prepare(self, ctx: StageContext, fanout_batch: bool = False) -> None:
        store = ctx.store
        pool_store = open_store(self.config.pool, self.storage_options)
        if pool_store.url.rstrip("/") == store.url.rstrip("/"):
            raise PermanentInputError(f"retrieve: the pool {self.config.pool} is this run's own prefix; its raw/ "
                                      "is what retrieve writes. Give the pool run's prefix and a new one here")
        pool_shards = raw_shards(pool_store)
        if store.exists(MANIFEST):
            m = json.loads(store.read_text(MANIFEST))
            if m["hash"] != self._hash():
                raise PermanentInputError(f"{store.uri('raw')} was written by retrieve with another config "
                                          f"({m['config']}); use a new storage prefix")
            if m["pool_shards"] != pool_shards:
                raise PermanentInputError(f"the pool {self.config.pool} changed since {store.uri('raw')} was "
                                          "written; use a new storage prefix")
            self._manifest = m
            return
        self._manifest = self.search(pool_shards)
        store.write_text(MANIFEST, json.dumps(self._manifest, sort_keys=True, indent=1))

    def search(self, pool_shards: list[str]) -> dict:
        """Embed the queries, search the pool, lay the hits out in pool order."""
        import tempfile

        c = self.config
        with tempfile.TemporaryDirectory(prefix="curate-retrieve-") as scratch:
            t, pool, model, pretrained = read_embeddings(c.pool, c.pool_stage, "pool", scratch, self.storage_options)
            if c.model and (c.model, c.pretrained or None) != (model, pretrained):
                raise PermanentInputError(f"model {c.model}/{c.pretrained} differs from the pool's embeddings "
                                          f"({model}/{pretrained}): queries and pool must share one CLIP model")
            labels, vectors = self._queries(model, pretrained, scratch)
            rows = np.flatnonzero(t.present["emb.img_emb"])
            scores, idx = search_topk(pool, vectors, c.k, rows, c.block_rows)
            hits: dict[int, list] = {}
            for qi in range(len(labels)):
                for rank, (s, r) in enumerate(zip(scores[qi].tolist(), idx[qi].tolist()), 1):
                    if c.min_score is None or s >= c.min_score:
                        hits.setdefault(int(r), []).append({**labels[qi], "score": round(float(s), 6), "rank": rank})
            shard_of = np.searchsorted(t.shard_offsets, np.array(sorted(hits), np.int64), side="right") - 1
            entries = [[t.shards[int(si)], t.keys[r].decode(), hits[r]] for r, si in zip(sorted(hits), shard_of)]
        n_shards = max(1, -(-len(entries) // c.shard_size))
        return {"hash": self._hash(), "config": c.to_dict(), "pool": c.pool, "pool_shards": pool_shards,
                "model": model, "pretrained": pretrained, "n_queries": len(labels), "entries": entries,
                "n_records": len(entries), "n_shards": n_shards}

    def _queries(self, model: str, pretrained: str | None, scratch: str) -> tuple[list[dict], np.ndarray]:
        c = self.config
        labels, parts = [], []
        if c.queries:
            qs = read_queries(c.queries, c.query_images, self.storage_options)
            from ..images import ImageProblem, open_images
            from ..models.clip import load_clip

            bundle = load_clip(model, pretrained, c.device)
            texts = [q for q in qs if "text" in q]
            if texts:
                parts.append(encode_texts(bundle, [q["text"] for q in texts]))
                labels += [{"query_id": q["id"], "query": q["text"]} for q in texts]
            images = [q for q in qs if "image" in q]
            if images:
                src = open_images(c.query_images or os.path.dirname(c.queries), self.storage_options)
                try:
                    data = [src.read(q["image"]) for q in images]
                except ImageProblem as e:
                    raise PermanentInputError(f"query image: {e.reason}: {e.detail}") from None
                parts.append(encode_images(bundle, data))
                labels += [{"query_id": q["id"], "query": f"image:{q['image']}"} for q in images]
        if c.seeds:
            t, emb, smodel, spre = read_embeddings(c.seeds, c.seeds_stage, "seeds", scratch, self.storage_options)
            if (smodel, spre) != (model, pretrained):
                raise PermanentInputError(f"seeds were embedded with {smodel}/{spre}, "
                                          f"the pool with {model}/{pretrained}")
            rows = np.flatnonzero(t.present["emb.img_emb"])
            parts.append(np.asarray(emb[rows], np.float32))
            labels += [{"query_id": f"seed:{t.keys[r].decode()}", "query": f"seed:{t.keys[r].decode()}"} for r in rows]
        return labels, np.concatenate(parts).astype(np.float32)

    # -- writing the raw shards -------------------------------------------------------------------
    def units(self, ctx: StageContext) -> list[str]:
        if self._manifest is None:
            self.prepare(ctx)
        return [shard_name(i) for i in range(self._manifest["n_shards"])]

    def process_shard(self, ctx: StageContext, shard: str) -> dict:
        if self._manifest is None:
            self.prepare(ctx, fanout_batch=True)
        m, c = self._manifest, self.config
        i = int(unit_of(shard).split("-")[1])
        entries = m["entries"][i * c.shard_size:(i + 1) * c.shard_size]
        pool = open_store(c.pool, self.storage_options)
        out = ShardOutput(ctx.store, ctx.raw_prefix, unit_of(shard))
        written = []
        try:
            found = {}
            for pool_shard in dict.fromkeys(e[0] for e in entries):
                want = {e[1] for e in entries if e[0] == pool_shard}
                for s in iter_samples(pool, f"raw/{pool_shard}"):
                    if s.key in want:
                        found[s.key] = s
            for pool_shard, key, hits in entries:
                s = found.get(key)
                if s is None:
                    out.quarantine(key, "pool_sample_missing", f"{key} is no longer in {c.pool}/raw/{pool_shard}")
                    continue
                s.metadata = {**s.metadata, "retrieved": {"pool": c.pool, "pool_key": key, "pool_shard": pool_shard,
                                                          "hits": hits}}
                out.writer.write_sample(s)
                out.count_out()
                out.add_columns(s.key, raw_leaves(s))
                written.append(dataclasses.replace(s, images=[dataclasses.replace(im, data=None) for im in s.images]))
            ctx.store.write_bytes(index_rel(f"{ctx.raw_prefix}/{shard}"), index_bytes(written))
            return out.finish(len(entries))
        except BaseException as e:
            out.abort(e)
            raise
