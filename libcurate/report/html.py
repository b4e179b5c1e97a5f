"""The run report: one self-contained HTML file a curator opens offline or straight from S3.

Sections (each a ``<section id=...>``, present even when its data is absent, then saying so):
``funnel`` (per stage: in, quarantined by reason, dropped by reason, kept), ``scores`` (a histogram of
every stored score, kept vs dropped, with select's thresholds drawn), ``embedding-map`` (PCA, or UMAP
when installed, coloured by cluster and by kept/dropped; a gallery per cluster), ``near-duplicates``
(groups side by side, which member was kept and why), ``drop-reasons`` (a gallery per reason),
``judges`` (agreement and parse failures of LLM judges) and ``cost`` (requests, tokens and cost per LLM
stage).

Everything is inline: plots are PNG data URIs (matplotlib), thumbnails 96 px JPEG data URIs; no script,
stylesheet, font or image is fetched. Each thumbnail carries the sample's journey (the JSON that
``curate inspect`` prints) in a ``<details>`` element, with the exact command.

Size at any scale: histograms are computed in one streaming pass (fixed number of bins); the map and
the galleries are uniform samples of stated size (:mod:`libcurate.report.collect`), so the page stays
under :data:`SIZE_BUDGET` bytes whether the run has 100 or 10M samples.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re

import numpy as np
from PIL import Image

from ..records import Sample
from ..stage import PermanentInputError, StageContext
from . import collect as C
from . import plots as P
from . import tarscan
from .run import RunView, locate

log = logging.getLogger(__name__)
THUMB = 96
SIZE_BUDGET = 4_000_000   # bytes: ~150 thumbnails x ~5 KB, ~15 plots x ~40 KB, journeys, tables

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#263238;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;font-size:13px;color:#cfd8dc}nav{font-size:13px;margin-top:8px}
nav a{color:#80cbc4;margin-right:14px;text-decoration:none}
main{padding:8px 32px 40px;max-width:1500px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:14px 20px;margin:18px 0}
h2{font-size:18px;margin:4px 0 10px;color:#263238}h3{font-size:14px;margin:14px 0 6px;color:#37474f}
.note{font-size:12px;color:#607d8b;margin:4px 0 10px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border-bottom:1px solid #e0e0e0;padding:4px 10px;text-align:right;vertical-align:top}
th{background:#eceff1}td.l,th.l{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px}.grid img.plot{border:1px solid #eceff1;border-radius:4px}
img.plot{max-width:100%}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{width:132px;font-size:11px;background:#fafafa;border:2px solid #e0e0e0;border-radius:6px;padding:5px}
.card.kept{border-color:#2e7d32}.card.dropped{border-color:#c62828}
.card img{display:block;width:96px;height:96px;object-fit:cover;margin:0 auto 4px;border-radius:3px}
.card .why{font-weight:600;color:#b71c1c;word-break:break-word}.card.kept .why{color:#1b5e20}
.card .q{color:#455a64;max-height:3.2em;overflow:hidden}
.card details{margin-top:3px}.card summary{cursor:pointer;color:#1565c0}
.card pre{position:relative;z-index:2;width:420px;max-height:360px;overflow:auto;background:#263238;color:#e0f2f1;
 font-size:10px;padding:6px;border-radius:4px;white-space:pre-wrap;word-break:break-all}
.groups,.blocks{display:flex;flex-wrap:wrap;gap:10px 28px}
.group{padding:8px;background:#eef1f4;border-radius:6px}
.group .gl{font-size:12px;color:#37474f;margin-bottom:5px}
figure.h{margin:0;width:356px}
.badge{display:inline-block;padding:1px 6px;border-radius:8px;font-size:11px;color:#fff;background:#607d8b}
.badge.k{background:#2e7d32}.badge.d{background:#c62828}
"""

SECTIONS = [("funnel", "Funnel"), ("scores", "Scores"), ("embedding-map", "Embedding map"),
            ("near-duplicates", "Near-duplicates"), ("drop-reasons", "Drop reasons"), ("judges", "Judges"),
            ("cost", "LLM cost")]


def _e(x) -> str:
    return html.escape(str(x))


