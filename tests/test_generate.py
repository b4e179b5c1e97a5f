"""Generation stages (caption, MMInstruct, LRV): parsing, validation, item-level rejection, quarantine,
provenance and materialize."""

from __future__ import annotations

import json

import pytest

from libcurate.generate.caption import CaptionConfig, CaptionStage
from libcurate.generate.common import materialize
from libcurate.generate.lrv import LrvConfig, LrvStage
from libcurate.generate.mminstruct import MMInstructConfig, MMInstructStage
from libcurate.llm.testing import Error, FakeOpenAIServer, Reply, make_sample, write_raw_shards
from libcurate.records import Sample
from libcurate.shards import iter_members, iter_samples
from libcurate.stage import PermanentInputError, StageContext, read_quarantine
from libcurate.storage import open_store

REGIONS = [{"caption": "a red bus", "bbox": [10, 20, 200, 100]}, {"caption": "a man waving", "bbox": [5, 6, 30, 90]}]


def llm(srv, **kw):
    return dict(model="gen-model", base_url=srv.base_url, backoff_base_s=0.002, max_attempts=2, timeout_s=2, **kw)


def side(store, prefix):
    return {m["__key__"]: json.loads(m["json"]) for m in iter_members(store.uri(f"{prefix}/shard-000000.tar"))}


def run(stage, store, prefix="stages/gen/x", upstream=None):
    return stage.process_shard(StageContext(store=store, prefix=prefix, upstream=upstream or {}), "shard-000000.tar")


def prompt_text(body) -> str:
    c = body["messages"][-1]["content"]
    return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)


# -- MMInstruct ------------------------------------------------------------------------------------
JUDGE_OK = ("<Q1> Is the mug white? </Q1> <C1> Yes, No </C1> <A1> Yes </A1>\n"
            "<Q2> Is the mug on a table? </Q2> <C2> Yes, No </C2> <A2> Yes </A2>\n"
            "<Q3> Is the mug red? </Q3> <C3> Yes, No </C3> <A3> No </A3>\n"
            "<Q4> Is the mug held by a dog? </Q4> <C4> Yes, No </C4> <A4> Yes </A4>\n"
            "<Q5> Is there a dragon? </Q5> <C5> Yes, No </C5> <A5> maybe </A5>")
CHOICE = ("<Q1> What colour is the mug? </Q1> <C1> A. red B. white C. green D. black </C1> <A1> B </A1>\n"
          "<Q2> Where is the mug? </Q2> <C2> A. table B. floor C. shelf </C2> <A2> A </A2>\n"
          "<Q3> What is in the mug? </Q3> <C3> A. tea B. coffee C. milk D. water </C3> <A3> E </A3>")
LONG = "<Q1> Describe the scene. </Q1> <A1> A white mug of coffee stands on a wooden table in warm light. </A1>"
SHORT = ("<Q1> What drink is shown? </Q1> <A1> Coffee </A1>\n<Q2> What is the table made of? </Q2>"
         "<A2> The table appears to be made of a dark polished wood with a visible grain pattern everywhere </A2>\n"
         "<Q3> Only a question </Q3>")


def mm_responder(body):
    p = prompt_text(body)
    if "yes/no questions" in p:
        return JUDGE_OK
    if "multiple-choice" in p:
        return CHOICE
    if "detailed, well-organised answer" in p:
        return LONG
    return SHORT


