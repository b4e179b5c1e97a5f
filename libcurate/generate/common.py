"""What the generation stages share: the generated-item format, :func:`materialize`, and the stage base.

Data model. A generation stage is a per-shard stage over the raw samples. It never writes images: its
sidecar ``{key}.json`` holds what was generated *from* that raw sample::

    {"generated": [                      # valid items, in request order
        {"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}],
         "type": "judge" | "choice" | "long" | "short" | "caption" | "positive" | "negative",
         "task": "...", "domain": "..." | null,
         "provenance": {"stage", "generator_model", "prompt_version", "cache_key", "index"}}],
     "rejected": [{"reason", "detail", "type", "raw"}],   # item-level quarantine: malformed items
     "n_generated": int, "n_rejected": int, "model": str, "prompt_versions": [...]}

A raw sample for which nothing valid was generated (every item malformed, every call failed, missing
inputs) is quarantined with the reason.

Generated samples are first-class. Once a source shard's records are in, the stage turns every valid item
into a real :class:`~libcurate.records.Sample` (:func:`materialize`: same images, a content-hash key,
provenance in ``metadata``) and writes them as a **new raw shard of the same run**,
``raw/gen-<stage id>-<cfg>-<source unit>.tar`` (record index and raw columns as ingest writes them; its
``_quarantine`` lists the rejected items with their reasons, so ``in`` = items generated + rejected),
*before* the stage's own done marker. Every later stage of the recipe sees those shards like ingested ones
(:meth:`~libcurate.stage.StageContext.raw_shards`): scoring, judging, GAVIE, dedup, selection, export. A
stage before the generator does not see them, and a generator whose config changed writes a new set under
its new ``<cfg>`` while the old set is no longer seen. Generators read only source shards (nothing is
generated from generated samples). A re-run skips done shards, so it writes and sends nothing.
"""

from __future__ import annotations

import copy
import hashlib
import random
from typing import Any

from ..columns import raw_leaves
from ..llm.client import LLMResult
from ..llm.stage import LLMShardStage, Plan, Reject
from ..records import IMAGE_TOKEN, ImageRef, RecordError, Sample, Source, Turn, make_key
from ..shards import index_bytes, index_rel, iter_samples
from ..stage import ShardOutput, StageContext, gen_unit, is_generated_shard, unit_of

GENERATED_FORMAT = "generated"
# What a generated sample keeps of its parent's metadata: facts about the shared image that later stages
# read (judge_gavie's regions and image id, OCR text and tags), not the parent's annotations.
INHERITED_METADATA = ("image_id", "regions", "ocr", "tags")


def make_item(instruction: str, answer: str, type_: str, task: str | None, domain: str | None,
              provenance: dict, image_token: bool = True) -> dict:
    human = f"{IMAGE_TOKEN}\n{instruction.strip()}" if image_token else instruction.strip()
    return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer.strip()}],
            "type": type_, "task": task, "domain": domain, "provenance": provenance}


def is_generated(sample: Sample) -> bool:
    """Whether a sample was written by a generation stage (not ingested or retrieved)."""
    return sample.source.original_format == GENERATED_FORMAT and "generated_from" in sample.metadata


def materialize(sample: Sample, item: dict, stage_prefix: str | None = None) -> Sample:
    """A new, validated :class:`Sample` for one generated item of ``sample``.

    Images are shared with the raw sample (same bytes and sha256, so export writes them once per key);
    the ``<image>`` token is put in the first human turn when the item has none; the key is the content
    hash of images + new conversation (:func:`~libcurate.records.make_key`); ``source`` keeps the dataset
    and original id with ``original_format = "generated"``; ``metadata`` holds the parent's
    :data:`INHERITED_METADATA`, ``generated_from`` (the raw key) and the item's ``provenance``,
    completed with the writing stage's ``stage_id`` and ``config_hash`` and the ``parent_key`` when
    ``stage_prefix`` (``stages/<id>/<cfg>``) is given.
    """
    turns = [Turn(t["from"], t["value"]) for t in item["conversations"]]
    if sample.images and turns and not any(IMAGE_TOKEN in t.value for t in turns):
        turns[0] = Turn(turns[0].role, "\n".join([IMAGE_TOKEN] * len(sample.images) + [turns[0].value]))
    images = [ImageRef(im.format, im.sha256, im.width, im.height, im.name, im.data) for im in sample.images]
    prov = dict(item.get("provenance") or {})
    producer = prov.get("stage")
    if stage_prefix:
        _, sid, cfg = stage_prefix.strip("/").split("/")[-3:]
        prov.update(stage_id=sid, config_hash=cfg, parent_key=sample.key)
        producer = sid
    out = Sample(
        # salted with the raw key, the producing stage and the item's place: two items never share a key,
        # and the same reply gives the same key on every run (a content hash, not a counter)
        key=make_key([im.sha256 for im in images], turns, f"generated:{sample.key}:{producer}:{prov.get('index')}"),
        images=images,
        conversations=turns,
        source=Source(sample.source.dataset, sample.source.original_id, GENERATED_FORMAT),
        task=item.get("task"),
        type=item.get("type"),
        domain=item.get("domain") or sample.domain,
        metadata={**{k: copy.deepcopy(sample.metadata[k]) for k in INHERITED_METADATA if k in sample.metadata},
                  "generated_from": sample.key, "provenance": copy.deepcopy(prov)},
    )
    return out.validate()


