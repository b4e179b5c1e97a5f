"""``blind_answer``: does a question actually need its image?

The sample's first question is sent to a text model WITHOUT the image (any OpenAI-compatible endpoint;
the ``blind_answer`` template). The blind answer is compared with the sample's own answer:

* ``yes_no``: the reference starts with yes/no -> the blind answer's first yes/no word must match;
* ``choice``: the reference is a single option letter (``A``, ``(b)``, ``C.``) -> same letter;
* ``numeric``: the reference is a number (optionally with a unit word) -> the blind answer's first number
  must be equal (relative tolerance ``numeric_rel_tol``);
* ``exact``: the normalised texts (lower case, no punctuation, no articles) are equal (a short reference
  only; when they differ, the comparator decides, as ``llm``);
* ``llm``: otherwise the comparator model (``blind_compare`` template) decides, with a strict parse: the
  first line must be ``SAME`` or ``DIFFERENT`` (a JSON ``{"verdict": "same"|"different"}`` also counts).

Sidecar ``{key}.json``::

    answerable        true when the blind answer matches (the question does not need the image)
    answerable_score  1.0 / 0.0, the same as a number (for select thresholds and score weights)
    blind_answer      the model's answer without the image (first 2000 characters)
    reference         the sample's answer (first 2000 characters)
    question          the question asked (image tag removed)
    method            yes_no | choice | numeric | exact | llm
    verdict           the comparator's "same"/"different" (method llm), else null
    comparator_raw    the comparator's reply (method llm), else null
    model, comparator_model, prompt_versions

Failures: a failed call -> ``llm_call_failed``; an unparseable comparator reply -> ``unparseable_reply``
(never a guessed verdict); a sample without a question/answer pair -> ``no_conversation``.

Selection: drop the samples a text model answers without the image with the existing thresholds,
``thresholds: {blind.answerable_score: {max: 0}}`` (``blind`` is this stage's id), or down-weight them
with ``score: {weights: {judge.score: 1, blind.answerable_score: -0.5}}``.

The stage runs online (``llm.batch_api`` is refused): the comparator call depends on the blind answer.
``curate estimate`` counts one comparator request for every sample no rule settles alone (``exact`` and
``llm`` references: an upper bound, since an exact match needs none).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..records import Sample
from ..stage import StageConfig
from .messages import LLMRequest
from .prompts import pinned_versions
from .results import LLMResult, UsageStats
from .settings import LLMSettings
from .stage import LLMShardStage, Plan, Reject

RAW_MAX = 2000
_ARTICLES = {"a", "an", "the"}
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}
_CHOICE = re.compile(r"^\(?([A-Ha-h])[\).:]?$")
_IMAGE_TAG = re.compile(r"<image>\s*")


def normalise(text: str) -> str:
    """Lower case, punctuation removed, articles dropped, spaces collapsed."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def first_number(text: str) -> float | None:
    """The first number in ``text`` (digits, or a number word up to twelve), or None."""
    m = _NUMBER.search(text)
    words = normalise(text).split()
    word = next((i for i, w in enumerate(words) if w in _WORDS), None)
    if m is not None and (word is None or m.start() <= text.lower().find(words[word])):
        try:
            return float(m.group().replace(",", ""))
        except ValueError:
            return None
    return float(_WORDS[words[word]]) if word is not None else None


def match_method(reference: str) -> str:
    """Which rule compares answers to this reference (see the module docstring)."""
    ref = reference.strip()
    words = normalise(ref).split()
    if words and words[0] in ("yes", "no"):
        return "yes_no"
    if _CHOICE.match(ref):
        return "choice"
    if words and len(words) <= 3 and (_NUMBER.fullmatch(words[0]) or words[0] in _WORDS):
        return "numeric"
    return "exact" if len(words) <= 3 else "llm"


def rule_match(method: str, reference: str, candidate: str, rel_tol: float = 1e-6) -> bool | None:
    """Whether ``candidate`` matches ``reference`` under ``method``; None for ``llm`` (the comparator
    decides) and for ``exact`` when the texts differ but the reference is long enough to be paraphrased."""
    if method == "yes_no":
        ref = normalise(reference).split()[0]
        cand = next((w for w in normalise(candidate).split() if w in ("yes", "no")), None)
        return cand == ref
    if method == "choice":
        ref = _CHOICE.match(reference.strip()).group(1).upper()
        m = re.match(r"^\s*\(?([A-Ha-h])(?:[\).:\s]|$)", candidate)
        return bool(m) and m.group(1).upper() == ref
    if method == "numeric":
        a, b = first_number(reference), first_number(candidate)
        return b is not None and math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)
    if method == "exact":
        return normalise(reference) == normalise(candidate)
    return None


def parse_verdict(text: str | None) -> str | None:
    """``same`` / ``different`` from a comparator reply (first non-empty line is exactly SAME or
    DIFFERENT, optionally bold or with a full stop; or JSON ``{"verdict": ...}``), else None."""
    if not text:
        return None
    t = text.strip()
    if t.startswith("{"):
        try:
            v = json.loads(t).get("verdict")
        except (ValueError, AttributeError):
            return None
        return v.lower() if isinstance(v, str) and v.lower() in ("same", "different") else None
    first = t.splitlines()[0].strip(" *._`\t").upper()
    return first.lower() if first in ("SAME", "DIFFERENT") else None


@dataclass
class BlindRequest(LLMRequest):
    """The blind question, carrying what the comparator step needs (not part of the cache key)."""

    state: dict = field(default_factory=dict)