def _abbrev(text: str) -> str:
    """A reason as a card shows it: sample keys cut to 8 characters (the journey has them whole)."""
    return re.sub(r"\b([0-9a-f]{8})[0-9a-f]{16}\b", r"\1…", text)


def _thumb(data: bytes) -> str:
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (THUMB * 2, THUMB * 2))  # JPEG: decode at a reduced scale
    im = im.convert("RGB")
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=70, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class Cards:
    """Thumbnails and journeys of the samples the page shows, read shard by shard (each raw shard that
    holds a shown sample is read once, stopping at its last shown sample)."""

    def __init__(self, view: RunView, data: C.ReportData, wanted: list[tuple[str, str]]):
        from ..inspect import Journeys

        self.view, self.data = view, data
        self.thumbs: dict[tuple[str, str], str] = {}
        self.text: dict[tuple[str, str], str] = {}
        self.journeys: dict[tuple[str, str], dict] = {}
        js = Journeys(view, cache_shards=1)
        by_shard: dict[str, set[str]] = {}
        for shard, key in wanted:
            by_shard.setdefault(shard, set()).add(key)
        for shard in sorted(by_shard):
            keys = by_shard[shard]
            with view.store.open_read(f"{view.raw_prefix}/{shard}") as f:
                members = tarscan.scan(f, keys)
            for key in sorted(keys):
                m = members.get(key, {})
                s = Sample.from_dict(json.loads(m["json"])) if "json" in m else None
                img = m.get(s.member_names()[0]) if s is not None and s.images else None
                try:
                    self.thumbs[(shard, key)] = _thumb(img) if img else ""
                except Exception:  # an undecodable image (quarantined upstream): shown without a picture
                    self.thumbs[(shard, key)] = ""
                pairs = s.turn_pairs() if s is not None else []
                self.text[(shard, key)] = pairs[0][0].replace("<image>", "").strip() if pairs else ""
                self.journeys[(shard, key)] = js.journey(shard, key)

    def card(self, shard: str, key: str, note: str = "") -> str:
        j = self.journeys.get((shard, key), {})
        sel = j.get("selection") or {}
        kept = sel.get("selected")
        cls = "kept" if kept else "dropped" if kept is False else ""
        why = note or (f"kept, rank {sel.get('rank')}" if kept else sel.get("reason") or j.get("quarantined") or "")
        full, why = why, _abbrev(why)
        src = j.get("source", {})
        thumb = self.thumbs.get((shard, key), "")
        img = (f'<img src="{thumb}" alt="{_e(src.get("original_id", key))}" title="{_e(full)}">' if thumb
               else '<div class="note">(no image)</div>')
        cmd = f"curate inspect {self.view.store.url} {key}"
        return (f'<div class="card {cls}" id="s-{key}">{img}<div class="why">{_e(why)}</div>'
                f'<div>{_e(src.get("original_id", ""))}</div><div class="q">{_e(self.text.get((shard, key), ""))}'
                f'</div><details><summary>journey</summary><pre>$ {_e(cmd)}\n'
                f'{_e(json.dumps(j, indent=1, sort_keys=True, default=str))}</pre></details></div>')


# -- sections ----------------------------------------------------------------------------------------
def funnel_rows(data: C.ReportData, view: RunView) -> list[dict]:
    """One row per stage of the view: in, out, quarantined (by reason), dropped (by reason)."""
    rows = []
    names = {"raw": "ingest", **{p: sid for sid, p in view.stages.items()}}
    if view.select:
        names[view.select] = view.select.split("/")[1]
    for prefix, name in names.items():
        a = data.audit["stages"].get(prefix)
        if a is None:
            continue
        rows.append({"name": name, "prefix": prefix, "in": a["in"], "out": a["out"], "quarantined": a["quarantined"],
                     "dropped": a["dropped"], "quarantine_reasons": a["quarantine_reasons"],
                     "drop_reasons": data.drop_reasons if prefix == view.select else {}, "ok": a["ok"]})
    return rows


