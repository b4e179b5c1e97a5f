"""The report's plots: matplotlib figures (Agg backend, no display) inlined as base64 PNG data URIs.

Each ``figure_*`` function takes already-summarised data (histogram counts, a sample of points) and
returns a :class:`matplotlib.figure.Figure`, so tests check what is drawn (bar heights, threshold lines)
on the figure's artists rather than on pixels; :func:`data_uri` renders one. Rendering is deterministic:
the same data gives the same bytes (no timestamps in PNG).
"""

from __future__ import annotations

import base64
import io

import numpy as np

KEPT, DROPPED, QUARANTINED = "#2e7d32", "#c62828", "#ef6c00"
DPI = 80


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    return Figure


def data_uri(fig) -> str:
    """PNG data URI of ``fig`` (its pixels: figsize x DPI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_funnel(rows: list[dict]):
    """One horizontal bar per stage: out (passed on / kept), quarantined, dropped (stacked)."""
    Figure = _plt()
    fig = Figure(figsize=(9, 0.45 * len(rows) + 1.1))
    ax = fig.add_subplot()
    names = [r["name"] for r in rows][::-1]
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for label, keyname, color in (("out / kept", "out", KEPT), ("quarantined", "quarantined", QUARANTINED),
                                  ("dropped", "dropped", DROPPED)):
        vals = np.array([r[keyname] for r in rows][::-1], float)
        ax.barh(y, vals, left=left, color=color, label=label, height=0.6)
        left += vals
    for yi, r in zip(y, rows[::-1]):  # the count that goes on, at the end of each bar
        ax.text(left[yi], yi, f"  {r['out']} of {r['in']}", va="center", fontsize=8)
    ax.set_xlim(0, max(left.max(initial=1), 1) * 1.18)
    ax.set_yticks(y, names, fontsize=9)
    ax.set_xlabel("samples")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, ncols=3, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def figure_histogram(name: str, edges: np.ndarray, counts: np.ndarray, thresholds: list[tuple[str, float]],
                     note: str = ""):
    """Kept counts (row 0) and, stacked on them, dropped counts (row 1) over the bins ``edges``, as filled
    steps (one artist per series: fast at any bin count); a dashed line at each threshold value,
    labelled ``min`` or ``max``."""
    Figure = _plt()
    fig = Figure(figsize=(4.4, 2.6))
    fig.subplots_adjust(left=0.13, right=0.97, top=0.88, bottom=0.12)
    ax = fig.add_subplot()
    edges = np.asarray(edges, float)
    counts = np.asarray(counts)
    ax.stairs(counts[0], edges, fill=True, color=KEPT, label="kept" if len(counts) > 1 else "samples")
    if len(counts) > 1:
        ax.stairs(counts[0] + counts[1], edges, baseline=counts[0], fill=True, color=DROPPED, alpha=0.75,
                  label="dropped")
    for kind, value in thresholds:
        ax.axvline(value, color="#1565c0", linestyle="--", linewidth=1.6, label=f"{kind} {value:g}")
    ax.set_title(name + (f"  ({note})" if note else ""), fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def project_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``x``: UMAP (cosine) when umap-learn is installed, else PCA."""
    x = np.asarray(x, np.float64)
    if len(x) >= 10:
        try:
            from umap import UMAP  # optional dependency (umap-learn)

            umap = UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, len(x) - 1))
            xy = umap.fit_transform(x)
            return np.asarray(xy, np.float64), "UMAP"
        except ImportError:
            pass
    if len(x) < 2:
        return np.zeros((len(x), 2)), "PCA"
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    comps = vt[:2]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])  # a fixed sign per axis
    xy = xc @ (comps * signs[:, None]).T
    if xy.shape[1] < 2:
        xy = np.c_[xy, np.zeros(len(xy))]
    return xy, "PCA"


def figure_map(xy: np.ndarray, cluster: np.ndarray, selected: np.ndarray, method: str):
    """Two panels of the same points: coloured by cluster, and kept vs dropped."""
    Figure = _plt()
    fig = Figure(figsize=(10, 4.4))
    a, b = fig.subplots(1, 2)
    cl = np.asarray(cluster)
    has = cl >= 0
    if (~has).any():
        a.scatter(xy[~has, 0], xy[~has, 1], s=9, c="#999999", label="no cluster")
    sc = a.scatter(xy[has, 0], xy[has, 1], s=12, c=cl[has], cmap="tab20", vmin=0, vmax=max(19, int(cl.max(initial=0))))
    for c in np.unique(cl[has]).tolist()[:40]:  # the cluster id at each cluster's centre
        m = xy[cl == c].mean(axis=0)
        a.annotate(str(c), m, fontsize=8, weight="bold", ha="center", va="center",
                   bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})
    del sc
    a.set_title(f"coloured by cluster ({method})", fontsize=10)
    sel = np.asarray(selected, bool)
    b.scatter(xy[~sel, 0], xy[~sel, 1], s=10, c=DROPPED, alpha=0.55, label=f"dropped ({int((~sel).sum())})")
    b.scatter(xy[sel, 0], xy[sel, 1], s=14, c=KEPT, label=f"kept ({int(sel.sum())})")
    b.legend(fontsize=8)
    b.set_title(f"kept vs dropped ({method})", fontsize=10)
    for ax in (a, b):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig
