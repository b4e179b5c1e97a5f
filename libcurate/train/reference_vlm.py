"""A reference trainer that really trains: a small random-initialised LLaVA-style VLM, behind the trainer
contract (:mod:`libcurate.train.contract`), so that both learned selectors run end to end without a
model hub or a GPU.

    python -m libcurate.train.reference_vlm --data {data} --workdir {workdir} --eval {eval}
        [--steps 40] [--batch-size 8] [--lr 1e-3] [--seed 0] [--device auto] [--self-filter]

Model (shapes for the defaults): image [3, 32, 32] -> a CLIP vision tower built from a transformers
``CLIPVisionConfig`` (patch 8, width 32, 2 layers; 16 patch tokens + CLS) -> LLaVA-1.5's projector
(Linear-GELU-Linear) -> 17 visual tokens prepended to the text embeddings of a causal LM built from a
``LlamaConfig`` (width 64, 2 layers, 4 heads). Text is tokenised by bytes (256 ids + 6 specials): no
tokenizer download. Only the assistant turns (and their end token) are supervised, as in LLaVA. A
multi-image sample is seen through its first image, a text-only one through a blank image; the text is
cut to ``--max-text`` byte tokens.

Training: ``--steps`` AdamW steps over seeded permutations of the unit's samples (deterministic on CPU:
same data, seed and flags give the same result.json). Evaluation on the fixed held-out set: mean token
loss over the answers (``eval_loss``), and exact-match accuracy of greedy answers where the set has short
single-turn answers (``eval_accuracy``; greedy decoding yields the answer exactly iff every teacher-forced
argmax equals the next answer token, so one forward pass decides it).

``--self-filter`` co-trains Self-Filter's score net on ``data/features.npy`` with the weighted loss
(:mod:`libcurate.train.self_filter`) and writes ``outputs.jsonl`` with each sample's ``difficulty``.

It trains on one device (``--device auto``: the pod's GPU when there is one); it is not a torchrun
program, so give it ``trainer.gpus: 1`` (a real trainer takes ``{world_size}`` for torchrun).

Exit codes: 0 ok, 3 bad input (no data.json, features missing in ``--self-filter`` mode, an unreadable
eval set), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import contract as C

PAD, BOS, EOS, USER, ASSISTANT, NOIMG = 256, 257, 258, 259, 260, 261
VOCAB = 262
SHORT_ANSWER_BYTES = 32
log = logging.getLogger("reference_vlm")


class InputError(ValueError):
    """Bad input for the trainer: exit 3 (a retry cannot fix it)."""


@dataclass
class VLMConfig:
    """Sizes of the reference model (all small enough for CPU tests)."""

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    lm_width: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    max_text: int = 192


@dataclass
class Example:
    key: str
    image: str | None          # absolute path of the first image (None: no image)
    ids: list[int]
    labels: list[int]
    short_answer: bool


# -- data --------------------------------------------------------------------------------------------
def encode_conversation(turns: list[dict], max_text: int) -> tuple[list[int], list[int]]:
    """Byte ids and labels (-100 except assistant bytes + their EOS) of a LLaVA conversation."""
    ids, labels = [BOS], [-100]
    for t in turns:
        text = str(t.get("value", "")).replace("<image>", "").strip()
        b = list(text.encode("utf-8"))
        if t.get("from") == "gpt":
            ids += [ASSISTANT] + b + [EOS]
            labels += [-100] + b + [EOS]
        else:
            ids += [USER] + b
            labels += [-100] * (1 + len(b))
    return ids[:max_text], labels[:max_text]


def load_llava(path: str, max_text: int) -> list[Example]:
    """A LLaVA JSON list; image paths relative to the file's directory."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if not isinstance(records, list):
        raise InputError(f"{path}: want a JSON list of LLaVA records")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
            raise InputError(f"{path}[{i}]: want a record with a 'conversations' list")
        img = r.get("image")
        img = img[0] if isinstance(img, list) and img else img
        ids, labels = encode_conversation(r["conversations"], max_text)
        answers = [t for t in r["conversations"] if t.get("from") == "gpt"]
        short = len(answers) == 1 and 0 < len(str(answers[0].get("value", "")).encode()) <= SHORT_ANSWER_BYTES \
            and labels[-1] == EOS
        out.append(Example(str(r.get("id", i)), os.path.join(base, img) if isinstance(img, str) else None,
                           ids, labels, short))
    return out


