"""Read stored scores back for decisions: score once, decide later (changing a threshold never re-scores).

A score is addressed as ``<stage_id>.<field>[.<nested>...]`` into that stage's sidecar ``{key}.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

from ..shards import iter_aligned, iter_members, iter_samples
from ..stage import PermanentInputError, StageContext, read_quarantine, unit_of


@dataclass
class SampleScores:
    """One raw sample with the requested score values.

    Attributes:
        shard / key: where it lives.
        values: field -> float, or None when the stage stored nothing usable for it.
        quarantined: "<stage_id>: <reason>" if any upstream stage quarantined the sample.
        record: the raw record (without image bytes) for rules that look at the sample itself.
    """

    shard: str
    key: str
    values: dict[str, float | None] = field(default_factory=dict)
    quarantined: str | None = None
    record: object = None


def lookup(obj: dict, path: list[str]):
    cur = obj
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    if isinstance(cur, bool) or not isinstance(cur, (int, float)):
        return None
    return float(cur)


def split_field(name: str, upstream: dict[str, str]) -> tuple[str, list[str]]:
    sid, _, rest = name.partition(".")
    if sid not in upstream or not rest:
        raise PermanentInputError(f"score field {name!r}: want '<stage_id>.<field>' with a stage id among "
                                  f"{sorted(k for k in upstream if k != 'ingest')}")
    return sid, rest.split(".")


def sidecar_stages(upstream: dict[str, str]) -> dict[str, str]:
    """Upstream per-shard stages that write sidecars (``stages/...``), by id."""
    return {sid: p for sid, p in upstream.items() if p.startswith("stages/")}


def iter_scores(ctx: StageContext, shards: list[str], fields: list[str]) -> Iterator[SampleScores]:
    """Join every raw sample of ``shards`` with the requested fields and all upstream quarantines."""
    parsed = {f: split_field(f, ctx.upstream) for f in fields}
    stages = sidecar_stages(ctx.upstream)
    for shard in shards:
        unit = unit_of(shard)
        quarantined: dict[str, dict[str, str]] = {}
        sidecars = {}
        for sid, prefix in stages.items():
            if not ctx.store.exists(f"{prefix}/_done/{unit}"):
                raise PermanentInputError(f"stage {sid!r} has not completed {unit} ({prefix})")
            quarantined[sid] = {q["key"]: q["reason"] for q in read_quarantine(ctx.store, prefix, unit)}
            sidecars[sid] = iter_members(ctx.store.uri(f"{prefix}/{shard}"))
        raw = iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}", with_images=False)
        qkeys = {sid: set(q) for sid, q in quarantined.items()}
        for sample, joined in iter_aligned(raw, sidecars, qkeys):
            out = SampleScores(shard, sample.key, record=sample)
            for sid in stages:
                if joined[sid] is None and out.quarantined is None:
                    out.quarantined = f"{sid}: {quarantined[sid][sample.key]}"
            parsed_json = {sid: json.loads(m["json"]) for sid, m in joined.items() if m is not None}
            for f, (sid, path) in parsed.items():
                out.values[f] = lookup(parsed_json[sid], path) if sid in parsed_json else None
            yield out
