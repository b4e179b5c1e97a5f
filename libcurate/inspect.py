"""``curate inspect PREFIX KEY``: one sample's journey through a run, read back from what the stages wrote.

The journey holds the sample's source (dataset, original id, format, images), every sidecar stage's
fields for it (or that stage's quarantine reason), its cluster and duplicate group, the selection's
decision (rank, score, or the reason it was dropped) and where the export put it (WebDataset shard and
position, LLaVA ``data.json`` entry and image path). Only the sample's own raw shard is read (and, to
find a key or a source id, each raw shard's column file until it is found), so inspecting a sample of a
10M-sample run reads a few MB. The report embeds the same journey in every thumbnail.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict

import numpy as np

from .columns import KEY_COL, read_columns, read_keys
from .records import Sample
from .report.run import RunView
from .shards import index_rel, iter_samples
from .stage import PermanentInputError, raw_shards, read_quarantine, unit_of

TEXT_MAX = 300


def _short(v):
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str):
        return v if len(v) <= TEXT_MAX else v[:TEXT_MAX] + "..."
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def find(view: RunView, key: str | None = None, source_id: str | None = None) -> list[tuple[str, int, str]]:
    """``(raw shard, row, key)`` of the sample with ``key``, or of every sample with ``source_id``."""
    if (key is None) == (source_id is None):
        raise ValueError("give a key or a source id")
    out = []
    for shard in raw_shards(view.store, view.raw_prefix):
        cols = read_columns(view.store, view.raw_prefix, shard, raw=True)
        if key is not None:
            hit = np.flatnonzero(cols[KEY_COL] == key.encode())
        else:
            ids = cols.get("s:source.original_id")
            hit = np.flatnonzero(ids == source_id.encode()) if ids is not None else np.zeros(0, np.int64)
        out += [(shard, int(r), cols[KEY_COL][r].decode()) for r in hit]
        if key is not None and out:
            break
    return out


class _Rows:
    """JSON lines aligned with a raw shard's keys, parsed only when a key is asked for (a report asks for a
    few samples of shards of thousands). Lines that are not aligned are all parsed and looked up by key."""

    def __init__(self, keys: list[str], lines: list[str], parse):
        self.lines = [x for x in lines if x.strip()]
        self.parse = parse
        self.row = {k: i for i, k in enumerate(keys)} if len(self.lines) == len(keys) else None
        self.by_key = None
        if self.row is None:
            self.by_key = {}
            for x in self.lines:
                obj = parse(x)
                self.by_key[obj["key"] if isinstance(obj, dict) else obj.key] = obj

    def get(self, key: str, default=None):
        if self.by_key is not None:
            return self.by_key.get(key, default)
        i = self.row.get(key)
        if i is None:
            return default
        obj = self.parse(self.lines[i])
        if (obj["key"] if isinstance(obj, dict) else obj.key) != key:
            raise PermanentInputError(f"line {i} is not {key}: the file is not aligned with its raw shard")
        return obj

    def selected(self, key: str) -> bool:
        """A decision line's ``selected`` (the last of its sorted fields), read without parsing the line."""
        if self.by_key is not None:
            return bool(self.by_key[key]["selected"])
        return self.lines[self.row[key]].rstrip().endswith('"selected": true}')


