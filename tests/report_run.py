"""A small curated run for the report and inspect tests, built once per test process.

The demo's photos (2 copies of each variant, 70 samples in 5 raw shards, with planted defects) through
score_length, score_clip (tiny random CLIP), hash_image, dedup, cluster, an LLM judge on a fake OpenAI
server (2 repeats; some replies unparseable, some samples with no parseable reply at all), select with
two thresholds and cluster quotas, and export."""

from __future__ import annotations

import hashlib
import os
import threading

from libcurate.demo import build
from libcurate.llm.testing import FakeOpenAIServer
from libcurate.pipeline import load_recipe
from libcurate.runner import run_recipe

THRESHOLDS = {"score_length.words": {"min": 14}, "judge_score.score": {"min": 2}}
_CACHE: dict = {}
_LOCK = threading.Lock()


def judge_reply(body: dict, seen: dict) -> str:
    """A deterministic judge: samples hash into three kinds (never parseable, one repeat unparseable,
    two parseable repeats that differ by 2 points)."""
    text = str(body["messages"][-1]["content"])
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    i = seen.setdefault(text, [0])
    i[0] += 1
    if h % 11 == 0:
        return "I would rather not rate this."
    if h % 5 == 0 and i[0] % 2 == 0:
        return "Score: **excellent**"
    return str((h % 8) + (2 if i[0] % 2 == 0 else 0))


def recipe(src: str, prefix: str, base_url: str) -> dict:
    return {"name": "report", "storage": {"prefix": prefix}, "workers": 1, "stages": [
        {"stage": "ingest", "with": {"format": "llava", "annotations": f"{src}/data.json", "images": src,
                                     "shard_size": 16}},
        {"stage": "score_length"},
        {"stage": "score_clip", "with": {"model": "test-tiny-clip", "batch_size": 16}},
        {"stage": "hash_image"},
        {"stage": "dedup", "with": {"hash": "hash_image.phash", "embedding": None, "keep_by": "score_clip.cosine"}},
        {"stage": "cluster", "with": {"method": "kmeans", "n_clusters": 4, "n_init": 2}},
        {"stage": "judge_score", "with": {"prompt": "conversation_quality_10", "repeats": 2, "llm": {
            "model": "judge-a", "base_url": base_url, "backoff_base_s": 0.002, "backoff_max_s": 0.01,
            "timeout_s": 2.0, "max_attempts": 2, "concurrency": 8, "temperature": 0.7,
            "price_prompt_per_1k": 0.5, "price_completion_per_1k": 1.5}}},
        {"stage": "select", "with": {"thresholds": THRESHOLDS, "score": "score_clip.cosine", "budget": 12,
                                     "strategy": {"kind": "cluster_proportional", "cluster": "cluster.cluster"}}},
        {"stage": "export", "with": {"formats": ["webdataset", "llava", "cc_sbu_align"], "shard_size": 5}}]}


def curated_run(tmp_path_factory) -> dict:
    """{"src", "prefix", "recipe"} of the run (built on first use)."""
    with _LOCK:
        if not _CACHE:
            root = tmp_path_factory.mktemp("reportrun")
            src = str(root / "source")
            build(src, copies=2)
            seen: dict = {}
            with FakeOpenAIServer(responder=lambda b: judge_reply(b, seen)) as srv:
                d = recipe(src, str(root / "run"), srv.base_url)
                run_recipe(load_recipe(d), progress=False)
            _CACHE.update(src=src, prefix=os.path.join(str(root), "run"), recipe=d)
        return dict(_CACHE)
