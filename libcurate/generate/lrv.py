"""``generate_lrv``: positive and negative visual instructions from dense region captions (LRV-Instruction).

The generator sees the image only as region captions with boxes (same line format as GAVIE). One request
per configured kind:

* ``positive``: instructions with answers across task types (``tasks``; LRV's ten named tasks by default),
  parsed from ``Instruction:`` / ``Answer:`` / ``Task:`` blocks; the task must be one of ``tasks``
  (case, spaces and punctuation ignored) and the answer at most ``max_answer_words`` words;
* ``negative_nonexistent`` (nonexistent objects/activities/attributes/interactions),
  ``negative_existent`` (existing objects with wrong attributes) and ``knowledge_manipulation`` (false world
  knowledge about depicted things; LRV published no prompt for it, ours is our own): ``Instruction:`` /
  ``Reason:`` blocks, where the reason becomes the answer.

Regions come from ``metadata["regions"]`` or ``regions_file`` (by the sample's image id:
:func:`~libcurate.formats.lrv.lookup_regions`); a sample with
none is quarantined (``no_regions``). Items: ``type`` is ``positive`` or ``negative``; ``task`` the task name
(positive) or the manipulation kind (negative). Malformed blocks are rejected item by item with a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..llm.client import LLMRequest, LLMResult, LLMSettings
from ..llm.gavie import RegionsInput, format_regions
from ..llm.parsing import ParseFailure, parse_blocks
from ..llm.prompts import pinned_versions
from ..llm.stage import Plan, Reject
from ..records import Sample
from ..stage import StageConfig
from .common import GenerateStage, make_item, reject

KINDS = {"positive": "lrv_positive", "negative_nonexistent": "lrv_negative_nonexistent",
         "negative_existent": "lrv_negative_existent", "knowledge_manipulation": "lrv_knowledge"}
NEG_TASK = {"negative_nonexistent": "nonexistent_element", "negative_existent": "existent_element",
            "knowledge_manipulation": "knowledge_manipulation"}
LRV_TASKS = ("Image Captioning", "Image Sentiment Analysis", "Activity Recognition", "Object Interaction Analysis",
             "Object Attribute Detection", "Multi-choice VQA", "Visual Entailment", "Visual Commonsense Reasoning",
             "Styled Image Caption", "Referential Expression Grounding")


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


@dataclass
class LrvConfig(StageConfig):
    """Settings of ``generate_lrv``.

    Attributes:
        kinds: any of ``positive``, ``negative_nonexistent``, ``negative_existent``, ``knowledge_manipulation``.
        n_positive: positive instructions asked per sample (LRV: 20).
        n_negative: negative instructions asked per sample and kind (LRV: 6).
        tasks: task names for positive instructions.
        per_task: at most this many positive instructions per task (LRV: fewer than 3).
        max_words: the answer length the prompt asks for (LRV: under 30 words).
        max_answer_words: longer answers are rejected.
        regions_file: JSON ``image_id -> [{caption, bbox}]`` (local or ``s3://``), by the
            sample's image id (``formats.lrv.lookup_regions``).
        max_regions: at most this many regions in the prompt (0: all).
        prompt_versions: filled in with each kind's template version (part of the config hash).
        llm: :class:`~libcurate.llm.client.LLMSettings`.
    """

    kinds: tuple = tuple(KINDS)
    n_positive: int = 10
    n_negative: int = 6
    tasks: tuple = LRV_TASKS
    per_task: int = 2
    max_words: int = 30
    max_answer_words: int = 60
    regions_file: str = ""
    max_regions: int = 0
    prompt_versions: tuple = ()
    llm: Any = field(default_factory=lambda: LLMSettings(max_tokens=2000))

    def __post_init__(self):
        self.llm = LLMSettings.from_any(self.llm)
        self.kinds, self.tasks = tuple(self.kinds), tuple(self.tasks)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct values of {list(KINDS)}, got {list(self.kinds)}")
        if min(self.n_positive, self.n_negative, self.per_task, self.max_words, self.max_answer_words) < 1:
            raise ValueError("n_positive, n_negative, per_task, max_words and max_answer_words must be >= 1")
        if "positive" in self.kinds and not self.tasks:
            raise ValueError("tasks must not be empty when generating positive instructions")
        if self.max_regions < 0:
            raise ValueError("max_regions must be >= 0")
        self.prompt_versions = pinned_versions((KINDS[k] for k in self.kinds), self.prompt_versions)


class LrvStage(RegionsInput, GenerateStage):
    """LRV-style positive and negative instruction generation (see the module docstring)."""

    name = "generate_lrv"
    Config = LrvConfig

    def __init__(self, config: LrvConfig):
        super().__init__(config)
        self.task_names = {_norm(t): t for t in config.tasks}

    def prompt_names(self) -> dict[str, str]:
        return {k: KINDS[k] for k in self.config.kinds}

    def plan(self, sample: Sample, extra: Any) -> Plan | Reject:
        c = self.config
        regions = self.sample_regions(sample)
        if isinstance(regions, Reject):
            return regions
        text = format_regions(regions, c.max_regions)
        reqs, state = [], []
        for k in c.kinds:
            tpl = self.templates[k]
            n = c.n_positive if k == "positive" else c.n_negative
            msgs = tpl.render(regions=text, n=n, tasks="; ".join(c.tasks), per_task=c.per_task, max_words=c.max_words)
            reqs.append(LLMRequest(msgs, tpl.version))
            state.append({"type": "positive" if k == "positive" else "negative", "kind": k,
                          "prompt_version": tpl.version})
        return Plan(reqs, state)

    def parse_reply(self, sample: Sample, meta: dict, result: LLMResult) -> tuple[list[dict], list[dict]]:
        positive = meta["kind"] == "positive"
        fields = ("instruction", "answer", "task") if positive else ("instruction", "reason")
        blocks = parse_blocks(result.text, fields)
        if isinstance(blocks, ParseFailure):
            return [], [reject(blocks.reason, blocks.detail, (result.text or "")[:500])]
        good, bad, seen = [], [], set()
        answer_field = "answer" if positive else "reason"
        for b in blocks:
            instr, ans = (b.get("instruction") or "").strip(), (b.get(answer_field) or "").strip()
            if not instr or not ans:
                bad.append(reject("missing_field", f"needs instruction and {answer_field}", b))
                continue
            if instr.lower() in seen:
                bad.append(reject("duplicate_instruction", instr, b))
                continue
            if len(ans.split()) > self.config.max_answer_words:
                bad.append(reject("answer_too_long", f"{len(ans.split())} words", b))
                continue
            if positive:
                task = self.task_names.get(_norm(b.get("task") or ""))
                if task is None:
                    bad.append(reject("unknown_task", b.get("task"), b))
                    continue
                good.append(make_item(instr, ans, "positive", task, sample.domain, {}))
            else:
                good.append(make_item(instr, ans, "negative", NEG_TASK[meta["kind"]], sample.domain, {}))
            seen.add(instr.lower())
        return good, bad