class ComparingClient:
    """Wraps the stage's client: after a blind answer arrives, the rule or the comparator model decides
    (one more request, through the same client: cached, rate-limited, counted)."""

    def __init__(self, client, stage: "BlindAnswerStage"):
        self.client = client
        self.stage = stage

    async def complete(self, req: LLMRequest, stats: UsageStats | None = None) -> LLMResult:
        res = await self.client.complete(req, stats)
        if isinstance(req, BlindRequest) and res.ok:
            st = req.state
            method = match_method(st["reference"])
            st["method"] = method
            st["match"] = rule_match(method, st["reference"], res.text or "", self.stage.config.numeric_rel_tol)
            if method == "exact" and not st["match"]:
                st["method"] = method = "llm"  # a short answer may be worded differently: the comparator decides
            if method == "llm":
                st["comparator"] = await self.client.complete(
                    self.stage.compare_request(st["question"], st["reference"], res.text or ""), stats)
        return res


@dataclass
class BlindAnswerConfig(StageConfig):
    """Settings of ``blind_answer``.

    Attributes:
        prompt / compare_prompt: templates of the blind question and the comparator (built-in
            ``blind_answer`` / ``blind_compare``, or paths).
        comparator_model: model of the comparator; empty: ``llm.model``.
        numeric_rel_tol: relative tolerance of the numeric match.
        prompt_versions: filled with both templates' versions (part of the config hash).
        llm: :class:`~libcurate.llm.settings.LLMSettings` of both calls (``batch_api`` is refused).
    """

    prompt: str = "blind_answer"
    compare_prompt: str = "blind_compare"
    comparator_model: str = ""
    numeric_rel_tol: float = 1e-6
    prompt_versions: tuple = ()
    llm: Any = field(default_factory=LLMSettings)

    def __post_init__(self):
        self.llm = LLMSettings.from_any(self.llm)
        if self.llm.batch_api:
            raise ValueError("blind_answer runs online: its comparator call depends on the blind answer "
                             "(set llm.batch_api: false)")
        if not 0 <= self.numeric_rel_tol < 1:
            raise ValueError("numeric_rel_tol must be in [0, 1)")
        self.prompt_versions = pinned_versions([self.prompt, self.compare_prompt], self.prompt_versions)


class BlindAnswerStage(LLMShardStage):
    """Blind answerability of every sample's first question (see the module docstring)."""

    name = "blind_answer"
    Config = BlindAnswerConfig

    def prompt_names(self) -> dict[str, str]:
        return {"answer": self.config.prompt, "compare": self.config.compare_prompt}

    @property
    def comparator_model(self) -> str:
        return self.config.comparator_model or self.config.llm.model

    def stats_extra(self) -> dict:
        return {**super().stats_extra(), "comparator_model": self.comparator_model}

    async def _stream(self, ctx, shard, client, *args):
        return await super()._stream(ctx, shard, ComparingClient(client, self), *args)

    def compare_request(self, question: str, reference: str, candidate: str) -> LLMRequest:
        msgs = self.templates["compare"].render(question=question, reference=reference, candidate=candidate)
        return LLMRequest(msgs, self.templates["compare"].version, model=self.comparator_model,
                          params={"max_tokens": 8, "temperature": 0.0})

    typical_output_tokens = 16  # a word, a number or one short sentence (llm.cost's expected output)

    def estimate_followups(self, plan: Plan | Reject) -> list[LLMRequest]:
        """For ``curate estimate``: the comparator request a sample may need (its length taken with the
        reference standing in for the blind answer), for every sample no rule can settle alone."""
        if not isinstance(plan, Plan) or match_method(plan.state["reference"]) not in ("exact", "llm"):
            return []
        st = plan.state
        return [self.compare_request(st["question"], st["reference"], st["reference"])]

    def plan(self, sample: Sample, extra: Any) -> Plan | Reject:
        pairs = sample.turn_pairs()
        if not pairs or not pairs[0][0].strip() or not pairs[0][1].strip():
            return Reject("no_conversation", "the sample has no question/answer pair")
        question = _IMAGE_TAG.sub("", pairs[0][0]).strip()
        state = {"question": question, "reference": pairs[0][1].strip()}
        msgs = self.templates["answer"].render(question=question)
        return Plan([BlindRequest(msgs, self.templates["answer"].version, state=state)], state)

    def record(self, sample: Sample, plan: Plan, results: list[LLMResult]) -> dict | Reject:
        st, res = plan.state, results[0]
        verdict, raw = None, None
        if st["method"] == "llm":
            c = st["comparator"]
            if not c.ok:
                return Reject("llm_call_failed", f"comparator: {c.error_kind} status={c.error_status} "
                                                 f"attempts={c.attempts}: {c.error}")
            raw = (c.text or "")[:RAW_MAX]
            verdict = parse_verdict(c.text)
            if verdict is None:
                return Reject("unparseable_reply", f"comparator reply is not SAME or DIFFERENT: {raw[:300]!r}")
            answerable = verdict == "same"
        else:
            answerable = bool(st["match"])
        return {"answerable": answerable, "answerable_score": 1.0 if answerable else 0.0,
                "blind_answer": (res.text or "")[:RAW_MAX], "reference": st["reference"][:RAW_MAX],
                "question": st["question"][:RAW_MAX], "method": st["method"], "verdict": verdict,
                "comparator_raw": raw, "model": res.model, "comparator_model": self.comparator_model,
                "prompt_versions": list(self.config.prompt_versions)}

