"""``score_joint``: several scorers in one pass over the shards, each image decoded once.

One read of every raw shard and one JPEG decode of every image feed one or more CLIP models (e.g.
Self-Filter's ViT-L-14 and InstructionGPT-4's ViT-bigG-14) and, optionally, the text reward model:
the pixels are made once per distinct model transform (models with the same input size and filter
share the very same uint8 tensor; the normalisation lives in each model, see
:func:`libcurate.models.clip.uint8_image_encoder`), the reward model scores the same samples' turns in
the main process. Compared with ``score_clip`` + ``score_reward`` run one after the other, the shards are
read once and every image is decoded once instead of once per CLIP model.

Settings: ``clip``: a list of ``score_clip`` settings (``model``, ``pretrained``, ``text``, ``score``,
``aggregate``, ``precision``, ``save_embeddings``), one per CLIP model; ``reward``: ``score_reward``
settings or empty; and the pass's own ``device``, ``decode``, ``batch_size``, ``loader_workers``,
``torch_threads``, ``replicas``, ``prefetch`` (meaning as in ``score_clip``; the thread/worker split is measured with
the first CLIP model).

Sidecar ``{key}.json``: ``{"clip": <score_clip's record>, "clip1": <the second model's>, ...,
"reward": <score_reward's record>}`` (each exactly the record the separate stage writes; column names
``clip.score``, ``reward.reward``...); ``img_emb.npy`` / ``txt_emb.npy`` of the first CLIP model and
``clip1.img_emb.npy``... of the others. A sample that any scorer rejects is quarantined with that
scorer's reason (``image_decode_error``, ``no_text``, ``no_turns``) and the scorer named in the detail.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar, Iterable

from ..stage import PermanentInputError, StageConfig, StageContext
from .clip import DECODERS, ClipConfig, ClipStage, igpt4_pieces
from .common import ModelStage, ShardOutputs, check_choice, model_device, texts_for, timed_loop
from .replicas import run_split
from .reward import RewardConfig, RewardStage

SHARED = ("device", "decode", "batch_size", "loader_workers", "torch_threads", "replicas", "prefetch")


@dataclass
class JointConfig(StageConfig):
    """Settings of ``score_joint`` (see the module doc)."""

    UNHASHED: ClassVar[tuple[str, ...]] = ("batch_size", "loader_workers", "torch_threads", "replicas", "prefetch")

    clip: list = field(default_factory=lambda: [{}])
    reward: dict | None = None
    device: str | None = None
    decode: str = "pil"
    batch_size: int = 64
    loader_workers: int = -1
    torch_threads: int = 0
    replicas: int = 0
    prefetch: int = 4

    def __post_init__(self):
        check_choice("decode", self.decode, [d for d in DECODERS if d != "torchvision"])
        if not isinstance(self.clip, (list, tuple)) or not self.clip:
            raise ValueError("clip must be a non-empty list of score_clip settings")
        for head in self.clip:
            if not isinstance(head, dict) or set(head) & set(SHARED):
                raise ValueError(f"each clip entry is a dict of per-model settings (not {list(SHARED)}): {head!r}")
        self.clip_configs()  # validates every head
        if self.reward is not None:
            self.reward_config()

    def clip_configs(self) -> list[ClipConfig]:
        shared = {k: getattr(self, k) for k in SHARED}
        return [ClipConfig.from_dict({**head, **shared}) for head in self.clip]

    def reward_config(self) -> RewardConfig | None:
        if self.reward is None:
            return None
        if set(self.reward) & {"device", "torch_threads"}:
            raise PermanentInputError("reward: device and torch_threads are the pass's own settings")
        return RewardConfig.from_dict({**self.reward, "device": self.device})


def head_name(i: int) -> str:
    return "clip" if i == 0 else f"clip{i}"


def pixel_keys(heads: list[dict]) -> list:
    """One key per head; heads with equal keys share one pixel tensor."""
    return [(h["plan"], h["image_size"]) if h["plan"] is not None else ("exact", i) for i, h in enumerate(heads)]


def prepare_joint(shard: str, s, cfgs: list[ClipConfig], heads: list[dict], reward: RewardConfig | None):
    from ..models.clip import tokenize
    from .clip_decode import open_image, to_pixels

    item: dict = {"shard": shard, "key": s.key, "heads": []}
    for i, cfg in enumerate(cfgs):
        texts = texts_for(s, cfg.text)
        if not texts or not any(t.strip() for t in texts):
            item["error"] = ("no_text", f"{head_name(i)}: text mode {cfg.text!r} selects no non-empty text")
            return item, {}, []
    keys = pixel_keys(heads)
    pixels: dict = defaultdict(list)
    try:
        size = max(h["image_size"][0] for h in heads)
        for im in s.images:
            img = open_image(im.data, im.format, cfgs[0].decode, size)  # the one decode of this image
            made: dict = {}
            for h, key in zip(heads, keys):
                if key not in made:
                    made[key] = to_pixels(img, cfgs[0].decode, h["pil_transform"], h["plan"])
            for key, px in made.items():
                pixels[key].append(px)
    except Exception as e:  # any decoder failure is this sample's problem, not the shard's
        detail = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(e).__name__}: {e}")
        item["error"] = ("image_decode_error", detail)
        return item, {}, []
    tokens = []
    for cfg, h in zip(cfgs, heads):
        texts = texts_for(s, cfg.text)
        pieces: list[list[str]] = []
        if cfg.score in ("igpt4", "igpt4_fixed"):
            for t in texts:
                pieces.append(igpt4_pieces(t, fixed=False))
                pieces.append(igpt4_pieces(t, fixed=True) or [t])
        flat = texts + [p for ps in pieces for p in ps]
        tok, counts = tokenize(h["tokenizer"], flat, h["context_length"])
        tokens.append(tok)
        item["heads"].append({"n_images": len(s.images), "n_texts": len(texts), "pieces": [len(p) for p in pieces],
                              "tokens": counts[: len(texts)], "context_length": h["context_length"]})
    if reward is not None:
        item["pairs"] = [(reward.instruction or a, b)
                         for a, b in s.turn_pairs()[: 1 if reward.turns == "first" else None]]
    return item, dict(pixels), [tokens]  # one entry: the per-head token tensors of this sample


def collate_joint(batch: dict, heads: list[dict]) -> dict:
    """``images``: {pixel key: uint8 [N, 3, H, W]}; ``tokens``: per head LongTensor [M, context]."""
    import torch

    from .clip_decode import stack_pixels

    per_key: dict = defaultdict(list)
    per_head_tokens: list[list] = [[] for _ in heads]
    for images in batch["images"]:
        for key, pxs in images.items():
            per_key[key].extend(pxs)
    for toks in batch["tokens"]:
        for i, t in enumerate(toks):
            per_head_tokens[i].append(t)
    out_images = {}
    for h, key in zip(heads, pixel_keys(heads)):
        if key not in out_images:
            hh, ww = h["image_size"]
            out_images[key] = (stack_pixels(per_key[key]) if per_key[key]
                               else torch.empty(0, 3, hh, ww, dtype=torch.uint8))
    batch["images"] = out_images
    batch["tokens"] = [torch.cat(t) if t else torch.empty(0, h["context_length"], dtype=torch.long)
                       for t, h in zip(per_head_tokens, heads)]
    return batch


class JointStage(ModelStage):
    """CLIP model(s) and the reward model over one read and one decode of the shards; see the module doc."""

    name = "score_joint"
    Config = JointConfig

    def process_shards(self, ctx: StageContext, shards: Iterable[str]) -> list[dict]:
        import torch

        from ..models.clip import load_clip
        from ..models.reward import load_reward
        from .clip_decode import crop_resize_plan

        shards = list(shards)
        cfg = self.config
        device = model_device(cfg.device, ctx)
        cfgs = cfg.clip_configs()
        clips = [ClipStage(c) for c in cfgs]
        bundles = [load_clip(c.model, c.pretrained, device) for c in cfgs]
        encoders = [st._encoders(b, device) for st, b in zip(clips, bundles)]
        heads = []
        for b in bundles:
            tf = b.pil_transform()
            heads.append({"tokenizer": b.tokenizer, "context_length": b.context_length, "image_size": b.image_size,
                          "pil_transform": tf, "plan": crop_resize_plan(tf)})
        # the split is measured with the first CLIP model (score_clip's rule and loader)
        self.split = clips[0]._split(ctx, shards, device, heads[0], *encoders[0])
        rcfg = cfg.reward_config()
        rstage = RewardStage(rcfg) if rcfg else None
        rbundle = load_reward(rcfg.model, device) if rcfg else None
        max_len = min(rcfg.max_length or rbundle.max_length, rbundle.max_length) if rcfg else 0
        cuda = device.startswith("cuda")
        keys = pixel_keys(heads)
        metas = [{"model": c.model, "pretrained": c.pretrained, "device": device} for c in cfgs]
        extra = {"models": [c.model for c in cfgs], "reward_model": rcfg.model if rcfg else None}

        def work(source, replica: int = 0) -> dict:
            from .clip_loader import JointBatches

            workers = self.split.workers  # 0 under replicas: each decodes its own shards
            data = JointBatches(ctx.store, ctx.raw_prefix, source, cfgs, heads, rcfg)
            loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, pin_memory=cuda,
                                                 prefetch_factor=cfg.prefetch if workers else None)

            def forward(batch: dict):
                self.seen_pixels = batch["images"]  # what each head was given (tests check sharing)
                per_head = []
                for i, (st, (enc_img, enc_txt)) in enumerate(zip(clips, encoders)):
                    img, txt = self._clip_forward(batch, keys[i], i, enc_img, enc_txt, device, cfgs[i])
                    items = [dict(it, **it["heads"][i]) if "error" not in it else it for it in batch["items"]]
                    per_head.append(list(st.records(items, img, txt, metas[i])))
                rewards = self._reward(batch["items"], rstage, rbundle, max_len, device) if rstage else None
                return per_head, rewards

            def write(batch: dict, out) -> None:
                self._write(batch["items"], *out, outs)
                for shard, n_in in batch["ends"]:
                    outs.finish(shard, n_in, extra)

            outs = ShardOutputs(ctx)
            return timed_loop(loader, forward, write, outs)

        return run_split(self, shards, work)

    @staticmethod
    def _clip_forward(batch, key, i, enc_img, enc_txt, device, ccfg):
        import torch

        from .common import autocast

        images = batch["images"][key].to(device, non_blocking=True)
        with autocast(device, ccfg.precision):
            img = enc_img(images) if len(images) else torch.empty(0, 1, device=device)
            tokens = batch["tokens"][i].to(device, non_blocking=True)
            txt = enc_txt(tokens) if len(tokens) else torch.empty(0, 1, device=device)
        img = torch.nn.functional.normalize(img.float(), dim=-1).cpu().numpy()
        txt = torch.nn.functional.normalize(txt.float(), dim=-1).cpu().numpy()
        return img, txt

    @staticmethod
    def _reward(items, rstage, rbundle, max_len, device) -> list:
        pairs, slots, recs = [], [], []
        for item in items:
            if "error" in item:
                recs.append(None)
                continue
            rec = {"rewards": [None] * len(item["pairs"]), "tokens": [None] * len(item["pairs"])}
            for j, p in enumerate(item["pairs"]):
                pairs.append(p)
                slots.append((rec, j))
            recs.append(rec)
        if pairs:
            scores, counts = rstage._score(rbundle, pairs, max_len, device)
            for (rec, j), s, c in zip(slots, scores, counts):
                rec["rewards"][j], rec["tokens"][j] = s, c
        return [None if r is None else rstage.record(r, max_len) for r in recs]

    @staticmethod
    def _write(items, per_head, rewards, outs: ShardOutputs) -> None:
        for n, item in enumerate(items):
            out = outs.get(item["shard"])
            if "error" in item:
                out.quarantine(item["key"], *item["error"])
                continue
            obj, arrays = {}, {}
            for i, rows in enumerate(per_head):
                _, rec, arr = rows[n]
                obj[head_name(i)] = rec
                for name, b in (arr or {}).items():
                    arrays[name if i == 0 else f"{head_name(i)}.{name}"] = b
            if rewards is not None:
                r = rewards[n]
                if isinstance(r, tuple):
                    out.quarantine(item["key"], r[0], f"reward: {r[1]}")
                    continue
                obj["reward"] = r
            out.write_json(item["key"], obj, arrays)
