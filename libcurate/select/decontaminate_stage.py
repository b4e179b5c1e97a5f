"""The ``decontaminate`` stage: mark training samples that show a benchmark image or ask a benchmark question.

Score once, decide later: this stage writes evidence per sample and drops nothing; ``select`` drops every
sample it marked, with the reason ``contaminated: <benchmark>/<item> ...`` (rule 1b of
:mod:`libcurate.select.stage`), so the decision sits with every other drop in the decision files, the
export and the audit. Sidecar per sample::

    {"hit": true, "reason": "pope/000123 image phash dist 2",
     "image_item": "pope/000123", "image_distance": 2,          # nearest benchmark image (always)
     "question_item": "mme/artwork/10002#0", "question_overlap": 0.4,   # best overlapping question, if any
     "embedding_item": "pope/000123", "embedding_cosine": 0.97}         # with ``embedding``: nearest by CLIP

Image hashes are computed here (a decode per image) unless ``hashes`` names an earlier ``hash_image``
stage, whose stored pHashes are read instead (no image bytes are read at all: the record index gives the
questions). ``image_distance`` / ``question_overlap`` are stored for every sample, so a threshold can be
studied (or applied in ``select`` as ``decontaminate.image_distance: {min: ...}``) without re-hashing.

The benchmarks (layouts in :mod:`libcurate.select.benchmarks`) are indexed once per content
(:mod:`libcurate.select.benchmark_index`: ``benchmark_index/<index_key>`` in the run's store, read by every
shard and pod). ``index_key`` hashes the benchmark settings, the
items (ids, image names, questions) and the images' byte sizes; it is filled in when the recipe is
planned and is part of the config hash, so an edited benchmark file re-checks every shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ..columns import KEY_COL, read_columns
from ..shards import iter_samples
from ..stage import PermanentInputError, Reads, ShardOutput, Stage, StageConfig, StageContext, unit_of
from .benchmark_index import BenchmarkIndex, build_index, fingerprint, load_index, save_index
from .benchmarks import LAYOUTS
from .decontaminate import match_question, nearest_hashes
from .dedup import PHASH_MAX_DISTANCE, phash

MARKER = "_decontaminate.json"   # in the stage's prefix: tells select to drop what this stage marks
MATCH = ("image", "question")
_BENCH_KEYS = {"name", "layout", "questions", "images", "root", "id_field", "image_field", "text_field", "match"}


def _benchmark(b) -> dict:
    if not isinstance(b, dict) or not b.get("name") or b.get("layout", "jsonl") not in LAYOUTS:
        raise ValueError(f"benchmarks: want {{name, layout: {'|'.join(LAYOUTS)}, ...}}, got {b!r}")
    unknown = sorted(set(b) - _BENCH_KEYS)
    if unknown:
        raise ValueError(f"benchmark {b['name']!r}: unknown setting(s) {unknown}; known: {sorted(_BENCH_KEYS)}")
    out = {"name": str(b["name"]), "layout": b.get("layout", "jsonl"), "match": list(b.get("match", MATCH))}
    if "/" in out["name"]:
        raise ValueError(f"benchmark name {out['name']!r} must not contain '/'")
    if not set(out["match"]) <= set(MATCH) or not out["match"]:
        raise ValueError(f"benchmark {out['name']!r}: match must be a non-empty subset of {list(MATCH)}")
    if out["layout"] == "jsonl":
        if not b.get("questions"):
            raise ValueError(f"benchmark {out['name']!r}: the jsonl layout needs 'questions' (and 'images')")
        out.update(questions=b["questions"], images=b.get("images", ""),
                   id_field=b.get("id_field", "question_id"), image_field=b.get("image_field", "image"),
                   text_field=b.get("text_field", "text"))
        if "image" in out["match"] and not out["images"]:
            raise ValueError(f"benchmark {out['name']!r}: matching images needs 'images' (a folder, s3:// or .tar)")
    else:
        if not b.get("root"):
            raise ValueError(f"benchmark {out['name']!r}: the mme layout needs 'root'")
        out.update(root=b["root"])
    return out


@dataclass
class DecontaminateConfig(StageConfig):
    """Settings of ``decontaminate``.

    Attributes:
        benchmarks: ``[{name, layout: jsonl|mme, questions, images, root, id_field, image_field, text_field,
            match: [image, question]}]`` (see :mod:`libcurate.select.benchmarks`); ``match`` limits what is
            compared (POPE's templated questions identify nothing without the image: ``match: [image]``).
        phash_max_distance: an image within this many bits of a benchmark image is contaminated.
        ngram: words per n-gram for question overlap.
        min_overlap: a question whose informative n-gram overlap with a benchmark question reaches this
            (0-1] is contaminated.
        min_ngrams: questions with fewer informative n-grams are not compared.
        max_df: n-grams held by more than this share of benchmark questions (and by more than 5) are
            template n-grams, ignored.
        hashes: id of an earlier ``hash_image`` stage whose pHashes to use (empty: hash the images here).
        embedding: id of an earlier ``score_clip`` stage: also match images by CLIP cosine between its stored
            image embeddings and the benchmark images embedded by the same model (catches crops and colour
            changes pHash misses; runs the image tower, so the stage then needs the GPU image family).
        min_cosine: the cosine at or above which an image matches a benchmark image by embedding.
        index_key: content hash of the benchmarks (filled in; part of the config hash).
    """

    benchmarks: list = field(default_factory=list)
    phash_max_distance: int = PHASH_MAX_DISTANCE
    ngram: int = 3
    min_overlap: float = 0.6
    min_ngrams: int = 3
    max_df: float = 0.05
    hashes: str = ""
    embedding: str = ""
    min_cosine: float = 0.95
    index_key: str = ""

    def __post_init__(self):
        if not isinstance(self.benchmarks, (list, tuple)) or not self.benchmarks:
            raise ValueError("benchmarks: want a non-empty list")
        self.benchmarks = [_benchmark(b) for b in self.benchmarks]
        names = [b["name"] for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must be distinct, got {names}")
        if not 0 <= self.phash_max_distance <= 64:
            raise ValueError("phash_max_distance must be in 0..64")
        if self.ngram < 1 or self.min_ngrams < 1:
            raise ValueError("ngram and min_ngrams must be >= 1")
        if not 0 < self.min_overlap <= 1 or not 0 < self.max_df <= 1 or not 0 < self.min_cosine <= 1:
            raise ValueError("min_overlap, max_df and min_cosine must be in (0, 1]")
        if not self.index_key:
            self.index_key = self.fingerprint()

    def fingerprint(self) -> str:
        """Hash of what the index is built from: settings, items and the images' byte sizes."""
        return fingerprint(self.benchmarks, self.ngram, self.max_df)


class DecontaminateStage(Stage):
    """Benchmark image and question matches per sample (sidecar: see the module docstring)."""

    name = "decontaminate"
    Config = DecontaminateConfig

    def __init__(self, config: DecontaminateConfig):
        super().__init__(config)
        self._index: BenchmarkIndex | None = None

    @classmethod
    def reads(cls, config: DecontaminateConfig) -> Reads:
        e = config.embedding
        return Reads.of(fields=[f"{e}.model"] if e else [], embeddings=[f"{e}.img_emb"] if e else [],
                        stages=[config.hashes] if config.hashes else [])

    @classmethod
    def image_for(cls, config) -> str:
        return "gpu" if config.embedding else super().image_for(config)

    @classmethod
    def prepare_settings(cls, settings: dict, resolve) -> dict:
        if isinstance(settings.get("benchmarks"), list):  # copies: the recipe's own dicts stay as written
            settings["benchmarks"] = [
                {k: resolve(v) if k in ("questions", "images", "root") and isinstance(v, str) and v else v
                 for k, v in b.items()} if isinstance(b, dict) else b for b in settings["benchmarks"]]
        return settings

    def index(self, ctx: StageContext) -> BenchmarkIndex:
        """The benchmark index: from the store, or built once and stored."""
        if self._index is None:
            key = self.config.index_key
            self._index = load_index(ctx.store, key)
            if self._index is None:
                c = self.config
                idx, stats = build_index(c.benchmarks, c.ngram, c.max_df)
                save_index(ctx.store, key, idx, stats)
                self._index = idx
        return self._index

    def prepare(self, ctx: StageContext, fanout_batch: bool = False) -> None:
        rel = f"{ctx.prefix}/{MARKER}"
        if not ctx.store.exists(rel):
            ctx.store.write_text(rel, json.dumps({"index_key": self.config.index_key,
                                                  "benchmarks": [b["name"] for b in self.config.benchmarks]}))
        if not fanout_batch:
            self.index(ctx)  # the run (or an Argo list step) builds it once; the fan-out's pods load it

    def before_fork(self, ctx: StageContext, todo: list[str]) -> None:
        self.index(ctx)  # built once in the parent, shared by the workers

    def stored_hashes(self, ctx: StageContext, shard: str) -> dict[str, np.ndarray]:
        """key -> uint64 pHashes of every image, from the ``hashes`` stage's columns for ``shard``."""
        sid = self.config.hashes
        prefix = ctx.upstream.get(sid, "")
        if not prefix.startswith("stages/") or not ctx.store.exists(f"{prefix}/_done/{unit_of(shard)}"):
            raise PermanentInputError(f"decontaminate.hashes: {sid!r} has not completed {shard} ({prefix or 'absent'})")
        cols = read_columns(ctx.store, prefix, shard)
        names = sorted((k for k in cols if k.startswith("s:phash_all.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        if not names:
            raise PermanentInputError(f"decontaminate.hashes: {sid!r} stores no phash_all (not a hash_image stage?)")
        rows = zip(*(cols[k].tolist() for k in names))
        return {key.decode(): np.array([int(h, 16) for h in row if h], np.uint64)
                for key, row in zip(cols[KEY_COL].tolist(), rows)}

    def sample_embeddings(self, ctx: StageContext, shard: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """key -> the ``embedding`` stage's pooled image embedding for ``shard``'s samples, and the
        benchmark images' embeddings by the same model."""
        import tempfile

        from ..columns import gather
        from .benchmark_index import image_embeddings

        sid = self.config.embedding
        with tempfile.TemporaryDirectory(prefix="curate-decontaminate-") as scratch:
            t = gather(ctx, fields=[f"{sid}.model", f"{sid}.pretrained"], embeddings=[f"{sid}.img_emb"],
                       scratch=scratch, shards=[shard], quarantine_from=[])
            present = np.flatnonzero(t.present[f"{sid}.img_emb"])
            rows = {t.keys[i].decode(): np.asarray(t.embeddings[f"{sid}.img_emb"][i], np.float32) for i in present}
        if not rows:
            return rows, np.zeros((0, 0), np.float32)
        model = t.values[f"{sid}.model"][present[0]].decode()
        pre = t.values[f"{sid}.pretrained"]
        pretrained = (pre[present[0]].decode() or None) if pre.dtype.kind == "S" else None
        return rows, image_embeddings(ctx.store, self.config.index_key, self.index(ctx), self.config.benchmarks,
                                      model, pretrained, ctx.device)

    def process_shard(self, ctx: StageContext, shard: str) -> dict:
        idx = self.index(ctx)
        stored = self.stored_hashes(ctx, shard) if self.config.hashes else None
        embs, bench_emb = self.sample_embeddings(ctx, shard) if self.config.embedding else ({}, None)
        out = ShardOutput(ctx.store, ctx.prefix, unit_of(shard))
        n = 0
        try:
            # with stored hashes only the record index is read (no image bytes)
            for s in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}", with_images=stored is None):
                n += 1
                if stored is not None:
                    hashes = stored.get(s.key)
                    if hashes is None or len(hashes) != len(s.images):
                        out.quarantine(s.key, "no_image_hash", f"{self.config.hashes} holds no pHash for every image")
                        continue
                else:
                    try:
                        hashes = np.array([phash(im.data) for im in s.images], np.uint64)
                    except ValueError as e:  # ingest verified the images; a failure here is still not silent
                        out.quarantine(s.key, "undecodable_image", str(e))
                        continue
                rec = self.check(idx, hashes, [t.value for t in s.conversations if t.role == "human"])
                if bench_emb is not None and s.key in embs and len(bench_emb):
                    self.check_embedding(rec, idx, embs[s.key], bench_emb)
                out.write_json(s.key, rec)
            return out.finish(n)
        except BaseException as e:
            out.abort(e)
            raise

    def check(self, idx: BenchmarkIndex, hashes: np.ndarray, questions: list[str]) -> dict:
        """The sidecar of one sample: its images' pHashes and its human turns against the index."""
        c = self.config
        rec: dict = {"hit": False}
        reasons = []
        if len(idx.image_hashes):
            pos, dist = nearest_hashes(hashes, idx.image_hashes)
            j = int(np.argmin(dist))
            item, d = idx.items[idx.image_item[pos[j]]], int(dist[j])
            rec.update(image_item=item, image_distance=d)
            if d <= c.phash_max_distance:
                reasons.append(f"{item} image phash dist {d}")
        best_q, best_o = -1, 0.0
        for q in questions:
            qi, o = match_question(idx.questions, q, c.ngram, c.min_ngrams)
            if o > best_o:
                best_q, best_o = qi, o
        if best_q >= 0:
            item = idx.items[idx.question_item[best_q]]
            rec.update(question_item=item, question_overlap=round(best_o, 4))
            if best_o >= c.min_overlap:
                reasons.append(f"{item} question {c.ngram}-gram overlap {best_o:.2f}")
        if reasons:
            rec.update(hit=True, reason="; ".join(reasons))
        return rec

    def check_embedding(self, rec: dict, idx: BenchmarkIndex, emb: np.ndarray, bench_emb: np.ndarray) -> None:
        """Add the nearest benchmark image by CLIP cosine to a sample's sidecar ``rec`` (a hit at ``min_cosine``)."""
        v = emb / max(float(np.linalg.norm(emb)), 1e-12)
        cos = bench_emb @ v
        j = int(np.argmax(cos))
        item, c = idx.items[idx.image_item[j]], float(cos[j])
        rec.update(embedding_item=item, embedding_cosine=round(c, 4))
        if c >= self.config.min_cosine:
            why = f"{item} image clip cos {c:.3f}"
            rec.update(hit=True, reason=f"{rec['reason']}; {why}" if rec.get("reason") else why)
