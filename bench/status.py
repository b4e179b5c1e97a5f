"""What ``curate status`` costs on S3 for a large run in progress, beside the plain alternative.

    .venv/bin/python bench/status.py --json                 # 2,000 shards x 3 stages on a moto S3 server
    .venv/bin/python bench/status.py --shards 500 --json

A run caught mid-way is written to a moto S3 server on loopback: ``raw`` complete (``--shards`` shards),
one per-shard stage complete, one half done, each done shard with its ``_stats`` and ``_quarantine``. Then:

* ``status_first_*``: :class:`libcurate.status.StatusReader` ``read()`` from cold (lists each stage's
  ``_done/`` once, reads each done shard's stats once);
* ``status_refresh_*``: a second ``read()`` of the same reader (a ``--watch`` refresh: listings only);
* ``audit_status_*``: the plain alternative, ``audit.status_lines`` (what ``curate status`` ran before:
  an audit reading every done shard's stats and quarantine file and listing the whole run).

Each figure: wall seconds and S3 requests by operation (counted with botocore's ``before-call`` event).
Loopback moto answers in about a millisecond; a real S3 round trip is 10-30 ms, so on S3 the request
counts are what the time scales with.
"""

from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import collections
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor


def build_run(store, shards: int) -> dict:
    """Markers, stats and quarantine of a run part-way: raw and ``score_a`` done, ``score_b`` half done."""
    stages = {"raw": shards, "stages/score_a/aaaa": shards, "stages/score_b/bbbb": shards // 2}
    store.write_text("raw/_ingest.json", json.dumps({"n_shards": shards, "n_records": shards * 100}))
    jobs = []
    for prefix, n in stages.items():
        for i in range(n):
            jobs.append((prefix, f"shard-{i:06d}"))

    def write(job):
        prefix, unit = job
        store.write_text(f"{prefix}/_stats/{unit}.json", json.dumps(
            {"in": 100, "out": 99 if prefix == "raw" else 100, "quarantined": 1 if prefix == "raw" else 0,
             "dropped": 0, "seconds": 12.5}))
        store.write_text(f"{prefix}/_quarantine/{unit}.jsonl",
                         json.dumps({"key": "k", "reason": "corrupt_image", "detail": ""}) + "\n" if prefix == "raw" else "")
        store.write_text(f"{prefix}/_done/{unit}", "")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, jobs))
    return stages


def measure(client, fn) -> tuple[float, dict, object]:
    calls: collections.Counter = collections.Counter()

    def count(model, **_):
        calls[model.name] += 1

    client.meta.events.register("before-call.s3", count)
    try:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    finally:
        client.meta.events.unregister("before-call.s3", count)
    return dt, dict(calls), out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_DEFAULT_REGION="us-east-1")
    from libcurate.audit import status_lines
    from libcurate.status import StageSpec, StatusReader
    from libcurate.storage import open_store, s3_client

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3_client().create_bucket(Bucket=bucket)
    store = open_store(f"s3://{bucket}/run")
    t0 = time.perf_counter()
    build_run(store, a.shards)
    build_s = time.perf_counter() - t0
    specs = [StageSpec("ingest", "raw", "ingest"), StageSpec("score_a", "stages/score_a/aaaa", "shard"),
             StageSpec("score_b", "stages/score_b/bbbb", "shard")]
    reader = StatusReader(store, specs)
    client = store.client
    first_s, first_calls, st = measure(client, reader.read)
    refresh_s, refresh_calls, _ = measure(client, reader.read)
    audit_s, audit_calls, _ = measure(client, lambda: status_lines(store))
    server.stop()
    done = [s["units_done"] for s in st["stages"]]
    assert done == [a.shards, a.shards, a.shards // 2], done
    res = {"shards": a.shards, "done_units": sum(done), "build_s": round(build_s, 1),
           "status_first_s": round(first_s, 2), "status_first_requests": first_calls,
           "status_refresh_s": round(refresh_s, 2), "status_refresh_requests": refresh_calls,
           "audit_status_s": round(audit_s, 2), "audit_status_requests": audit_calls,
           "requests_ratio_audit_over_refresh": round(sum(audit_calls.values()) / sum(refresh_calls.values()), 1),
           "time_ratio_audit_over_refresh": round(audit_s / refresh_s, 1)}
    if a.json:
        print(json.dumps(res, sort_keys=True))
    else:
        for k, v in res.items():
            print(f"{k:<36} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
