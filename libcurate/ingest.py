"""The ``ingest`` stage: annotations + images -> ``raw/shard-NNNNNN.tar`` (records and image bytes).

Record ``i`` of the annotations (in the parser's order) always lands in shard ``i // shard_size``, so the
assignment is stable across re-runs and a killed ingest resumes shard by shard. Every record ends as a
sample in its shard or as a line in that shard's ``_quarantine`` with a reason; a whole unreadable
annotations file is one quarantined entry. Beside each shard, ``raw/_index/shard-NNNNNN.jsonl`` holds
its records without image bytes (for text-only stages and selection). Keys hash the content (images + conversation) salted with the
original id and its occurrence number in the file, so they are unique across the whole dataset (exact
duplicates included) and stable across re-runs, machines and ingest -> export -> ingest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from .formats import BadRecord, RawRecord, parse_annotations
from .images import ImageLimits, ImageProblem, inspect_image, open_images
from .records import RecordError, Sample, Source, Turn, make_key
from .columns import raw_leaves
from .stage import (PermanentInputError, ShardOutput, Stage, StageConfig, StageContext, config_hash,
                    is_done, unit_of)
from .shards import index_bytes, index_rel, shard_name
from .storage import read_url

INGEST_MANIFEST = "raw/_ingest.json"


def plan_rel(raw_prefix: str, shard: str) -> str:
    """Where a fan-out's list step leaves one shard's parsed records for the pod that ingests it."""
    return f"{raw_prefix}/_plan/{unit_of(shard)}.jsonl"


def _record_line(rec, salt: str) -> bytes:
    if isinstance(rec, BadRecord):
        d = {"salt": salt, "bad": dataclasses.asdict(rec)}
    else:
        d = {"salt": salt, "rec": {**dataclasses.asdict(rec),
                                   "conversations": [[t.role, t.value] for t in rec.conversations]}}
    return json.dumps(d, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n"


def _parse_line(line: bytes):
    d = json.loads(line)
    if "bad" in d:
        return BadRecord(**d["bad"]), d["salt"]
    r = d["rec"]
    r["conversations"] = [Turn(role, value) for role, value in r["conversations"]]
    return RawRecord(**r), d["salt"]


@dataclass
class IngestConfig(StageConfig):
    """Settings of ``ingest``.

    Attributes:
        format: llava, cc_sbu_align, lrv, mminstruct or jsonl.
        annotations: the annotations file (local path or s3:// URL).
        images: the images root: a directory, an s3:// prefix, or a .tar archive.
        shard_size: samples per raw shard (records per shard, before quarantine).
        dataset: dataset name recorded in each sample's source (default: the annotations file name).
        max_pixels: larger images are quarantined as decompression bombs.
        encoding: text encoding of the annotations (utf-8; gb18030 for some InstructionGPT-4 files).
        options: format-specific parser options.
    """

    format: str = "llava"
    annotations: str = ""
    images: str = ""
    shard_size: int = 1000
    dataset: str = ""
    max_pixels: int = 80_000_000
    encoding: str = "utf-8"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        from .formats import FORMATS

        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; known: {list(FORMATS)}")
        if not self.annotations:
            raise ValueError("ingest needs 'annotations'")
        if not self.images:
            raise ValueError("ingest needs 'images'")
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")


class IngestStage(Stage):
    name = "ingest"
    Config = IngestConfig
    kind = "shard"
    profile = "ingest"          # CPU, more memory; its list step parses the annotations (tables.PROFILES)
    produces_raw = True

    def __init__(self, config: IngestConfig, storage_options: dict | None = None):
        super().__init__(config)
        self.storage_options = storage_options
        self._records: list | None = None
        self._salts: list[str] = []
        self._segments: list[list[int]] | None = None
        self._images = None

    # -- declarations and runner hooks ------------------------------------------------------
    @classmethod
    def create(cls, config, storage_options: dict | None = None) -> "IngestStage":
        return cls(config, storage_options)

    @classmethod
    def prepare_settings(cls, settings: dict, resolve) -> dict:
        for k in ("annotations", "images"):
            if isinstance(settings.get(k), str):
                settings[k] = resolve(settings[k])
        return settings

    def units(self, ctx: StageContext) -> list[str]:
        return self.shards(ctx.store)

    def prepare(self, ctx: StageContext, fanout_batch: bool = False) -> None:
        # A batch of a fan-out keeps the layout its list step fixed (jobs.plan_batches).
        self.check_manifest(ctx, extend=not fanout_batch)

    def plan_units(self, ctx: StageContext, todo: list[str]) -> None:
        self.write_plans(ctx, todo)  # each pod reads its own records instead of parsing the file

    def before_fork(self, ctx: StageContext, todo: list[str]) -> None:
        if self.needs_parse(ctx, todo):
            self.records()  # parse once, before the fork: workers inherit the records

    # -- planning ---------------------------------------------------------------------------
    def records(self) -> list:
        """Parse the annotations once (records are small; image bytes are read per shard)."""
        if self._records is None:
            c = self.config
            try:
                data = read_url(c.annotations, self.storage_options)
            except FileNotFoundError as e:
                raise PermanentInputError(f"annotations not found: {c.annotations}") from e
            opts = dict(c.options)
            if c.encoding.lower() not in ("utf-8", "utf8"):
                opts["encoding"] = c.encoding
            self._records = list(parse_annotations(c.format, data, os.path.basename(c.annotations), **opts))
            seen: dict[str, int] = {}
            for rec in self._records:
                n = seen.get(rec.original_id, 0)
                seen[rec.original_id] = n + 1
                self._salts.append(f"{rec.original_id}#{n}")
        return self._records

    def _digest(self, n: int) -> str:
        """Identity of the first ``n`` records (their ids and occurrence numbers)."""
        self.records()
        return hashlib.sha256("\n".join(self._salts[:n]).encode("utf-8")).hexdigest()

    def layout(self, store, extend: bool = True) -> list[list[int]]:
        """Segments ``[record_start, record_end, first_shard]`` mapping records to shards.

        The first ingest is one segment. When the annotations file has grown by appended records (new
        data for a scheduled re-curation), the new records form a new segment starting at a fresh shard,
        so completed shards never change; any other change to the file is refused. With ``extend=False``
        (one batch of a fan-out, whose list step already fixed the layout) records appended since are
        left for the next run, so every pod of a run uses the same layout.
        """
        if self._segments is None:
            c = self.config
            have = json.loads(store.read_text(INGEST_MANIFEST)) if store.exists(INGEST_MANIFEST) else None
            if have is not None and not extend and have.get("hash") == config_hash("ingest", c.to_dict(), None):
                # a fan-out batch: the list step validated the file and fixed the layout (no parse here)
                self._segments = [list(x) for x in have["segments"]]
                return self._segments
            n = len(self.records())
            if have is None:
                segments = [[0, n, 0]]
            else:
                if have.get("hash") != config_hash("ingest", c.to_dict(), None):
                    raise PermanentInputError(
                        f"{store.uri('raw')} was ingested with a different config ({have.get('config')}); "
                        "use a new storage prefix")
                old_n, segments = have["n_records"], [list(x) for x in have["segments"]]
                if n < old_n or self._digest(old_n) != have["records_digest"]:
                    raise PermanentInputError(
                        f"{c.annotations} changed since {store.uri('raw')} was written (records were edited or "
                        "removed, not appended); use a new storage prefix")
                if n > old_n and extend:
                    segments.append([old_n, n, self._end_shard(segments[-1])])
            self._segments = segments
        return self._segments

    def _end_shard(self, segment: list[int]) -> int:
        """One past the last shard of a segment (an empty segment still owns one, empty, shard)."""
        lo, hi, first = segment
        return first + max(1, math.ceil((hi - lo) / self.config.shard_size))

    def shard_records(self, store, idx: int) -> tuple[int, int]:
        """The record range ``[lo, hi)`` of shard ``idx``."""
        size = self.config.shard_size
        for seg in self.layout(store):
            lo, hi, first = seg
            if first <= idx < self._end_shard(seg):
                k = idx - first
                return lo + k * size, min(hi, lo + (k + 1) * size)
        raise PermanentInputError(f"shard {idx} is not part of this ingest")

    def shards(self, store) -> list[str]:
        return [shard_name(i) for i in range(self._end_shard(self.layout(store)[-1]))]

    def check_manifest(self, ctx: StageContext, extend: bool = True) -> None:
        """Record (or extend) the layout in ``raw/_ingest.json``; refuse a changed config or file.

        ``extend=False`` (a fan-out batch): an existing layout is used as it is and never rewritten.
        """
        segments = self.layout(ctx.store, extend)
        if not extend and ctx.store.exists(INGEST_MANIFEST):
            return
        n = len(self.records())
        text = json.dumps(
            {"hash": config_hash("ingest", self.config.to_dict(), None), "config": self.config.to_dict(),
             "n_records": n, "n_shards": len(self.shards(ctx.store)), "segments": segments,
             "records_digest": self._digest(n)}, indent=1, sort_keys=True)
        if not ctx.store.exists(INGEST_MANIFEST) or ctx.store.read_text(INGEST_MANIFEST) != text:
            ctx.store.write_text(INGEST_MANIFEST, text)

    def write_plans(self, ctx: StageContext, shards: list[str]) -> None:
        """Leave each shard's parsed records (with their key salts) for the pod that will ingest it, so
        a fan-out parses the annotations once, in its list step, not once per pod."""
        for shard in shards:
            lo, hi = self.shard_records(ctx.store, int(unit_of(shard).split("-")[1]))
            ctx.store.write_bytes(plan_rel(ctx.raw_prefix, shard), b"".join(
                _record_line(r, s) for r, s in zip(self.records()[lo:hi], self._salts[lo:hi])))

    def needs_parse(self, ctx: StageContext, shards: list[str]) -> bool:
        return any(not ctx.store.exists(plan_rel(ctx.raw_prefix, s)) for s in shards)

    def _shard_records(self, ctx: StageContext, shard: str) -> tuple[list, list[str]]:
        rel = plan_rel(ctx.raw_prefix, shard)
        if self._records is None and ctx.store.exists(rel):
            pairs = [_parse_line(x) for x in ctx.store.read_bytes(rel).splitlines() if x.strip()]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        lo, hi = self.shard_records(ctx.store, int(unit_of(shard).split("-")[1]))
        return self.records()[lo:hi], self._salts[lo:hi]

    # -- work -------------------------------------------------------------------------------
    def process_shard(self, ctx: StageContext, shard: str) -> dict:
        c = self.config
        if self._images is None:
            self._images = open_images(c.images, self.storage_options)
        batch, salts = self._shard_records(ctx, shard)
        limits = ImageLimits(max_pixels=c.max_pixels)
        dataset = c.dataset or os.path.splitext(os.path.basename(c.annotations))[0]
        out = ShardOutput(ctx.store, ctx.raw_prefix, unit_of(shard))
        written: list[Sample] = []
        try:
            for rec, salt in zip(batch, salts):
                if isinstance(rec, BadRecord):
                    out.quarantine(rec.original_id, rec.reason, rec.detail)
                    continue
                sample, problem = self._build(rec, salt, dataset, limits)
                if problem is not None:
                    out.quarantine(rec.original_id, problem.reason, problem.detail)
                    continue
                out.writer.write_sample(sample)
                out.count_out()
                out.add_columns(sample.key, raw_leaves(sample))
                sample.images = [dataclasses.replace(im, data=None) for im in sample.images]
                written.append(sample)
            # The record index lets text-only stages and selection skip the image bytes.
            ctx.store.write_bytes(index_rel(f"{ctx.raw_prefix}/{shard}"), index_bytes(written))
            stats = out.finish(len(batch))
            ctx.store.delete(plan_rel(ctx.raw_prefix, shard))  # served its pod
            return stats
        except BaseException as e:
            out.abort(e)
            raise

    def _build(self, rec: RawRecord, salt: str, dataset: str, limits: ImageLimits):
        try:
            images = [inspect_image(self._images.read(ref), ref, limits) for ref in rec.images]
            if not images:
                raise ImageProblem("missing_image", "record names no image")
            sample = Sample(
                key=make_key([im.sha256 for im in images], rec.conversations, salt),
                images=images, conversations=rec.conversations,
                source=Source(dataset, rec.original_id, self.config.format),
                task=rec.task, type=rec.type, domain=rec.domain, metadata=rec.metadata,
            )
            if rec.origin:  # a record curate exported earlier: keep where it first came from
                sample.source = Source(rec.origin["dataset"], rec.origin["original_id"], rec.origin["original_format"])
            sample.validate()
            return sample, None
        except ImageProblem as e:
            return None, e
        except RecordError as e:
            return None, ImageProblem("invalid_record", str(e))
