"""The ``hash_image`` stage: a 64-bit perceptual hash (pHash) of every image, per shard, model-free.

Sidecar per sample: ``{"phash": "<16 hex digits of the first image>", "phash_all": [...one per image]}``.
The global ``dedup`` stage groups samples whose hashes differ in at most a few bits (resized, re-encoded,
slightly cropped copies). Hashing is the expensive part (decode + DCT, a few ms an image), so it is a
per-shard stage that fans out; the grouping over every sample is one light fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..shards import iter_samples
from ..stage import ShardOutput, Stage, StageConfig, StageContext, unit_of
from .dedup import phash


@dataclass
class HashImageConfig(StageConfig):
    """Settings of ``hash_image`` (none yet: pHash with an 8x8 DCT, 64 bits, is the one hash)."""


class HashImageStage(Stage):
    name = "hash_image"
    Config = HashImageConfig

    def process_shard(self, ctx: StageContext, shard: str) -> dict:
        out = ShardOutput(ctx.store, ctx.prefix, unit_of(shard))
        n = 0
        try:
            for s in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}"):
                n += 1
                try:
                    hashes = [f"{phash(im.data):016x}" for im in s.images]
                except ValueError as e:  # ingest verified the images; a failure here is still not silent
                    out.quarantine(s.key, "undecodable_image", str(e))
                    continue
                out.write_json(s.key, {"phash": hashes[0], "phash_all": hashes})
            return out.finish(n)
        except BaseException as e:
            out.abort(e)
            raise
