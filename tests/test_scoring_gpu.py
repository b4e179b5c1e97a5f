"""GPU paths of the model stages (bf16 autocast, channels_last, pinned memory, nvJPEG decode).
Marked ``gpu``: skipped on machines without a CUDA device (conftest)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from libcurate.scoring.clip import ClipConfig, ClipStage
from libcurate.scoring.reward import RewardConfig, RewardStage
from libcurate.shards import iter_members, npy_load
from libcurate.stage import StageContext
from libcurate.storage import open_store

from .test_scoring_clip import photo_samples, write_shard

pytestmark = pytest.mark.gpu


def scores(store, prefix, shard):
    out = {}
    for m in iter_members(store.uri(f"{prefix}/{shard}")):
        out[m["__key__"]] = (json.loads(m["json"]), npy_load(m["img_emb.npy"]) if "img_emb.npy" in m else None)
    return out


@pytest.mark.parametrize("decode", ["pil", "torchvision"])
def test_clip_on_cuda_matches_cpu(tmp_path, photos, decode):
    store = open_store(str(tmp_path / "run"))
    shard = write_shard(store, 0, photo_samples(photos, 12))
    for device, prefix in (("cpu", "stages/cpu/x"), ("cuda", "stages/gpu/x")):
        cfg = ClipConfig.from_dict({"model": "test-random-vit-b-32", "device": device, "batch_size": 8,
                                    "decode": decode if device == "cuda" else "pil"})
        ClipStage(cfg).process_shards(StageContext(store=store, prefix=prefix, workers=1), [shard])
    cpu, gpu = scores(store, "stages/cpu/x", shard), scores(store, "stages/gpu/x", shard)
    assert list(cpu) == list(gpu)
    for k in cpu:
        # bf16 autocast on the GPU (and torch resize for nvJPEG decode) vs fp32 PIL on the CPU
        assert abs(cpu[k][0]["cosine"] - gpu[k][0]["cosine"]) < 0.03
        assert np.allclose(np.linalg.norm(gpu[k][1].astype(np.float32), axis=-1), 1.0, atol=1e-2)


def test_reward_on_cuda_matches_cpu(tmp_path, photos):
    store = open_store(str(tmp_path / "run"))
    shard = write_shard(store, 0, photo_samples(photos, 6))
    for device, prefix in (("cpu", "stages/cpu/r"), ("cuda", "stages/gpu/r")):
        cfg = RewardConfig.from_dict({"model": "test-tiny-reward", "device": device, "precision": "fp32"})
        RewardStage(cfg).process_shards(StageContext(store=store, prefix=prefix, workers=1), [shard])
    cpu, gpu = scores(store, "stages/cpu/r", shard), scores(store, "stages/gpu/r", shard)
    for k in cpu:
        assert cpu[k][0]["reward"] == pytest.approx(gpu[k][0]["reward"], abs=1e-3)
