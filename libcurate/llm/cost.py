"""Tokens and dollars: the price table, the token count of a request, ``curate estimate`` and ``max_cost``.

**Prices.** :data:`PRICES` is a dated table (:data:`PRICES_DATE`, :data:`PRICES_SOURCE`) of USD per 1M
input / output tokens per model id. A stage's price for a model is, first match wins:

1. ``llm.price_prompt_per_1k`` / ``llm.price_completion_per_1k`` when either is set (> 0): that stage, any
   model;
2. ``llm.prices`` (``model: {input_per_1m, output_per_1m}``), filled from the recipe's top-level
   ``prices:`` (a mapping, or a path to a YAML/JSON file of one) under the stage's own ``llm.prices``;
3. the table, by the exact id or the id without a ``-YYYY-MM-DD`` snapshot suffix.

A model in none of them has an *unknown* price: its requests are counted in ``unpriced_requests``
(``_stats.llm``) and the estimate's cost is ``None`` with a warning, never 0. Batch API requests cost
half the table price (OpenAI's batch discount; not applied to explicit prices).

**Tokens.** ``tiktoken`` is not used: its encodings are downloaded on first use, which an offline pod
cannot do. The count is a documented approximation: ``ceil(characters / 4)`` per text part, 3 tokens of
framing per message and 3 for the reply's priming (OpenAI's chat accounting); an image costs what the
provider charges for its detail (OpenAI: ``low`` 85; ``high``/``auto`` 85 + 170 per 512-px tile after
fitting the image into 2048 x 2048 and then its short side to 768). The project's test server
(:mod:`libcurate.llm.testing`) counts the ``usage.prompt_tokens`` it returns with this same function, so
the estimate can be checked against what a server counted. On English prose ``characters / 4`` is within
about 10-20% of OpenAI's tokenizers; treat the estimate as such.

**Estimate.** ``curate estimate`` first runs the recipe's ingest stage if the store has no raw shard yet
(it is free and the run reuses it). :func:`estimate_recipe` then builds, without sending anything, every request each LLM stage of a
recipe would send (the stage's own ``plan`` over its inputs in the store) and sums tokens per stage: input
tokens exactly as above, output tokens as ``expected`` (the stage's ``typical_output_tokens``, capped by
``max_tokens``) and ``max`` (``max_tokens`` per request). Requests already in the response cache cost
nothing and are counted apart, as are repeats of an identical request (sent once). A stage whose inputs do not exist yet (it reads samples a generator writes
during the run) is listed with ``inputs_pending`` and counted from the samples that exist.

**max_cost.** :func:`check_before_stage` runs the estimate before each LLM stage sends anything and
raises :class:`~libcurate.stage.PermanentInputError` when the expected cost of the LLM stages already run
in this invocation plus those still to run exceeds the recipe's ``max_cost`` (or when a price is unknown,
since then the cost cannot be bounded). Checking again before each stage covers the samples a generator
wrote in between. Both backends call it: the local runner in :func:`~libcurate.runner.run_recipe`; an Argo
run (``workflows/dag.py``) in a ``<stage>-budget`` step (``python -m jobs.check_budget``, CPU image, no LLM
key) that the stage's first pod depends on. Over budget it exits 3, which the retry policy never retries,
so the workflow fails before the stage's first pod; each step prints the running ``spent`` for the next.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PRICES_DATE = "2025-06-01"
PRICES_SOURCE = "https://openai.com/api/pricing (standard tier, USD per 1M tokens)"
# model id -> (USD per 1M input tokens, USD per 1M output tokens)
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o3": (2.00, 8.00),
    "o4-mini": (1.10, 4.40),
}
BATCH_DISCOUNT = 0.5
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")

MESSAGE_OVERHEAD = 3
REPLY_PRIMING = 3
IMAGE_BASE = 85
IMAGE_TILE = 170


# -- prices -------------------------------------------------------------------------------------
def parse_prices(spec: Any) -> dict[str, tuple[float, float]]:
    """``{model: {input_per_1m, output_per_1m}}`` (or ``[in, out]``) -> ``{model: (in, out)}`` per 1M."""
    if not isinstance(spec, dict):
        raise ValueError("prices: want a mapping model -> {input_per_1m, output_per_1m}")
    out = {}
    for model, p in spec.items():
        if isinstance(p, dict) and set(p) == {"input_per_1m", "output_per_1m"}:
            pair = (p["input_per_1m"], p["output_per_1m"])
        elif isinstance(p, (list, tuple)) and len(p) == 2:
            pair = tuple(p)
        else:
            raise ValueError(f"prices.{model}: want {{input_per_1m: x, output_per_1m: y}}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in pair):
            raise ValueError(f"prices.{model}: prices must be numbers >= 0")
        out[str(model)] = (float(pair[0]), float(pair[1]))
    return out


def load_prices(spec: Any, resolve=lambda p: p) -> dict[str, tuple[float, float]]:
    """A recipe's ``prices:``: a mapping, or a path (resolved by ``resolve``) to a YAML/JSON file of one."""
    if spec is None or spec == {}:
        return {}
    if isinstance(spec, str):
        import yaml

        path = resolve(spec)
        try:
            with open(path, encoding="utf-8") as f:
                spec = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"prices: cannot read {path}: {e}") from e
    return parse_prices(spec)


