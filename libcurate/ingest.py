"""The ``ingest`` stage: annotations + images -> ``raw/shard-NNNNNN.tar`` (records and image bytes).

Records are assigned to shards in the parser's order, at most ``shard_size`` records and (about)
``shard_bytes`` bytes per shard; the layout is fixed once, before any image is read (byte sizes come
from the images source's file sizes: stat, an S3 listing, the tar index) and kept in
``raw/_ingest.json``, so the assignment is stable across re-runs and a killed ingest resumes shard by
shard. Every record ends as a sample in its shard or as a line in that shard's ``_quarantine`` with a
reason; an unreadable annotations file (or the unreadable rest of one) is one quarantined entry.

The annotations are parsed as a stream (:mod:`libcurate.formats.base`): never the whole file in memory,
as bytes or as a parsed tree. Each parsed record is kept as one compact JSON line in a local temporary
file (offsets and the key salts in memory), so a 1 GB LLaVA file is parsed in a few hundred MB. Beside each shard, ``raw/_index/shard-NNNNNN.jsonl`` holds
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
import tempfile
from array import array
from dataclasses import dataclass, field

from .formats import BadRecord, RawRecord, parse_annotations
from .images import ImageLimits, ImageProblem, inspect_image, open_images
from .records import RecordError, Sample, Source, Turn, make_key
from .columns import raw_leaves
from .stage import (PermanentInputError, ShardOutput, Stage, StageConfig, StageContext, config_hash,
                    is_done, unit_of)
from .shards import index_bytes, index_rel, shard_name
from .storage import open_url

INGEST_MANIFEST = "raw/_ingest.json"
DEFAULT_SHARD_BYTES = 1 << 30


def plan_rel(raw_prefix: str, shard: str) -> str:
    """Where a fan-out's list step leaves one shard's parsed records for the pod that ingests it."""
    return f"{raw_prefix}/_plan/{unit_of(shard)}.jsonl"


def clean_text(s: str) -> str:
    """``s`` made encodable as UTF-8 (lone surrogates escaped as ``\\udXXX``): ids and details of bad
    records end up in JSON files and must not fail to encode."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _record_line(rec, salt: str) -> bytes:
    if isinstance(rec, BadRecord):
        d = {"salt": salt, "bad": dataclasses.asdict(rec)}
    else:  # the fields of RawRecord (dataclasses.asdict deep-copies: too slow for millions of records)
        d = {"salt": salt, "rec": {
            "original_id": rec.original_id, "images": rec.images,
            "conversations": [[t.role, t.value] for t in rec.conversations], "task": rec.task,
            "type": rec.type, "domain": rec.domain, "metadata": rec.metadata, "origin": rec.origin}}
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
        shard_bytes: also start a new raw shard before one would pass this many bytes (the source image
            files' sizes plus the record JSON, known before images are read; a record larger than this
            gets a shard of its own); 0 = no byte limit. Default 1 GiB.
        dataset: dataset name recorded in each sample's source (default: the annotations file name).
        max_pixels: larger images are quarantined as decompression bombs.
        encoding: text encoding of the annotations (utf-8; gb18030 for some InstructionGPT-4 files).
        options: format-specific parser options.
    """

    format: str = "llava"
    annotations: str = ""
    images: str = ""
    shard_size: int = 1000
    shard_bytes: int = DEFAULT_SHARD_BYTES
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
        if self.shard_bytes < 0:
            raise ValueError("shard_bytes must be >= 0 (0 = no byte limit)")

    # Settings added after runs existed enter the config (and so its hash and every downstream prefix)
    # only when they differ from their default, so existing runs keep their prefixes.
    _LATER = {"shard_bytes": DEFAULT_SHARD_BYTES}

    def to_dict(self) -> dict:
        d = super().to_dict()
        for k, default in self._LATER.items():
            if d.get(k) == default:
                del d[k]
        return d

    def hash_dict(self) -> dict:
        d = super().hash_dict()
        for k, default in self._LATER.items():
            if d.get(k) == default:
                del d[k]
        return d


class IngestStage(Stage):
    name = "ingest"
    Config = IngestConfig
    kind = "shard"
    profile = "ingest"          # CPU, more memory; its list step parses the annotations (tables.PROFILES)
    produces_raw = True

    def __init__(self, config: IngestConfig, storage_options: dict | None = None):
        super().__init__(config)
        self.storage_options = storage_options
        self._records: ParsedRecords | None = None
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
    def records(self) -> "ParsedRecords":
        """Parse the annotations once, as a stream (image bytes are read per shard)."""
        if self._records is None:
            c = self.config
            opts = dict(c.options)
            if c.encoding.lower() not in ("utf-8", "utf8"):
                opts["encoding"] = c.encoding
            try:
                f = open_url(c.annotations, self.storage_options)
            except FileNotFoundError as e:
                raise PermanentInputError(f"annotations not found: {c.annotations}") from e
            parsed = ParsedRecords(with_refs=c.shard_bytes > 0)
            try:
                with f:
                    seen: dict[str, int] = {}
                    for rec in parse_annotations(c.format, f, os.path.basename(c.annotations), **opts):
                        if isinstance(rec, BadRecord):
                            rec.original_id, rec.detail = clean_text(rec.original_id), clean_text(rec.detail)
                        n = seen.get(rec.original_id, 0)
                        seen[rec.original_id] = n + 1
                        parsed.add(rec, f"{rec.original_id}#{n}")
                parsed.flush()  # all on disk before the runner forks: children only read (pread)
            except BaseException:
                parsed.close()
                raise
            self._records = parsed
        return self._records

    def _digest(self, n: int) -> str:
        """Identity of the first ``n`` records (their ids and occurrence numbers)."""
        return self.records().digest(n)

    def layout(self, store, extend: bool = True) -> list[list]:
        """Segments ``[record_start, record_end, first_shard]`` (shards of ``shard_size`` records) or,
        where ``shard_bytes`` cut some shard short, ``[record_start, record_end, first_shard, starts]``
        with every shard's first record, mapping records to shards.

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
                segments = [self._segment(0, n, 0)]
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
                    segments.append(self._segment(old_n, n, self._end_shard(segments[-1])))
            self._segments = segments
        return self._segments

    def _segment(self, lo: int, hi: int, first: int) -> list:
        """Lay records ``[lo, hi)`` out from shard ``first``: a new shard starts when the current one
        holds ``shard_size`` records, or when the next record would take it past ``shard_bytes``."""
        c = self.config
        if c.shard_bytes <= 0 or hi <= lo:
            return [lo, hi, first]
        weights = self.records().weights(lo, hi, self._image_source())
        starts, count, size = [lo], 0, 0
        for i, w in enumerate(weights, start=lo):
            if count and (count >= c.shard_size or size + w > c.shard_bytes):
                starts.append(i)
                count = size = 0
            count += 1
            size += w
        if starts == list(range(lo, hi, c.shard_size)):
            return [lo, hi, first]  # no shard was cut short by bytes: the plain layout
        return [lo, hi, first, starts]

    def _image_source(self):
        if self._images is None:
            self._images = open_images(self.config.images, self.storage_options)
        return self._images

    def _end_shard(self, segment: list) -> int:
        """One past the last shard of a segment (an empty segment still owns one, empty, shard)."""
        if len(segment) > 3:
            return segment[2] + len(segment[3])
        lo, hi, first = segment
        return first + max(1, math.ceil((hi - lo) / self.config.shard_size))

    def shard_records(self, store, idx: int) -> tuple[int, int]:
        """The record range ``[lo, hi)`` of shard ``idx``."""
        size = self.config.shard_size
        for seg in self.layout(store):
            lo, hi, first = seg[:3]
            if first <= idx < self._end_shard(seg):
                k = idx - first
                if len(seg) > 3:
                    starts = seg[3]
                    return starts[k], starts[k + 1] if k + 1 < len(starts) else hi
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
            ctx.store.write_bytes(plan_rel(ctx.raw_prefix, shard), self.records().lines(lo, hi))

    def needs_parse(self, ctx: StageContext, shards: list[str]) -> bool:
        return any(not ctx.store.exists(plan_rel(ctx.raw_prefix, s)) for s in shards)

    def _shard_records(self, ctx: StageContext, shard: str) -> tuple[list, list[str]]:
        rel = plan_rel(ctx.raw_prefix, shard)
        if self._records is None and ctx.store.exists(rel):
            data = ctx.store.read_bytes(rel)
        else:
            lo, hi = self.shard_records(ctx.store, int(unit_of(shard).split("-")[1]))
            data = self.records().lines(lo, hi)
        pairs = [_parse_line(x) for x in data.splitlines() if x.strip()]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    # -- work -------------------------------------------------------------------------------
    def process_shard(self, ctx: StageContext, shard: str) -> dict:
        c = self.config
        self._image_source()
        batch, salts = self._shard_records(ctx, shard)
        limits = ImageLimits(max_pixels=c.max_pixels)
        dataset = c.dataset or os.path.splitext(os.path.basename(c.annotations))[0]
        out = ShardOutput(ctx.store, ctx.raw_prefix, unit_of(shard))
        written: list[Sample] = []
        try:
            for rec, salt in zip(batch, salts):
                if isinstance(rec, BadRecord):
                    out.quarantine(clean_text(rec.original_id), rec.reason, clean_text(rec.detail))
                    continue
                sample, problem = self._build(rec, salt, dataset, limits)
                if problem is not None:
                    out.quarantine(clean_text(rec.original_id), problem.reason, clean_text(problem.detail))
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


