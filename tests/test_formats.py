"""Annotation parsers and export writers (libcurate.formats) on fixtures generated here.

The "realistic" fixtures copy the exact record shapes of the public releases (LLaVA-Instruct-150K,
MiniGPT-4 cc_sbu_align filter_cap.json, InstructionGPT-4 score files, LRV-Instruction, MMInstruct's
data-engine JSONL) with invented text.
"""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from PIL import Image

from libcurate.formats import FORMATS, BadRecord, RawRecord, parse_annotations
from libcurate.formats.export import write_cc_sbu_align, write_llava
from libcurate.records import ImageRef, Sample, Source, Turn, make_key
from libcurate.storage import open_store
from tests.conftest import jpeg_bytes


def parse(fmt, obj_or_bytes, name="ann.json", **opts):
    data = obj_or_bytes if isinstance(obj_or_bytes, bytes) else json.dumps(obj_or_bytes, ensure_ascii=False).encode()
    return list(parse_annotations(fmt, data, name, **opts))


def conv(*pairs):
    out = []
    for h, g in pairs:
        out += [{"from": "human", "value": h}, {"from": "gpt", "value": g}]
    return out


def reasons(recs):
    return [r.reason if isinstance(r, BadRecord) else "ok" for r in recs]


# -- LLaVA --------------------------------------------------------------------------------------------

def test_llava_token_placement_multiturn_multiimage_and_extras():
    data = [
        {"id": "a", "image": "x/a.jpg", "conversations": conv(("<image>\nWhat is this?", "A cat."))},
        {"id": "b", "image": "b.jpg", "conversations": conv(("What colour is it?\n<image>", "Red."), ("Why?", "Paint."))},
        {"id": "c", "image": ["c1.jpg", "c2.jpg"],
         "conversations": conv(("<image>\n<image>\nCompare the two.", "The first is larger."))},
        {"id": "d", "images": ["./d.png"], "conversations": conv(("<image> Describe.", "A dog.")),
         "clip_score": 31.5, "source": "coco", "unique_idx": 7},
    ]
    recs = parse("llava", data)
    assert all(isinstance(r, RawRecord) for r in recs)
    a, b, c, d = recs
    assert a.images == ["x/a.jpg"] and a.conversations[0] == Turn("human", "<image>\nWhat is this?")
    assert b.conversations[0].value == "What colour is it?\n<image>" and len(b.conversations) == 4
    assert [t.role for t in b.conversations] == ["human", "gpt", "human", "gpt"]
    assert c.images == ["c1.jpg", "c2.jpg"]
    assert d.images == ["d.png"]
    # A foreign "source" string is not curate provenance: it stays in metadata with the other extras.
    assert d.metadata == {"clip_score": 31.5, "source": "coco", "unique_idx": 7} and d.origin is None


def test_llava_role_aliases_and_bad_roles():
    data = [
        {"id": "1", "image": "1.jpg", "conversations": [{"from": "user", "value": "<image>\nHi"},
                                                        {"from": "Assistant", "value": "Hello"}]},
        {"id": "2", "image": "2.jpg", "conversations": [{"from": "system", "value": "be nice"},
                                                        {"from": "human", "value": "<image>\nHi"}]},
        {"id": "3", "image": "3.jpg", "conversations": [{"from": "gpt", "value": "Hello"},
                                                        {"from": "human", "value": "<image>\nHi"}]},
        {"id": "4", "image": "4.jpg", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                        {"from": "human", "value": "Hi again"}]},
    ]
    recs = parse("llava", data)
    assert [t.role for t in recs[0].conversations] == ["human", "gpt"]
    assert reasons(recs) == ["ok", "unknown_role", "roles_out_of_order", "roles_out_of_order"]
    assert recs[2].original_id == "3" and "expected 'human'" in recs[2].detail


