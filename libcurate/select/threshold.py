"""The ``select`` stage: thresholds on any stored score, then top-k under a budget.

Every raw sample gets a decision line in ``select/<id>/<cfg>/decisions/shard-NNNNNN.jsonl``::

    {"key": ..., "selected": true, "rank": 1, "score": 0.31}
    {"key": ..., "selected": false, "reason": "below_min: score_clip.cosine=0.08 < 0.1"}

Drop reasons: ``quarantined: <stage>: <reason>`` (an upstream stage rejected the sample),
``missing_score: <field>``, ``below_min`` / ``above_max``, ``exact_duplicate`` (same image bytes and
conversation as an earlier sample, which is kept), ``over_budget``. Accounting for the global
unit ``all``: in = raw samples, out = selected, dropped = the rest (each with its reason).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from ..records import make_key
from ..scoring.length import length_score
from ..stage import ShardOutput, raw_shards, Stage, StageConfig, StageContext, unit_of
from .scores import iter_scores


NORM = "@norm"


@dataclass
class SelectConfig(StageConfig):
    """Settings of ``select``.

    Attributes:
        thresholds: field -> {"min": x, "max": y}; a field is ``<stage_id>.<name>`` in that stage's sidecar,
            or ``<stage_id>.<name>@norm``: ``10 * value / max(value over the dataset)`` (InstructionGPT-4's
            length score, with the maximum taken from the data: ``score_length.chars@norm``).
        rank_by: field to rank the survivors by (None keeps raw order).
        descending: rank high scores first.
        budget: keep at most this many samples (top-k after thresholds); None = no limit.
        budget_fraction: alternatively, keep this fraction of all raw samples (0-1].
        keep_missing: keep samples lacking a thresholded/ranked value (default: drop with a reason).
        dedup_exact: drop a sample whose images (sha256) and conversation equal an earlier sample's.
    """

    thresholds: dict = field(default_factory=dict)
    rank_by: str | None = None
    descending: bool = True
    budget: int | None = None
    budget_fraction: float | None = None
    keep_missing: bool = False
    dedup_exact: bool = True

    def __post_init__(self):
        for f, rule in self.thresholds.items():
            if not isinstance(rule, dict) or not set(rule) <= {"min", "max"} or not rule:
                raise ValueError(f"threshold {f!r}: want a mapping with 'min' and/or 'max'")
        if self.budget is not None and self.budget < 0:
            raise ValueError("budget must be >= 0")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise ValueError("budget_fraction must be in (0, 1]")
        if self.budget is not None and self.budget_fraction is not None:
            raise ValueError("give budget or budget_fraction, not both")

    @property
    def fields(self) -> list[str]:
        return sorted(set(self.thresholds) | ({self.rank_by} if self.rank_by else set()))

    @property
    def stored_fields(self) -> list[str]:
        """The sidecar fields to read (``x@norm`` is computed from ``x``)."""
        return sorted({f.removesuffix(NORM) for f in self.fields})


def decisions_rel(prefix: str, shard: str) -> str:
    return f"{prefix}/decisions/{unit_of(shard)}.jsonl"


def read_decisions(store, prefix: str, shard: str) -> list[dict]:
    return [json.loads(x) for x in store.read_text(decisions_rel(prefix, shard)).splitlines() if x.strip()]


class SelectStage(Stage):
    name = "select"
    Config = SelectConfig
    kind = "global"
    output_root = "select"

    def _rule_reason(self, values: dict, quarantined: str | None) -> str | None:
        c = self.config
        if quarantined:
            return f"quarantined: {quarantined}"
        for f in c.fields:
            if values.get(f) is None and not c.keep_missing:
                return f"missing_score: {f}"
        for f, rule in sorted(c.thresholds.items()):
            v = values.get(f)
            if v is None:
                continue
            if "min" in rule and v < rule["min"]:
                return f"below_min: {f}={v:.6g} < {rule['min']}"
            if "max" in rule and v > rule["max"]:
                return f"above_max: {f}={v:.6g} > {rule['max']}"
        return None

    def run_global(self, ctx: StageContext) -> dict:
        c = self.config
        shards = raw_shards(ctx.store, ctx.raw_prefix)
        # Per sample only (shard, key, the few requested values, quarantine, duplicate-of) is held: ~200
        # bytes, so 10M samples fit in ~2 GB.
        first_seen: dict[str, str] = {}  # content signature -> key of its first occurrence
        seen: list[tuple[str, str, dict, str | None, str | None]] = []
        for s in iter_scores(ctx, shards, c.stored_fields):
            dup = None
            if c.dedup_exact and not s.quarantined:
                sig = make_key([im.sha256 for im in s.record.images], s.record.conversations)
                dup = first_seen.setdefault(sig, s.key)
                dup = None if dup == s.key else dup
            seen.append((s.shard, s.key, s.values, s.quarantined, dup))
        maxima: dict[str, float] = {}
        for f in c.fields:
            if f.endswith(NORM):
                base = f.removesuffix(NORM)
                maxima[f] = max((v[base] for _s, _k, v, _q, _d in seen if v.get(base) is not None), default=0.0)
        rows: list[tuple[str, str, float | None, str | None]] = []
        for shard, key, values, quarantined, dup in seen:
            for f, m in maxima.items():
                base = values.get(f.removesuffix(NORM))
                values[f] = None if base is None else length_score(base, m)
            reason = self._rule_reason(values, quarantined)
            if reason is None and dup is not None:
                reason = f"exact_duplicate: same images and text as {dup}"
            rows.append((shard, key, values.get(c.rank_by) if c.rank_by else None, reason))
        survivors = [i for i, r in enumerate(rows) if r[3] is None]
        if c.rank_by:
            sign = -1.0 if c.descending else 1.0
            # Missing scores (kept by keep_missing) rank last; ties break by raw order, deterministically.
            survivors.sort(key=lambda i: (rows[i][2] is None, sign * (rows[i][2] or 0.0), i))
        budget = c.budget
        if c.budget_fraction is not None:
            budget = math.floor(c.budget_fraction * len(rows))
        rank = {i: n + 1 for n, i in enumerate(survivors)}
        out = ShardOutput(ctx.store, ctx.prefix, "all", sidecar=False)
        reasons: Counter = Counter()
        by_shard: dict[str, list[str]] = {s: [] for s in shards}
        for i, (shard, key, score, reason) in enumerate(rows):
            d: dict = {"key": key}
            if score is not None:
                d["score"] = score
            if reason is None and budget is not None and rank[i] > budget:
                reason = f"over_budget: rank {rank[i]} > {budget}"
            if reason is None:
                d.update(selected=True, rank=rank[i])
                out.count_out()
            else:
                d.update(selected=False, reason=reason)
                reasons[reason.split(":")[0]] += 1
                out.drop()
            by_shard[shard].append(json.dumps(d, sort_keys=True))
        for shard, lines in by_shard.items():
            ctx.store.write_text(decisions_rel(ctx.prefix, shard), "".join(x + "\n" for x in lines))
        out.extra.update(drop_reasons=dict(sorted(reasons.items())), shards=len(shards), norm_max=maxima)
        return out.finish(len(rows))
