"""Container proof: the CPU stage image, built with images/build.sh (buildah without a Docker daemon),
runs ``python -m jobs score_length`` as Argo would (non-root, read-only root fs, no capabilities,
writable /tmp, recipe mounted read-only at /etc/curate) against a moto S3 server on loopback, and writes
byte-identical output to the same job run in-process.

Needs root and ``apt-get install -y buildah podman debootstrap runc``; first build ~3 min (base rootfs
cached in ~/.cache/curate-images), then ~30 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.container, pytest.mark.slow]


def _engine_ok() -> str | None:
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return None
    missing = [t for t in ("buildah", "podman") if not shutil.which(t)]
    if missing:
        return f"no docker daemon and {', '.join(missing)} missing (apt-get install -y buildah podman debootstrap)"
    if os.geteuid() != 0:
        return "buildah --isolation chroot builds need root here"
    return None


@pytest.fixture(scope="module")
def cpu_image():
    reason = _engine_ok()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    r = subprocess.run([str(ROOT / "images" / "build.sh"), "cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("built ") and "curate-cpu" in ln)
    print(f"\nimage build: {time.monotonic() - t0:.0f}s ({line})")
    return line.split()[1]


def _s3_objects(prefix_url: str) -> dict[str, bytes]:
    from libcurate.storage import open_store

    store = open_store(prefix_url)
    return {rel: store.read_bytes(rel) for rel in store.list("")}


def test_score_length_in_container_matches_local(cpu_image, s3_bucket, s3_endpoint, tmp_path):
    from jobs._main import main as job_main
    from libcurate.demo import build as build_demo
    from libcurate.pipeline import load_recipe, plan

    src = tmp_path / "source"
    build_demo(str(src), copies=1)
    recipe = {"name": "ctr", "storage": {"prefix": f"{s3_bucket}/local"}, "workers": 1,
              "stages": [{"stage": "ingest", "with": {"format": "llava", "annotations": str(src / "data.json"),
                                                      "images": str(src), "shard_size": 8}},
                         {"stage": "score_length", "with": {"tokenizer": "whitespace"}}]}
    rdir = tmp_path / "etc-curate"
    rdir.mkdir()
    (rdir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    rpath = str(rdir / "recipe.yaml")
    local, boxed = f"{s3_bucket}/local", f"{s3_bucket}/container"

    assert job_main("ingest", ["--recipe", rpath, "--prefix", local]) == 0
    raw = {k: v for k, v in _s3_objects(local).items() if k.startswith("raw/")}
    assert any(k.endswith(".tar") for k in raw)
    from libcurate.storage import open_store

    dst = open_store(boxed)
    for rel, data in raw.items():          # same raw input for both runs
        dst.write_bytes(rel, data)

    assert job_main("score_length", ["--recipe", rpath, "--prefix", local]) == 0

    # The pod: Argo's command, the template's args; hardening as in the rendered securityContext.
    cmd = ["podman", "--runtime", "runc", "run", "--rm", "--ulimit", "nofile=1024:1024",
           "--ulimit", "nproc=1024:1024", "--network", "host", "--read-only", "--tmpfs", "/tmp",
           "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "-v", f"{rdir}:/etc/curate:ro", "-v", f"{src}:{src}:ro",
           "-e", f"AWS_ENDPOINT_URL={s3_endpoint}", "-e", "AWS_ACCESS_KEY_ID=testing",
           "-e", "AWS_SECRET_ACCESS_KEY=testing", "-e", "AWS_DEFAULT_REGION=us-east-1",
           "--entrypoint", json.dumps(["python", "-m", "jobs", "score_length"]), cpu_image,
           "--recipe", "/etc/curate/recipe.yaml", "--prefix", boxed, "--stage-id", "score_length",
           "--shards", "0-1000", "--workers", "1", "--device", "cpu"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(f"container run: {time.monotonic() - t0:.1f}s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    stage_prefix = next(ps.prefix for ps in plan(load_recipe(recipe)) if ps.id == "score_length")
    a = {k: v for k, v in _s3_objects(local).items() if k.startswith(stage_prefix + "/")}
    b = {k: v for k, v in _s3_objects(boxed).items() if k.startswith(stage_prefix + "/")}
    assert a and set(a) == set(b)
    tars = [k for k in a if k.endswith(".tar")]
    assert tars and all(a[k] == b[k] for k in tars), "sidecar shards differ between container and local run"
    for k in a:
        if "/_stats/" in k:                 # timings differ; every count must not
            sa, sb = json.loads(a[k]), json.loads(b[k])
            sa.pop("seconds"), sb.pop("seconds")
            assert sa == sb
        elif not k.endswith(".tar"):
            assert a[k] == b[k], k


def test_image_runs_as_non_root_with_labels(cpu_image):
    r = subprocess.run(["podman", "--runtime", "runc", "run", "--rm", "--network", "host", "--read-only",
                        "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--entrypoint",
                        json.dumps(["python", "-c", "import os, sys; print(os.getuid(), 'torch' in sys.modules)"]),
                        cpu_image], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["10001", "False"]
    info = json.loads(subprocess.run(["podman", "image", "inspect", cpu_image], capture_output=True, text=True,
                                     check=True).stdout)[0]
    labels = info.get("Labels") or info["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == cpu_image.rsplit(":", 1)[1]
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
    env = " ".join(info["Config"].get("Env", []))
    assert not any(s in env for s in ("AWS_SECRET", "OPENAI_API_KEY", "TOKEN="))
