"""Judge QA (``curate eval judge``): can a run's LLM judges be trusted?

From the judge outputs already in a run's store (``judge_score`` and ``judge_gavie`` sidecars, their
quarantine files and ``_stats``) and, optionally, an eval-GAVIE results file and a reference-labelled set,
it reports per judge stage:

* **repeat agreement**: each model of a ``judge_score`` stage with ``repeats > 1`` is a set of "coders"
  (repeat 0, 1, ...) over the samples: Krippendorff's alpha (interval metric);
* **inter-judge agreement**: the models of one stage (``judges: [a, b]``, each model's mean over its
  repeats), and across stages: every pair of judge stages that scored the same raw samples (e.g. the
  same prompt under two judge models, ``as: judge_a`` / ``as: judge_b``), on the normalised score
  (``score_norm``; GAVIE: ``accuracy / 10``). Alpha over the stages, and ICC(2,1) where every sample has
  every rating;
* **calibration** against a reference set (JSONL ``{"key" | "source_id": ..., "score": x}``, on the
  judge's scale; GAVIE: ``accuracy`` scale 0-10): MAE and Spearman's rho;
* **position bias** (``--gavie-results``, the per-item JSONL of ``curate eval gavie --results`` with
  ``--answers-per-prompt >= 2``): the mean score at each position, and with ``--swap-order`` the paired
  difference ``score when first - score when second`` per item (0 when unbiased);
* **parse failures and re-asks**: replies that did not parse (``judge_score`` keeps them in the sidecar's
  ``replies``), samples quarantined ``unparseable_reply`` and the re-asks counted in ``_stats.llm.reasks``.

The statistics are plain functions over arrays (:func:`krippendorff_alpha_interval`, :func:`icc`,
:func:`spearman`, :func:`mae`) that the tests check against textbook examples.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from typing import Iterable

import numpy as np


# -- statistics --------------------------------------------------------------------------------
def krippendorff_alpha_interval(data) -> float:
    """Krippendorff's alpha with the interval metric ``(a - b)^2``.

    ``data``: ``[coders, units]``, NaN where a coder did not rate a unit. Only units with at least two
    ratings are pairable. ``alpha = 1 - D_o / D_e`` with ``D_o = (1/n) sum_u sum_{i != j in u} (v_i - v_j)^2
    / (m_u - 1)`` and ``D_e = (1/(n (n-1))) sum_{i != j over all n pairable values} (v_i - v_j)^2``.
    NaN when fewer than two pairable units' values or when every value is the same (no variation)."""
    x = np.asarray(data, dtype=float)
    if x.ndim != 2:
        raise ValueError("want a [coders, units] matrix")
    d_o, values = 0.0, []
    for u in range(x.shape[1]):
        v = x[:, u][~np.isnan(x[:, u])]
        m = len(v)
        if m < 2:
            continue
        # sum over ordered pairs i != j of (v_i - v_j)^2 = 2 (m sum v^2 - (sum v)^2)
        d_o += 2.0 * (m * float(np.sum(v * v)) - float(np.sum(v)) ** 2) / (m - 1)
        values.append(v)
    if not values:
        return float("nan")
    allv = np.concatenate(values)
    n = len(allv)
    d_e_sum = 2.0 * (n * float(np.sum(allv * allv)) - float(np.sum(allv)) ** 2)
    if n < 2 or d_e_sum <= 0:
        return float("nan")
    d_o /= n
    d_e = d_e_sum / (n * (n - 1))
    return 1.0 - d_o / d_e


def icc(ratings, kind: str = "2,1") -> float:
    """Shrout & Fleiss intraclass correlation of a complete ``[targets, raters]`` matrix.

    ``1,1``: one-way random; ``2,1``: two-way random, absolute agreement (raters are a sample of judges);
    ``3,1``: two-way mixed, consistency. NaN for fewer than 2 targets or raters."""
    x = np.asarray(ratings, dtype=float)
    if x.ndim != 2 or np.isnan(x).any():
        raise ValueError("icc wants a complete [targets, raters] matrix")
    n, k = x.shape
    if n < 2 or k < 2:
        return float("nan")
    grand = x.mean()
    ss_rows = k * float(np.sum((x.mean(axis=1) - grand) ** 2))
    ss_cols = n * float(np.sum((x.mean(axis=0) - grand) ** 2))
    ss_tot = float(np.sum((x - grand) ** 2))
    ss_err = ss_tot - ss_rows - ss_cols
    bms = ss_rows / (n - 1)
    wms = (ss_tot - ss_rows) / (n * (k - 1))
    jms = ss_cols / (k - 1)
    ems = ss_err / ((n - 1) * (k - 1))
    if kind == "1,1":
        den = bms + (k - 1) * wms
        return (bms - wms) / den if den else float("nan")
    if kind == "2,1":
        den = bms + (k - 1) * ems + k * (jms - ems) / n
        return (bms - ems) / den if den else float("nan")
    if kind == "3,1":
        den = bms + (k - 1) * ems
        return (bms - ems) / den if den else float("nan")
    raise ValueError(f"icc kind {kind!r}: want 1,1 / 2,1 / 3,1")


