"""A one-file HTML report a person can open: accounting per stage, why samples were quarantined or
dropped, and thumbnails of the best-ranked kept samples and of dropped ones with their reasons."""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter

from PIL import Image

from ..audit import audit
from ..shards import iter_samples
from ..stage import StageContext, raw_shards

THUMB = 160
N_SHOW = 12


def _thumb(data: bytes) -> str:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _card(sample, note: str) -> str:
    text = sample.conversations[0].value.replace("<image>", "").strip()
    answer = sample.conversations[1].value if len(sample.conversations) > 1 else ""
    return (f'<div class="card"><img src="{_thumb(sample.images[0].data)}"><div class="k">{html.escape(note)}</div>'
            f'<div class="q">{html.escape(text[:160])}</div><div class="a">{html.escape(answer[:240])}</div></div>')


def write_report(ctx: StageContext, select_prefix: str | None, dst, rel: str) -> None:
    """Write ``rel`` (HTML) into store ``dst`` from the run's audit and the selection's decisions."""
    from ..select.stage import read_decisions

    rep = audit(ctx.store)
    rows = []
    for p, a in rep["stages"].items():
        reasons = ", ".join(f"{k}: {v}" for k, v in a["quarantine_reasons"].items()) or "-"
        rows.append(f"<tr><td>{html.escape(p)}</td><td>{a['units_done']}/{a['units_total']}</td><td>{a['in']}</td>"
                    f"<td>{a['out']}</td><td>{a['quarantined']}</td><td>{a['dropped']}</td>"
                    f"<td>{html.escape(reasons)}</td></tr>")
    best: list[tuple[int, str, str]] = []
    dropped: list[tuple[str, str, str]] = []
    drop_reasons: Counter = Counter()
    for shard in raw_shards(ctx.store, ctx.raw_prefix) if select_prefix else []:
        for d in read_decisions(ctx.store, select_prefix, shard):
            if d["selected"]:
                best.append((d["rank"], shard, d["key"]))
            else:
                drop_reasons[d["reason"].split(":")[0]] += 1
                dropped.append((shard, d["key"], d["reason"]))
    best.sort()
    want = {(s, k): f"kept, rank {r}" for r, s, k in best[:N_SHOW]}
    seen_reason: Counter = Counter()
    for s, k, reason in dropped:  # a few examples of every drop reason
        kind = reason.split(":")[0]
        if seen_reason[kind] < 4:
            seen_reason[kind] += 1
            want[(s, k)] = "dropped: " + reason
    cards_keep, cards_drop = {}, []
    for shard in sorted({s for s, _ in want}):
        for sample in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}"):
            note = want.get((shard, sample.key))
            if note is None:
                continue
            if note.startswith("kept"):
                cards_keep[int(note.rsplit(" ", 1)[1])] = _card(sample, note)
            else:
                cards_drop.append(_card(sample, note))
    reasons_html = "".join(f"<li>{html.escape(k)}: {v}</li>" for k, v in drop_reasons.most_common())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>curate report</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px}}
.card{{display:inline-block;width:{THUMB + 40}px;vertical-align:top;margin:6px;font-size:12px}}
.k{{font-weight:bold}} .q{{color:#225}} .a{{color:#555}}</style></head><body>
<h1>curate report</h1><p>Run: {html.escape(rep['prefix'])} &mdash; accounting ok: <b>{rep['ok']}</b></p>
<h2>Stages</h2><table><tr><th>stage</th><th>units</th><th>in</th><th>out</th><th>quarantined</th><th>dropped</th>
<th>quarantine reasons</th></tr>{''.join(rows)}</table>
<h2>Selection drop reasons</h2><ul>{reasons_html or '<li>none</li>'}</ul>
<h2>Top kept samples</h2>{''.join(cards_keep[k] for k in sorted(cards_keep))}
<h2>Dropped examples</h2>{''.join(cards_drop)}
<script type="application/json" id="audit">{html.escape(json.dumps(rep))}</script></body></html>"""
    dst.write_text(rel, doc)