@pytest.mark.parametrize("rec, reason", [
    ({"id": "e", "image": "e.jpg", "conversations": conv(("<image>\nQ", "  "))}, "empty_answer"),
    ({"id": "e", "image": "e.jpg", "conversations": conv(("<image>\nQ", "A"), ("", "B"))}, "empty_instruction"),
    ({"id": "e", "image": "e.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"}]}, "no_answer"),
    ({"id": "e", "image": "e.jpg", "conversations": []}, "empty_conversation"),
    ({"id": "e", "image": "e.jpg"}, "missing_field"),
    ({"id": "e", "image": "e.jpg", "conversations": [{"from": "human"}]}, "missing_field"),
    ({"id": "e", "image": "e.jpg", "conversations": "hi"}, "malformed_record"),
    ({"id": "e", "image": "e.jpg", "conversations": conv(("<image>\nQ", 5))}, "malformed_record"),
    ({"id": "e", "conversations": conv(("Q", "A"))}, "no_image"),
    ({"id": "e", "image": [], "conversations": conv(("Q", "A"))}, "no_image"),
    ({"id": "e", "image": "../e.jpg", "conversations": conv(("Q", "A"))}, "bad_image_ref"),
    ({"id": "e", "image": "/data/e.jpg", "conversations": conv(("Q", "A"))}, "bad_image_ref"),
    ({"id": "e", "image": "https://x.org/e.jpg", "conversations": conv(("Q", "A"))}, "bad_image_ref"),
    ({"id": "e", "image": 12, "conversations": conv(("Q", "A"))}, "bad_image_ref"),
    ({"id": "e", "image": "e.jpg", "images": ["e.jpg"], "conversations": conv(("Q", "A"))}, "malformed_record"),
    ({"id": "e", "image": "e.jpg", "conversations": conv(("<image><image>\nQ", "A"))}, "image_token_mismatch"),
])
def test_llava_bad_records(rec, reason):
    recs = parse("llava", [rec])
    assert len(recs) == 1 and isinstance(recs[0], BadRecord)
    assert recs[0].reason == reason and recs[0].original_id == "e" and recs[0].detail


def test_llava_foreign_label_types_are_kept_as_metadata():
    rec = {"id": "e", "image": "e.jpg", "conversations": conv(("<image>\nQ", "A")), "task": 3, "metadata": [1],
           "extra": {"metadata": "clash"}}
    r = parse("llava", [rec])[0]
    assert r.task is None and r.metadata == {"task": 3, "metadata": [1], "extra": {"metadata": "clash"}}
    rec = {"id": "e", "image": "e.jpg", "conversations": conv(("<image>\nQ", "A")), "metadata": {"score": 1}, "score": 2}
    assert parse("llava", [rec])[0].metadata == {"score": 1, "_extra": {"score": 2}}


def test_llava_count_in_equals_count_out_and_fallback_ids():
    data = [{"image": "a.jpg", "conversations": conv(("<image>\nQ", "A"))}, "junk", 42,
            {"id": 157, "image": "b.jpg", "conversations": conv(("<image>\nQ", "A"))}, None]
    recs = parse("llava", data, name="mix.json")
    assert len(recs) == len(data)
    assert [r.original_id for r in recs] == ["mix.json#0", "mix.json#1", "mix.json#2", "157", "mix.json#4"]
    assert reasons(recs) == ["ok", "malformed_record", "malformed_record", "ok", "malformed_record"]


def test_llava_wrong_top_level_is_one_bad_layout():
    recs = parse("llava", {"annotations": []}, name="x.json")
    assert reasons(recs) == ["bad_layout"] and recs[0].original_id == "x.json"


def test_llava_instruct_150k_shaped_records(tmp_path):
    # Exactly the release's shape: string ids and COCO file names, <image> once, before or after text.
    data = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            {"from": "human", "value": "Where is the cat positioned in the image?\n<image>"},
            {"from": "gpt", "value": "The cat is positioned on top of the back of the couch."}]},
    ]
    path = tmp_path / "llava_instruct_150k.json"
    path.write_text(json.dumps(data, indent=2))
    recs = list(parse_annotations("llava", path.read_bytes(), path.name, image_prefix_strip="coco/train2017/"))
    assert [r.original_id for r in recs] == ["000000033471", "000000052846"]
    assert recs[0].images == ["000000033471.jpg"] and len(recs[0].conversations) == 4
    assert recs[1].conversations[0].value.endswith("\n<image>")
    assert recs[0].metadata == {} and recs[0].task is None


