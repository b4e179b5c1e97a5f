"""score_reward and score_length on fixtures with known answers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from libcurate.models.reward import load_reward
from libcurate.records import ImageRef, Sample, Source, Turn, make_key
from libcurate.scoring.length import LengthConfig, LengthStage, length_score
from libcurate.scoring.reward import RewardConfig, RewardStage
from libcurate.shards import ShardWriter, iter_members
from libcurate.stage import StageContext, read_quarantine
from libcurate.storage import open_store


def make_sample(turns: list[tuple[str, str]]) -> Sample:
    data = b"\xff\xd8 not decoded by text-only stages " + str(turns).encode()
    ref = ImageRef("jpeg", hashlib.sha256(data).hexdigest(), 8, 8, "x", data)
    conv = [Turn(r, v) for r, v in turns]
    return Sample(make_key([ref.sha256], conv), [ref], conv, Source("test", "0", "llava"))


def write_shard(store, index, samples):
    name = f"shard-{index:06d}.tar"
    with ShardWriter(store, f"raw/{name}") as w:
        for s in samples:
            w.write_sample(s)
    return name


def records(store, prefix, shard):
    return [(m["__key__"], json.loads(m["json"])) for m in iter_members(store.uri(f"{prefix}/{shard}"))]


SAMPLES = [
    [("human", "<image>\nDescribe this image."), ("gpt", "A dog on the grass.")],
    [("human", "<image>\nWhat is it?"), ("gpt", "A cat."), ("human", "What colour?"), ("gpt", "It is red and blue.")],
    [("human", "<image>\nDescribe."), ("gpt", "the " * 200)],
]


def direct_reward(instr, resp, max_length=None):
    b = load_reward("test-tiny-reward")
    enc = b.tokenizer(instr, resp, truncation=max_length is not None, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        return float(b.model(**enc).logits[0, 0])


def test_reward_matches_direct_model_per_turn_and_aggregates(store_url):
    store = open_store(store_url)
    samples = [make_sample(t) for t in SAMPLES]
    s0, s1 = write_shard(store, 0, samples[:2]), write_shard(store, 1, samples[2:])
    prefix = "stages/score_reward/x"
    stage = RewardStage(RewardConfig.from_dict({"aggregate": "min", "batch_size": 2}))
    stats = stage.process_shards(StageContext(store=store, prefix=prefix), [s0, s1])
    assert [(s["in"], s["out"]) for s in stats] == [(2, 2), (1, 1)]
    recs = records(store, prefix, s0) + records(store, prefix, s1)
    assert [k for k, _ in recs] == [s.key for s in samples]
    r0, r1, r2 = (r for _, r in recs)
    assert r0["rewards"] == pytest.approx([direct_reward("Describe this image.", "A dog on the grass.")], abs=1e-4)
    want = [direct_reward("What is it?", "A cat."), direct_reward("What colour?", "It is red and blue.")]
    assert r1["rewards"] == pytest.approx(want, abs=1e-4) and r1["reward"] == pytest.approx(min(want), abs=1e-4)
    assert r1["n_turns"] == 2 and r1["truncated"] is False
    # 200 words do not fit the tiny model's 128 positions: truncated and recorded
    assert r2["truncated"] is True and r2["tokens"][0] > 128 and r2["max_length"] == 128
    assert r2["rewards"][0] == pytest.approx(direct_reward("Describe.", "the " * 200, max_length=128), abs=1e-4)
    assert store.exists(f"{prefix}/_done/shard-000001")


def test_reward_fixed_instruction_and_first_turn(tmp_path):
    store = open_store(str(tmp_path))
    s = make_sample(SAMPLES[1])
    shard = write_shard(store, 0, [s])
    cfg = {"turns": "first", "instruction": "Describe this image in detail."}
    RewardStage(RewardConfig.from_dict(cfg)).process_shards(StageContext(store=store, prefix="p"), [shard])
    (_, rec), = records(store, "p", shard)
    assert rec["n_turns"] == 1 and rec["instruction"] == "Describe this image in detail."
    assert rec["reward"] == pytest.approx(direct_reward("Describe this image in detail.", "A cat."), abs=1e-4)


def test_length_known_answers_and_data_driven_normalisation(store_url):
    store = open_store(store_url)
    shards = [write_shard(store, 0, [make_sample(SAMPLES[0]), make_sample(SAMPLES[1])]),
              write_shard(store, 1, [make_sample(SAMPLES[2])])]
    prefix = "stages/score_length/y"
    stage = LengthStage(LengthConfig.from_dict({"tokenizer": "whitespace"}))
    for sh in shards:
        stage.process_shard(StageContext(store=store, prefix=prefix), sh)
    (_, a), (_, b) = records(store, prefix, shards[0])
    (_, c), = records(store, prefix, shards[1])
    assert (a["chars"], a["words"], a["tokens"]) == (19, 5, 5)
    assert b["per_text"] == {"chars": [6, 19], "words": [2, 5], "tokens": [2, 5]}
    assert (b["chars"], b["first_chars"], b["n_texts"]) == (25, 6, 2)
    assert c["chars"] == 800 and c["words"] == 200
    maxima = [json.loads(store.read_text(f"{prefix}/_stats/{sh[:-4]}.json"))["max_chars"] for sh in shards]
    assert maxima == [25, 800]  # each shard's maximum is in its stats
    assert length_score(a["chars"], 800) == pytest.approx(10 * 19 / 800)
    assert length_score(800, 800) == 10.0 and length_score(5, 0) == 0.0


def test_length_caption_mode_and_clip_tokens(tmp_path):
    store = open_store(str(tmp_path))
    shard = write_shard(store, 0, [make_sample(SAMPLES[1])])
    LengthStage(LengthConfig.from_dict({"text": "caption"})).process_shard(StageContext(store=store, prefix="p"), shard)
    (_, rec), = records(store, "p", shard)
    assert rec["chars"] == 6 and rec["tokens"] == 3 and rec["tokenizer"] == "clip"  # "a", "cat", "."
    stats = json.loads(store.read_text("p/_stats/shard-000000.json"))
    assert stats["max_chars"] == 6 and read_quarantine(store, "p", "shard-000000") == []


def test_length_config_validation():
    from libcurate.stage import PermanentInputError

    with pytest.raises(PermanentInputError):
        LengthConfig.from_dict({"text": "everything"})
    with pytest.raises(PermanentInputError):
        RewardConfig.from_dict({"aggregate": "median"})


def test_reward_replicas_write_the_same_bytes_as_one_process(tmp_path, monkeypatch):
    import libcurate.scoring.clip as clip_mod

    monkeypatch.setattr(clip_mod, "available_cores", lambda: 2)
    store = open_store(str(tmp_path / "run"))
    shards = [write_shard(store, i, [make_sample([("human", f"<image>\nQuestion {i}.{j}?"),
                                                  ("gpt", "An answer " * (1 + (i * 3 + j) % 7))])
                                     for j in range(3)]) for i in range(4)]
    auto = RewardStage(RewardConfig.from_dict({"batch_size": 2}))
    auto.process_shards(StageContext(store=store, prefix="r/auto"), shards)
    assert (auto.split.replicas, auto.split.threads, auto.split.workers) == (2, 1, 0)
    one = RewardStage(RewardConfig.from_dict({"batch_size": 2, "replicas": 1}))
    stats = one.process_shards(StageContext(store=store, prefix="r/one"), shards)
    assert one.split.replicas == 1 and [s["out"] for s in stats] == [3, 3, 3, 3]
    for s in shards:
        assert store.read_bytes(f"r/auto/{s}") == store.read_bytes(f"r/one/{s}")
    # torch_threads set by hand: one process, as asked
    hand = RewardStage(RewardConfig.from_dict({"torch_threads": 1}))
    hand.process_shards(StageContext(store=store, prefix="r/hand"), shards)
    assert hand.split.replicas == 1 and hand.split.threads == 1
