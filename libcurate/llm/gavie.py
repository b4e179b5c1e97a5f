"""GAVIE: an LLM judges relevancy and accuracy (0–10 each) of answers against dense region captions.

The judge never sees pixels: the image is given as Visual Genome style region captions with boxes
(``image_id -> [{"caption", "bbox": [x, y, w, h]}]``), one line per region,
``<caption> X: <x> Y: <y> Width: <w> Height: <h>`` (LRV-Instruction's format, with the height bug fixed).
By default each prompt holds ONE answer, so there is no position or anchoring bias between answers
(LRV put all models' answers in one prompt in a fixed order); ``answers_per_prompt > 1`` in the eval CLI
groups answers of different models in a per-question shuffled order and maps the scores back.

Two entry points:

* the ``judge_gavie`` stage (:class:`GavieStage`): every (instruction, answer) turn of every raw sample is
  judged; regions come from ``sample.metadata["regions"]`` or from ``regions_file`` keyed by the sample's
  image id (:func:`~libcurate.formats.lrv.lookup_regions`: an LRV sample's Visual Genome id). Sidecar
  ``{key}.json``: ``accuracy`` and ``relevancy`` (means over turns), ``turns`` (per turn: both scores,
  both reasons, raw reply), ``n_turns``, ``model``, ``prompt_version``.
  A sample without regions is quarantined (``no_regions``); one with any unparseable turn is quarantined
  (``unparseable_reply``) rather than averaged over fewer turns; failed calls -> ``llm_call_failed``.
* the eval CLI (:func:`add_eval_arguments`, :func:`run_eval`; wired as ``curate eval gavie``): a file of
  model outputs ``{image_id, question|instruction, answer, model}`` -> a markdown leaderboard (mean
  accuracy, mean relevancy, counts of judged and failed items per model) and optional per-item JSONL.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

from ..formats.lrv import lookup_regions
from ..records import Sample
from ..stage import PermanentInputError, StageConfig, StageContext
from .client import LLMClient, LLMRequest, LLMResult, LLMSettings, UsageStats
from .parsing import ParseFailure, parse_gavie
from .prompts import PromptTemplate, load_template, pinned_template
from .stage import LLMShardStage, Plan, Reject

GAVIE_SCHEMA = {"type": "json_schema", "json_schema": {"name": "gavie", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["relevancy", "accuracy"],
    "properties": {c: {"type": "object", "additionalProperties": False, "required": ["score", "reason"],
                       "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10},
                                      "reason": {"type": "string"}}} for c in ("relevancy", "accuracy")}}}}


def format_regions(regions: list[dict], max_regions: int = 0) -> str:
    """One ``<caption> X: x Y: y Width: w Height: h`` line per region (``bbox = [x, y, w, h]``)."""
    lines = []
    for r in regions[: max_regions or None]:
        x, y, w, h = (int(round(float(v))) for v in r["bbox"])
        lines.append(f"{str(r['caption']).strip()} X: {x} Y: {y} Width: {w} Height: {h}")
    return "\n".join(lines)


def validate_regions(regions: Any) -> str | None:
    """None if ``regions`` is a non-empty list of {caption, bbox:[x,y,w,h]}; else what is wrong."""
    if not isinstance(regions, list) or not regions:
        return "no regions"
    for i, r in enumerate(regions):
        if not isinstance(r, dict) or not isinstance(r.get("caption"), str) or not r["caption"].strip():
            return f"region {i}: no caption"
        b = r.get("bbox")
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
            return f"region {i}: bbox must be [x, y, w, h]"
    return None


def reply_format(n_answers: int, structured: bool) -> str:
    if structured:
        return ('Reply with only a JSON object: {"relevancy": {"score": <0-10>, "reason": "<one sentence>"}, '
                '"accuracy": {"score": <0-10>, "reason": "<one sentence>"}}.')
    rows = []
    for crit in ("Relevancy", "Accuracy"):
        rows.append(f"{crit}:")
        for k in range(1, n_answers + 1):
            rows += [f"score of answer{k}: <a number from 0 to 10>", "reason: <one sentence>"]
    return "Reply in exactly this format and nothing else:\n" + "\n".join(rows)


def render_answers(answers: list[str]) -> str:
    return "\n".join(f"<answer{k}>\n{a}\n</answer{k}>" for k, a in enumerate(answers, 1))


def gavie_request(tpl: PromptTemplate, regions: list[dict], instruction: str, answers: list[str],
                  structured: bool = False, max_regions: int = 0, model: str | None = None) -> LLMRequest:
    msgs = tpl.render(regions=format_regions(regions, max_regions), instruction=instruction,
                      answers=render_answers(answers), reply_format=reply_format(len(answers), structured))
    params = {"response_format": GAVIE_SCHEMA} if structured and len(answers) == 1 else {}
    return LLMRequest(msgs, tpl.version, model=model, params=params)


def read_json_any(url: str) -> Any:
    """A JSON (or JSONL, by extension) file from a local path or an ``s3://`` URL."""
    from ..storage import open_store

    parent, _, name = url.rstrip("/").rpartition("/")
    data = open_store(parent or ".").read_text(name)
    if url.endswith(".jsonl"):
        return [json.loads(line) for line in data.splitlines() if line.strip()]
    return json.loads(data)


