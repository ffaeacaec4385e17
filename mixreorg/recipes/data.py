"""The training data of a run: the resumable stream of ``cfg.data`` for one rank, and the batches the
trainer models read (tokenized captions, noun prompts and their keys, SynthShapes' masks), with an
augmentation that is a pure function of (seed, step, rank, sample)."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mixreorg.text import make_prompts, tokenize
from mixreorg.text.nouns import extract_nouns

from .config import PretrainConfig

__all__ = ["BatchBuilder", "build_stream", "to_device"]


def build_stream(cfg: PretrainConfig, local_batch: int, rank: int, world: int):
    """The resumable training stream of ``cfg.data`` for this rank."""
    d = cfg.data
    if d.source == "synthshapes":
        from mixreorg.data.synthshapes import SynthShapesStream

        return SynthShapesStream(
            local_batch, seed=d.seed, rank=rank, world_size=world, image_size=d.image_size, **d.synth
        )
    from mixreorg.data.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor, train_transform

    if d.augment == "deit":
        transform = train_transform(d.image_size, scale=(d.crop_scale, 1.0))
    else:
        transform = Compose([Resize(d.image_size), CenterCrop(d.image_size), ToTensor(), Normalize()])
    common = dict(transform=transform, image_size=d.image_size, seed=d.seed, rank=rank, world_size=world)
    if d.source == "folder":
        from mixreorg.data.pairs import ImageCaptionFolder

        return ImageCaptionFolder(d.path, local_batch, **common)
    if d.source == "csv":
        from mixreorg.data.pairs import ImageCaptionCSV

        return ImageCaptionCSV(d.path, local_batch, **common)
    if d.source == "webdataset":
        from mixreorg.data.webdataset import ShardStream

        return ShardStream(d.path, local_batch, **common)
    raise ValueError(f"unknown data.source {d.source!r}")


def _stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _augment_synth(images: torch.Tensor, gen: torch.Generator, crop_scale: float) -> torch.Tensor:
    """DeiT-like augmentation of an already normalised batch: random resized crop + horizontal flip."""
    b, _, h, w = images.shape
    out = torch.empty_like(images)
    for i in range(b):
        area = float(torch.empty(1).uniform_(crop_scale, 1.0, generator=gen))
        logr = float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
        ch = max(1, min(h, round(math.sqrt(area * h * w / math.exp(logr)))))
        cw = max(1, min(w, round(math.sqrt(area * h * w * math.exp(logr)))))
        y = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = images[i : i + 1, :, y : y + ch, x : x + cw]
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        if bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop[0]
    return out


class BatchBuilder:
    """Raw stream batches (``image``, ``caption``, optional ``nouns``) -> trainer-model batches.

    Adds ``text`` (token ids), ``prompts`` ``[B, K, T]`` (K noun prompts per image,
    :func:`mixreorg.text.make_prompts`), ``text_keys`` (``data.text_keys``), ``prompt_keys`` (each
    prompt's noun, or the caption for filler prompts) and ``label_keys`` (the image's nouns and its
    caption). The prompt draw for a step depends only on ``(seed, step, rank)``: resumable.
    ``with_masks``: also pass the stream's ``mask`` as ``masks`` (models with ``needs_masks``).
    """

    def __init__(self, cfg: PretrainConfig, context_length: int, rank: int = 0, with_masks: bool = False) -> None:
        self.cfg = cfg
        self.ctx = int(context_length)
        self.rank = rank
        self.with_masks = with_masks
        self._cache: dict[str, torch.Tensor] = {}
        vocab = cfg.data.noun_vocabulary
        if vocab is None and cfg.data.source == "synthshapes":
            from mixreorg.data.synthshapes import SynthShapes

            vocab = list(SynthShapes.CLASS_NAMES)
        self.vocabulary = vocab

    def _tokens(self, texts: Sequence[str], cache: bool) -> torch.Tensor:
        if not cache:
            return tokenize(list(texts), context_length=self.ctx)
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for t, ids in zip(missing, tokenize(missing, context_length=self.ctx)):
                if len(self._cache) < 100_000:
                    self._cache[t] = ids
        return torch.stack(
            [self._cache[t] if t in self._cache else tokenize([t], context_length=self.ctx)[0] for t in texts]
        )

    def __call__(self, raw: dict[str, Any], step: int) -> dict[str, Any]:
        cfg = self.cfg
        captions = list(raw["caption"])
        images = raw["image"]
        if cfg.data.augment == "deit" and cfg.data.source == "synthshapes":
            # a pure function of (seed, step, rank): Python's hash() of a tuple with a str is salted per
            # process (PYTHONHASHSEED), which made two runs with the same seeds train on other crops
            gen = torch.Generator().manual_seed(_stable_seed(cfg.data.seed, step, self.rank, "aug"))
            images = _augment_synth(images, gen, cfg.data.crop_scale)
        nouns = raw.get("nouns")
        if nouns is None:
            nouns = [extract_nouns(c, self.vocabulary) for c in captions]
        batch: dict[str, Any] = {"images": images, "text": _trim(self._tokens(captions, cache=False))}
        if self.with_masks and raw.get("mask") is not None:
            batch["masks"] = raw["mask"]  # [B, H, W] (SynthShapes): the supervised upper bound's labels
        if cfg.objective.multi_label_weight > 0:
            rng = random.Random(f"{cfg.data.seed}/{step}/{self.rank}")
            k = cfg.data.num_prompts
            prompts, pkeys = [], []
            for cap, ns in zip(captions, nouns):
                ps, from_nouns = make_prompts(cap, k, rng, nouns=ns, return_nouns=True)
                prompts.extend(ps)
                pkeys.append([cap if n is None else n for n in from_nouns])  # filler prompts: the caption
            batch["prompts"] = _trim(self._tokens(prompts, cache=True)).reshape(len(captions), k, -1)
            batch["prompt_keys"] = pkeys
            batch["label_keys"] = [list(dict.fromkeys(list(ns) + [cap])) for cap, ns in zip(captions, nouns)]
        if cfg.data.text_keys == "caption":
            batch["text_keys"] = captions
        elif cfg.data.text_keys == "nouns":
            batch["text_keys"] = [
                ("nouns",) + tuple(sorted(set(ns))) if ns else ("caption", c) for c, ns in zip(captions, nouns)
            ]
        return batch


def _trim(ids: torch.Tensor) -> torch.Tensor:
    """Drop the all-padding tail columns of ``[N, T]`` token ids. Exact for causal text towers that
    pool at the EOT token: padding after EOT never reaches it. Saves most of the text tower's cost."""
    length = int((ids != 0).sum(-1).max()) if ids.numel() else 1
    return ids[:, : max(1, length)].contiguous()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