def _funnel(data: C.ReportData, view: RunView) -> str:
    rows = funnel_rows(data, view)
    if not rows:
        return "<p>No stage output found.</p>"
    body = []
    for r in rows:
        qr = "<br>".join(f"{_e(k)}: {v}" for k, v in r["quarantine_reasons"].items()) or "-"
        dr = "<br>".join(f"{_e(k)}: {v}" for k, v in r["drop_reasons"].items()) or "-"
        body.append(f'<tr><td class="l">{_e(r["name"])}</td><td>{r["in"]}</td><td>{r["quarantined"]}</td>'
                    f'<td class="l">{qr}</td><td>{r["dropped"]}</td><td class="l">{dr}</td><td>{r["out"]}</td>'
                    f'<td>{"ok" if r["ok"] else "NOT OK"}</td></tr>')
    fig = P.figure_funnel(rows)
    return (f'<img class="plot" src="{P.data_uri(fig)}" alt="funnel">'
            '<table><tr><th class="l">stage</th><th>in</th><th>quarantined</th><th class="l">by reason</th>'
            '<th>dropped</th><th class="l">by reason</th><th>out (kept)</th><th>accounting</th></tr>'
            + "".join(body) + "</table>")


def thresholds_for(name: str, cfg: dict) -> list[tuple[str, float]]:
    """Select's thresholds on field ``name`` as (min|max, value on the stored scale); an ``@norm``
    threshold (10 x value / dataset max) is converted back with the max the selection recorded."""
    out = []
    for f, rule in (cfg.get("thresholds") or {}).items():
        base = f.removesuffix("@norm")
        if base != name:
            continue
        scale = 1.0
        if f.endswith("@norm"):
            m = (cfg.get("norm_max") or {}).get(f)
            if not m:
                continue
            scale = m / 10.0
        for kind in ("min", "max"):
            if kind in rule:
                out.append((kind, float(rule[kind]) * scale))
    return out


def _scores(data: C.ReportData, view: RunView) -> str:
    if not data.histograms:
        return "<p>No numeric scores stored by any stage.</p>"
    cfg = data.select_config
    ranked = set((cfg.get("score") or {}).get("weights", {}))
    imgs = []
    for name in sorted(data.histograms, key=lambda n: (not thresholds_for(n, cfg) and n not in ranked, n)):
        h = data.histograms[name]
        if h.width is None:
            continue
        note = "ranks the selection" if name in ranked else ""
        missing = int(h.n_missing.sum())
        edges, counts = h.binned()
        counts = counts if view.select else counts[:1]    # no selection: one series, all samples
        fig = P.figure_histogram(name, edges, counts, thresholds_for(name, cfg), note)
        imgs.append(f'<figure class="h"><img class="plot" src="{P.data_uri(fig)}" alt="{_e(name)}">'
                    f'<figcaption class="note">{_e(name)}: {h.total} samples, range {h.lo:.4g} to {h.hi:.4g}'
                    f'{f", {missing} without a value" if missing else ""}</figcaption></figure>')
    th = ", ".join(f"{_e(f)} " + " ".join(f"{k} {v:g}" for k, v in r.items())
                   for f, r in (cfg.get("thresholds") or {}).items()) or "none"
    return (f'<p class="note">Every numeric field a stage stored (list elements and counts left out), over all '
            f'{data.n_samples} samples in one streaming pass (at most 40 bins). '
            + ('Green: kept by the selection; red: dropped. ' if view.select else 'No selection ran. ')
            + f'Dashed blue: select thresholds ({th}).</p><div class="grid">' + "".join(imgs) + "</div>")