def test_llava_image_prefix_strip():
    recs = parse("llava", [{"id": "1", "image": "coco/train2017/1.jpg", "conversations": conv(("<image>\nQ", "A"))}],
                 image_prefix_strip="coco/train2017/")
    assert recs[0].images == ["1.jpg"]


# -- encodings and broken files -----------------------------------------------------------------------

def test_non_utf8_json_is_one_bad_record_and_encoding_option_reads_it(tmp_path):
    # InstructionGPT-4 ships GPT score files in GB18030.
    data = {"annotations": [{"image_id": "2", "caption": "一只猫坐在沙发上。", "gpt_score": 88},
                            {"image_id": "3", "caption": "两条狗在草地上奔跑。", "gpt_score": 95}]}
    path = tmp_path / "gpt_final_score.json"
    path.write_bytes(json.dumps(data, ensure_ascii=False).encode("gb18030"))
    raw = path.read_bytes()
    recs = list(parse_annotations("cc_sbu_align", raw, path.name))
    assert reasons(recs) == ["non_utf8"] and recs[0].original_id == path.name
    recs = list(parse_annotations("cc_sbu_align", raw, path.name, encoding="gb18030"))
    assert reasons(recs) == ["ok", "ok"]
    assert recs[0].conversations[1].value == "一只猫坐在沙发上。" and recs[1].metadata == {"gpt_score": 95}


def test_utf8_bom_is_accepted():
    data = b"\xef\xbb\xbf" + json.dumps([{"id": "1", "image": "1.jpg", "conversations": conv(("<image>\nQ", "A"))}]).encode()
    assert reasons(parse("llava", data)) == ["ok"]


def test_bad_json_is_one_bad_record():
    recs = parse("llava", b'[{"id": "1", "image": "1.jpg", "conversations": [}', name="broken.json")
    assert reasons(recs) == ["bad_json"] and recs[0].original_id == "broken.json" and "line 1" in recs[0].detail


def test_unknown_format_and_option_raise():
    with pytest.raises(ValueError, match="unknown annotation format"):
        parse("parquet", b"[]")
    with pytest.raises(ValueError, match="unknown option"):
        parse("llava", b"[]", mminstruct_mode="items")
    with pytest.raises(ValueError, match="unknown encoding"):
        parse("llava", b"[]", encoding="no-such-codec")
    assert set(FORMATS) == {"llava", "jsonl", "cc_sbu_align", "lrv", "mminstruct"}


# -- JSONL --------------------------------------------------------------------------------------------

def test_jsonl_per_line_errors(tmp_path):
    good = {"id": "g1", "image": "g1.jpg", "conversations": conv(("<image>\nQ", "A"))}
    lines = [json.dumps(good).encode(), b"", b'{"id": "g2", "image": ', "{\"id\": \"g3\", \"caption\": \"é\"}".encode("latin-1"),
             json.dumps({"images": ["p.jpg", "q.jpg"], "conversations": conv(("<image> <image> Which?", "Left."))}).encode(),
             json.dumps({"id": "g5", "image": "g5.jpg", "conversations": conv(("<image>\nQ", "A"))[::-1]}).encode(), b"  "]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\r\n".join(lines) + b"\n")
    recs = list(parse_annotations("jsonl", path.read_bytes(), path.name))
    assert reasons(recs) == ["ok", "bad_json", "non_utf8", "ok", "roles_out_of_order"]
    assert [r.original_id for r in recs] == ["g1", "data.jsonl:line 3", "data.jsonl:line 4", "data.jsonl:line 5", "g5"]
    assert recs[3].images == ["p.jpg", "q.jpg"]


# -- cc_sbu_align -------------------------------------------------------------------------------------

