"""``judge_score``: an LLM (or VLM) rates each sample on a numeric scale with a versioned prompt.

Built-in prompts (``libcurate/llm/prompts``): ``caption_quality_100`` (InstructionGPT-4 style, 0–100,
first instruction + first answer), ``conversation_quality_10`` (Self-Filter style, 0–10, the whole
conversation), ``alpagasus_5`` (AlpaGasus style, 0–5). Any template file with the same placeholders
(``$instruction``, ``$response``, ``$conversation``, ``$image_note``, ``$reply_format``) works.

Sidecar ``{key}.json``::

    score          mean of the valid values, on the template's scale (always a number)
    score_norm     (score - lo) / (hi - lo), in [0, 1]
    scale          [lo, hi]
    values         every valid value (one per judge x repeat)
    stdev          population stdev of ``values`` (0 for one value): the agreement
    n / n_valid    asked / parsed
    status         "ok" (all parsed) or "partial" (some replies unparseable or failed)
    replies        [{"model", "raw", "parse": null | {"reason", "detail"}, "finish_reason"[, "reasks"]}]
                   (identical on a cached re-run: cache hits are counted in ``_stats`` only); ``reasks``:
                   the unparseable replies ``[{"raw", "reason"}]`` before this one (``reask > 0``)
    ratings        [{"model", "repeat", "value"}]: each parsed value with the judge and repeat that gave
                   it (what ``curate eval judge`` measures agreement on)
    models, prompt_version, with_image

Decision on failures: a sample gets a sidecar only when at least one reply parsed. A sample whose calls
all failed (after retries) is quarantined with reason ``llm_call_failed``; one whose replies were all
unparseable is quarantined with ``unparseable_reply`` (detail: parse reasons and the start of the raw
replies). So a sidecar ``score`` is always a real parsed judgement and never a default.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from ..records import Sample
from ..stage import StageConfig
from .messages import LLMRequest
from .results import LLMResult
from .settings import LLMSettings
from .parsing import ParseFailure, parse_score
from .prompts import pinned_template
from .reask import MAX_REASKS, ReaskingClient
from .stage import LLMShardStage, Plan, Reject, sample_images

RAW_MAX = 4000

REPLY_TEXT = ("Reply format: write the score alone on the first line (a number from {lo:g} to {hi:g}, "
              "nothing else on that line). From the second line on, explain your rating briefly.")
REPLY_JSON = ('Reply with only a JSON object: {{"score": <a number from {lo:g} to {hi:g}>, '
              '"explanation": "<a brief reason>"}}.')
IMAGE_SEEN = "The image is attached; check what the text says against it."
IMAGE_UNSEEN = "You will not see the image; judge the text on its own merits."


def score_schema(lo: float, hi: float) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "judge_score", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": ["score", "explanation"],
        "properties": {"score": {"type": "number", "minimum": lo, "maximum": hi},
                       "explanation": {"type": "string"}}}}}


def render_conversation(sample: Sample) -> str:
    lines = []
    for instr, resp in sample.turn_pairs():
        lines.append(f"User: {instr}")
        lines.append(f"Assistant: {resp}")
    return "\n".join(lines)


@dataclass
class JudgeScoreConfig(StageConfig):
    """Settings of ``judge_score``.

    Attributes:
        prompt: built-in template name (``caption_quality_100``, ``conversation_quality_10``,
            ``alpagasus_5``) or a path to a template file.
        scale: ``(lo, hi)`` of the score; empty takes the template's ``#! scale:`` line.
        with_image: send the sample's image(s) as base64 data URLs (a VLM judge).
        image_max_side: downsize images to fit this many pixels before sending (0 keeps them).
        image_detail: the image part's ``detail`` (``auto``, ``low``, ``high``).
        judges: model ids to ask; empty means ``llm.model`` alone. Several judges give agreement.
        repeats: ask each judge this many times (distinct cache entries; use ``llm.temperature`` > 0 for
            independent draws).
        prompt_version: filled with the template's content version; part of the config hash, so editing
            a template re-runs the stage. A recipe may pin it: a mismatch is then an error.
        reask: on an unparseable reply, ask again up to this many times (0-3) with the reply and what was
            wrong (:mod:`libcurate.llm.reask`); counted in ``_stats.llm.reasks`` and kept in the sidecar.
            Left out of the config hash while 0, so existing runs keep their prefix.
        llm: :class:`~libcurate.llm.client.LLMSettings` (endpoint, limits, retries, cache, cost).
    """

    prompt: str = "caption_quality_100"
    scale: tuple = ()
    with_image: bool = False
    image_max_side: int = 0
    image_detail: str = "auto"
    judges: tuple = ()
    repeats: int = 1
    prompt_version: str = ""
    llm: Any = field(default_factory=LLMSettings)
    reask: int = 0

    def hash_dict(self) -> dict:
        d = super().hash_dict()
        if not self.reask:
            d.pop("reask", None)
        return d

    def __post_init__(self):
        self.llm = LLMSettings.from_any(self.llm)
        if isinstance(self.reask, bool) or not isinstance(self.reask, int) or not 0 <= self.reask <= MAX_REASKS:
            raise ValueError(f"reask must be an integer in [0, {MAX_REASKS}]")
        tpl = pinned_template(self.prompt, self.prompt_version)
        self.prompt_version = tpl.version
        if not self.scale:
            if "scale" not in tpl.meta:
                raise ValueError(f"prompt {self.prompt!r} has no '#! scale:' line; set scale: [lo, hi]")
            self.scale = tuple(float(x) for x in tpl.meta["scale"].split())
        self.scale = tuple(float(x) for x in self.scale)
        if len(self.scale) != 2 or not self.scale[0] < self.scale[1]:
            raise ValueError(f"scale must be [lo, hi] with lo < hi, got {list(self.scale)}")
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")
        if self.image_max_side < 0:
            raise ValueError("image_max_side must be >= 0")
        if self.image_detail not in ("auto", "low", "high"):
            raise ValueError("image_detail must be auto, low or high")
        self.judges = tuple(self.judges)
        if any(not isinstance(j, str) or not j for j in self.judges):
            raise ValueError("judges must be non-empty model ids")


class JudgeScoreStage(LLMShardStage):
    """Numeric LLM judgement of every sample (see the module docstring for the sidecar)."""

    name = "judge_score"
    Config = JudgeScoreConfig
    typical_output_tokens = 60  # a score line and a brief reason (llm.cost's expected output)

    def __init__(self, config: JudgeScoreConfig):
        super().__init__(config)
        self.models = list(config.judges) or [config.llm.model]

    def needs_images(self) -> bool:
        return self.config.with_image

    def stats_extra(self) -> dict:
        return {**super().stats_extra(), "judges": self.models}

    def tolerates_partial_failure(self) -> bool:
        return True

    def _reply_format(self) -> str:
        lo, hi = self.config.scale
        return (REPLY_JSON if self.config.llm.structured_output else REPLY_TEXT).format(lo=lo, hi=hi)

    async def _stream(self, ctx, shard, client, *args):
        if self.config.reask:
            scale = self.config.scale

            def why(text):
                v = parse_score(text, scale)
                return f"{v.reason}: {v.detail}" if isinstance(v, ParseFailure) else None

            client = ReaskingClient(client, why, self._reply_format(), self.config.reask)
        return await super()._stream(ctx, shard, client, *args)

    def plan(self, sample: Sample, extra: Any) -> Plan | Reject:
        c = self.config
        lo, hi = c.scale
        pairs = sample.turn_pairs()
        if not pairs:
            return Reject("no_conversation", "the sample has no instruction/answer pair")
        values = {
            "instruction": pairs[0][0], "response": pairs[0][1], "conversation": render_conversation(sample),
            "image_note": IMAGE_SEEN if c.with_image else IMAGE_UNSEEN,
            "reply_format": self._reply_format(),
        }
        try:
            msgs = self.template.render(**values)
        except KeyError as e:
            return Reject("template_error", f"template {self.template.name} needs {e}")
        if c.with_image:
            msgs[-1]["content"] = [*sample_images(sample, c.image_max_side, c.image_detail), msgs[-1]["content"]]
        params = {"response_format": score_schema(lo, hi)} if c.llm.structured_output else {}
        reqs = [LLMRequest(msgs, self.template.version, model=m, params=params, variant=k)
                for m in self.models for k in range(c.repeats)]
        return Plan(reqs)

    def record(self, sample: Sample, plan: Plan, results: list[LLMResult]) -> dict | Reject:
        lo, hi = self.config.scale
        values, replies, reasons, ratings = [], [], [], []
        seen: dict[str, int] = {}
        for r in results:
            repeat = seen.get(r.model, 0)
            seen[r.model] = repeat + 1
            if not r.ok:
                replies.append({"model": r.model, "raw": None, "parse": {"reason": "llm_call_failed",
                                "detail": f"{r.error_kind} {r.error_status}"}, "finish_reason": None})
                reasons.append(f"call:{r.error_kind}")
                continue
            v = parse_score(r.text, (lo, hi))
            if isinstance(v, ParseFailure) and r.finish_reason == "length":
                v.detail = f"truncated reply (finish_reason=length); {v.detail}"
            replies.append({"model": r.model, "raw": (r.text or "")[:RAW_MAX], "finish_reason": r.finish_reason,
                            "parse": v.as_dict() if isinstance(v, ParseFailure) else None})
            if r.reasks:
                replies[-1]["reasks"] = r.reasks
            if isinstance(v, ParseFailure):
                reasons.append(v.reason)
            else:
                values.append(v)
                ratings.append({"model": r.model, "repeat": repeat, "value": v})
        if not values:
            if all(not r.ok for r in results):
                bad = results[0]
                return Reject("llm_call_failed", f"{bad.error_kind} status={bad.error_status} "
                                                 f"attempts={bad.attempts}: {bad.error}")
            raws = " | ".join((x["raw"] or "")[:200] for x in replies)
            return Reject("unparseable_reply", f"{reasons}: {raws}")
        score = statistics.fmean(values)
        return {
            "score": score,
            "score_norm": (score - lo) / (hi - lo),
            "scale": [lo, hi],
            "values": values,
            "ratings": ratings,
            "stdev": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(results),
            "n_valid": len(values),
            "status": "ok" if len(values) == len(results) else "partial",
            "replies": replies,
            "models": self.models,
            "prompt_version": self.template.version,
            "with_image": self.config.with_image,
        }
