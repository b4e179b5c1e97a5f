"""MMInstruct data-engine output: JSONL ``{"image_path", "qa_raw", "gpt_prompt", ...}`` per line, the
GPT-3.5 reply in ``qa_raw`` holding tagged items ``<Qk> question </Qk> <Ck> options </Ck> <Ak> answer </Ak>``.

File names follow ``<domain>_{choice|lqa|sqa|judge}[_err].jsonl`` (optionally ``000NN_`` in front); the
type suffix is a hint that makes validation stricter, the rest is the domain (the ``domain=`` option,
then a ``domain`` field in the line, take precedence over the file name).

Items and their type:

- ``choice``: ``<Ck>`` splits into lettered options ``A.`` ``B.`` ... (also ``A)``, ``(A)``, ``A、``,
  at least two, consecutive from A). The answer must name one of them: a letter (``"B"``, ``"B."``,
  ``"(B)"``, ``"Answer: B"``, ``"B. text"``) or an option's exact text -> else ``invalid_choice``.
  Human turn: question + one option per line; gpt turn: ``"B. <option text>"``; metadata keeps
  ``options`` and ``answer_letter``.
- ``judge``: the answer is yes/no (``yes``/``no``/``是``/``否``, quotes and final punctuation ignored);
  gpt turn is the canonical ``Yes``/``No`` or ``是``/``否``. The seed's 2 yes + 2 no balance is checked
  per line: the counts go to ``metadata["judge_balance"]``; with ``enforce_judge_balance=True`` every
  item of an unbalanced line is a ``judge_unbalanced`` BadRecord.
- ``qa``: anything else (and every item of ``lqa``/``sqa`` files; ``metadata["qa_length"]`` = long/short).

Accounting is per QA item (an item = one index k seen in any tag): each yields one RawRecord or
BadRecord (``missing_question_tag``, ``missing_answer_tag``, ``missing_options_tag``,
``invalid_options``, ``invalid_choice``, ``invalid_judge_answer``, ``duplicate_tag``, ``empty_answer``).
A line whose ``qa_raw`` is the seed's failure literal ``"error"`` yields one ``generation_error``; a line
without any tag yields one ``no_items``; a line holding a value that cannot be stored as strict UTF-8 JSON
(``invalid_unicode``, ``non_finite_number``, ``huge_integer``, ``too_deep``) yields one BadRecord with
that reason. With ``mminstruct_mode="conversation"`` the good items of a line
become one multi-turn RawRecord (``<image>`` in the first turn only) and each bad item still yields its
BadRecord (id ``…#qK``).

``original_id`` is ``"<image_path>#q<k>"`` per item, ``"<image_path>"`` per conversation; metadata has
the other fields of the line (``gpt_prompt`` unless ``keep_prompt=False``, which stores its sha256 as
``gpt_prompt_sha256``), ``line`` and ``qa_index``.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Iterator

from libcurate.formats.base import (
    BadRecord,
    FormatError,
    RawRecord,
    check_conversation,
    check_values,
    clean_id,
    iter_json_lines,
    norm_image_ref,
)
from libcurate.records import IMAGE_TOKEN, Turn

MODES = ("items", "conversation")
FILE_TYPES = ("choice", "lqa", "sqa", "judge")
_TAG = re.compile(r"<([QCA])(\d+)>(.*?)</\1\2>", re.S | re.I)
_OPEN = re.compile(r"<([QCA])(\d+)>", re.I)
# An option marker: "A." "A)" "(A)" "A、" "A:" at the start or after whitespace/separator.
_OPT = re.compile(r"(?:^|(?<=[\s;,，；]))\(?([A-H])(?:\)|[.．、:：])")
_ANSWER_PREFIX = re.compile(r"^\s*(?i:(?:the\s+)?(?:correct\s+)?(?:answer|choice|option)(?:\s+is)?|正确答案|答案|选项)?\s*[:：]?\s*")
_LETTER = re.compile(r"^\(?([A-H])\)?(?:[.．、:：\s)]|$)")
_YES = {"yes": "Yes", "是": "是", "是的": "是", "对": "是"}
_NO = {"no": "No", "否": "否", "不是": "否", "不": "否"}
_STRIP = " \t\r\n\"'“”‘’「」『』.。!！,，"


def parse(data, source_name: str, *, encoding: str = "utf-8", mminstruct_mode: str = "items",
          domain: str | None = None, image_prefix_strip: str = "", keep_prompt: bool = True,
          enforce_judge_balance: bool = False) -> Iterator[RawRecord | BadRecord]:
    """Parse an MMInstruct JSONL file. Options: ``encoding``, ``mminstruct_mode`` (``items`` |
    ``conversation``), ``domain`` (overrides the file name), ``image_prefix_strip``, ``keep_prompt``,
    ``enforce_judge_balance``."""
    if mminstruct_mode not in MODES:
        raise ValueError(f"mminstruct_mode must be one of {MODES}, got {mminstruct_mode!r}")
    return _parse(data, source_name, encoding, mminstruct_mode, domain, image_prefix_strip, keep_prompt,
                  enforce_judge_balance)


def _parse(data, source_name, encoding, mminstruct_mode, domain, image_prefix_strip, keep_prompt,
           enforce_judge_balance) -> Iterator[RawRecord | BadRecord]:
    file_domain, file_type = domain_and_type(source_name)
    for line_id, lineno, obj in iter_json_lines(data, source_name, encoding):
        if isinstance(obj, BadRecord):
            yield obj
            continue
        yield from _line(obj, line_id, lineno, domain, file_domain, file_type, mminstruct_mode,
                         image_prefix_strip, keep_prompt, enforce_judge_balance)


def domain_and_type(source_name: str) -> tuple[str | None, str | None]:
    """``.../00017_artwork_choice.jsonl`` -> ``("artwork", "choice")``; no type suffix -> ``(None, None)``."""
    stem = os.path.basename(source_name.rstrip("/")).split(".")[0]
    stem = re.sub(r"_err$", "", stem)
    m = re.match(r"^(?:\d+_)?(.+)_(choice|lqa|sqa|judge)$", stem)
    return (m.group(1), m.group(2)) if m else (None, None)


def _line(obj: Any, line_id: str, lineno: int, domain_option: str | None, file_domain: str | None,
          file_type: str | None, mode: str,
          strip: str, keep_prompt: bool, enforce_balance: bool) -> Iterator[RawRecord | BadRecord]:
    try:
        if not isinstance(obj, dict):
            raise FormatError("malformed_record", f"line must be an object, got {type(obj).__name__}")
        check_values(obj)
        for name in ("image_path", "qa_raw"):
            if name not in obj:
                raise FormatError("missing_field", f"line has no {name!r}")
        image = norm_image_ref(obj["image_path"], strip)
        qa_raw = obj["qa_raw"]
        if not isinstance(qa_raw, str):
            raise FormatError("malformed_record", "'qa_raw' must be a string")
        if qa_raw.strip().lower() == "error":
            raise FormatError("generation_error", "qa_raw is the generator's failure literal 'error'")
    except FormatError as e:
        yield BadRecord(_base_id(obj, line_id), e.reason, e.detail)
        return
    base_id = obj["image_path"]
    # Precedence: the caller's option, then the line's own field, then the file name.
    line_domain = obj.get("domain") if isinstance(obj.get("domain"), str) and obj["domain"] else None
    domain = domain_option or line_domain or file_domain
    metadata = {k: v for k, v in obj.items() if k not in ("image_path", "qa_raw", "domain")}
    if not keep_prompt and isinstance(metadata.get("gpt_prompt"), str):
        metadata["gpt_prompt_sha256"] = hashlib.sha256(metadata.pop("gpt_prompt").encode("utf-8")).hexdigest()
    metadata["line"] = lineno
    if file_type:
        metadata["file_type"] = file_type
    if file_type in ("lqa", "sqa"):
        metadata["qa_length"] = "long" if file_type == "lqa" else "short"

    items = _items(qa_raw, file_type)
    if not items:
        yield BadRecord(base_id, "no_items", "qa_raw holds no <Qk>/<Ck>/<Ak> tags")
        return
    judges = [it for _, it in items if isinstance(it, dict) and it["type"] == "judge"]
    balance = None
    if judges:
        n_yes = sum(it["answer"] in ("Yes", "是") for it in judges)
        balance = {"yes": n_yes, "no": len(judges) - n_yes}
    unbalanced = enforce_balance and balance is not None and (balance["yes"] != 2 or balance["no"] != 2)

    good: list[tuple[int, dict]] = []
    for k, it in items:
        iid = f"{base_id}#q{k}"
        if isinstance(it, FormatError):
            yield BadRecord(iid, it.reason, it.detail)
        elif unbalanced and it["type"] == "judge":
            yield BadRecord(iid, "judge_unbalanced", f"line has {balance['yes']} yes / {balance['no']} no judgements, want 2/2")
        elif mode == "items":
            md = dict(metadata, qa_index=k, **it["metadata"])
            if balance and it["type"] == "judge":
                md["judge_balance"] = balance
            turns = [Turn("human", f"{IMAGE_TOKEN}\n{it['question']}"), Turn("gpt", it["answer"])]
            try:
                check_conversation(turns, 1)
            except FormatError as e:
                yield BadRecord(iid, e.reason, e.detail)
                continue
            yield RawRecord(original_id=iid, images=[image], conversations=turns, type=it["type"], domain=domain, metadata=md)
        else:
            good.append((k, it))
    if mode == "conversation" and good:
        turns = []
        for j, (_, it) in enumerate(good):
            turns += [Turn("human", f"{IMAGE_TOKEN}\n{it['question']}" if j == 0 else it["question"]), Turn("gpt", it["answer"])]
        types = {it["type"] for _, it in good}
        md = dict(metadata, qa_index=[k for k, _ in good], items=[it["metadata"] for _, it in good])
        if balance:
            md["judge_balance"] = balance
        try:
            check_conversation(turns, 1)
        except FormatError as e:
            yield BadRecord(base_id, e.reason, e.detail)
            return
        yield RawRecord(original_id=base_id, images=[image], conversations=turns,
                        type=types.pop() if len(types) == 1 else "mixed", domain=domain, metadata=md)


def _base_id(obj: Any, line_id: str) -> str:
    if isinstance(obj, dict) and isinstance(obj.get("image_path"), str) and clean_id(obj["image_path"]):
        return obj["image_path"]
    return line_id


def _items(qa_raw: str, file_type: str | None) -> list[tuple[int, dict | FormatError]]:
    """Every index k seen in an opening tag -> the parsed item or the FormatError explaining why not."""
    tags: dict[tuple[str, int], list[str]] = {}
    for m in _TAG.finditer(qa_raw):
        tags.setdefault((m.group(1).upper(), int(m.group(2))), []).append(m.group(3).strip())
    ks = sorted({int(m.group(2)) for m in _OPEN.finditer(qa_raw)})
    out = []
    for k in ks:
        try:
            out.append((k, _item(k, tags, file_type)))
        except FormatError as e:
            out.append((k, e))
    return out


def _item(k: int, tags: dict, file_type: str | None) -> dict:
    for letter in "QCA":
        if len(tags.get((letter, k), [])) > 1:
            raise FormatError("duplicate_tag", f"<{letter}{k}> appears more than once")
    q, c, a = (tags.get((x, k), [None])[0] for x in "QCA")
    if q is None:
        raise FormatError("missing_question_tag", f"no complete <Q{k}>…</Q{k}>")
    if a is None:
        raise FormatError("missing_answer_tag", f"no complete <A{k}>…</A{k}>")
    if not q:
        raise FormatError("empty_instruction", f"<Q{k}> is empty")
    if not a.strip(_STRIP):
        raise FormatError("empty_answer", f"<A{k}> is empty")

    options = split_options(c) if c is not None else None
    judge = yes_no(a)
    if file_type == "choice" or (file_type is None and options):
        if c is None:
            raise FormatError("missing_options_tag", f"choice item without <C{k}>")
        if not options:
            raise FormatError("invalid_options", f"<C{k}> has no lettered options A., B., ...: {c[:80]!r}")
        letter = choice_letter(a, options)
        if letter is None:
            raise FormatError("invalid_choice", f"answer {a[:80]!r} names none of the options {sorted(options)}")
        question = q + "\n" + "\n".join(f"{L}. {t}" for L, t in options.items())
        return {"type": "choice", "question": question, "answer": f"{letter}. {options[letter]}",
                "metadata": {"options": options, "answer_letter": letter}}
    if file_type == "judge" or (file_type is None and (judge or (c is not None and _looks_yes_no(c)))):
        if judge is None:
            raise FormatError("invalid_judge_answer", f"judgement answer {a[:80]!r} is not yes/no/是/否")
        return {"type": "judge", "question": q, "answer": judge, "metadata": {}}
    if file_type is None and c is not None:
        raise FormatError("invalid_options", f"<C{k}> is neither lettered options nor yes/no: {c[:80]!r}")
    return {"type": "qa", "question": q, "answer": a, "metadata": {}}


def split_options(text: str) -> dict[str, str] | None:
    """``"A. x B. y C. z D. w"`` -> ``{"A": "x", ...}``; markers must run A, B, C... in order (a stray
    "A." inside a later option is ignored). ``None`` when fewer than two options are found."""
    marks = []
    for m in _OPT.finditer(text):
        if m.group(1) == "ABCDEFGH"[len(marks)]:
            marks.append(m)
            if len(marks) == 8:
                break
    if len(marks) < 2:
        return None
    opts = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        opt = text[m.end():end].strip().rstrip(";,，；").strip()
        if not opt:
            return None
        opts[m.group(1)] = opt
    return opts


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip(_STRIP)).casefold()


def choice_letter(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names, or ``None``.

    ``"B"``, ``"(B)"``, ``"Answer: B"``, ``"B. <text>"`` name B; an answer equal to an option's text names
    that option. ``"A horse"`` is ambiguous (letter A, or the text of option "a horse"): a letter followed
    only by a space counts when the rest matches that option's text, else the text match wins. A marked
    letter followed by another option's exact text (``"A. <text of C>"``) is contradictory -> ``None``.
    """
    a = _ANSWER_PREFIX.sub("", answer.strip(), count=1).strip(" \"'“”")
    by_text = next((L for L, t in options.items() if _norm(a) == _norm(t)), None)
    m = _LETTER.match(a)
    if not m:
        return by_text
    letter, rest = m.group(1), a[m.end():]
    if letter not in options:
        return by_text
    if not rest.strip() or _norm(options[letter]) in _norm(rest):
        return letter  # a bare letter, or a letter followed by its own option's text
    rest_letter = next((L for L, t in options.items() if _norm(rest) == _norm(t)), None)
    if rest_letter is not None:
        return None  # "A. <text of C>": contradictory
    if m.group(0).rstrip()[-1:] != letter:
        return letter  # a marked letter ("B." "(B)") with free text after it
    return by_text


def yes_no(answer: str) -> str | None:
    """Canonical ``Yes``/``No``/``是``/``否`` for a judgement answer, else ``None``."""
    a = answer.strip(_STRIP).casefold()
    return _YES.get(a) or _NO.get(a)


def _looks_yes_no(c: str) -> bool:
    return bool(re.search(r"是|否|\byes\b|\bno\b", c, re.I))
