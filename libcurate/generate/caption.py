"""``generate_caption``: detailed captions from a vision-language model (MMInstruct step (b)).

The image goes to the VLM as a base64 data URL (downsized to ``image_max_side``); OCR text
(``metadata["ocr"]``: a string or list of lines) and tags (``metadata["tags"]``) of the sample, when
present, are given as prior knowledge. A reply that is too short, truncated (``finish_reason=length``) or
a refusal is rejected — never written as a caption (MMInstruct wrote the literal string "error").

Sidecar: the common generation format (``libcurate.generate.common``) plus ``caption`` (the text, for
stages that consume captions, e.g. ``generate_mminstruct`` with ``caption_source: <this stage id>``).
One item: ``type = "caption"``, ``task = "detailed_captioning"``, human turn = ``instruction``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..llm.client import LLMRequest, LLMResult, LLMSettings
from ..llm.prompts import pinned_template
from ..llm.stage import Plan, Reject, sample_images
from ..records import Sample
from ..stage import StageConfig
from .common import GenerateStage, make_item, reject

REFUSAL = re.compile(r"^\s*(i'?m sorry|sorry,|i cannot|i can'?t|i am unable|as an ai)", re.IGNORECASE)


def prior_note(sample: Sample, use_ocr: bool, use_tags: bool) -> str:
    notes = []
    ocr = sample.metadata.get("ocr") if use_ocr else None
    if ocr:
        text = " ".join(ocr) if isinstance(ocr, list) else str(ocr)
        notes.append(f"Text found in the image by OCR (may contain errors): {text.strip()}\n"
                     "Use this text together with what you see.")
    tags = sample.metadata.get("tags") if use_tags else None
    if tags:
        t = ", ".join(tags) if isinstance(tags, list) else str(tags)
        notes.append(f"Keywords associated with the image (may be noisy): {t.strip()}")
    return "\n".join(notes)


@dataclass
class CaptionConfig(StageConfig):
    """Settings of ``generate_caption``.

    Attributes:
        prompt: template name or path (built-in ``caption_detailed``).
        instruction: the human turn of the generated caption sample.
        min_words: shorter captions are rejected (and the prompt asks for at least this many words).
        use_ocr / use_tags: pass ``metadata["ocr"]`` / ``metadata["tags"]`` as prior knowledge.
        image_max_side: downsize to fit this square before sending (MMInstruct used 512); 0 keeps.
        image_detail: ``low``, ``high`` or ``auto``.
        prompt_version: the template's content version (filled in; part of the config hash).
        llm: :class:`~libcurate.llm.client.LLMSettings` (``max_tokens`` should allow a long caption).
    """

    prompt: str = "caption_detailed"
    instruction: str = "Describe this image in detail."
    min_words: int = 40
    use_ocr: bool = True
    use_tags: bool = True
    image_max_side: int = 512
    image_detail: str = "low"
    prompt_version: str = ""
    llm: Any = field(default_factory=lambda: LLMSettings(max_tokens=1024))

    def __post_init__(self):
        self.llm = LLMSettings.from_any(self.llm)
        self.prompt_version = pinned_template(self.prompt, self.prompt_version).version
        if self.min_words < 0 or self.image_max_side < 0:
            raise ValueError("min_words and image_max_side must be >= 0")
        if self.image_detail not in ("auto", "low", "high"):
            raise ValueError("image_detail must be auto, low or high")
        if not self.instruction.strip():
            raise ValueError("instruction must not be empty")


class CaptionStage(GenerateStage):
    """Detailed VLM captions of every raw sample's image(s)."""

    name = "generate_caption"
    Config = CaptionConfig

    def needs_images(self) -> bool:
        return True

    def plan(self, sample: Sample, extra: Any) -> Plan | Reject:
        c = self.config
        msgs = self.template.render(min_words=c.min_words, prior_note=prior_note(sample, c.use_ocr, c.use_tags))
        msgs[-1]["content"] = [*sample_images(sample, c.image_max_side, c.image_detail), msgs[-1]["content"]]
        return Plan([LLMRequest(msgs, self.template.version)],
                    state=[{"type": "caption", "prompt_version": self.template.version}])

    def parse_reply(self, sample: Sample, meta: dict, result: LLMResult) -> tuple[list[dict], list[dict]]:
        text = (result.text or "").strip()
        if meta.get("truncated"):
            return [], [reject("truncated", "finish_reason=length", text[:500])]
        if REFUSAL.match(text):
            return [], [reject("refusal", text[:200], text[:500])]
        n = len(text.split())
        if n < self.config.min_words:
            return [], [reject("too_short", f"{n} words < {self.config.min_words}", text[:500])]
        return [make_item(self.config.instruction, text, "caption", "detailed_captioning", sample.domain, {})], []

    def record(self, sample: Sample, plan: Plan, results: list[LLMResult]) -> dict | Reject:
        rec = super().record(sample, plan, results)
        if isinstance(rec, dict):
            rec["caption"] = rec["generated"][0]["conversations"][1]["value"]
        return rec