def table_price(model: str) -> tuple[float, float] | None:
    """USD per 1M (input, output) tokens of ``model`` from :data:`PRICES`, or None."""
    return PRICES.get(model) or PRICES.get(_SNAPSHOT.sub("", model))


def model_price(settings, model: str) -> tuple[float, float, bool] | None:
    """USD per 1M (input, output) tokens of ``model`` under ``settings`` and whether they came from the
    table (the batch discount applies to those only); None when unknown."""
    if settings.price_prompt_per_1k > 0 or settings.price_completion_per_1k > 0:
        return settings.price_prompt_per_1k * 1000, settings.price_completion_per_1k * 1000, False
    over = getattr(settings, "prices", None) or {}
    if model in over:
        p = over[model]
        return float(p[0]), float(p[1]), False
    t = table_price(model)
    return (t[0], t[1], True) if t else None


def request_cost(settings, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """USD of one request, or None when the model's price is unknown."""
    p = model_price(settings, model)
    if p is None:
        return None
    cost = (prompt_tokens * p[0] + completion_tokens * p[1]) / 1e6
    return cost * BATCH_DISCOUNT if (p[2] and settings.batch_api) else cost


# -- tokens -------------------------------------------------------------------------------------
def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def image_tokens(width: int, height: int, detail: str = "auto") -> int:
    """OpenAI's image charge: 85 for ``low``; else 85 + 170 per 512-px tile after fitting into 2048 x 2048
    and scaling the short side down to 768 (``auto`` is counted as ``high``: an upper bound)."""
    if detail == "low":
        return IMAGE_BASE
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return IMAGE_BASE + IMAGE_TILE * math.ceil(w / 512) * math.ceil(h / 512)


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def body_prompt_tokens(body: dict) -> int:
    """Input tokens of a chat request body (API form: images as data URLs), by the rule above."""
    n = REPLY_PRIMING
    for m in body.get("messages", []):
        n += MESSAGE_OVERHEAD
        c = m.get("content")
        if isinstance(c, str):
            n += text_tokens(c)
            continue
        for part in c or []:
            if part.get("type") == "text":
                n += text_tokens(part.get("text", ""))
            elif part.get("type") == "image_url":
                iu = part.get("image_url") or {}
                url = iu.get("url", "")
                try:
                    w, h = _image_size(base64.b64decode(url.split(",", 1)[1]))
                except Exception:  # a remote URL or an unreadable image: the provider's minimum
                    n += IMAGE_BASE
                    continue
                n += image_tokens(w, h, iu.get("detail", "auto"))
    return n


def request_prompt_tokens(messages: list[dict]) -> int:
    """Input tokens of a request's messages (:class:`~libcurate.llm.messages.ImagePart` images), the same
    count as :func:`body_prompt_tokens` of its API body."""
    from .messages import ImagePart

    n = REPLY_PRIMING
    for m in messages:
        n += MESSAGE_OVERHEAD
        c = m["content"]
        if isinstance(c, str):
            n += text_tokens(c)
            continue
        for p in c:
            if isinstance(p, ImagePart):
                try:
                    w, h = _image_size(p.data)
                except Exception:
                    n += IMAGE_BASE
                    continue
                n += image_tokens(w, h, p.detail)
            else:
                n += text_tokens(p)
    return n


# -- the estimate -------------------------------------------------------------------------------
@dataclass
class StageEstimate:
    id: str
    stage: str
    models: list = field(default_factory=list)
    samples: int = 0
    requests: int = 0
    cached_requests: int = 0
    input_tokens: int = 0
    output_tokens_expected: int = 0
    output_tokens_max: int = 0
    cost_usd: float | None = 0.0
    cost_usd_max: float | None = 0.0
    unpriced_models: list = field(default_factory=list)
    inputs_pending: str | None = None
    done: bool = False

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("cost_usd", "cost_usd_max"):
            d[k] = None if d[k] is None else round(d[k], 6)
        return d


def stage_requests(stage, ctx, plan_followups: bool = True):
    """Every request ``stage`` would send over its inputs (yields ``(sample_count_increment, requests)``)."""
    stage.setup(ctx)
    for shard in ctx.raw_shards():
        for sample, extra in stage.inputs(ctx, shard):
            p = stage.plan(sample, extra)
            reqs = list(getattr(p, "requests", []) or [])
            if plan_followups and hasattr(stage, "estimate_followups"):
                reqs += stage.estimate_followups(p)
            yield 1, reqs


def estimate_stage(ps, recipe, store) -> StageEstimate:
    """The :class:`StageEstimate` of one planned LLM stage over what is in ``store`` now."""
    from ..runner import build_stage, context
    from .cache import ResponseCache
    from .messages import cache_key

    stage = build_stage(ps, recipe)
    ctx = context(ps, recipe, store, 1)
    s = stage.config.llm
    est = StageEstimate(ps.id, ps.stage)
    typical = getattr(stage, "typical_output_tokens", 200)
    models: set[str] = set()
    cache = ResponseCache(store, s.cache_prefix, None) if s.cache else None
    per_model: dict[str, list[int]] = {}
    seen: set[str] = set()
    try:
        for k, reqs in stage_requests(stage, ctx):
            est.samples += k
            for r in reqs:
                model = r.model or s.model
                params = {**s.sampling(), **r.params}
                if r.variant:
                    params["_variant"] = r.variant
                key = cache_key(model, r.template_version, r.messages, params)
                if key in seen or (cache is not None and cache._get(key)):
                    est.cached_requests += 1  # sent once per run (the client shares identical requests)
                    continue
                seen.add(key)
                models.add(model)
                mx = int(params.get("max_tokens", s.max_tokens))
                tin = request_prompt_tokens(r.messages)
                acc = per_model.setdefault(model, [0, 0, 0, 0])
                acc[0] += 1
                acc[1] += tin
                acc[2] += min(typical, mx)
                acc[3] += mx
    except Exception as e:  # an upstream output or a generated shard that does not exist yet
        est.inputs_pending = f"{type(e).__name__}: {e}"
    est.models = sorted(models)
    for model, (n, tin, tout, tmax) in per_model.items():
        est.requests += n
        est.input_tokens += tin
        est.output_tokens_expected += tout
        est.output_tokens_max += tmax
        c, cm = request_cost(s, model, tin, tout), request_cost(s, model, tin, tmax)
        if c is None:
            est.unpriced_models.append(model)
            est.cost_usd = est.cost_usd_max = None
        elif est.cost_usd is not None:
            est.cost_usd += c
            est.cost_usd_max += cm
    return est


def estimate_recipe(recipe, only: set[str] | None = None) -> dict:
    """Per LLM stage (those in ``only``, default all) and total: requests, tokens, cost (see the module
    docstring)."""
    from ..pipeline import plan
    from ..storage import open_store

    store = open_store(recipe.prefix, recipe.storage_options)
    stages = []
    generators: list[str] = []
    for ps in plan(recipe):
        if getattr(ps.cls, "generates_raw", False) and not store.list(f"{ps.prefix}/_done"):
            generators.append(ps.id)  # its samples appear during the run: later stages also see them
        if not getattr(ps.cls, "llm", False) or not hasattr(ps.config, "llm") or (only is not None
                                                                                   and ps.id not in only):
            continue
        est = estimate_stage(ps, recipe, store)
        if est.inputs_pending is None and [g for g in generators if g != ps.id]:
            est.inputs_pending = (f"also reads the samples {[g for g in generators if g != ps.id]} will "
                                  f"generate, not counted")
        stages.append(est)
    total_cost = None if any(e.cost_usd is None for e in stages) else sum(e.cost_usd for e in stages)
    total_max = None if any(e.cost_usd_max is None for e in stages) else sum(e.cost_usd_max for e in stages)
    out = {"stages": [e.to_dict() for e in stages],
           "total": {"requests": sum(e.requests for e in stages),
                     "cached_requests": sum(e.cached_requests for e in stages),
                     "input_tokens": sum(e.input_tokens for e in stages),
                     "output_tokens_expected": sum(e.output_tokens_expected for e in stages),
                     "output_tokens_max": sum(e.output_tokens_max for e in stages),
                     "cost_usd": None if total_cost is None else round(total_cost, 6),
                     "cost_usd_max": None if total_max is None else round(total_max, 6)},
           "prices_date": PRICES_DATE, "prices_source": PRICES_SOURCE,
           "max_cost": getattr(recipe, "max_cost", None),
           "warnings": []}
    for e in stages:
        if e.unpriced_models:
            out["warnings"].append(f"{e.id}: no price for model(s) {e.unpriced_models}: cost unknown (add them "
                                   f"to the recipe's prices: or set llm.price_prompt_per_1k)")
        if e.inputs_pending:
            out["warnings"].append(f"{e.id}: inputs not all available yet, counted from what exists "
                                   f"({e.inputs_pending[:200]})")
    return out


def format_estimate(est: dict) -> str:
    def usd(x):
        return "unknown" if x is None else f"${x:,.4f}"

    w = max([16] + [len(e["id"]) for e in est["stages"]])
    lines = [f"{'stage':<{w}} {'requests':>9} {'cached':>7} {'input tok':>11} {'output tok':>11} "
             f"{'(max)':>11} {'cost':>12} {'(max)':>12}"]
    for e in est["stages"]:
        lines.append(f"{e['id']:<{w}} {e['requests']:>9,} {e['cached_requests']:>7,} {e['input_tokens']:>11,} "
                     f"{e['output_tokens_expected']:>11,} {e['output_tokens_max']:>11,} {usd(e['cost_usd']):>12} "
                     f"{usd(e['cost_usd_max']):>12}")
    t = est["total"]
    lines.append(f"{'total':<{w}} {t['requests']:>9,} {t['cached_requests']:>7,} {t['input_tokens']:>11,} "
                 f"{t['output_tokens_expected']:>11,} {t['output_tokens_max']:>11,} {usd(t['cost_usd']):>12} "
                 f"{usd(t['cost_usd_max']):>12}")
    lines.append(f"prices: {est['prices_date']} ({est['prices_source']})")
    if est.get("max_cost") is not None:
        lines.append(f"max_cost: ${est['max_cost']:,.4f}")
    lines += [f"warning: {w}" for w in est["warnings"]]
    return "\n".join(lines) + "\n"


def enforce_max_cost(recipe, pending_ids: set[str] | None = None, spent: float = 0.0,
                     next_id: str | None = None) -> dict | None:
    """Raise :class:`~libcurate.stage.PermanentInputError` when ``spent`` (the expected cost of the LLM
    stages this run has already run) plus the estimated cost of the LLM stages in ``pending_ids`` (default
    all) exceeds ``recipe.max_cost``; the estimate, or None without a budget. Both backends call it
    through :func:`check_before_stage` before every LLM stage (``next_id``), so a stage reading samples a
    generator wrote is checked once they exist."""
    from ..stage import PermanentInputError

    budget = getattr(recipe, "max_cost", None)
    if budget is None:
        return None
    est = estimate_recipe(recipe, only=pending_ids)
    stages = est["stages"]
    where = f"before {next_id} sent anything" if next_id else "before any request"
    if any(e["cost_usd"] is None for e in stages):
        unknown = sorted({m for e in stages for m in e["unpriced_models"]})
        raise PermanentInputError(f"max_cost is ${budget:,.4f} but the price of {unknown} is unknown, so the "
                                  f"cost cannot be bounded; add them to the recipe's prices: (USD per 1M "
                                  f"tokens). Stopped {where}.")
    cost = spent + sum(e["cost_usd"] for e in stages)
    if cost > budget:
        per = ", ".join(f"{e['id']} ${e['cost_usd']:,.4f} ({e['requests']:,} requests)" for e in stages)
        raise PermanentInputError(f"estimated LLM cost ${cost:,.4f} exceeds max_cost ${budget:,.4f} (already run: "
                                  f"${spent:,.4f}; to run: {per}; prices of {PRICES_DATE}). Stopped {where}. "
                                  f"See `curate estimate`.")
    return est


def is_llm_stage(ps) -> bool:
    """Whether a planned stage sends LLM requests, so that ``max_cost`` is checked before it."""
    return bool(getattr(ps.cls, "llm", False))


def check_before_stage(recipe, planned, stage_id: str, spent: float = 0.0,
                       only: list[str] | set[str] | None = None) -> float:
    """The ``max_cost`` gate of both backends, run before the LLM stage ``stage_id`` of ``planned`` sends
    anything: :func:`enforce_max_cost` over this stage and the LLM stages after it (those in ``only``,
    default all), plus ``spent``. Returns ``spent`` plus this stage's expected cost: the ``spent`` of
    the next check (``run_recipe`` keeps it in a variable, an Argo run passes it from one
    ``python -m jobs.check_budget`` step to the next). Without a budget it returns ``spent``."""
    from ..stage import PermanentInputError

    i = next((k for k, p in enumerate(planned) if p.id == stage_id), None)
    if i is None or not is_llm_stage(planned[i]):
        raise PermanentInputError(f"max_cost: {stage_id!r} is not an LLM stage of the recipe")
    pending = {p.id for p in planned[i:] if is_llm_stage(p) and (not only or p.id in only)}
    est = enforce_max_cost(recipe, pending, spent, stage_id)
    if est is None:
        return spent
    return spent + sum(e["cost_usd"] for e in est["stages"] if e["id"] == stage_id)


def ensure_raw(recipe) -> bool:
    """Run the recipe's ingest stage when the store has no raw shard yet (it sends no request and the run
    reuses its output); True when it ran."""
    import sys

    from ..pipeline import plan
    from ..runner import run_stage
    from ..stage import raw_shards
    from ..storage import open_store

    store = open_store(recipe.prefix, recipe.storage_options)
    if raw_shards(store):
        return False
    print("estimate: no raw shards yet; running the ingest stage first (no LLM request; the run reuses it)",
          file=sys.stderr)
    run_stage(plan(recipe)[0], recipe, store, recipe.workers, progress=False)
    return True


def run_estimate(args) -> int:
    """``curate estimate RECIPE [--json]``."""
    import sys

    from ..pipeline import load_recipe

    recipe = load_recipe(args.recipe, prefix=args.prefix)
    ensure_raw(recipe)
    est = estimate_recipe(recipe)
    sys.stdout.write(json.dumps(est, indent=1, sort_keys=True) + "\n" if args.json else format_estimate(est))
    over = est["max_cost"] is not None and (est["total"]["cost_usd"] is None
                                            or est["total"]["cost_usd"] > est["max_cost"])
    return 1 if over else 0


def llm_stats_blocks(store, prefix: str) -> list[dict]:
    """The ``llm`` blocks of a stage's per-shard ``_stats`` files, or none for a stage that is not an LLM
    stage (its first stats file has no block; its other files are then not read)."""
    blocks = []
    names = [n for n in store.list(f"{prefix}/_stats") if n.endswith(".json")]
    for i, name in enumerate(names):
        llm = json.loads(store.read_text(f"{prefix}/_stats/{name.rsplit('/', 1)[-1]}")).get("llm")
        if isinstance(llm, dict):
            blocks.append(llm)
        elif i == 0:
            break
    return blocks


def sum_llm_stats(blocks: list[dict]) -> dict:
    """``_stats.llm`` blocks summed field by field: numbers added, counters (``errors``,
    ``quarantined_by_reason``) merged, ``model`` / ``prompt_version`` / ``judges`` from the first block
    that has them; a ``cost_usd`` of None (a model without a price) sets ``cost_unknown`` instead of
    counting as 0."""
    total: dict = {}
    for llm in blocks:
        for k, v in llm.items():
            if k == "cost_usd" and v is None:
                total["cost_unknown"] = True
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
            elif k in ("errors", "quarantined_by_reason") and isinstance(v, dict):
                d = total.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
            elif k in ("model", "prompt_version"):
                total.setdefault(k, v)
            elif k == "judges":
                total.setdefault(k, list(v))
    return total


USAGE_KEYS = ("requests", "cache_hits", "prompt_tokens", "completion_tokens", "cost_usd", "unpriced_requests",
              "reasks")


def usage_totals(stats_llm: list[dict]) -> dict:
    """Sum of ``_stats.llm`` blocks: requests, tokens, cost (None when any request had no price)."""
    summed = sum_llm_stats(stats_llm)
    t = {k: summed.get(k, 0) for k in USAGE_KEYS}
    t["cost_usd"] = None if t["unpriced_requests"] else round(float(t["cost_usd"]), 6)
    return t


def run_llm_usage(store, upstream: dict[str, str]) -> dict | None:
    """Actual requests, tokens and cost of the LLM stages among ``upstream`` (id -> prefix), from their
    ``_stats``: ``{"stages": {id: totals}, "total": totals}`` (what export writes into summary.json), or
    None when no LLM stage ran."""
    per = {}
    for sid, prefix in upstream.items():
        blocks = llm_stats_blocks(store, prefix)
        if blocks:
            per[sid] = usage_totals(blocks)
    if not per:
        return None
    total = usage_totals(list(per.values()))
    total["cost_usd"] = None if any(t["cost_usd"] is None for t in per.values()) else total["cost_usd"]
    return {"stages": per, "total": total, "prices_date": PRICES_DATE}