class ParsedRecords:
    """Every parsed record as one compact JSON line (:func:`_record_line`, key salt included) in an
    unlinked local temporary file; in memory only offsets, the salts (for the records digest) and, for
    byte-sized layouts, each record's image references as indices into a table of distinct names.

    Reads use ``os.pread``, so processes forked after parsing share the file safely. ``len()`` is the
    record count; ``[lo:hi]`` returns those records.
    """

    def __init__(self, with_refs: bool = False):
        self._f = tempfile.TemporaryFile(prefix="curate-ingest-")
        self._buf = bytearray()
        self._offsets = array("Q", [0])
        self._salts = bytearray()          # "\n".join(salts), UTF-8
        self._salt_ends = array("Q")
        self._with_refs = with_refs
        self._ref_ids: dict[str, int] = {}
        self._refs = array("I")           # per record: its references' ids ...
        self._ref_starts = array("Q", [0])  # ... record i's are _refs[_ref_starts[i]:_ref_starts[i + 1]]

    def add(self, rec, salt: str) -> None:
        line = _record_line(rec, salt)
        self._buf += line
        self._offsets.append(self._offsets[-1] + len(line))
        if len(self._buf) >= 1 << 20:
            self.flush()
        if self._salt_ends:
            self._salts += b"\n"
        self._salts += salt.encode("utf-8")
        self._salt_ends.append(len(self._salts))
        if self._with_refs:
            for ref in rec.images if isinstance(rec, RawRecord) else ():
                self._refs.append(self._ref_ids.setdefault(ref, len(self._ref_ids)))
            self._ref_starts.append(len(self._refs))

    def flush(self) -> None:
        if self._buf:
            self._f.seek(0, os.SEEK_END)
            self._f.write(self._buf)
            self._f.flush()
            self._buf = bytearray()

    def close(self) -> None:
        self._f.close()

    def __len__(self) -> int:
        return len(self._salt_ends)

    def digest(self, n: int) -> str:
        """sha256 of the first ``n`` salts joined by newlines."""
        return hashlib.sha256(bytes(self._salts[:self._salt_ends[n - 1]]) if n else b"").hexdigest()

    def lines(self, lo: int, hi: int) -> bytes:
        """The JSON lines of records ``[lo, hi)``."""
        self.flush()
        start, size = self._offsets[lo], self._offsets[hi] - self._offsets[lo]
        parts, fd = [], self._f.fileno()
        while size > 0:
            chunk = os.pread(fd, size, start)
            if not chunk:
                raise RuntimeError("the parsed-records spill file ended early")
            parts.append(chunk)
            start += len(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def __getitem__(self, sl: slice) -> list:
        lo, hi, _ = sl.indices(len(self))
        return [_parse_line(x)[0] for x in self.lines(lo, hi).splitlines()]

    def weights(self, lo: int, hi: int, images) -> list[int]:
        """Estimated raw-shard bytes of records ``[lo, hi)``: the record's JSON plus the source file
        size of each image it names (0 for images that cannot be found: they will be quarantined)."""
        if not self._with_refs:
            raise RuntimeError("records were parsed without their image references")
        names = list(self._ref_ids)
        ids = sorted({self._refs[j] for j in range(self._ref_starts[lo], self._ref_starts[hi])})
        sizes = images.sizes([names[k] for k in ids])
        by_id = {k: sizes.get(names[k], 0) for k in ids}
        return [self._offsets[i + 1] - self._offsets[i] +
                sum(by_id[self._refs[j]] for j in range(self._ref_starts[i], self._ref_starts[i + 1]))
                for i in range(lo, hi)]