# -- the stage ---------------------------------------------------------------------------------
class RegionsInput:
    """Mixin of the stages that see an image as region captions (``judge_gavie``, ``generate_lrv``).

    The config's ``regions_file`` (JSON ``image_id -> [{caption, bbox}]``, local or ``s3://``) is read once
    per process; :meth:`sample_regions` takes ``metadata["regions"]`` first, else the file's entry for
    the sample's image id (:func:`~libcurate.formats.lrv.lookup_regions`)."""

    _regions: dict | None = None

    @classmethod
    def prepare_settings(cls, settings: dict, resolve) -> dict:
        """``regions_file`` is relative to the recipe, like ingest's paths."""
        if isinstance(settings.get("regions_file"), str) and settings["regions_file"]:
            settings["regions_file"] = resolve(settings["regions_file"])
        return settings

    def setup(self, ctx: StageContext) -> None:
        if self.config.regions_file and self._regions is None:
            try:
                self._regions = {str(k): v for k, v in read_json_any(self.config.regions_file).items()}
            except (FileNotFoundError, ValueError, AttributeError) as e:
                raise PermanentInputError(f"cannot read regions_file {self.config.regions_file!r}: {e}") from e

    def sample_regions(self, sample: Sample) -> list[dict] | Reject:
        """The sample's valid regions, or a ``no_regions`` :class:`Reject` saying what is wrong."""
        regions = sample.metadata.get("regions")
        if regions is None and self._regions is not None:
            regions = lookup_regions(self._regions, sample)  # LRV: the plain image id, not image_id#i
        why = validate_regions(regions)
        if why:
            return Reject("no_regions", f"{why} for original_id {sample.source.original_id!r}")
        return regions


@dataclass
class GavieConfig(StageConfig):
    """Settings of ``judge_gavie``.

    Attributes:
        prompt: template name or path (built-in ``gavie``).
        regions_file: optional JSON ``image_id -> [{caption, bbox}]`` (local path or ``s3://``); a sample's
            ``metadata["regions"]`` wins over it. Looked up by the sample's image id
            (``formats.lrv.lookup_regions``).
        max_regions: use at most this many regions per image (0: all).
        prompt_version: the template's content version (filled in; part of the config hash).
        llm: :class:`~libcurate.llm.client.LLMSettings`.
    """

    prompt: str = "gavie"
    regions_file: str = ""
    max_regions: int = 0
    prompt_version: str = ""
    llm: Any = field(default_factory=LLMSettings)

    def __post_init__(self):
        self.llm = LLMSettings.from_any(self.llm)
        self.prompt_version = pinned_template(self.prompt, self.prompt_version).version
        if self.max_regions < 0:
            raise ValueError("max_regions must be >= 0")


class GavieStage(RegionsInput, LLMShardStage):
    """GAVIE relevancy/accuracy of every answer of every sample (sidecar: see the module docstring)."""

    name = "judge_gavie"
    Config = GavieConfig
    typical_output_tokens = 80  # two scores with one-sentence reasons (llm.cost's expected output)

    def plan(self, sample: Sample, extra: Any) -> Plan | Reject:
        regions = self.sample_regions(sample)
        if isinstance(regions, Reject):
            return regions
        pairs = sample.turn_pairs()
        if not pairs:
            return Reject("no_conversation", "")
        reqs = [gavie_request(self.template, regions, q, [a], self.config.llm.structured_output,
                              self.config.max_regions) for q, a in pairs]
        return Plan(reqs)

    def record(self, sample: Sample, plan: Plan, results: list[LLMResult]) -> dict | Reject:
        turns = []
        for i, r in enumerate(results):
            g = parse_gavie(r.text, 1)
            if isinstance(g, ParseFailure):
                return Reject("unparseable_reply", f"turn {i}: {g.reason} {g.detail}: {(r.text or '')[:300]}")
            turns.append({"relevancy": g.relevancy[1], "accuracy": g.accuracy[1],
                          "relevancy_reason": g.relevancy_reason.get(1, ""),
                          "accuracy_reason": g.accuracy_reason.get(1, ""), "raw": (r.text or "")[:4000]})
        return {"accuracy": statistics.fmean(t["accuracy"] for t in turns),
                "relevancy": statistics.fmean(t["relevancy"] for t in turns),
                "turns": turns, "n_turns": len(turns), "model": self.config.llm.model,
                "prompt_version": self.template.version}