def average_ranks(a) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    a = np.asarray(a, dtype=float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    s = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rho: Pearson correlation of the average ranks (ties handled). NaN when either side is
    constant or fewer than 2 pairs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError("spearman: different lengths")
    if len(a) < 2:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(np.sum(ra * ra)) * float(np.sum(rb * rb)))
    return float(np.sum(ra * rb)) / den if den else float("nan")


def mae(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.mean(np.abs(a - b))) if len(a) else float("nan")


def _col_means(mat: np.ndarray) -> np.ndarray:
    """Column means ignoring NaN; NaN where a column has no value."""
    ok = ~np.isnan(mat)
    cnt = ok.sum(axis=0)
    tot = np.where(ok, mat, 0.0).sum(axis=0)
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


# -- reading judge outputs ---------------------------------------------------------------------
def judge_ratings(side: dict) -> list[dict]:
    """``[{model, repeat, order, value}]`` of one ``judge_score`` sidecar: its ``ratings`` when stored,
    else rebuilt from ``replies`` (models x repeats in request order; a reply with ``parse: null`` holds
    the next of ``values``)."""
    if isinstance(side.get("ratings"), list):
        return side["ratings"]
    out, vals = [], iter(side.get("values") or [])
    seen: Counter = Counter()
    for rep in side.get("replies") or []:
        m = rep.get("model")
        k = seen[m]
        seen[m] += 1
        if rep.get("parse") is None and rep.get("raw") is not None:
            out.append({"model": m, "repeat": k, "order": "forward", "value": next(vals)})
    return out


def stage_kind(side: dict) -> str | None:
    if "values" in side and "scale" in side:
        return "judge_score"
    if "accuracy" in side and "relevancy" in side and "turns" in side:
        return "judge_gavie"
    return None


