"""Benchmark: the real judge_score stage over raw shards against the fake OpenAI server with added latency.

The fake server (aiohttp) runs in its own process so that client and server do not share one core's
event loop. The stage runs with the response cache ON (every reply is written to the temp store, as in
production) on fresh prompts, so every sample is a real HTTP request.

    .venv/bin/python bench/llm_judge.py --samples 2000 --concurrency 64 --latency 0.2 --json

The last line with ``--json`` is ``{"requests_per_s": ..., "concurrency": ..., ...}``.
``--concurrency 1`` measures a sequential client for comparison.
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
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from libcurate.llm.judge import JudgeScoreConfig, JudgeScoreStage  # noqa: E402
from libcurate.llm.testing import make_sample, write_raw_shards  # noqa: E402
from libcurate.stage import StageContext  # noqa: E402
from libcurate.storage import open_store  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-m", "libcurate.llm.testing", "--latency", str(latency)],
                         stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = p.stdout.readline()
    if not line.startswith("PORT "):
        p.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return p, int(line.split()[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from PIL import Image

    img = Image.new("RGB", (64, 64), (120, 80, 40))
    per = -(-args.samples // args.shards)
    proc, port = start_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = open_store(os.path.join(tmp, "run"))
            shards = [[make_sample(img, "Describe this image in detail.", f"caption number {i} " + "word " * (i % 30), i=i)
                       for i in range(s * per, min(args.samples, (s + 1) * per))] for s in range(args.shards)]
            write_raw_shards(store, shards)
            cfg = JudgeScoreConfig.from_dict({"llm": {
                "model": "bench-judge", "base_url": f"http://127.0.0.1:{port}/v1", "concurrency": args.concurrency,
                "timeout_s": 30, "max_attempts": 3}})
            stage = JudgeScoreStage(cfg)
            ctx = StageContext(store=store, prefix="stages/judge_score/bench")
            t0 = time.perf_counter()
            stats = [stage.process_shard(ctx, f"shard-{i:06d}.tar") for i in range(args.shards)]
            dt = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(5)
    sent = sum(s["llm"]["requests"] for s in stats)
    out = sum(s["out"] for s in stats)
    res = {"requests_per_s": round(sent / dt, 1), "concurrency": args.concurrency, "samples": args.samples,
           "requests": sent, "scored": out, "seconds": round(dt, 2), "latency_s": args.latency,
           "shards": args.shards, "ideal_requests_per_s": round(args.concurrency / args.latency, 1) if args.latency else None}
    if not args.json:
        print(f"{sent} requests in {dt:.2f} s = {sent / dt:.1f} req/s at concurrency {args.concurrency} "
              f"(latency {args.latency}s; ideal {res['ideal_requests_per_s']}); {out} samples scored")
    print(json.dumps(res))
    return 0 if out == args.samples else 1


if __name__ == "__main__":
    sys.exit(main())
