"""Shared fixtures: a moto S3 server on loopback (real boto3 over HTTP), stores on both backends,
and real photos from scikit-image."""

from __future__ import annotations

import io
import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1; sets fake AWS credentials in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=url,
                      AWS_DEFAULT_REGION="us-east-1")
    yield url
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns ``s3://bucket``."""
    from libcurate.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """A run root on each backend: a temp directory, then an S3 prefix on the moto server."""
    if request.param == "local":
        return str(tmp_path / "run")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/run"


@pytest.fixture(scope="session")
def photos():
    """A few real photos (scikit-image sample data) as RGB PIL images."""
    from PIL import Image
    from skimage import data

    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
        arr = getattr(data, name)()
        out[name] = Image.fromarray(arr).convert("RGB")
    return out


def jpeg_bytes(img, size=(64, 64), quality=85) -> bytes:
    buf = io.BytesIO()
    img.resize(size).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
