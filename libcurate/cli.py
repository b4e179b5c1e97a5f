"""``curate``: the command line. Every subcommand is argv -> config -> one libcurate call.

    curate run RECIPE [--workers N] [--prefix P] [--only ID ...]     run a recipe locally
    curate ingest --format F --annotations A --images I --out P      ingest alone
    curate export --prefix P --out DIR [--formats ...] [--recipe R] export a run (selection or all)
    curate status PREFIX [--recipe R] [--watch [S]] [--json]         per-stage progress, throughput, ETA
    curate report PREFIX [--recipe R] [--out FILE]                   rebuild a run's HTML report (runs no stage)
    curate inspect PREFIX KEY | --source-id ID [--json] [--recipe R] one sample's journey through the run
    curate audit PREFIX [--json] [--recipe R]                        accounting; exit 0 iff every sample is accounted for
    curate plan RECIPE                                               stages, config hashes and prefixes
    curate render RECIPE --out DIR                                   Argo YAML (WorkflowTemplate, Workflow, CronWorkflow)
    curate submit RECIPE [--cron]                                    submit to Argo through Hera
    curate eval gavie ...                                            GAVIE leaderboard for model outputs
    curate eval judge PREFIX [--reference F] [--json]                judge agreement, calibration, position bias
    curate estimate RECIPE [--json]                                  LLM requests, tokens and cost before a run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .stage import EXIT_PERMANENT, EXIT_RETRYABLE, PermanentInputError

log = logging.getLogger("curate")


def _run(args) -> int:
    from .audit import audit, current_prefixes
    from .pipeline import load_recipe, plan
    from .runner import run_recipe
    from .storage import open_store

    recipe = load_recipe(args.recipe, prefix=args.prefix)
    runs = run_recipe(recipe, workers=args.workers, progress=not args.no_progress, only=args.only)
    for r in runs:
        state = "skipped (done)" if r.skipped else f"{r.shards_done} unit(s) in {r.seconds:.1f}s"
        print(f"{r.id:<16} {state:<28} {r.prefix}")
    store = open_store(recipe.prefix, recipe.storage_options)
    rep = audit(store, current_prefixes(recipe))
    exports = [p for p in plan(recipe) if p.stage == "export"]
    print(f"\nrun: {store.url}   accounting ok: {rep['ok']}")
    for p in exports:
        print(f"curated output: {store.uri(p.prefix)}")
        print(f"summary: {store.uri(p.prefix + '/summary.json')}   report: {store.uri(p.prefix + '/report.html')}")
    return 0 if rep["ok"] or args.only else 1


def _ingest(args) -> int:
    from .pipeline import load_recipe
    from .runner import run_recipe

    settings = {"format": args.format, "annotations": args.annotations, "images": args.images,
                "shard_size": args.shard_size}
    if args.dataset:
        settings["dataset"] = args.dataset
    recipe = load_recipe({"name": "ingest", "storage": {"prefix": args.out}, "workers": args.workers,
                          "stages": [{"stage": "ingest", "with": settings}]})
    run_recipe(recipe, progress=not args.no_progress)
    return _audit_print(args.out, as_json=False)


def _storage_options(recipe_path: str | None, prefix: str | None = None) -> dict:
    """The recipe's ``storage.options`` (endpoint, region ...) for commands that take a prefix."""
    if not recipe_path:
        return {}
    from .pipeline import load_recipe

    return dict(load_recipe(recipe_path, prefix=prefix).storage_options or {})


def _export(args) -> int:
    from .audit import stage_prefixes
    from .export import ExportConfig, ExportStage
    from .stage import StageContext, config_hash
    from .storage import open_store

    options = _storage_options(args.recipe, args.prefix)
    store = open_store(args.prefix, options)
    selects = [p for p in stage_prefixes(store) if p.startswith("select/")]
    sel = args.select if args.select else (selects[-1] if selects and not args.all else None)
    cfg = ExportConfig.from_dict({"formats": args.formats, "shard_size": args.shard_size})
    upstream = {"select": sel} if sel else {}
    out = open_store(args.out, options)
    prefix = f"export/cli/{config_hash('export', cfg.to_dict(), sel)}"
    ExportStage(cfg).run_global(StageContext(store=store, prefix=prefix, upstream=upstream, out_store=out,
                                             storage_options=options))
    print(f"exported {'selection ' + sel if sel else 'all raw samples'} to {out.uri(prefix)}")
    return 0


