"""``score_reward``: a text reward model's logit per (instruction, response) turn, aggregated per sample.

InstructionGPT-4 scores (``"Describe this image in detail."``, caption) with
``OpenAssistant/reward-model-deberta-v3-large-v2``; set ``instruction`` to that question and
``turns: first`` to reproduce it (it rounds to 4 decimals; we store the raw logit). The model never
sees the image.

JSON fields: ``reward`` (aggregate over turns), ``rewards`` (one per scored turn), ``aggregate``,
``n_turns``, ``tokens`` (untruncated token count of each pair incl. special tokens), ``truncated``
(any pair cut to ``max_length``), ``n_truncated``, ``max_length``, ``instruction`` (the override or
null), ``model``.

Pairs are batched across the samples of a shard, never across shards (padding and matrix kernels
depend on a batch's make-up, so a batch mixing shards would make a shard's scores depend on which other
shards the process was given, e.g. on an Argo pod or on a rerun); the model loads once per process, and
each shard's sidecar is written in raw order and finished as soon as its last sample is scored. On CPU,
when the shards fill every core, one single-threaded replica per core scores whole shards
(:mod:`libcurate.scoring.replicas`), as ``score_clip`` does.

The default ``test-tiny-reward`` is a random offline model for demos and tests; for real scores use
``model: OpenAssistant/reward-model-deberta-v3-large-v2`` (with its weights in the image's HF cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import ClassVar, Iterable

from ..shards import iter_samples
from ..stage import StageConfig, StageContext
from .common import PRECISIONS, ModelStage, ShardOutputs, aggregate, autocast, check_choice, model_device


@dataclass
class RewardConfig(StageConfig):
    """Settings of ``score_reward``.

    Attributes:
        model: reward model for :func:`libcurate.models.reward.load_reward` (hub id, local dir,
            ``test-tiny-reward``).
        turns: ``all`` (every instruction/response pair) or ``first``.
        instruction: a fixed question replacing every sample's instruction (InstructionGPT-4 uses
            ``"Describe this image in detail."``); empty = the sample's own instruction.
        aggregate: ``mean``, ``min``, ``max`` or ``first`` over a sample's turns.
        batch_size: pairs per forward pass (spans samples, never shards).
        max_length: tokens per pair after truncation (``longest_first``); 0 = the model's limit.
        device: ``cpu``, ``cuda``...; empty = the runner's device.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
        torch_threads: intra-op threads (0 = torch's default).
        replicas: CPU model replicas (as in ``score_clip``): 0 = auto (one single-threaded replica per
            core when the shards fill every core and ``torch_threads`` is not set), 1 = never, ``N``.
    """

    UNHASHED: ClassVar[tuple[str, ...]] = ("batch_size", "torch_threads", "replicas")  # how fast, not what

    model: str = "test-tiny-reward"
    turns: str = "all"
    instruction: str | None = None
    aggregate: str = "mean"
    batch_size: int = 32
    max_length: int = 0
    device: str | None = None
    precision: str = "auto"
    torch_threads: int = 0
    replicas: int = 0

    def __post_init__(self):
        if not self.model:
            raise ValueError("model must name a reward model")
        check_choice("turns", self.turns, ("all", "first"))
        check_choice("aggregate", self.aggregate, ("mean", "min", "max", "first"))
        check_choice("precision", self.precision, PRECISIONS)
        if self.batch_size < 1 or self.max_length < 0 or self.torch_threads < 0 or self.replicas < 0:
            raise ValueError("batch_size >= 1, max_length >= 0, torch_threads >= 0 and replicas >= 0 are required")


class RewardStage(ModelStage):
    """Scores every sample's (instruction, response) pairs with a reward model; see the module doc."""

    name = "score_reward"
    Config = RewardConfig

    def process_shards(self, ctx: StageContext, shards: Iterable[str]) -> list[dict]:
        from ..models.reward import load_reward
        from .replicas import run_split

        shards = list(shards)
        cfg = self.config
        device = model_device(cfg.device, ctx)
        self.split = self._split(shards, device)
        bundle = load_reward(cfg.model, device)
        max_len = min(cfg.max_length or bundle.max_length, bundle.max_length)

        def work(source, replica: int = 0) -> dict:
            return self._score_shards(ctx, source, bundle, max_len, device)

        return run_split(self, shards, work)

    def _split(self, shards: list[str], device: str):
        """One process with ``torch_threads``, or one single-threaded replica per core when the shards
        fill every core (:mod:`libcurate.scoring.replicas`; the rule of :mod:`.clip_split`)."""
        from .clip import available_cores
        from .clip_split import Split, replica_split

        cfg = self.config
        rep = replica_split(cfg.replicas, available_cores(), len(shards), device.startswith("cuda"),
                            hand_set=bool(cfg.torch_threads), note={"rule": "replicas fill every core"})
        return rep or Split(cfg.torch_threads, 0, float("nan"), {"configured": bool(cfg.torch_threads)})

    def _score_shards(self, ctx: StageContext, shards: Iterable[str], bundle, max_len: int, device: str) -> dict:
        """Scores ``shards`` (a list, or a replica's shard source) in this process; ``{"stats": ...}``."""
        cfg = self.config
        outs = ShardOutputs(ctx)
        # Samples (and shard-end markers) wait here in raw order until all their pairs are scored.
        queue: deque = deque()
        pairs: list[tuple[str, str]] = []
        slots: list[tuple[dict, int]] = []

        def flush():
            if pairs:
                scores, counts = self._score(bundle, pairs, max_len, device)
                for (rec, j), s, c in zip(slots, scores, counts):
                    rec["rewards"][j], rec["tokens"][j] = s, c
                pairs.clear()
                slots.clear()
            while queue:
                kind, shard, payload = queue.popleft()
                if kind == "end":
                    outs.finish(shard, payload, {"model": cfg.model, "max_length": max_len})
                else:
                    self._write(outs.get(shard), payload, max_len)

        try:
            for shard in shards:
                n = 0
                for s in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}", with_images=False):
                    n += 1
                    todo = s.turn_pairs()[: 1 if cfg.turns == "first" else None]
                    rec = {"key": s.key, "rewards": [None] * len(todo), "tokens": [None] * len(todo)}
                    for j, (instr, resp) in enumerate(todo):
                        pairs.append((cfg.instruction or instr, resp))
                        slots.append((rec, j))
                    queue.append(("sample", shard, rec))
                    if len(pairs) >= cfg.batch_size:
                        flush()
                queue.append(("end", shard, n))
                flush()  # a batch never spans shards: a shard's scores depend on the shard alone
        except BaseException as e:
            outs.abort(e)
            raise
        return {"stats": dict(outs.stats)}

    def _score(self, bundle, pairs, max_len: int, device: str) -> tuple[list[float], list[int]]:
        import torch

        tok = bundle.tokenizer
        first, second = [p[0] for p in pairs], [p[1] for p in pairs]
        counts = [len(ids) for ids in tok(first, second, truncation=False, verbose=False)["input_ids"]]
        enc = tok(first, second, truncation="longest_first", max_length=max_len, padding=True,
                  return_tensors="pt").to(device)
        with torch.inference_mode(), autocast(device, self.config.precision):
            logits = bundle.model(**enc).logits
        return logits.float()[:, 0].cpu().tolist(), counts

    def _write(self, out, rec: dict, max_len: int) -> None:
        key = rec.pop("key")
        done = self.record(rec, max_len)
        if isinstance(done, tuple):
            out.quarantine(key, *done)
        else:
            out.write_json(key, done)

    def record(self, rec: dict, max_len: int):
        """The finished JSON record of a scored sample (``rewards`` and ``tokens`` filled in), or
        ``(reason, detail)`` when it has nothing to score."""
        cfg = self.config
        if not rec["rewards"]:
            return ("no_turns", "the conversation has no (instruction, response) pair")
        truncated = [c > max_len for c in rec["tokens"]]
        rec.update(reward=aggregate(rec["rewards"], cfg.aggregate), aggregate=cfg.aggregate,
                   n_turns=len(rec["rewards"]), truncated=any(truncated), n_truncated=sum(truncated),
                   max_length=max_len, instruction=cfg.instruction or None, model=cfg.model)
        return rec
