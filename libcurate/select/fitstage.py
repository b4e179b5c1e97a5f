"""Plumbing shared by the ``fit`` stages (dedup, cluster): per-row results of one global fit, written
back as ordinary per-shard sidecars."""

from __future__ import annotations

import numpy as np

from ..columns import Table
from ..stage import PermanentInputError, ShardOutput, StageContext, unit_of


def table_layout(t: Table) -> dict:
    """What :func:`write_rows` needs to find a shard's rows in the fitted arrays."""
    return {"keys": t.keys, "shard_offsets": t.shard_offsets, "shards": list(t.shards)}


def write_rows(ctx: StageContext, shard: str, fitted: dict, row_json) -> dict:
    """Write ``shard``'s sidecar: ``row_json(global_row) -> dict`` per raw sample, in raw order."""
    try:
        i = fitted["shards"].index(shard)
    except ValueError:
        raise PermanentInputError(f"{shard} was not part of the fit ({ctx.prefix}/_fit)") from None
    lo, hi = int(fitted["shard_offsets"][i]), int(fitted["shard_offsets"][i + 1])
    out = ShardOutput(ctx.store, ctx.prefix, unit_of(shard))
    try:
        for row in range(lo, hi):
            out.write_json(fitted["keys"][row].decode(), row_json(row))
        return out.finish(hi - lo)
    except BaseException as e:
        out.abort(e)
        raise


def present_rows(t: Table, name: str) -> np.ndarray:
    return np.flatnonzero(t.present[name])


def rows_of(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[rows]`` without copying a memmap when every row is present."""
    return matrix if len(rows) == len(matrix) else matrix[rows]
