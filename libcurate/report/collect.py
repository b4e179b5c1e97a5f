"""Everything the report shows, gathered in ONE streaming pass over the raw shards (then a second, bounded
read of the few raw shards whose thumbnails are shown).

Per raw shard it reads the raw column file, every sidecar stage's column file and quarantine, and the
selection's decision file, and updates:

* a :class:`~libcurate.report.sampling.StreamingHistogram` per stored numeric score, kept vs dropped;
* uniform samples of fixed size (:class:`~libcurate.report.sampling.BottomK`, priorities from a hash of
  each key): the embedding map's points (with their embedding rows), a gallery per cluster, per drop
  reason, and the near-duplicate groups to show (chosen by a hash of the group's key, all their members);
* the kept samples with the best ranks;
* judge agreement (stdev of repeated judgements) and partial-parse counts.

Memory is bounded by the sample sizes (``MAP_POINTS`` embedding rows, a few hundred gallery entries),
not by the number of samples; time is one read of the column and decision files. The funnel and the LLM
cost come from the stages' ``_stats`` (:func:`libcurate.audit.audit`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import itertools
import json
import re
import tempfile
from dataclasses import dataclass, field

import numpy as np

from ..audit import audit
from ..columns import KEY_COL, _align, read_columns, read_embedding
from ..stage import raw_shards, read_quarantine, unit_of
from .run import RunView
from .sampling import BottomK, StreamingHistogram, priorities

MAP_POINTS = 2000       # points of the embedding map
GALLERY = 6             # thumbnails per drop reason
CLUSTER_GALLERY = 4     # thumbnails per cluster
CLUSTERS_SHOWN = 16     # cluster galleries (the largest clusters)
DUP_GROUPS = 8          # near-duplicate groups shown
DUP_MEMBERS = 6         # members shown per group
TOP_KEPT = 12           # best-ranked kept samples
PREFETCH_SHARDS = 8     # raw shards whose files are read ahead, in parallel, during the pass
GALLERY_SHARDS = 32     # galleries draw from these raw shards first (a uniform sample of shards by hash), so
                        # the thumbnails come from a bounded number of tars however large the run
SEED = 0
# Leaves that are counts, ids or sizes rather than scores: no histogram.
NOT_SCORES = {"n_images", "n_texts", "n_truncated", "context_length", "group_rank", "cluster", "n", "n_valid",
              "n_turns", "turns", "width", "height"}
_LIST_ITEM = re.compile(r"(^|\.)\d+(\.|$)")


def is_score(path: str) -> bool:
    """A numeric leaf worth a histogram: not a list element (``per_image.0``) nor a count or id."""
    return not _LIST_ITEM.search(path) and path.split(".")[-1] not in NOT_SCORES


@dataclass
class ReportData:
    """What the page is rendered from (plain numbers, lists and small arrays; see :func:`collect`)."""

    run: str
    n_samples: int = 0
    n_kept: int = 0
    audit: dict = field(default_factory=dict)
    select_config: dict = field(default_factory=dict)
    drop_reasons: dict = field(default_factory=dict)
    histograms: dict = field(default_factory=dict)      # "<stage>.<field>" -> StreamingHistogram (0 kept, 1 dropped)
    map_sample: dict = field(default_factory=dict)      # emb [m, d] float32, cluster, selected, shard, key
    map_embedding: str | None = None
    map_total: int = 0                                  # samples that had the embedding
    clusters: dict = field(default_factory=dict)        # cluster id -> {"size", "kept", "sample": [(shard, key)]}
    cluster_stage: str | None = None
    reasons: dict = field(default_factory=dict)         # reason kind -> [(shard, key, reason text)]
    dup_groups: list = field(default_factory=list)      # [{"group", "members": [(shard, key, rank, sim)]}]
    dup_stage: str | None = None
    dup_total: int = 0                                  # groups seen
    top_kept: list = field(default_factory=list)        # [(rank, shard, key)]
    judges: dict = field(default_factory=dict)          # stage id -> agreement / parse figures
    llm: dict = field(default_factory=dict)             # stage id -> summed _stats.llm
    decisions: dict = field(default_factory=dict)       # (shard, key) -> decision, for the shown samples
    clusters_shown: list = field(default_factory=list)  # cluster ids with a gallery (the largest)


def _decision_lines(view: RunView, shard: str) -> list[str] | None:
    if not view.select:
        return None
    rel = f"{view.select}/decisions/{unit_of(shard)}.jsonl"
    if not view.store.exists(rel):
        return None
    return [x for x in view.store.read_text(rel).splitlines() if x.strip()]


def parse_decisions(lines: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(selected, rank, reason kind) of a decision file's lines. The lines are ``json.dumps(sort_keys=True)``
    objects (``selected`` last), read with string operations (a third of ``json.loads``'s time over 10M
    lines); a line of another shape is parsed as JSON."""
    n = len(lines)
    selected, rank, kinds = np.zeros(n, bool), np.zeros(n, np.int64), [""] * n
    for i, x in enumerate(lines):
        try:
            if x.endswith('"selected": true}'):
                selected[i] = True
                j = x.find('"rank": ')
                rank[i] = int(x[j + 8: x.index(",", j)]) if j >= 0 else 0
            elif x.endswith('"selected": false}'):
                j = x.index('"reason": "') + 11
                kinds[i] = x[j: x.index('"', j)].split(":", 1)[0]
            else:
                raise ValueError
        except ValueError:
            d = json.loads(x)
            selected[i], rank[i] = bool(d["selected"]), int(d.get("rank") or 0)
            kinds[i] = "" if d["selected"] else str(d.get("reason", "")).split(":", 1)[0]
    return selected, rank, np.array(kinds)