def test_cc_sbu_align_filter_cap_and_scores(tmp_path):
    # MiniGPT-4's filter_cap.json shape, plus the score fields InstructionGPT-4 attaches.
    data = {"annotations": [
        {"image_id": "2", "caption": "The image shows a man fishing on a lawn next to a river with a bridge in the background."},
        # InstructionGPT-4 full_score_data.json adds these three fields to the same records.
        {"image_id": "3", "caption": "The image shows a blue sky.", "clip_score": 30.0464, "reward_score": 3.8044,
         "length_score": 1.595639246778989},
        {"image_id": 4999, "caption": "An image with an integer id."},
        {"image_id": "5", "caption": ""},
        {"caption": "no id"},
        {"image_id": "6", "caption": None},
        {"image_id": "../7", "caption": "escapes"},
    ]}
    (tmp_path / "filter_cap.json").write_text(json.dumps(data))
    recs = list(parse_annotations("cc_sbu_align", (tmp_path / "filter_cap.json").read_bytes(), "filter_cap.json"))
    assert reasons(recs) == ["ok", "ok", "ok", "empty_answer", "missing_field", "missing_field", "bad_image_ref"]
    r = recs[0]
    assert r.original_id == "2" and r.images == ["image/2.jpg"]
    assert r.conversations == [Turn("human", "<image>\nDescribe this image in detail."), Turn("gpt", data["annotations"][0]["caption"])]
    assert recs[1].metadata == {"clip_score": 30.0464, "reward_score": 3.8044, "length_score": 1.595639246778989}
    assert recs[2].original_id == "4999" and recs[2].images == ["image/4999.jpg"]
    assert recs[4].original_id == "filter_cap.json#4"


def test_cc_sbu_align_bare_list_and_options():
    recs = parse("cc_sbu_align", [{"image_id": "9", "caption": "A cat."}], image_pattern="{image_id}.png",
                 instruction="What is shown?")
    assert recs[0].images == ["9.png"] and recs[0].conversations[0].value == "<image>\nWhat is shown?"
    assert reasons(parse("cc_sbu_align", {"images": []})) == ["bad_layout"]
    with pytest.raises(ValueError, match="image_id"):
        parse("cc_sbu_align", [], image_pattern="image.jpg")


# -- LRV ----------------------------------------------------------------------------------------------

LRV_RECORDS = [
    {"image_id": "2392588", "question": "Can you see a blue teapot on the white electric stove in the kitchen?",
     "answer": "There is no mention of a teapot on the white electric stove in the kitchen.", "task": "negative"},
    {"image_id": "2392588", "question": "What is the man wearing on his head?",
     "answer": "The man is wearing a black helmet.", "task": "detailed description"},
    {"image_id": "2410301", "question": "Is the dog sitting?", "answer": "Yes, the dog is sitting.", "task": "yes/no"},
]


@pytest.mark.parametrize("wrapped", [False, True])
def test_lrv_with_and_without_wrapper(tmp_path, wrapped):
    obj = {"annotations": LRV_RECORDS} if wrapped else LRV_RECORDS
    path = tmp_path / ("filter_cap.json" if wrapped else "lrv_instruction.json")
    path.write_text(json.dumps(obj))
    opts = {"image_pattern": "image/{image_id}.jpg"} if wrapped else {}
    recs = list(parse_annotations("lrv", path.read_bytes(), path.name, **opts))
    assert [r.original_id for r in recs] == ["2392588#0", "2392588#1", "2410301#2"]
    assert recs[0].images == [("image/" if wrapped else "") + "2392588.jpg"]
    assert recs[0].task == "negative" and recs[2].task == "yes/no"
    assert recs[0].conversations[0].value == "<image>\n" + LRV_RECORDS[0]["question"]
    assert recs[0].conversations[1].value == LRV_RECORDS[0]["answer"]
    assert recs[0].metadata == {"image_id": "2392588"}  # the plain Visual Genome id, for regions and export


