"""List step of a fan-out: print a JSON list of batches of undone shards for one stage.

    python -m jobs.plan_batches --recipe R --stage-id score_clip --batch-size 64 [--prefix P]
    -> [{"shards": "0-63"}, {"shards": "64-127"}]

Argo's ``withParam`` iterates over it; batches (not one item per shard) keep the fan-out small.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from libcurate.pipeline import load_recipe, plan
    from libcurate.runner import build_stage, context, format_shard_spec, shard_indices, undone_shards
    from libcurate.stage import EXIT_PERMANENT, PermanentInputError
    from libcurate.storage import open_store

    p = argparse.ArgumentParser(prog="python -m jobs.plan_batches")
    p.add_argument("--recipe", required=True)
    p.add_argument("--prefix")
    p.add_argument("--stage-id", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, prefix=args.prefix)
        ps = next((s for s in plan(recipe) if s.id == args.stage_id), None)
        if ps is None:
            raise PermanentInputError(f"no stage {args.stage_id!r} in the recipe")
        store = open_store(recipe.prefix, recipe.storage_options)
        stage, ctx = build_stage(ps, recipe), context(ps, recipe, store, 1)
        stage.prepare(ctx)               # ingest: fix one layout (appended records included) for every pod
        todo = undone_shards(stage, ctx)
        stage.plan_units(ctx, todo)      # ingest: each pod reads its own records, not the whole file
        todo = shard_indices(todo, stage.units(ctx))
    except PermanentInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PERMANENT
    n = max(1, args.batch_size)
    print(json.dumps([{"shards": format_shard_spec(todo[i:i + n])} for i in range(0, len(todo), n)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
