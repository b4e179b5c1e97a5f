"""Self-Filter: the weighted loss against a hand computation, gradients into both models, the reference
trainer's determinism, and recipes/self_filter.yaml end to end on a small demo set (exactly the budget,
a reason for every drop, audit ok)."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from libcurate.train import self_filter as SF

ROOT = Path(__file__).resolve().parents[1]


def test_weighted_loss_equals_hand_computation():
    # B = 2 samples, 3 token positions; sample 0 has 2 valid tokens, sample 1 has 3.
    loss = torch.tensor([[1.0, 2.0, 9.0], [0.5, 1.5, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    scores = torch.tensor([0.0, math.log(3.0)])              # softmax -> [1/4, 3/4]; w = 2p -> [0.5, 1.5]
    got = SF.weighted_token_loss(loss, mask, scores)
    hand = (0.5 * (1.0 + 2.0) + 1.5 * (0.5 + 1.5 + 3.0)) / 5   # normalised by the batch's 5 valid tokens
    assert got.item() == pytest.approx(hand)
    assert SF.sample_weights(scores).tolist() == pytest.approx([0.5, 1.5])
    # equal scores: every weight 1, the plain loss (not a per-sample mean: (3 + 5) / 5, not (1.5 + 5/3) / 2)
    assert SF.weighted_token_loss(loss, mask, torch.zeros(2)).item() == pytest.approx(8.0 / 5)
    assert SF.unweighted_token_loss(loss, mask).item() == pytest.approx(8.0 / 5)


def test_token_losses_shift_and_mask():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 5.0                                      # position 0 predicts label[1] = 2
    labels = torch.tensor([[-100, 2, -100]])
    loss, mask = SF.token_losses(logits, labels)
    assert mask.tolist() == [[1.0, 0.0]]
    expected = -torch.log_softmax(logits[0, 0], -1)[2]
    assert loss[0, 0].item() == pytest.approx(expected.item()) and loss[0, 1].item() == 0.0


def test_gradients_reach_score_net_and_vlm():
    from libcurate.train.reference_vlm import VLMConfig, build_model, collate, Example

    torch.manual_seed(0)
    cfg = VLMConfig(image_size=16, patch_size=8, max_text=32)
    model = build_model(cfg)
    net = SF.ScoreNet(4)
    ex = [Example(str(i), None, [257, 259, 65 + i, 260, 66, 67, 258], [-100] * 4 + [66, 67, 258], False)
          for i in range(3)]
    pixels = {e.key: torch.randn(3, 16, 16) for e in ex}
    px, ids, att, lab = collate(ex, pixels, model.n_vis)
    loss, mask = SF.token_losses(model(px, ids, att), lab)
    SF.weighted_token_loss(loss, mask, net(torch.randn(3, 4))).backward()
    assert net.linear.weight.grad is not None and net.linear.weight.grad.abs().sum() > 0
    for part in (model.vision, model.projector, model.lm):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, part.__class__.__name__
    # difficulty is the negated score
    f = torch.randn(5, 4)
    assert torch.allclose(SF.difficulty(net, f), -net(f).detach())


def _llava(tmp: Path, n: int, prefix: str) -> Path:
    from PIL import Image

    (tmp / "img").mkdir(exist_ok=True)
    rng = np.random.default_rng(len(prefix))
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp / "img" / f"{prefix}{i}.png")
        recs.append({"id": f"{prefix}{i}", "image": f"img/{prefix}{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat number?"}, {"from": "gpt", "value": f"N{i % 3}."}]})
    path = tmp / f"{prefix}.json"
    path.write_text(json.dumps(recs))
    return path


def test_reference_trainer_is_deterministic_and_writes_difficulty(tmp_path):
    from libcurate.train import contract as C
    from libcurate.train.reference_vlm import main

    data = tmp_path / "data"
    (data / "llava").mkdir(parents=True)
    src = _llava(data / "llava", 10, "s")
    src.rename(data / "llava" / "data.json")
    keys = [f"s{i}" for i in range(10)]
    (data / "keys.txt").write_text("\n".join(keys[::-1]) + "\n")   # any order: rows follow keys.txt
    C.write_features(str(data), np.arange(20, dtype=np.float32).reshape(10, 2)[::-1] / 20, ["a.x", "a.y"], [1, 1])
    ev = _llava(tmp_path, 4, "e")
    results = []
    for run in ("r1", "r2"):
        wd = tmp_path / run
        wd.mkdir()
        argv = ["--data", str(data), "--workdir", str(wd), "--eval", str(ev), "--steps", "3", "--batch-size", "4",
                "--self-filter", "--image-size", "16", "--threads", "1"]
        assert main(argv) == 0
        res = json.loads((wd / "result.json").read_text())
        outs = [json.loads(x) for x in (wd / "outputs.jsonl").read_text().splitlines()]
        results.append((res, outs))
    (r1, o1), (r2, o2) = results
    for k in ("eval_loss", "eval_accuracy", "train_loss_first", "train_loss_last"):
        assert r1[k] == r2[k], k
    assert o1 == o2 and sorted(o["key"] for o in o1) == sorted(keys)
    assert r1["feature_names"] == ["a.x", "a.y"] and r1["eval_short_answers"] == 4
    assert r1["train_loss_last"] < r1["train_loss_first"]
    # bad input: exit 3 (permanent), never a result
    wd = tmp_path / "bad"
    wd.mkdir()
    assert main(["--data", str(tmp_path / "nowhere"), "--workdir", str(wd)]) == 3
    assert not (wd / "result.json").exists()


def test_self_filter_recipe_end_to_end(tmp_path):
    """recipes/self_filter.yaml on a small demo set: exactly the budget, a reason for every drop, audit ok."""
    from libcurate.audit import audit, current_prefixes
    from libcurate.demo import build
    from libcurate.pipeline import load_recipe, plan
    from libcurate.runner import run_recipe
    from libcurate.select.stage import read_decisions
    from libcurate.stage import raw_shards
    from libcurate.storage import open_store

    src = tmp_path / "source"
    build(str(src), copies=2)
    # the held-out eval set: no image shared with the training data (other crops); its short question-answer
    # pairs appear nowhere in training (its long answers are the photos' descriptions, on new crops)
    train_recs, eval_recs = (json.loads((src / f).read_text()) for f in ("data.json", "eval.json"))
    digest = {r["image"]: (src / r["image"]).read_bytes() for r in train_recs if (src / r["image"]).exists()}
    assert not {(src / r["image"]).read_bytes() for r in eval_recs} & set(digest.values())
    short = [json.dumps(r["conversations"]) for r in eval_recs if len(r["conversations"][1]["value"]) <= 32]
    assert len(short) == len(eval_recs) // 2
    assert not set(short) & {json.dumps(r["conversations"]) for r in train_recs}
    d = yaml.safe_load((ROOT / "recipes" / "self_filter.yaml").read_text())
    d["storage"]["prefix"] = str(tmp_path / "run")
    for st in d["stages"]:
        w = st.get("with") or {}
        for k in ("annotations", "images", "eval"):
            if k in w:
                w[k] = w[k].replace("../demo-run/source", str(src))
        if st["stage"] == "train":
            args = w["trainer"]["args"]
            args[args.index("--steps") + 1] = "4"              # a short run: the test checks the plumbing
    path = tmp_path / "self_filter.yaml"
    path.write_text(yaml.safe_dump(d))
    r = load_recipe(str(path))
    run_recipe(r, progress=False)
    store = open_store(r.prefix)
    stages = {p.id: p.prefix for p in plan(r)}
    sel = stages["select"]
    decisions = [x for s in raw_shards(store) for x in read_decisions(store, sel, s)]
    n = len(decisions)
    budget = math.floor(0.1585 * n)
    kept = [x for x in decisions if x["selected"]]
    assert len(kept) == budget > 0
    assert all(x.get("reason") for x in decisions if not x["selected"])
    exported = json.loads(Path(glob.glob(str(tmp_path / "run" / stages["export"] / "llava" / "data.json"))[0]).read_text())
    assert sorted(e["id"] for e in exported) == sorted(x["key"] for x in kept)
    rep = audit(store, current_prefixes(r))
    assert rep["ok"], rep
    # the kept samples are the hardest after the diversity penalty: every kept one has a difficulty
    res = json.loads((tmp_path / "run" / stages["train"] / "_units" / "all" / "result.json").read_text())
    assert res["self_filter"] and res["feature_names"] == list(SF.FEATURE_SETTINGS["clip"])


@pytest.mark.parametrize("version", ["v3.6.10", "v4.1.2"])
def test_self_filter_recipe_renders_for_argo(tmp_path, version):
    """recipes/self_filter.yaml renders: stage 1 is one GPU pod (unit `all`) with its toleration, node
    selector and deadline; every Argo document validates against the pinned schema."""
    import warnings

    import jsonschema

    from libcurate.train.contract import POD_SLACK_S
    from workflows.render import render

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # the demo's inputs are local paths
        paths = render(str(ROOT / "recipes" / "self_filter.yaml"), str(tmp_path), prefix="s3://curate-demo/sf")
    defs = json.loads((ROOT / "tests" / "data" / "argo-schemas" / f"argo-workflows-{version}.schema.json")
                      .read_text())["definitions"]
    docs = [yaml.safe_load(Path(p).read_text()) for p in paths]
    for doc in docs:
        if doc["apiVersion"].startswith("argoproj.io"):
            v = jsonschema.Draft7Validator({"$ref": f"#/definitions/io.argoproj.workflow.v1alpha1.{doc['kind']}",
                                            "definitions": defs})
            assert not [e.message for e in v.iter_errors(doc)]
    wt = next(d for d in docs if d["kind"] == "WorkflowTemplate")
    unit = next(t for t in wt["spec"]["templates"] if t["name"] == "train-train-unit")
    assert unit["container"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert unit["tolerations"] and unit["nodeSelector"]
    assert int(unit["activeDeadlineSeconds"]) == 3600 + POD_SLACK_S


def test_score_net_learns_which_samples_are_hard():
    """Co-training moves weight to low-loss samples, so the difficulty (-score) of samples whose answers
    are random bytes ends above that of samples that all share one short answer (the sign convention)."""
    from libcurate.train.reference_vlm import Example, VLMConfig, encode_conversation, train

    rng = np.random.default_rng(0)
    cfg = VLMConfig(image_size=16, patch_size=8, max_text=64)
    ex, feats = [], []
    for i in range(32):
        hard = i % 2 == 1
        answer = "".join(chr(c) for c in rng.integers(97, 123, 40)) if hard else "Yes."
        ids, labels = encode_conversation([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": answer}],
                                          cfg.max_text)
        ex.append(Example(f"k{i}", None, ids, labels, False))
        feats.append([0.0, 1.0] if hard else [1.0, 0.0])
    torch.set_num_threads(1)
    _, diff = train(ex, [], cfg, steps=30, batch_size=8, lr=3e-3, seed=0, features=np.array(feats, np.float32),
                    self_filter=True)
    hard = np.mean([diff[e.key] for i, e in enumerate(ex) if i % 2 == 1])
    easy = np.mean([diff[e.key] for i, e in enumerate(ex) if i % 2 == 0])
    assert hard > easy, (hard, easy)