def _embedding(data: C.ReportData, cards: Cards) -> str:
    ms = data.map_sample
    parts = []
    if ms and len(ms["emb"]) >= 2:
        xy, method = P.project_2d(ms["emb"])
        fig = P.figure_map(xy, ms["cluster"], ms["selected"], method)
        parts.append(f'<p class="note">{method} of <b>{_e(data.map_embedding)}</b>: a uniform sample of '
                     f'{len(ms["emb"])} of the {data.map_total} samples with that embedding (chosen by a seeded hash '
                     f'of the key, at most {C.MAP_POINTS}). UMAP is used when umap-learn is installed.</p>'
                     f'<img class="plot" src="{P.data_uri(fig)}" alt="embedding map">')
    else:
        parts.append("<p>No stage stored embeddings: no map.</p>")
    if data.clusters:
        shown = data.clusters_shown
        parts.append(f'<h3>Clusters ({_e(data.cluster_stage)}): {len(data.clusters)}; galleries of the '
                     f'{len(shown)} largest, {C.CLUSTER_GALLERY} uniform samples each</h3>')
        cl = [(c, v) for c, v in data.clusters.items() if c in shown]
        parts.append('<table><tr><th class="l">cluster</th>' + "".join(f"<th>{c}</th>" for c, _ in cl)
                     + '</tr><tr><td class="l">size</td>' + "".join(f"<td>{v['size']}</td>" for _, v in cl)
                     + '</tr><tr><td class="l">kept</td>' + "".join(f"<td>{v['kept']}</td>" for _, v in cl)
                     + "</tr></table>")
        parts.append('<div class="blocks">' + "".join(
            f'<div class="blk"><h3>cluster {c}: {data.clusters[c]["size"]} samples, {data.clusters[c]["kept"]} kept'
            '</h3><div class="cards">' + "".join(cards.card(s, k) for s, k in data.clusters[c]["sample"])
            + "</div></div>" for c in shown) + "</div>")
    else:
        parts.append("<p>No cluster stage ran: no cluster galleries.</p>")
    return "".join(parts)


def _near_dups(data: C.ReportData, cards: Cards) -> str:
    if not data.dup_groups:
        return ("<p>No dedup stage ran.</p>" if data.dup_stage is None
                else "<p>The dedup stage found no near-duplicate groups.</p>")
    out = [f'<p class="note">{data.dup_total} groups found by <b>{_e(data.dup_stage)}</b>; {len(data.dup_groups)} '
           f'shown (a uniform sample by a hash of the group key), at most {C.DUP_MEMBERS} members each. A group '
           'keeps its best member by the dedup stage\'s keep_by score (group rank 0) unless an earlier rule '
           'dropped it; the others are dropped as near_duplicate_of the kept one.</p>']
    for g in data.dup_groups:
        members = sorted(g["members"], key=lambda m: (m["group_rank"] if m["group_rank"] is not None else 1e9))
        cs = []
        for m in members:
            d = data.decisions.get((m["shard"], m["key"]), {})
            kept = d.get("selected")
            sim = "" if m["similarity"] is None else f", similarity {m['similarity']:.3f}"
            rank = "" if m["group_rank"] is None else f"group rank {int(m['group_rank'])}"
            why = (f"KEPT, rank {d.get('rank')} ({rank}{sim})" if kept else
                   f"{d.get('reason', '')}" if d.get("reason", "").startswith("near_duplicate_of")
                   else f"{d.get('reason', '')} ({rank}{sim})")
            cs.append(cards.card(m["shard"], m["key"], why))
        out.append(f'<div class="group"><div class="gl">group <code>{_e(g["group"][:8])}</code>, {g["size"]} '
                   f'members</div><div class="cards">{"".join(cs)}</div></div>')
    return out[0] + '<div class="groups">' + "".join(out[1:]) + "</div>"


def _drop_reasons(data: C.ReportData, cards: Cards) -> str:
    if not data.reasons:
        return "<p>No selection ran, or it dropped nothing.</p>"
    out = [f'<p class="note">{C.GALLERY} uniform samples per reason (seeded hash of the key). Counts are over '
           f'all {data.n_samples} samples.</p>']
    out.append('<div class="blocks">' + "".join(
        f'<div class="blk"><h3>{_e(kind)}: {data.drop_reasons.get(kind, len(members))} samples</h3><div class="cards">'
        + "".join(cards.card(s, k) for s, k in members) + "</div></div>" for kind, members in data.reasons.items())
        + "</div>")
    if data.top_kept:
        out.append(f'<h3>kept, best {len(data.top_kept)} ranks</h3><div class="cards">'
                   + "".join(cards.card(s, k) for _, s, k in data.top_kept) + "</div>")
    return "".join(out)


