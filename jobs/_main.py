"""Shared glue of every job entrypoint: argv -> recipe -> one planned stage -> exit code.

    python -m jobs <stage> --recipe R [--prefix P] [--stage-id ID] [--shards 0-63,70] [--workers N] [--device D]
                           [--phase all|fit|write]

Exit codes (the stage contract): 0 ok, 3 permanent input error (Argo does not retry), 1 retryable.
"""

from __future__ import annotations

import argparse
import logging
import sys


def attach_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe YAML (mounted from a ConfigMap on Argo)")
    p.add_argument("--prefix", help="override the recipe's storage prefix")
    p.add_argument("--stage-id", help="the stage's id in the recipe (default: the first stage of this kind)")
    p.add_argument("--shards", help="shard indices/ranges to process, e.g. 0-63,70 (default: all undone)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--phase", choices=("all", "fit", "write"), default="all",
                   help="fit stages: only the global fit, only the per-shard writes, or both")


def find_stage(planned, stage: str, stage_id: str | None):
    from libcurate.stage import PermanentInputError

    for ps in planned:
        if (stage_id and ps.id == stage_id) or (not stage_id and ps.stage == stage):
            if ps.stage != stage:
                raise PermanentInputError(f"stage id {stage_id!r} is a {ps.stage!r} stage, not {stage!r}")
            return ps
    raise PermanentInputError(f"recipe has no {stage!r} stage" + (f" with id {stage_id!r}" if stage_id else ""))


def main(stage: str, argv: list[str] | None = None) -> int:
    from libcurate.pipeline import load_recipe, plan
    from libcurate.runner import parse_shard_spec, run_stage
    from libcurate.stage import EXIT_OK, EXIT_PERMANENT
    from libcurate.storage import open_store

    from libcurate.registry import STAGES

    if stage not in STAGES:
        print(f"unknown stage {stage!r}; known: {sorted(STAGES)}", file=sys.stderr)
        return EXIT_PERMANENT
    p = argparse.ArgumentParser(prog=f"python -m jobs {stage}")
    attach_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried, at INFO
    try:
        recipe = load_recipe(args.recipe, prefix=args.prefix)
        ps = find_stage(plan(recipe), stage, args.stage_id)
        store = open_store(recipe.prefix, recipe.storage_options)
        shards = parse_shard_spec(args.shards) if args.shards else None
        r = run_stage(ps, recipe, store, workers=args.workers or recipe.workers, shards=shards,
                      progress=False, device=args.device, phase=args.phase)
        logging.info("%s: %s", ps.id, "nothing to do" if r.skipped else f"{r.shards_done} unit(s) in {r.seconds:.1f}s")
        return EXIT_OK
    except Exception as e:
        return failure_exit_code(e)


def failure_exit_code(exc: Exception) -> int:
    """The stage contract's exit code for a job that raised: 3 for a permanent input error (Argo does
    not retry it), 1 for anything else (retryable); logged either way."""
    from libcurate.stage import EXIT_PERMANENT, EXIT_RETRYABLE, PermanentInputError

    if isinstance(exc, PermanentInputError):
        logging.error("permanent input error: %s", exc)
        return EXIT_PERMANENT
    logging.error("retryable failure", exc_info=exc)
    return EXIT_RETRYABLE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
