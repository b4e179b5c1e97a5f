"""Budget step of an Argo run: the recipe's ``max_cost`` checked before an LLM stage's first pod.

    python -m jobs.check_budget --recipe R --stage-id judge --spent 0.0123 [--prefix P]
    -> 0.0456     (stdout: ``--spent`` plus this stage's expected cost, the next check's ``--spent``)

The check is :func:`libcurate.llm.cost.check_before_stage`, the one the local runner makes before the same
stage: the estimate of this and every later LLM stage over the inputs now in the store, plus what the LLM
stages before it in this run were expected to cost. Exit codes are the stage contract's: 0 within budget,
3 over budget or a price unknown (a permanent error: the retry policy does not retry it and the stage,
which depends on this step, never starts), 1 retryable (the store could not be read).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys


def main(argv: list[str] | None = None) -> int:
    from jobs._main import failure_exit_code
    from libcurate.llm.cost import check_before_stage
    from libcurate.pipeline import load_recipe, plan
    from libcurate.stage import EXIT_OK, PermanentInputError

    p = argparse.ArgumentParser(prog="python -m jobs.check_budget")
    p.add_argument("--recipe", required=True, help="recipe YAML (mounted from a ConfigMap on Argo)")
    p.add_argument("--prefix", help="override the recipe's storage prefix")
    p.add_argument("--stage-id", required=True, help="the LLM stage about to start")
    p.add_argument("--spent", default="0", help="USD the LLM stages before it in this run were expected to cost "
                                                "(the previous check's output)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        try:
            spent = float(args.spent)
        except ValueError:
            spent = math.nan
        if not math.isfinite(spent) or spent < 0:
            raise PermanentInputError(f"--spent {args.spent!r}: want a number of USD >= 0")
        recipe = load_recipe(args.recipe, prefix=args.prefix)
        total = check_before_stage(recipe, plan(recipe), args.stage_id, spent)
    except Exception as e:
        return failure_exit_code(e)
    logging.info("%s: within max_cost %s; expected LLM cost so far $%.6f", args.stage_id, recipe.max_cost, total)
    print(repr(total))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