def load_image(path: str | None, size: int):
    import torch
    from PIL import Image

    if path is None:
        return torch.zeros(3, size, size)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)


def collate(batch: list[Example], pixels: dict, n_vis: int):
    """-> pixels [B, 3, S, S], ids [B, L], attention [B, n_vis + L], labels [B, n_vis + L]."""
    import torch

    L = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), L), PAD, dtype=torch.long)
    lab = torch.full((len(batch), n_vis + L), -100, dtype=torch.long)
    att = torch.zeros((len(batch), n_vis + L), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        lab[i, n_vis:n_vis + len(e.labels)] = torch.tensor(e.labels)
        att[i, :n_vis + len(e.ids)] = 1
    return torch.stack([pixels[e.key] for e in batch]), ids, att, lab


# -- model -------------------------------------------------------------------------------------------
def build_model(cfg: VLMConfig):
    """The VLM (vision tower -> projector -> causal LM), random weights from configs (no download)."""
    import torch
    from torch import nn
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    class TinyVLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = CLIPVisionModel(CLIPVisionConfig(
                image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
                intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
                num_attention_heads=cfg.vision_heads))
            self.projector = nn.Sequential(nn.Linear(cfg.vision_width, cfg.lm_width), nn.GELU(),
                                           nn.Linear(cfg.lm_width, cfg.lm_width))
            self.lm = LlamaForCausalLM(LlamaConfig(
                vocab_size=VOCAB, hidden_size=cfg.lm_width, intermediate_size=4 * cfg.lm_width,
                num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads,
                num_key_value_heads=cfg.lm_heads, max_position_embeddings=cfg.max_text + 64,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True))
            self.n_vis = (cfg.image_size // cfg.patch_size) ** 2 + 1

        def forward(self, pixels, ids, attention):
            vis = self.projector(self.vision(pixel_values=pixels).last_hidden_state)   # [B, n_vis, H]
            txt = self.lm.get_input_embeddings()(ids)                                  # [B, L, H]
            return self.lm(inputs_embeds=torch.cat([vis, txt], 1), attention_mask=attention).logits

    return TinyVLM()


# -- training and evaluation ----------------------------------------------------------------------------
def evaluate(model, examples: list[Example], pixels: dict, batch_size: int, device) -> dict:
    """Token loss over every answer token of the set; exact-match accuracy over its short answers."""
    import torch

    from .self_filter import token_losses

    model.eval()
    tot_loss, tot_tok, correct, n_short = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            px, ids, att, lab = (t.to(device) for t in collate(batch, pixels, model.n_vis))
            logits = model(px, ids, att)
            loss, mask = token_losses(logits, lab)
            tot_loss += float((loss * mask).sum())
            tot_tok += float(mask.sum())
            hit = ((logits[:, :-1].argmax(-1) == lab[:, 1:]) | (mask == 0)).all(dim=1)
            for e, h in zip(batch, hit.tolist()):
                if e.short_answer:
                    n_short += 1
                    correct += int(h)
    model.train()
    out = {"eval_loss": tot_loss / max(tot_tok, 1.0), "eval_tokens": int(tot_tok), "eval_samples": len(examples),
           "eval_short_answers": n_short}
    if n_short:
        out["eval_accuracy"] = correct / n_short
    return out


def train(examples: list[Example], eval_examples: list[Example], cfg: VLMConfig, *, steps: int, batch_size: int,
          lr: float, seed: int, device: str = "cpu", features: np.ndarray | None = None,
          self_filter: bool = False) -> tuple[dict, dict[str, float] | None]:
    """Train for ``steps`` steps and evaluate; returns (result, per-sample difficulty or None)."""
    import torch

    from .self_filter import ScoreNet, difficulty, token_losses, unweighted_token_loss, weighted_token_loss

    if not examples:
        raise InputError("the unit has no samples")
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = build_model(cfg).to(dev)
    score_net = None
    params = list(model.parameters())
    if self_filter:
        if features is None or len(features) != len(examples):
            raise InputError("--self-filter needs data/features.npy with one row per sample")
        score_net = ScoreNet(features.shape[1]).to(dev)
        params += list(score_net.parameters())
        feats = torch.from_numpy(np.asarray(features, np.float32)).to(dev)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t_load = time.monotonic()
    pixels = {e.key: load_image(e.image, cfg.image_size) for e in examples + eval_examples}
    load_s = time.monotonic() - t_load
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    t0 = time.monotonic()
    seen = 0
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = [examples[i] for i in idx]
        px, ids, att, lab = (t.to(dev) for t in collate(batch, pixels, model.n_vis))
        loss_tok, mask = token_losses(model(px, ids, att), lab)
        if score_net is not None:
            loss = weighted_token_loss(loss_tok, mask, score_net(feats[idx]))
        else:
            loss = unweighted_token_loss(loss_tok, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        seen += len(batch)
    train_s = time.monotonic() - t0
    result = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "device": str(dev),
              "train_samples": len(examples), "samples_seen": seen, "train_seconds": round(train_s, 3),
              "image_load_seconds": round(load_s, 3),
              "samples_per_s": round(seen / train_s, 2) if train_s > 0 else None,
              "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
              "model": asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()),
              "self_filter": bool(self_filter)}
    if eval_examples:
        result.update(evaluate(model, eval_examples, pixels, batch_size, dev))
    diff = None
    if score_net is not None:
        d = difficulty(score_net, feats).cpu().numpy().astype(np.float64)
        diff = {e.key: float(v) for e, v in zip(examples, d)}
        result["score_net_weight_norm"] = float(score_net.linear.weight.detach().norm())
    return result, diff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m libcurate.train.reference_vlm", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the unit's data/ directory (data/llava/data.json)")
    p.add_argument("--workdir", required=True, help="where result.json (and outputs.jsonl) go")
    p.add_argument("--eval", default="", help="held-out LLaVA JSON (empty: no evaluation)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--self-filter", action="store_true", help="co-train Self-Filter's score net; write difficulty")
    p.add_argument("--image-size", type=int, default=VLMConfig.image_size)
    p.add_argument("--max-text", type=int, default=VLMConfig.max_text)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        if args.steps < 1 or args.batch_size < 1:
            raise InputError("--steps and --batch-size must be >= 1")
        cfg = VLMConfig(image_size=args.image_size, max_text=args.max_text)
        examples = load_llava(os.path.join(args.data, "llava", "data.json"), cfg.max_text)
        eval_examples = load_llava(args.eval, cfg.max_text) if args.eval else []
        features, meta = None, None
        if args.self_filter:
            try:
                features, meta = C.load_features(args.data)
                keys = C.load_keys(args.data)
            except (OSError, ValueError, KeyError) as e:
                raise InputError(f"--self-filter: cannot read the unit's features: {e}") from e
            pos = {k: i for i, k in enumerate(keys)}
            missing = [e.key for e in examples if e.key not in pos]
            if missing or len(keys) != len(examples):
                raise InputError(f"features rows do not match the samples (missing: {missing[:3]})")
            features = features[[pos[e.key] for e in examples]]
        result, diff = train(examples, eval_examples, cfg, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed, device=device, features=features,
                             self_filter=args.self_filter)
        if meta is not None:
            result["feature_names"], result["feature_dims"] = meta["names"], meta["dims"]
        result = {k: v for k, v in result.items() if not (isinstance(v, float) and not math.isfinite(v))}
        C.write_result(args.workdir, result, {k: {"difficulty": v} for k, v in diff.items()} if diff else None)
        log.info("trained %d steps on %d samples: %s", args.steps, len(examples),
                 {k: result.get(k) for k in ("eval_loss", "eval_accuracy", "samples_per_s")})
        return 0
    except InputError as e:
        log.error("bad input: %s", e)
        return C.EXIT_PERMANENT
    except Exception:
        log.exception("training failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