def _judges(data: C.ReportData) -> str:
    llm_judges = {sid: s for sid, s in data.llm.items()}
    if not data.judges and not llm_judges:
        return "<p>No LLM judge ran in this run.</p>"
    rows, figs = [], []
    for sid, st in llm_judges.items():
        j = data.judges.get(sid, {})
        qr = st.get("quarantined_by_reason", {})
        unparse = qr.get("unparseable_reply", 0)
        n_in = st.get("in", 0)
        asked, parsed = j.get("asked", 0), j.get("parsed", 0)
        reply_fail = f"{asked - parsed} of {asked} replies ({(asked - parsed) / asked:.1%})" if asked else "-"
        if j.get("repeated"):
            agree = (f"mean stdev {j['mean_stdev']:.3g}" + (f" ({j['mean_stdev_norm']:.1%} of the scale)"
                                                          if j.get("mean_stdev_norm") is not None else "")
                     + f" over {j['repeated']} samples judged 2+ times")
            h = j["stdev_hist"]
            if h is not None and h.width is not None:
                fig = P.figure_histogram(f"{sid}: stdev of repeated judgements", *h.binned(), [])
                figs.append(f'<img class="plot" src="{P.data_uri(fig)}" alt="agreement {_e(sid)}">')
        elif sid in data.judges:
            agree = "needs repeats: every sample was judged once (set repeats: 2+ or several judges)"
        else:
            agree = "- (not a numeric judge)"
        rows.append(f'<tr><td class="l">{_e(sid)}</td><td>{n_in}</td><td>{unparse} ({unparse / n_in:.1%})</td>'
                    f'<td>{reply_fail}</td><td>{st.get("retries", 0)} / {st.get("requests", 0)}</td>'
                    f'<td>{st.get("failed", 0)}</td><td class="l">{_e(agree)}</td></tr>' if n_in else "")
    return ('<p class="note">Parse failures: samples quarantined because no reply parsed (unparseable_reply), and '
            'replies that did not parse among those asked (a sample keeps its parsed replies). Agreement: the '
            'spread of repeated judgements of the same sample.</p><table><tr><th class="l">stage</th><th>samples'
            '</th><th>unparseable (quarantined)</th><th>unparsed replies</th><th>retries / requests</th>'
            '<th>failed calls</th><th class="l">agreement</th></tr>' + "".join(rows) + "</table>" + "".join(figs))


def _cost(st: dict) -> str:
    return "unknown (no price)" if st.get("cost_unknown") else f"${st.get('cost_usd', 0.0):.4f}"


def _cost_section(data: C.ReportData) -> str:
    if not data.llm:
        return "<p>No LLM stage ran in this run: no tokens, no cost.</p>"
    rows = []
    tot = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    for sid, st in data.llm.items():
        for k in tot:
            tot[k] += st.get(k, 0)
        rows.append(f'<tr><td class="l">{_e(sid)}</td><td class="l">{_e(st.get("model", ""))}</td>'
                    f'<td>{st.get("requests", 0)}</td><td>{st.get("cache_hits", 0)}</td><td>{st.get("shared", 0)}</td>'
                    f'<td>{st.get("retries", 0)}</td><td>{st.get("prompt_tokens", 0):,}</td>'
                    f'<td>{st.get("completion_tokens", 0):,}</td><td>{_cost(st)}</td></tr>')
    rows.append(f'<tr><th class="l">total</th><th></th><th></th><th></th><th></th><th></th>'
                f'<th>{tot["prompt_tokens"]:,}</th><th>{tot["completion_tokens"]:,}</th>'
                f'<th>{_cost({**tot, "cost_unknown": any(s.get("cost_unknown") for s in data.llm.values())})}'
                '</th></tr>')
    return ('<p class="note">From each stage\'s _stats (the LLM client counts every HTTP attempt, cache hit and '
            'token; cost = tokens x the stage\'s price_*_per_1k settings, 0 when no price is set). Cached replies '
            'cost nothing on a re-run.</p><table><tr><th class="l">stage</th><th class="l">model</th>'
            '<th>requests</th><th>cache hits</th><th>shared</th><th>retries</th><th>prompt tokens</th>'
            '<th>completion tokens</th><th>cost (USD)</th></tr>' + "".join(rows) + "</table>")


