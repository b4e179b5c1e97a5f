"""Benchmark the training side of the learned selectors (issue 9), each figure beside its plain alternative.

    .venv/bin/python bench/trainer.py --json          # all figures (about 3 min on 2 shared cores)
    .venv/bin/python bench/trainer.py --only vlm      # one of: vlm, contract, selector

Figures (the last line with ``--json`` holds them all):

* ``vlm_plain_samples_per_s`` / ``vlm_self_filter_samples_per_s``: the reference VLM
  (:mod:`libcurate.train.reference_vlm`, default sizes, 32 px images, batch 16) trained on CPU with the
  plain token loss and with Self-Filter's score net + weighted loss on 1,536-d features (the CLIP
  setting's width); ``self_filter_overhead``: the ratio of the two (the cost of the score net). Best of
  5 alternating repetitions after a warm-up, one torch thread by default (the machine is shared).
* ``contract_overhead``: one unit of 256 samples through the ``train`` stage (export to LLaVA JSON +
  images, features, the trainer as a subprocess, result checks, sidecars) vs the same training called
  in-process (model build, image loading and training): the wall time the contract adds, as a ratio
  and in seconds; best of 2 each.
* ``selector_train_s``: InstructionGPT-4's selector (``libcurate.train.ig4_selector``) on 30 subsets x
  114 samples of the seed's widths (1,280-d image, 4,096-d text embeddings, 4 indicators; random values:
  only the time means anything), with the PCA fit time and the time to score every sample.

No GPU in this environment: every figure is CPU. On a GPU pool the reference trainer takes
``--device cuda`` (its ``--device auto`` default picks it).
"""

from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import shutil
import tempfile
import time

import numpy as np


def _unit(tmp: str, n: int, seed: int = 0, feat_dim: int = 1536) -> tuple[str, str]:
    """A unit's data/ directory (LLaVA JSON + PNGs + keys + features) and an eval set, synthetic."""
    from PIL import Image

    from libcurate.train import contract as C

    rng = np.random.default_rng(seed)
    data = os.path.join(tmp, "data")
    os.makedirs(os.path.join(data, "llava", "images"), exist_ok=True)
    words = "the a cat dog red blue sky car tree small large image shows two three on under near".split()
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            os.path.join(data, "llava", "images", f"{i}.png"))
        answer = " ".join(rng.choice(words, 20)) + "."
        recs.append({"id": f"k{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image in detail."}, {"from": "gpt", "value": answer}]})
    with open(os.path.join(data, "llava", "data.json"), "w") as f:
        json.dump(recs, f)
    with open(os.path.join(data, "keys.txt"), "w") as f:
        f.write("".join(f"k{i}\n" for i in range(n)))
    C.write_features(data, rng.standard_normal((n, feat_dim)).astype(np.float32), ["f"], [feat_dim])
    return data, os.path.join(data, "llava", "data.json")


