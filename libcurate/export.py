"""The ``export`` stage: materialise the selection once, in the formats trainers read.

Under ``export/<id>/<cfg>/``:

* ``webdataset/shard-NNNNNN.tar`` — selected samples resharded to ``shard_size`` (curate's raw layout:
  ``{key}.json`` record + ``{key}.img{i}.{ext}``), readable by any WebDataset loader;
* ``llava/data.json`` + ``llava/images/`` — LLaVA conversation list;
* ``cc_sbu_align/filter_cap.json`` + ``cc_sbu_align/image/`` — MiniGPT-4's stage-2 layout (single-image,
  single-turn samples only; the others are listed with a reason in ``summary.json``);
* ``summary.json`` and ``report.html`` — what was kept and dropped, and why.

Generated samples are ordinary raw samples here: generation stages wrote them as ``raw/gen-*`` shards of
the run (:mod:`libcurate.generate.common`), so they were scored, judged and selected like the ingested
ones, and export writes those the selection kept, after the ingested ones. Each exported record says which
it is: the LLaVA record's ``generated`` field (true/false), and in every record with metadata
``source.original_format = "generated"`` plus ``metadata.generated_from`` / ``metadata.provenance``
(generator stage id, config hash, parent key, model, prompt version). ``summary.json`` counts
``source_exported``, ``generated_exported`` and ``generated_by_stage``.

Accounting for the unit ``all``: in = samples the selection kept, out = samples exported.

Every JSON file is strict (no ``NaN``/``Infinity``). On a local directory nothing is written through a
symbolic link inside the export folder: a linked ``llava/images`` (say) fails the export with
:class:`~libcurate.formats.export.LinkInExportError` (permanent, exit 3) before anything lands outside it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from .formats.export import (LinkInExportError, no_link_store, write_cc_sbu_align, write_llava,
                             write_webdataset)
from .generate.common import is_generated
from .records import Sample
from .report.html import write_report
from .select.stage import read_decisions
from .shards import iter_samples
from .stage import PermanentInputError, Reads, ShardOutput, Stage, StageConfig, StageContext

FORMATS = ("webdataset", "llava", "cc_sbu_align")


@dataclass
class ExportConfig(StageConfig):
    """Settings of ``export``.

    Attributes:
        formats: any of webdataset, llava, cc_sbu_align.
        shard_size: samples per exported WebDataset shard.
        shard_bytes: also start a new exported shard once one reaches this many bytes (0 = no limit);
            trainers stream shards best at a few hundred MB each.
        select: id of the select stage whose decisions to export (default: the last one before export).
    """

    formats: tuple = ("webdataset", "llava")
    shard_size: int = 1000
    shard_bytes: int = 0
    select: str | None = None

    def __post_init__(self):
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"export formats {bad or '[]'}: want some of {list(FORMATS)}")
        if self.shard_size < 1 or self.shard_bytes < 0:
            raise ValueError("shard_size must be >= 1 and shard_bytes >= 0")


class ExportStage(Stage):
    name = "export"
    Config = ExportConfig
    kind = "global"
    output_root = "export"

    @classmethod
    def reads(cls, config: ExportConfig) -> Reads:
        return Reads.of(stages=[config.select] if config.select else [])

    def _select_prefix(self, ctx: StageContext) -> str | None:
        """The select stage to follow; None (no select stage before export) exports every raw sample."""
        sel = {sid: p for sid, p in ctx.upstream.items() if p.startswith("select/")}
        if self.config.select:
            if self.config.select not in sel:
                raise PermanentInputError(f"export.select {self.config.select!r} is not an earlier select stage")
            return sel[self.config.select]
        return list(sel.values())[-1] if sel else None

    def selected(self, ctx: StageContext, counts: Counter | None = None,
                 starts: dict[str, int] | None = None) -> Iterator[Sample]:
        """Kept samples with images, ingested then generated, in raw order, shard by shard.

        ``counts`` gets ``raw`` (every exported sample), ``source``, ``generated`` and
        ``generated:<stage id>``. ``starts``: filled with raw shard -> position of its first exported
        sample in every format's output order (``curate inspect`` finds a sample's exported place from it
        and its own shard)."""
        sel = self._select_prefix(ctx)
        counts = counts if counts is not None else Counter()
        for shard in ctx.raw_shards():
            keep = None if sel is None else {d["key"] for d in read_decisions(ctx.store, sel, shard) if d["selected"]}
            if keep is not None and not keep:
                continue
            if starts is not None:
                starts[shard] = counts["raw"]
            for s in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}"):
                if keep is not None and s.key not in keep:
                    continue
                counts["raw"] += 1
                if is_generated(s):
                    counts["generated"] += 1
                    counts[f"generated:{s.metadata['provenance'].get('stage_id', '?')}"] += 1
                else:
                    counts["source"] += 1
                yield s

    def _n_selected(self, ctx: StageContext, sel: str | None) -> int:
        if sel is not None:
            return json.loads(ctx.store.read_text(f"{sel}/_stats/all.json"))["out"]
        return sum(json.loads(ctx.store.read_text(f"{ctx.raw_prefix}/_stats/{s[:-4]}.json"))["out"]
                   for s in ctx.raw_shards())

    def run_global(self, ctx: StageContext) -> dict:
        sel = self._select_prefix(ctx)
        n_selected = self._n_selected(ctx, sel)
        dst = no_link_store(ctx.output, ctx.prefix)
        try:
            return self._export(ctx, sel, n_selected, dst)
        except LinkInExportError as e:
            raise PermanentInputError(str(e)) from e

    def _export(self, ctx: StageContext, sel: str | None, n_selected: int, dst) -> dict:
        c = self.config
        out = ShardOutput(dst, ctx.prefix, "all", sidecar=False)
        summary: dict = {"selection": sel or "all raw samples", "selected": n_selected, "formats": {}}
        written: dict[str, int] = {}
        counts: Counter = Counter()  # source and generated samples, counted on the first format's pass
        starts: dict[str, int] = {}
        wds_sizes: list[int] = []
        for i, fmt in enumerate(c.formats):
            samples = self.selected(ctx, counts if i == 0 else None, starts if i == 0 else None)
            if fmt == "webdataset":
                written[fmt] = self._write_webdataset(ctx, samples, dst, wds_sizes)
            elif fmt == "llava":
                written[fmt] = write_llava(samples, dst, f"{ctx.prefix}/llava")
            else:
                written[fmt], skipped = write_cc_sbu_align(samples, dst, f"{ctx.prefix}/cc_sbu_align")
                summary["cc_sbu_align_skipped"] = [{"key": k, "reason": r} for k, r in skipped]
        by_stage = {k.split(":", 1)[1]: n for k, n in sorted(counts.items()) if k.startswith("generated:")}
        summary.update(formats=written, exported=counts["raw"], source_exported=counts["source"],
                       generated_exported=counts["generated"], generated_by_stage=by_stage)
        # where each raw shard's samples start in the output order, and the exported shards' sizes
        summary["order"] = {"shard_start": starts, "webdataset_shards": wds_sizes}
        summary["upstream"] = [[sid, p] for sid, p in ctx.upstream.items()]  # the stages, in recipe order
        from .llm.cost import run_llm_usage

        summary["llm"] = run_llm_usage(ctx.store, ctx.upstream)  # requests, tokens, cost per LLM stage
        # in = out is checked by finish(): a selected key missing from the raw shards fails the stage.
        out.count_out(counts["raw"])
        dst.write_text(f"{ctx.prefix}/summary.json", json.dumps(summary, indent=1, sort_keys=True))
        write_report(ctx, sel, dst, f"{ctx.prefix}/report.html")
        out.extra.update(formats=written, source=counts["source"], generated=counts["generated"])
        return out.finish(n_selected)

    def _write_webdataset(self, ctx: StageContext, samples: Iterator[Sample], dst=None,
                          sizes: list[int] | None = None) -> int:
        """Reshard ``samples``; ``sizes`` gets the number of samples of each shard written."""
        dst = dst if dst is not None else no_link_store(ctx.output, ctx.prefix)
        return write_webdataset(samples, dst, f"{ctx.prefix}/webdataset", self.config.shard_size,
                                self.config.shard_bytes, sizes)