def test_lrv_bad_records():
    data = [{"image_id": "1", "question": "Q only (evaluation set record)"}, {"question": "Q", "answer": "A"},
            {"image_id": "2", "question": "Q", "answer": "A", "task": ["x"]}, {"image_id": "3", "question": "Q", "answer": "A", "extra": 1}]
    recs = parse("lrv", data)
    assert reasons(recs) == ["missing_field", "missing_field", "malformed_record", "ok"]
    assert recs[0].original_id == "1#0" and recs[1].original_id == "ann.json#1" and recs[3].metadata == {"extra": 1, "image_id": "3"}


# -- MMInstruct ---------------------------------------------------------------------------------------

def mm_line(qa_raw, image="images/artwork/0001.jpg", **extra):
    return json.dumps({"image_path": image, "qa_raw": qa_raw, "gpt_prompt": "你是一个…Description: a painting", **extra},
                      ensure_ascii=False)


CHOICE_RAW = ("<Q1> What art style is the painting? </Q1> <C1> A. Cubism B. Impressionism C. Baroque D. Pop art </C1> <A1> B </A1>\n"
              "<Q2> Which colour dominates? </Q2> <C2> A) red\nB) blue\nC) green\nD) yellow </C2> <A2> Answer: (C) </A2>\n"
              "<Q3> What is in the foreground? </Q3> <C3> A. a boat B. a tree C. a horse D. a house </C3> <A3> a horse. </A3>\n"
              "<Q4> Who painted it? </Q4> <C4> A. Monet B. Manet C. Degas D. Renoir </C4> <A4> E </A4>\n"
              "<Q5> Where? </Q5> <C5> somewhere </C5> <A5> A </A5>\n"
              "<Q6> Missing answer </Q6> <C6> A. x B. y </C6>\n"
              "<C7> A. x B. y </C7> <A7> A </A7>\n")


def test_mminstruct_choice_items(tmp_path):
    path = tmp_path / "00017_artwork_choice.jsonl"
    path.write_text(mm_line(CHOICE_RAW) + "\n" + mm_line("error") + "\n" + mm_line("Sorry, I cannot help.") + "\n",
                    encoding="utf-8")
    recs = list(parse_annotations("mminstruct", path.read_bytes(), path.name))
    assert reasons(recs) == ["ok", "ok", "ok", "invalid_choice", "invalid_options", "missing_answer_tag",
                             "missing_question_tag", "generation_error", "no_items"]
    q1, q2, q3 = recs[:3]
    assert q1.original_id == "images/artwork/0001.jpg#q1" and q1.images == ["images/artwork/0001.jpg"]
    assert q1.type == "choice" and q1.domain == "artwork"
    assert q1.conversations[0].value == ("<image>\nWhat art style is the painting?\n"
                                         "A. Cubism\nB. Impressionism\nC. Baroque\nD. Pop art")
    assert q1.conversations[1].value == "B. Impressionism"
    assert q1.metadata["answer_letter"] == "B" and q1.metadata["line"] == 1 and q1.metadata["qa_index"] == 1
    assert q1.metadata["gpt_prompt"].startswith("你是")
    assert q2.conversations[1].value == "C. green"
    assert q3.metadata["answer_letter"] == "C"  # matched by option text
    assert recs[7].original_id == "images/artwork/0001.jpg" and recs[7].reason == "generation_error"


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("b", None), ("Answer: B", "B"), ("答案：B", "B"), ("The correct answer is D", "D"),
    ("B. a tree", "B"), ("B) a tree", "B"), ("A horse", "C"), ("A boat", "A"), ("A. a horse", None), ("A. boat-like", "A"), ("a horse.", "C"),
    ("E", None), ("a cow", None),
])
def test_mminstruct_choice_answer_forms(answer, letter):
    from libcurate.formats.mminstruct import choice_letter, split_options

    opts = split_options("A. a boat B. a tree C. a horse D. a house")
    assert opts == {"A": "a boat", "B": "a tree", "C": "a horse", "D": "a house"}
    assert choice_letter(answer, opts) == letter


