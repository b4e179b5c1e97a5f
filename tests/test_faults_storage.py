"""Storage under faults (issue 11): file modes, the recipe's S3 options on every read, GET bodies cut
partway through, credentials kept out of rendered ConfigMaps, and the demo recipe on S3 behind a proxy
that injects 500s, 503 SlowDown, connection resets, cut bodies and delays (tests/s3_fault_proxy.py).

The demo runs compare every object byte for byte with a clean run at the same URL (the report names the
run's URL), ignoring only the wall-clock ``seconds`` in ``_stats``. The short form (one seed, 1 fault in
20 requests, a one-copy demo) runs in ``make test``; the long form (more seeds and rates) runs with
``pytest -m faults tests/test_faults_storage.py`` and prints a JSON line per run (bench/FAULTS.md).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from libcurate.shards import ShardWriter, iter_members
from libcurate.stage import PermanentInputError
from libcurate.storage import S3Options, open_store, s3_client

from .s3_fault_proxy import KINDS, S3FaultProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURATE = [sys.executable, "-m", "libcurate.cli"]
DEMO_RECIPE = os.path.join(ROOT, "recipes", "demo.yaml")


# -- helpers shared with test_faults_kill.py ---------------------------------------------------------
def long_faults(request) -> None:
    """Skip a long fault run unless asked for: ``-m faults`` or ``CURATE_FAULTS=1``."""
    if "faults" not in (request.config.getoption("markexpr") or "") and not os.environ.get("CURATE_FAULTS"):
        pytest.skip("long fault run: pytest -m faults (or CURATE_FAULTS=1)")


def demo_recipe(path, src: str, prefix: str, options: dict | None = None, workers: int = 1) -> str:
    """recipes/demo.yaml (whatever stages it has now) on ``src`` (libcurate.demo.build) at ``prefix``."""
    with open(DEMO_RECIPE, encoding="utf-8") as f:
        r = yaml.safe_load(f)
    r["storage"] = {"prefix": prefix, **({"options": options} if options else {})}
    r["workers"] = workers
    ingest = r["stages"][0]["with"]
    ingest["annotations"], ingest["images"] = os.path.join(src, "data.json"), src
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(r, f, sort_keys=False)
    return str(path)


def _drop_seconds(obj):
    if isinstance(obj, dict):
        return {k: _drop_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_drop_seconds(v) for v in obj]
    return obj


def comparable(rel: str, data: bytes) -> bytes:
    """An object's bytes without the wall-clock timings in ``_stats`` (they differ run to run)."""
    if "/_stats/" in f"/{rel}" and rel.endswith(".json"):
        return json.dumps(_drop_seconds(json.loads(data)), sort_keys=True).encode()
    return data


def store_snapshot(store) -> dict[str, bytes]:
    return {rel: comparable(rel, store.read_bytes(rel)) for rel in store.list()}


def wipe(store) -> None:
    for rel in store.list():
        store.delete(rel)