def _audit_print(prefix: str, as_json: bool, recipe: str | None = None) -> int:
    from .audit import audit, current_prefixes
    from .pipeline import load_recipe
    from .storage import open_store

    r = load_recipe(recipe, prefix=prefix) if recipe else None
    current = current_prefixes(r) if r else None
    rep = audit(open_store(prefix, r.storage_options if r else None), current)
    if as_json:
        print(json.dumps(rep, indent=1, sort_keys=True))
    else:
        for p, a in rep["stages"].items():
            print(f"{p:<44} in={a['in']} out={a['out']} quarantined={a['quarantined']} dropped={a['dropped']}"
                  f"{'' if a['ok'] else '  NOT OK: ' + '; '.join(a['problems'][:3])}"
                  f"{'  (old configuration)' if a.get('current') is False else ''}")
        for prob in rep.get("problems", []):
            print(f"problem: {prob}")
        if rep.get("llm_total"):
            t = rep["llm_total"]
            cost = "unknown (a model has no price)" if t["cost_usd"] is None else f"${t['cost_usd']:.4f}"
            print(f"llm: {t['requests']} requests, {t['cache_hits']} cache hits, {t['prompt_tokens']:,} input + "
                  f"{t['completion_tokens']:,} output tokens, cost {cost}")
        print(f"ok: {rep['ok']}")
    return 0 if rep["ok"] else 1


def _status(args) -> int:
    from .pipeline import load_recipe
    from .status import run_status
    from .storage import open_store

    r = load_recipe(args.recipe, prefix=args.prefix) if args.recipe else None
    return run_status(open_store(args.prefix, r.storage_options if r else None), r, as_json=args.json,
                      watch_s=args.watch)


def _report(args) -> int:
    from .report.html import regenerate

    print(f"report: {regenerate(args.prefix, args.recipe, args.out)}")
    return 0


def _inspect(args) -> int:
    from .inspect import run_inspect

    if (args.key is None) == (args.source_id is None):
        print("error: give a KEY or --source-id ID", file=sys.stderr)
        return 2
    return run_inspect(args.prefix, args.key, args.source_id, args.recipe, args.json)


def _plan(args) -> int:
    from .pipeline import load_recipe, plan

    recipe = load_recipe(args.recipe, prefix=args.prefix)
    for p in plan(recipe):
        print(f"{p.id:<16} {p.stage:<20} {p.kind:<7} {p.profile:<4} {p.cfg_hash}  {p.prefix}")
    return 0


def _render(args) -> int:
    from workflows.render import render

    for path in render(args.recipe, args.out, prefix=args.prefix):
        print(path)
    return 0


def _submit(args) -> int:
    from workflows.submit import submit

    print(submit(args.recipe, cron=args.cron, prefix=args.prefix))
    return 0


def _estimate(args) -> int:
    from .llm.cost import run_estimate

    return run_estimate(args)