def build_report(view: RunView) -> str:
    """The report's HTML for the run ``view`` describes (nothing is re-run)."""
    data = C.collect(view)
    wanted = [(s, k) for c in data.clusters_shown for s, k in data.clusters[c]["sample"]]
    wanted += [(s, k) for members in data.reasons.values() for s, k in members]
    wanted += [(s, k) for _, s, k in data.top_kept]
    wanted += [(m["shard"], m["key"]) for g in data.dup_groups for m in g["members"]]
    cards = Cards(view, data, wanted)
    bodies = {"funnel": _funnel(data, view), "scores": _scores(data, view), "embedding-map": _embedding(data, cards),
              "near-duplicates": _near_dups(data, cards), "drop-reasons": _drop_reasons(data, cards),
              "judges": _judges(data), "cost": _cost_section(data)}
    nav = "".join(f'<a href="#{sid}">{title}</a>' for sid, title in SECTIONS)
    sections = "".join(f'<section id="{sid}"><h2>{title}</h2>{bodies[sid]}</section>' for sid, title in SECTIONS)
    cfg = data.select_config
    sel = (f"selection: {_e(view.select)}, strategy {_e(cfg.get('strategy', '-'))}, budget {_e(cfg.get('budget'))}"
           if view.select else "no selection stage")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>curate report: {_e(data.run)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><link rel="icon" href="data:,">'
            f'<style>{CSS}</style></head><body><header><h1>curate report</h1><p>run {_e(data.run)}</p>'
            f'<p>{data.n_samples} samples, {data.n_kept} kept; {sel}; accounting ok: {data.audit.get("ok")}</p>'
            f'<p>Sampled: embedding map {min(len(data.map_sample.get("emb", [])), C.MAP_POINTS)} points, '
            f'{C.CLUSTER_GALLERY} thumbnails per cluster, {C.GALLERY} per drop reason, {C.DUP_GROUPS} duplicate groups '
            f'(uniform, '
            f'seeded; thumbnails first from {C.GALLERY_SHARDS} raw shards chosen by hash, so a large run reads a few '
            f'tars); histograms and counts cover every sample. Page budget {SIZE_BUDGET // 1_000_000} MB.</p>'
            f'<nav>{nav}</nav></header><main>{sections}'
            f'<script type="application/json" id="audit">{_e(json.dumps(data.audit, sort_keys=True))}</script>'
            f'</main></body></html>')


def write_report(ctx: StageContext, select_prefix: str | None, dst, rel: str) -> None:
    """Write ``rel`` (HTML) into store ``dst`` for the run of ``ctx`` (the export stage's context)."""
    export = ctx.prefix if ctx.prefix.startswith("export/") else None
    view = locate(ctx.store, upstream=ctx.upstream, select=select_prefix, export=export, export_store=dst,
                  raw_prefix=ctx.raw_prefix)
    if not view.stages:  # `curate export` outside a recipe knows only the selection: find the stages by layout
        try:
            view = locate(ctx.store, select=select_prefix, export=export, export_store=dst, raw_prefix=ctx.raw_prefix)
        except PermanentInputError as e:
            log.warning("report without score sections: %s", e)
    dst.write_text(rel, build_report(view))


def regenerate(prefix: str, recipe_path: str | None = None, out: str | None = None) -> str:
    """``curate report``: rebuild the report of the run at ``prefix`` from what its stages wrote; returns
    where it was written (``out``, else the run's export folder, else ``<prefix>/report.html``)."""
    from ..pipeline import load_recipe
    from ..storage import open_store

    recipe = load_recipe(recipe_path, prefix=prefix) if recipe_path else None
    options = recipe.storage_options if recipe else None
    store = open_store(prefix, options)
    view = locate(store, recipe=recipe)
    doc = build_report(view)
    if out:
        if out.startswith("s3://"):
            parent, _, name = out.rpartition("/")
            open_store(parent, options).write_text(name, doc)
            return out
        with open(out, "w", encoding="utf-8") as f:
            f.write(doc)
        return out
    rel = f"{view.export}/report.html" if view.export else "report.html"
    (view.export_store or store).write_text(rel, doc)
    return store.uri(rel)
