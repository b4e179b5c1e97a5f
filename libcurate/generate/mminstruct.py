"""``generate_mminstruct``: judgement, multiple-choice, long and short VQA from a caption (MMInstruct step (d)).

Per raw sample and per instruction type, one request: the domain, the caption (the sample's first answer,
or the caption an earlier ``generate_caption`` stage wrote), optional prior knowledge (OCR text / tags),
and up to ``n_seeds`` seed questions of that type for the domain, drawn with a per-sample RNG (so a re-run
draws the same seeds and hits the cache). The reply is parsed with the ``<Qk>/<Ck>/<Ak>`` tag parser and
validated item by item:

* every item needs a question and an answer;
* ``choice``: exactly four options A–D, distinct, and an answer that names one of them;
* ``judge``: the answer is yes or no; with ``require_balance`` the surplus of the majority answer is
  rejected so that the kept items are half yes, half no (MMInstruct asked for 2/2 and never checked);
* ``short``: at most ``short_max_words`` words; duplicate questions within a sample are rejected.

Rejected items are kept in the sidecar's ``rejected`` list with their reason; a sample with no valid item
is quarantined. Each valid item becomes a training conversation whose question carries the type's answer
instruction (e.g. "Answer with the option's letter ...").

Seeds file (``seeds_file``, JSON): either one domain's ``{"judge": {"English": [...]}, "choice": {...},
"sentence": {...}}`` (MMInstruct's ``all_seed`` schema; ``sentence`` serves long and short) or a map
``domain -> that``. Without seeds the prompt says "(none)".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..llm.client import LLMRequest, LLMResult, LLMSettings
from ..llm.gavie import read_json_any
from ..llm.parsing import ParseFailure, answer_letter, parse_tagged, split_options, yes_no
from ..llm.prompts import pinned_versions
from ..llm.stage import Plan, Reject, iter_with_upstream
from ..records import Sample
from ..stage import PermanentInputError, Reads, StageConfig, StageContext
from .common import GenerateStage, make_item, reject, sample_rng

TYPES = ("judge", "choice", "long", "short")
SEED_KEY = {"judge": "judge", "choice": "choice", "long": "sentence", "short": "sentence"}
# What each training question asks of the answer (our wording).
SUFFIX = {"judge": " Answer yes or no.",
          "choice": "\nAnswer with the letter of the correct option.",
          "long": "",
          "short": " Answer briefly, in a word or a short phrase."}


@dataclass
class MMInstructConfig(StageConfig):
    """Settings of ``generate_mminstruct``.

    Attributes:
        types: instruction types to generate, any of ``judge``, ``choice``, ``long``, ``short``.
        n_questions: items asked per type (``judge`` uses ``n_judge``, which must be even).
        n_judge: yes/no items asked per sample.
        caption_source: ``response`` (the sample's first answer is the caption, e.g. cc_sbu_align) or the id
            of an earlier ``generate_caption`` stage in the recipe (its sidecar's ``caption``).
        seeds_file: JSON of seed questions (see the module docstring); local path or ``s3://``.
        language: key inside a seed type (``English`` or ``Chinese``).
        n_seeds: seed questions per prompt (MMInstruct: min(3, available)).
        default_domain: domain when the sample has none.
        require_balance: keep equal numbers of yes and no judgement items per sample.
        short_max_words: longer "short" answers are rejected.
        prompt_prefix: templates are ``<prefix>_<type>`` (built-in ``mminstruct``).
        prompt_versions: filled in with each type's template version (part of the config hash).
        llm: :class:`~libcurate.llm.client.LLMSettings`.
    """

    types: tuple = TYPES
    n_questions: int = 3
    n_judge: int = 4
    caption_source: str = "response"
    seeds_file: str = ""
    language: str = "English"
    n_seeds: int = 3
    default_domain: str = "image_description"
    require_balance: bool = True
    short_max_words: int = 12
    prompt_prefix: str = "mminstruct"
    prompt_versions: tuple = ()
    llm: Any = field(default_factory=lambda: LLMSettings(max_tokens=1500))

    def __post_init__(self):
        self.llm = LLMSettings.from_any(self.llm)
        self.types = tuple(self.types)
        bad = [t for t in self.types if t not in TYPES]
        if bad or not self.types or len(set(self.types)) != len(self.types):
            raise ValueError(f"types must be distinct values of {TYPES}, got {list(self.types)}")
        if self.n_questions < 1 or self.n_judge < 2 or self.n_judge % 2:
            raise ValueError("n_questions must be >= 1 and n_judge an even number >= 2")
        if self.n_seeds < 0 or self.short_max_words < 1:
            raise ValueError("n_seeds must be >= 0 and short_max_words >= 1")
        if not self.caption_source:
            raise ValueError("caption_source must be 'response' or a generate_caption stage id")
        self.prompt_versions = pinned_versions((f"{self.prompt_prefix}_{t}" for t in self.types), self.prompt_versions)


def _seeds_for(seeds: dict | None, domain: str, type_: str, language: str) -> list[str]:
    if not seeds:
        return []
    d = seeds.get(domain, seeds) if domain in seeds else (seeds if SEED_KEY[type_] in seeds else {})
    block = d.get(SEED_KEY[type_]) or {}
    vals = block.get(language, []) if isinstance(block, dict) else block
    return [str(v) for v in vals if str(v).strip()]


class MMInstructStage(GenerateStage):
    """MMInstruct-style question generation from captions (see the module docstring)."""

    name = "generate_mminstruct"
    Config = MMInstructConfig

    def __init__(self, config: MMInstructConfig):
        super().__init__(config)
        self._seeds: dict | None = None

    def setup(self, ctx: StageContext) -> None:
        if self.config.seeds_file and self._seeds is None:
            try:
                self._seeds = read_json_any(self.config.seeds_file)
            except (FileNotFoundError, ValueError) as e:
                raise PermanentInputError(f"cannot read seeds_file {self.config.seeds_file!r}: {e}") from e

    @classmethod
    def prepare_settings(cls, settings: dict, resolve) -> dict:
        """``seeds_file`` is relative to the recipe, like ingest's paths."""
        if isinstance(settings.get("seeds_file"), str) and settings["seeds_file"]:
            settings["seeds_file"] = resolve(settings["seeds_file"])
        return settings

    @classmethod
    def reads(cls, config: MMInstructConfig) -> Reads:
        """The caption stage's sidecar when captions come from an earlier ``generate_caption``."""
        return Reads.of(stages=[] if config.caption_source == "response" else [config.caption_source])

    def prompt_names(self) -> dict[str, str]:
        return {t: f"{self.config.prompt_prefix}_{t}" for t in self.config.types}

    def inputs(self, ctx: StageContext, shard: str):
        if self.config.caption_source == "response":
            yield from super().inputs(ctx, shard)
        else:
            yield from iter_with_upstream(ctx, shard, self.config.caption_source, with_images=False)

    def _caption(self, sample: Sample, extra: Any) -> str | None:
        if self.config.caption_source == "response":
            r = sample.responses
            return r[0] if r else None
        return (extra or {}).get("caption")

    def plan(self, sample: Sample, extra: Any) -> Plan | Reject:
        c = self.config
        caption = self._caption(sample, extra)
        if not caption or not caption.strip():
            return Reject("no_caption", f"caption_source={c.caption_source!r}")
        domain = sample.domain or c.default_domain
        prior = []
        if sample.metadata.get("ocr"):
            o = sample.metadata["ocr"]
            prior.append("text in the image: " + (" ".join(o) if isinstance(o, list) else str(o)))
        if sample.metadata.get("tags"):
            t = sample.metadata["tags"]
            prior.append("tags: " + (", ".join(t) if isinstance(t, list) else str(t)))
        reqs, state = [], []
        for t in c.types:
            pool = _seeds_for(self._seeds, domain, t, c.language)
            rng = sample_rng(sample, t)
            seeds = rng.sample(pool, min(c.n_seeds, len(pool))) if pool else []
            tpl = self.templates[t]
            n = c.n_judge if t == "judge" else c.n_questions
            msgs = tpl.render(n=n, domain=domain, prior="; ".join(prior) or "Empty", caption=caption.strip(),
                              seeds="\n".join(f"- {s}" for s in seeds) or "(none)")
            reqs.append(LLMRequest(msgs, tpl.version))
            state.append({"type": t, "domain": domain, "prompt_version": tpl.version, "n": n})
        return Plan(reqs, state)

    def parse_reply(self, sample: Sample, meta: dict, result: LLMResult) -> tuple[list[dict], list[dict]]:
        t, domain = meta["type"], meta["domain"]
        items = parse_tagged(result.text)
        if isinstance(items, ParseFailure):
            return [], [reject(items.reason, items.detail, (result.text or "")[:500])]
        good: list[tuple[str, str, str]] = []   # (question, answer, yes/no for judge)
        bad: list[dict] = []
        seen: set[str] = set()
        for it in items:
            raw = {"q": it.question, "c": it.choices, "a": it.answer}
            if not it.question or not it.answer:
                bad.append(reject("missing_tag", f"item {it.k}: needs <Q{it.k}> and <A{it.k}>", raw))
                continue
            q = it.question.strip()
            if q.lower() in seen:
                bad.append(reject("duplicate_question", q, raw))
                continue
            if t == "choice":
                opts = split_options(it.choices or "")
                if isinstance(opts, ParseFailure):
                    bad.append(reject(opts.reason, opts.detail, raw))
                    continue
                letter = answer_letter(it.answer, opts)
                if isinstance(letter, ParseFailure):
                    bad.append(reject(letter.reason, letter.detail, raw))
                    continue
                question = q + "\n" + "\n".join(f"{k}. {v}" for k, v in opts.items())
                good.append((question, letter, ""))
            elif t == "judge":
                yn = yes_no(it.answer)
                if isinstance(yn, ParseFailure):
                    bad.append(reject(yn.reason, it.answer, raw))
                    continue
                good.append((q, yn.capitalize(), yn))
            else:
                ans = it.answer.strip()
                if t == "short" and len(ans.split()) > self.config.short_max_words:
                    bad.append(reject("answer_too_long", f"{len(ans.split())} words", raw))
                    continue
                good.append((q, ans, ""))
            seen.add(q.lower())
        if t == "judge" and self.config.require_balance:
            n_yes = sum(g[2] == "yes" for g in good)
            keep = min(n_yes, len(good) - n_yes)
            kept, counts = [], {"yes": 0, "no": 0}
            for g in good:
                if counts[g[2]] < keep:
                    counts[g[2]] += 1
                    kept.append(g)
                else:
                    bad.append(reject("yes_no_balance", f"{n_yes} yes / {len(good) - n_yes} no; surplus dropped",
                                      {"q": g[0], "a": g[1]}))
            good = kept
        out = [make_item(q + SUFFIX[t], a, t, f"mminstruct_{t}", domain, {}) for q, a, _ in good]
        return out, bad
