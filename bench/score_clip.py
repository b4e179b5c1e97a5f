"""Benchmark score_clip: end-to-end stage throughput vs the bare model forward, same model and batch.

Makes real-photo JPEG shards (scikit-image photos, random crops/resizes 256-640 px, quality 90) in a
temp dir, runs the ``score_clip`` stage over them (read tar -> decode -> preprocess -> tokenise ->
image+text forward -> sidecar with fp16 embeddings), then times the bare ``encode_image`` +
``encode_text`` forward of the same model on pre-decoded, pre-tokenised tensors at the same batch size.

    .venv/bin/python bench/score_clip.py --model test-tiny-clip --samples 2000 --json
    .venv/bin/python bench/score_clip.py --model test-random-vit-b-32 --samples 256 --json

The last line with ``--json`` is ``{"end_to_end_sps": ..., "bare_forward_sps": ..., "ratio": ...}``.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# Run as `python bench/<name>.py`, this directory comes first on the import path, where bench/select.py
# would shadow the standard library's `select` (imported by subprocess): put the repository root there.
_sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_shards(store, n: int, per_shard: int, seed: int = 0) -> list[str]:
    from PIL import Image
    from skimage import data

    from libcurate.records import ImageRef, Sample, Source, Turn, make_key
    from libcurate.shards import ShardWriter

    rng = np.random.default_rng(seed)
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "motorcycle_left", "hubble_deep_field"]
    photos = []
    for nm in names:
        try:
            photos.append((nm, Image.fromarray(getattr(data, nm)()).convert("RGB")))
        except Exception:  # a photo missing from this scikit-image version
            continue
    shards = []
    for si in range(0, n, per_shard):
        name = f"shard-{si // per_shard:06d}.tar"
        with ShardWriter(store, f"raw/{name}") as w:
            for i in range(si, min(n, si + per_shard)):
                nm, img = photos[i % len(photos)]
                W, H = img.size
                cw, ch = int(W * rng.uniform(0.6, 1.0)), int(H * rng.uniform(0.6, 1.0))
                x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
                side = int(rng.integers(256, 641))
                scale = side / max(cw, ch)
                crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((max(32, int(cw * scale)), max(32, int(ch * scale))))
                buf = io.BytesIO()
                crop.save(buf, format="JPEG", quality=90)
                b = buf.getvalue()
                ref = ImageRef("jpeg", hashlib.sha256(b).hexdigest(), crop.width, crop.height, f"{nm}-{i}", b)
                conv = [Turn("human", "<image>\nDescribe this image in detail."),
                        Turn("gpt", f"A photo of {nm.replace('_', ' ')}, variant {i}. It was cropped and resized.")]
                sample = Sample(make_key([ref.sha256], conv), [ref], conv, Source("bench", str(i), "llava"))
                # a `txt` member (the caption) beside curate's own members, so that the plain loop and
                # clip-retrieval (bench/peers.py) read the very same shards; curate ignores it
                members = {"json": sample.to_json(), "txt": conv[1].value.encode()}
                members.update({suffix: im.data for suffix, im in zip(sample.member_names(), sample.images)})
                w.write(sample.key, members)
        shards.append(name)
    return shards


def bare_forward(bundle, batch_size: int, n_batches: int, device: str, precision: str, threads: int) -> float:
    """Images/s of encode_image + encode_text on ready tensors, at torch's default thread count (the
    best the bare model does here), whatever threads the stage was given."""
    from libcurate.scoring.common import autocast

    torch.set_num_threads(threads)
    h, w = bundle.image_size
    x = torch.rand(batch_size, 3, h, w, device=device)
    t = bundle.tokenizer(["A photo of a cat, variant 1. It was cropped and resized."] * batch_size).to(device)
    model = bundle.model
    with torch.inference_mode(), autocast(device, precision):
        model.encode_image(x), model.encode_text(t)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            model.encode_image(x), model.encode_text(t)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return batch_size * n_batches / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="test-tiny-clip")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers (decode + tokenise); -1 = auto (measured)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0 = auto)")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--decode", default="pil", choices=["pil", "pil_box", "pil_draft", "torchvision"])
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    from libcurate.models.clip import load_clip
    from libcurate.scoring.clip import ClipConfig, ClipStage
    from libcurate.stage import StageContext
    from libcurate.storage import open_store

    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(tmp)
        t0 = time.perf_counter()
        shards = make_shards(store, a.samples, a.per_shard)
        made = time.perf_counter() - t0
        bundle = load_clip(a.model, None, a.device)  # load outside the timed region, as bare does
        cfg = ClipConfig.from_dict({"model": a.model, "device": a.device, "batch_size": a.batch_size,
                                    "loader_workers": a.workers, "decode": a.decode, "precision": a.precision,
                                    "torch_threads": a.threads})
        # warm-up on a small separate shard (allocator, first-call paths); not timed
        warm = open_store(os.path.join(tmp, "warm"))
        warm_shards = make_shards(warm, min(a.batch_size, a.samples), a.per_shard, seed=1)
        ClipStage(cfg).process_shards(StageContext(store=warm, prefix="warm", workers=max(1, a.workers)), warm_shards)
        n_batches = max(2, min(30, a.samples // a.batch_size // 2))
        # The bare forward is timed before and after the stage and averaged: the machine is shared, so
        # this halves the effect of load drifting during the run.
        bare0 = bare_forward(bundle, a.batch_size, n_batches, a.device, a.precision, default_threads)
        t0 = time.perf_counter()
        stage = ClipStage(cfg)
        stats = stage.process_shards(StageContext(store=store, prefix="stages/score_clip/bench",
                                                  workers=max(1, a.workers)), shards)
        e2e = sum(s["out"] for s in stats) / (time.perf_counter() - t0)
        assert sum(s["in"] for s in stats) == a.samples
        bare1 = bare_forward(bundle, a.batch_size, n_batches, a.device, a.precision, default_threads)
        bare = (bare0 + bare1) / 2
    res = {"end_to_end_sps": round(e2e, 2), "bare_forward_sps": round(bare, 2), "ratio": round(e2e / bare, 3),
           "split": stage.split.as_dict()}
    if not a.json:
        print(f"model={a.model} device={a.device} batch={a.batch_size} workers={a.workers} decode={a.decode} "
              f"stage_threads={a.threads or 'auto'} bare_threads={default_threads} samples={a.samples} shards={len(shards)} (made in {made:.1f}s) "
              f"bare before/after: {bare0:.1f}/{bare1:.1f} sps; load avg {os.getloadavg()[0]:.2f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
