"""The ``export`` stage: materialise the selection once, in the formats trainers read.

Under ``export/<id>/<cfg>/``:

* ``webdataset/shard-NNNNNN.tar`` — selected samples resharded to ``shard_size`` (curate's raw layout:
  ``{key}.json`` record + ``{key}.img{i}.{ext}``), readable by any WebDataset loader;
* ``llava/data.json`` + ``llava/images/`` — LLaVA conversation list;
* ``cc_sbu_align/filter_cap.json`` + ``cc_sbu_align/image/`` — MiniGPT-4's stage-2 layout (single-image,
  single-turn samples only; the others are listed with a reason in ``summary.json``);
* ``summary.json`` and ``report.html`` — what was kept and dropped, and why.

With ``generated: [stage ids]``, the new samples that generation stages wrote for each kept raw sample
(:func:`libcurate.generate.common.materialize`: same images, new conversation, provenance) follow it.

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

from .formats.export import LinkInExportError, no_link_store, write_cc_sbu_align, write_llava
from .generate.common import materialize
from .records import Sample
from .report.html import write_report
from .select.stage import read_decisions
from .shards import ShardWriter, iter_aligned, iter_members, iter_samples, shard_name
from .stage import (PermanentInputError, Reads, ShardOutput, Stage, StageConfig, StageContext, raw_shards,
                    read_quarantine, unit_of)

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
        generated: ids of generation stages (generate_caption, generate_mminstruct, generate_lrv) whose
            new samples are exported after each kept raw sample they were generated from.
        include_raw: export the kept raw samples themselves (False: only their generated samples).
    """

    formats: tuple = ("webdataset", "llava")
    shard_size: int = 1000
    shard_bytes: int = 0
    select: str | None = None
    generated: tuple = ()
    include_raw: bool = True

    def __post_init__(self):
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"export formats {bad or '[]'}: want some of {list(FORMATS)}")
        if self.shard_size < 1 or self.shard_bytes < 0:
            raise ValueError("shard_size must be >= 1 and shard_bytes >= 0")
        if not self.include_raw and not self.generated:
            raise ValueError("include_raw: false needs at least one stage id in 'generated'")


class ExportStage(Stage):
    name = "export"
    Config = ExportConfig
    kind = "global"
    output_root = "export"

    @classmethod
    def reads(cls, config: ExportConfig) -> Reads:
        return Reads.of(stages=([config.select] if config.select else []) + list(config.generated))

    def _select_prefix(self, ctx: StageContext) -> str | None:
        """The select stage to follow; None (no select stage before export) exports every raw sample."""
        sel = {sid: p for sid, p in ctx.upstream.items() if p.startswith("select/")}
        if self.config.select:
            if self.config.select not in sel:
                raise PermanentInputError(f"export.select {self.config.select!r} is not an earlier select stage")
            return sel[self.config.select]
        return list(sel.values())[-1] if sel else None

    def _generated_prefixes(self, ctx: StageContext) -> dict[str, str]:
        missing = [g for g in self.config.generated if g not in ctx.upstream]
        if missing:
            raise PermanentInputError(f"export.generated names no earlier stage: {missing}")
        return {g: ctx.upstream[g] for g in self.config.generated}

    def selected(self, ctx: StageContext, counts: Counter | None = None,
                 starts: dict[str, int] | None = None) -> Iterator[Sample]:
        """Kept samples with images (and their generated samples), in raw order, shard by shard.

        ``starts``: filled with raw shard -> position of its first exported sample in every format's
        output order (``curate inspect`` finds a sample's exported place from it and its own shard)."""
        sel = self._select_prefix(ctx)
        gen = self._generated_prefixes(ctx)
        counts = counts if counts is not None else Counter()
        for shard in raw_shards(ctx.store, ctx.raw_prefix):
            keep = None if sel is None else {d["key"] for d in read_decisions(ctx.store, sel, shard) if d["selected"]}
            if keep is not None and not keep:
                continue
            if starts is not None:
                starts[shard] = counts["generated"] + (counts["raw"] if self.config.include_raw else 0)
            unit = unit_of(shard)
            sidecars = {g: iter_members(ctx.store.uri(f"{p}/{shard}")) for g, p in gen.items()}
            quarantined = {g: {q["key"] for q in read_quarantine(ctx.store, p, unit)} for g, p in gen.items()}
            raw = iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}")
            for s, joined in iter_aligned(raw, sidecars, quarantined):
                if keep is not None and s.key not in keep:
                    continue
                counts["raw"] += 1
                if self.config.include_raw:
                    yield s
                for g, member in joined.items():
                    for item in json.loads(member["json"])["generated"] if member is not None else ():
                        counts["generated"] += 1
                        yield materialize(s, item)

    def _n_selected(self, ctx: StageContext, sel: str | None) -> int:
        if sel is not None:
            return json.loads(ctx.store.read_text(f"{sel}/_stats/all.json"))["out"]
        return sum(json.loads(ctx.store.read_text(f"{ctx.raw_prefix}/_stats/{s[:-4]}.json"))["out"]
                   for s in raw_shards(ctx.store, ctx.raw_prefix))

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
        counts: Counter = Counter()  # raw and generated samples, counted on the first format's pass
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
        summary.update(formats=written, raw_exported=counts["raw"] if c.include_raw else 0,
                       generated_exported=counts["generated"])
        # where each raw shard's samples start in the output order, and the exported shards' sizes
        summary["order"] = {"shard_start": starts, "webdataset_shards": wds_sizes,
                            "include_raw": c.include_raw, "generated": self._generated_prefixes(ctx)}
        summary["upstream"] = [[sid, p] for sid, p in ctx.upstream.items()]  # the stages, in recipe order
        # in = out is checked by finish(): a selected key missing from the raw shards fails the stage.
        out.count_out(counts["raw"])
        dst.write_text(f"{ctx.prefix}/summary.json", json.dumps(summary, indent=1, sort_keys=True))
        write_report(ctx, sel, dst, f"{ctx.prefix}/report.html")
        out.extra.update(formats=written, generated=counts["generated"])
        return out.finish(n_selected)

    def _write_webdataset(self, ctx: StageContext, samples: Iterator[Sample], dst=None,
                          sizes: list[int] | None = None) -> int:
        """Reshard ``samples``; ``sizes`` gets the number of samples of each shard written."""
        n, w, idx = 0, None, 0
        sizes = sizes if sizes is not None else []
        dst = dst if dst is not None else no_link_store(ctx.output, ctx.prefix)
        try:
            for s in samples:
                if w is None:
                    w = ShardWriter(dst, f"{ctx.prefix}/webdataset/{shard_name(idx)}")
                w.write_sample(s)
                n += 1
                if w.count >= self.config.shard_size or 0 < self.config.shard_bytes <= w.bytes:
                    w.close()
                    sizes.append(w.count)
                    w, idx = None, idx + 1
            if w is not None:
                w.close()
                sizes.append(w.count)
        except BaseException as e:
            if w is not None:
                w.abort(e)
            raise
        return n
