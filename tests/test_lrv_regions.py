"""Source image ids: LRV ingest -> GAVIE / generate_lrv find every image's regions (issue 10, item 2), and the
cc_sbu_align export names images by the source's image id (item 8)."""

from __future__ import annotations

import json

import pytest

from libcurate.formats import parse_annotations
from libcurate.formats.export import write_cc_sbu_align
from libcurate.formats.lrv import image_id_of, lookup_regions
from libcurate.llm.testing import FakeOpenAIServer
from libcurate.pipeline import load_recipe, plan
from libcurate.records import Source
from libcurate.runner import run_recipe
from libcurate.shards import iter_members, iter_samples
from libcurate.stage import raw_shards, read_quarantine
from libcurate.storage import open_store

from .conftest import jpeg_bytes

# LRV-Instruction's MiniGPT-4 layout: filter_cap.json = {"annotations": [{image_id, question, answer, task}]}
# with Visual Genome images in image/<image_id>.jpg; regions as in LRV's vg_annotation.json
# (image_id -> [{caption, bbox: [x, y, w, h]}]).
LRV = [
    {"image_id": "2392588", "question": "Can you see a blue teapot on the white electric stove in the kitchen?",
     "answer": "There is no mention of a teapot on the white electric stove in the kitchen.", "task": "negative"},
    {"image_id": "2392588", "question": "What is the man wearing on his head?",
     "answer": "The man is wearing a black helmet.", "task": "Object Attribute Detection"},
    {"image_id": "2410301", "question": "Is the dog sitting?", "answer": "Yes, the dog is sitting.",
     "task": "Visual Entailment"},
    {"image_id": 2347031, "question": "Describe the rocket.", "answer": "A white rocket on a launch pad.",
     "task": "image captioning"},
]
REGIONS = {
    "2392588": [{"caption": "man wearing a black helmet", "bbox": [120, 30, 80, 60]},
                {"caption": "white electric stove", "bbox": [10, 200, 150, 120]}],
    "2410301": [{"caption": "a brown dog sitting on grass", "bbox": [40, 50, 200, 180]}],
    "2347031": [{"caption": "white rocket", "bbox": [100, 20, 60, 300]}],
}


@pytest.fixture
def lrv_source(tmp_path, photos):
    src = tmp_path / "lrv"
    (src / "image").mkdir(parents=True)
    for vg, name in (("2392588", "astronaut"), ("2410301", "chelsea"), ("2347031", "rocket")):
        (src / "image" / f"{vg}.jpg").write_bytes(jpeg_bytes(photos[name]))
    (src / "filter_cap.json").write_text(json.dumps({"annotations": LRV}))
    (tmp_path / "vg_annotation.json").write_text(json.dumps(REGIONS))
    return src


def gavie_reply(body):
    return ("Relevancy:\nscore of answer1: 8\nreason: follows the instruction\n"
            "Accuracy:\nscore of answer1: 7\nreason: matches the regions\n")


def test_lrv_ingest_then_gavie_scores_every_sample(tmp_path, lrv_source):
    with FakeOpenAIServer(responder=gavie_reply) as srv:
        recipe = load_recipe({"storage": {"prefix": str(tmp_path / "run")}, "workers": 1, "stages": [
            {"stage": "ingest", "with": {"format": "lrv", "annotations": str(lrv_source / "filter_cap.json"),
                                         "images": str(lrv_source),
                                         "options": {"image_pattern": "image/{image_id}.jpg"}}},
            {"stage": "judge_gavie", "with": {"regions_file": str(tmp_path / "vg_annotation.json"),
                                              "llm": {"model": "judge", "base_url": srv.base_url,
                                                      "max_attempts": 2, "timeout_s": 5}}}]})
        run_recipe(recipe, progress=False)
        assert srv.count == len(LRV)
        # every prompt carries its own image's regions (the two questions on 2392588 share them)
        prompts = [b["messages"][-1]["content"] for b in srv.requests]
        assert sum("man wearing a black helmet X: 120 Y: 30 Width: 80 Height: 60" in p for p in prompts) == 2
        assert sum("a brown dog sitting on grass" in p for p in prompts) == 1
    store = open_store(str(tmp_path / "run"))
    samples = [s for sh in raw_shards(store) for s in iter_samples(store, f"raw/{sh}")]
    assert [s.source.original_id for s in samples] == ["2392588#0", "2392588#1", "2410301#2", "2347031#3"]
    assert [s.metadata["image_id"] for s in samples] == ["2392588", "2392588", "2410301", "2347031"]
    gavie = next(p for p in plan(recipe) if p.stage == "judge_gavie").prefix
    quarantined = [q for sh in raw_shards(store) for q in read_quarantine(store, gavie, sh[:-4])]
    assert quarantined == []
    side = {m["__key__"]: json.loads(m["json"]) for sh in raw_shards(store)
            for m in iter_members(store.uri(f"{gavie}/{sh}"))}
    assert {s.key for s in samples} == set(side)
    assert all(d["accuracy"] == 7 and d["relevancy"] == 8 for d in side.values())


def test_generate_lrv_finds_regions_of_lrv_samples(tmp_path, lrv_source):
    def reply(body):
        return "Instruction:\nIs there a purple elephant?\nReason:\nNo elephant is in the image.\n"

    with FakeOpenAIServer(responder=reply) as srv:
        recipe = load_recipe({"storage": {"prefix": str(tmp_path / "run")}, "workers": 1, "stages": [
            {"stage": "ingest", "with": {"format": "lrv", "annotations": str(lrv_source / "filter_cap.json"),
                                         "images": str(lrv_source),
                                         "options": {"image_pattern": "image/{image_id}.jpg"}}},
            {"stage": "generate_lrv", "with": {"kinds": ["negative_nonexistent"],
                                               "regions_file": str(tmp_path / "vg_annotation.json"),
                                               "llm": {"model": "gen", "base_url": srv.base_url,
                                                       "max_attempts": 2, "timeout_s": 5}}}]})
        run_recipe(recipe, progress=False)
        assert srv.count >= 3  # one prompt per distinct region list at least; none skipped for lack of regions
    store = open_store(str(tmp_path / "run"))
    gen = next(p for p in plan(recipe) if p.stage == "generate_lrv").prefix
    assert [q for sh in raw_shards(store) for q in read_quarantine(store, gen, sh[:-4])] == []