def test_mminstruct_option_splitting():
    from libcurate.formats.mminstruct import split_options

    assert split_options("A、猫 B、狗 C、鸟 D、鱼") == {"A": "猫", "B": "狗", "C": "鸟", "D": "鱼"}
    assert split_options("(A) Plan A. first (B) second") == {"A": "Plan A. first", "B": "second"}
    assert split_options("A. only one") is None and split_options('{"是","否"}') is None
    assert split_options("A. x B. C. z") is None  # an empty option


def test_mminstruct_judge_and_balance():
    raw = ('<Q1> 图中是否有一座桥？ </Q1> <C1> {"是","否"} </C1> <A1> "是" </A1>\n'
           '<Q2> 图中是否有一只狗？ </Q2> <C2> {"是","否"} </C2> <A2> 否。 </A2>\n'
           '<Q3> 图中是否有一艘船？ </Q3> <C3> {"是","否"} </C3> <A3> 是 </A3>\n'
           '<Q4> 画中是否是夜晚？ </Q4> <C4> {"是","否"} </C4> <A4> 也许 </A4>\n')
    recs = parse("mminstruct", (mm_line(raw) + "\n").encode(), name="landmark_judge.jsonl")
    assert reasons(recs) == ["ok", "ok", "ok", "invalid_judge_answer"]
    assert [r.conversations[1].value for r in recs[:3]] == ["是", "否", "是"]
    assert recs[0].type == "judge" and recs[0].domain == "landmark"
    assert recs[0].conversations[0].value == "<image>\n图中是否有一座桥？"
    assert recs[0].metadata["judge_balance"] == {"yes": 2, "no": 1}
    strict = parse("mminstruct", (mm_line(raw) + "\n").encode(), name="landmark_judge.jsonl", enforce_judge_balance=True)
    assert reasons(strict) == ["judge_unbalanced"] * 3 + ["invalid_judge_answer"]
    # No file-name hint: the type is inferred from the content (English yes/no too).
    recs = parse("mminstruct", (mm_line("<Q1>Is it day?</Q1><A1>Yes.</A1><Q2>What time?</Q2><A2>Noon.</A2>") + "\n").encode(),
                 name="misc.jsonl")
    assert [(r.type, r.conversations[1].value, r.domain) for r in recs] == [("judge", "Yes", None), ("qa", "Noon.", None)]


def test_mminstruct_qa_files_domain_field_and_options():
    raw = "<Q1> Describe the scene. </Q1> <A1> A busy street at dusk with people crossing. </A1> <Q1> dup </Q1> <A2> </A2> <Q2> Empty? </Q2>"
    line = mm_line(raw, domain="image_scene", caption_id=17)
    recs = parse("mminstruct", (line + "\n").encode(), name="out/scene_lqa.jsonl", keep_prompt=False)
    assert reasons(recs) == ["duplicate_tag", "empty_answer"]
    recs = parse("mminstruct", (mm_line("<Q1> Yes or no? </Q1> <A1> Yes </A1>", domain="image_scene") + "\n").encode(),
                 name="out/scene_sqa.jsonl", keep_prompt=False)
    r = recs[0]
    assert r.type == "qa" and r.domain == "image_scene" and r.metadata["qa_length"] == "short"
    assert "gpt_prompt" not in r.metadata and len(r.metadata["gpt_prompt_sha256"]) == 64
    assert parse("mminstruct", (mm_line("<Q1>x</Q1><A1>y</A1>", domain="ocr") + "\n").encode(), name="a_sqa.jsonl",
                 domain="forced")[0].domain == "forced"
    assert parse("mminstruct", (mm_line("<Q1>x</Q1><A1>y</A1>") + "\n").encode(), name="a_sqa.jsonl")[0].domain == "a"
    with pytest.raises(ValueError, match="mminstruct_mode"):
        parse("mminstruct", b"", mminstruct_mode="pairs")


