"""Benchmark the run report at scale: time, peak RSS and page size as the run grows, beside the plain
alternative for its biggest part (every score column gathered into memory, then ``np.histogram``).

    .venv/bin/python bench/report.py --json                       # 100k and 1M samples
    .venv/bin/python bench/report.py --samples 100000 --json      # one size
    .venv/bin/python bench/report.py --s3 20000 --latency-ms 15   # from S3 (moto, 15 ms a request): prefetch 8 vs 1

A synthetic run of N samples in shards of 10,000 (what the report reads, in curate's layout): raw shards
(tiny JPEGs, records, record index, column files, stats), a score stage (4 fields), a cluster stage (id,
distance, 64-d fp16 embeddings), a dedup stage (2% of samples in pairs) and the real ``select`` stage
over them (a threshold, near-duplicates, cluster quotas to a 10% budget). Each measurement runs in a child
process so its peak RSS (VmHWM) is its own:

* ``report_s`` / ``report_rss_mb`` / ``report_bytes``: :func:`libcurate.report.html.build_report` (the
  whole page: one streaming pass, plots, thumbnails, journeys);
* ``gather_hist_s`` / ``gather_hist_rss_mb``: the plain way to the same histograms: ``columns.gather``
  of the 7 score fields into memory for every sample, then ``np.histogram`` of each (40 bins).
"""

from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import io
import json
import subprocess
import tempfile
import time

import numpy as np

PER_SHARD = 10_000
FIELDS = ["score.a", "score.b", "score.c", "score.words", "cluster.distance", "dedup.similarity", "select.x"]


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 90, 40)).save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def make_run(root: str, n: int, seed: int = 0) -> None:
    """Write the synthetic run (see the module docstring) and select over it."""
    import hashlib

    from libcurate.columns import KEY_COL, columns_rel, embedding_rel, pack_arrays
    from libcurate.select.stage import SelectConfig, SelectStage
    from libcurate.shards import ShardWriter, npy_bytes
    from libcurate.stage import StageContext, done_rel, stats_rel
    from libcurate.storage import open_store

    store = open_store(root)
    rng = np.random.default_rng(seed)
    jpg = _jpeg()
    sha = hashlib.sha256(jpg).hexdigest()
    n_shards = (n + PER_SHARD - 1) // PER_SHARD
    centres = rng.normal(size=(32, 64)).astype(np.float32)
    for s in range(n_shards):
        unit = f"shard-{s:06d}"
        m = min(PER_SHARD, n - s * PER_SHARD)
        keys = np.array([f"{s:08x}{i:08x}{rng.integers(0, 2**32):08x}".encode() for i in range(m)], dtype="S24")
        recs = []
        with ShardWriter(store, f"raw/{unit}.tar") as w:
            for i, k in enumerate(keys.astype(str).tolist()):
                rec = {"conversations": [{"from": "human", "value": "<image>\nDescribe this image."},
                                         {"from": "gpt", "value": f"A synthetic sample number {s * PER_SHARD + i}."}],
                       "domain": None, "images": [{"format": "jpeg", "height": 16, "name": f"{k}.jpg",
                                                   "sha256": sha, "width": 16}],
                       "key": k, "metadata": {}, "schema": 1, "task": None, "type": None,
                       "source": {"dataset": "synth", "original_format": "llava", "original_id": f"id-{k}"}}
                line = json.dumps(rec, sort_keys=True).encode()
                recs.append(line)
                w.write(k, {"json": line, "img0.jpg": jpg})
        store.write_bytes(f"raw/_index/{unit}.jsonl", b"\n".join(recs) + b"\n")
        cl = rng.integers(0, 32, m)
        emb = centres[cl] + 0.3 * rng.normal(size=(m, 64)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        group = np.full(m, b"", dtype="S24")
        pairs = np.flatnonzero(rng.random(m - 1) < 0.01)
        group[pairs] = keys[pairs]
        group[pairs + 1] = keys[pairs]
        rank = np.where(group != b"", 0.0, np.nan)
        rank[pairs + 1] = 1.0
        layers = {"raw": {KEY_COL: keys, "s:content": keys, "s:source.original_id": np.char.add(b"id-", keys)},
                  "stages/score/1": {KEY_COL: keys, "f:a": rng.random(m), "f:b": rng.normal(size=m),
                                     "f:c": rng.beta(2, 5, m), "f:words": rng.integers(3, 60, m).astype(float)},
                  "stages/cluster/1": {KEY_COL: keys, "f:cluster": cl.astype(float), "f:distance": rng.random(m) / 3},
                  "stages/dedup/1": {KEY_COL: keys, "s:group": group, "f:group_rank": rank,
                                     "f:similarity": np.where(group != b"", 0.97, np.nan)}}
        for prefix, cols in layers.items():
            store.write_bytes(columns_rel(prefix, unit), pack_arrays(cols))
            store.write_text(stats_rel(prefix, unit), json.dumps({"in": m, "out": m, "quarantined": 0, "dropped": 0}))
            store.write_text(done_rel(prefix, unit), "")
        store.write_bytes(embedding_rel("stages/cluster/1", unit, "img_emb"), npy_bytes(emb.astype(np.float16)))
    store.write_text("raw/_ingest.json", json.dumps({"n_shards": n_shards}))
    cfg = SelectConfig.from_dict({"thresholds": {"score.a": {"min": 0.05}}, "score": "score.c",
                                  "budget": n // 10, "strategy": {"kind": "cluster_proportional",
                                                                  "cluster": "cluster.cluster"}})
    up = {"ingest": "raw", "score": "stages/score/1", "cluster": "stages/cluster/1", "dedup": "stages/dedup/1"}
    SelectStage(cfg).run_global(StageContext(store=store, prefix="select/select/1", upstream=up))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child_report(root: str) -> dict:
    from libcurate.report.html import build_report
    from libcurate.report.run import locate
    from libcurate.storage import open_store

    t0 = time.perf_counter()
    doc = build_report(locate(open_store(root)))
    return {"report_s": round(time.perf_counter() - t0, 1), "report_rss_mb": round(peak_rss_mb()),
            "report_bytes": len(doc.encode())}


