"""A unit's working directory (the layout in :mod:`libcurate.train.contract`): stage its data for the
trainer, fetch an ``s3://`` eval set, copy what the trainer wrote back to the store."""

from __future__ import annotations

import json
import os

import numpy as np

from ..formats.export import write_cc_sbu_align, write_llava, write_webdataset
from ..shards import iter_samples
from ..stage import PermanentInputError, StageContext
from ..storage import LocalStore, Store, open_store, options_for_url, read_url
from . import contract as C
from .units import UnitPlan


def prepare(ctx: StageContext, plan: UnitPlan, unit: str, rows: np.ndarray, keys: list[str], workdir: str,
            formats: tuple, trainer: dict) -> None:
    """Write ``unit``'s ``data/`` (its samples in ``formats``, keys.txt, features) and unit.json."""
    data = os.path.join(workdir, C.DATA_DIR)
    with open(os.path.join(data, C.KEYS_FILE), "w", encoding="utf-8") as f:
        f.write("".join(k + "\n" for k in keys))
    if plan.features is not None:
        C.write_features(data, plan.features[rows], plan.names, plan.dims)
    local = LocalStore(workdir)
    info: dict = {"unit": unit, "signature": plan.signatures[unit], "samples": len(keys),
                  "trainer": trainer, "formats": {}}
    for fmt in formats:
        samples = unit_samples(ctx, plan, rows)
        if fmt == "llava":
            info["formats"][fmt] = write_llava(samples, local, f"{C.DATA_DIR}/llava")
        elif fmt == "cc_sbu_align":
            n, skipped = write_cc_sbu_align(samples, local, f"{C.DATA_DIR}/cc_sbu_align")
            info["formats"][fmt] = n
            info["cc_sbu_align_skipped"] = [{"key": k, "reason": r} for k, r in skipped]
        else:
            info["formats"][fmt] = write_webdataset(samples, local, f"{C.DATA_DIR}/webdataset")
    with open(os.path.join(workdir, C.UNIT_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True, default=str)

def unit_samples(ctx: StageContext, plan: UnitPlan, rows: np.ndarray):
    """The unit's samples with their images, in raw order; only shards holding some are read."""
    offsets, shards, keys = plan.layout["shard_offsets"], plan.layout["shards"], plan.layout["keys"]
    for i, shard in enumerate(shards):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        mine = rows[(rows >= lo) & (rows < hi)]
        if not len(mine):
            continue
        want = {k.decode() for k in keys[mine]}
        found = 0
        for s in iter_samples(ctx.store, f"{ctx.raw_prefix}/{shard}"):
            if s.key in want:
                found += 1
                yield s
        if found != len(want):
            raise PermanentInputError(f"{shard}: {len(want) - found} of the unit's keys are not in the raw shard")

def local_eval(ev: str | None, workdir: str) -> str:
    """The eval set as a local path: as given, or downloaded (JSON + its images) from s3://."""
    if not ev:
        return ""
    if not ev.startswith("s3://"):
        return ev
    base, name = ev.rsplit("/", 1)
    dst = os.path.join(workdir, "eval")
    os.makedirs(dst, exist_ok=True)
    text = read_url(ev)
    with open(os.path.join(dst, name), "wb") as f:
        f.write(text)
    src = open_store(base, options_for_url(ev))   # the endpoint registered for that bucket
    for rec in json.loads(text):
        imgs = rec.get("image") or []
        for img in [imgs] if isinstance(imgs, str) else imgs:
            path = os.path.join(dst, *img.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(src.read_bytes(img))
    return os.path.join(dst, name)

def upload(store: Store, workdir: str, rel: str, with_results: bool) -> None:
    """Copy what the trainer wrote (not the staged data, not the eval copy) to the store; result
    files only once they were checked."""
    results = {C.RESULT_FILE, C.OUTPUTS_FILE}
    for root, dirs, files in os.walk(workdir):
        r = os.path.relpath(root, workdir)
        if r == ".":
            dirs[:] = [d for d in dirs if d not in (C.DATA_DIR, "eval")]
        for name in files:
            path = os.path.normpath(os.path.join(r, name)).replace(os.sep, "/")
            if (path in results) != with_results:
                continue
            with open(os.path.join(root, name), "rb") as f:
                store.write_bytes(f"{rel}/{path}", f.read())
