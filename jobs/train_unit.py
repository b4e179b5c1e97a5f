"""The two steps of a ``train`` stage's fan-out on Argo (workflows/dag.py):

    python -m jobs.train_unit --recipe R --stage-id S [--prefix P] --list
        -> [{"unit": "0"}, {"unit": "3"}]     the units without a result for their current samples
    python -m jobs.train_unit --recipe R --stage-id S [--prefix P] --unit 3
        -> prepares unit 3's data, runs the trainer (libcurate.train.contract), stores result.json
    python -m jobs.train_unit --recipe R --stage-id S [--prefix P] --collect
        -> the stage's fit, collecting only: a unit without its result fails the step (exit 1) instead of
           training on the CPU collector pod

Exit codes (the trainer contract): 0 ok, 3 permanent (trainer exit 3, no valid result.json, bad recipe;
Argo does not retry), 1 retryable (trainer crash, signal, timeout).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from libcurate.pipeline import load_recipe, plan
    from libcurate.runner import build_stage, context, run_stage
    from libcurate.train.stage import COLLECT_ONLY_ENV
    from libcurate.stage import EXIT_OK, PermanentInputError

    from jobs._main import failure_exit_code
    from libcurate.storage import open_store

    p = argparse.ArgumentParser(prog="python -m jobs.train_unit")
    p.add_argument("--recipe", required=True)
    p.add_argument("--prefix")
    p.add_argument("--stage-id", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--list", action="store_true", help="print the undone units as a JSON list")
    g.add_argument("--unit", help="train this unit")
    g.add_argument("--collect", action="store_true", help="the stage's fit from stored unit results only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        recipe = load_recipe(args.recipe, prefix=args.prefix)
        ps = next((s for s in plan(recipe) if s.id == args.stage_id), None)
        if ps is None or not getattr(ps.cls, "unit_fanout", False):
            raise PermanentInputError(f"no train stage {args.stage_id!r} in the recipe")
        store = open_store(recipe.prefix, recipe.storage_options)
        if args.collect:
            before = os.environ.get(COLLECT_ONLY_ENV)
            os.environ[COLLECT_ONLY_ENV] = "1"
            try:
                r = run_stage(ps, recipe, store, progress=False, phase="fit")
            finally:
                if before is None:
                    del os.environ[COLLECT_ONLY_ENV]
                else:
                    os.environ[COLLECT_ONLY_ENV] = before
            logging.info("%s: %s", ps.id, "already collected" if r.skipped else "collected")
            return EXIT_OK
        stage, ctx = build_stage(ps, recipe), context(ps, recipe, store, 1)
        units = stage.unit_plan(ctx)
        try:
            if args.list:
                print(json.dumps([{"unit": u} for u in stage.undone_units(ctx, units)]))
                return EXIT_OK
            if args.unit not in units.rows:
                raise PermanentInputError(f"unit {args.unit!r} is not a unit of {ps.id} (units: {units.units[:10]})")
            res = stage.run_unit(ctx, units, args.unit)
        finally:
            units.close()
        logging.info("%s unit %s: %s = %s", ps.id, args.unit, stage.config.label, res.label)
        return EXIT_OK
    except Exception as e:
        return failure_exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