def child_gather(root: str) -> dict:
    from libcurate.columns import gather
    from libcurate.report.run import locate
    from libcurate.storage import open_store

    t0 = time.perf_counter()
    view = locate(open_store(root))
    fields = ["score.a", "score.b", "score.c", "score.words", "cluster.distance", "dedup.similarity",
              "dedup.group_rank"]
    t = gather(view.context(), fields=fields)
    hists = {f: np.histogram(v[np.isfinite(v)], bins=40) for f, v in t.values.items()}
    assert len(hists) == len(fields)
    return {"gather_hist_s": round(time.perf_counter() - t0, 1), "gather_hist_rss_mb": round(peak_rss_mb())}


def child_report_s3(url: str, prefetch: int) -> dict:
    """``curate audit`` then the report, with ``prefetch`` reads in flight for both (the pass's shards
    ahead, the audit's marker reads); 1 is the plain one-request-at-a-time way."""
    from libcurate import audit
    from libcurate.report import collect
    from libcurate.report.html import build_report
    from libcurate.report.run import locate
    from libcurate.storage import open_store

    collect.PREFETCH_SHARDS = prefetch
    audit.READ_AHEAD = prefetch
    t0 = time.perf_counter()
    ok = audit.audit(open_store(url))["ok"]
    t1 = time.perf_counter()
    doc = build_report(locate(open_store(url)))
    return {f"s3_audit_prefetch{prefetch}_s": round(t1 - t0, 2), f"s3_audit_prefetch{prefetch}_ok": ok,
            f"s3_report_prefetch{prefetch}_s": round(time.perf_counter() - t1, 1), "s3_report_bytes": len(doc)}


def measure_s3(n: int, tmp: str, per_shard: int, latency_ms: float = 0.0) -> dict:
    """The same report read from S3 (a moto server in its own process on loopback), with the pass's
    files read 8 shards ahead and the audit's markers 8 at a time on threads (the default), and both one
    at a time (the plain way)."""
    import shutil
    import socket

    global PER_SHARD
    PER_SHARD = per_shard
    root = os.path.join(tmp, f"s3run{n}")
    make_run(root, n)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable),
                                                                            "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        import boto3

        for _ in range(100):
            try:
                s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="x",
                                  aws_secret_access_key="x", region_name="us-east-1")
                s3.create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for p in files:
            s3.upload_file(p, "bench", "run/" + os.path.relpath(p, root))
        out = {"samples": n, "shards": (n + per_shard - 1) // per_shard, "objects": len(files),
               "latency_ms": latency_ms}
        from tests.s3_fault_proxy import S3FaultProxy

        # every request held latency_ms on its way to the server: S3's per-request latency, which a local
        # server does not have (0: straight to the server)
        with S3FaultProxy(env["AWS_ENDPOINT_URL"], rate=1.0 if latency_ms else 0.0, kinds=("delay",),
                          delay_s=(latency_ms / 1000, latency_ms / 1000)) as proxy:
            for prefetch in (8, 1):
                r = subprocess.run([sys.executable, __file__, "--child-s3", "s3://bench/run", str(prefetch)],
                                   capture_output=True, text=True, env=dict(env, AWS_ENDPOINT_URL=proxy.url))
                if r.returncode:
                    raise RuntimeError(r.stderr[-3000:])
                out.update(json.loads(r.stdout.strip().splitlines()[-1]))
            out["s3_requests"] = sum(proxy.requests.values()) // 2
        return out
    finally:
        server.terminate()
        server.wait()


def measure(n: int, tmp: str) -> dict:
    root = os.path.join(tmp, f"run{n}")
    t0 = time.perf_counter()
    make_run(root, n)
    out = {"samples": n, "make_run_s": round(time.perf_counter() - t0, 1)}
    for what in ("report", "gather"):
        r = subprocess.run([sys.executable, __file__, f"--child-{what}", root], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        out.update(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--json", action="store_true")
    p.add_argument("--child-report")
    p.add_argument("--child-gather")
    p.add_argument("--child-s3", nargs=2)
    p.add_argument("--latency-ms", type=float, default=0.0, help="--s3: hold every request this long")
    p.add_argument("--s3", type=int, metavar="N", help="instead: the report of N samples in shards of 1,000 read "
                                                       "from a moto S3 server, prefetching 8 shards vs 1")
    a = p.parse_args()
    if a.child_s3:
        print(json.dumps(child_report_s3(a.child_s3[0], int(a.child_s3[1]))))
        return
    if a.s3:
        with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
            print(json.dumps(measure_s3(a.s3, tmp, 1000, a.latency_ms)))
        return
    if a.child_report:
        print(json.dumps(child_report(a.child_report)))
        return
    if a.child_gather:
        print(json.dumps(child_gather(a.child_gather)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        rows = []
        for n in a.samples:
            rows.append(measure(n, tmp))
            if not a.json:
                print(rows[-1], flush=True)
    if a.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