def read_stage(store, prefix: str) -> dict:
    """One judge stage's outputs: ``{kind, samples: {key: sidecar}, quarantine: Counter, llm: {...}}``
    (``llm`` sums the shards' ``_stats.llm`` counters). ``kind`` None when the stage is not a judge."""
    from ..shards import iter_members
    from ..stage import read_quarantine

    samples: dict[str, dict] = {}
    quarantine: Counter = Counter()
    llm: Counter = Counter()
    kind = None
    for name in sorted(store.list(f"{prefix}/_stats")):
        unit = name.rsplit("/", 1)[-1].removesuffix(".json")
        st = json.loads(store.read_text(f"{prefix}/_stats/{name.rsplit('/', 1)[-1]}"))
        for k, v in (st.get("llm") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                llm[k] += v
        for q in read_quarantine(store, prefix, unit):
            quarantine[q.get("reason", "?")] += 1
        if not store.exists(f"{prefix}/{unit}.tar"):
            continue
        for m in iter_members(store.uri(f"{prefix}/{unit}.tar")):
            if "json" not in m:
                continue
            side = json.loads(m["json"])
            kind = kind or stage_kind(side)
            samples[m["__key__"]] = side
    return {"kind": kind, "samples": samples, "quarantine": quarantine, "llm": dict(llm)}


def norm_score(kind: str, side: dict) -> float:
    """The judgement on [0, 1]: ``score_norm`` (judge_score) or ``accuracy / 10`` (GAVIE)."""
    return float(side["score_norm"]) if kind == "judge_score" else float(side["accuracy"]) / 10.0


def raw_score(kind: str, side: dict) -> float:
    return float(side["score"]) if kind == "judge_score" else float(side["accuracy"])


def stage_report(info: dict, reference: dict | None = None) -> dict:
    """Agreement, parse failures, re-asks and calibration of one judge stage (see the module doc)."""
    kind, samples = info["kind"], info["samples"]
    keys = sorted(samples)
    rep: dict = {"kind": kind, "samples": len(keys)}
    asked = parse_failed = 0
    if kind == "judge_score":
        ratings = {k: judge_ratings(samples[k]) for k in keys}
        for k in keys:
            asked += int(samples[k].get("n", 0))
            parse_failed += sum(1 for r in samples[k].get("replies") or []
                                if r.get("parse") and r["parse"].get("reason") != "llm_call_failed")
        models = sorted({r["model"] for rs in ratings.values() for r in rs})
        repeats = max((r["repeat"] for rs in ratings.values() for r in rs), default=0) + 1
        lo, hi = samples[keys[0]]["scale"] if keys else (0.0, 1.0)
        rep["scale"] = [lo, hi]
        rep["models"] = models
        rep["repeats"] = repeats
        per_model = {}
        for m in models:
            mat = np.full((repeats, len(keys)), np.nan)
            for j, k in enumerate(keys):
                for r in ratings[k]:
                    if r["model"] == m:
                        mat[r["repeat"], j] = r["value"]
            per_model[m] = mat
        rep["repeat_alpha"] = {m: _num(krippendorff_alpha_interval(per_model[m])) if repeats > 1 else None
                               for m in models}
        if len(models) > 1:
            means = np.vstack([_col_means(per_model[m]) for m in models])
            rep["inter_judge_alpha"] = _num(krippendorff_alpha_interval(means))
            complete = means[:, ~np.isnan(means).any(axis=0)]
            rep["inter_judge_icc2_1"] = _num(icc(complete.T)) if complete.shape[1] >= 2 else None
        else:
            rep["inter_judge_alpha"] = None
            rep["inter_judge_icc2_1"] = None
    else:
        for k in keys:
            asked += int(samples[k].get("n_turns", 0))
        rep["scale"] = [0.0, 10.0]
    unparseable = int(info["quarantine"].get("unparseable_reply", 0))
    reasks = int(info["llm"].get("reasks", 0))
    total = len(keys) + sum(info["quarantine"].values())
    rep["parse"] = {"replies_unparsed_in_kept_samples": parse_failed,
                    "samples_quarantined_unparseable": unparseable,
                    "unparseable_sample_share": _num(unparseable / total) if total else None,
                    "reasks": reasks, "requests": int(info["llm"].get("requests", 0)),
                    "reask_share": _num(reasks / info["llm"]["requests"]) if info["llm"].get("requests") else None}
    if reference:
        pairs = [(raw_score(kind, samples[k]), reference[k]) for k in keys if k in reference]
        rep["calibration"] = {"n": len(pairs),
                              "mae": _num(mae([p[0] for p in pairs], [p[1] for p in pairs])) if pairs else None,
                              "spearman": _num(spearman([p[0] for p in pairs], [p[1] for p in pairs]))
                              if len(pairs) > 1 else None}
    return rep


def cross_stage_agreement(stages: dict[str, dict]) -> dict | None:
    """Alpha (and ICC(2,1) on the samples every stage scored) over the judge stages' normalised scores,
    on the union of their samples (a stage that did not score a sample leaves a gap)."""
    ids = sorted(stages)
    if len(ids) < 2:
        return None
    keys = sorted(set().union(*(stages[i]["samples"] for i in ids)))
    mat = np.full((len(ids), len(keys)), np.nan)
    for a, sid in enumerate(ids):
        info = stages[sid]
        for j, k in enumerate(keys):
            if k in info["samples"]:
                mat[a, j] = norm_score(info["kind"], info["samples"][k])
    complete = mat[:, ~np.isnan(mat).any(axis=0)]
    return {"stages": ids, "samples": len(keys), "alpha": _num(krippendorff_alpha_interval(mat)),
            "icc2_1": _num(icc(complete.T)) if complete.shape[1] >= 2 else None,
            "complete_samples": int(complete.shape[1])}


def position_bias(results: Iterable[dict], field: str = "accuracy") -> dict:
    """Position bias from ``curate eval gavie --results`` rows.

    Every ok row scored at a position (``position``, 1-based, ``group_size``) adds to that position's
    mean. Rows that carry ``by_order`` (``--swap-order``: ``{"forward": {position, accuracy, relevancy},
    "reversed": {...}}``) give the paired bias: for each item, the score where it stood first minus the
    score where it stood last, averaged (0 for an unbiased judge)."""
    by_pos: dict[int, list[float]] = {}
    paired: list[float] = []
    for r in results:
        orders = r.get("by_order") or {}
        for o in orders.values() if orders else [r]:
            if o.get(field) is None or not o.get("position") or (o.get("group_size") or r.get("group_size", 1)) < 2:
                continue
            by_pos.setdefault(int(o["position"]), []).append(float(o[field]))
        if len(orders) == 2 and all(o.get(field) is not None for o in orders.values()):
            f, b = orders["forward"], orders["reversed"]
            if f["position"] != b["position"]:
                first, last = (f, b) if f["position"] < b["position"] else (b, f)
                paired.append(float(first[field]) - float(last[field]))
    return {"field": field,
            "mean_by_position": {str(p): _num(float(np.mean(v))) for p, v in sorted(by_pos.items())},
            "n_by_position": {str(p): len(v) for p, v in sorted(by_pos.items())},
            "paired_first_minus_last": _num(float(np.mean(paired))) if paired else None,
            "paired_n": len(paired)}


def read_reference(path: str, store, raw_prefix: str = "raw") -> dict[str, float]:
    """Reference labels ``key -> score`` from JSONL ``{"key" | "source_id": ..., "score": x}``; a
    ``source_id`` is mapped to the raw sample(s) with that ``source.original_id``."""
    from ..shards import iter_samples
    from ..stage import PermanentInputError, raw_shards

    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            d = json.loads(line)
            if not isinstance(d.get("score"), (int, float)) or ("key" not in d and "source_id" not in d):
                raise PermanentInputError(f"{path} line {i + 1}: want {{key|source_id, score: number}}")
            rows.append(d)
    out = {str(d["key"]): float(d["score"]) for d in rows if "key" in d}
    by_src = {str(d["source_id"]): float(d["score"]) for d in rows if "key" not in d}
    if by_src:
        for shard in raw_shards(store, raw_prefix):
            for s in iter_samples(store, f"{raw_prefix}/{shard}", with_images=False):
                if s.source.original_id in by_src:
                    out[s.key] = by_src[s.source.original_id]
    return out


def judge_report(store, current: set[str] | None = None, reference_path: str | None = None,
                 gavie_results: str | None = None) -> dict:
    """The whole report (see the module docstring) of the judge stages in ``store``."""
    from ..audit import stage_prefixes

    stages = {}
    for p in stage_prefixes(store):
        if not p.startswith("stages/") or (current is not None and p not in current):
            continue
        info = read_stage(store, p)
        if info["kind"] is not None:
            stages[p] = info
    reference = read_reference(reference_path, store) if reference_path else None
    out: dict = {"stages": {p: stage_report(info, reference) for p, info in stages.items()}}
    out["cross_stage"] = cross_stage_agreement(stages)
    if gavie_results:
        with open(gavie_results, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out["position_bias"] = {fld: position_bias(rows, fld) for fld in ("accuracy", "relevancy")}
    if not stages:
        out["problems"] = ["no judge_score or judge_gavie output found under this prefix"]
    return out


def format_report(rep: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = []
    for p, r in rep["stages"].items():
        lines.append(f"{p} ({r['kind']}, {r['samples']} samples)")
        if r["kind"] == "judge_score":
            for m, a in r["repeat_alpha"].items():
                lines.append(f"  repeat agreement {m}: alpha={f(a)}" +
                             ("" if r["repeats"] > 1 else " (needs repeats > 1)"))
            if r["inter_judge_alpha"] is not None:
                lines.append(f"  inter-judge agreement: alpha={f(r['inter_judge_alpha'])} "
                             f"ICC(2,1)={f(r['inter_judge_icc2_1'])}")
        pa = r["parse"]
        lines.append(f"  parse failures: {pa['replies_unparsed_in_kept_samples']} replies in kept samples, "
                     f"{pa['samples_quarantined_unparseable']} samples quarantined "
                     f"(share {f(pa['unparseable_sample_share'])}); re-asks {pa['reasks']} of "
                     f"{pa['requests']} requests")
        if "calibration" in r:
            c = r["calibration"]
            lines.append(f"  calibration: n={c['n']} MAE={f(c['mae'])} Spearman={f(c['spearman'])}")
    cs = rep.get("cross_stage")
    if cs:
        lines.append(f"across stages {', '.join(cs['stages'])}: alpha={f(cs['alpha'])} "
                     f"ICC(2,1)={f(cs['icc2_1'])} on {cs['complete_samples']} samples scored by all")
    for fld, pb in (rep.get("position_bias") or {}).items():
        lines.append(f"position bias ({fld}): mean by position {pb['mean_by_position']}, "
                     f"first - last (paired, n={pb['paired_n']}) = {f(pb['paired_first_minus_last'])}")
    for prob in rep.get("problems", []):
        lines.append(f"problem: {prob}")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``curate eval judge``."""
    p.add_argument("prefix", help="run prefix (directory or s3://)")
    p.add_argument("--recipe", help="only this recipe's current judge outputs; its storage.options read PREFIX")
    p.add_argument("--reference", help="JSONL {key|source_id, score}: reference labels on the judge's scale")
    p.add_argument("--gavie-results", help="per-item JSONL of 'curate eval gavie --results' (position bias)")
    p.add_argument("--json", action="store_true", help="machine-readable report")


def run(args: argparse.Namespace) -> int:
    """``curate eval judge``: exit 0 when at least one judge stage was found, 1 otherwise."""
    from ..audit import current_prefixes
    from ..pipeline import load_recipe
    from ..storage import open_store

    r = load_recipe(args.recipe, prefix=args.prefix) if args.recipe else None
    store = open_store(args.prefix, r.storage_options if r else None)
    rep = judge_report(store, current_prefixes(r) if r else None, args.reference, args.gavie_results)
    sys.stdout.write(json.dumps(rep, indent=1, sort_keys=True) + "\n" if args.json else format_report(rep))
    return 0 if rep["stages"] else 1