def test_mminstruct_validates_items_and_balances_yes_no(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    s = make_sample(photos["coffee"], "Describe this image in detail.", "A white mug of coffee on a table.", i=0,
                    domain="image_scene", metadata={"tags": ["coffee", "mug"]})
    write_raw_shards(store, [[s]])
    seeds = {"image_scene": {"judge": {"English": ["Is this a <place>?", "Is it day?", "Is it indoors?", "Is it wet?"]},
                             "choice": {"English": ["What is the <object>?"]},
                             "sentence": {"English": ["What happens in the image?"]}}}
    store.write_text("seeds.json", json.dumps(seeds))
    with FakeOpenAIServer(responder=mm_responder) as srv:
        cfg = MMInstructConfig.from_dict({"seeds_file": store.uri("seeds.json"), "llm": llm(srv)})
        stats = run(MMInstructStage(cfg), store)
        assert srv.count == 4
        judge_prompt = next(prompt_text(b) for b in srv.requests if "yes/no" in prompt_text(b))
        assert "image_scene" in judge_prompt and "A white mug of coffee" in judge_prompt
        assert "tags: coffee, mug" in judge_prompt and judge_prompt.count("\n- ") == 3  # 3 of 4 seeds
        run(MMInstructStage(cfg), store, prefix="stages/gen/rerun")
        assert srv.count == 4  # same seeds drawn again -> every prompt from the cache
    rec = side(store, "stages/gen/x")[s.key]
    by_type: dict = {}
    for it in rec["generated"]:
        by_type.setdefault(it["type"], []).append(it)
        assert it["provenance"]["generator_model"] == "gen-model"
        assert it["provenance"]["prompt_version"].startswith(f"mminstruct_{it['type']}@")
        assert it["conversations"][0]["value"].startswith("<image>\n")
    judge = [it["conversations"][1]["value"] for it in by_type["judge"]]
    assert sorted(judge) == ["No", "Yes"]  # 3 yes / 1 no -> balanced to 1 / 1
    assert [it["conversations"][1]["value"] for it in by_type["choice"]] == ["B"]
    assert "\nA. red\nB. white\nC. green\nD. black" in by_type["choice"][0]["conversations"][0]["value"]
    assert len(by_type["long"]) == 1 and [it["conversations"][1]["value"] for it in by_type["short"]] == ["Coffee"]
    reasons = sorted(r["reason"] for r in rec["rejected"])
    assert reasons == ["answer_not_an_option", "answer_too_long", "bad_options", "missing_tag", "not_yes_no",
                       "yes_no_balance", "yes_no_balance"]
    assert rec["n_generated"] == 5 and stats["out"] == 1
    # materialize: a real, valid sample with a new key and provenance
    raw = next(iter_samples(store, "raw/shard-000000.tar"))
    new = materialize(raw, by_type["choice"][0])
    assert isinstance(new, Sample) and new.key != raw.key and new.images[0].sha256 == raw.images[0].sha256
    assert new.metadata["generated_from"] == raw.key and new.metadata["provenance"]["stage"] == "generate_mminstruct"
    assert new.source.original_format == "generated" and new.type == "choice" and new.domain == "image_scene"
    assert materialize(raw, by_type["choice"][0]).key == new.key


def test_mminstruct_quarantines_sample_with_nothing_valid(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    good = make_sample(photos["coffee"], "Describe.", "A mug.", i=0)
    junk = make_sample(photos["rocket"], "Describe.", "A rocket.", i=1)
    write_raw_shards(store, [[good, junk]])

    def responder(body):
        return "I cannot help with that." if "A rocket." in prompt_text(body) else LONG

    with FakeOpenAIServer(responder=responder) as srv:
        stats = run(MMInstructStage(MMInstructConfig.from_dict({"types": ["long"], "llm": llm(srv)})), store)
    q = read_quarantine(store, "stages/gen/x", "shard-000000")
    assert [(d["key"], d["reason"]) for d in q] == [(junk.key, "no_tags")]
    assert list(side(store, "stages/gen/x")) == [good.key] and stats["quarantined"] == 1


def test_mminstruct_partial_call_failure_keeps_other_types(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    s = make_sample(photos["coffee"], "Describe.", "A white mug.", i=0)
    write_raw_shards(store, [[s]])

    def responder(body):
        return Error(400) if "multiple-choice" in prompt_text(body) else mm_responder(body)

    with FakeOpenAIServer(responder=responder) as srv:
        run(MMInstructStage(MMInstructConfig.from_dict({"types": ["choice", "long"], "llm": llm(srv)})), store)
    rec = side(store, "stages/gen/x")[s.key]
    assert [it["type"] for it in rec["generated"]] == ["long"]
    assert rec["rejected"][0]["reason"] == "llm_call_failed" and rec["rejected"][0]["type"] == "choice"
    assert store.exists("stages/gen/x/_dead_letter/shard-000000.jsonl")


def test_mminstruct_caption_from_upstream_caption_stage(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    a = make_sample(photos["coffee"], "Q", "unused answer", i=0)
    b = make_sample(photos["rocket"], "Q", "unused answer 2", i=1)
    write_raw_shards(store, [[a, b]])
    long_caption = " ".join(["A detailed rocket launch scene with smoke."] * 10)

    def responder(body):
        c = body["messages"][-1]["content"]
        if isinstance(c, list):  # the caption stage sends the image
            assert c[0]["type"] == "image_url"
            return "Sorry, I can't." if body["messages"][-1]["content"][0]["image_url"]["url"] and srv.count == 1 else long_caption
        assert long_caption in prompt_text(body)
        return LONG

    with FakeOpenAIServer(responder=responder) as srv:
        run(CaptionStage(CaptionConfig.from_dict({"llm": llm(srv, concurrency=1)})), store, prefix="stages/cap/c")
        cap = side(store, "stages/cap/c")
        assert len(cap) == 1  # the refusal was quarantined, not written as a caption
        (kept,) = cap.values()
        assert kept["caption"] == long_caption and kept["generated"][0]["type"] == "caption"
        q = read_quarantine(store, "stages/cap/c", "shard-000000")
        assert q[0]["reason"] == "refusal"
        cfg = MMInstructConfig.from_dict({"types": ["long"], "caption_source": "cap", "llm": llm(srv)})
        run(MMInstructStage(cfg), store, upstream={"cap": "stages/cap/c"})
    gen = side(store, "stages/gen/x")
    assert len(gen) == 1
    q = read_quarantine(store, "stages/gen/x", "shard-000000")
    assert q[0]["reason"] == "no_caption"


def test_caption_prior_and_validation(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    s = make_sample(photos["camera"], "Q", "A", i=0, metadata={"ocr": ["SALE", "50%"], "tags": ["shop"]})
    short = make_sample(photos["astronaut"], "Q", "B", i=1)
    write_raw_shards(store, [[s, short]])
    words = " ".join(["word"] * 50)

    def responder(body):
        return words if "SALE 50%" in prompt_text(body) else Reply("too short", finish_reason="stop")

    with FakeOpenAIServer(responder=responder) as srv:
        run(CaptionStage(CaptionConfig.from_dict({"llm": llm(srv)})), store)
        assert "Keywords associated with the image (may be noisy): shop" in prompt_text(srv.requests[0]) or \
               "Keywords associated with the image (may be noisy): shop" in prompt_text(srv.requests[1])
    rec = side(store, "stages/gen/x")[s.key]
    assert rec["caption"] == words and rec["generated"][0]["conversations"][0]["value"] == \
        "<image>\nDescribe this image in detail."
    q = read_quarantine(store, "stages/gen/x", "shard-000000")
    assert q[0]["key"] == short.key and q[0]["reason"] == "too_short"


def test_caption_truncated_is_rejected(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    s = make_sample(photos["camera"], "Q", "A", i=0)
    write_raw_shards(store, [[s]])
    with FakeOpenAIServer(responder=lambda b: Reply(" ".join(["w"] * 80), finish_reason="length")) as srv:
        run(CaptionStage(CaptionConfig.from_dict({"llm": llm(srv)})), store)
    assert read_quarantine(store, "stages/gen/x", "shard-000000")[0]["reason"] == "truncated"


# -- LRV ---------------------------------------------------------------------------------------------
POSITIVE = """Instruction:
What colour is the bus?
Answer:
The bus is red.
Task:
object attribute detection
Instruction:
Describe the image.
Answer:
A red bus and a man waving.
Task:
Image Captioning
Instruction:
What is the man doing?
Answer:
Waving.
Task:
Dancing Analysis
Instruction:
What colour is the bus?
Answer:
Red.
Task:
Image Captioning
Instruction:
Is there a bus?
"""
NEGATIVE = """Instruction:
What is the cat on the bus doing?
Reason:
There is no cat in the image; it shows a red bus and a man waving.
Instruction: Describe the blue bus.
Reason: The bus is red, not blue.
"""


def lrv_responder(body):
    p = prompt_text(body)
    return POSITIVE if "varied instructions" in p else NEGATIVE


def test_lrv_positive_and_negative(photos, tmp_path):
    store = open_store(str(tmp_path / "run"))
    s = make_sample(photos["rocket"], "Q", "A", i=0)
    s.source.original_id = "2392588"
    no_regions = make_sample(photos["coffee"], "Q", "A", i=1)
    write_raw_shards(store, [[s, no_regions]])
    store.write_text("vg.json", json.dumps({"2392588": REGIONS}))
    with FakeOpenAIServer(responder=lrv_responder) as srv:
        cfg = LrvConfig.from_dict({"regions_file": store.uri("vg.json"), "llm": llm(srv)})
        stats = run(LrvStage(cfg), store)
        assert srv.count == 4
        assert all("a red bus X: 10 Y: 20 Width: 200 Height: 100" in prompt_text(b) for b in srv.requests)
    rec = side(store, "stages/gen/x")[s.key]
    pos = [it for it in rec["generated"] if it["type"] == "positive"]
    neg = [it for it in rec["generated"] if it["type"] == "negative"]
    assert [(it["task"], it["conversations"][1]["value"]) for it in pos] == [
        ("Object Attribute Detection", "The bus is red."), ("Image Captioning", "A red bus and a man waving.")]
    assert len(neg) == 6 and {it["task"] for it in neg} == {"nonexistent_element", "existent_element",
                                                            "knowledge_manipulation"}
    assert neg[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat is the cat on the bus doing?"},
                                       {"from": "gpt", "value": "There is no cat in the image; it shows a red bus and a man waving."}]
    assert sorted(r["reason"] for r in rec["rejected"]) == ["duplicate_instruction", "missing_field", "unknown_task"]
    q = read_quarantine(store, "stages/gen/x", "shard-000000")
    assert [(d["key"], d["reason"]) for d in q] == [(no_regions.key, "no_regions")]
    assert stats["in"] == 2 and stats["out"] == 1 and stats["llm"]["prompt_versions"]
    raw = next(iter_samples(store, "raw/shard-000000.tar"))
    m = materialize(raw, neg[0])
    assert m.type == "negative" and m.task == "nonexistent_element" and m.conversations[0].value.count("<image>") == 1


def test_generation_config_validation():
    for bad in ({"types": ["poem"]}, {"n_judge": 3}, {"types": []}):
        with pytest.raises(PermanentInputError):
            MMInstructConfig.from_dict(bad)
    for bad in ({"kinds": ["x"]}, {"n_positive": 0}, {"tasks": []}):
        with pytest.raises(PermanentInputError):
            LrvConfig.from_dict(bad)
    with pytest.raises(PermanentInputError):
        CaptionConfig.from_dict({"image_detail": "ultra"})
    assert len(MMInstructConfig.from_dict({}).prompt_versions) == 4


@pytest.mark.parametrize("cls, field_, good", [
    (CaptionConfig, "prompt_version", lambda c: c.prompt_version),
    (LrvConfig, "prompt_versions", lambda c: list(c.prompt_versions)),
    (MMInstructConfig, "prompt_versions", lambda c: list(c.prompt_versions)),
])
def test_generation_config_pinned_prompt_versions(cls, field_, good):
    pinned = good(cls.from_dict({}))
    assert good(cls.from_dict({field_: pinned})) == pinned  # the right pin is accepted
    wrong = "x@000000000000" if isinstance(pinned, str) else ["x@000000000000"] * len(pinned)
    with pytest.raises(PermanentInputError, match="pinned, (but the template is|templates are)"):
        cls.from_dict({field_: wrong})


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_lrv_unreadable_regions_file_is_permanent(tmp_path, content):
    (tmp_path / "vg.json").write_text(content)
    stage = LrvStage(LrvConfig.from_dict({"regions_file": str(tmp_path / "vg.json")}))
    with pytest.raises(PermanentInputError, match="cannot read regions_file"):
        stage.setup(StageContext(store=open_store(str(tmp_path)), prefix="stages/gen/x"))
