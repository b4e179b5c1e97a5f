"""InstructionGPT-4's data selector, without the seed's bugs: plain functions over arrays (torch on CPU/GPU).

What it learns. The data are split into subsets (``cluster`` with ``method: balanced``); a trainer fine-tunes
a VLM on each subset and evaluates it, giving one *genuine quality label* per subset (``train.label``).
The selector maps every sample of a subset to a score such that the **mean of the per-sample scores
predicts the subset's label** (MSE). Applied per sample afterwards, that score ranks the data
(SEEDS.md 1.6-1.8).

Per-sample input (one fixed, named order, recorded in the state)::

    [ image PCA-k | text PCA-k | indicator_1 ... indicator_m ]       k = ``pca_dim`` (6 in the seed)

* **One PCA basis per block, fit once on every sample** passed to :func:`train_selector` (labelled or
  not) and stored in the state; training and :func:`score_samples` both go through
  :func:`transform_features` with it. The seed fit a separate PCA inside each of its 30 subsets for
  training and another on all 3,439 samples for inference, so the network was applied in a coordinate
  system it had never seen.
* The indicators are whatever fields the recipe lists (CLIP ``igpt4`` score, reward, length, GPT score),
  in the listed order. Every input column (PCA coordinates included) is standardised with the mean and
  standard deviation over all samples, stored in the state; so a length in characters and the seed's
  ``10 * len / 1009`` give the same model (z-scores are invariant to scale).

The network (:class:`SelectorNet`): a linear input projection to ``d_model``, ``n_layers`` pre-norm
blocks of self-attention + a feed-forward layer with residuals, then a linear head to one output per
sample. **Attention runs over the samples within one subset** (``batch_first=True``: the batch axis holds
subsets, the sequence axis the subset's samples; padding of unequal subsets is masked out of both the
attention keys and the mean). The seed used ``nn.MultiheadAttention`` without ``batch_first``, so its
attention ran across the 30 *subsets* at each sample position during training and across all 3,439
samples at inference: two different functions. No positional encoding, so a subset's prediction does not
depend on the order of its samples, and a sample's output depends only on its own subset.

Training: MSE between the masked mean of the per-sample outputs and the subset's label (labels
standardised with their mean and sd over the training subsets; outputs are mapped back to label units),
Adam, ``epochs`` passes over the training subsets in seeded mini-batches of ``batch_subsets`` subsets.
``val_fraction`` of the labelled subsets (at least one) are held out; after every epoch the validation
MSE is measured and **a copy of the weights is taken when it improves**, so the returned state is the
best validation epoch (the seed's "best model" kept a reference to the live ``state_dict``, i.e. the
last epoch). Seeded: the same inputs and config give the same state on the CPU.

Inference (:func:`score_samples`). With ``subset`` ids, each sample is scored **in its own subset's
context**, the context it had in training (the balanced split assigns every sample, labelled subset or
not), so the per-sample scores of a training subset average to exactly the subset prediction the model
was validated with. Without ``subset`` each sample is scored alone (a context of one). Either way a
sample's score never depends on samples of other subsets.

Cost: attention is quadratic in the context, so a subset larger than ``max_context`` samples is cut into
near-equal contiguous parts (in row order) that attend within themselves, in training and inference
alike; the subset prediction is still the mean over all its samples. The seed's shape (30 subsets x 114
samples) is one context per subset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np

PCA_CHUNK = 65536
SCORE_BATCH_ROWS = 65536     # padded rows per inference forward pass


# -- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectorConfig:
    """Hyper-parameters of the selector (the seed's: pca_dim 6, 4 heads, 2 layers, 20 epochs, lr 0.01).

    Attributes:
        pca_dim: PCA components kept per embedding block (image, text).
        d_model: width of the attention layers (the inputs are projected to it).
        n_heads: attention heads; must divide ``d_model``.
        n_layers: attention + feed-forward blocks.
        epochs: passes over the training subsets.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        batch_subsets: subsets per optimiser step.
        val_fraction: fraction of the labelled subsets held out for validation (at least one).
        max_context: largest attention context; bigger subsets are cut into parts.
        seed: weight init, mini-batch order and the validation split.
    """

    pca_dim: int = 6
    d_model: int = 16
    n_heads: int = 4
    n_layers: int = 2
    epochs: int = 200
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_subsets: int = 8
    val_fraction: float = 0.2
    max_context: int = 1024
    seed: int = 0

    def __post_init__(self):
        for name in ("pca_dim", "d_model", "n_heads", "n_layers", "epochs", "batch_subsets", "max_context"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"selector.{name} must be an integer >= 1, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"selector.n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if not 0 < self.val_fraction < 1:
            raise ValueError("selector.val_fraction must be in (0, 1): the kept checkpoint is chosen on "
                             "held-out subsets")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("selector.lr must be > 0 and weight_decay >= 0")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "SelectorConfig":
        """Strict: unknown keys are an error (a typo must not silently fall back to a default)."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"selector: unknown setting(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FeatureLayout:
    """How the columns of a raw feature matrix are laid out: ``[image | text | indicators]``.

    Attributes:
        image_dim: width of the image embedding block (1280 for ViT-bigG-14).
        text_dim: width of the text embedding block (4096 for the seed's LLaMA-2 7B).
        indicators: names of the indicator columns, in order (e.g. ``score_clip.igpt4``).
    """

    image_dim: int
    text_dim: int
    indicators: tuple = ()

    def __post_init__(self):
        if self.image_dim < 1 or self.text_dim < 1:
            raise ValueError("FeatureLayout: image_dim and text_dim must be >= 1")
        object.__setattr__(self, "indicators", tuple(str(x) for x in self.indicators))

    @property
    def width(self) -> int:
        return self.image_dim + self.text_dim + len(self.indicators)

    def to_dict(self) -> dict:
        return {"image_dim": self.image_dim, "text_dim": self.text_dim, "indicators": list(self.indicators)}


def build_features(image: np.ndarray, text: np.ndarray, indicators: np.ndarray | None = None,
                   names: tuple = ()) -> tuple[np.ndarray, FeatureLayout]:
    """``[n, di]``, ``[n, dt]``, ``[n, m]`` -> the raw float32 matrix ``[n, di + dt + m]`` and its layout."""
    image, text = np.asarray(image, np.float32), np.asarray(text, np.float32)
    ind = np.zeros((len(image), 0), np.float32) if indicators is None else \
        np.asarray(indicators, np.float32).reshape(len(image), -1)
    if len(names) != ind.shape[1]:
        raise ValueError(f"{ind.shape[1]} indicator columns but {len(names)} names")
    if not len(image) == len(text) == len(ind):
        raise ValueError("image, text and indicators must have the same number of rows")
    return np.hstack([image, text, ind]), FeatureLayout(image.shape[1], text.shape[1], tuple(names))


# -- PCA and standardisation ------------------------------------------------------------------------
def fit_pca(x: np.ndarray, k: int, *, exact_max_dim: int = 1024, iterations: int = 10,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and the top-``k`` principal axes ``[k, d]`` of ``x`` (``k`` capped at ``min(n, d)``).

    ``x`` may be a float16 memmap of millions of rows: it is read in row chunks, never copied whole.
    Up to ``exact_max_dim`` columns the covariance is accumulated in float64 and eigendecomposed
    exactly. Wider blocks (ViT-bigG's 1280, LLaMA's 4096) use subspace iteration on the covariance
    (Halko et al.): ``iterations`` streamed passes of ``C @ Q`` with ``k + 10`` seeded directions, then the
    exact eigenproblem of ``Q^T C Q``: O(n d (k + 10)) a pass instead of O(n d^2) to form ``C``.
    Each axis's sign is fixed so that its largest-magnitude coordinate is positive: the basis is a pure
    function of the data and the seed.
    """
    n, d = x.shape
    if n < 1:
        raise ValueError("fit_pca: no rows")
    s = np.zeros(d)
    for a in range(0, n, PCA_CHUNK):
        s += np.asarray(x[a:a + PCA_CHUNK], np.float64).sum(axis=0)
    mean = s / n
    k = min(k, n, d)

    mean32 = mean.astype(np.float32)

    def cov_times(q: np.ndarray) -> np.ndarray:       # C @ q, streamed over row chunks
        # sum_i (x_i - mu)(x_i - mu)^T q = X^T y - mu (sum_i y_i) with y = (X - mu) q: no centred copy of
        # a chunk; float32 products (PCA directions need no more), float64 accumulation
        q32 = q.astype(np.float32)
        shift = mean32 @ q32
        acc = np.zeros((d, q.shape[1]))
        for a in range(0, n, PCA_CHUNK):
            xc = np.asarray(x[a:a + PCA_CHUNK], np.float32)
            y = xc @ q32 - shift
            acc += xc.T @ y - np.outer(mean, y.sum(axis=0, dtype=np.float64))
        return acc / max(n - 1, 1)

    if d <= exact_max_dim:
        cov = np.zeros((d, d))
        for a in range(0, n, PCA_CHUNK):
            c = np.asarray(x[a:a + PCA_CHUNK], np.float64) - mean
            cov += c.T @ c
        vals, vecs = np.linalg.eigh(cov / max(n - 1, 1))
        axes = vecs[:, ::-1][:, :k].T.copy()
    else:
        p = min(d, k + 10)
        q = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, p)))[0]
        for _ in range(iterations):
            q = np.linalg.qr(cov_times(q))[0]
        vals, vecs = np.linalg.eigh(q.T @ cov_times(q))
        axes = (q @ vecs[:, ::-1][:, :k]).T.copy()
    flip = np.sign(axes[np.arange(k), np.abs(axes).argmax(axis=1)])
    axes *= np.where(flip == 0, 1.0, flip)[:, None]
    return mean.astype(np.float32), axes.astype(np.float32)


def _project(x: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    out = np.empty((len(x), len(axes)), np.float32)
    for a in range(0, len(x), PCA_CHUNK):
        out[a:a + PCA_CHUNK] = (np.asarray(x[a:a + PCA_CHUNK], np.float32) - mean) @ axes.T
    return out


def fit_transform_basis(features: np.ndarray, layout: FeatureLayout, pca_dim: int) -> dict:
    """The one basis of the selector's inputs, fit on ``features`` (every sample): PCA of the image and
    text blocks, then the mean and sd of every input column (PCA coordinates and indicators)."""
    _check_features(features, layout)
    di, dt = layout.image_dim, layout.text_dim
    img_mean, img_axes = fit_pca(features[:, :di], pca_dim)
    txt_mean, txt_axes = fit_pca(features[:, di:di + dt], pca_dim)
    basis = {"pca.image.mean": img_mean, "pca.image.axes": img_axes,
             "pca.text.mean": txt_mean, "pca.text.axes": txt_axes}
    z = _raw_inputs(basis, features, layout)
    mu = z.mean(axis=0, dtype=np.float64)
    sd = z.std(axis=0, dtype=np.float64)
    basis["input.mean"] = mu.astype(np.float32)
    basis["input.std"] = np.where(sd > 1e-12, sd, 1.0).astype(np.float32)
    return basis


def _raw_inputs(basis: Mapping, features: np.ndarray, layout: FeatureLayout) -> np.ndarray:
    di, dt = layout.image_dim, layout.text_dim
    return np.hstack([_project(features[:, :di], basis["pca.image.mean"], basis["pca.image.axes"]),
                      _project(features[:, di:di + dt], basis["pca.text.mean"], basis["pca.text.axes"]),
                      np.asarray(features[:, di + dt:], np.float32)])


def transform_features(state: Mapping, features: np.ndarray) -> np.ndarray:
    """Raw features ``[n, layout.width]`` -> the network's standardised inputs ``[n, 2k + m]``, through
    the state's one basis. Used by training and inference alike."""
    layout = state_layout(state)
    _check_features(features, layout)
    z = _raw_inputs(state, features, layout)
    return ((z - state["input.mean"]) / state["input.std"]).astype(np.float32)


def _check_features(features: np.ndarray, layout: FeatureLayout) -> None:
    if features.ndim != 2 or features.shape[1] != layout.width:
        raise ValueError(f"features: want [n, {layout.width}] ({layout.image_dim} image + {layout.text_dim} "
                         f"text + {len(layout.indicators)} indicators), got {list(features.shape)}")
    for a in range(0, len(features), PCA_CHUNK):
        if not np.isfinite(np.asarray(features[a:a + PCA_CHUNK], np.float32)).all():
            raise ValueError("features: non-finite values (a sample without a feature must be left out)")


# -- contexts ---------------------------------------------------------------------------------------
def contexts(subset: np.ndarray, max_context: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The attention contexts of a subset assignment.

    Returns ``(ctx_rows, ctx_subset, subset_ids)``: row indices of every context (rows of one subset, in
    increasing order; a subset of ``s > max_context`` rows is cut into ``ceil(s / max_context)`` near-equal
    contiguous parts), the subset id of each context and the sorted distinct subset ids.
    """
    subset = np.asarray(subset)
    order = np.argsort(subset, kind="stable")
    ids, starts, counts = np.unique(subset[order], return_index=True, return_counts=True)
    rows, owner = [], []
    for sid, a, c in zip(ids.tolist(), starts.tolist(), counts.tolist()):
        members = order[a:a + c]
        for part in np.array_split(members, math.ceil(c / max_context)):
            rows.append(part)
            owner.append(sid)
    return rows, np.array(owner, dtype=subset.dtype), ids


# -- the network ------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


@contextlib.contextmanager
def _torch_settings(device: str, threads: int = 1):
    """Process-wide torch settings for the selector, restored afterwards.

    * CPU ops on ``threads`` intra-op threads: the tensors are tiny ([8 subsets, 114, 16]), so a second
      thread only adds synchronisation, and on shared cores it costs far more (measured on 2 shared
      cores, 30 x 114 samples, 40 epochs: 6.1 s on 1 thread vs 27.7 s on 2).
    * No fused "fast path" of ``nn.MultiheadAttention`` in eval mode: validation and inference then run
      exactly the function that was trained (the fused kernel rounds differently), and with a padding
      mask it was the slower one here (11 ms a call vs under 1 ms).
    """
    torch = _torch()
    fast = torch.backends.mha.get_fastpath_enabled()
    old = torch.get_num_threads()
    cpu = str(device).startswith("cpu")
    torch.backends.mha.set_fastpath_enabled(False)
    if cpu:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        if cpu:
            torch.set_num_threads(old)


def build_net(d_in: int, cfg: SelectorConfig, batch_first: bool = True):
    """:class:`SelectorNet` (built lazily so that importing this module does not import torch)."""
    torch = _torch()
    nn = torch.nn

    class SelectorNet(nn.Module):
        """``[B, L, d_in]`` inputs + ``[B, L]`` padding mask (True = padding) -> ``[B, L]`` outputs.

        B indexes contexts (subsets), L the samples inside one: attention mixes samples of the same
        subset only, and padded positions are masked out as keys."""

        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(d_in, cfg.d_model)
            self.norm1 = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.n_layers))
            self.attn = nn.ModuleList(nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=batch_first)
                                      for _ in range(cfg.n_layers))
            self.norm2 = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.n_layers))
            self.ff = nn.ModuleList(nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.GELU())
                                    for _ in range(cfg.n_layers))
            self.head = nn.Linear(cfg.d_model, 1)

        def forward(self, x, pad):
            h = self.inp(x)
            for n1, attn, n2, ff in zip(self.norm1, self.attn, self.norm2, self.ff):
                a = n1(h)
                h = h + attn(a, a, a, key_padding_mask=pad, need_weights=False)[0]
                h = h + ff(n2(h))
            return self.head(h).squeeze(-1)

    return SelectorNet()


def _pad(z, ctx_rows: list[np.ndarray], device):
    """Stack contexts into ``[C, Lmax, d]`` with a ``[C, Lmax]`` padding mask."""
    torch = _torch()
    lmax = max(len(r) for r in ctx_rows)
    x = torch.zeros((len(ctx_rows), lmax, z.shape[1]), dtype=torch.float32)
    pad = torch.ones((len(ctx_rows), lmax), dtype=torch.bool)
    for i, r in enumerate(ctx_rows):
        x[i, :len(r)] = torch.from_numpy(z[r])
        pad[i, :len(r)] = False
    return x.to(device), pad.to(device)


def _subset_predictions(net, z, ctx_rows, ctx_index, ctx_slot, n_subsets: int, sizes, device):
    """Masked mean of the per-sample outputs of each subset: ``[n_subsets]``.

    ``ctx_index``: the contexts to run; ``ctx_slot[i]``: the position of context i's subset in the output."""
    torch = _torch()
    x, pad = _pad(z, [ctx_rows[i] for i in ctx_index], device)
    out = net(x, pad).masked_fill(pad, 0.0)
    sums = torch.zeros(n_subsets, device=device).index_add(0, torch.as_tensor(ctx_slot, device=device),
                                                           out.sum(dim=1))
    return sums / torch.as_tensor(sizes, dtype=torch.float32, device=device)


# -- training -----------------------------------------------------------------------------------------
def _label_map(labels, ids: np.ndarray) -> dict[int, float]:
    """Per-subset labels as ``{subset id: label}``, finite labels only."""
    if isinstance(labels, Mapping):
        items = labels.items()
    else:
        arr = np.asarray(labels, np.float64)
        items = enumerate(arr.tolist())
    known = set(ids.tolist())
    return {int(k): float(v) for k, v in items
            if v is not None and math.isfinite(float(v)) and int(k) in known}


def train_selector(features: np.ndarray, subset: np.ndarray, labels, config: SelectorConfig | None = None, *,
                   layout: FeatureLayout, device: str = "cpu", threads: int = 1) -> tuple[dict, dict]:
    """Fit the selector.

    Args:
        features: ``[n, layout.width]`` raw features of every sample (finite), may be a memmap.
        subset: ``[n]`` integer subset id of every sample.
        labels: the subsets' labels: ``{subset id: label}`` or an array indexed by subset id (NaN or a
            missing id = no label: that subset is only scored, not trained on).
        config: :class:`SelectorConfig`.
        layout: the column layout of ``features``.
        device: torch device for the network (the PCA runs in numpy).
        threads: torch CPU threads while training (see :func:`_torch_settings`; restored afterwards).

    Returns:
        ``(state, report)``. ``state``: numpy arrays (the PCA basis, the input standardisation, the best
        epoch's weights ``net.<name>``) plus ``meta`` (config, layout, label scaling, best epoch): what
        :func:`score_samples` needs, storable with ``columns.pack_arrays`` + JSON. ``report``: per-epoch
        ``train_loss`` / ``val_loss`` (MSE in label units, measured in eval mode after the epoch),
        ``best_epoch``, ``best_val_loss``, the train/val subset ids, timings.
    """
    with _torch_settings(device, threads):
        return _train(features, subset, labels, config or SelectorConfig(), layout, device)


def _train(features, subset, labels, cfg: SelectorConfig, layout: FeatureLayout, device: str):
    torch = _torch()
    t0 = time.monotonic()
    subset = np.asarray(subset).astype(np.int64)
    if subset.shape != (len(features),):
        raise ValueError(f"subset: want [{len(features)}] ids, got {list(subset.shape)}")
    ctx_rows, ctx_subset, ids = contexts(subset, cfg.max_context)
    lab = _label_map(labels, ids)
    labelled = np.array(sorted(lab), np.int64)
    if len(labelled) < 2:
        raise ValueError(f"train_selector: {len(labelled)} labelled subset(s); need at least 2 (one to train on, "
                         "one held out to choose the checkpoint)")
    rng = np.random.default_rng(cfg.seed)
    n_val = min(max(1, round(cfg.val_fraction * len(labelled))), len(labelled) - 1)
    perm = rng.permutation(labelled)
    val_ids, train_ids = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    basis = fit_transform_basis(features, layout, cfg.pca_dim)
    t_pca = time.monotonic()
    y_train = np.array([lab[i] for i in train_ids])
    y_mean = float(y_train.mean())
    y_std = float(y_train.std()) if len(y_train) > 1 and y_train.std() > 1e-12 else 1.0
    meta = {"config": cfg.to_dict(), "layout": layout.to_dict(), "label_mean": y_mean, "label_std": y_std}
    state = {**basis, "meta": meta}
    z = transform_features(state, features)

    sizes_all = np.bincount(np.searchsorted(ids, subset), minlength=len(ids))
    pos = {int(s): i for i, s in enumerate(ids.tolist())}
    ctx_of = {}
    for c, s in enumerate(ctx_subset.tolist()):
        ctx_of.setdefault(int(s), []).append(c)

    def batch_plan(sub_ids: np.ndarray):
        cidx = [c for s in sub_ids.tolist() for c in ctx_of[s]]
        slot = [j for j, s in enumerate(sub_ids.tolist()) for _ in ctx_of[s]]
        return cidx, slot, sizes_all[[pos[s] for s in sub_ids.tolist()]]

    def target(sub_ids):
        return torch.tensor([(lab[s] - y_mean) / y_std for s in sub_ids.tolist()], dtype=torch.float32,
                            device=device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_net(z.shape[1], cfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    plans = {"train": (train_ids, batch_plan(train_ids)), "val": (val_ids, batch_plan(val_ids))}
    history = {"train": [], "val": []}
    best_val, best_epoch, best_weights = math.inf, -1, None
    for epoch in range(cfg.epochs):
        net.train()
        order = train_ids[torch.randperm(len(train_ids), generator=gen).numpy()]
        for a in range(0, len(order), cfg.batch_subsets):
            b = order[a:a + cfg.batch_subsets]
            cidx, slot, sizes = batch_plan(b)
            pred = _subset_predictions(net, z, ctx_rows, cidx, slot, len(b), sizes, device)
            loss = torch.mean((pred - target(b)) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            for split, (sub_ids, (cidx, slot, sizes)) in plans.items():
                pred = _subset_predictions(net, z, ctx_rows, cidx, slot, len(sub_ids), sizes, device)
                mse = float(torch.mean((pred - target(sub_ids)) ** 2)) * y_std ** 2
                history[split].append(mse)
        if history["val"][-1] < best_val:
            best_val, best_epoch = history["val"][-1], epoch
            # a copy, not the live tensors: the seed's "best" was a reference, i.e. the last epoch
            best_weights = {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}
    meta["best_epoch"] = best_epoch
    state.update({f"net.{k}": v for k, v in best_weights.items()})
    t_end = time.monotonic()
    report = {"train_loss": history["train"], "val_loss": history["val"], "best_epoch": best_epoch,
              "best_val_loss": best_val, "train_loss_at_best": history["train"][best_epoch],
              "epochs": cfg.epochs, "train_subsets": train_ids.tolist(), "val_subsets": val_ids.tolist(),
              "unlabelled_subsets": sorted(set(ids.tolist()) - set(lab)), "samples": int(len(features)),
              "subsets": int(len(ids)), "inputs": input_names(layout, basis),
              "seconds": {"pca": round(t_pca - t0, 4), "train": round(t_end - t_pca, 4),
                          "total": round(t_end - t0, 4)}}
    return state, report


def input_names(layout: FeatureLayout, basis: Mapping) -> list[str]:
    """The network's input columns, in order: ``image_pc0.., text_pc0.., <indicators>``."""
    return ([f"image_pc{i}" for i in range(len(basis["pca.image.axes"]))] +
            [f"text_pc{i}" for i in range(len(basis["pca.text.axes"]))] + list(layout.indicators))


def state_layout(state: Mapping) -> FeatureLayout:
    m = state["meta"]["layout"]
    return FeatureLayout(int(m["image_dim"]), int(m["text_dim"]), tuple(m["indicators"]))


def load_net(state: Mapping, device: str = "cpu", batch_first: bool = True):
    """The state's network, in eval mode."""
    torch = _torch()
    cfg = SelectorConfig.from_dict(state["meta"]["config"])
    d_in = int(state["input.mean"].shape[0])
    net = build_net(d_in, cfg, batch_first=batch_first)
    weights = {k[len("net."):]: torch.from_numpy(np.asarray(v)) for k, v in state.items() if k.startswith("net.")}
    net.load_state_dict(weights)
    return net.to(device).eval()


# -- inference ------------------------------------------------------------------------------------------
def score_samples(state: Mapping, features: np.ndarray, subset: np.ndarray | None = None, *,
                  device: str = "cpu", threads: int = 1) -> np.ndarray:
    """Per-sample selector scores ``[n]`` in label units (float64).

    Args:
        state: from :func:`train_selector`.
        features: ``[n, layout.width]`` raw features (the same layout as in training).
        subset: ``[n]`` subset ids: score each sample in its own subset's context (the context it was
            trained in; contexts over ``max_context`` are cut as in training). None: score each sample
            alone (a context of one sample).

    A sample's score depends only on its own features and those of its own subset (or on nothing else,
    without ``subset``); how many other subsets are scored in the same call does not matter.
    """
    meta = state["meta"]
    cfg = SelectorConfig.from_dict(meta["config"])
    z = transform_features(state, features)
    n = len(z)
    if subset is None:
        ctx_rows = [np.array([i]) for i in range(n)]
    else:
        subset = np.asarray(subset).astype(np.int64)
        if subset.shape != (n,):
            raise ValueError(f"subset: want [{n}] ids, got {list(subset.shape)}")
        ctx_rows = contexts(subset, cfg.max_context)[0]
    with _torch_settings(device, threads):
        return _score(load_net(state, device), z, ctx_rows, device) * meta["label_std"] + meta["label_mean"]


def _score(net, z: np.ndarray, ctx_rows: list[np.ndarray], device: str) -> np.ndarray:
    """Per-sample network outputs (standardised label units), contexts batched by similar length."""
    torch = _torch()
    out = np.empty(len(z), np.float64)
    # batches of contexts of similar length, so padding stays small
    order = sorted(range(len(ctx_rows)), key=lambda c: len(ctx_rows[c]))
    i = 0
    with torch.no_grad():
        while i < len(order):
            lmax = len(ctx_rows[order[i]])
            j = i
            while j < len(order) and (j - i + 1) * max(lmax, len(ctx_rows[order[j]])) <= SCORE_BATCH_ROWS:
                lmax = max(lmax, len(ctx_rows[order[j]]))
                j += 1
            j = max(j, i + 1)
            batch = [ctx_rows[c] for c in order[i:j]]
            x, pad = _pad(z, batch, device)
            y = net(x, pad).cpu().numpy()
            for b, rows in enumerate(batch):
                out[rows] = y[b, :len(rows)]
            i = j
    return out


def subset_means(scores: np.ndarray, subset: np.ndarray) -> dict[int, float]:
    """Mean score per subset id: the subset prediction."""
    subset = np.asarray(subset).astype(np.int64)
    ids, inv = np.unique(subset, return_inverse=True)
    means = np.bincount(inv, weights=scores) / np.bincount(inv)
    return {int(s): float(m) for s, m in zip(ids, means)}


# -- state <-> storable -------------------------------------------------------------------------------
def state_to_fitted(state: Mapping, prefix: str = "state.") -> dict:
    """Arrays under ``prefix + name`` and ``meta`` under ``prefix + "meta"``: the runner stores arrays in
    ``_fit/fitted.cols`` and the rest as JSON."""
    return {prefix + k: (v if k == "meta" else np.asarray(v)) for k, v in state.items()}


def state_from_fitted(fitted: Mapping, prefix: str = "state.") -> dict:
    return {k[len(prefix):]: v for k, v in fitted.items() if k.startswith(prefix)}


# -- timing -------------------------------------------------------------------------------------------
def time_selector(n_subsets: int = 30, subset_size: int = 114, image_dim: int = 1280, text_dim: int = 4096,
                  n_indicators: int = 4, config: SelectorConfig | None = None, seed: int = 0,
                  device: str = "cpu", threads: int = 1) -> dict:
    """Train and apply the selector on random data of the seed's shape (30 subsets x 114 samples,
    ViT-bigG-14 1280-d image and LLaMA-2 4096-d text embeddings, 4 indicators); returns the timings.

    For ``bench/trainer.py``: the features are random, so only the times (and the shapes) mean anything.
    ``threads``: torch CPU threads (the default, 1, is what the stage uses; pass more to compare).
    """
    cfg = config or SelectorConfig()
    rng = np.random.default_rng(seed)
    n = n_subsets * subset_size
    feats, layout = build_features(rng.standard_normal((n, image_dim), np.float32),
                                   rng.standard_normal((n, text_dim), np.float32),
                                   rng.standard_normal((n, n_indicators), np.float32),
                                   tuple(f"indicator{i}" for i in range(n_indicators)))
    subset = np.repeat(np.arange(n_subsets), subset_size)
    labels = {i: float(30 + rng.standard_normal()) for i in range(n_subsets)}
    t0 = time.perf_counter()
    state, report = train_selector(feats, subset, labels, cfg, layout=layout, device=device, threads=threads)
    t1 = time.perf_counter()
    score_samples(state, feats, subset, device=device, threads=threads)
    t2 = time.perf_counter()
    return {"subsets": n_subsets, "subset_size": subset_size, "samples": n, "image_dim": image_dim,
            "text_dim": text_dim, "indicators": n_indicators, "epochs": cfg.epochs, "device": device,
            "torch_threads": threads, "train_seconds": round(t1 - t0, 3),
            "pca_seconds": report["seconds"]["pca"], "score_seconds": round(t2 - t1, 3),
            "best_epoch": report["best_epoch"]}
