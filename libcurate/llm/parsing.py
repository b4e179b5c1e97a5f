"""Strict parsers for judge and generator replies (SEEDS.md 5.3). None of them ever returns a default.

Every parser returns its value or a :class:`ParseFailure` (falsy, with a reason and the text), so a caller
records the failure instead of inventing a score.

Injection resistance: the judged sample's text is attacker-controlled and the judge may quote it. A score
is therefore read *only* from where the prompt asked for it — the reply's first non-empty line, which
must consist of nothing but the score (an optional ``Score:``/``Rating:`` label, the number, an optional
``/max``, markdown emphasis), or the ``score`` field of a reply that is a JSON object. ``Score: 100``
anywhere else in the reply (e.g. quoted from a caption) is never read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field


@dataclass
class ParseFailure:
    """Why a reply could not be parsed; falsy so ``if not result:`` reads naturally."""

    reason: str
    text: str = ""
    detail: str = ""

    def __bool__(self) -> bool:
        return False

    def as_dict(self) -> dict:
        return {"reason": self.reason, "detail": self.detail}


_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_SCORE_LINE = re.compile(
    rf"^(?:(?:overall|final|total)\s+)?(?:(?:score|rating|grade)\s*[:=\-]?\s*)?({_NUM})\s*"
    rf"(?:(?:/|out\s+of)\s*({_NUM}))?\s*(?:points?)?\s*\.?$",
    re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _strip_md(s: str) -> str:
    # Markdown emphasis / headers / code ticks around a score: "**9**", "## Score: 8", "`7`".
    return re.sub(r"[*_`#>]", "", s).strip()


def _json_obj(text: str) -> dict | None:
    t = text.strip()
    m = _FENCE.match(t)
    if m:
        t = m.group(1)
    if not t.startswith("{"):
        return None
    try:
        obj = json.loads(t)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _to_float(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str) and re.fullmatch(_NUM, v.strip()):
        f = float(v)
    else:
        return None
    return f if math.isfinite(f) else None


def _normalise(value: float, denom: float | None, scale: tuple[float, float], text: str) -> "float | ParseFailure":
    lo, hi = scale
    if denom is not None:
        if denom <= 0:
            return ParseFailure("bad_denominator", text, f"/{denom:g}")
        if not 0 <= value <= denom:
            return ParseFailure("out_of_range", text, f"{value:g}/{denom:g}")
        value = lo + (hi - lo) * value / denom
    if not lo <= value <= hi:
        return ParseFailure("out_of_range", text, f"{value:g} not in [{lo:g}, {hi:g}]")
    return value


def parse_score(text: str | None, scale: tuple[float, float] = (0, 100), field_name: str = "score") -> "float | ParseFailure":
    """The judge's score on ``scale`` (inclusive), or a :class:`ParseFailure`.

    Accepted: ``88``, ``8.5``, ``Score: 95``, ``Rating = 7``, ``80/100``, ``8/10``, ``8 out of 10``,
    ``**9**``, ``Score: **9**/10`` on the first non-empty line (nothing else on it), or a JSON object
    ``{"score": 9, ...}`` (optionally in a code fence). ``x/y`` is mapped to the scale
    (``8/10`` on 0–100 is 80). Values outside the scale, ``x > y``, NaN and empty replies are failures.
    """
    if text is None or not text.strip():
        return ParseFailure("empty", text or "")
    obj = _json_obj(text)
    if obj is not None:
        if field_name not in obj:
            return ParseFailure("missing_field", text, f"no {field_name!r} in JSON reply")
        raw = obj[field_name]
        if isinstance(raw, str) and "/" in raw:
            a, _, b = raw.partition("/")
            v, d = _to_float(a), _to_float(b)
            if v is None or d is None:
                return ParseFailure("not_a_number", text, repr(raw))
            return _normalise(v, d, scale, text)
        v = _to_float(raw)
        if v is None:
            return ParseFailure("not_a_number", text, repr(raw))
        return _normalise(v, None, scale, text)
    line = _strip_md(_first_line(text))
    m = _SCORE_LINE.match(line)
    if not m:
        return ParseFailure("no_score_on_first_line", text, line[:200])
    v = float(m.group(1))
    d = float(m.group(2)) if m.group(2) is not None else None
    return _normalise(v, d, scale, text)


# -- GAVIE ------------------------------------------------------------------------------------
@dataclass
class GavieScores:
    """Per answer (1-based index -> value) relevancy and accuracy on 0–10, with the judge's reasons."""

    relevancy: dict[int, float]
    accuracy: dict[int, float]
    relevancy_reason: dict[int, str] = field(default_factory=dict)
    accuracy_reason: dict[int, str] = field(default_factory=dict)