class Journeys:
    """Builds journeys, caching what it read of the last few raw shards (the report asks for many
    samples; grouping them by shard reads each shard's files once)."""

    def __init__(self, view: RunView, cache_shards: int = 4):
        self.view = view
        self.cache: OrderedDict[str, dict] = OrderedDict()
        self.cache_shards = cache_shards
        self.summary = view.export_summary()

    def _shard(self, shard: str) -> dict:
        if shard in self.cache:
            self.cache.move_to_end(shard)
            return self.cache[shard]
        v, unit = self.view, unit_of(shard)
        keys = read_keys(v.store, v.raw_prefix, shard).astype(str).tolist()
        rel = index_rel(f"{v.raw_prefix}/{shard}")
        if v.store.exists(rel):  # records without images, one line per raw sample in raw order
            records = _Rows(keys, v.store.read_text(rel).splitlines(), Sample.from_json)
        else:
            records = {s.key: s for s in iter_samples(v.store, f"{v.raw_prefix}/{shard}", with_images=False)}
        d = {"keys": keys, "records": records, "stages": {}}
        for sid, prefix in v.stages.items():
            q = {r["key"]: r for r in read_quarantine(v.store, prefix, unit)}
            cols = read_columns(v.store, prefix, shard) if v.store.exists(f"{prefix}/_done/{unit}") else None
            rows = {} if cols is None else {k: i for i, k in enumerate(cols[KEY_COL].astype(str).tolist())}
            d["stages"][sid] = (q, cols, rows)
        drel = f"{v.select}/decisions/{unit}.jsonl" if v.select else None
        d["decisions"] = _Rows(keys, v.store.read_text(drel).splitlines(), json.loads) \
            if drel and v.store.exists(drel) else None
        self.cache[shard] = d
        while len(self.cache) > self.cache_shards:
            self.cache.popitem(last=False)
        return d

    def journey(self, shard: str, key: str) -> dict:
        """The journey of the sample ``key`` of raw ``shard`` (a JSON-able dict)."""
        d = self._shard(shard)
        s = d["records"].get(key)
        if s is None:
            raise PermanentInputError(f"{key} is not in raw/{shard}")
        pairs = s.turn_pairs()
        j: dict = {"key": key, "raw_shard": shard, "source": {
            "dataset": s.source.dataset, "original_id": s.source.original_id, "format": s.source.original_format,
            "images": [{"name": im.name, "format": im.format, "width": im.width, "height": im.height,
                        "sha256": im.sha256} for im in s.images],
            "instruction": _short(pairs[0][0]) if pairs else None, "answer": _short(pairs[0][1]) if pairs else None,
            "turns": len(s.conversations)}, "stages": {}, "quarantined": None}
        for sid, (q, cols, rows) in d["stages"].items():
            entry: dict = {"prefix": self.view.stages[sid]}
            if key in q:
                entry.update(status="quarantined", reason=q[key]["reason"], detail=_short(q[key].get("detail", "")))
                j["quarantined"] = j["quarantined"] or f"{sid}: {q[key]['reason']}"
            elif cols is None:
                entry["status"] = "not run on this shard"
            elif key in rows:
                i = rows[key]
                fields = {}
                for name, arr in cols.items():
                    if name == KEY_COL:
                        continue
                    val = arr[i]
                    if name.startswith("f:") and not np.isfinite(val):
                        continue
                    if name.startswith("s:") and val == b"":
                        continue
                    fields[name[2:]] = _short(val.item() if hasattr(val, "item") else val)
                entry.update(status="ok", fields=fields)
                if "cluster" in fields and "group" not in fields:
                    j["cluster"] = {"stage": sid, "cluster": fields["cluster"], "distance": fields.get("distance")}
                if "group" in fields:
                    j["duplicate_group"] = {"stage": sid, "group": fields["group"],
                                            "group_rank": fields.get("group_rank"),
                                            "similarity": fields.get("similarity"),
                                            "duplicate_of": fields.get("duplicate_of")}
            else:
                entry["status"] = "missing"
            j["stages"][sid] = entry
        dec = d["decisions"].get(key) if d["decisions"] is not None else None
        if dec is not None:
            j["selection"] = {"prefix": self.view.select, "selected": dec["selected"], "rank": dec.get("rank"),
                              "score": dec.get("score"), "reason": dec.get("reason")}
        j["export"] = self._export(shard, key, d)
        return j

    def _export(self, shard: str, key: str, d: dict) -> dict | None:
        """Where the export wrote the sample, from ``summary.json``'s order and the shard's decisions."""
        v, summ = self.view, self.summary
        if not v.export or not summ:
            return None
        if d["decisions"] is not None and not d["decisions"].get(key, {}).get("selected"):
            return {"prefix": v.export, "exported": False}
        order = summ.get("order")
        out: dict = {"prefix": v.export, "exported": True}
        if not order or shard not in order["shard_start"]:
            return out
        pos = order["shard_start"][shard]
        inc = 1  # every kept sample of every raw shard (ingested or generated) is exported, in raw order
        for k in d["keys"]:  # raw order: every kept sample before this one
            if k == key:
                break
            if d["decisions"] is None or d["decisions"].selected(k):
                pos += inc
        formats = summ.get("formats", {})
        if "webdataset" in formats and order["webdataset_shards"] and inc:
            ends = np.cumsum(order["webdataset_shards"]).tolist()
            i = bisect.bisect_right(ends, pos)
            start = ends[i - 1] if i else 0
            out["webdataset"] = {"shard": f"{v.export}/webdataset/shard-{i:06d}.tar", "position": pos - start,
                                 "__key__": key}
        if "llava" in formats and inc:
            out["llava"] = {"file": f"{v.export}/llava/data.json", "index": pos, "id": key}
        if "cc_sbu_align" in formats and inc:
            skipped = {x["key"]: x["reason"] for x in summ.get("cc_sbu_align_skipped", [])}
            out["cc_sbu_align"] = ({"skipped": skipped[key]} if key in skipped
                                   else {"file": f"{v.export}/cc_sbu_align/filter_cap.json"})
        return out


