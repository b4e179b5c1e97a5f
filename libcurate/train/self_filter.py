"""Self-Filter stage 1 (SEEDS.md 2.4): a score net co-trained with the VLM through a per-sample weighted
token loss. Plain functions over tensors; the reference trainer (:mod:`.reference_vlm`, ``--self-filter``)
and any real trainer call them.

For a micro-batch of B samples with features f_i (one row each), token losses l_it and valid-token mask
m_it (labels != -100)::

    s_i = score_net(f_i)                    (one Linear(d, 1, bias=False), like the paper)
    p   = softmax(s) over the micro-batch   (per device micro-batch, not global, as in the seed)
    w_i = B * p_i                           (mean weight 1)
    L   = sum_i sum_t w_i * l_it * m_it / sum_{i,t} m_it   (normalised by the batch's valid tokens)

Gradients reach both the VLM (through l) and the score net (through w). Minimising L moves weight to
samples with low loss, so a *low* score marks a hard sample: difficulty d_i = -score_net(f_i).

What we fix from the seed: the token loss is one ``cross_entropy(reduction="none")`` (the seed computed
the standard loss first and discarded it, and materialised a full vocabulary softmax per token); the
feature order is one named list (``FEATURE_SETTINGS``), written beside the features by the ``train``
stage and recorded in result.json, so training and scoring cannot swap it (the seed listed
[clipscore, imagereward, gpt] in the trainer and [imagereward, clipscore, gpt] in stage 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

# The two feature settings of the paper, in one fixed order each (curate field names). "clip": the
# [image; text] CLIP embeddings; "scores": CLIP score, reward, GPT score (each min-max mapped to [-1, 1]
# by the train stage). A recipe may list other fields; this order is what recipes/self_filter.yaml uses.
FEATURE_SETTINGS = {
    "clip": ("score_clip.img_emb", "score_clip.txt_emb"),
    "scores": ("score_clip.cosine", "score_reward.reward", "judge_score.score"),
}


class ScoreNet(nn.Module):
    """s = w . f: the paper's score net (``Linear(in, 1, bias=False)``); a bias would cancel in the softmax."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, 1, bias=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f).squeeze(-1)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses of a causal LM: ``logits`` [B, T, V] predict ``labels`` [B, T] shifted by one.

    Returns ``(loss [B, T-1], mask [B, T-1])``; positions whose label is ``IGNORE_INDEX`` have loss 0
    and mask 0. One ``cross_entropy`` over the vocabulary (no softmax tensor of [B, T, V] is kept).
    """
    lg = logits[:, :-1, :]
    lb = labels[:, 1:]
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), lb.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(lb.shape)
    return loss, (lb != IGNORE_INDEX).to(loss.dtype)


def sample_weights(scores: torch.Tensor) -> torch.Tensor:
    """w = B * softmax(scores) over the micro-batch: [B] -> [B], mean 1."""
    return scores.shape[0] * torch.softmax(scores, dim=0)


def weighted_token_loss(loss: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """L = sum_i w_i sum_t l_it m_it / sum_{i,t} m_it with w = B * softmax(scores).

    Args:
        loss: [B, T] per-token losses; mask: [B, T] 1 for valid tokens; scores: [B] score-net outputs.
    """
    w = sample_weights(scores)
    denom = mask.sum().clamp_min(1.0)
    return (w[:, None] * loss * mask).sum() / denom


def unweighted_token_loss(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain loss on the same normalisation (every w_i = 1): what the VLM trains on without Self-Filter."""
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


@torch.no_grad()
def difficulty(score_net: ScoreNet, features: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    """d = -score_net(f) for every row of ``features`` [n, d] (stage 2's input)."""
    out = [-score_net(features[i:i + batch]) for i in range(0, len(features), batch)]
    return torch.cat(out) if out else torch.zeros(0)