def bench_vlm(steps: int = 10, batch: int = 16, reps: int = 5) -> dict:
    """Plain and Self-Filter training alternated ``reps`` times after a warm-up; the best of each (the
    machine is shared: the fastest repetition is the one least disturbed by other processes)."""
    from libcurate.train import contract as C
    from libcurate.train.reference_vlm import VLMConfig, load_llava, train

    tmp = tempfile.mkdtemp(prefix="bench-vlm-")
    try:
        data, _ = _unit(tmp, 256)
        cfg = VLMConfig()
        ex = load_llava(os.path.join(data, "llava", "data.json"), cfg.max_text)
        feats, _ = C.load_features(data)
        train(ex, [], cfg, steps=2, batch_size=batch, lr=1e-3, seed=0)          # warm-up
        best: dict[str, float] = {}
        for rep in range(reps):
            pair = (("plain", False), ("self_filter", True))
            for name, sf in pair if rep % 2 == 0 else pair[::-1]:     # alternate which runs first
                res, _ = train(ex, [], cfg, steps=steps, batch_size=batch, lr=1e-3, seed=0, features=feats,
                               self_filter=sf)
                best[name] = max(best.get(name, 0.0), res["samples_per_s"])
        out = {f"vlm_{k}_samples_per_s": v for k, v in best.items()}
        out["self_filter_overhead"] = round(best["plain"] / best["self_filter"], 3)
        out.update(vlm_steps=steps, vlm_batch=batch, vlm_reps=reps, vlm_parameters=res["parameters"], device="cpu")
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_contract(n: int = 256, steps: int = 10, reps: int = 2) -> dict:
    """The train stage around one unit vs the same training in-process (best of ``reps`` each)."""
    import yaml
    from PIL import Image

    from libcurate.pipeline import load_recipe, plan
    from libcurate.runner import run_recipe, run_stage
    from libcurate.storage import open_store
    from libcurate.train.reference_vlm import VLMConfig, load_llava, train

    tmp = tempfile.mkdtemp(prefix="bench-contract-")
    try:
        rng = np.random.default_rng(1)
        src = os.path.join(tmp, "src")
        os.makedirs(os.path.join(src, "images"))
        recs = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(os.path.join(src, "images", f"{i}.png"))
            recs.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
                {"from": "human", "value": f"<image>\nWhat is shown {i}?"},
                {"from": "gpt", "value": f"A noise pattern number {i} with many colours."}]})
        with open(os.path.join(src, "data.json"), "w") as f:
            json.dump(recs, f)
        import torch

        args = ["--data", "{data}", "--workdir", "{workdir}", "--steps", str(steps), "--batch-size", "16",
                "--threads", str(torch.get_num_threads())]
        recipe = {"name": "b", "storage": {"prefix": os.path.join(tmp, "run")}, "stages": [
            {"stage": "ingest", "with": {"format": "llava", "annotations": os.path.join(src, "data.json"),
                                         "images": src, "shard_size": 64}},
            {"stage": "train", "with": {"unit_by": "all", "label": "train_loss_last", "keep_data": True, "trainer": {
                "command": ["python", "-m", "libcurate.train.reference_vlm"], "args": args}}}]}
        path = os.path.join(tmp, "r.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(recipe, f)
        r = load_recipe(path)
        run_recipe(r, progress=False, only=["ingest"])
        ps = plan(r)[-1]
        stage_s, direct_s = [], []
        for _ in range(reps):
            shutil.rmtree(os.path.join(tmp, "run", ps.prefix), ignore_errors=True)   # train again
            t0 = time.perf_counter()
            run_stage(ps, r, open_store(r.prefix), progress=False)
            stage_s.append(time.perf_counter() - t0)
            unit = os.path.join(tmp, "run", ps.prefix, "_units", "all")
            with open(os.path.join(unit, "result.json")) as f:
                res = json.load(f)
            # The plain alternative: the same training called in this process on the exported unit.
            t0 = time.perf_counter()
            ex = load_llava(os.path.join(unit, "data", "llava", "data.json"), VLMConfig.max_text)
            train(ex, [], VLMConfig(), steps=steps, batch_size=16, lr=1e-3, seed=0)
            direct_s.append(time.perf_counter() - t0)
        s, d = min(stage_s), min(direct_s)
        return {"contract_unit_samples": n, "contract_steps": steps, "contract_reps": reps,
                "contract_stage_s": round(s, 3), "contract_direct_s": round(d, 3),
                "contract_trainer_train_s": res["train_seconds"], "contract_overhead": round(s / d, 3),
                "contract_added_s": round(s - d, 3)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_selector() -> dict:
    try:
        from libcurate.train import ig4_selector
    except ImportError as e:
        return {"selector_error": f"libcurate.train.ig4_selector not importable: {e}"}
    t = ig4_selector.time_selector(n_subsets=30, subset_size=114)
    return {f"selector_{k}": v for k, v in t.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/trainer.py")
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", choices=("vlm", "contract", "selector"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine OpenMP threads spin-wait for a busy core, "
                        "and timings swing by 10x or more)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "gpu": torch.cuda.is_available()}
    for name, fn in (("vlm", bench_vlm), ("contract", bench_contract), ("selector", bench_selector)):
        if args.only and args.only != name:
            continue
        r = fn()
        out.update(r)
        if not args.json:
            for k, v in r.items():
                print(f"{k:<36} {v}")
    if args.json:
        print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