def _pick_embedding(view: RunView) -> tuple[str, str] | None:
    """The embedding to map: the image embedding of the first stage that stored one (``img_emb``
    preferred), as (stage id, name)."""
    found = []
    for sid, prefix in view.stages.items():
        names = sorted({n.split(".")[-2] for n in view.store.list(f"{prefix}/_columns") if n.endswith(".npy")})
        found += [(sid, n) for n in names]
    found.sort(key=lambda x: (x[1] != "img_emb", "txt" in x[1]))
    return found[0] if found else None


def collect(view: RunView) -> ReportData:
    """One pass over the run (see the module docstring)."""
    current = {"raw", *view.stages.values(), *([view.select] if view.select else [])}
    # the audit (every shard's stats and quarantine, one request at a time on S3) runs beside the pass
    data = ReportData(run=view.store.url, select_config=dict(view.select_config))
    data.drop_reasons = view.select_stats().get("drop_reasons", {})
    emb = _pick_embedding(view)
    data.map_embedding = f"{emb[0]}.{emb[1]}" if emb else None
    map_s = BottomK(MAP_POINTS)
    reason_s: dict[str, BottomK] = {}
    cluster_s: dict[int, BottomK] = {}
    cluster_n: dict[int, list[int]] = {}
    top = BottomK(TOP_KEPT)
    groups: dict[bytes, dict] = {}
    judge_acc: dict[str, dict] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as auditing, \
            tempfile.TemporaryDirectory(prefix="curate-report-") as scratch:
        audit_f = auditing.submit(audit, view.store, current)
        group_seen, key_of = _pass(view, data, emb, scratch, map_s, reason_s, cluster_s, cluster_n, top, groups,
                                   judge_acc)
        rep = audit_f.result()
    # only the stages the report is about (the export itself is still running when it writes the report)
    rep["stages"] = {p: a for p, a in rep["stages"].items() if p in current}
    data.audit = rep
    shards = raw_shards(view.store, view.raw_prefix)
    if len(map_s):
        si_arr, rows = map_s.payload["shard"], map_s.payload["row"]
        data.map_sample = {"emb": map_s.payload["emb"], "shard": [shards[s] for s in si_arr.tolist()],
                           "key": [key_of[(int(s), int(r))][0] for s, r in zip(si_arr, rows)],
                           "cluster": np.array([key_of[(int(s), int(r))][1] for s, r in zip(si_arr, rows)]),
                           "selected": np.array([key_of[(int(s), int(r))][2] for s, r in zip(si_arr, rows)])}
    largest = sorted(cluster_n, key=lambda c: (-cluster_n[c][0], c))[:CLUSTERS_SHOWN]
    data.clusters = {c: {"size": cluster_n[c][0], "kept": cluster_n[c][1],
                         "sample": _pairs(cluster_s[c], shards, key_of)} for c in sorted(cluster_n)}
    data.clusters_shown = sorted(largest)
    data.reasons = {k: _pairs(b, shards, key_of) for k, b in sorted(reason_s.items())}
    data.top_kept = [(int(r), shards[int(s)], key_of[(int(s), int(row))][0])
                     for r, s, row in zip(top.prio.tolist(), top.payload.get("shard", []),
                                          top.payload.get("row", []))]
    data.dup_groups = [{"group": g.decode(), "size": v["size"], "members": v["members"]}
                       for g, v in sorted(groups.items(), key=lambda kv: kv[1]["prio"])]
    data.dup_total = group_seen
    data.judges = {sid: _judge_summary(acc) for sid, acc in judge_acc.items()}
    data.llm = _llm_stats(view, rep)
    return data


