"""The ``export`` stage: materialise the selection once, in the formats trainers read.

Under ``export/<id>/<cfg>/``:

* ``webdataset/shard-NNNNNN.tar`` — selected samples resharded to ``shard_size`` (curate's raw layout:
  ``{key}.json`` record + ``{key}.img{i}.{ext}``), readable by any WebDataset loader;
* ``llava/data.json`` + ``llava/images/`` — LLaVA conversation list;
* ``cc_sbu_align/filter_cap.json`` + ``cc_sbu_align/image/`` — MiniGPT-4's stage-2 layout (single-image,
  single-turn samples only; the others are listed with a reason in ``summary.json``);
* ``summary.json`` and ``report.html`` — what was kept and dropped, and why.

Accounting for the unit ``all``: in = samples the selection kept, out = samples exported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

from .formats.export import write_cc_sbu_align, write_llava
from .records import Sample
from .report.html import write_report
from .select.threshold import read_decisions
from .shards import ShardWriter, iter_samples, shard_name
from .stage import PermanentInputError, ShardOutput, Stage, StageConfig, StageContext, raw_shards

FORMATS = ("webdataset", "llava", "cc_sbu_align")


@dataclass
class ExportConfig(StageConfig):
    """Settings of ``export``.

    Attributes:
        formats: any of webdataset, llava, cc_sbu_align.
        shard_size: samples per exported WebDataset shard.
        select: id of the select stage whose decisions to export (default: the last one before export).
    """

    formats: tuple = ("webdataset", "llava")
    shard_size: int = 1000
    select: str | None = None

    def __post_init__(self):
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"export formats {bad or '[]'}: want some of {list(FORMATS)}")
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")


class ExportStage(Stage):
    name = "export"
    Config = ExportConfig
    kind = "global"
    output_root = "export"

    def _select_prefix(self, ctx: StageContext) -> str | None:
        """The select stage to follow; None (no select stage before export) exports every raw sample."""
        sel = {sid: p for sid, p in ctx.upstream.items() if p.startswith("select/")}
        if self.config.select:
            if self.config.select not in sel:
                raise PermanentInputError(f"export.select {self.config.select!r} is not an earlier select stage")
            return sel[self.config.select]
        return list(sel.values())[-1] if sel else None

    def selected(self, ctx: StageContext) -> Iterator[Sample]:
        """Selected samples with images, in raw order, streaming shard by shard."""
        sel = self._select_prefix(ctx)
        for shard in raw_shards(ctx.store, ctx.raw_prefix):
            keep = None if sel is None else {d["key"] for d in read_decisions(ctx.store, sel, shard) if d["selected"]}
            if keep is None or keep:
                for s in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}"):
                    if keep is None or s.key in keep:
                        yield s

    def _n_selected(self, ctx: StageContext, sel: str | None) -> int:
        if sel is not None:
            return json.loads(ctx.store.read_text(f"{sel}/_stats/all.json"))["out"]
        return sum(json.loads(ctx.store.read_text(f"{ctx.raw_prefix}/_stats/{s[:-4]}.json"))["out"]
                   for s in raw_shards(ctx.store, ctx.raw_prefix))

    def run_global(self, ctx: StageContext) -> dict:
        c = self.config
        sel = self._select_prefix(ctx)
        n_selected = self._n_selected(ctx, sel)
        dst = ctx.output
        out = ShardOutput(dst, ctx.prefix, "all", sidecar=False)
        summary: dict = {"selection": sel or "all raw samples", "selected": n_selected, "formats": {}}
        written = {}
        if "webdataset" in c.formats:
            written["webdataset"] = self._write_webdataset(ctx)
        if "llava" in c.formats:
            written["llava"] = write_llava(self.selected(ctx), dst, f"{ctx.prefix}/llava")
        if "cc_sbu_align" in c.formats:
            res = write_cc_sbu_align(self.selected(ctx), dst, f"{ctx.prefix}/cc_sbu_align")
            n, skipped = res if isinstance(res, tuple) else (res, [])
            written["cc_sbu_align"] = n
            summary["cc_sbu_align_skipped"] = [{"key": k, "reason": r} for k, r in skipped]
        summary["formats"] = written
        n_out = max(written.values())
        out.count_out(n_out)
        # Every selected sample reaches the fullest format; a shortfall means a selected key vanished.
        for k in range(n_selected - n_out):
            out.quarantine(f"missing-{k}", "selected_sample_not_found", "selected key absent from raw shards")
        dst.write_text(f"{ctx.prefix}/summary.json", json.dumps(summary, indent=1, sort_keys=True))
        write_report(ctx, sel, dst, f"{ctx.prefix}/report.html")
        out.extra.update(formats=written)
        return out.finish(n_selected)

    def _write_webdataset(self, ctx: StageContext) -> int:
        n, w, idx = 0, None, 0
        try:
            for s in self.selected(ctx):
                if w is None:
                    w = ShardWriter(ctx.output, f"{ctx.prefix}/webdataset/{shard_name(idx)}")
                w.write_sample(s)
                n += 1
                if w.count >= self.config.shard_size:
                    w.close()
                    w, idx = None, idx + 1
            if w is not None:
                w.close()
        except BaseException as e:
            if w is not None:
                w.abort(e)
            raise
        return n
