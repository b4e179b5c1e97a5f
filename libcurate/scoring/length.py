"""``score_length``: characters, words and tokens of each response, raw.

InstructionGPT-4's length score is ``10 * len(caption) / 1009`` with 1009 hard-coded as the longest
caption of its dataset. A per-shard stage cannot know the dataset's maximum, so this stage stores raw
lengths only, plus each shard's maxima in ``_stats`` (``max_chars``, ``max_words``, ``max_tokens``).
The normalised score is applied where the whole dataset is visible: ``select`` reads any field as
``<field>@norm`` = :func:`length_score` ``(value, max over the dataset)`` = ``10 * value / max``, e.g.
``score_length.chars@norm``. With ``text: caption`` this equals the seed's score with the maximum
computed from the data instead of a constant.

JSON fields: ``chars``, ``words``, ``tokens`` (sums over the scored texts), ``first_chars``,
``first_words``, ``first_tokens`` (first scored text), ``per_text`` (``{"chars": [...], "words":
[...], "tokens": [...]}``), ``n_texts``, ``text``, ``tokenizer``. Words are whitespace-separated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..shards import iter_samples
from ..stage import ShardOutput, Stage, StageConfig, StageContext, unit_of
from .common import TEXT_MODES, check_choice, texts_for

LENGTH_FIELDS = ("chars", "words", "tokens")


@dataclass
class LengthConfig(StageConfig):
    """Settings of ``score_length``.

    Attributes:
        text: which texts are measured: ``responses`` (every answer; default), ``caption`` (first
            answer), ``first_instruction``, ``conversation``.
        tokenizer: ``clip`` (open_clip's BPE, offline), ``whitespace`` (= words), or a Hugging Face
            tokenizer id / local directory (tokens counted without special tokens).
    """

    text: str = "responses"
    tokenizer: str = "clip"

    def __post_init__(self):
        check_choice("text", self.text, TEXT_MODES)
        if not self.tokenizer:
            raise ValueError("tokenizer must be 'clip', 'whitespace' or a Hugging Face tokenizer id/dir")


@functools.lru_cache(maxsize=4)
def token_counter(name: str):
    """A function text -> token count for tokenizer ``name`` (see :class:`LengthConfig`)."""
    if name == "whitespace":
        return lambda t: len(t.split())
    if name == "clip":
        from open_clip.tokenizer import SimpleTokenizer

        tok = SimpleTokenizer()
        return lambda t: len(tok.encode(t))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    return lambda t: len(tok(t, add_special_tokens=False, verbose=False)["input_ids"])


def measure(texts: list[str], count_tokens) -> dict:
    per = {"chars": [len(t) for t in texts], "words": [len(t.split()) for t in texts],
           "tokens": [count_tokens(t) for t in texts]}
    rec = {f: sum(v) for f, v in per.items()}
    rec.update({f"first_{f}": (v[0] if v else 0) for f, v in per.items()})
    rec.update(per_text=per, n_texts=len(texts))
    return rec


class LengthStage(Stage):
    """Raw lengths per sample; ``select`` normalises them (``score_length.chars@norm``)."""

    name = "score_length"
    Config = LengthConfig
    profile = "cpu"

    @classmethod
    def image_for(cls, config) -> str:
        # open_clip's BPE and Hugging Face tokenizers import torch: only the GPU image has it
        return "cpu" if getattr(config, "tokenizer", "whitespace") == "whitespace" else "gpu"

    def process_shard(self, ctx: StageContext, shard: str) -> dict:
        cfg = self.config
        count = token_counter(cfg.tokenizer)
        out = ShardOutput(ctx.store, ctx.prefix, unit_of(shard))
        n = 0
        maxima = {f"max_{f}": 0 for f in LENGTH_FIELDS}
        try:
            for s in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}", with_images=False):
                n += 1
                rec = measure(texts_for(s, cfg.text), count)
                rec.update(text=cfg.text, tokenizer=cfg.tokenizer)
                for f in LENGTH_FIELDS:
                    maxima[f"max_{f}"] = max(maxima[f"max_{f}"], rec[f])
                out.write_json(s.key, rec)
            out.extra.update(maxima)
            return out.finish(n)
        except BaseException as e:
            out.abort(e)
            raise


def length_score(value: float, max_value: float, scale: float = 10.0) -> float:
    """InstructionGPT-4's normalised length: ``scale * value / max_value`` (0 when max_value is 0)."""
    return scale * float(value) / float(max_value) if max_value else 0.0