def _pass(view: RunView, data: ReportData, emb, scratch: str, map_s: BottomK, reason_s: dict, cluster_s: dict,
          cluster_n: dict, top: BottomK, groups: dict, judge_acc: dict) -> tuple:
    """The streaming pass: one raw shard at a time, every stage's files for it read once. Returns the
    distinct duplicate groups seen and (shard index, row) -> (key, cluster, selected) of sampled rows."""
    group_seen = 0
    key_of: dict = {}
    shards = raw_shards(view.store, view.raw_prefix)
    preferred = gallery_shards(shards)
    for si, shard, (raw, dec, stage_files) in _prefetched(view, shards, emb, scratch):
        unit = unit_of(shard)
        keys = raw[KEY_COL]
        n = len(keys)
        prio = priorities(keys, SEED)
        # galleries: rows of the preferred shards first (uniform among them), others only to fill a gallery
        gprio = (prio >> np.uint64(1)) | (np.uint64(0) if shard in preferred else np.uint64(1 << 63))
        if dec is not None and len(dec) != n:
            dec = None  # a decision file from another raw shard set: show no kept/dropped split
        if dec is not None:
            selected, rank, kinds = parse_decisions(dec)
        else:
            selected, rank, kinds = np.ones(n, bool), np.zeros(n, np.int64), np.full(n, "")
        group = np.where(selected, 0, 1)
        data.n_samples += n
        data.n_kept += int(selected.sum())
        cluster = np.full(n, -1, np.int64)
        for sid, (q, cols, mat) in stage_files.items():
            prefix = view.stages[sid]
            pos = _align(keys, cols[KEY_COL], q, f"{prefix}/{unit}")
            for name, arr in cols.items():
                if name.startswith("f:") and is_score(name[2:]):
                    h = data.histograms.setdefault(f"{sid}.{name[2:]}", StreamingHistogram())
                    h.add(arr, group[pos])
            if "f:cluster" in cols and "s:group" not in cols:
                data.cluster_stage = data.cluster_stage or sid
                if data.cluster_stage == sid:
                    cluster[pos] = np.nan_to_num(cols["f:cluster"], nan=-1).astype(np.int64)
            if "s:group" in cols and (data.dup_stage in (None, sid)):
                data.dup_stage = sid
                _offer_groups(groups, cols, pos, shard, shard in preferred)
                if "f:group_rank" in cols:  # every group has one member of rank 0 (its keeper)
                    group_seen += int((cols["f:group_rank"] == 0).sum())
            if "f:n_valid" in cols and "f:n" in cols:
                _judge(judge_acc.setdefault(sid, {}), cols)
            if emb and sid == emb[0]:
                if mat is not None and len(mat):
                    data.map_total += len(pos)
                    map_s.offer(prio[pos], emb=np.asarray(mat, np.float32), row=pos,
                                shard=np.full(len(pos), si, np.int64))
        for c in np.unique(cluster[cluster >= 0]).tolist():
            rows = np.flatnonzero(cluster == c)
            cn = cluster_n.setdefault(c, [0, 0])
            cn[0] += len(rows)
            cn[1] += int(selected[rows].sum())
            cluster_s.setdefault(c, BottomK(CLUSTER_GALLERY)).offer(gprio[rows], row=rows, shard=np.full(len(rows), si))
        for kind in sorted(set(np.unique(kinds).tolist()) - {""}):
            rows = np.flatnonzero(kinds == kind)
            reason_s.setdefault(kind, BottomK(GALLERY)).offer(gprio[rows], row=rows, shard=np.full(len(rows), si))
        kept_rows = np.flatnonzero(selected & (rank > 0))
        top.offer(rank[kept_rows].astype(np.uint64), row=kept_rows, shard=np.full(len(kept_rows), si))
        # the few rows shown below get their key and decision now (the pass reads each file once)
        _remember(data, key_of, shard, keys, dec, (map_s, top, *reason_s.values(), *cluster_s.values()), groups,
                  si, cluster, selected)
    return group_seen, key_of


