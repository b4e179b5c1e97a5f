"""The demo's selection against plain top-k, on one run: same scores, `select` decided twice.

    make demo && .venv/bin/python bench/demo_selection.py

Prints, for each: samples kept, photos covered (of 16), most samples of one photo, extra samples of one
image kept (full / chat / small / dup / near share a picture), planted near-duplicates kept beside their
original.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# Run as `python bench/<name>.py`, this directory comes first on the import path, where bench/select.py
# would shadow the standard library's `select` (imported by subprocess): put the repository root there.
_sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import collections
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from libcurate.pipeline import load_recipe, plan  # noqa: E402
from libcurate.select.stage import SelectConfig, SelectStage, read_decisions  # noqa: E402
from libcurate.shards import iter_samples  # noqa: E402
from libcurate.stage import StageContext, raw_shards  # noqa: E402
from libcurate.storage import open_store  # noqa: E402


def main() -> None:
    r = load_recipe(os.path.join(ROOT, "recipes", "demo.yaml"))
    ps = {p.id: p for p in plan(r)}
    store = open_store(r.prefix)
    rid = {s.key: s.source.original_id for sh in raw_shards(store)
           for s in iter_samples(store, f"raw/{sh}", with_images=False)}
    planted = json.load(open(os.path.join(os.path.dirname(r.prefix), "source", "planted.json")))
    topk = {"thresholds": {"score_length.words": {"min": 3}}, "rank_by": "score_clip.cosine", "budget": 60,
            "near_duplicates": []}
    for name, cfg in (("top-k by score_clip.cosine", topk), ("recipes/demo.yaml", ps["select"].config.to_dict())):
        prefix = f"select/bench-demo-selection/{'topk' if cfg is topk else 'recipe'}"
        SelectStage(SelectConfig.from_dict(cfg)).run_global(
            StageContext(store=store, prefix=prefix, upstream=ps["select"].upstream))
        kept = [rid[d["key"]] for sh in raw_shards(store) for d in read_decisions(store, prefix, sh) if d["selected"]]
        per = collections.Counter(k.split("-")[0] for k in kept)
        near = sum(1 for n in planted["near_duplicate"] if n in kept and n.rsplit("-", 1)[0] + "-full" in kept)
        extra = sum(max(0, len({f"{p}-{v}" for v in ("full", "chat", "small", "near", "dup")} & set(kept)) - 1)
                    for p in per)
        print(json.dumps({"selection": name, "kept": len(kept), "photos_covered": len(per),
                          "max_per_photo": per.most_common(1)[0][1], "same_image_extras": extra,
                          "near_duplicate_beside_original": near}))


if __name__ == "__main__":
    main()