def test_mminstruct_conversation_mode_keeps_bad_items_accounted():
    path_name = "artwork_choice.jsonl"
    recs = parse("mminstruct", (mm_line(CHOICE_RAW) + "\n").encode(), name=path_name, mminstruct_mode="conversation")
    bad = [r for r in recs if isinstance(r, BadRecord)]
    good = [r for r in recs if isinstance(r, RawRecord)]
    assert len(good) == 1 and len(bad) == 4  # 3 good items in one record + 4 bad items = 7 items
    c = good[0]
    assert c.original_id == "images/artwork/0001.jpg" and len(c.conversations) == 6 and c.type == "choice"
    assert c.conversations[0].value.startswith("<image>\n") and "<image>" not in c.conversations[2].value
    assert c.metadata["qa_index"] == [1, 2, 3]


def test_mminstruct_bad_lines():
    lines = [b'{"qa_raw": "<Q1>x</Q1><A1>y</A1>"}', b'{"image_path": "/abs/p.jpg", "qa_raw": "<Q1>x</Q1><A1>y</A1>"}',
             b'{"image_path": "p.jpg", "qa_raw": 3}', b"not json", b"[1]", "{\"image_path\": \"\xff\"}".encode("latin-1")]
    recs = parse("mminstruct", b"\n".join(lines), name="d_qa.jsonl")
    assert reasons(recs) == ["missing_field", "bad_image_ref", "malformed_record", "bad_json", "malformed_record", "non_utf8"]
    recs = parse("mminstruct", lines[1], name="d_qa.jsonl", image_prefix_strip="/abs/")
    assert recs[0].images == ["p.jpg"]


# -- writers: round trips on both storage backends -------------------------------------------------------

def _png_bytes(img, size=(48, 40), alpha=False) -> bytes:
    buf = io.BytesIO()
    im = img.resize(size)
    if alpha:
        im = im.convert("RGBA")
        im.putalpha(128)
    im.save(buf, format="PNG")
    return buf.getvalue()


def _sample(raw: RawRecord, blobs: list[tuple[str, bytes]], dataset="test") -> Sample:
    """What ingest does with a RawRecord: attach images, content key, source."""
    ims = []
    for (fmt, data), name in zip(blobs, raw.images):
        w, h = Image.open(io.BytesIO(data)).size
        ims.append(ImageRef(fmt, hashlib.sha256(data).hexdigest(), w, h, name, data))
    return Sample(make_key([i.sha256 for i in ims], raw.conversations), ims, raw.conversations,
                  Source(dataset, raw.original_id, "llava"), raw.task, raw.type, raw.domain, raw.metadata).validate()


@pytest.fixture
def raw_and_samples(photos):
    src = [
        {"id": "000000033471", "image": "coco/000000033471.jpg",
         "conversations": conv(("<image>\nWhat is the astronaut holding?", "A helmet."), ("Is she smiling?", "Yes."))},
        {"id": "two", "image": ["a.jpg", "b.png"],
         "conversations": conv(("Compare <image> and <image>.", "The first shows a cat, the second coffee."))},
        {"id": "cap", "image": "c.jpg", "conversations": conv(("<image>\nDescribe this image in detail.", "A rocket on a pad."))},
        {"id": "q", "image": "q.png", "conversations": conv(("How many cups?\n<image>", "One cup of coffee."))},
        {"id": "tagged", "image": "t.jpg", "conversations": conv(("<image>\nWhat is it?", "A cat.")),
         "task": "vqa", "type": "qa", "domain": "animals", "metadata": {"clip_score": 31.2, "nested": {"a": [1, 2]}}},
    ]
    raws = parse("llava", src)
    assert all(isinstance(r, RawRecord) for r in raws)
    blobs = [
        [("jpeg", jpeg_bytes(photos["astronaut"]))],
        [("jpeg", jpeg_bytes(photos["chelsea"])), ("png", _png_bytes(photos["coffee"]))],
        [("jpeg", jpeg_bytes(photos["rocket"]))],
        [("png", _png_bytes(photos["coffee"], alpha=True))],
        [("jpeg", jpeg_bytes(photos["chelsea"], size=(32, 48)))],
    ]
    return raws, [_sample(r, b) for r, b in zip(raws, blobs)]


