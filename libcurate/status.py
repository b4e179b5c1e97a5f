"""Progress of a run, read back from its markers while it runs: ``curate status`` (local or ``s3://``).

An Argo workflow leaves nothing else to watch: its pods write ``_done/<unit>`` markers (last, after the
unit's ``_stats``) under each stage's prefix in the run's store. This module turns those into, per stage,
units done / total, samples done / total, throughput (samples/s) and an ETA.

What is read, per refresh (cheap on S3: no request per shard for the listing):

* one paginated listing of ``<prefix>/_done/`` per stage (names and modification times);
* ``raw/_ingest.json`` (planned shards and records, written by ingest's list step before any pod runs;
  ``raw/_retrieve.json`` for a run whose raw shards come from ``retrieve``);
* the ``_stats/<unit>.json`` of each unit that completed since the last refresh (kept across ``--watch``
  refreshes, re-read only when its marker is rewritten), fetched on a few threads;
* with LLM stages: one listing of ``<cache_prefix>/_batches/`` (Batch API jobs submitted, not finished);
* for fit stages: one delimiter listing of ``<prefix>/_units/`` (a ``train`` stage's trainer units).

Timings. Throughput and ETA come from the *markers' modification times* (the object's ``LastModified``
on S3, which the S3 server sets: every pod's markers share the server's clock, at whole seconds) together
with the ``seconds`` each unit's stats record for its own work: a stage started at
``min(marker time - seconds)`` over its done units; its throughput is the samples done over the time
from that start to now (or to its last marker once complete); its ETA is the samples still to do over
that throughput. The reader's own clock (``now``, injected in tests) only matters for a running stage.

Which outputs count. With a recipe, exactly its plan's prefixes (the current configuration hashes);
outputs of older configurations under the same prefix are named, not counted. Without one, every stage
output found. A fit stage's shard counts only when its marker is not older than the fit's marker (a
re-fit rewrites every shard); a fit or global stage whose marker is older than the newest raw shard
(new raw shards arrived: a scheduled re-curation) is waiting to run again.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from .audit import expected_units
from .stage import FIT_UNIT, is_generated_shard
from .storage import Store

DEFAULT_LLM_CACHE = "llm_cache"
# What the stage that writes raw/ planned before its pods ran ({"n_shards", "n_records", ...}): ingest's
# layout, or retrieve's fixed search result.
RAW_MANIFESTS = ("raw/_ingest.json", "raw/_retrieve.json")
ROOTS = ("stages", "select", "export")


@dataclass(frozen=True)
class StageSpec:
    """A stage output to watch.

    Attributes:
        id: the stage id (the recipe's ``as:`` or stage name; without a recipe, from the prefix).
        prefix: its output prefix relative to the run root (``raw``, ``stages/<id>/<cfg>`` ...).
        kind: ``ingest`` (writes ``raw``), ``shard``, ``fit`` or ``global``.
        llm_cache: the LLM response cache prefix the stage uses (None: not an LLM stage).
    """

    id: str
    prefix: str
    kind: str
    llm_cache: str | None = None


def planned_specs(recipe) -> list[StageSpec]:
    """The stages a recipe's plan writes, in order (its current configuration hashes)."""
    from .pipeline import plan

    out = []
    for ps in plan(recipe):
        kind = "ingest" if ps.cls.produces_raw else ps.kind
        llm = getattr(getattr(ps.config, "llm", None), "cache_prefix", None) if ps.cls.llm else None
        out.append(StageSpec(ps.id, ps.prefix, kind, (llm or DEFAULT_LLM_CACHE) if ps.cls.llm else None))
    return out


def found_prefixes(store: Store) -> list[str]:
    """Every ``<root>/<id>/<cfg>`` output directory in a run (delimiter listings: no object is listed)."""
    out = []
    for root in ROOTS:
        for sid in store.list_dirs(root):
            out.extend(f"{root}/{sid}/{cfg}" for cfg in store.list_dirs(f"{root}/{sid}"))
    return out


@dataclass
class StageProgress:
    """One stage's progress (see the module docstring for how each figure is derived)."""

    id: str
    prefix: str
    kind: str
    state: str = "pending"              # pending | running | done | stale (waits to run again)
    units_done: int = 0
    units_total: int | None = None
    samples_done: int = 0
    samples_total: int | None = None
    samples_total_estimated: bool = False
    out: int = 0
    quarantined: int = 0
    dropped: int = 0
    started_at: float | None = None
    last_done_at: float | None = None
    elapsed_s: float | None = None
    throughput_sps: float | None = None
    eta_s: float | None = None
    fitted_at: float | None = None      # fit stages: when the global fit finished
    units_trained: int | None = None    # train stages: training units with a _units/<unit>/_done marker
    stale_units: int = 0                # fit stages: shard markers older than the current fit
    llm: dict | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# Counters of an LLM stage's ``_stats["llm"]`` summed over its done units.
LLM_COUNTERS = ("requests", "cache_hits", "shared", "retries", "succeeded", "failed", "prompt_tokens",
                "completion_tokens", "cost_usd")


class StatusReader:
    """Reads a run's progress; keep one across ``--watch`` refreshes (it remembers the stats it read).

    Args:
        store: the run's store.
        specs: the stages to report (a recipe's :func:`planned_specs`); None: every output found.
        now: the clock (Unix seconds); injected by tests.
        threads: concurrent ``_stats`` reads (S3 round trips dominate).
    """

    def __init__(self, store: Store, specs: list[StageSpec] | None = None, now: Callable[[], float] = time.time,
                 threads: int = 16):
        self.store, self.specs, self.now, self.threads = store, specs, now, threads
        self._stats: dict[str, tuple[float, dict | None]] = {}  # rel -> (marker mtime, stats or None)

    # -- reading ------------------------------------------------------------------------------
    def _read_stats(self, prefix: str, markers: dict[str, float]) -> dict[str, dict | None]:
        """``_stats`` of each unit in ``markers``; None where the file is missing or unreadable."""
        rels = {u: f"{prefix}/_stats/{u}.json" for u in markers}
        todo = [u for u, rel in rels.items() if self._stats.get(rel, (None,))[0] != markers[u]]

        def get(unit: str) -> dict | None:
            try:
                d = json.loads(self.store.read_text(rels[unit]))
                return d if isinstance(d, dict) else None
            except (FileNotFoundError, ValueError):
                return None

        if todo:
            if len(todo) == 1 or self.threads <= 1:
                got = [get(u) for u in todo]
            else:
                with ThreadPoolExecutor(min(self.threads, len(todo))) as pool:
                    got = list(pool.map(get, todo))
            for u, d in zip(todo, got):
                self._stats[rels[u]] = (markers[u], d)
        return {u: self._stats[rels[u]][1] for u in markers}

    def _markers(self, prefix: str) -> dict[str, float]:
        return {o.name: o.mtime for o in self.store.list_info(f"{prefix}/_done") if "/" not in o.name}

    def read(self) -> dict:
        """The run's status: the JSON object ``curate status --json`` prints."""
        now = self.now()
        found = found_prefixes(self.store)
        specs = self.specs
        if specs is None:
            specs = ([StageSpec("ingest", "raw", "ingest")] if "raw" in self.store.list_dirs("") else []) + \
                    [StageSpec(p.split("/")[1], p, "global" if p.startswith(("select/", "export/")) else "shard")
                     for p in found]
            llm_caches = [DEFAULT_LLM_CACHE] if specs else []
        else:
            llm_caches = sorted({s.llm_cache for s in specs if s.llm_cache})
        raw = self._raw()
        stages = [self._stage(s, raw, now) for s in specs]
        planned = {s.prefix for s in specs}
        return {
            "prefix": self.store.url, "now": now,
            "complete": bool(stages) and all(s.state == "done" for s in stages),
            "stages": [s.to_dict() for s in stages],
            "llm_batches": self._batches(llm_caches, now),
            "not_counted": [p for p in found if p not in planned],
        }

    def _raw(self) -> dict:
        """The raw shards: which are done (marker times), their sample counts, the ingest's plan."""
        markers = self._markers("raw")
        stats = self._read_stats("raw", markers)
        manifest = None
        for rel in RAW_MANIFESTS:
            if self.store.exists(rel):
                try:
                    manifest = json.loads(self.store.read_text(rel))
                except ValueError:
                    pass
                break
        n_shards = manifest.get("n_shards") if isinstance(manifest, dict) else None
        n_source = sum(not is_generated_shard(u) for u in markers)
        return {"markers": markers, "stats": stats, "manifest": manifest,
                "n_shards": n_shards if isinstance(n_shards, int) else (n_source or None),
                "out": {u: int(st.get("out", 0)) for u, st in stats.items() if st},
                "newest": max(markers.values(), default=None)}

    def _stage(self, spec: StageSpec, raw: dict, now: float) -> StageProgress:
        p = StageProgress(spec.id, spec.prefix, spec.kind)
        if spec.kind == "ingest":
            markers, stats = raw["markers"], raw["stats"]
            # plus the shards generation stages added (raw/gen-*: complete once their marker exists)
            n_gen = sum(is_generated_shard(u) for u in markers)
            p.units_total = raw["n_shards"] + n_gen if raw["n_shards"] is not None else None
            n_records = (raw["manifest"] or {}).get("n_records")
            n_gen_in = sum(int((stats.get(u) or {}).get("in", 0)) for u in markers if is_generated_shard(u))
            p.samples_total = n_records + n_gen_in if isinstance(n_records, int) else None
        else:
            markers = self._markers(spec.prefix)
            if spec.kind == "fit" or FIT_UNIT in markers:
                p.kind = "fit"
                markers = self._fit_units(p, markers, raw)
                self._training_units(p)
            elif spec.kind == "global" or "all" in markers:
                p.kind = "global"
                markers = {u: t for u, t in markers.items() if u == "all"}
                if markers and raw["newest"] is not None and markers["all"] < raw["newest"]:
                    p.state, markers = "stale", {}
            p.units_total = 1 if p.kind == "global" else raw["n_shards"]
            if p.kind in ("shard", "fit") and raw["n_shards"] is not None:
                # and every shard of each generated set it has started (audit.expected_units's rule)
                p.units_total += sum(is_generated_shard(u) for u in expected_units(
                    {u: 0 for u in raw["markers"]}, set(markers)))
            stats = self._read_stats(spec.prefix, markers)
            # A per-shard stage sees every sample raw kept; what a global stage sees (all of them, or a
            # selection) is known once it is done.
            if p.kind != "global" and raw["n_shards"] is not None and len(raw["out"]) == raw["n_shards"]:
                p.samples_total = sum(raw["out"].values())
        self._count(p, markers, stats)
        if p.kind == "global" and p.state == "done":
            p.samples_total = p.samples_done
        if p.kind != "global" and p.samples_total is None and p.units_done and p.units_total:
            p.samples_total = round(p.samples_done / p.units_done * p.units_total)
            p.samples_total_estimated = True
        self._timing(p, markers, stats, now)
        return p

    def _fit_units(self, p: StageProgress, markers: dict[str, float], raw: dict) -> dict[str, float]:
        """The shard markers written from the current fit (see the module docstring)."""
        fit_t = markers.pop(FIT_UNIT, None)
        if fit_t is None:
            p.stale_units = len(markers)
            return {}
        if raw["newest"] is not None and fit_t < raw["newest"]:
            p.state, p.stale_units = "stale", len(markers)
            return {}
        p.fitted_at = fit_t
        current = {u: t for u, t in markers.items() if t >= fit_t}
        p.stale_units = len(markers) - len(current)
        return current

    def _training_units(self, p: StageProgress) -> None:
        """A ``train`` stage's fit runs trainer units (``_units/<unit>/``, one pod each on Argo) before
        its ``_fit`` marker: count those finished. One delimiter listing, then one HEAD per unit directory
        (units are subsets: tens, not shards); how many units there will be is decided in the fit's list
        step and not stored, so no total."""
        dirs = self.store.list_dirs(f"{p.prefix}/_units")
        if dirs:
            p.units_trained = sum(self.store.exists(f"{p.prefix}/_units/{d}/_done") for d in dirs)

    def _count(self, p: StageProgress, markers: dict[str, float], stats: dict[str, dict | None]) -> None:
        p.units_done = len(markers)
        llm: dict = {}
        for unit, st in sorted(stats.items()):
            if st is None:
                p.problems.append(f"{unit}: done marker without readable stats")
                continue
            p.samples_done += int(st.get("in", 0))
            p.out += int(st.get("out", 0))
            p.quarantined += int(st.get("quarantined", 0))
            p.dropped += int(st.get("dropped", 0))
            if isinstance(st.get("llm"), dict):
                for k in LLM_COUNTERS:
                    llm[k] = llm.get(k, 0) + (st["llm"].get(k) or 0)
        if llm:
            llm["cost_usd"] = round(llm["cost_usd"], 6)
            p.llm = llm
        if p.state != "stale":
            total = p.units_total
            p.state = ("done" if total is not None and p.units_done >= total
                       else "running" if p.units_done or p.fitted_at is not None else "pending")

    def _timing(self, p: StageProgress, markers: dict[str, float], stats: dict[str, dict | None], now: float) -> None:
        if not markers:
            return
        starts = [t - float((stats.get(u) or {}).get("seconds", 0) or 0) for u, t in markers.items()]
        p.started_at, p.last_done_at = min(starts), max(markers.values())
        end = p.last_done_at if p.state == "done" else max(now, p.last_done_at)
        p.elapsed_s = end - p.started_at
        if p.elapsed_s > 0 and p.samples_done:
            p.throughput_sps = p.samples_done / p.elapsed_s
        if p.state == "done":
            p.eta_s = 0.0
        elif p.throughput_sps and p.samples_total is not None:
            p.eta_s = max(0, p.samples_total - p.samples_done) / p.throughput_sps

    def _batches(self, caches: list[str], now: float) -> list[dict]:
        """Batch API jobs submitted and not yet collected (``llm.batch``'s state files)."""
        out = []
        for cache in caches:
            for o in self.store.list_info(f"{cache}/_batches"):
                try:
                    d = json.loads(self.store.read_text(f"{cache}/_batches/{o.name}"))
                except (FileNotFoundError, ValueError):
                    continue  # collected (deleted) between the listing and the read
                created = float(d.get("created") or o.mtime)
                out.append({"cache": cache, "batch_id": d.get("batch_id"), "requests": int(d.get("n") or 0),
                            "submitted_at": created, "age_s": max(0.0, now - created)})
        return out


# -- presentation ----------------------------------------------------------------------------------
def fmt_duration(s: float | None) -> str:
    """``75`` -> ``1m15s``; None -> ``-``."""
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_status(st: dict) -> list[str]:
    """The human-readable table of :meth:`StatusReader.read`'s object."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(st["now"]))
    lines = [f"run: {st['prefix']}   {when}   {'complete' if st['complete'] else 'in progress'}",
             f"{'stage':<16} {'kind':<6} {'units':>11} {'samples':>19} {'samples/s':>10} {'ETA':>7}  {'state':<8} prefix"]
    for s in st["stages"]:
        total = "?" if s["units_total"] is None else str(s["units_total"])
        stot = "?" if s["samples_total"] is None else ("~" if s["samples_total_estimated"] else "") + f"{s['samples_total']:,}"
        rate = "-" if s["throughput_sps"] is None else f"{s['throughput_sps']:.1f}"
        lines.append(f"{s['id']:<16} {s['kind']:<6} {s['units_done']:>5}/{total:<5} "
                     f"{s['samples_done']:>9,}/{stot:<9} {rate:>10} {fmt_duration(s['eta_s']):>7}  "
                     f"{s['state']:<8} {s['prefix']}")
        notes = []
        if s["kind"] == "fit" and s["state"] == "running":
            notes.append("fitted, writing shards" if s["fitted_at"] is not None else "not fitted yet")
        if s["units_trained"] is not None:
            notes.append(f"{s['units_trained']} training unit(s) finished")
        if s["stale_units"]:
            notes.append(f"{s['stale_units']} shard(s) from an older fit")
        if s["state"] == "stale":
            notes.append("waits to run again: new raw shards since its output")
        if s["units_done"]:
            notes.append(f"out={s['out']:,} quarantined={s['quarantined']:,} dropped={s['dropped']:,}")
        if s["llm"]:
            m = s["llm"]
            notes.append(f"llm: {m['requests']:,} requests, {m['cache_hits']:,} cached, "
                         f"{m['prompt_tokens'] + m['completion_tokens']:,} tokens, ${m['cost_usd']:.4f}")
        if notes:
            lines.append("    " + "; ".join(notes))
        lines.extend(f"    problem: {prob}" for prob in s["problems"][:5])
    if st["llm_batches"]:
        b = st["llm_batches"]
        lines.append(f"LLM batches in flight: {len(b)} ({sum(x['requests'] for x in b):,} requests), "
                     f"oldest submitted {fmt_duration(max(x['age_s'] for x in b))} ago")
    if st["not_counted"]:
        lines.append("older configurations under this prefix, not counted: " + ", ".join(st["not_counted"]))
    return lines


def watch(reader: StatusReader, interval: float, emit: Callable[[dict], None],
          sleep: Callable[[float], None] = time.sleep, max_refreshes: int | None = None) -> dict:
    """Read and ``emit`` the status every ``interval`` seconds until every stage is done (or
    ``max_refreshes`` reads); returns the last status. Ctrl-C ends it in the caller."""
    n = 0
    while True:
        st = reader.read()
        n += 1
        emit(st)
        if st["complete"] or (max_refreshes is not None and n >= max_refreshes):
            return st
        sleep(interval)


def run_status(store: Store, recipe=None, as_json: bool = False, watch_s: float | None = None,
               out=None) -> int:
    """``curate status``: print once, or refresh every ``watch_s`` seconds until the run is complete."""
    out = out or sys.stdout
    reader = StatusReader(store, planned_specs(recipe) if recipe is not None else None)
    clear = watch_s is not None and not as_json and out.isatty()

    def emit(st: dict) -> None:
        # --watch --json: one object per line (JSON lines); once: indented
        text = (json.dumps(st, sort_keys=True, indent=None if watch_s else 1) if as_json
                else "\n".join(format_status(st)))
        out.write(("\033[H\033[2J" if clear else "") + text + "\n" + ("" if as_json or not watch_s else "\n"))
        out.flush()

    if watch_s is None:
        emit(reader.read())
        return 0
    st = watch(reader, watch_s, emit)
    return 0 if st["complete"] else 1
