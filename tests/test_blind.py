"""blind_answer: a text model answers without the image; rule or comparator decides; select drops the
questions that do not need the image (fake server over real HTTP, deterministic answers)."""

from __future__ import annotations

import json
import re

import pytest

from libcurate.llm.blind import first_number, match_method, parse_verdict, rule_match
from libcurate.llm.testing import FakeOpenAIServer
from libcurate.pipeline import load_recipe, plan
from libcurate.runner import run_recipe
from libcurate.shards import iter_members
from libcurate.stage import read_quarantine
from libcurate.storage import open_store

from .conftest import jpeg_bytes
from .test_ingest import llava, write_dataset

# question -> (the sample's answer, what a text model says without the image)
CASES = {
    "What is the capital of France?": ("Paris", "Paris."),                         # exact: answerable
    "What colour is the car?": ("Red", "I cannot see it; maybe blue."),            # comparator: DIFFERENT
    "What is the man holding?": ("The man is holding a red umbrella over his head while it rains.",
                                 "Probably an umbrella, a red one."),              # comparator: SAME
    "How many legs does a spider have?": ("8", "Eight legs."),                     # numeric: answerable
    "Is there a dog in the picture?": ("Yes", "No, I do not think so."),           # yes/no: needs the image
    "What does the sign say?": ("Open daily from nine until five.", "No idea."),   # comparator unparseable
}


def server_reply(body):
    text = body["messages"][-1]["content"]
    assert isinstance(text, str)  # never an image part
    if "<candidate>" in text:
        ref = re.search(r"<reference>\n(.*?)\n</reference>", text, re.S).group(1)
        cand = re.search(r"<candidate>\n(.*?)\n</candidate>", text, re.S).group(1)
        if "sign" in text:
            return "Hard to say, they overlap somewhat."
        return "SAME" if ("umbrella" in ref and "umbrella" in cand) else "DIFFERENT"
    q = re.search(r"<question>\n(.*?)\n</question>", text, re.S).group(1)
    return CASES[q][1]


def test_rules():
    assert match_method("Yes, it is.") == "yes_no" and match_method("(C)") == "choice"
    assert match_method("12 apples") == "numeric" and match_method("Paris") == "exact"
    assert match_method("The man is holding a red umbrella.") == "llm"
    assert rule_match("numeric", "3", "There are three.") and not rule_match("numeric", "3", "Four of them")
    assert rule_match("choice", "B", "(b) the cat") and not rule_match("yes_no", "No", "Yes, there is")
    assert first_number("about 1,200 people") == 1200
    assert parse_verdict("**SAME**") == "same" and parse_verdict("They are the same") is None


def test_blind_answer_flags_text_answerable_and_select_drops_them(tmp_path, photos):
    names = sorted(photos)
    qs = list(CASES)
    files = {f"{i}.jpg": jpeg_bytes(photos[names[i % len(names)]]) for i in range(len(qs))}
    ann = write_dataset(tmp_path / "src", [llava(f"r{i}", f"images/{i}.jpg", q=q, a=CASES[q][0])
                                           for i, q in enumerate(qs)], files)
    with FakeOpenAIServer(responder=server_reply) as srv:
        recipe = load_recipe({"storage": {"prefix": str(tmp_path / "run")}, "stages": [
            {"stage": "ingest", "with": {"format": "llava", "annotations": ann, "images": str(tmp_path / "src")}},
            {"stage": "blind_answer", "as": "blind", "with": {"llm": {"model": "text-only", "base_url": srv.base_url,
                                                                        "max_attempts": 1}}},
            {"stage": "select", "with": {"thresholds": {"blind.answerable_score": {"max": 0}}}}]})
        run_recipe(recipe, progress=False)
        # 6 blind questions + comparators for: car (exact failed), umbrella, sign
        assert srv.count == 9
        assert all("image_url" not in json.dumps(b) for b in srv.requests)
    store = open_store(recipe.prefix)
    prefix = next(p.prefix for p in plan(recipe) if p.id == "blind")
    side = {json.loads(m["json"])["question"]: json.loads(m["json"])
            for m in iter_members(store.uri(f"{prefix}/shard-000000.tar"))}
    got = {q: (d["answerable"], d["method"]) for q, d in side.items()}
    assert got == {"What is the capital of France?": (True, "exact"),
                   "What colour is the car?": (False, "llm"),
                   "What is the man holding?": (True, "llm"),
                   "How many legs does a spider have?": (True, "numeric"),
                   "Is there a dog in the picture?": (False, "yes_no")}
    car = side["What colour is the car?"]
    assert car["verdict"] == "different" and car["comparator_raw"] == "DIFFERENT"
    assert car["blind_answer"] == "I cannot see it; maybe blue." and car["reference"] == "Red"
    q = read_quarantine(store, prefix, "shard-000000")
    assert [d["reason"] for d in q] == ["unparseable_reply"] and "not SAME or DIFFERENT" in q[0]["detail"]
    # select: the samples a text model answers without the image are dropped, the others kept
    sel = [p for p in store.list("select") if "/decisions/" in p]
    decisions = [json.loads(x) for p in sel for x in store.read_text("select/" + p).splitlines()]
    kept = {d["key"] for d in decisions if d["selected"]}
    by_q = {d["question"]: k for k, d in _keys(store, prefix).items()}
    assert kept == {by_q["What colour is the car?"], by_q["Is there a dog in the picture?"]}


def _keys(store, prefix):
    return {m["__key__"]: json.loads(m["json"]) for m in iter_members(store.uri(f"{prefix}/shard-000000.tar"))}


def test_batch_api_is_refused():
    from libcurate.llm.blind import BlindAnswerConfig
    from libcurate.stage import PermanentInputError

    with pytest.raises(PermanentInputError, match="online"):
        BlindAnswerConfig.from_dict({"llm": {"batch_api": True}})
