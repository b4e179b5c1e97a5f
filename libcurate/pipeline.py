"""Recipe -> ordered, hashed stages. Both backends (local runner, Argo) are generated from :func:`plan`.

A recipe (YAML)::

    name: demo
    storage:
      prefix: ./demo-run            # local directory or s3://bucket/prefix
      options: {endpoint_url: ...}  # optional S3Options
    workers: 2                      # local runner: shards processed in parallel
    device: cpu
    stages:
      - stage: ingest
        with: {format: llava, annotations: data.json, images: images/, shard_size: 256}
      - stage: score_clip
        with: {model: test-tiny-clip}
      - stage: select
        with: {thresholds: {score_clip.cosine: {min: 0.1}}, budget: 100, rank_by: score_clip.cosine}
      - stage: export
        with: {formats: [webdataset, llava]}

Each stage's output prefix carries a hash of its config chained with the previous stage's hash, so a
changed setting re-runs that stage and everything after it, and nothing else. ``ingest`` always writes
``raw/`` (images are written once); its hash is recorded in ``raw/_ingest.json`` and checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .registry import stage_class
from .stage import PermanentInputError, Stage, config_hash


@dataclass
class PlannedStage:
    """One stage of a planned recipe.

    Attributes:
        id: unique name in the recipe (``as:`` or the stage name).
        stage: the registered stage name.
        config: the validated config object.
        cfg_hash: chained config hash.
        prefix: output prefix relative to the run root.
        upstream: id -> prefix of every earlier stage.
        cls: the Stage subclass.
    """

    id: str
    stage: str
    config: Any
    cfg_hash: str
    prefix: str
    upstream: dict[str, str]
    cls: type[Stage]

    def build(self) -> Stage:
        return self.cls(self.config)

    @property
    def kind(self) -> str:
        return self.cls.kind

    @property
    def profile(self) -> str:
        return getattr(self.config, "profile", None) or self.cls.profile

    @property
    def reads(self):
        return self.cls.reads(self.config)

    @property
    def image(self) -> str:
        return self.cls.image_for(self.config)


@dataclass
class Recipe:
    """A parsed recipe. Attributes mirror the YAML keys; ``base_dir`` resolves relative paths."""

    name: str
    prefix: str
    storage_options: dict = field(default_factory=dict)
    workers: int = 1
    device: str = "cpu"
    stages: list[dict] = field(default_factory=list)
    base_dir: str = "."
    schedule: str | None = None
    max_cost: float | None = None      # USD; a local run stops before its first LLM request beyond it
    prices: dict = field(default_factory=dict)  # model -> (USD per 1M input, output): libcurate.llm.cost

    def resolve(self, path: str) -> str:
        """A path from the recipe, relative to the recipe file unless absolute or s3://."""
        if path.startswith("s3://") or os.path.isabs(path):
            return path
        return os.path.normpath(os.path.join(self.base_dir, path))


def load_recipe(path_or_dict: str | dict, prefix: str | None = None) -> Recipe:
    """Parse and validate a recipe file (or dict). ``prefix`` overrides ``storage.prefix``."""
    if isinstance(path_or_dict, dict):
        d, base = path_or_dict, "."
    else:
        try:
            with open(path_or_dict, encoding="utf-8") as f:
                d = yaml.safe_load(f)
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            raise PermanentInputError(f"cannot read recipe {path_or_dict}: {e}") from e
        base = os.path.dirname(os.path.abspath(path_or_dict))
    if not isinstance(d, dict):
        raise PermanentInputError("a recipe must be a mapping")
    unknown = set(d) - {"name", "storage", "workers", "device", "stages", "schedule", "max_cost", "prices"}
    if unknown:
        raise PermanentInputError(f"unknown recipe key(s) {sorted(unknown)}")
    storage = d.get("storage") or {}
    if isinstance(storage, str):
        storage = {"prefix": storage}
    if prefix and not prefix.startswith("s3://"):
        prefix = os.path.abspath(prefix)  # given on the command line: relative to the working directory
    r = Recipe(
        name=str(d.get("name") or "curate"),
        prefix=prefix or storage.get("prefix") or "",
        storage_options=storage.get("options") or {},
        workers=int(d.get("workers", 1)),
        device=str(d.get("device", "cpu")),
        stages=list(d.get("stages") or []),
        base_dir=base,
        schedule=d.get("schedule"),
    )
    if d.get("max_cost") is not None:
        if isinstance(d["max_cost"], bool) or not isinstance(d["max_cost"], (int, float)) or d["max_cost"] < 0:
            raise PermanentInputError("max_cost: want a number of USD >= 0")
        r.max_cost = float(d["max_cost"])
    from .llm.cost import load_prices

    try:
        r.prices = load_prices(d.get("prices"), r.resolve)
    except ValueError as e:
        raise PermanentInputError(str(e)) from e
    if not r.prefix:
        raise PermanentInputError("recipe needs storage.prefix (a directory or s3://bucket/prefix)")
    if not r.prefix.startswith("s3://"):
        r.prefix = r.resolve(r.prefix)
    if not r.stages:
        raise PermanentInputError("recipe has no stages")
    if r.workers < 1:
        raise PermanentInputError("workers must be >= 1")
    return r


def plan(recipe: Recipe) -> list[PlannedStage]:
    """Validate every stage's config and compute chained hashes and output prefixes."""
    out: list[PlannedStage] = []
    upstream_hash: str | None = None
    seen: dict[str, str] = {}
    for i, entry in enumerate(recipe.stages):
        if not isinstance(entry, dict) or "stage" not in entry:
            raise PermanentInputError(f"stages[{i}]: want a mapping with a 'stage' key")
        extra = set(entry) - {"stage", "with", "as"}
        if extra:
            raise PermanentInputError(f"stages[{i}]: unknown key(s) {sorted(extra)}")
        name = entry["stage"]
        sid = entry.get("as") or name
        if sid in seen:
            raise PermanentInputError(f"stages[{i}]: duplicate stage id {sid!r} (use 'as:' to rename)")
        cls = stage_class(name)
        settings = dict(entry.get("with") or {})
        if cls.produces_raw and i != 0:
            raise PermanentInputError(f"{name} writes the raw shards: it must be the first stage")
        if i == 0 and not cls.produces_raw:
            raise PermanentInputError("the first stage must be ingest")
        settings = cls.prepare_settings(settings, recipe.resolve)
        config = cls.Config.from_dict(settings)
        if recipe.prices and hasattr(config, "llm"):  # recipe-wide prices under the stage's own (unhashed)
            config.llm.prices = {**recipe.prices, **config.llm.prices}
        h = config_hash(name, config.hash_dict(), upstream_hash)
        prefix = "raw" if cls.produces_raw else f"{cls.output_root}/{sid}/{h}"
        ps = PlannedStage(sid, name, config, h, prefix, dict(seen), cls)
        # What the stage reads must exist earlier in the recipe: checked here, at `curate plan`, not
        # hours later inside the stage.
        reads = cls.reads(config)
        unknown = sorted(r for r in reads.stages if r not in seen)
        if unknown:
            raise PermanentInputError(f"stages[{i}] ({sid}): reads {unknown}, which are not earlier stages "
                                      f"(earlier: {sorted(seen)})")
        out.append(ps)
        seen[sid] = prefix
        upstream_hash = h
    return out
