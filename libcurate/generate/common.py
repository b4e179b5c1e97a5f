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
inputs) is quarantined with the reason. :func:`materialize` turns ``(raw sample, generated item)`` into a
real :class:`~libcurate.records.Sample` (same images, new content key, provenance in ``metadata``), which
is what export (or a later ingest of generated data) calls.
"""

from __future__ import annotations

import copy
import hashlib
import random
from typing import Any

from ..records import IMAGE_TOKEN, ImageRef, Sample, Source, Turn, make_key
from ..llm.client import LLMResult
from ..llm.stage import LLMShardStage, Plan, Reject

GENERATED_FORMAT = "generated"


def make_item(instruction: str, answer: str, type_: str, task: str | None, domain: str | None,
              provenance: dict, image_token: bool = True) -> dict:
    human = f"{IMAGE_TOKEN}\n{instruction.strip()}" if image_token else instruction.strip()
    return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer.strip()}],
            "type": type_, "task": task, "domain": domain, "provenance": provenance}


def materialize(sample: Sample, item: dict) -> Sample:
    """A new, validated :class:`Sample` for one generated item of ``sample``.

    Images are shared with the raw sample (same bytes and sha256, so export writes them once per key);
    the ``<image>`` token is put in the first human turn when the item has none; the key is the content
    hash of images + new conversation (:func:`~libcurate.records.make_key`); ``source`` keeps the dataset
    and original id with ``original_format = "generated"``; ``metadata`` holds ``generated_from`` (the raw
    key) and the item's ``provenance``.
    """
    turns = [Turn(t["from"], t["value"]) for t in item["conversations"]]
    if sample.images and turns and not any(IMAGE_TOKEN in t.value for t in turns):
        turns[0] = Turn(turns[0].role, "\n".join([IMAGE_TOKEN] * len(sample.images) + [turns[0].value]))
    images = [ImageRef(im.format, im.sha256, im.width, im.height, im.name, im.data) for im in sample.images]
    prov = item.get("provenance") or {}
    out = Sample(
        # salted with the raw key and the item's place, so two items can never share a key
        key=make_key([im.sha256 for im in images], turns, f"generated:{sample.key}:{prov.get('stage')}:{prov.get('index')}"),
        images=images,
        conversations=turns,
        source=Source(sample.source.dataset, sample.source.original_id, GENERATED_FORMAT),
        task=item.get("task"),
        type=item.get("type"),
        domain=item.get("domain") or sample.domain,
        metadata={"generated_from": sample.key, "provenance": copy.deepcopy(prov)},
    )
    return out.validate()


def sample_rng(sample: Sample, salt: str) -> random.Random:
    """A per-sample RNG: the same sample draws the same seeds on every machine (so the cache hits)."""
    return random.Random(int(hashlib.sha256(f"{sample.key}|{salt}".encode()).hexdigest()[:16], 16))


class GenerateStage(LLMShardStage):
    """Base of the generation stages. A subclass returns, from :meth:`parse_reply`, the valid items and the
    rejected ones of one reply; this class assembles the sidecar and quarantines samples with no item."""

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
        return {"generated": generated, "rejected": rejected, "n_generated": len(generated),
                "n_rejected": len(rejected), "model": self.config.llm.model,
                "prompt_versions": sorted({m["prompt_version"] for m in plan.state})}


def reject(reason: str, detail: str = "", raw: Any = None) -> dict:
    return {"reason": reason, "detail": str(detail)[:500], "raw": raw}
