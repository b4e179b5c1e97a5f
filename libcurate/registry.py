"""Stage name -> implementing class, resolved lazily so that importing the registry loads no model code.

One name per stage everywhere: the recipe's ``stage:``, ``jobs/<name>.py``, the ``<name-with-dashes>``
Argo template and the image table in ``workflows/tables.py``.
"""

from __future__ import annotations

import importlib

from .stage import PermanentInputError, Stage

STAGES: dict[str, str] = {
    "ingest": "libcurate.ingest:IngestStage",
    "score_length": "libcurate.scoring.length:LengthStage",
    "score_clip": "libcurate.scoring.clip:ClipStage",
    "score_reward": "libcurate.scoring.reward:RewardStage",
    "judge_score": "libcurate.llm.judge:JudgeScoreStage",
    "judge_gavie": "libcurate.llm.gavie:GavieStage",
    "generate_caption": "libcurate.generate.caption:CaptionStage",
    "generate_mminstruct": "libcurate.generate.mminstruct:MMInstructStage",
    "generate_lrv": "libcurate.generate.lrv:LrvStage",
    "select": "libcurate.select.threshold:SelectStage",
    "export": "libcurate.export:ExportStage",
}


def stage_class(name: str) -> type[Stage]:
    """The :class:`Stage` subclass registered under ``name``."""
    try:
        target = STAGES[name]
    except KeyError:
        raise PermanentInputError(f"unknown stage {name!r}; known: {sorted(STAGES)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
