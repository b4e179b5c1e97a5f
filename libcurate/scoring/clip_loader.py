"""The loader side of ``score_clip``: decode, preprocess and tokenise in DataLoader workers.

Kept apart from :mod:`libcurate.scoring.clip` so that planning a recipe (which imports every stage's
config) needs no torch: the slim CPU image plans recipes that contain GPU stages.
"""

from __future__ import annotations

import io
import re
from typing import Iterator

import torch

from ..shards import iter_samples
from .clip import ClipConfig, igpt4_pieces
from .common import texts_for


# -- the loader side: runs in DataLoader workers --------------------------------------------------
class SampleBatches(torch.utils.data.IterableDataset):
    """IterableDataset of ready batches: worker ``w`` of ``n`` reads shards ``w, w + n, ...`` in order (with
    no workers, ``shards`` in order; then it may be an iterator, e.g. a replica's shard source). A batch
    holds samples of one shard only; a shard's last batch carries its end marker.

    A batch is a dict: ``items`` (per-sample metadata in raw order, or an error), ``images`` (uint8
    [N, 3, H, W], or a list of encoded-byte tensors for ``decode: torchvision``), ``tokens`` (LongTensor
    [M, context]) and ``ends`` ([(shard, n_in)] for shards whose last sample is in or before this batch).
    """

    def __init__(self, store, raw_prefix: str, shards: list[str], cfg: ClipConfig, bundle_parts: dict):
        self.store, self.raw_prefix, self.shards, self.cfg = store, raw_prefix, shards, cfg
        self.parts = bundle_parts

    def __iter__(self) -> Iterator[dict]:
        import torch

        info = torch.utils.data.get_worker_info()
        # in the main process ``shards`` may be a replica's shard source (an iterator): take it as it comes
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        batch = self._empty()
        n_img = 0
        for shard in mine:
            count = 0
            for s in iter_samples(self.store, f"{self.raw_prefix}/{shard}", with_images=True):
                count += 1
                item, images, tokens = self._prepare(shard, s)
                batch["items"].append(item)
                n_img += self._add_images(batch, images)
                batch["tokens"].extend(tokens)
                if n_img >= self.cfg.batch_size:
                    yield self._collate(batch)
                    batch, n_img = self._empty(), 0
            # A batch never spans shards: a shard's outputs then depend on the shard alone, not on the
            # split or on which shards a rerun still has to do (matrix kernels round differently by row
            # count, and the short text tower cuts a batch at its longest caption).
            batch["ends"].append((shard, count))
            yield self._collate(batch)
            batch, n_img = self._empty(), 0

    @staticmethod
    def _add_images(batch: dict, images) -> int:
        """Put one sample's images into the batch; returns how many images that is."""
        batch["images"].extend(images)
        return len(images)

    @staticmethod
    def _empty() -> dict:
        return {"items": [], "images": [], "tokens": [], "ends": []}

    def _collate(self, batch: dict) -> dict:
        import torch

        if self.cfg.decode != "torchvision":
            h, w = self.parts["image_size"]
            from .clip_decode import stack_pixels

            batch["images"] = (stack_pixels(batch["images"]) if batch["images"]
                               else torch.empty(0, 3, h, w, dtype=torch.uint8))
        ctx = self.parts["context_length"]
        batch["tokens"] = torch.cat(batch["tokens"]) if batch["tokens"] else torch.empty(0, ctx, dtype=torch.long)
        return batch

    def _prepare(self, shard: str, s) -> tuple[dict, list, list]:
        from ..models.clip import tokenize

        item = {"shard": shard, "key": s.key}
        texts = texts_for(s, self.cfg.text)
        if not texts or not any(t.strip() for t in texts):
            item["error"] = ("no_text", f"text mode {self.cfg.text!r} selects no non-empty text")
            return item, [], []
        try:
            images = [self._decode(im.data, im.format) for im in s.images]
        except Exception as e:  # any decoder failure is this sample's problem, not the shard's
            # PIL names the BytesIO object (a memory address) in its message: keep details reproducible.
            detail = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(e).__name__}: {e}")
            item["error"] = ("image_decode_error", detail)
            return item, [], []
        pieces: list[list[str]] = []
        if self.cfg.score in ("igpt4", "igpt4_fixed"):
            for t in texts:
                pieces.append(igpt4_pieces(t, fixed=False))
                fixed = igpt4_pieces(t, fixed=True)
                pieces.append(fixed or [t])
        flat = texts + [p for ps in pieces for p in ps]
        ctx = self.parts["context_length"]
        tokens, counts = tokenize(self.parts["tokenizer"], flat, ctx)
        item.update(n_images=len(images), n_texts=len(texts), pieces=[len(p) for p in pieces],
                    tokens=counts[: len(texts)], context_length=ctx)
        return item, images, [tokens]

    def _decode(self, data: bytes, fmt: str):
        import torch

        from .clip_decode import crop_resize_plan, decode_pixels

        if self.cfg.decode == "torchvision" and fmt == "jpeg":
            return ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if not hasattr(self, "_plan"):
            self._plan = crop_resize_plan(self.parts["pil_transform"])
        mode = "pil" if self.cfg.decode == "torchvision" else self.cfg.decode
        t = decode_pixels(data, fmt, mode, self.parts["pil_transform"], self._plan)
        return ("tensor", t) if self.cfg.decode == "torchvision" else t


class JointBatches(SampleBatches):
    """``score_joint``'s loader: one read and one decode per image for every scorer (see
    :mod:`libcurate.scoring.joint`): ``images`` of a batch is {pixel key: uint8 [N, 3, H, W]} (heads with
    the same transform share one tensor), ``tokens`` a list per CLIP head, items carry per-head counts
    and the reward's turn pairs."""

    def __init__(self, store, raw_prefix: str, shards: list[str], cfgs: list, heads: list[dict], reward):
        super().__init__(store, raw_prefix, shards, cfgs[0], heads[0])
        self.cfgs, self.heads, self.reward = cfgs, heads, reward

    @staticmethod
    def _add_images(batch: dict, images) -> int:
        batch["images"].append(images)
        return max((len(v) for v in images.values()), default=0)

    def _prepare(self, shard: str, s):
        from .joint import prepare_joint

        return prepare_joint(shard, s, self.cfgs, self.heads, self.reward)

    def _collate(self, batch: dict) -> dict:
        from .joint import collate_joint

        return collate_joint(batch, self.heads)
