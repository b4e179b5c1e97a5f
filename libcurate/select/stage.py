"""The ``select`` stage: rules, duplicates and a budgeted strategy over columns of every stored score.

Every raw sample gets a decision line in ``select/<id>/<cfg>/decisions/shard-NNNNNN.jsonl``::

    {"key": ..., "rank": 1, "score": 0.31, "selected": true}
    {"key": ..., "reason": "below_min: score_clip.cosine=0.08 < 0.1", "score": 0.08, "selected": false}

Rules, in order (the first that applies is the reason):

1. ``quarantined: <stage>: <reason>``: an upstream stage rejected the sample;
1b. ``contaminated: <benchmark>/<item> ...``: a ``decontaminate`` stage found a benchmark image or question
   in it (every earlier ``decontaminate`` stage applies; see :mod:`libcurate.select.decontaminate_stage`);
2. ``missing_score: <field>``: a field the selection needs is absent (unless ``keep_missing``);
3. ``below_min`` / ``above_max``: thresholds;
4. ``exact_duplicate``: same image bytes and conversation as an earlier sample (which is kept);
5. ``near_duplicate_of: <key>``: a ``dedup`` stage grouped it with a better member that survived 1-4;
6. the strategy under the budget: ``over_budget`` (``topk``), ``cluster_quota``
   (``cluster_proportional``), ``diversity_penalty`` (``diversity_greedy``), ``quota_full`` (``quotas``).

Everything is decided on numpy columns (:mod:`libcurate.columns`): about 100 bytes a sample for three
fields and a cluster id, so 10M samples fit in a pod with room to spare. Accounting for the global unit
``all``: in = raw samples, out = selected, dropped = the rest, each with its reason.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..columns import Table, check_embedding, embedding_key, embedding_parts, gather, read_keys
from ..stage import PermanentInputError, Reads, ShardOutput, Stage, StageConfig, StageContext, unit_of
from . import strategies as S

NORM = "@norm"
INF = float("inf")
NORMALIZE = ("none", "minmax", "zscore", "rank")
STRATEGIES = {
    "topk": {},
    "cluster_proportional": {"cluster": None, "quota_budget": None},
    "diversity_greedy": {"embedding": None, "k_nearest": 10, "gamma": 1.0, "negative": "shift"},
    "quotas": {"label": None, "shares": None, "counts": None, "fill": False},
}
NEGATIVE = ("shift", "clip", "raw")


def _is_field(x) -> bool:
    return isinstance(x, str) and "." in x and not x.startswith(".") and not x.endswith(".")


@dataclass
class SelectConfig(StageConfig):
    """Settings of ``select``.

    Attributes:
        thresholds: field -> {"min": x, "max": y}; a field is ``<stage_id>.<name>`` in that stage's sidecar,
            or ``<stage_id>.<name>@norm``: ``10 * value / max(value over the dataset)`` (InstructionGPT-4's
            length score, with the maximum taken from the data: ``score_length.chars@norm``).
        score: what ranks the survivors: a field name (its raw value), or ``{weights: {field: w, ...},
            normalize: minmax|zscore|rank|none}``: the weighted sum of the normalised fields (the weights
            are part of the config hash). None keeps raw order.
        rank_by: the older spelling of ``score: <field>``.
        descending: high scores first.
        budget: keep at most this many samples; None = no limit.
        budget_fraction: alternatively, keep this fraction of all raw samples (0-1].
        keep_missing: keep samples lacking a thresholded/ranked value (default: drop with a reason).
        dedup_exact: drop a sample whose images (sha256) and conversation equal an earlier sample's.
        near_duplicates: ``auto`` (every earlier ``dedup`` stage), or a list of dedup stage ids ([] = none).
        strategy: ``topk`` (default), or ``{kind: cluster_proportional, cluster: <field>, quota_budget: n}``,
            ``{kind: diversity_greedy, embedding: <stage>.<name>, k_nearest: 10, gamma: 1, negative:
            shift|clip|raw}`` (the score is the difficulty; ``embedding`` may be a list, e.g.
            ``[score_clip.img_emb, score_clip.txt_emb]``: cosine on the parts side by side, each
            normalised, i.e. the mean of the parts' cosines; see ``columns.concat_embeddings``),
            ``{kind: quotas, label: <field>, shares: {label: weight} | counts: {label: n}, fill: false}``. See :mod:`libcurate.select.strategies`.
    """

    thresholds: dict = field(default_factory=dict)
    score: object = None
    rank_by: str | None = None
    descending: bool = True
    budget: int | None = None
    budget_fraction: float | None = None
    keep_missing: bool = False
    dedup_exact: bool = True
    near_duplicates: object = "auto"
    strategy: object = "topk"

    def __post_init__(self):
        if not isinstance(self.thresholds, dict):
            raise ValueError("thresholds: want a mapping field -> {min, max}")
        for f, rule in self.thresholds.items():
            if not _is_field(f):
                raise ValueError(f"threshold {f!r}: want '<stage_id>.<field>'")
            if not isinstance(rule, dict) or not set(rule) <= {"min", "max"} or not rule or \
                    not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rule.values()):
                raise ValueError(f"threshold {f!r}: want a mapping with a numeric 'min' and/or 'max'")
        if self.rank_by is not None:
            if not _is_field(self.rank_by):
                raise ValueError(f"rank_by must be one field name '<stage_id>.<field>', got {self.rank_by!r}"
                                 " (to combine fields use score: {weights: {...}, normalize: minmax})")
            if self.score is not None:
                raise ValueError("give score or rank_by, not both")
        self.score = self._check_score(self.score if self.score is not None else self.rank_by)
        if self.budget is not None and (not isinstance(self.budget, int) or isinstance(self.budget, bool)
                                        or self.budget < 0):
            raise ValueError("budget must be an integer >= 0")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise ValueError("budget_fraction must be in (0, 1]")
        if self.budget is not None and self.budget_fraction is not None:
            raise ValueError("give budget or budget_fraction, not both")
        nd = self.near_duplicates
        if not (nd == "auto" or (isinstance(nd, (list, tuple)) and all(isinstance(x, str) for x in nd))):
            raise ValueError("near_duplicates: 'auto' or a list of dedup stage ids")
        if isinstance(nd, tuple):
            self.near_duplicates = list(nd)
        self.strategy = self._check_strategy(self.strategy)

    @staticmethod
    def _check_score(score):
        if score is None:
            return None
        if isinstance(score, str):
            if not _is_field(score):
                raise ValueError(f"score {score!r}: want '<stage_id>.<field>'")
            return {"weights": {score: 1.0}, "normalize": "none"}
        if not isinstance(score, dict) or not set(score) <= {"weights", "normalize"} or "weights" not in score:
            raise ValueError("score: want a field name or {weights: {field: weight}, normalize: ...}")
        w = score["weights"]
        if not isinstance(w, dict) or not w:
            raise ValueError("score.weights: want a non-empty mapping field -> number")
        for f, x in w.items():
            if not _is_field(f) or isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ValueError(f"score.weights: {f!r}: {x!r}: want '<stage_id>.<field>': <finite number>")
        norm = score.get("normalize", "minmax")
        if norm not in NORMALIZE:
            raise ValueError(f"score.normalize {norm!r}: want one of {list(NORMALIZE)}")
        return {"weights": {f: float(x) for f, x in w.items()}, "normalize": norm}

    @staticmethod
    def _check_strategy(st):
        if isinstance(st, str):
            st = {"kind": st}
        if not isinstance(st, dict) or st.get("kind") not in STRATEGIES:
            raise ValueError(f"strategy: want one of {list(STRATEGIES)} or a mapping with 'kind'")
        kind = st["kind"]
        defaults = STRATEGIES[kind]
        unknown = sorted(set(st) - set(defaults) - {"kind"})
        if unknown:
            raise ValueError(f"strategy {kind}: unknown setting(s) {unknown}; known: {sorted(defaults)}")
        out = {"kind": kind, **defaults, **st}
        if kind == "cluster_proportional":
            if not _is_field(out["cluster"]):
                raise ValueError("strategy cluster_proportional: 'cluster' must name a field, e.g. cluster.cluster")
            qb = out["quota_budget"]
            if qb is not None and (not isinstance(qb, int) or isinstance(qb, bool) or qb < 0):
                raise ValueError("strategy cluster_proportional: quota_budget must be an integer >= 0")
        elif kind == "diversity_greedy":
            if out["embedding"] is None:
                raise ValueError("strategy diversity_greedy: 'embedding' must name one, e.g. score_clip.img_emb, "
                                 "or a list, e.g. [score_clip.img_emb, score_clip.txt_emb]")
            out["embedding"] = check_embedding(out["embedding"], "strategy diversity_greedy: 'embedding'")
            if not isinstance(out["k_nearest"], int) or out["k_nearest"] < 1:
                raise ValueError("strategy diversity_greedy: k_nearest must be an integer >= 1")
            if isinstance(out["gamma"], bool) or not isinstance(out["gamma"], (int, float)) or out["gamma"] < 0:
                raise ValueError("strategy diversity_greedy: gamma must be a number >= 0")
            if out["negative"] not in NEGATIVE:
                raise ValueError(f"strategy diversity_greedy: negative must be one of {list(NEGATIVE)}")
        elif kind == "quotas":
            if not _is_field(out["label"]):
                raise ValueError("strategy quotas: 'label' must name a field, e.g. ingest.type")
            if (out["shares"] is None) == (out["counts"] is None):
                raise ValueError("strategy quotas: give shares or counts")
            table = out["shares"] if out["shares"] is not None else out["counts"]
            if not isinstance(table, dict) or not table or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in table.values()):
                raise ValueError("strategy quotas: shares/counts must map labels to numbers >= 0")
            out[("shares" if out["shares"] is not None else "counts")] = {str(k): v for k, v in table.items()}
        return out

    # -- what the stage reads ----------------------------------------------------------------------
    @property
    def fields(self) -> list[str]:
        """Fields every kept sample must have (thresholds and score)."""
        return sorted(set(self.thresholds) | set((self.score or {}).get("weights", {})))

    @property
    def stored_fields(self) -> list[str]:
        """The fields to read (``x@norm`` is computed from ``x``), strategy fields included."""
        st = self.strategy
        extra = [st[k] for k in ("cluster", "label") if st.get(k)]
        return sorted({f.removesuffix(NORM) for f in self.fields} | set(extra))

    @property
    def embeddings(self) -> list[str]:
        """The embedding columns to gather (a list's :func:`~libcurate.columns.embedding_key`)."""
        return [embedding_key(self.strategy["embedding"])] if self.strategy.get("embedding") else []


def decisions_rel(prefix: str, shard: str) -> str:
    return f"{prefix}/decisions/{unit_of(shard)}.jsonl"


def read_decisions(store, prefix: str, shard: str) -> list[dict]:
    return [json.loads(x) for x in store.read_text(decisions_rel(prefix, shard)).splitlines() if x.strip()]


def contamination_stages(ctx: StageContext) -> list[str]:
    """Ids of the earlier ``decontaminate`` stages (their prefix holds the marker they write)."""
    from .decontaminate_stage import MARKER

    return [sid for sid, prefix in ctx.upstream.items()
            if prefix.startswith("stages/") and ctx.store.exists(f"{prefix}/{MARKER}")]


def dedup_stages(ctx: StageContext, wanted) -> dict[str, str]:
    """The earlier ``dedup`` stages to apply: every one (``auto``) or the listed ids."""
    found = {}
    for sid, prefix in ctx.upstream.items():
        rel = f"{prefix}/_fit/fitted.json"
        if prefix.startswith("stages/") and ctx.store.exists(rel) and \
                json.loads(ctx.store.read_text(rel)).get("marks_duplicates"):
            found[sid] = prefix
    if wanted == "auto":
        return found
    missing = [s for s in wanted if s not in found]
    if missing:
        raise PermanentInputError(f"select.near_duplicates: {missing} are not completed dedup stages")
    return {s: found[s] for s in wanted}


class SelectStage(Stage):
    name = "select"
    Config = SelectConfig
    kind = "global"
    output_root = "select"

    @classmethod
    def reads(cls, config: SelectConfig) -> Reads:
        nd = config.near_duplicates if isinstance(config.near_duplicates, list) else []
        return Reads.of(config.stored_fields, [p for e in config.embeddings for p in embedding_parts(e)], nd)

    # -- the rules ---------------------------------------------------------------------------------
    def _rules(self, t: Table, values: dict[str, np.ndarray], why: "Reasons") -> None:
        """Rules 1-3, in order: the first that applies is the row's reason."""
        c = self.config
        why.set(t.quarantine > 0, QUARANTINED, t.quarantine)
        for j, sid in enumerate(why.contam_ids):
            why.set(values[f"{sid}.hit"] == b"true", CONTAMINATED, j)
        needed = [] if c.keep_missing else list(c.fields)
        needed += [f for f in c.stored_fields if f not in c.fields and f in values]  # cluster id, label
        for f in needed:
            v = values[f]
            why.set((v == b"") if v.dtype.kind == "S" else np.isnan(v), MISSING, why.field(f))
        for f, rule in sorted(c.thresholds.items()):
            v = values[f]
            with np.errstate(invalid="ignore"):
                if "min" in rule:
                    why.set(v < rule["min"], BELOW_MIN, why.field(f))
                if "max" in rule:
                    why.set(v > rule["max"], ABOVE_MAX, why.field(f))

    def _exact_duplicates(self, t: Table, content: np.ndarray, why: "Reasons") -> None:
        """First occurrence (in raw order, among samples no upstream stage quarantined) is kept."""
        ok = np.flatnonzero(~t.quarantined() & (content != 0))
        _, first, inverse = np.unique(content[ok], return_index=True, return_inverse=True)
        firsts = ok[first][inverse]
        dup = firsts != ok
        mask = np.zeros(len(t), bool)
        mask[ok[dup]] = True
        ref = np.zeros(len(t), np.int64)
        ref[ok[dup]] = firsts[dup]
        why.set(mask, EXACT_DUP, ref)

    def _near_duplicates(self, t: Table, why: "Reasons", groups: dict[str, tuple]) -> None:
        """Within a dedup group, the best-ranked member still standing is kept; the others name it."""
        for j, (sid, (group, grank, _sim)) in enumerate(groups.items()):
            idx = np.flatnonzero(why.open() & (group != b""))
            if not len(idx):
                continue
            order = idx[np.lexsort((idx, grank[idx], group[idx]))]
            g = group[order]
            first = np.r_[True, g[1:] != g[:-1]]
            keeper = order[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
            mask = np.zeros(len(t), bool)
            mask[order[~first]] = True
            ref = np.zeros(len(t), np.int64)
            ref[order[~first]] = keeper[~first]
            why.set(mask, NEAR_DUP + j, ref)

    # -- scoring -----------------------------------------------------------------------------------
    def _score(self, values: dict[str, np.ndarray], n: int) -> np.ndarray | None:
        sc = self.config.score
        if sc is None:
            return None
        if sc["normalize"] == "none":
            out = np.zeros(n)
            for f, w in sc["weights"].items():
                out += w * values[f]
            return out
        return S.weighted_score({f: values[f] for f in sc["weights"]}, sc["weights"], sc["normalize"])

    def run_global(self, ctx: StageContext) -> dict:
        c = self.config
        groups_from = dedup_stages(ctx, c.near_duplicates)
        group_fields = [f"{sid}.{x}" for sid in groups_from for x in ("group", "group_rank", "similarity")]
        raw_fields = ["ingest.content"] if c.dedup_exact else []
        contam = contamination_stages(ctx)
        group_fields += [f"{sid}.{x}" for sid in contam for x in ("hit", "reason")]
        t = gather(ctx, fields=c.stored_fields + group_fields + raw_fields, embeddings=c.embeddings,
                   with_keys=False, digests=raw_fields)
        n = len(t)
        values = t.values
        for f in c.fields + ([c.strategy["cluster"]] if c.strategy.get("cluster") else []):
            v = values.get(f.removesuffix(NORM))
            if v is not None and v.dtype.kind == "S":
                raise PermanentInputError(f"select: {f.removesuffix(NORM)} holds text labels, not numbers")
        maxima: dict[str, float] = {}
        for f in c.fields:
            if f.endswith(NORM):
                base = values[f.removesuffix(NORM)]
                m = float(np.nanmax(base)) if np.isfinite(base).any() else 0.0
                maxima[f] = m
                values[f] = 10.0 * base / m if m > 0 else np.where(np.isnan(base), np.nan, 0.0)
        why = Reasons(n, t.quarantine_reasons, [sid for sid in groups_from])
        why.contam_ids = contam
        self._rules(t, values, why)
        if c.dedup_exact:
            self._exact_duplicates(t, values.pop("ingest.content"), why)
        groups = {}
        for sid in groups_from:
            g = values[f"{sid}.group"]
            groups[sid] = (g if g.dtype.kind == "S" else np.full(n, b"", "S1"), values[f"{sid}.group_rank"],
                           values[f"{sid}.similarity"])
        self._near_duplicates(t, why, groups)
        score = self._score(values, n)
        for f in (c.score or {}).get("weights", {}):
            if f not in c.thresholds and f != c.strategy.get("cluster"):
                values.pop(f, None)   # only the combined score is needed from here on (10M x 8 bytes each)
        budget = c.budget
        if c.budget_fraction is not None:
            budget = math.floor(c.budget_fraction * n)
        selected, rank = self._strategy(t, values, score, why.open(), budget, why)

        out = ShardOutput(ctx.store, ctx.prefix, "all", sidecar=False)
        refs = why.referenced_keys(ctx, t)
        for i, shard in enumerate(t.shards):
            rows = t.shard_rows(i)
            keys = read_keys(ctx.store, ctx.raw_prefix, shard)
            texts = why.texts(rows, values, groups, refs, budget, self.config)
            lines = _decision_lines(keys, selected[rows], rank[rows], texts, None if score is None else score[rows])
            ctx.store.write_text(decisions_rel(ctx.prefix, shard), lines)
        out.count_out(int(selected.sum()))
        out.drop(int(n - selected.sum()))
        out.extra.update(drop_reasons=why.counts(), shards=len(t.shards), norm_max=maxima,
                         strategy=c.strategy["kind"], near_duplicates=sorted(groups_from),
                         # the report draws the thresholds on the score histograms without the recipe
                         thresholds=c.thresholds, score=c.score, budget=budget)
        return out.finish(n)

    # -- strategies --------------------------------------------------------------------------------
    def _strategy(self, t: Table, values: dict, score: np.ndarray | None, eligible: np.ndarray,
                  budget: int | None, why: "Reasons") -> tuple[np.ndarray, np.ndarray]:
        """Selected mask and 1-based rank (0 for dropped); records the reason of eligible drops."""
        c, st = self.config, self.config.strategy
        n = len(t)
        kind = st["kind"]
        if kind == "topk":
            idx = np.flatnonzero(eligible)
            s = np.full(len(idx), np.nan) if score is None else score[idx]
            key = -s if c.descending else s
            # missing scores (kept by keep_missing) rank last; ties break by raw order
            order = idx[np.lexsort((idx, np.nan_to_num(key, nan=0.0), np.isnan(key)))]
            del idx, s, key
            rank = np.zeros(n, np.int32)
            rank[order] = np.arange(1, len(order) + 1)
            selected = eligible.copy()
            if budget is not None:
                over = np.zeros(n, bool)
                over[order[budget:]] = True
                selected[over] = False
                why.set(over, OVER_BUDGET_RANK, rank)
            rank[~selected] = 0
            return selected, rank
        # the strategies below take "higher is better"; a missing score (keep_missing) is the worst
        better = np.zeros(n) if score is None else (score if c.descending else -score)
        finite = better[eligible & np.isfinite(better)]
        floor = (finite.min() - 1.0) if len(finite) else 0.0
        better = np.where(np.isnan(better), floor, better)
        if kind == "cluster_proportional":
            cl = values[st["cluster"]]
            sel = S.cluster_proportional(better, np.nan_to_num(cl, nan=-1).astype(np.int64), budget, eligible,
                                         quota_budget=st["quota_budget"], descending=True)
        elif kind == "diversity_greedy":
            ekey = embedding_key(st["embedding"])
            emb = t.embeddings[ekey]
            why.set(eligible & ~t.present[ekey], MISSING, why.field(ekey))
            eligible = why.open()
            sel = S.diversity_greedy(better, emb, budget if budget is not None else int(eligible.sum()), eligible,
                                     k_nearest=st["k_nearest"], gamma=float(st["gamma"]), negative=st["negative"])
        else:
            labels = values[st["label"]]
            labels = np.char.decode(labels, "utf-8") if labels.dtype.kind == "S" else labels
            sel = S.quotas(labels, better, budget, eligible, shares=st["shares"], counts=st["counts"],
                           fill=st["fill"])
        selected = sel.selected & eligible
        rank = np.where(selected, sel.rank, 0).astype(np.int32)
        dropped = eligible & ~selected
        detail = sel.detail or {}
        why.detail = {"quota": detail.get("quota"), "final": detail.get("final_difficulty"),
                      "start": detail.get("start_difficulty", better)}
        code = np.asarray(sel.reason)
        for name, kind_code in (("cluster_quota", CLUSTER_QUOTA), ("quota_full", QUOTA_FULL),
                                ("diversity_penalty", DIVERSITY)):
            s_code = next(k for k, v in S.REASON_NAMES.items() if v == name)
            quota = why.detail["quota"]
            why.set(dropped & (code == s_code), kind_code, quota if quota is not None else 0)
        why.set(dropped, OVER_BUDGET, 0)
        return selected, rank


# Reason kinds, in rule order. A row's reason is one kind plus one integer argument; the text is built
# only when its shard's decision file is written, so 10M drops never become 10M Python strings.
QUARANTINED, MISSING, BELOW_MIN, ABOVE_MAX, EXACT_DUP = 1, 2, 3, 4, 5
OVER_BUDGET_RANK, OVER_BUDGET, CLUSTER_QUOTA, QUOTA_FULL, DIVERSITY = 6, 7, 8, 9, 10
CONTAMINATED = 11
NEAR_DUP = 16   # + the index of the dedup stage
KIND_NAMES = {QUARANTINED: "quarantined", MISSING: "missing_score", BELOW_MIN: "below_min",
              ABOVE_MAX: "above_max", EXACT_DUP: "exact_duplicate", OVER_BUDGET_RANK: "over_budget",
              OVER_BUDGET: "over_budget", CLUSTER_QUOTA: "cluster_quota", QUOTA_FULL: "quota_full",
              DIVERSITY: "diversity_penalty", CONTAMINATED: "contaminated"}


@functools.lru_cache(maxsize=65536)
def _json_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=True)


class Reasons:
    """Per-row reason kind (uint8) and argument (int64), set by rules in order: :meth:`set` only fills
    rows that have no reason yet."""

    def __init__(self, n: int, quarantine_reasons: list[str], dedup_ids: list[str]):
        self.kind = np.zeros(n, np.uint8)
        self.arg = np.zeros(n, np.int64)
        self.quarantine_reasons = quarantine_reasons
        self.dedup_ids = dedup_ids
        self.contam_ids: list[str] = []   # decontaminate stage ids (argument of CONTAMINATED)
        self.fields: list[str] = []
        self.detail: dict = {}

    def field(self, name: str) -> int:
        if name not in self.fields:
            self.fields.append(name)
        return self.fields.index(name)

    def open(self) -> np.ndarray:
        return self.kind == 0

    def set(self, mask: np.ndarray, kind: int, arg) -> None:
        hit = mask & (self.kind == 0)
        self.kind[hit] = kind
        self.arg[hit] = arg[hit] if isinstance(arg, np.ndarray) else arg

    def referenced_keys(self, ctx: StageContext, t: Table) -> dict[int, str]:
        """Keys of the rows that reasons name (kept copies of duplicates), read shard by shard."""
        rows = np.unique(self.arg[(self.kind == EXACT_DUP) | (self.kind >= NEAR_DUP)])
        out: dict[int, str] = {}
        if not len(rows):
            return out
        shard_of = np.searchsorted(t.shard_offsets, rows, side="right") - 1
        for s in np.unique(shard_of):
            keys = read_keys(ctx.store, ctx.raw_prefix, t.shards[s])
            for r in rows[shard_of == s]:
                out[int(r)] = keys[r - t.shard_offsets[s]].decode()
        return out

    def texts(self, rows: slice, values: dict, groups: dict, refs: dict[int, str], budget, cfg) -> list:
        """The reason of every row of a shard as a JSON string literal (None for selected rows).

        Most texts are built from numbers and hex keys, which need no escaping; texts with free text
        (quarantine reasons, labels, field names) go through ``json.dumps``."""
        out: list = []
        kinds, args = self.kind[rows].tolist(), self.arg[rows].tolist()
        start = rows.start
        st = cfg.strategy
        js = _json_str
        for j, (k, a) in enumerate(zip(kinds, args)):
            if k == 0:
                out.append(None)
                continue
            i = start + j
            if k == OVER_BUDGET_RANK:
                out.append(f'"over_budget: rank {a} > {budget}"')
            elif k == OVER_BUDGET:
                out.append(f'"over_budget: budget {budget}"')
            elif k == CLUSTER_QUOTA:
                out.append(f'"cluster_quota: cluster {int(values[st["cluster"]][i])} quota {a}"')
            elif k == QUARANTINED:
                out.append(js(f"quarantined: {self.quarantine_reasons[a]}"))
            elif k == CONTAMINATED:
                out.append(js(f"contaminated: {_text(values[self.contam_ids[a] + '.reason'][i])}"))
            elif k == MISSING:
                out.append(js(f"missing_score: {self.fields[a]}"))
            elif k in (BELOW_MIN, ABOVE_MAX):
                f = self.fields[a]
                rule = cfg.thresholds[f]
                v = values[f][i]
                out.append(js(f"below_min: {f}={v:.6g} < {rule['min']}" if k == BELOW_MIN
                              else f"above_max: {f}={v:.6g} > {rule['max']}"))
            elif k == EXACT_DUP:
                out.append(js(f"exact_duplicate: same images and text as {refs[a]}"))
            elif k >= NEAR_DUP:
                sid = self.dedup_ids[k - NEAR_DUP]
                sim = groups[sid][2][i]
                how = f"similarity {sim:.4f}" if math.isfinite(sim) else "same group"
                out.append(js(f"near_duplicate_of: {refs[a]} ({how}, {sid})"))
            elif k == QUOTA_FULL:
                out.append(js(f"quota_full: {st['label']}={_text(values[st['label']][i])} quota {a}"))
            else:
                fin = self.detail.get("final")
                out.append(js(f"diversity_penalty: difficulty {self.detail['start'][i]:.6g} -> {fin[i]:.6g} "
                              "after penalties" if fin is not None else "diversity_penalty"))
        return out

    def counts(self) -> dict[str, int]:
        """Drops per reason name."""
        c: Counter = Counter()
        for k, n in enumerate(np.bincount(self.kind).tolist()):
            if k and n:
                c["near_duplicate_of" if k >= NEAR_DUP else KIND_NAMES[k]] += n
        return dict(sorted(c.items()))


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _decision_lines(keys: np.ndarray, selected: np.ndarray, rank: np.ndarray, reason: list,
                    score: np.ndarray | None) -> str:
    """The shard's decision file: ``json.dumps(d, sort_keys=True)`` per sample, built without a dict
    per sample (10M lines in seconds). Keys are hex; ``reason`` holds JSON string literals; a float's ``repr`` is what ``json.dumps`` writes for it."""
    keys_t = keys.astype(str).tolist()
    sc = [""] * len(keys_t) if score is None else \
        [f', "score": {x!r}' if x == x and x not in (INF, -INF) else "" for x in score.tolist()]
    return "".join(
        f'{{"key": "{k}", "rank": {r}{s}, "selected": true}}\n' if sel else
        f'{{"key": "{k}", "reason": {why}{s}, "selected": false}}\n'
        for k, sel, r, why, s in zip(keys_t, selected.tolist(), rank.tolist(), reason, sc))
