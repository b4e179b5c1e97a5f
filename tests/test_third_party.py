"""Real third-party annotation files (not written by curate) ingest with every record written or
quarantined with a reason."""

import json
import os
import shutil

from libcurate.audit import audit

from .conftest import jpeg_bytes
from .test_ingest import ingest

DATA = os.path.join(os.path.dirname(__file__), "data", "third_party")


def test_instructiongpt4_cc_sbu_align_scores_file(tmp_path, photos):
    ann = os.path.join(DATA, "igpt4_full_score_data_head.json")
    ids = [a["image_id"] for a in json.load(open(ann))["annotations"]]
    src = tmp_path / "src"
    (src / "image").mkdir(parents=True)
    names = list(photos)
    for i, image_id in enumerate(ids[:-1]):  # the last id has no image: it must be quarantined
        (src / "image" / f"{image_id}.jpg").write_bytes(jpeg_bytes(photos[names[i % len(names)]]))
    shutil.copy(ann, src / "filter_cap.json")
    store, samples, quarantine = ingest(str(tmp_path / "run"), str(src / "filter_cap.json"), str(src),
                                        fmt="cc_sbu_align", shard_size=3)
    assert len(samples) + len(quarantine) == len(ids)
    assert [q["reason"] for q in quarantine] == ["missing_image"] and quarantine[0]["key"] == ids[-1]
    s = next(s for s in samples if s.source.original_id == "31")
    assert s.conversations[0].value.replace("<image>", "").strip() == "Describe this image in detail."
    assert s.conversations[1].value.startswith("The image is a video game cover")
    assert s.metadata["clip_score"] == 37.9679 and s.metadata["reward_score"] == 6.3494
    assert audit(store)["ok"]