def _eval(args) -> int:
    return args.eval_func(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curate", description="Curate image-instruction data for VLMs.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a recipe locally")
    r.add_argument("recipe")
    r.add_argument("--prefix", help="override storage.prefix")
    r.add_argument("--workers", type=int, help="shards in parallel (default: the recipe's)")
    r.add_argument("--only", nargs="+", metavar="ID", help="run only these stage ids")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_run)

    i = sub.add_parser("ingest", help="ingest a dataset into raw shards")
    from .formats import FORMATS

    i.add_argument("--format", required=True, choices=list(FORMATS))
    i.add_argument("--annotations", required=True)
    i.add_argument("--images", required=True, help="directory, s3:// prefix or .tar archive")
    i.add_argument("--out", required=True, help="run prefix: directory or s3://bucket/prefix")
    i.add_argument("--shard-size", type=int, default=1000)
    i.add_argument("--dataset", default="")
    i.add_argument("--workers", type=int, default=1)
    i.add_argument("--no-progress", action="store_true")
    i.set_defaults(func=_ingest)

    e = sub.add_parser("export", help="export a run's selection (or all samples) for trainers")
    e.add_argument("--prefix", required=True, help="run prefix")
    e.add_argument("--out", required=True, help="output directory or s3:// prefix")
    e.add_argument("--formats", nargs="+", default=["webdataset", "llava", "cc_sbu_align"])
    e.add_argument("--shard-size", type=int, default=1000)
    e.add_argument("--select", help="select prefix to follow (default: the run's last selection)")
    e.add_argument("--all", action="store_true", help="ignore selections; export every raw sample")
    e.add_argument("--recipe", help="take S3 settings (storage.options: endpoint, region) from this recipe")
    e.set_defaults(func=_export)

    s = sub.add_parser("status", help="per-stage progress, throughput and ETA from the markers (local or s3://)")
    s.add_argument("prefix")
    s.add_argument("--recipe", help="count only this recipe's planned stages (its current configurations); "
                                    "its storage.options (endpoint, region) are used to read PREFIX")
    s.add_argument("--watch", nargs="?", type=float, const=10.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 10) until every stage is done (Ctrl-C stops)")
    s.add_argument("--json", action="store_true", help="machine output (with --watch: one object per line)")
    s.set_defaults(func=_status)

    rp = sub.add_parser("report", help="rebuild a run's HTML report from its outputs (runs no stage)")
    rp.add_argument("prefix", help="run prefix: directory or s3://bucket/prefix")
    rp.add_argument("--recipe", help="which outputs are current (needed when a stage ran with several settings); "
                                     "its storage.options are used to read PREFIX")
    rp.add_argument("--out", help="write here (file or s3:// URL; default: the run's export folder)")
    rp.set_defaults(func=_report)

    ins = sub.add_parser("inspect", help="one sample's journey: source, scores, drop reason, cluster, rank, export")
    ins.add_argument("prefix", help="run prefix: directory or s3://bucket/prefix")
    ins.add_argument("key", nargs="?", help="the sample's key")
    ins.add_argument("--source-id", help="find the sample(s) by their id in the source dataset instead")
    ins.add_argument("--json", action="store_true", help="machine-readable journey")
    ins.add_argument("--recipe", help="which outputs are current; its storage.options are used to read PREFIX")
    ins.set_defaults(func=_inspect)

    a = sub.add_parser("audit", help="check that every sample is accounted for")
    a.add_argument("prefix")
    a.add_argument("--json", action="store_true")
    a.add_argument("--recipe", help="count only this recipe's current outputs (older configurations are listed); "
                                    "its storage.options (endpoint, region) are used to read PREFIX")
    a.set_defaults(func=lambda args: _audit_print(args.prefix, args.json, args.recipe))

    pl = sub.add_parser("plan", help="show the planned stages")
    pl.add_argument("recipe")
    pl.add_argument("--prefix")
    pl.set_defaults(func=_plan)

    rd = sub.add_parser("render", help="write the Argo YAML for a recipe")
    rd.add_argument("recipe")
    rd.add_argument("--out", required=True)
    rd.add_argument("--prefix")
    rd.set_defaults(func=_render)

    sm = sub.add_parser("submit", help="submit a recipe to Argo (ARGO_SERVER, ARGO_TOKEN, ARGO_NAMESPACE)")
    sm.add_argument("recipe")
    sm.add_argument("--cron", action="store_true", help="install the recipe's schedule as a CronWorkflow")
    sm.add_argument("--prefix")
    sm.set_defaults(func=_submit)

    es = sub.add_parser("estimate", help="LLM requests, tokens and cost per stage before running (max_cost)")
    es.add_argument("recipe")
    es.add_argument("--prefix", help="override storage.prefix")
    es.add_argument("--json", action="store_true")
    es.set_defaults(func=_estimate)

    ev = sub.add_parser("eval", help="evaluate model outputs")
    evsub = ev.add_subparsers(dest="eval_cmd", required=True)
    g = evsub.add_parser("gavie", help="GAVIE accuracy/relevancy leaderboard")
    try:
        from .llm.gavie import add_eval_arguments, run_eval

        add_eval_arguments(g)
        g.set_defaults(func=_eval, eval_func=run_eval)
    except ImportError as exc:  # the LLM layer is optional at import time
        g.set_defaults(func=lambda args, exc=exc: (print(f"GAVIE unavailable: {exc}", file=sys.stderr), 2)[1])
    jq = evsub.add_parser("judge", help="judge QA: agreement, calibration, position bias, parse failures")
    from .llm.judge_qa import add_arguments as add_judge_qa_arguments, run as run_judge_qa

    add_judge_qa_arguments(jq)
    jq.set_defaults(func=_eval, eval_func=run_judge_qa)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried, at INFO
    for name in ("httpx", "httpx2"):  # one INFO line per LLM request (the openai client's transport)
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except PermanentInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PERMANENT
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # retryable by contract; the traceback goes to the log
        log.exception("failed: %s", e)
        return EXIT_RETRYABLE


if __name__ == "__main__":
    sys.exit(main())
