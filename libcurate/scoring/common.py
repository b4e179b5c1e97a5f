"""Plumbing shared by the model scoring stages: which text is scored, aggregation, devices, and the set of
open per-shard outputs of a stage that streams batches over many shards."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

from ..malloc import keep_freed_memory
from ..records import Sample, strip_image_token
from ..stage import ShardOutput, Stage, StageContext, unit_of

TEXT_MODES = ("caption", "first_instruction", "responses", "conversation")
AGGREGATES = ("mean", "max", "min", "first")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def texts_for(sample: Sample, mode: str) -> list[str]:
    """The text(s) of ``sample`` a model scores.

    * ``caption``: the first assistant answer (InstructionGPT-4 scores its caption; for a captioning
      sample it is the caption).
    * ``first_instruction``: the first human turn, ``<image>`` removed.
    * ``responses``: every assistant answer, one text each.
    * ``conversation``: all turns joined with newlines, ``<image>`` removed (Self-Filter flattens the
      conversation the same way; CLIP truncates it to its context, which is recorded).
    """
    if mode == "caption":
        return sample.responses[:1]
    if mode == "first_instruction":
        return [sample.first_instruction]
    if mode == "responses":
        return list(sample.responses)
    if mode == "conversation":
        return ["\n".join(strip_image_token(t.value) for t in sample.conversations)]
    raise ValueError(f"unknown text mode {mode!r}; want one of {TEXT_MODES}")


def aggregate(values: Iterable[float], how: str) -> float:
    vals = [float(v) for v in values]
    if not vals:
        return math.nan
    if how == "mean":
        return sum(vals) / len(vals)
    if how == "max":
        return max(vals)
    if how == "min":
        return min(vals)
    if how == "first":
        return vals[0]
    raise ValueError(f"unknown aggregate {how!r}; want one of {AGGREGATES}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def model_device(configured: str | None, ctx: StageContext) -> str:
    """The device a model stage runs on: its ``device`` setting, else the runner's; ``cuda`` without a
    GPU is an error, not a silent fallback to a 100x slower CPU run. On CPU the process keeps a batch's
    freed activations for the next batch (:mod:`libcurate.malloc`)."""
    import torch

    dev = configured or ctx.device or "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {dev!r} requested but torch sees no CUDA device")
    if dev == "cpu":
        keep_freed_memory()
    return dev


class ModelStage(Stage):
    """A stage that runs a model over batches spanning many shards, on the GPU profile and image (the
    model loads once per process; :meth:`Stage.process_shards` gets every shard of the process)."""

    profile = "gpu"
    image = "gpu"
    spans_shards = True


def autocast(device: str, precision: str):
    """bf16/fp16 autocast on CUDA (``auto`` = bf16); fp32 on CPU unless asked (CPU bf16 is slow without
    AMX and changes scores)."""
    import torch

    kind = device.split(":")[0]
    if precision == "auto":
        precision = "bf16" if kind == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=kind, dtype=dtype)


class ShardOutputs:
    """One open :class:`ShardOutput` per shard while a stage streams batches over many shards (a loader
    worker's batches of several shards interleave with other workers'); each is finished as soon as
    its last sample is written, so finished shards survive a later failure."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.open: dict[str, ShardOutput] = {}
        self.stats: dict[str, dict] = {}

    def get(self, shard: str) -> ShardOutput:
        out = self.open.get(shard)
        if out is None:
            out = self.open[shard] = ShardOutput(self.ctx.store, self.ctx.prefix, unit_of(shard))
        return out

    def finish(self, shard: str, n_in: int, extra: dict | None = None) -> dict:
        out = self.get(shard)
        out.extra.update(extra or {})
        self.stats[shard] = out.finish(n_in)
        del self.open[shard]
        return self.stats[shard]

    def abort(self, exc: BaseException) -> None:
        for out in self.open.values():
            out.abort(exc)
        self.open.clear()


def timed_loop(loader, forward, write, outs: ShardOutputs) -> dict:
    """The scoring loop of a shard-spanning model stage: per batch ``forward(batch)`` then
    ``write(batch, forward's result)``; aborts the open shards on any failure. Returns ``{"stats":
    {shard: stats}, "load_s", "model_s", "write_s", "images"}``: where this process's time went (with no
    loader workers ``load_s`` is the read + decode + tokenise work itself)."""
    import time

    import torch

    t = {"load_s": 0.0, "model_s": 0.0, "write_s": 0.0, "images": 0}
    try:
        with torch.inference_mode():
            it = iter(loader)
            while True:
                t0 = time.perf_counter()
                batch = next(it, None)
                t1 = time.perf_counter()
                t["load_s"] += t1 - t0
                if batch is None:
                    break
                out = forward(batch)
                t2 = time.perf_counter()
                t["model_s"] += t2 - t1
                write(batch, out)
                t["write_s"] += time.perf_counter() - t2
                t["images"] += sum(item.get("n_images", 0) for item in batch["items"] if "error" not in item)
    except BaseException as e:
        outs.abort(e)
        raise
    return {"stats": dict(outs.stats), **t}