def test_write_llava_round_trip(store_url, raw_and_samples):
    raws, samples = raw_and_samples
    store = open_store(store_url)
    n = write_llava(iter(samples), store, "export/llava")
    assert n == len(samples)
    records = json.loads(store.read_bytes("export/llava/data.json"))
    assert records[0]["image"] == f"images/{samples[0].key}.img0.jpg"
    assert records[1]["image"] == [f"images/{samples[1].key}.img0.jpg", f"images/{samples[1].key}.img1.png"]
    back = list(parse_annotations("llava", store.read_bytes("export/llava/data.json"), "data.json"))
    for raw, s, b in zip(raws, samples, back):
        assert isinstance(b, RawRecord)
        assert (b.original_id, b.conversations, b.task, b.type, b.domain, b.metadata) == \
               (raw.original_id, raw.conversations, raw.task, raw.type, raw.domain, raw.metadata)
        assert b.origin == {"dataset": "test", "original_id": raw.original_id, "original_format": "llava", "key": s.key}
        # The images the re-parsed record names are the exported bytes: same content key on re-ingest.
        datas = [store.read_bytes(f"export/llava/{p}") for p in b.images]
        assert datas == [im.data for im in s.images]
        assert make_key([hashlib.sha256(d).hexdigest() for d in datas], b.conversations) == s.key


def test_write_llava_empty_and_streaming_input(tmp_path, raw_and_samples):
    store = open_store(str(tmp_path))
    assert write_llava(iter(()), store, "empty") == 0
    assert json.loads(store.read_text("empty/data.json")) == []
    _, samples = raw_and_samples
    image_less = Sample(samples[0].key, [], samples[0].conversations, samples[0].source)
    with pytest.raises(ValueError, match="at least one image"):
        write_llava([image_less], store, "bad")
    assert not store.exists("bad/data.json")  # nothing half-written is published


def test_write_cc_sbu_align_round_trip(store_url, raw_and_samples):
    raws, samples = raw_and_samples
    store = open_store(store_url)
    n, rejected = write_cc_sbu_align(samples, store, "export/cc")
    # astronaut: multi-turn; two: multi-image. Others fit (a custom question is kept).
    assert rejected == [(samples[0].key, "multi_turn"), (samples[1].key, "multi_image")]
    assert n == 3
    doc = json.loads(store.read_bytes("export/cc/filter_cap.json"))
    assert [a["image_id"] for a in doc["annotations"]] == [s.key for s in samples[2:]]
    assert "question" not in doc["annotations"][0] and doc["annotations"][1]["question"] == "How many cups?\n<image>"
    assert doc["annotations"][2]["question"] == "What is it?"
    back = list(parse_annotations("cc_sbu_align", store.read_bytes("export/cc/filter_cap.json"), "filter_cap.json"))
    for raw, s, b in zip(raws[2:], samples[2:], back):
        assert b.original_id == s.key and b.images == [f"image/{s.key}.jpg"]
        assert b.conversations == raw.conversations
        data = store.read_bytes(f"export/cc/{b.images[0]}")
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (s.images[0].width, s.images[0].height)
        if s.images[0].format == "jpeg":
            assert data == s.images[0].data  # JPEGs are copied, never re-encoded
    # The PNG with alpha was composited on white: its transparent-ish pixels are light.
    with Image.open(io.BytesIO(store.read_bytes(f"export/cc/image/{samples[3].key}.jpg"))) as im:
        assert min(im.convert("L").getpixel((0, 0)), 255) > 100


def test_write_cc_sbu_align_strict_captions(tmp_path, raw_and_samples):
    _, samples = raw_and_samples
    store = open_store(str(tmp_path))
    n, rejected = write_cc_sbu_align(samples[2:], store, "", keep_question=False)
    assert n == 1 and rejected == [(samples[3].key, "not_a_caption_sample"), (samples[4].key, "not_a_caption_sample")]
    assert store.exists("filter_cap.json") and store.exists(f"image/{samples[2].key}.jpg")
    with pytest.raises(ValueError, match="jpeg_quality"):
        write_cc_sbu_align([], store, "x", jpeg_quality=0)