def inspect(view: RunView, key: str | None = None, source_id: str | None = None) -> list[dict]:
    """Journeys of the sample ``key`` or of every sample ingested from ``source_id``."""
    hits = find(view, key, source_id)
    if not hits:
        what = f"key {key}" if key else f"source id {source_id!r}"
        raise PermanentInputError(f"no sample with {what} in {view.store.url}")
    js = Journeys(view)
    return [js.journey(shard, k) for shard, _, k in hits]


def format_journey(j: dict) -> str:
    """A journey as lines a person reads."""
    src = j["source"]
    lines = [f"sample {j['key']}  (raw/{j['raw_shard']})",
             f"  source: {src['dataset']} / {src['original_id']}  format {src['format']}  "
             f"{len(src['images'])} image(s): " + ", ".join(f"{im['name'] or '-'} {im['format']} "
                                                            f"{im['width']}x{im['height']}" for im in src["images"])]
    if src["instruction"] is not None:
        lines.append(f"  instruction: {src['instruction']}")
        lines.append(f"  answer: {src['answer']}")
    lines.append("  stages:")
    for sid, e in j["stages"].items():
        if e["status"] == "ok":
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in e["fields"].items() if not isinstance(v, str) or
                              len(v) <= 40)
            lines.append(f"    {sid:<16} {shown}")
        else:
            lines.append(f"    {sid:<16} {e['status'].upper()}: {e.get('reason', '')} {e.get('detail', '')}".rstrip())
    if j.get("quarantined"):
        lines.append(f"  quarantined by {j['quarantined']}")
    if "cluster" in j:
        lines.append(f"  cluster: {j['cluster']['cluster']} ({j['cluster']['stage']}, distance "
                     f"{_fmt(j['cluster']['distance'])})")
    if "duplicate_group" in j:
        g = j["duplicate_group"]
        lines.append(f"  duplicate group: {g['group']} ({g['stage']}, rank in group {g['group_rank']}, "
                     f"similarity {_fmt(g['similarity'])})")
    sel = j.get("selection")
    if sel:
        lines.append(f"  selection: KEPT, rank {sel['rank']}, score {_fmt(sel['score'])}" if sel["selected"]
                     else f"  selection: DROPPED: {sel['reason']}")
    ex = j.get("export")
    if ex:
        if not ex["exported"]:
            lines.append("  export: not exported")
        for fmt in ("webdataset", "llava", "cc_sbu_align"):
            if fmt in ex:
                lines.append(f"  export {fmt}: " + ", ".join(f"{k} {v}" for k, v in ex[fmt].items()))
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_inspect(prefix: str, key: str | None, source_id: str | None, recipe_path: str | None = None,
                as_json: bool = False) -> int:
    """``curate inspect``: print the journey of a sample (every sample of a source id); exit code 0."""
    from .pipeline import load_recipe
    from .report.run import locate
    from .storage import open_store

    recipe = load_recipe(recipe_path, prefix=prefix) if recipe_path else None
    view = locate(open_store(prefix, recipe.storage_options if recipe else None), recipe=recipe)
    journeys = inspect(view, key=key, source_id=source_id)
    if as_json:
        print(json.dumps(journeys[0] if key else journeys, indent=1, sort_keys=True, default=str))
    else:
        print("\n\n".join(format_journey(j) for j in journeys))
    return 0
