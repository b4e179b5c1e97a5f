"""Which outputs of a run the report and ``curate inspect`` read: :class:`RunView` and :func:`locate`.

A run's prefix may hold outputs of several configurations of a stage (a changed setting leaves the old
prefix behind). With a recipe (or, at export time, the export stage's own upstream map) the current
outputs are known exactly; without one, every stage id must have exactly one configuration with done
shards, or :func:`locate` says which ids are ambiguous and asks for ``--recipe``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..stage import PermanentInputError, StageContext
from ..storage import Store


@dataclass
class RunView:
    """The outputs of one run that a report is about.

    Attributes:
        store: the run's store.
        stages: sidecar stage id -> prefix (``stages/<id>/<cfg>``), in pipeline order.
        select: the select stage's prefix (``select/<id>/<cfg>``), or None.
        export: the export's prefix, or None; ``export_store`` is where it was written (``curate export
            --out`` writes to another store than the run's).
        raw_prefix: where the raw shards are.
        select_config: the select stage's thresholds, score and budget (from its ``_stats`` or the recipe).
    """

    store: Store
    stages: dict[str, str] = field(default_factory=dict)
    select: str | None = None
    export: str | None = None
    export_store: Store | None = None
    raw_prefix: str = "raw"
    select_config: dict = field(default_factory=dict)

    @property
    def upstream(self) -> dict[str, str]:
        """Stage id -> prefix, as a stage's context holds it (for :func:`libcurate.columns.gather`)."""
        up = {"ingest": self.raw_prefix, **self.stages}
        if self.select:
            up[self.select.split("/")[1]] = self.select
        return up

    def context(self) -> StageContext:
        return StageContext(store=self.store, prefix=self.select or "report", raw_prefix=self.raw_prefix,
                            upstream=self.upstream)

    def select_stats(self) -> dict:
        if not self.select or not self.store.exists(f"{self.select}/_stats/all.json"):
            return {}
        return json.loads(self.store.read_text(f"{self.select}/_stats/all.json"))

    def export_summary(self) -> dict:
        st = self.export_store or self.store
        if not self.export or not st.exists(f"{self.export}/summary.json"):
            return {}
        return json.loads(st.read_text(f"{self.export}/summary.json"))


def _from_upstream(store: Store, upstream: dict[str, str], select: str | None, export: str | None,
                   export_store: Store | None, raw_prefix: str, select_config: dict | None) -> RunView:
    stages = {sid: p for sid, p in upstream.items() if p.startswith("stages/")}
    if select is None:
        sel = [p for p in upstream.values() if p.startswith("select/")]
        select = sel[-1] if sel else None
    v = RunView(store, stages, select, export, export_store, raw_prefix)
    cfg = select_config if select_config is not None else v.select_stats()
    v.select_config = {k: cfg.get(k) for k in ("thresholds", "score", "budget", "strategy", "norm_max")
                       if cfg.get(k) is not None}
    return v


def locate(store: Store, recipe=None, upstream: dict[str, str] | None = None, select: str | None = None,
           export: str | None = None, export_store: Store | None = None, raw_prefix: str = "raw") -> RunView:
    """The run's current outputs: from a recipe's plan, an explicit upstream map, or the layout."""
    if recipe is not None:
        from ..pipeline import plan

        planned = plan(recipe)
        up = {p.id: p.prefix for p in planned if not p.cls.produces_raw and p.stage != "export"}
        sel = [p for p in planned if p.prefix.startswith("select/")]
        exp = [p for p in planned if p.stage == "export"]
        cfg = None
        if sel:  # the recipe's settings, plus what only the run knows (the dataset max of @norm fields)
            stats = RunView(store, select=sel[-1].prefix).select_stats()
            cfg = {**stats, **sel[-1].config.to_dict(), "budget": stats.get("budget", sel[-1].config.budget)}
            cfg["strategy"] = sel[-1].config.strategy.get("kind")
        return _from_upstream(store, up, sel[-1].prefix if sel else None,
                              export or (exp[-1].prefix if exp else None), export_store, raw_prefix, cfg)
    if upstream is not None:
        return _from_upstream(store, upstream, select, export, export_store, raw_prefix, None)
    from ..audit import stage_prefixes

    exp_prefixes = [p for p in stage_prefixes(store) if p.startswith("export/")]
    if export is None and len(exp_prefixes) == 1:
        export = exp_prefixes[0]
    if export is not None:  # the export recorded the stages it followed, in recipe order
        st = export_store or store
        summ = json.loads(st.read_text(f"{export}/summary.json")) if st.exists(f"{export}/summary.json") else {}
        if any(p.startswith("stages/") for _, p in summ.get("upstream") or ()):
            return _from_upstream(store, dict(summ["upstream"]), None, export, export_store, raw_prefix, None)
    found: dict[tuple[str, str], list[str]] = {}
    for p in stage_prefixes(store):
        if p == "raw":
            continue
        root, sid, _ = p.split("/")
        found.setdefault((root, sid), []).append(p)
    ambiguous = sorted(f"{root}/{sid} ({len(ps)} configurations)" for (root, sid), ps in found.items()
                       if len(ps) > 1 and (root != "export" or export is None))
    if ambiguous:
        raise PermanentInputError(f"{store.url} holds several configurations of {', '.join(ambiguous)}: "
                                  "pass --recipe to say which outputs are current")
    up = {sid: ps[0] for (root, sid), ps in found.items() if root in ("stages", "select")}
    exports = [ps[0] for (root, _), ps in found.items() if root == "export"]
    if not store.list(f"{raw_prefix}/_done"):
        raise PermanentInputError(f"{store.url}: no raw shards (is this a run prefix?)")
    return _from_upstream(store, up, select, export or (exports[-1] if exports else None), export_store,
                          raw_prefix, None)