def sample_rng(sample: Sample, salt: str) -> random.Random:
    """A per-sample RNG: the same sample draws the same seeds on every machine (so the cache hits)."""
    return random.Random(int(hashlib.sha256(f"{sample.key}|{salt}".encode()).hexdigest()[:16], 16))


class GenerateStage(LLMShardStage):
    """Base of the generation stages. A subclass returns, from :meth:`parse_reply`, the valid items and the
    rejected ones of one reply; this class assembles the sidecar, quarantines samples with no item and
    writes the generated samples as raw shards (see the module docstring)."""

    generates_raw = True

    def __init__(self, config):
        super().__init__(config)
        self._pending: dict[str, dict] = {}   # sample key -> its sidecar record, until its shard ends

    def units(self, ctx: StageContext) -> list[str]:
        """Source shards only: a generator never generates from generated samples."""
        return [s for s in ctx.raw_shards() if not is_generated_shard(s)]

    def before_finish(self, ctx: StageContext, shard: str, out: ShardOutput) -> None:
        """Write ``raw/gen-<id>-<cfg>-<unit>.tar`` from this shard's records (before the done marker)."""
        keys = list(out.columns.keys) if out.columns is not None else []
        recs = {k: self._pending.pop(k) for k in keys if k in self._pending}
        unit = gen_unit(ctx.prefix, unit_of(shard))
        gout = ShardOutput(ctx.store, ctx.raw_prefix, unit)
        written: list[Sample] = []
        n_in = 0
        try:
            for s in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}", with_images=True):
                rec = recs.pop(s.key, None)
                if rec is None:
                    continue
                for item in rec["generated"]:
                    n_in += 1
                    try:
                        g = materialize(s, item, ctx.prefix)
                    except RecordError as e:
                        gout.quarantine(f"{s.key}#{item['provenance'].get('index')}", "invalid_generated", str(e))
                        continue
                    gout.writer.write_sample(g)
                    gout.count_out()
                    gout.add_columns(g.key, raw_leaves(g))
                    written.append(copy.copy(g))
                    written[-1].images = [ImageRef(im.format, im.sha256, im.width, im.height, im.name, None)
                                          for im in g.images]
                for j, r in enumerate(rec.get("rejected", [])):  # malformed items: quarantined, not lost
                    n_in += 1
                    gout.quarantine(f"{s.key}#rejected{j}", r["reason"], f"type={r.get('type')}: {r.get('detail', '')}")
            if recs:
                raise RuntimeError(f"{shard}: {len(recs)} records whose samples are not in the raw shard")
            ctx.store.write_bytes(index_rel(f"{ctx.raw_prefix}/{unit}.tar"), index_bytes(written))
            gout.finish(n_in)
        except BaseException as e:
            gout.abort(e)
            raise
        out.extra["generated_shard"] = f"{unit}.tar"
        out.extra["generated_samples"] = gout.n_out
        out.extra["generated_rejected"] = gout.n_quarantined

    def tolerates_partial_failure(self) -> bool:
        return True  # one failed call out of four types must not discard the other three

    def parse_reply(self, sample: Sample, meta: dict, result: LLMResult) -> tuple[list[dict], list[dict]]:
        raise NotImplementedError

    def provenance(self, meta: dict, result: LLMResult, index: int) -> dict:
        return {"stage": self.name, "generator_model": result.model, "prompt_version": meta["prompt_version"],
                "cache_key": result.cache_key, "index": index}

    def record(self, sample: Sample, plan: Plan, results: list[LLMResult]) -> dict | Reject:
        generated: list[dict] = []
        rejected: list[dict] = []
        for meta, res in zip(plan.state, results):
            if not res.ok:
                rejected.append({"reason": "llm_call_failed", "type": meta.get("type"), "raw": None,
                                 "detail": f"{res.error_kind} status={res.error_status}: {(res.error or '')[:200]}"})
                continue
            if res.finish_reason == "length":
                # a cut-off reply may end mid-item; items that parsed completely are still kept
                meta = {**meta, "truncated": True}
            good, bad = self.parse_reply(sample, meta, res)
            for it in good:
                it["provenance"] = self.provenance(meta, res, len(generated))
                generated.append(it)
            for b in bad:
                b.setdefault("type", meta.get("type"))
                rejected.append(b)
        if not generated:
            reasons = sorted({r["reason"] for r in rejected}) or ["nothing_generated"]
            detail = "; ".join(f"{r['reason']}: {r.get('detail', '')}" for r in rejected[:5])
            return Reject(reasons[0] if len(reasons) == 1 else "no_valid_items", f"{reasons} {detail}"[:2000])
        rec = {"generated": generated, "rejected": rejected, "n_generated": len(generated),
               "n_rejected": len(rejected), "model": self.config.llm.model,
               "prompt_versions": sorted({m["prompt_version"] for m in plan.state})}
        self._pending[sample.key] = rec
        return rec


def reject(reason: str, detail: str = "", raw: Any = None) -> dict:
    return {"reason": reason, "detail": str(detail)[:500], "raw": raw}
