"""Model registry: seeded test models, offline tokenizers, safe weight loading, no storage imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from libcurate.models.clip import load_clip, tokenize
from libcurate.models.reward import load_reward, tiny_vocab
from libcurate.models.weights import load_state_dict


def test_models_import_without_storage_libraries():
    code = ("import sys, libcurate.models, libcurate.models.clip, libcurate.models.reward, "
            "libcurate.models.text, libcurate.models.weights\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'webdataset')]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_clip_is_the_same_model_in_every_process():
    code = ("from libcurate.models.clip import load_clip\n"
            "m = load_clip('test-tiny-clip').model\n"
            "print(sum(float(p.double().sum()) for p in m.parameters()))")
    a = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    mine = sum(float(p.double().sum()) for p in load_clip("test-tiny-clip").model.parameters())
    assert float(a) == pytest.approx(mine, rel=0, abs=1e-9)
    # seeding a test model must not disturb the caller's RNG stream
    torch.manual_seed(123)
    x = torch.rand(1)
    torch.manual_seed(123)
    load_clip.cache_clear()
    load_clip("test-tiny-clip")
    assert torch.equal(torch.rand(1), x)


def test_tiny_clip_shapes_and_tokenize_matches_open_clip():
    b = load_clip("test-tiny-clip")
    assert b.image_size == (224, 224) and b.context_length == 77
    texts = ["a photo of a cat.", "word " * 120, ""]
    ids, counts = tokenize(b.tokenizer, texts, b.context_length)
    assert torch.equal(ids, b.tokenizer(texts))
    assert counts[0] == 8 and counts[1] == 122 and counts[2] == 2
    with torch.inference_mode():
        emb = b.model.encode_image(torch.zeros(2, 3, 224, 224))
    assert emb.shape == (2, 64)


def test_unknown_test_model_is_rejected():
    with pytest.raises(ValueError, match="unknown test model"):
        load_clip("test-huge-clip")


def test_tiny_reward_offline_tokenizer_and_single_logit():
    r = load_reward("test-tiny-reward")
    assert len(r.tokenizer) == len(tiny_vocab()) > 100  # the vocabulary was really used
    enc = r.tokenizer("Describe this image.", "A dog on the grass.", return_tensors="pt")
    assert int(enc["input_ids"].max()) < r.model.config.vocab_size
    assert r.tokenizer.unk_token_id not in enc["input_ids"][0].tolist()
    with torch.inference_mode():
        out = r.model(**enc).logits
    assert out.shape == (1, 1)
    assert r.max_length == 128


def test_safe_weight_loading(tmp_path):
    from safetensors.torch import save_file

    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.bin")
    assert torch.equal(load_state_dict(tmp_path / "m.bin")["w"], sd["w"])
    assert torch.equal(load_state_dict(tmp_path)["w"], sd["w"])  # dir: safetensors preferred

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception):
        load_state_dict(tmp_path / "evil.pt")
    with pytest.raises(ValueError):
        (tmp_path / "x.pkl").write_bytes(b"0")
        load_state_dict(tmp_path / "x.pkl")


def test_local_weights_file_for_clip(tmp_path):
    from safetensors.torch import save_file

    src = load_clip("test-random-vit-b-32").model
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "vitb32.safetensors"))
    b = load_clip("ViT-B-32", str(tmp_path / "vitb32.safetensors"))
    for (k, v), (k2, v2) in zip(src.state_dict().items(), b.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_packaged_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from libcurate.models.text import load_text_embedder

    m = load_text_embedder("all-MiniLM-L6-v2")
    e = m.encode(["a dog runs on the beach", "a puppy running on sand", "quarterly tax report"],
                 normalize_embeddings=True)
    assert e.shape == (3, 384)
    # a real pretrained model: paraphrases are closer than unrelated text
    assert float(np.dot(e[0], e[1])) > float(np.dot(e[0], e[2])) + 0.2