_GAVIE_SECTION = re.compile(r"^\W*(relevancy|relevance|accuracy)\W*\s*$", re.IGNORECASE | re.MULTILINE)
_GAVIE_SCORE = re.compile(rf"score\s+of\s+(?:the\s+)?answer\s*(\d+)\s*[:=]\s*\**\s*({_NUM})(?:\s*/\s*10)?",
                          re.IGNORECASE)
_GAVIE_REASON = re.compile(r"^\W*reason\s*[:：]\s*(.*)$", re.IGNORECASE)


def parse_gavie(text: str | None, n_answers: int = 1) -> "GavieScores | ParseFailure":
    """Parse a GAVIE judgement of ``n_answers`` answers.

    The reply must have a ``Relevancy:`` and an ``Accuracy:`` section (headers on their own line,
    case-insensitive), each holding ``score of (the) answer<k>: <0-10>`` for every k in 1..n, each
    followed by an optional ``reason:`` line. A JSON reply ``{"relevancy": {"score", "reason"},
    "accuracy": {...}}`` is accepted for ``n_answers == 1`` (structured output). Missing, duplicate,
    extra or out-of-range scores are failures.
    """
    if text is None or not text.strip():
        return ParseFailure("empty", text or "")
    obj = _json_obj(text)
    if obj is not None and n_answers == 1:
        out = GavieScores({}, {})
        for crit in ("relevancy", "accuracy"):
            sec = obj.get(crit)
            v = _to_float(sec.get("score")) if isinstance(sec, dict) else _to_float(sec)
            if v is None:
                return ParseFailure("missing_score", text, crit)
            if not 0 <= v <= 10:
                return ParseFailure("out_of_range", text, f"{crit} {v:g}")
            getattr(out, crit)[1] = v
            getattr(out, f"{crit}_reason")[1] = str(sec.get("reason", "")) if isinstance(sec, dict) else ""
        return out
    heads = list(_GAVIE_SECTION.finditer(text))
    sections: dict[str, str] = {}
    for i, h in enumerate(heads):
        name = "relevancy" if h.group(1).lower().startswith("relev") else "accuracy"
        if name in sections:
            return ParseFailure("duplicate_section", text, name)
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        sections[name] = text[h.end():end]
    for name in ("relevancy", "accuracy"):
        if name not in sections:
            return ParseFailure("missing_section", text, name)
    out = GavieScores({}, {})
    for name, body in sections.items():
        scores, reasons = getattr(out, name), getattr(out, f"{name}_reason")
        lines = body.splitlines()
        for j, line in enumerate(lines):
            m = _GAVIE_SCORE.search(line)
            if not m:
                continue
            k, v = int(m.group(1)), float(m.group(2))
            if k in scores:
                return ParseFailure("duplicate_score", text, f"{name} answer{k}")
            if not 1 <= k <= n_answers:
                return ParseFailure("unexpected_answer", text, f"{name} answer{k} (expected 1..{n_answers})")
            if not 0 <= v <= 10:
                return ParseFailure("out_of_range", text, f"{name} answer{k} = {v:g}")
            scores[k] = v
            for nxt in lines[j + 1:j + 3]:
                r = _GAVIE_REASON.match(nxt)
                if r:
                    reasons[k] = r.group(1).strip()
                    break
        missing = [k for k in range(1, n_answers + 1) if k not in scores]
        if missing:
            return ParseFailure("missing_score", text, f"{name}: answers {missing}")
    return out


# -- MMInstruct tags --------------------------------------------------------------------------
_TAG = re.compile(r"<([QCA])(\d+)>(.*?)</\1\2>", re.DOTALL | re.IGNORECASE)
_OPTION = re.compile(r"(?:^|\s|\()([A-D])[\.\)．、:]\s*", re.MULTILINE)
YES = {"yes", "是", "y", "true"}
NO = {"no", "否", "n", "false"}


@dataclass
class TaggedItem:
    k: int
    question: str | None = None
    choices: str | None = None
    answer: str | None = None


