"""Which unit every sample trains in: plain functions over the gathered columns (no Python object per
sample), for the ``train`` stage (:mod:`libcurate.train.stage`).

A row is in no unit, with the first reason that applies, when an upstream stage quarantined it
(``quarantined: <stage>: <reason>``), it has no ``unit_by`` value (``no_unit: <field>``), a feature is
missing (``missing_feature: <field>``) or its unit is smaller than ``min_unit_size``
(``unit_too_small: ...``). Scalar features are min-max mapped to [-1, 1] over the rows that are in a unit
(Self-Filter's normalisation, one mapping for the whole run); embeddings are used as stored.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from ..columns import Table
from ..select.fitstage import table_layout
from ..stage import PermanentInputError


@dataclass
class UnitPlan:
    """Every raw sample and the unit it belongs to.

    Attributes:
        layout: ``table_layout`` of the gathered table (keys, shards, offsets) for the sidecar writes.
        unit_of_row: int64 [n]: index into ``units`` (-1: in no unit).
        units: unit ids in order.
        rows: unit id -> row indices (raw order).
        excluded_code: int32 [n]: 0 for rows in a unit, else an index into ``reasons``.
        reasons: ``["", "quarantined: ...", "no_unit: cluster.cluster", "missing_feature: ...", ...]``.
        features: float32 [n, d] memmap (rows in no unit are zeros) and its names / dims.
        signatures: unit id -> signature.
        scratch: directory of the memory maps.
    """

    layout: dict
    unit_of_row: np.ndarray
    units: list[str]
    rows: dict[str, np.ndarray]
    excluded_code: np.ndarray
    reasons: list[str]
    features: np.ndarray | None = None
    names: list[str] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)
    signatures: dict[str, str] = field(default_factory=dict)
    scratch: str | None = None

    def close(self) -> None:
        """Drop the memory-mapped columns and their scratch directory."""
        self.features = None
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


def minmax_pm1(v: np.ndarray) -> np.ndarray:
    """Map to [-1, 1] by the column's min and max (a constant column maps to 0)."""
    lo, hi = float(np.min(v)), float(np.max(v))
    if hi <= lo:
        return np.zeros_like(v, dtype=np.float32)
    return (2.0 * (v - lo) / (hi - lo) - 1.0).astype(np.float32)


def unit_label(v) -> str:
    """A column value as a unit id: 3.0 -> ``"3"``, b"a" -> ``"a"``."""
    if isinstance(v, (bytes, np.bytes_)):
        return v.decode("utf-8")
    f = float(v)
    return str(int(f)) if f.is_integer() else repr(f)


def plan_units(t: Table, unit_by: str, features: tuple, min_unit_size: int, scratch: str) -> UnitPlan:
    """Units of the rows of ``t`` (``unit_by``: ``all`` or a field of ``t.values``) and the features of
    every row as one float32 memmap under ``scratch``, columns in ``features`` order."""
    n = len(t)
    # Per row: 0 = in a unit, else 1 + index into `reasons` (the first reason that applies wins).
    code = np.zeros(n, np.int32)
    reasons: list[str] = []

    def exclude(mask: np.ndarray, reason: str) -> None:
        hit = mask & (code == 0)
        if hit.any():
            reasons.append(reason)
            code[hit] = len(reasons)

    q = t.quarantine
    for j in np.unique(q[q > 0]):
        exclude(q == j, f"quarantined: {t.quarantine_reasons[int(j)]}")
    if unit_by == "all":
        inverse, values = np.zeros(n, np.int64), np.array(["all"], dtype=object)
    else:
        col = t.values[unit_by]
        exclude((col == b"") if col.dtype.kind == "S" else np.isnan(col), f"no_unit: {unit_by}")
        present = code == 0
        uniq, inv = np.unique(col[present], return_inverse=True)   # numbers sort numerically
        inverse = np.full(n, -1, np.int64)
        inverse[present] = inv
        values = np.array([unit_label(v) for v in uniq], dtype=object)
    for f in features:
        if f in t.values and t.values[f].dtype.kind != "f":
            raise PermanentInputError(f"train.features: {f!r} holds labels, not numbers")
        exclude(np.isnan(t.values[f]) if f in t.values else ~t.present[f], f"missing_feature: {f}")
    sizes = np.bincount(inverse[code == 0], minlength=len(values))
    for j in np.flatnonzero((sizes > 0) & (sizes < min_unit_size)):
        exclude(inverse == j, f"unit_too_small: {values[j]} has {sizes[j]} < {min_unit_size}")
    ok = code == 0
    kept = np.flatnonzero(np.bincount(inverse[ok], minlength=len(values)) > 0)
    units = [str(values[j]) for j in kept]
    remap = np.full(len(values), -1, np.int64)
    remap[kept] = np.arange(len(kept))
    unit_of_row = np.where(ok, remap[np.maximum(inverse, 0)], -1)
    order = np.argsort(unit_of_row, kind="stable")
    bounds = np.searchsorted(unit_of_row[order], np.arange(len(units) + 1))
    rows = {u: np.sort(order[bounds[j]:bounds[j + 1]]) for j, u in enumerate(units)}
    plan = UnitPlan(table_layout(t), unit_of_row, units, rows, code, [""] + reasons, scratch=scratch)
    if features:
        dims = [t.embeddings[f].shape[1] if f in t.embeddings else 1 for f in features]
        feats = np.lib.format.open_memmap(os.path.join(scratch, "features.npy"), mode="w+", dtype=np.float32,
                                          shape=(n, sum(dims)))
        col0 = 0
        for f, d in zip(features, dims):
            if f in t.embeddings:
                for lo in range(0, n, 65536):           # fp16 memmap -> fp32 in blocks
                    feats[lo:lo + 65536, col0:col0 + d] = t.embeddings[f][lo:lo + 65536]
            elif ok.any():
                feats[ok, col0] = minmax_pm1(t.values[f][ok])
            col0 += d
        feats[~ok] = 0.0
        plan.features, plan.names, plan.dims = feats, list(features), dims
    return plan