# -- evaluation CLI ----------------------------------------------------------------------------
def leaderboard_markdown(rows: list[dict]) -> str:
    """Markdown table of ``{model, accuracy, relevancy, n, failed}`` rows, best accuracy first."""
    rows = sorted(rows, key=lambda r: (-(r["accuracy"] if r["accuracy"] is not None else -1), r["model"]))
    out = ["| model | accuracy | relevancy | judged | failed |", "|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accuracy']:.2f}" if r["accuracy"] is not None else "–"
        rel = f"{r['relevancy']:.2f}" if r["relevancy"] is not None else "–"
        out.append(f"| {r['model']} | {acc} | {rel} | {r['n']} | {r['failed']} |")
    return "\n".join(out) + "\n"


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``curate eval gavie``."""
    parser.add_argument("--outputs", action="append", required=True, metavar="[MODEL=]PATH",
                        help="JSON list or JSONL of {image_id, question|instruction, answer[, model]}; "
                             "MODEL= names the model for files without a model field; repeatable")
    parser.add_argument("--annotations", required=True,
                        help="JSON image_id -> [{caption, bbox: [x, y, w, h]}] (e.g. LRV's vg_annotation.json)")
    parser.add_argument("--judge-model", default="gpt-4o", help="judge model id")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-attempts", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--structured-output", action="store_true")
    parser.add_argument("--answers-per-prompt", type=int, default=1,
                        help="answers judged together (shuffled per question); 1 avoids position bias")
    parser.add_argument("--swap-order", action="store_true",
                        help="with --answers-per-prompt >= 2: ask every group also in reversed order; an item's "
                             "score is the mean of both orders (both kept in --results as by_order)")
    parser.add_argument("--max-regions", type=int, default=0)
    parser.add_argument("--prompt", default="gavie", help="template name or path")
    parser.add_argument("--cache", default="", help="store URL (dir or s3://) for the response cache; empty: none")
    parser.add_argument("--seed", type=int, default=0, help="seed of the answer shuffling")
    parser.add_argument("--results", default="", help="write per-item scores as JSONL here")
    parser.add_argument("--out", default="", help="write the markdown leaderboard here (default stdout)")


def _load_outputs(specs: list[str]) -> list[dict]:
    items = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        data = read_json_any(path)
        if isinstance(data, dict) and "annotations" in data:
            data = data["annotations"]
        if not isinstance(data, list):
            raise PermanentInputError(f"{path}: want a JSON list or JSONL of records")
        for i, d in enumerate(data):
            q = d.get("question", d.get("instruction"))
            model = d.get("model") or name
            if d.get("image_id") is None or not isinstance(q, str) or not isinstance(d.get("answer"), str) or not model:
                raise PermanentInputError(f"{path} item {i}: needs image_id, question|instruction, answer and a model")
            items.append({"image_id": str(d["image_id"]), "question": q, "answer": d["answer"], "model": model})
    return items


async def _judge_items(items: list[dict], regions: dict, args, tpl: PromptTemplate, settings: LLMSettings,
                       store) -> tuple[list[dict], UsageStats]:
    k = max(1, args.answers_per_prompt)
    # groups of answers to the same (image, question), shuffled with a per-question seed
    by_q: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        by_q.setdefault((it["image_id"], it["question"]), []).append(i)
    groups: list[list[int]] = []
    for (img, q), idxs in by_q.items():
        rng = random.Random(int(hashlib.sha256(f"{args.seed}|{img}|{q}".encode()).hexdigest()[:12], 16))
        idxs = idxs[:]
        rng.shuffle(idxs)
        groups += [idxs[j:j + k] for j in range(0, len(idxs), k)]
    stats = UsageStats()
    results: list[dict] = [dict(it, accuracy=None, relevancy=None, status=None) for it in items]
    async with LLMClient(settings, store, stats) as client:
        async def one(g: list[int]) -> None:
            it0 = items[g[0]]
            reg = regions.get(it0["image_id"])
            why = validate_regions(reg)
            if why:
                for i in g:
                    results[i]["status"] = f"no_regions: {why}"
                return
            req = gavie_request(tpl, reg, it0["question"], [items[i]["answer"] for i in g],
                                settings.structured_output, args.max_regions)
            res = await client.complete(req)
            if not res.ok:
                for i in g:
                    results[i]["status"] = f"llm_call_failed: {res.error_kind} {res.error_status}"
                return
            parsed = parse_gavie(res.text, len(g))
            for pos, i in enumerate(g, 1):
                if isinstance(parsed, ParseFailure):
                    results[i]["status"] = f"unparseable_reply: {parsed.reason} {parsed.detail}"
                else:
                    results[i].update(accuracy=parsed.accuracy[pos], relevancy=parsed.relevancy[pos], status="ok",
                                      accuracy_reason=parsed.accuracy_reason.get(pos, ""),
                                      relevancy_reason=parsed.relevancy_reason.get(pos, ""))
                results[i]["raw"] = (res.text or "")[:4000]
                results[i]["position"] = pos
                results[i]["group_size"] = len(g)
            if getattr(args, "swap_order", False) and len(g) > 1:
                await swapped(g, reg, it0)

        async def swapped(g: list[int], reg: list[dict], it0: dict) -> None:
            """Ask the group again in reversed order; keep both orders and score each item by their mean
            (an item's position bias cancels: it stood at k and at len(g) + 1 - k)."""
            rg = g[::-1]
            req = gavie_request(tpl, reg, it0["question"], [items[i]["answer"] for i in rg],
                                settings.structured_output, args.max_regions)
            res = await client.complete(req)
            parsed = parse_gavie(res.text, len(rg)) if res.ok else None
            for pos, i in enumerate(rg, 1):
                r = results[i]
                fwd = {"position": r["position"], "group_size": len(g), "accuracy": r["accuracy"],
                       "relevancy": r["relevancy"]}
                if parsed is None or isinstance(parsed, ParseFailure):
                    why = (f"llm_call_failed: {res.error_kind} {res.error_status}" if parsed is None
                           else f"unparseable_reply: {parsed.reason} {parsed.detail}")
                    r["by_order"] = {"forward": fwd, "reversed": {"position": pos, "group_size": len(g),
                                                                  "status": why}}
                    r["status"] = f"reversed order: {why}"  # one order alone would keep its bias
                    continue
                rev = {"position": pos, "group_size": len(g), "accuracy": parsed.accuracy[pos],
                       "relevancy": parsed.relevancy[pos], "raw": (res.text or "")[:4000]}
                r["by_order"] = {"forward": fwd, "reversed": rev}
                if r["status"] == "ok":
                    r["accuracy"] = (fwd["accuracy"] + rev["accuracy"]) / 2.0
                    r["relevancy"] = (fwd["relevancy"] + rev["relevancy"]) / 2.0

        await asyncio.gather(*(one(g) for g in groups))
    return results, stats


def leaderboard_rows(results: list[dict]) -> list[dict]:
    rows = []
    for model in sorted({r["model"] for r in results}):
        mine = [r for r in results if r["model"] == model]
        ok = [r for r in mine if r["status"] == "ok"]
        rows.append({"model": model, "n": len(ok), "failed": len(mine) - len(ok),
                     "accuracy": statistics.fmean(r["accuracy"] for r in ok) if ok else None,
                     "relevancy": statistics.fmean(r["relevancy"] for r in ok) if ok else None})
    return rows


def run_eval(args: argparse.Namespace) -> int:
    """``curate eval gavie``: judge every output, print/write the leaderboard. Exit 0, or 3 on bad input."""
    from ..storage import open_store

    try:
        items = _load_outputs(args.outputs)
        regions = {str(k): v for k, v in read_json_any(args.annotations).items()}
        tpl = load_template(args.prompt)
        settings = LLMSettings(model=args.judge_model, base_url=args.base_url, api_key_env=args.api_key_env,
                               concurrency=args.concurrency, max_attempts=args.max_attempts, timeout_s=args.timeout,
                               structured_output=args.structured_output, cache=bool(args.cache))
        if args.answers_per_prompt < 1:
            raise PermanentInputError("--answers-per-prompt must be >= 1")
    except (PermanentInputError, ValueError, FileNotFoundError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    store = open_store(args.cache) if args.cache else None
    results, stats = asyncio.run(_judge_items(items, regions, args, tpl, settings, store))
    if args.results:
        with open(args.results, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    table = leaderboard_markdown(leaderboard_rows(results))
    note = (f"\nJudge `{args.judge_model}`, prompt `{tpl.version}`, {args.answers_per_prompt} answer(s) per prompt; "
            f"{stats.requests} requests, {stats.cache_hits} cache hits, {stats.failed} failed.\n")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table + note)
    else:
        sys.stdout.write(table + note)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="curate eval gavie", description="GAVIE leaderboard of model outputs")
    add_eval_arguments(p)
    return run_eval(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