def parse_tagged(text: str | None) -> "list[TaggedItem] | ParseFailure":
    """``<Qk>..</Qk> <Ck>..</Ck> <Ak>..</Ak>`` items in k order (fields ``None`` where a tag is absent)."""
    if text is None or not text.strip():
        return ParseFailure("empty", text or "")
    items: dict[int, TaggedItem] = {}
    for m in _TAG.finditer(text):
        tag, k, body = m.group(1).upper(), int(m.group(2)), m.group(3).strip()
        it = items.setdefault(k, TaggedItem(k))
        attr = {"Q": "question", "C": "choices", "A": "answer"}[tag]
        if getattr(it, attr) is not None:
            return ParseFailure("duplicate_tag", text, f"<{tag}{k}>")
        setattr(it, attr, body)
    if not items:
        return ParseFailure("no_tags", text)
    return [items[k] for k in sorted(items)]


def split_options(choices: str) -> "dict[str, str] | ParseFailure":
    """``"A. red B. blue C. green D. gray"`` -> ``{"A": "red", ...}``; exactly A, B, C, D once each."""
    marks = list(_OPTION.finditer(choices))
    letters = [m.group(1) for m in marks]
    if letters != ["A", "B", "C", "D"]:
        return ParseFailure("bad_options", choices, f"option letters {letters} (want A-D once each)")
    out = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(choices)
        txt = choices[m.end():end].strip().rstrip(";,").strip()
        if not txt:
            return ParseFailure("empty_option", choices, m.group(1))
        out[m.group(1)] = txt
    if len({v.lower() for v in out.values()}) < 4:
        return ParseFailure("duplicate_options", choices)
    return out


def answer_letter(answer: str, options: dict[str, str]) -> "str | ParseFailure":
    """The option letter an answer names: ``B``, ``B.``, ``(B)``, ``B. blue``, ``Option B`` or the option text."""
    a = answer.strip().strip('"“”\'').strip()
    m = re.fullmatch(r"(?:option\s+|answer\s*[:：]?\s*)?\(?([A-D])\)?(?:[\.\)．、:]\s*(.*))?", a, re.IGNORECASE | re.DOTALL)
    if m:
        letter = m.group(1).upper()
        rest = (m.group(2) or "").strip().rstrip(".")
        if rest and rest.lower() != options[letter].strip().rstrip(".").lower():
            return ParseFailure("answer_text_mismatch", answer, f"{letter} is {options[letter]!r}, answer says {rest!r}")
        return letter
    hits = [k for k, v in options.items() if v.strip().rstrip(".").lower() == a.rstrip(".").lower()]
    if len(hits) == 1:
        return hits[0]
    return ParseFailure("answer_not_an_option", answer)


def yes_no(answer: str) -> "str | ParseFailure":
    a = re.sub(r"[\s\"'“”。.!]", "", answer).lower()
    if a in YES:
        return "yes"
    if a in NO:
        return "no"
    return ParseFailure("not_yes_no", answer)


# -- LRV blocks -------------------------------------------------------------------------------
_LABEL = re.compile(r"^\W*(instruction|answer|task|reason)\s*\d*\s*[:：]\s*(.*)$", re.IGNORECASE)


def parse_blocks(text: str | None, fields: tuple[str, ...] = ("instruction", "answer", "task")) -> "list[dict] | ParseFailure":
    """LRV-style ``Instruction:`` / ``Answer:`` / ``Task:`` (or ``Reason:``) blocks.

    A label may carry its text on the same line or on the following lines; a new ``Instruction:`` starts
    a block. Returns one dict per block with the labels seen (the caller validates which are required);
    unknown labels in ``fields`` order are ignored. Fails when no ``Instruction:`` label exists at all.
    """
    if text is None or not text.strip():
        return ParseFailure("empty", text or "")
    blocks: list[dict] = []
    cur: dict | None = None
    label: str | None = None
    for raw in text.splitlines():
        m = _LABEL.match(raw)
        if m and m.group(1).lower() in fields:
            label = m.group(1).lower()
            if label == "instruction" or cur is None or label in cur:
                cur = {}
                blocks.append(cur)
            cur[label] = m.group(2).strip()
            continue
        if cur is not None and label is not None and raw.strip():
            cur[label] = (cur[label] + " " + raw.strip()).strip()
    if not any("instruction" in b for b in blocks):
        return ParseFailure("no_instruction_blocks", text)
    return blocks