def run_curate(args: list[str], env: dict | None = None, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(CURATE + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def first_diff(a: dict, b: dict) -> str:
    if a.keys() != b.keys():
        return f"objects only in the clean run: {sorted(a.keys() - b.keys())[:5]}; only in the other: " \
               f"{sorted(b.keys() - a.keys())[:5]}"
    bad = [k for k in a if a[k] != b[k]]
    return f"{len(bad)} object(s) differ, e.g. {bad[:5]}"


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory):
    from libcurate.demo import build

    out = tmp_path_factory.mktemp("faults-demo") / "source"
    build(str(out), copies=1)
    return str(out)


# -- 7. file modes ----------------------------------------------------------------------------------
def test_local_writes_honour_umask(tmp_path):
    """mkstemp's 0600 must not leak into outputs: under umask 022 every file is 0644 (a trainer running
    as another user reads the export); under umask 077 they stay private."""
    old = os.umask(0o022)
    try:
        store = open_store(str(tmp_path / "run"))
        store.write_text("stages/x/_stats/shard-000000.json", "{}")
        with ShardWriter(store, "export/webdataset/shard-000000.tar") as w:
            w.write("k0", {"json": b"{}"})
        with store.open_write("export/llava/data.json") as f:
            f.write(b"[]")
        for rel in store.list():
            assert stat.S_IMODE(os.stat(store.uri(rel)).st_mode) == 0o644, rel
        os.umask(0o077)
        store.write_text("private.txt", "x")
        assert stat.S_IMODE(os.stat(store.uri("private.txt")).st_mode) == 0o600
    finally:
        os.umask(old)


def test_clean_partial_removes_the_temp_file_of_a_killed_writer_not_yet_reaped(tmp_path):
    """A pool worker SIGKILLed with its runner stays a zombie until init reaps it, and a zombie answers
    kill(pid, 0): its temp file must still count as a leftover (the kill trials found such files beside
    the re-run's shards)."""
    from libcurate.storage import _proc_state

    store = open_store(str(tmp_path / "run"))
    pid = os.fork()
    if pid == 0:  # the writer: killed in the middle of an atomic write
        try:
            with store.open_write("stages/x/shard-000000.tar") as f:
                f.write(b"partial")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    try:
        deadline = time.time() + 20
        while time.time() < deadline and _proc_state(pid)[0] != "Z":
            time.sleep(0.01)
        assert _proc_state(pid)[0] == "Z"  # dead, not reaped yet
        [left] = os.listdir(tmp_path / "run" / "stages" / "x")
        assert ".tmp-" in left and store.list("stages/x") == []
        assert store.clean_partial("stages/x") == 1
        assert os.listdir(tmp_path / "run" / "stages" / "x") == []
    finally:
        os.waitpid(pid, 0)


def test_clean_partial_spares_live_writers_but_not_a_reused_pid(tmp_path):
    store = open_store(str(tmp_path / "run"))
    d = tmp_path / "run" / "stages" / "x"
    d.mkdir(parents=True)
    p = subprocess.Popen(["sleep", "60"])
    try:
        stale = d / f"shard-000000.tar.tmp-{p.pid}-abc123"  # written an hour before this pid started
        stale.write_bytes(b"old")
        os.utime(stale, (time.time() - 3600, time.time() - 3600))
        live = d / f"shard-000001.tar.tmp-{p.pid}-def456"
        live.write_bytes(b"being written")
        assert store.clean_partial("stages/x") == 1
        assert not stale.exists() and live.exists()
    finally:
        p.kill()
        p.wait()


# -- 8. the recipe's S3 options on every read -------------------------------------------------------------
def test_endpoint_only_in_recipe_options_is_used_for_tar_reads_audit_and_export(s3_endpoint, tmp_path, demo_src):
    """The moto endpoint is given ONLY in the recipe's storage.options: every tar read (score_clip,
    export), ``curate audit --recipe`` and ``curate export --recipe`` must use it, never AWS."""
    bucket = f"opt-{uuid.uuid4().hex[:10]}"
    s3_client(S3Options(endpoint_url=s3_endpoint)).create_bucket(Bucket=bucket)
    # Nothing can reach AWS here: a read that ignores the options fails (after botocore's retries).
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    env["HF_HUB_OFFLINE"] = "1"
    prefix = f"s3://{bucket}/run"
    recipe = demo_recipe(tmp_path / "r.yaml", demo_src, prefix, {"endpoint_url": s3_endpoint})
    kw = dict(cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    p = subprocess.run(CURATE + ["run", recipe, "--no-progress"], **kw)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run(CURATE + ["audit", prefix, "--recipe", recipe, "--json"], **kw)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["ok"]
    p = subprocess.run(CURATE + ["export", "--prefix", prefix, "--out", f"s3://{bucket}/out", "--recipe", recipe,
                                 "--formats", "webdataset"], **kw)
    assert p.returncode == 0, p.stderr[-3000:]
    out = open_store(f"s3://{bucket}/out", {"endpoint_url": s3_endpoint})
    tars = [r for r in out.list() if r.endswith(".tar")]
    assert tars and sum(1 for _ in iter_members(out.uri(tars[0]))) > 0


def test_store_options_are_registered_for_urls_inside_it(s3_endpoint, monkeypatch):
    bucket = f"reg-{uuid.uuid4().hex[:10]}"
    s3_client(S3Options(endpoint_url=s3_endpoint)).create_bucket(Bucket=bucket)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    store = open_store(f"s3://{bucket}/run", {"endpoint_url": s3_endpoint})
    with ShardWriter(store, "raw/shard-000000.tar") as w:
        w.write("k0", {"json": b"{}"})
    assert [m["__key__"] for m in iter_members(store.uri("raw/shard-000000.tar"))] == ["k0"]
    assert open_store(f"s3://{bucket}/run/raw").options.endpoint_url == s3_endpoint
    assert open_store(f"s3://{bucket}-other/run").options.endpoint_url is None


# -- 9. a GET body cut partway through --------------------------------------------------------------
@pytest.fixture
def proxied(s3_endpoint):
    """(proxy, store on a fresh bucket through the proxy, the same store direct)."""
    bucket = f"cut-{uuid.uuid4().hex[:10]}"
    s3_client(S3Options(endpoint_url=s3_endpoint)).create_bucket(Bucket=bucket)
    with S3FaultProxy(s3_endpoint, rate=0.0, seed=7) as proxy:
        yield (proxy, open_store(f"s3://{bucket}/run", {"endpoint_url": proxy.url}),
               open_store(f"s3://{bucket}/run", S3Options(endpoint_url=s3_endpoint)))


def test_get_body_cut_partway_is_resumed_with_a_range(proxied, monkeypatch):
    import libcurate.storage as storage

    monkeypatch.setattr(storage, "BACKOFF_BASE_S", 0.001)
    monkeypatch.setattr(storage, "BACKOFF_MAX_S", 0.01)
    proxy, store, direct = proxied
    data = os.urandom(3 << 20)
    direct.write_bytes("big.bin", data)
    with ShardWriter(direct, "raw/shard-000000.tar") as w:
        for i in range(40):
            w.write(f"k{i}", {"json": b"{}", "bin": os.urandom(50_000)})
    expected = [(m["__key__"], m["bin"]) for m in iter_members(direct.uri("raw/shard-000000.tar"))]
    proxy.kinds, proxy.rate = ("cut_body",), 0.5  # half of all GETs, re-issued ones included, are cut
    for _ in range(4):
        assert store.read_bytes("big.bin") == data
        assert [(m["__key__"], m["bin"]) for m in iter_members(store.uri("raw/shard-000000.tar"))] == expected
    assert proxy.counts["cut_body"] >= 4
    with store.open_read("big.bin") as f:
        head = f.read(1000)
        proxy.rate = 1.0
        with pytest.raises(Exception):  # bounded: every re-issued GET is cut too
            f.read()
    assert head == data[:1000]


def test_writes_lists_and_heads_survive_resets(proxied):
    """What botocore already absorbs (500, 503, resets on requests and replies), through the same proxy."""
    proxy, store, direct = proxied
    proxy.kinds, proxy.rate = ("error_500", "slowdown_503", "reset_request", "reset_response", "cut_body"), 0.3
    for i in range(6):
        store.write_bytes(f"w/{i}", b"x" * (i + 1))
        with store.open_write(f"u/{i}") as f:
            f.write(b"y" * 1000)
        assert store.exists(f"w/{i}")
    assert store.list("w") == sorted(str(i) for i in range(6))
    assert all(direct.read_bytes(f"w/{i}") == b"x" * (i + 1) for i in range(6))
    assert sum(proxy.counts.values()) >= 5


# -- 10. credentials never go into a ConfigMap --------------------------------------------------------
def test_render_refuses_credentials_in_the_recipe(tmp_path):
    from workflows.render import render

    r = {"name": "leak", "storage": {"prefix": "s3://bkt/run", "options": {
        "endpoint_url": "http://minio:9000", "access_key_id": "AKIAEXAMPLE", "secret_access_key": "hunter2"}},
         "stages": [{"stage": "ingest", "with": {"format": "llava", "annotations": "s3://bkt/a.json",
                                                  "images": "s3://bkt/img"}}]}
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(r))
    with pytest.raises(PermanentInputError, match="secret_access_key"):
        render(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    p = run_curate(["render", str(path), "--out", str(tmp_path / "out2")], timeout=120)
    assert p.returncode == 3 and "curate-s3" in p.stderr and "hunter2" not in p.stderr + p.stdout
    assert not (tmp_path / "out2").exists() or not os.listdir(tmp_path / "out2")
    # without the credentials it renders, and the endpoint (not a secret) stays in the ConfigMap
    del r["storage"]["options"]["access_key_id"], r["storage"]["options"]["secret_access_key"]
    path.write_text(yaml.safe_dump(r))
    assert render(str(path), str(tmp_path / "out3"))


# -- the demo recipe on S3 under injected faults ------------------------------------------------------
def demo_under_faults(s3_endpoint, tmp_path, demo_src, rates: list[float], seeds: list[int],
                      kinds=KINDS) -> list[dict]:
    """A clean run, then one run per (rate, seed) at the same URL through the proxy; each must finish
    (``curate run`` exit 0, audit ok) with every object identical to the clean run's."""
    bucket = f"demo-{uuid.uuid4().hex[:10]}"
    s3_client(S3Options(endpoint_url=s3_endpoint)).create_bucket(Bucket=bucket)
    prefix = f"s3://{bucket}/run"
    direct = open_store(prefix, S3Options(endpoint_url=s3_endpoint))
    t0 = time.monotonic()
    p = run_curate(["run", demo_recipe(tmp_path / "clean.yaml", demo_src, prefix, {"endpoint_url": s3_endpoint}),
                    "--no-progress"])
    assert p.returncode == 0, p.stderr[-3000:]
    clean_s = time.monotonic() - t0
    clean = store_snapshot(direct)
    assert any(r.startswith("export/") for r in clean)
    results = []
    for rate in rates:
        for seed in seeds:
            wipe(direct)
            with S3FaultProxy(s3_endpoint, rate=rate, kinds=kinds, seed=seed) as proxy:
                recipe = demo_recipe(tmp_path / f"f-{rate}-{seed}.yaml", demo_src, prefix, {"endpoint_url": proxy.url})
                t0 = time.monotonic()
                p = run_curate(["run", recipe, "--no-progress"])
                seconds = time.monotonic() - t0
                summary = proxy.summary()
            got = store_snapshot(direct)
            res = {"rate": rate, "seed": seed, "completed": p.returncode == 0, "identical": got == clean,
                   "objects": len(clean), "seconds": round(seconds, 1), "clean_seconds": round(clean_s, 1),
                   **summary}
            print("FAULTS " + json.dumps(res, sort_keys=True))
            results.append(res)
            assert p.returncode == 0, f"{res}\n{p.stderr[-3000:]}"
            assert got == clean, f"{res}: {first_diff(clean, got)}"
    return results


def test_demo_on_s3_survives_1_in_20_faults_byte_identical(s3_endpoint, tmp_path, demo_src):
    """Short form (make test): one seed at 1 fault in 20 requests, every fault kind."""
    [res] = demo_under_faults(s3_endpoint, tmp_path, demo_src, rates=[1 / 20], seeds=[1])
    assert res["faults"] >= 5 and len(res["by_kind"]) >= 4, res  # the run really was disturbed


@pytest.mark.slow
@pytest.mark.faults
def test_demo_on_s3_survives_faults_many_seeds(s3_endpoint, tmp_path, demo_src, request):
    """Long form: rates 1 in 50, 1 in 20 and 1 in 10, three seeds each."""
    long_faults(request)
    results = demo_under_faults(s3_endpoint, tmp_path, demo_src, rates=[1 / 50, 1 / 20, 1 / 10], seeds=[1, 2, 3])
    assert all(r["completed"] and r["identical"] for r in results)