def _sample(oid, fmt, metadata=None):
    from libcurate.llm.testing import make_sample
    from PIL import Image

    s = make_sample(Image.new("RGB", (8, 8), (200, 10, 10)), "Q?", "A.", metadata=metadata)
    s.source = Source("d", oid, fmt)
    return s


def test_image_id_and_region_lookup_rules():
    regions = {"2392588": ["r1"], "rec-7": ["r2"]}
    new = _sample("2392588#4", "lrv", {"image_id": "2392588"})
    old = _sample("2392588#4", "lrv")               # ingested before metadata carried the id
    generated = _sample("2392588#4", "generated")   # generated from an LRV record: the parent's id
    keyed_by_record = _sample("rec-7", "llava")
    assert image_id_of(new) == image_id_of(old) == "2392588" and image_id_of(generated) is None
    assert image_id_of(_sample("17", "cc_sbu_align")) == "17" and image_id_of(keyed_by_record) is None
    assert [lookup_regions(regions, s) for s in (new, old, generated, keyed_by_record)] == [["r1"], ["r1"], ["r1"], ["r2"]]
    assert lookup_regions(regions, _sample("404#1", "lrv")) is None


# -- cc_sbu_align keeps the source's image id ---------------------------------------------------------

def _export(tmp_path, samples, name="out"):
    store = open_store(str(tmp_path))
    n, rejected = write_cc_sbu_align(samples, store, name)
    return store, n, rejected, json.loads(store.read_text(f"{name}/filter_cap.json"))["annotations"]


def test_cc_sbu_align_round_trips_image_ids(tmp_path, photos):
    from .test_ingest import ingest

    src = tmp_path / "cc"
    (src / "image").mkdir(parents=True)
    anns = []
    for vid, name in (("2", "astronaut"), ("41", "coffee"), ("4999", "chelsea")):
        (src / "image" / f"{vid}.jpg").write_bytes(jpeg_bytes(photos[name]))
        anns.append({"image_id": vid, "caption": f"A photo {name}. It is detailed."})
    (src / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    _, samples, q = ingest(str(tmp_path / "run"), str(src / "filter_cap.json"), str(src), fmt="cc_sbu_align")
    assert q == []
    store, n, rejected, out = _export(tmp_path, samples)
    assert (n, rejected) == (3, [])
    assert [a["image_id"] for a in out] == ["2", "41", "4999"]
    for vid in ("2", "41", "4999"):  # JPEGs copied unchanged under the source's name
        assert store.read_bytes(f"out/image/{vid}.jpg") == (src / "image" / f"{vid}.jpg").read_bytes()
    # re-ingesting the export gives the same ids, images and keys
    _, back, q2 = ingest(str(tmp_path / "again"), store.uri("out/filter_cap.json"), store.uri("out"),
                         fmt="cc_sbu_align")
    assert q2 == [] and [s.source.original_id for s in back] == ["2", "41", "4999"]
    assert [s.key for s in back] == [s.key for s in samples]



def test_cc_sbu_align_lrv_ids_shared_images_and_fallbacks(tmp_path, lrv_source, photos):
    from libcurate.llm.testing import make_sample

    from .test_ingest import ingest

    _, samples, q = ingest(str(tmp_path / "run"), str(lrv_source / "filter_cap.json"), str(lrv_source), fmt="lrv",
                           options={"image_pattern": "image/{image_id}.jpg"})
    assert q == []
    clash = make_sample(photos["camera"], "What is this?", "A camera.", i=3)   # another image named 2392588
    clash.metadata["image_id"] = "2392588"
    plain = make_sample(photos["coffee"], "What is this?", "A cup.", i=4)     # a LLaVA sample: no image id
    unsafe = make_sample(photos["coffee"], "Q?", "A.", i=5, metadata={"image_id": "a/b"})  # cannot name a file
    store, n, rejected, out = _export(tmp_path, samples + [clash, plain, unsafe])
    assert (n, rejected) == (7, [])
    # LRV's MiniGPT-4 layout: one record per instruction, several records naming one image file
    assert [a["image_id"] for a in out] == ["2392588", "2392588", "2410301", "2347031",
                                            clash.key, plain.key, unsafe.key]
    assert out[0]["question"] == LRV[0]["question"] and out[0]["caption"] == LRV[0]["answer"]
    assert store.read_bytes("out/image/2392588.jpg") == (lrv_source / "image" / "2392588.jpg").read_bytes()
    assert store.read_bytes(f"out/image/{clash.key}.jpg") == clash.images[0].data
    names = sorted(store.list("out/image"))
    assert names == sorted(["2392588.jpg", "2410301.jpg", "2347031.jpg", f"{clash.key}.jpg", f"{plain.key}.jpg",
                            f"{unsafe.key}.jpg"])
    # and back through LRV's own parser (the wrapped MiniGPT-4 layout reads answer/question, not caption)
    back = list(parse_annotations("cc_sbu_align", store.read_bytes("out/filter_cap.json"), "filter_cap.json"))
    assert [b.original_id for b in back[:4]] == ["2392588", "2392588", "2410301", "2347031"]
