"""Stage name -> implementing class, resolved lazily so that importing the registry loads no model code.

One name per stage everywhere: the recipe's ``stage:``, ``python -m jobs <name>`` and the
``<name-with-dashes>`` Argo template. Adding a stage is its module plus one line here: what it reads, its
resource profile, its image and whether it calls an LLM are declared on the class (:class:`Stage`).
"""

from __future__ import annotations

import importlib

from .stage import PermanentInputError, Stage

STAGES: dict[str, str] = {
    "ingest": "libcurate.ingest:IngestStage",
    "score_length": "libcurate.scoring.length:LengthStage",
    "score_clip": "libcurate.scoring.clip:ClipStage",
    "score_reward": "libcurate.scoring.reward:RewardStage",
    "score_joint": "libcurate.scoring.joint:JointStage",
    "judge_score": "libcurate.llm.judge:JudgeScoreStage",
    "judge_gavie": "libcurate.llm.gavie:GavieStage",
    "blind_answer": "libcurate.llm.blind:BlindAnswerStage",
    "generate_caption": "libcurate.generate.caption:CaptionStage",
    "generate_mminstruct": "libcurate.generate.mminstruct:MMInstructStage",
    "generate_lrv": "libcurate.generate.lrv:LrvStage",
    "retrieve": "libcurate.generate.retrieve:RetrieveStage",
    "hash_image": "libcurate.select.hash_image:HashImageStage",
    "dedup": "libcurate.select.dedup_stage:DedupStage",
    "cluster": "libcurate.select.cluster_stage:ClusterStage",
    "decontaminate": "libcurate.select.decontaminate_stage:DecontaminateStage",
    "select": "libcurate.select.stage:SelectStage",
    "export": "libcurate.export:ExportStage",
    "train": "libcurate.train.stage:TrainStage",
    "ig4_selector": "libcurate.train.ig4_stage:IG4SelectorStage",
}


def stage_class(name: str) -> type[Stage]:
    """The :class:`Stage` subclass registered under ``name``."""
    try:
        target = STAGES[name]
    except KeyError:
        raise PermanentInputError(f"unknown stage {name!r}; known: {sorted(STAGES)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
