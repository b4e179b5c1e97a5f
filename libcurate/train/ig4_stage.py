"""The ``ig4_selector`` stage: InstructionGPT-4's learned data selector (a ``fit`` stage).

Reads, per sample: the image and text embeddings (``score_clip.img_emb``, ``score_clip.txt_emb``), the
indicator fields the recipe lists (CLIP ``igpt4`` score, reward, length, GPT score ...; that order is
the network's input order), the subset id of the balanced split (``cluster.cluster``; the recipe names it ``subsets.cluster``) and the subset's
quality label from the ``train`` stage (``train.quality``: the trainer's metric oriented so that higher
is better, so a high selector score means a good sample). Fits
:func:`libcurate.train.ig4_selector.train_selector` once (one PCA basis on every sample, attention within
subsets, best validation epoch kept), scores every sample with :func:`score_samples` and writes per
shard::

    {"score": 30.91, "subset": 3, "subset_prediction": 30.87, "split": "train"}   scored
    {}                                                                           quarantined upstream

``split`` is ``train`` / ``val`` (the subset's label was trained on / held out) or ``unlabelled`` (its
trainer gave no label; the sample is still scored in its subset's context). A sample that no upstream
stage quarantined but that lacks a feature (an embedding, an indicator, a subset id) is quarantined here
as ``missing_feature`` with the missing fields named, so ``select`` drops it as
``quarantined: <id>: missing_feature``; an upstream-quarantined sample keeps its upstream reason.

The fitted state (PCA basis, standardisation, the kept epoch's weights) is stored with the fit
(``_fit/fitted.cols``, arrays ``state.*``), the training report (per-epoch losses, best epoch, held-out
subsets) in ``_fit/fitted.json``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..columns import gather
from ..stage import PermanentInputError, Reads, ShardOutput, Stage, StageConfig, StageContext, unit_of
from ..select.fitstage import table_layout
from . import ig4_selector as G

CONTEXTS = ("subset", "alone")
SPLIT_NAMES = {1: "train", 2: "val", 3: "unlabelled"}
FEATURE_CHUNK = 65536


def _is_field(x) -> bool:
    return isinstance(x, str) and "." in x and not x.startswith(".") and not x.endswith(".")


@dataclass
class IG4SelectorConfig(StageConfig):
    """Settings of ``ig4_selector``.

    Attributes:
        image_embedding: image embedding column (PCA block 1).
        text_embedding: text embedding column (PCA block 2).
        indicators: indicator fields, in the network's input order (e.g. ``score_clip.igpt4``,
            ``score_reward.reward``, ``score_length.chars``, ``judge_score.score``).
        subset: the balanced split's subset id field (the ``train`` stage's ``unit_by``).
        label: the per-subset label field written by ``train`` (``train.quality``: higher is better).
        context: ``subset`` (score each sample among its subset's samples, as in training) or ``alone``.
        selector: :class:`~libcurate.train.ig4_selector.SelectorConfig` settings (``pca_dim``,
            ``d_model``, ``n_heads``, ``n_layers``, ``epochs``, ``lr``, ``batch_subsets``,
            ``val_fraction``, ``max_context``, ``seed`` ...).
        device: where the network trains and scores: ``cpu`` (default: the selector is small, and CPU
            results are bit-reproducible) or ``cuda`` / ``cuda:N`` (with ``profile: gpu``). Hashed: a
            GPU's floating-point sums differ slightly from the CPU's, so the scores can.
        profile: resource profile of the fit pod (``fit`` = CPU, ``gpu``).
    """

    image_embedding: str = "score_clip.img_emb"
    text_embedding: str = "score_clip.txt_emb"
    indicators: tuple = ("score_clip.igpt4", "score_reward.reward", "score_length.chars")
    subset: str = "cluster.cluster"
    label: str = "train.quality"
    context: str = "subset"
    selector: Any = field(default_factory=dict)
    device: str = "cpu"
    profile: str = "fit"

    UNHASHED = ("profile",)

    def __post_init__(self):
        self.indicators = tuple(self.indicators)
        for name in ("image_embedding", "text_embedding", "subset", "label"):
            if not _is_field(getattr(self, name)):
                raise ValueError(f"ig4_selector.{name}: want '<stage_id>.<field>', got {getattr(self, name)!r}")
        for f in self.indicators:
            if not _is_field(f):
                raise ValueError(f"ig4_selector.indicators: want '<stage_id>.<field>' names, got {f!r}")
        if len(set(self.indicators)) != len(self.indicators):
            raise ValueError("ig4_selector.indicators: a field is listed twice")
        if self.context not in CONTEXTS:
            raise ValueError(f"ig4_selector.context {self.context!r}: want one of {list(CONTEXTS)}")
        if not (self.device == "cpu" or str(self.device).startswith("cuda")):
            raise ValueError(f"ig4_selector.device {self.device!r}: want cpu, cuda or cuda:N")
        if not isinstance(self.selector, G.SelectorConfig):
            self.selector = G.SelectorConfig.from_dict(self.selector)


class IG4SelectorStage(Stage):
    """Trains InstructionGPT-4's selector on subset labels and scores every sample (module docstring)."""

    name = "ig4_selector"
    Config = IG4SelectorConfig
    kind = "fit"
    profile = "fit"
    image = "cpu"          # the per-shard writes only copy fitted numbers: the slim image

    @classmethod
    def image_for(cls, config) -> str:
        """The fit trains a torch network: the GPU image (torch) on any profile."""
        return "gpu"

    @classmethod
    def reads(cls, config: IG4SelectorConfig) -> Reads:
        return Reads.of(fields=list(config.indicators) + [config.subset, config.label],
                        embeddings=[config.image_embedding, config.text_embedding])

    def fit(self, ctx: StageContext) -> dict:
        c = self.config
        embs = [c.image_embedding, c.text_embedding]
        with tempfile.TemporaryDirectory(prefix="curate-ig4-") as scratch:
            t = gather(ctx, fields=list(c.indicators) + [c.subset, c.label], embeddings=embs, scratch=scratch)
            for f in list(c.indicators) + [c.subset, c.label]:
                if t.values[f].dtype.kind == "S":
                    raise PermanentInputError(f"ig4_selector: {f} holds text labels, not numbers")
            n = len(t)
            names = embs + list(c.indicators) + [c.subset]
            have = np.stack([t.present[e] for e in embs] +
                            [np.isfinite(t.values[f]) for f in list(c.indicators) + [c.subset]], axis=1)
            # bit j set: feature names[j] is missing (for the quarantine detail)
            missing_bits = ((~have).astype(np.int64) << np.arange(len(names))).sum(axis=1)
            upstream_q = t.quarantined()
            rows = np.flatnonzero(~upstream_q & (missing_bits == 0))
            status = np.zeros(n, np.int8)            # 0 upstream-quarantined, 1 scored, 2 missing_feature
            status[rows] = 1
            status[~upstream_q & (missing_bits != 0)] = 2

            scores = np.full(n, np.nan)
            subset_pred = np.full(n, np.nan)
            split = np.zeros(n, np.int8)
            state, report = {}, {}
            if len(rows):
                feats, layout = _feature_matrix(t, rows, c, scratch)
                subset = t.values[c.subset][rows].astype(np.int64)
                labels = _subset_labels(subset, t.values[c.label][rows], c.label)
                device = _device(c.device)
                try:
                    state, report = G.train_selector(feats, subset, labels, c.selector, layout=layout, device=device)
                except ValueError as e:
                    raise PermanentInputError(f"ig4_selector: {e}") from e
                s = G.score_samples(state, feats, subset if c.context == "subset" else None, device=device)
                scores[rows] = s
                means = G.subset_means(s, subset)
                subset_pred[rows] = [means[int(x)] for x in subset]
                code = {**{i: 1 for i in report["train_subsets"]}, **{i: 2 for i in report["val_subsets"]}}
                split[rows] = [code.get(int(x), 3) for x in subset]
                del feats
            stats = {"samples": n, "scored": int(len(rows)), "missing_feature": int((status == 2).sum()),
                     "quarantined_upstream": int(upstream_q.sum()), "context": c.context,
                     **{k: report[k] for k in ("best_epoch", "best_val_loss", "train_loss_at_best", "train_subsets",
                                               "val_subsets", "unlabelled_subsets", "inputs", "seconds")
                        if k in report}}
            return {**table_layout(t), "scores": scores, "subset_pred": subset_pred, "split": split,
                    "status": status, "missing_bits": missing_bits, "feature_names": names,
                    "subset_ids": t.values[c.subset], "report": report, "stats": stats,
                    **G.state_to_fitted(state)}

    def write_shard(self, ctx: StageContext, shard: str, fitted: dict) -> dict:
        try:
            i = fitted["shards"].index(shard)
        except ValueError:
            raise PermanentInputError(f"{shard} was not part of the fit ({ctx.prefix}/_fit)") from None
        lo, hi = int(fitted["shard_offsets"][i]), int(fitted["shard_offsets"][i + 1])
        keys, status, names = fitted["keys"], fitted["status"], fitted["feature_names"]
        out = ShardOutput(ctx.store, ctx.prefix, unit_of(shard))
        try:
            for row in range(lo, hi):
                key = keys[row].decode()
                if status[row] == 2:
                    bits = int(fitted["missing_bits"][row])
                    out.quarantine(key, "missing_feature",
                                   "no " + ", ".join(nm for j, nm in enumerate(names) if bits >> j & 1))
                elif status[row] == 1:
                    out.write_json(key, {"score": float(fitted["scores"][row]),
                                         "subset": int(fitted["subset_ids"][row]),
                                         "subset_prediction": float(fitted["subset_pred"][row]),
                                         "split": SPLIT_NAMES[int(fitted["split"][row])]})
                else:
                    out.write_json(key, {})
            return out.finish(hi - lo)
        except BaseException as e:
            out.abort(e)
            raise


def _feature_matrix(t, rows: np.ndarray, c: IG4SelectorConfig, scratch: str):
    """``[image | text | indicators]`` of ``rows`` as a float32 memmap (chunked: never a second copy of
    the embedding matrices in RAM) and its layout."""
    img, txt = t.embeddings[c.image_embedding], t.embeddings[c.text_embedding]
    di, dt, m = img.shape[1], txt.shape[1], len(c.indicators)
    mm = np.lib.format.open_memmap(os.path.join(scratch, "ig4-features.npy"), mode="w+", dtype=np.float32,
                                   shape=(len(rows), di + dt + m))
    ind = np.stack([t.values[f] for f in c.indicators], axis=1) if m else np.zeros((len(t), 0))
    for a in range(0, len(rows), FEATURE_CHUNK):
        r = rows[a:a + FEATURE_CHUNK]
        mm[a:a + len(r), :di] = img[r]
        mm[a:a + len(r), di:di + dt] = txt[r]
        mm[a:a + len(r), di + dt:] = ind[r]
    return mm, G.FeatureLayout(di, dt, c.indicators)


def _subset_labels(subset: np.ndarray, label: np.ndarray, field_name: str) -> dict[int, float]:
    """One label per subset from the per-sample label column; a subset whose samples disagree means the
    field is not a per-subset label (the wrong field, or units that are not the subsets)."""
    out: dict[int, float] = {}
    ok = np.isfinite(label)
    for s in np.unique(subset[ok]).tolist():
        vals = np.unique(label[ok & (subset == s)])
        if len(vals) > 1:
            raise PermanentInputError(f"ig4_selector: {field_name} differs within subset {s} "
                                      f"({vals[:3].tolist()} ...): want one label per subset (is the train "
                                      "stage's unit_by the selector's subset field?)")
        out[int(s)] = float(vals[0])
    return out


def _device(device: str) -> str:
    """The configured device; a CUDA device that is not there is an error, never a silent CPU run."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PermanentInputError(f"ig4_selector.device is {device} but no CUDA device is visible "
                                      "(run the fit on the gpu profile, or set device: cpu)")
    return device
