"""Ingest throughput (local disk vs S3 on a moto server) and a stage's peak memory vs shard count.

    python bench/ingest.py [--samples 5000] [--workers 2] [--json]
    python bench/ingest.py --annotations-gb 1 [--run-shards 2] [--json]

Three measurements, in one run so they can be compared as ratios:
1. ``ingest`` of small real-photo JPEG samples (LLaVA format, 96-160 px crops of scikit-image photos)
   to a local directory: samples/s.
2. The same ingest writing its shards to S3 on a moto server on loopback: samples/s and the ratio
   local / S3 (goal: S3 within 2x of local).
3. Peak RSS of one ``score_length`` job process over 10 and over 100 shards of the same size (goal: equal
   within 10%: a stage streams, its memory does not grow with the number of shards).
With ``--json`` the last line is one JSON object with every number.

``--annotations-gb X`` measures instead what a LLaVA-665K-sized annotations file costs: it synthesises a
LLaVA JSON list of about X GB (long multi-turn conversations, a few tiny shared images), then one fresh
process runs ingest's list-step work on it (streamed parse, layout with byte sizes, ``raw/_ingest.json``)
and ``--run-shards`` shards, and reports its peak RSS as ``ingest_<X>gb_peak_rss_mb`` (the list step's
alone as ``ingest_<X>gb_list_step_peak_rss_mb``; writing shards imports webdataset, whose imports
weigh a few hundred MB), with the parse time and record count. ``--compare-whole-parse`` also measures ``json.loads`` of the whole file (what
ingest did before it streamed) in another fresh process.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# Run as `python bench/<name>.py`, this directory comes first on the import path, where bench/select.py
# would shadow the standard library's `select` (imported by subprocess): put the repository root there.
_sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_dataset(root: str, n: int) -> str:
    import io

    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(getattr(data, k)()).convert("RGB") for k in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    records = []
    for i in range(n):
        p = photos[i % len(photos)]
        s = int(rng.integers(96, 161))
        x, y = int(rng.integers(0, p.width - s)), int(rng.integers(0, p.height - s))
        buf = io.BytesIO()
        p.crop((x, y, x + s, y + s)).save(buf, format="JPEG", quality=85)
        with open(os.path.join(root, "images", f"{i}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        records.append({"id": str(i), "image": f"images/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image in detail."},
            {"from": "gpt", "value": f"A crop of a photo, number {i}, showing part of the scene."}]})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def run_ingest(prefix: str, ann: str, images: str, workers: int, shard_size: int) -> float:
    from libcurate.pipeline import load_recipe
    from libcurate.runner import run_recipe

    recipe = load_recipe({"storage": {"prefix": prefix}, "workers": workers, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": ann, "images": images,
                                     "shard_size": shard_size}}]})
    t0 = time.perf_counter()
    run_recipe(recipe, progress=False)
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(recipe_path: str) -> float:
    """Peak RSS of one job process (a fresh interpreter, so nothing else is counted)."""
    code = ("import resource, subprocess, sys; "
            "subprocess.run([sys.executable, '-m', 'jobs', 'score_length', '--recipe', sys.argv[1]], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, recipe_path], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def memory_case(tmp: str, n_shards: int, shard_size: int, src_ann: str, src_images: str) -> float:
    prefix = os.path.join(tmp, f"mem{n_shards}")
    # ingest n_shards * shard_size records (the first ones of the source)
    records = json.load(open(src_ann))
    need = n_shards * shard_size
    ann = os.path.join(tmp, f"mem{n_shards}.json")
    json.dump([dict(r, id=f"{k}-{r['id']}") for k in range(-(-need // len(records))) for r in records][:need],
              open(ann, "w"))
    recipe = {"storage": {"prefix": prefix}, "workers": 1, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": ann, "images": src_images,
                                     "shard_size": shard_size}},
        {"stage": "score_length", "with": {"tokenizer": "whitespace"}}]}
    path = os.path.join(tmp, f"mem{n_shards}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    subprocess.run([sys.executable, "-m", "jobs", "ingest", "--recipe", path, "--workers", "2"], cwd=ROOT, check=True,
                   capture_output=True)
    return peak_rss_mb(path)


def make_big_annotations(root: str, gb: float) -> tuple[str, int]:
    """A LLaVA JSON list of about ``gb`` GB naming 8 tiny shared JPEGs, written record by record."""
    import io

    from PIL import Image

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (30 * i, 255 - 30 * i, 100)).save(buf, format="JPEG", quality=80)
        with open(os.path.join(root, "images", f"{i}.jpg"), "wb") as f:
            f.write(buf.getvalue())
    path = os.path.join(root, "data.json")
    target, n = int(gb * 1e9), 0
    words = ("the", "image", "shows", "a", "person", "standing", "next", "to", "red", "bus", "on", "street",
             "while", "two", "dogs", "play", "in", "park", "near", "tall", "building", "with", "many", "windows")
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        written = 1
        while written < target:
            turns = []
            for t in range(4):  # LLaVA-Instruct-style: 4 rounds, long answers
                q = " ".join(words[(n + t + j) % len(words)] for j in range(12)) + "?"
                a = " ".join(words[(n * 7 + t + j * 3) % len(words)] for j in range(60)) + "."
                turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
            rec = json.dumps({"id": f"{n:012d}", "image": f"images/{n % 8}.jpg", "conversations": turns},
                             ensure_ascii=False)
            f.write(("," if n else "") + "\n" + rec)
            written += len(rec) + 2
            n += 1
        f.write("\n]\n")
    return path, n


_BIG_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from libcurate.ingest import IngestConfig, IngestStage
from libcurate.stage import StageContext
from libcurate.storage import open_store
ann, images, prefix, n_shards = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
stage = IngestStage(IngestConfig(format="llava", annotations=ann, images=images, shard_size=1000))
ctx = StageContext(store=open_store(prefix), prefix="raw")
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
stage.prepare(ctx)                 # streamed parse, layout (byte sizes from the image files), manifest
t1 = time.perf_counter()
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shards = stage.units(ctx)
for s in shards[:n_shards]:
    stage.process_shard(ctx, s)
t2 = time.perf_counter()
print(json.dumps({"records": len(stage.records()), "shards": len(shards), "parse_layout_s": round(t1 - t0, 1),
                  "shards_run": min(n_shards, len(shards)), "shards_s": round(t2 - t1, 1),
                  "rss_after_imports_kb": rss0, "rss_after_parse_kb": rss1,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

_WHOLE_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    obj = json.loads(f.read().decode("utf-8"))
print(json.dumps({"records": len(obj), "seconds": round(time.perf_counter() - t0, 1),
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def big_annotations(tmp: str, gb: float, run_shards: int, compare: bool) -> dict:
    src = os.path.join(tmp, "big")
    t0 = time.perf_counter()
    ann, n = make_big_annotations(src, gb)
    size = os.path.getsize(ann)
    out = {"annotations_gb": round(size / 1e9, 3), "annotations_records": n,
           "synthesis_s": round(time.perf_counter() - t0, 1)}
    proc = subprocess.run([sys.executable, "-c", _BIG_CHILD, ROOT, ann, src, os.path.join(tmp, "bigrun"),
                           str(run_shards)], capture_output=True, text=True, check=True)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    label = f"{gb:g}".replace(".", "_")
    out.update({f"ingest_{label}gb_peak_rss_mb": round(child["maxrss_kb"] / 1024, 1),
                f"ingest_{label}gb_list_step_peak_rss_mb": round(child["rss_after_parse_kb"] / 1024, 1),
                "ingest_rss_after_imports_mb": round(child["rss_after_imports_kb"] / 1024, 1),
                "ingest_parse_layout_s": child["parse_layout_s"], "ingest_records": child["records"],
                "ingest_shards": child["shards"], "ingest_shards_run": child["shards_run"],
                "ingest_shards_s": child["shards_s"]})
    if compare:
        proc = subprocess.run([sys.executable, "-c", _WHOLE_CHILD, ann], capture_output=True, text=True, check=True)
        whole = json.loads(proc.stdout.strip().splitlines()[-1])
        out.update({f"whole_json_loads_{label}gb_peak_rss_mb": round(whole["maxrss_kb"] / 1024, 1),
                    "whole_json_loads_s": whole["seconds"]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--annotations-gb", type=float, default=0.0,
                    help="only measure ingest's peak RSS on a synthetic LLaVA JSON of this many GB")
    ap.add_argument("--run-shards", type=int, default=2, help="with --annotations-gb: shards to ingest after the parse")
    ap.add_argument("--compare-whole-parse", action="store_true",
                    help="with --annotations-gb: also measure json.loads of the whole file (the old way)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="curate-bench-")
    result: dict = {"cpus": os.cpu_count()}
    if args.annotations_gb > 0:
        try:
            result.update(big_annotations(tmp, args.annotations_gb, args.run_shards, args.compare_whole_parse))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not args.json:
            for k, v in result.items():
                print(f"{k:>36}: {v}")
        print(json.dumps(result))
        return 0
    result.update(samples=args.samples, workers=args.workers)
    try:
        src = os.path.join(tmp, "src")
        ann = make_dataset(src, args.samples)
        t_local = run_ingest(os.path.join(tmp, "local"), ann, src, args.workers, args.shard_size)
        result["local_sps"] = round(args.samples / t_local, 1)

        port = free_port()
        server = subprocess.Popen(["moto_server" if shutil.which("moto_server") else
                                   os.path.join(os.path.dirname(sys.executable), "moto_server"),
                                   "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                              AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
            from libcurate.storage import s3_client

            for _ in range(100):
                try:
                    s3_client().create_bucket(Bucket="bench")
                    break
                except Exception:
                    time.sleep(0.1)
            t_s3 = run_ingest("s3://bench/run", ann, src, args.workers, args.shard_size)
        finally:
            server.terminate()
            server.wait()
        result["s3_sps"] = round(args.samples / t_s3, 1)
        result["s3_vs_local_slowdown"] = round(t_s3 / t_local, 2)

        for k in ("AWS_ENDPOINT_URL",):
            os.environ.pop(k, None)
        m10 = memory_case(tmp, 10, 50, ann, src)
        m100 = memory_case(tmp, 100, 50, ann, src)
        result.update(peak_rss_mb_10_shards=round(m10, 1), peak_rss_mb_100_shards=round(m100, 1),
                      peak_rss_ratio=round(m100 / m10, 3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.json:
        for k, v in result.items():
            print(f"{k:>26}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