def gallery_shards(shards: list[str]) -> set[str]:
    """The GALLERY_SHARDS raw shards whose names hash lowest: where thumbnails are taken from first."""
    if len(shards) <= GALLERY_SHARDS:
        return set(shards)
    h = [(hashlib.sha256(f"{SEED}:{s}".encode()).hexdigest(), s) for s in shards]
    return {s for _, s in sorted(h)[:GALLERY_SHARDS]}


def _prefetched(view: RunView, shards: list[str], emb, scratch: str, ahead: int | None = None):
    """``(index, shard, (raw columns, decision lines, {stage id: (quarantined keys, columns, embedding)}))``
    in shard order, each shard's files read on a thread pool ``ahead`` shards in advance: on S3 a shard
    costs a dozen requests, which run in parallel instead of one after another (memory: ``ahead`` shards)."""
    def load(shard: str):
        unit = unit_of(shard)
        raw = read_columns(view.store, view.raw_prefix, shard, raw=True)
        files = {}
        for sid, prefix in view.stages.items():
            if not view.store.exists(f"{prefix}/_done/{unit}"):
                continue
            q = {r["key"] for r in read_quarantine(view.store, prefix, unit)}
            mat = read_embedding(view.store, prefix, shard, emb[1], scratch) if emb and sid == emb[0] else None
            files[sid] = (q, read_columns(view.store, prefix, shard), mat)
        return raw, _decision_lines(view, shard), files

    ahead = ahead or PREFETCH_SHARDS
    with concurrent.futures.ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: collections.deque = collections.deque()
        it = iter(enumerate(shards))
        for si, shard in itertools.islice(it, ahead):
            pending.append((si, shard, pool.submit(load, shard)))
        while pending:
            si, shard, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], nxt[1], pool.submit(load, nxt[1])))
            yield si, shard, fut.result()


def _pairs(b: BottomK, shards: list[str], key_of: dict) -> list[tuple[str, str]]:
    return [(shards[int(s)], key_of[(int(s), int(r))][0]) for s, r in zip(b.payload.get("shard", []),
                                                                          b.payload.get("row", []))]


def _remember(data: ReportData, key_of: dict, shard: str, keys, dec, samples: tuple, groups: dict, si: int,
              cluster, selected) -> None:
    """Keys, clusters and decisions of this shard's rows that are in a sample now (later shards may push
    them out again; what is kept is small)."""
    rows: set[int] = set()
    for b in samples:
        if len(b):
            rows.update(b.payload["row"][b.payload["shard"] == si].tolist())
    for r in sorted(rows):
        key_of[(si, r)] = (keys[r].decode(), int(cluster[r]), bool(selected[r]))
        if dec is not None:
            data.decisions[(shard, keys[r].decode())] = json.loads(dec[r])
    for g in groups.values():
        for m in g["members"]:
            if m["shard"] == shard and dec is not None and (shard, m["key"]) not in data.decisions:
                data.decisions[(shard, m["key"])] = json.loads(dec[m["row"]])


