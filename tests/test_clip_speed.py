"""score_clip's speed paths: the measured thread/worker split, the folded normalisation, the fast-decode
deviation report and the shared decode of several scorers. Speed itself is proven by bench/peers.py."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from libcurate.models.clip import load_clip, uint8_image_encoder
from libcurate.scoring.clip import ClipConfig, ClipStage
from libcurate.scoring.clip_split import (choose_split, predicted_rate, replica_fill, replica_split,
                                         replicas_without_measurement)
from libcurate.shards import iter_members
from libcurate.stage import StageContext, done_rel
from libcurate.storage import open_store

from .test_scoring_clip import PREFIX, make_sample, photo_samples, sidecar, write_shard


# -- the split ------------------------------------------------------------------------------------
def test_cheap_model_gets_all_cores_for_decode_workers():
    # test-tiny-clip-like: decode 5 ms/image, forward 1 ms (1 thread) / 0.7 ms (2 threads)
    s = choose_split(2, 0.005, {1: 0.001, 2: 0.0007})
    assert (s.threads, s.workers) == (1, 2)
    assert s.predicted_sps == pytest.approx(2 / 0.006)  # bound by the cores: total work 6 ms on 2 cores
    assert s.timings == {"decode_ms": 5.0, "model_ms_1t": 1.0, "model_ms_2t": 0.7}


def test_expensive_model_gets_all_threads_and_decodes_in_process():
    # ViT-B-32-like: decode 8 ms, forward 250 ms (1 thread) / 140 ms (2 threads); one shard: no replicas
    s = choose_split(2, 0.008, {1: 0.25, 2: 0.14}, max_workers=1)
    assert (s.threads, s.workers, s.replicas) == (2, 0, 1)
    assert s.predicted_sps == pytest.approx(1 / 0.148)


def test_expensive_model_with_shards_for_every_core_gets_replicas():
    # two shards: one single-threaded replica per core beats 2 threads (2 / 258 ms > 1 / 148 ms)
    s = choose_split(2, 0.008, {1: 0.25, 2: 0.14}, max_workers=2)
    assert (s.threads, s.workers, s.replicas) == (1, 0, 2)
    assert s.predicted_sps == pytest.approx(2 / 0.258)
    # three shards on two cores: the third leaves a replica idle for a round (3/4 of 2 / 258 ms), so
    # 2 threads in one process win when they scale well, replicas when they do not
    assert choose_split(2, 0.008, {1: 0.25, 2: 0.13}, max_workers=3).replicas == 1
    r = choose_split(2, 0.008, {1: 0.25, 2: 0.2}, max_workers=3)
    assert r.replicas == 2 and r.predicted_sps == pytest.approx(0.75 * 2 / 0.258)
    assert choose_split(2, 0.008, {1: 0.25, 2: 0.2}, max_workers=3, replicas=False).replicas == 1


def test_replicas_skip_the_measurement_only_when_they_fill_every_core():
    assert replica_fill(2, 4) == (2, 1.0)
    assert replica_fill(4, 6) == (4, 0.75)
    assert replica_fill(8, 3) == (3, 1.0)
    assert replicas_without_measurement(2, 4) == 2
    assert replicas_without_measurement(2, 19) == 2  # 19 / 20: 95% busy
    assert replicas_without_measurement(2, 3) == 0  # 75%: the measurement decides
    assert replicas_without_measurement(4, 2) == 0  # fewer shards than cores: measure
    assert replicas_without_measurement(1, 8) == 0  # one core: nothing to replicate
    assert replicas_without_measurement(2, 4, cuda=True) == 0


def test_replica_split_by_hand_on_auto_and_never():
    assert replica_split(3, 8, 2).replicas == 2 and replica_split(3, 8, 2).timings == {"configured": True}
    assert replica_split(3, 8, 2, hand_set=True).replicas == 2  # asked for by name: wins over threads
    auto = replica_split(0, 2, 4)
    assert (auto.threads, auto.workers, auto.replicas, auto.timings) == (1, 0, 2, {"measured": "during the run"})
    assert replica_split(0, 2, 4, note={"rule": "x"}).timings == {"rule": "x"}
    assert replica_split(0, 2, 4, hand_set=True) is None  # threads or workers set by hand: no auto replicas
    assert replica_split(1, 2, 4) is None and replica_split(0, 2, 3) is None
    assert replica_split(3, 8, 4, cuda=True) is None and replica_split(0, 2, 4, cuda=True) is None


def test_middle_cost_model_gets_one_thread_and_one_worker():
    # forward and decode cost the same: run them side by side on one core each
    s = choose_split(2, 0.01, {1: 0.01, 2: 0.007})
    assert (s.threads, s.workers) == (1, 1)
    assert s.predicted_sps == pytest.approx(100.0)


def test_never_oversubscribes_a_multithreaded_model():
    rng = np.random.default_rng(0)
    for _ in range(300):
        cores = int(rng.integers(1, 9))
        m1 = float(rng.uniform(1e-4, 0.5))
        model_s = {1: m1, cores: m1 / float(rng.uniform(1, cores))}
        model_s.update({t: m1 / float(rng.uniform(1, t)) for t in range(2, cores)})
        s = choose_split(cores, float(rng.uniform(1e-4, 0.05)), model_s)
        # a multi-threaded model never shares the cores with a worker beyond their number
        assert s.threads == 1 or s.threads + s.workers <= cores
        assert 0 <= s.workers <= cores
        # and the pick is the best of its candidates
        d = s.timings["decode_ms"] / 1e3
        assert s.replicas == 1 or (s.threads, s.workers, s.replicas) == (1, 0, cores)
        assert s.predicted_sps == pytest.approx(max(
            ([cores / (d + m1)] if cores > 1 else [])
            + [predicted_rate(cores, s.timings["decode_ms"] / 1e3, model_s, t, 0) for t in model_s]
            + [predicted_rate(cores, s.timings["decode_ms"] / 1e3, model_s, 1, w) for w in range(1, cores + 1)]
            + [predicted_rate(cores, s.timings["decode_ms"] / 1e3, model_s, t, w) for t in model_s if t > 1
               for w in range(1, cores - t + 1)]), rel=1e-3)


def test_workers_capped_by_shards_and_cuda_rule():
    s = choose_split(2, 0.005, {1: 0.001, 2: 0.0007}, max_workers=1)
    assert s.workers == 1
    # CUDA: enough workers to keep up with the GPU, one core left to the main process
    g = choose_split(16, 0.006, {0: 0.001}, cuda=True)
    assert (g.threads, g.workers) == (0, 6)
    assert choose_split(4, 0.006, {0: 0.001}, cuda=True).workers == 3
    assert choose_split(4, 0.0005, {0: 0.001}, cuda=True).workers == 1


def test_stage_records_its_measured_split(tmp_path, photos, monkeypatch):
    import libcurate.scoring.clip as clip_mod

    monkeypatch.setattr(clip_mod, "available_cores", lambda: 2)
    store = open_store(str(tmp_path / "run"))
    shards = [write_shard(store, i, photo_samples(photos, 6, offset=6 * i)) for i in range(3)]
    # three shards on two cores: replicas would idle a quarter of the time, so the split is measured
    stage = ClipStage(ClipConfig.from_dict({"model": "test-tiny-clip", "batch_size": 4}))
    stats = stage.process_shards(StageContext(store=store, prefix=PREFIX, workers=1), shards)
    assert [s["out"] for s in stats] == [6, 6, 6]
    sp = stage.split.as_dict()
    assert sp["decode_ms"] > 0 and sp["model_ms_1t"] > 0 and sp["model_ms_2t"] > 0
    assert sp["workers"] <= 2 and sp["threads"] >= 1
    hand = ClipStage(ClipConfig.from_dict({"model": "test-tiny-clip", "loader_workers": 0}))
    hand.process_shards(StageContext(store=store, prefix=PREFIX + "h", workers=1), shards)
    assert (hand.split.workers, hand.split.replicas, hand.split.timings) == (0, 1, {"configured": True})


def test_stage_runs_replicas_without_measuring_and_writes_the_same(tmp_path, photos, monkeypatch):
    import libcurate.scoring.clip as clip_mod

    monkeypatch.setattr(clip_mod, "available_cores", lambda: 2)
    monkeypatch.setattr(clip_mod, "measure_split", lambda *a, **k: pytest.fail("replicas need no measurement"))
    store = open_store(str(tmp_path / "run"))
    shards = [write_shard(store, i, photo_samples(photos, 5, offset=5 * i)) for i in range(4)]
    ctx = StageContext(store=store, prefix=PREFIX, workers=1)
    stage = ClipStage(ClipConfig.from_dict({"model": "test-tiny-clip", "batch_size": 4}))
    stats = stage.process_shards(ctx, shards)
    assert [s["out"] for s in stats] == [5, 5, 5, 5]
    sp = stage.split.as_dict()
    assert (sp["threads"], sp["workers"], sp["replicas"], sp["measured"]) == (1, 0, 2, "during the run")
    assert sp["decode_ms"] > 0 and sp["model_ms_1t"] > 0 and sp["predicted_sps"] > 0
    one = ClipStage(ClipConfig.from_dict({"model": "test-tiny-clip", "batch_size": 4, "replicas": 1,
                                          "loader_workers": 0}))
    one.process_shards(StageContext(store=store, prefix=PREFIX + "1", workers=1), shards)
    assert one.split.replicas == 1
    for shard in shards:
        a, b = ({m["__key__"]: json.loads(m["json"]) for m in iter_members(store.uri(f"{p}/{shard}"))}
                for p in (PREFIX, PREFIX + "1"))
        assert list(a) == list(b) and len(a) == 5
        for key in a:
            assert a[key]["score"] == pytest.approx(b[key]["score"], abs=1e-5)
        assert store.exists(done_rel(PREFIX, shard[:-len(".tar")]))


# -- folded normalisation --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test-tiny-clip", "test-random-vit-b-32"])
def test_folded_normalisation_equals_plain(name):
    bundle = load_clip(name)
    x = torch.randint(0, 256, (3, 3, *bundle.image_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(bundle.std).view(1, 3, 1, 1) * 255
    with torch.inference_mode():
        want = bundle.model.encode_image((x.float() - mean) / std)
        got = uint8_image_encoder(bundle)(x)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5)
    assert bundle.model.visual.conv1.bias is None  # the cached model itself is untouched


def test_fallback_normalisation_for_towers_without_a_patch_conv():
    bundle = load_clip("test-tiny-clip")

    class Tower(torch.nn.Module):  # no conv1: the in-place path
        def forward(self, x):
            return x.flatten(1)[:, :5]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Sequential(torch.nn.Identity())
            self.tower = Tower()

        def encode_image(self, x):
            return self.tower(x)

    fake = type(bundle)(model=Model(), preprocess=None, tokenizer=None, context_length=77, image_size=(4, 4),
                        mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), name="x", pretrained=None)
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    want = ((x.float() - torch.tensor(fake.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(fake.std).view(1, 3, 1, 1) * 255))
    assert torch.allclose(uint8_image_encoder(fake)(x), want.flatten(1)[:, :5], atol=1e-5)
    assert x.dtype == torch.uint8  # the input is not normalised in place


def test_stage_scores_unchanged_by_fold(tmp_path, photos):
    """End to end: the stage (folded) equals the plain normalise-then-encode reference."""
    from .test_scoring_clip import direct

    store = open_store(str(tmp_path / "run"))
    samples = photo_samples(photos, 5)
    shard = write_shard(store, 0, samples)
    ClipStage(ClipConfig.from_dict({"model": "test-tiny-clip"})).process_shards(
        StageContext(store=store, prefix=PREFIX, workers=1), [shard])
    bundle = load_clip("test-tiny-clip")
    for m, s in zip(sidecar(store, shard), samples):
        img, txt = direct(bundle, [s.images[0].data], s.conversations[1].value)
        assert json.loads(m["json"])["cosine"] == pytest.approx(float(img[0] @ txt[0]), abs=1e-5)
        assert np.isfinite(img).all()


# -- decoding: the one-resample crop and the deviation report ---------------------------------------
def _photo_jpegs(photos, n=10):
    from tests.conftest import jpeg_bytes

    names = list(photos)
    sizes = [(300, 200), (640, 480), (230, 500), (224, 224), (180, 150), (513, 301), (800, 612), (256, 640)]
    return [jpeg_bytes(photos[names[i % len(names)]], size=sizes[i % len(sizes)], quality=90) for i in range(n)]


def test_one_resample_crop_matches_open_clip_transform(photos):
    from libcurate.scoring.clip_decode import crop_resize_plan, decode_pixels

    bundle = load_clip("test-tiny-clip")
    tf = bundle.pil_transform()
    plan = crop_resize_plan(tf)
    assert plan is not None and plan.size == 224
    for data in _photo_jpegs(photos):
        exact = decode_pixels(data, "jpeg", "pil", tf, plan)
        assert torch.equal(exact, tf(Image.open(io.BytesIO(data)).convert("RGB")))  # the default is exact
        fast = decode_pixels(data, "jpeg", "pil_box", tf, plan)
        assert fast.shape == exact.shape == (3, 224, 224) and fast.dtype == torch.uint8
        diff = (fast.int() - exact.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05  # float rounding of the box only


def test_other_transforms_take_the_exact_path():
    from torchvision import transforms as T

    from libcurate.scoring.clip_decode import crop_resize_plan

    squash = T.Compose([T.Resize((224, 224)), T.CenterCrop(224), T.Lambda(lambda x: x), T.PILToTensor()])
    assert crop_resize_plan(squash) is None
    nearest = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(224),
                         T.Lambda(lambda x: x), T.PILToTensor()])
    assert crop_resize_plan(nearest) is None


def test_decode_deviation_report(photos):
    from libcurate.scoring.clip_decode import decode_deviation

    rep = decode_deviation(load_clip("test-tiny-clip"), _photo_jpegs(photos, 8))
    assert rep["n_images"] == 8 and rep["fp16_storage_max_abs_score_diff"] > 0
    for mode in ("pil_box", "pil_draft"):
        r = rep[mode]
        assert 0 <= r["mean_abs_cos_diff"] <= r["max_abs_cos_diff"] < 0.05
        assert 0 <= r["mean_abs_score_diff"] <= r["max_abs_score_diff"]
        # negligible = no larger than the score change fp16 storage of the exact embedding causes
        assert r["negligible"] == (r["max_abs_score_diff"] <= rep["fp16_storage_max_abs_score_diff"])
    # the DCT downscale changes far more pixels than the one-resample crop
    assert rep["pil_draft"]["pixels_changed"] > 5 * rep["pil_box"]["pixels_changed"] > 0
    same = decode_deviation(load_clip("test-tiny-clip"), _photo_jpegs(photos, 3), modes=("pil",))
    assert same["pil"]["max_abs_score_diff"] == 0 and same["pil"]["pixels_changed"] == 0
    assert same["pil"]["max_abs_cos_diff"] < 1e-6  # 1 - cos(x, x) in fp32


# -- one decode, several scorers -----------------------------------------------------------------
def _records(store, prefix, shard):
    from libcurate.shards import iter_members, npy_load

    return {m["__key__"]: (json.loads(m["json"]), {k: npy_load(v) for k, v in m.items() if k.endswith(".npy")})
            for m in iter_members(store.uri(f"{prefix}/{shard}"))}


def test_joint_pass_equals_separate_stages_and_decodes_once(tmp_path, photos, monkeypatch):
    from libcurate.scoring import clip_decode
    from libcurate.scoring.joint import JointConfig, JointStage
    from libcurate.scoring.reward import RewardConfig, RewardStage
    from libcurate.stage import read_quarantine

    from .test_scoring_clip import make_sample

    store = open_store(str(tmp_path / "run"))
    bad = make_sample([b"\xff\xd8\xff\xe0 not a jpeg"], [("human", "<image>\nQ?"), ("gpt", "Broken.")])
    samples = photo_samples(photos, 5)
    shard = write_shard(store, 0, samples[:2] + [bad] + samples[2:])
    ctx = lambda p: StageContext(store=store, prefix=p, workers=1)  # noqa: E731
    ClipStage(ClipConfig.from_dict({"model": "test-tiny-clip", "loader_workers": 0})).process_shards(ctx("s/clip"), [shard])
    ClipStage(ClipConfig.from_dict({"model": "test-random-vit-b-32", "loader_workers": 0})).process_shards(ctx("s/vit"), [shard])
    RewardStage(RewardConfig.from_dict({"model": "test-tiny-reward"})).process_shards(ctx("s/reward"), [shard])

    decodes = []
    real_open = clip_decode.open_image
    monkeypatch.setattr(clip_decode, "open_image", lambda *a: decodes.append(1) or real_open(*a))
    joint = JointStage(JointConfig.from_dict({"clip": [{"model": "test-tiny-clip"}, {"model": "test-random-vit-b-32"}],
                                              "reward": {"model": "test-tiny-reward"}, "loader_workers": 0}))
    (stats,) = joint.process_shards(ctx("s/joint"), [shard])
    assert (stats["in"], stats["out"], stats["quarantined"]) == (6, 5, 1)
    assert [q["reason"] for q in read_quarantine(store, "s/joint", "shard-000000")] == ["image_decode_error"]
    # one decode per image for both CLIP models (workers set by hand: no split measurement decodes)
    assert len(decodes) == 6
    # both CLIP models (same 224 px bicubic transform) were given the very same pixel tensor
    assert len(joint.seen_pixels) == 1

    got = _records(store, "s/joint", shard)
    sep = [_records(store, p, shard) for p in ("s/clip", "s/vit", "s/reward")]
    assert list(got) == list(sep[0]) == [k for k in sep[2] if k != bad.key]  # reward alone reads no image
    for key, (rec, arrays) in got.items():
        for head, (want, want_arrays) in (("clip", sep[0][key]), ("clip1", sep[1][key])):
            assert rec[head].keys() == want.keys()
            assert rec[head]["cosine"] == pytest.approx(want["cosine"], abs=1e-5)
            assert rec[head]["tokens"] == want["tokens"] and rec[head]["model"] == want["model"]
        np.testing.assert_allclose(arrays["img_emb.npy"].astype(np.float32),
                                   sep[0][key][1]["img_emb.npy"].astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(arrays["clip1.img_emb.npy"].astype(np.float32),
                                   sep[1][key][1]["img_emb.npy"].astype(np.float32), atol=2e-3)
        assert rec["reward"]["reward"] == pytest.approx(sep[2][key][0]["reward"], abs=1e-5)
        assert {k: v for k, v in rec["reward"].items() if k != "rewards" and k != "reward"} == \
            {k: v for k, v in sep[2][key][0].items() if k != "rewards" and k != "reward"}


def test_joint_config_validation():
    from libcurate.scoring.joint import JointConfig
    from libcurate.stage import PermanentInputError

    with pytest.raises(PermanentInputError):
        JointConfig.from_dict({"clip": []})
    with pytest.raises(PermanentInputError):
        JointConfig.from_dict({"clip": [{"model": "test-tiny-clip", "batch_size": 3}]})  # a pass setting
    with pytest.raises(PermanentInputError):
        JointConfig.from_dict({"clip": [{"scroe": "cosine"}]})
    with pytest.raises(PermanentInputError):
        JointConfig.from_dict({"reward": {"turns": "some"}})


# -- the text tower stops at the last end-of-text token ------------------------------------------------
@pytest.mark.parametrize("name", ["test-tiny-clip", "test-random-vit-b-32"])
def test_short_text_encoder_equals_full_context(name):
    from libcurate.models.clip import short_text_encoder, tokenize

    bundle = load_clip(name)
    enc = short_text_encoder(bundle)
    assert enc is not bundle.model.encode_text  # the causal argmax-pooled tower takes the short path
    texts = ["A cat.", "A photo of an astronaut, variant 12. It was cropped and resized.", "word " * 100]
    for batch in (texts, texts[:1], texts[:2]):
        tokens, _ = tokenize(bundle.tokenizer, batch, bundle.context_length)
        with torch.inference_mode():
            want, got = bundle.model.encode_text(tokens), enc(tokens)
        assert got.shape == want.shape and torch.allclose(got, want, atol=2e-5, rtol=1e-5)


# -- CUDA (marked gpu: skipped without a device) ------------------------------------------------------
@pytest.mark.gpu
def test_folded_and_short_encoders_on_cuda_bf16(tmp_path, photos):
    from libcurate.models.clip import short_text_encoder, tokenize
    from libcurate.scoring.common import autocast

    bundle = load_clip("test-random-vit-b-32", None, "cuda")
    x = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, device="cuda")
    mean = torch.tensor(bundle.mean, device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor(bundle.std, device="cuda").view(1, 3, 1, 1) * 255
    tokens, _ = tokenize(bundle.tokenizer, ["A cat.", "A photo of a rocket on the pad."], bundle.context_length)
    tokens = tokens.cuda()
    with torch.inference_mode(), autocast("cuda", "bf16"):
        want = bundle.model.encode_image((x.float() - mean) / std).float()
        got = uint8_image_encoder(bundle)(x.contiguous(memory_format=torch.channels_last)).float()
        t_want = bundle.model.encode_text(tokens).float()
        t_got = short_text_encoder(bundle)(tokens).float()
    cos = torch.nn.functional.cosine_similarity
    assert cos(got, want).min() > 0.99 and cos(t_got, t_want).min() > 0.99  # bf16 rounding only
    # the stage on CUDA: the GPU split rule (workers to feed the device, torch's default threads)
    store = open_store(str(tmp_path / "run"))
    shard = write_shard(store, 0, photo_samples(photos, 8))
    stage = ClipStage(ClipConfig.from_dict({"model": "test-tiny-clip", "device": "cuda", "batch_size": 4}))
    (stats,) = stage.process_shards(StageContext(store=store, prefix=PREFIX, workers=1), [shard])
    assert stats["out"] == 8 and stage.split.threads == 0 and stage.split.workers == 1  # one shard


def test_float_staging_reuses_one_buffer_and_converts_exactly():
    from libcurate.models.clip import FloatStaging

    st = FloatStaging()
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels-last view
    with torch.inference_mode():
        a = st(x)
        assert a.dtype == torch.float32 and a.stride() == x.stride() and torch.equal(a, x.float())
        ptr = a.data_ptr()
        y = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        b = st(y)
        assert b.data_ptr() == ptr and torch.equal(b, y.float())  # same buffer, new values
        assert st(x[:1]).shape == (1, 3, 8, 8)  # another shape: a new buffer


def test_a_shards_outputs_do_not_depend_on_the_split_or_on_other_shards(tmp_path, photos, monkeypatch):
    """Batches never span shards, so a shard's sidecar bytes depend on the shard alone: the same with
    replicas, loader workers or none, and when a rerun after a kill scores only the unfinished shards
    (the short text tower cuts a batch at its longest caption, and matrix kernels differ by row count:
    a batch mixing two shards moved scores in the last bits)."""
    import libcurate.scoring.clip as clip_mod

    monkeypatch.setattr(clip_mod, "available_cores", lambda: 2)
    store = open_store(str(tmp_path / "run"))
    shards = []
    for i in range(4):
        samples = photo_samples(photos, 5, offset=5 * i)
        if i % 2:  # long captions in every other shard: its batches cut the text tower later
            long = "A very long caption that goes on about the scene, " * 3
            samples = [make_sample([s.images[0].data], [("human", "<image>\nDescribe."), ("gpt", long + str(k))])
                       for k, s in enumerate(samples)]
        shards.append(write_shard(store, i, samples))
    runs = {"replicas": ({"replicas": 2}, shards), "workers": ({"replicas": 1, "loader_workers": 2}, shards),
            "inline": ({"replicas": 1, "loader_workers": 0}, shards),
            "rerun": ({"replicas": 1, "loader_workers": 0}, [shards[0], shards[3]])}
    got = {}
    for name, (extra, todo) in runs.items():
        stage = ClipStage(ClipConfig.from_dict({"model": "test-tiny-clip", "batch_size": 4, **extra}))
        stage.process_shards(StageContext(store=store, prefix=f"{PREFIX}-{name}", workers=1), todo)
        got[name] = {s: store.read_bytes(f"{PREFIX}-{name}/{s}") for s in todo}
    for name in ("workers", "inline", "rerun"):
        for s, data in got[name].items():
            assert data == got["replicas"][s], (name, s)


def test_replicas_quarantine_bad_samples_and_lose_none(tmp_path, photos, monkeypatch):
    """Under replicas each process decodes its own shards: an undecodable image and an empty caption are
    quarantined with their reason in their own shard, and every sample is accounted for."""
    import libcurate.scoring.clip as clip_mod
    from libcurate.stage import read_quarantine

    monkeypatch.setattr(clip_mod, "available_cores", lambda: 2)
    store = open_store(str(tmp_path / "run"))
    good = photo_samples(photos, 6)
    corrupt = make_sample([b"\xff\xd8\xff\xe0 not really a jpeg"], [("human", "<image>\nWhat?"), ("gpt", "Broken.")])
    blank = make_sample([good[0].images[0].data], [("human", "<image>\nWhat?"), ("gpt", "  ")])
    shards = [write_shard(store, 0, good[:3]), write_shard(store, 1, [good[3], corrupt, good[4], blank, good[5]])]
    stage = ClipStage(ClipConfig.from_dict({"model": "test-tiny-clip", "batch_size": 2}))
    stats = stage.process_shards(StageContext(store=store, prefix=PREFIX, workers=1), shards)
    assert stage.split.replicas == 2
    assert [(s["in"], s["out"], s["quarantined"]) for s in stats] == [(3, 3, 0), (5, 3, 2)]
    q = {x["key"]: x["reason"] for x in read_quarantine(store, PREFIX, "shard-000001")}
    assert q == {corrupt.key: "image_decode_error", blank.key: "no_text"}
    keys = [m["__key__"] for m in iter_members(store.uri(f"{PREFIX}/{shards[1]}"))]
    assert keys == [good[3].key, good[4].key, good[5].key]
