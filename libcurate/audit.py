"""Progress and accounting read back from the markers: ``curate status`` and ``curate audit``.

A run's stage outputs are found by their layout (``raw``, ``stages/<id>/<cfg>``, ``select/<id>/<cfg>``,
``export/<id>/<cfg>``); no recipe is needed. A stage is accounted for when, for every completed unit,
``in = out + quarantined + dropped``, the quarantine file has one line per quarantined sample, and a
per-shard stage saw exactly the samples its raw shard holds.

Generated raw shards (``raw/gen-<id>-<cfg>-*``, written mid-recipe by a generation stage) count for raw
and for the stages that see them: a stage is expected to cover every ingested shard, and every shard of a
generated set it has started (a stage before the generator, or the generator itself, covers none; a set of
an older generator config is seen by nobody). A selection must have decided on exactly the samples of the
raw shards it has decisions for, every ingested one included.

Reads go out :data:`READ_AHEAD` at a time (a thread pool, in the units' order): on S3 every stats or
quarantine file is one request, and one at a time they made the audit, and the report's funnel that runs
it, as slow as the request latency times the shard count. Which quarantine files exist comes from one
listing, not one ``exists`` request per unit.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from .stage import FIT_UNIT, GEN_SHARD_PREFIX, is_generated_shard, quarantine_rel, raw_shards
from .storage import Store


@dataclass
class StageAudit:
    prefix: str
    units_done: int = 0
    units_total: int = 0
    totals: Counter = field(default_factory=Counter)
    quarantine_reasons: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    llm: list[dict] = field(default_factory=list)   # the units' _stats.llm blocks (LLM stages)

    @property
    def ok(self) -> bool:
        return not self.problems and self.units_done == self.units_total

    def to_dict(self) -> dict:
        t = self.totals
        return {"prefix": self.prefix, "units_done": self.units_done, "units_total": self.units_total,
                "in": t["in"], "out": t["out"], "quarantined": t["quarantined"], "dropped": t["dropped"],
                "quarantine_reasons": dict(sorted(self.quarantine_reasons.items())),
                "ok": self.ok, "problems": self.problems,
                **({"llm": llm_totals(self.llm)} if self.llm else {})}


READ_AHEAD = 8   # concurrent reads (on S3 one request each); the results are taken in order
READ_CHUNK = 512  # units read per batch: memory stays bounded however many shards a run has


def read_texts(store: Store, rels: list[str]) -> Iterator[str]:
    """``store.read_text`` of every path in ``rels``, yielded in order, :data:`READ_AHEAD` in flight."""
    if len(rels) <= 1:
        yield from (store.read_text(r) for r in rels)
        return
    with ThreadPoolExecutor(min(READ_AHEAD, len(rels))) as pool:
        for i in range(0, len(rels), READ_CHUNK):
            yield from pool.map(store.read_text, rels[i:i + READ_CHUNK])


def llm_totals(blocks: list[dict]) -> dict:
    """Summed ``_stats.llm`` counters (:func:`libcurate.llm.cost.usage_totals`)."""
    from .llm.cost import usage_totals

    return usage_totals(blocks)


def stage_prefixes(store: Store) -> list[str]:
    """Every stage output prefix present in a run, raw first."""
    found = set()
    for root in ("stages", "select", "export"):
        for name in store.list(root):
            parts = name.split("/")
            if len(parts) >= 4 and parts[2] in ("_done", "_stats"):
                found.add(f"{root}/{parts[0]}/{parts[1]}")
    raw = ["raw"] if store.list("raw/_stats") or store.exists("raw/_ingest.json") else []
    order = {"stages": 0, "select": 1, "export": 2}
    return raw + sorted(found, key=lambda p: (order[p.split("/")[0]], p))


def audit_stage(store: Store, prefix: str, raw_out: dict[str, int]) -> StageAudit:
    a = StageAudit(prefix)
    done = {n for n in store.list(f"{prefix}/_done")}
    if FIT_UNIT in done:
        # A fit stage: its global fit is not a shard; a shard counts only if written from the current fit.
        done.discard(FIT_UNIT)
        sig = store.read_text(f"{prefix}/_done/{FIT_UNIT}")
        units = sorted(done)
        stale = [u for u, got in zip(units, read_texts(store, [f"{prefix}/_done/{u}" for u in units])) if got != sig]
        if stale:
            a.problems.append(f"{len(stale)} shard(s) written from an older fit, e.g. {stale[0]}")
    stats_names = {n[: -len(".json")] for n in store.list(f"{prefix}/_stats") if n.endswith(".json")}
    if prefix == "raw":
        manifest = json.loads(store.read_text("raw/_ingest.json")) if store.exists("raw/_ingest.json") else {}
        n_gen = sum(is_generated_shard(u) for u in done)
        a.units_total = manifest.get("n_shards", len(done) - n_gen) + n_gen
    elif "all" in done or prefix.startswith(("select/", "export/")):
        a.units_total = 1
    else:
        a.units_total = len(expected_units(raw_out, done))
    a.units_done = len(done)
    q_names = {n for n in store.list(f"{prefix}/_quarantine") if n.endswith(".jsonl")}
    for unit in sorted(done - stats_names):
        a.problems.append(f"{unit}: done marker without stats")
    units = sorted(done & stats_names)
    # one path list, read in order: each unit's stats, then its quarantine file where the listing has one
    rels = []
    for unit in units:
        rels.append(f"{prefix}/_stats/{unit}.json")
        if f"{unit}.jsonl" in q_names:
            rels.append(quarantine_rel(prefix, unit))
    texts = read_texts(store, rels)
    for unit in units:
        st = json.loads(next(texts))
        for k in ("in", "out", "quarantined", "dropped"):
            a.totals[k] += int(st.get(k, 0))
        if isinstance(st.get("llm"), dict):
            a.llm.append(st["llm"])
        if st["in"] != st["out"] + st["quarantined"] + st.get("dropped", 0):
            a.problems.append(f"{unit}: in={st['in']} != out={st['out']} + quarantined={st['quarantined']} "
                              f"+ dropped={st.get('dropped', 0)}")
        q = [json.loads(x) for x in next(texts).splitlines() if x.strip()] if f"{unit}.jsonl" in q_names else []
        if len(q) != st["quarantined"]:
            a.problems.append(f"{unit}: {len(q)} quarantine lines for quarantined={st['quarantined']}")
        a.quarantine_reasons.update(x["reason"] for x in q)
        if prefix.startswith("stages/") and unit in raw_out and st["in"] != raw_out[unit]:
            a.problems.append(f"{unit}: saw {st['in']} samples, raw shard holds {raw_out[unit]}")
    if prefix.startswith("select/") and "all" in done:
        st = json.loads(store.read_text(f"{prefix}/_stats/all.json"))
        decided = {n[: -len(".jsonl")] for n in store.list(f"{prefix}/decisions") if n.endswith(".jsonl")}
        seen = expected_units(raw_out, decided)
        want = sum(raw_out[u] for u in seen)
        if st["in"] != want:
            a.problems.append(f"decided on {st['in']} samples, the raw shards it sees hold {want}")
    return a


def _gen_set(unit: str) -> str:
    """``gen-<id>-<cfg>-shard-000001`` -> ``gen-<id>-<cfg>-``: the generated set a raw unit belongs to."""
    return unit[: unit.rindex("shard-")]


def expected_units(raw_out: dict[str, int], touched: set[str]) -> set[str]:
    """The raw units a stage that has output for ``touched`` must cover: every ingested unit, and every
    unit of each generated set it has touched."""
    sets = {_gen_set(u) for u in touched if u.startswith(GEN_SHARD_PREFIX)}
    return {u for u in raw_out if not is_generated_shard(u) or _gen_set(u) in sets}


def audit(store: Store, current: set[str] | None = None) -> dict:
    """The JSON object ``curate audit --json`` prints; ``ok`` is true iff every sample is accounted for.

    ``current``: the output prefixes of the recipe's plan. Outputs of earlier configurations (a changed
    setting leaves its old prefix behind, possibly half done) are then reported with ``"current": false``
    and do not affect ``ok``. Without it, every stage output found counts.
    """
    units = [shard[: -len(".tar")] for shard in raw_shards(store)]
    raw_out = {unit: json.loads(text)["out"]
               for unit, text in zip(units, read_texts(store, [f"raw/_stats/{u}.json" for u in units]))}
    stages = {p: audit_stage(store, p, raw_out) for p in stage_prefixes(store)}
    result = {"prefix": store.url, "stages": {p: a.to_dict() for p, a in stages.items()}}
    counted = {p: a for p, a in stages.items() if current is None or p in current}
    if current is not None:
        for p, d in result["stages"].items():
            d["current"] = p in current
        missing = sorted(current - set(stages))
        if missing:
            result["problems"] = [f"no output yet for {p}" for p in missing]
    result["ok"] = bool(counted) and all(a.ok for a in counted.values()) and not result.get("problems")
    used = [blk for a in counted.values() for blk in a.llm]
    if used:  # requests, tokens and cost of the counted LLM stages (cost_usd None when a price is unknown)
        result["llm_total"] = llm_totals(used)
    if not stages:
        result["problems"] = ["no stage output found under this prefix"]
    return result


def current_prefixes(recipe) -> set[str]:
    """The output prefixes a recipe's plan writes (what ``audit(current=...)`` counts)."""
    from .pipeline import plan

    return {p.prefix for p in plan(recipe)}


def status_lines(store: Store, current: set[str] | None = None) -> list[str]:
    """One human-readable line per stage: progress and totals (``(old)`` marks earlier configurations)."""
    rep = audit(store, current)
    lines = [f"{'stage':<44} {'done':>9} {'in':>8} {'out':>8} {'quar.':>6} {'drop':>6}"]
    for p, a in rep["stages"].items():
        mark = ("" if a["ok"] else "  !") + ("  (old)" if a.get("current") is False else "")
        lines.append(f"{p:<44} {a['units_done']:>4}/{a['units_total']:<4} {a['in']:>8} {a['out']:>8} "
                     f"{a['quarantined']:>6} {a['dropped']:>6}{mark}")
        for prob in a["problems"][:5]:
            lines.append(f"    problem: {prob}")
    return lines