def _offer_groups(groups: dict, cols: dict, pos: np.ndarray, shard: str, preferred: bool) -> None:
    """Keep the DUP_GROUPS groups whose key hashes lowest (groups first seen in a preferred shard before
    the others), with up to DUP_MEMBERS members each."""
    g = cols["s:group"]
    has = np.flatnonzero(g != b"")
    if not len(has):
        return
    uniq = np.unique(g[has])
    pr = (priorities(uniq.astype("S24"), SEED + 1) >> np.uint64(1)) | np.uint64(0 if preferred else 1 << 63)
    cutoff = max(v["prio"] for v in groups.values()) if len(groups) >= DUP_GROUPS else None
    for gk, p in zip(uniq.tolist(), pr.tolist()):
        if gk not in groups and cutoff is not None and p >= cutoff:
            continue
        entry = groups.setdefault(gk, {"prio": p, "members": [], "size": 0})
        for i in has[g[has] == gk].tolist():
            entry["size"] += 1
            if len(entry["members"]) < DUP_MEMBERS:
                entry["members"].append({"shard": shard, "row": int(pos[i]), "key": cols[KEY_COL][i].decode(),
                                         "group_rank": _num(cols.get("f:group_rank"), i),
                                         "similarity": _num(cols.get("f:similarity"), i)})
        if len(groups) > DUP_GROUPS:
            worst = max(groups, key=lambda k: groups[k]["prio"])
            groups.pop(worst)
            cutoff = max(v["prio"] for v in groups.values())


def _num(arr, i):
    if arr is None or not np.isfinite(arr[i]):
        return None
    return float(arr[i])


def _judge(acc: dict, cols: dict) -> None:
    n, nv = cols["f:n"], cols["f:n_valid"]
    ok = np.isfinite(n) & np.isfinite(nv)
    acc["asked"] = acc.get("asked", 0) + int(n[ok].sum())
    acc["parsed"] = acc.get("parsed", 0) + int(nv[ok].sum())
    acc["samples"] = acc.get("samples", 0) + int(ok.sum())
    acc["partial"] = acc.get("partial", 0) + int((nv[ok] < n[ok]).sum())
    if "f:stdev" in cols:
        sd = cols["f:stdev"]
        multi = ok & (nv >= 2) & np.isfinite(sd)
        acc["repeated"] = acc.get("repeated", 0) + int(multi.sum())
        h = acc.setdefault("stdev_hist", StreamingHistogram(groups=1))
        h.add(sd[multi], 0)
        acc["stdev_sum"] = acc.get("stdev_sum", 0.0) + float(sd[multi].sum())
        if "f:scale.0" in cols and "f:scale.1" in cols:
            span = (cols["f:scale.1"] - cols["f:scale.0"])[multi]
            acc["stdev_norm_sum"] = acc.get("stdev_norm_sum", 0.0) + float((sd[multi] / span).sum())


def _judge_summary(acc: dict) -> dict:
    rep = acc.get("repeated", 0)
    return {"samples": acc.get("samples", 0), "asked": acc.get("asked", 0), "parsed": acc.get("parsed", 0),
            "partial_samples": acc.get("partial", 0), "repeated": rep,
            "mean_stdev": acc["stdev_sum"] / rep if rep else None,
            "mean_stdev_norm": acc.get("stdev_norm_sum", 0.0) / rep if rep and "stdev_norm_sum" in acc else None,
            "stdev_hist": acc.get("stdev_hist")}


def _llm_stats(view: RunView, rep: dict) -> dict:
    """Per LLM stage: the shards' ``_stats.llm`` summed (requests, cache hits, retries, tokens, cost)."""
    from ..llm.cost import llm_stats_blocks, sum_llm_stats

    out: dict[str, dict] = {}
    for sid, prefix in view.stages.items():
        total = sum_llm_stats(llm_stats_blocks(view.store, prefix))
        if total:
            a = rep["stages"].get(prefix, {})
            total["in"] = a.get("in", 0)
            total["quarantined"] = a.get("quarantined", 0)
            total["cost_usd"] = round(total.get("cost_usd", 0.0), 6)
            out[sid] = total
    return out
