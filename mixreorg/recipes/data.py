"""The training data of a run: the resumable stream of ``cfg.data`` for one rank, the batches the
trainer models read (tokenized captions, noun prompts and their keys, SynthShapes' masks), with an
augmentation that is a pure function of (seed, step, rank, sample), and the :class:`Prefetcher`
that builds them on a background thread while the step runs."""

from __future__ import annotations

import hashlib
import math
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mixreorg.losses import keys_to_ids, label_key_ids
from mixreorg.text import make_prompts, tokenize
from mixreorg.text.nouns import extract_nouns, phrase_heads

from .config import PretrainConfig

__all__ = ["BatchBuilder", "Prefetcher", "build_stream", "to_device", "token_row_keys"]


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

    Adds ``text`` (token ids ``[B, T]``), ``caption_keys`` (``[B]``: equal token rows, equal keys),
    ``prompts`` ``[B, K, T]`` (K noun prompts per image, :func:`mixreorg.text.make_prompts`), and the
    keys of the objective as int64 id tensors (:func:`mixreorg.losses.keys_to_ids`): ``text_keys``
    ``[B]`` (``data.text_keys``), ``prompt_keys`` ``[B, K]`` (each prompt's noun, or the caption for
    filler prompts) and ``label_keys`` ``[B, M]`` (the image's nouns and its caption, -1 padded to a
    multiple of 8). ``keys`` holds the same keys readable (``text`` / ``prompt`` / ``label`` lists).
    With prompts also ``prompt_mask`` ``[B, K]`` (bool: built from a noun, not a caption filler) and
    ``prompt_heads`` ``[B, K]`` ids (the noun a prompt names: a phrase's head noun with
    ``data.prompt_phrases``, else the prompt's own key; readable as ``keys["prompt_head"]``).
    The prompt draw for a step depends only on ``(seed, step, rank)``: resumable.

    ``with_masks``: also pass the stream's ``mask`` as ``masks`` (models with ``needs_masks``).
    ``fixed_length``: pad every token row to ``context_length`` instead of trimming the all-padding
    tail, so that every batch has the same shapes (what ``torch.compile`` needs to compile once);
    trimming is exact and cheaper in eager mode (see :func:`_trim`).
    """

    LABEL_WIDTH = 8  # label ids are padded to a multiple of this: one shape for (nearly) every batch

    def __init__(self, cfg: PretrainConfig, context_length: int, rank: int = 0, with_masks: bool = False,
                 fixed_length: bool = False) -> None:
        self.cfg = cfg
        self.ctx = int(context_length)
        self.rank = rank
        self.with_masks = with_masks
        self.fixed_length = bool(fixed_length)
        self._cache: dict[str, torch.Tensor] = {}
        vocab = cfg.data.noun_vocabulary
        if vocab is None and cfg.data.source == "synthshapes":
            from mixreorg.data.synthshapes import SynthShapes

            vocab = list(SynthShapes.CLASS_NAMES)
        self.vocabulary = vocab

    def _tokens(self, texts: Sequence[str], cache: bool) -> torch.Tensor:
        if not cache:
            ids = tokenize(list(texts), context_length=self.ctx)
        else:
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
            if missing:
                for t, row in zip(missing, tokenize(missing, context_length=self.ctx)):
                    if len(self._cache) < 100_000:
                        self._cache[t] = row
            ids = torch.stack(
                [self._cache[t] if t in self._cache else tokenize([t], context_length=self.ctx)[0] for t in texts]
            )
        return ids if self.fixed_length else _trim(ids)

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
        text = self._tokens(captions, cache=False)
        batch: dict[str, Any] = {"images": images, "text": text, "caption_keys": token_row_keys(text)}
        keys: dict[str, Any] = {}
        if self.with_masks and raw.get("mask") is not None:
            batch["masks"] = raw["mask"]  # [B, H, W] (SynthShapes): the supervised upper bound's labels
        if cfg.objective.multi_label_weight > 0:
            rng = random.Random(f"{cfg.data.seed}/{step}/{self.rank}")
            k = cfg.data.num_prompts
            prompts, pkeys, pheads, from_caption = [], [], [], []
            prompt_nouns, heads = nouns, [{} for _ in captions]
            if cfg.data.prompt_phrases:
                heads = [dict(phrase_heads(cap, ns)) for cap, ns in zip(captions, nouns)]
                prompt_nouns = [list(ns) + list(h) for ns, h in zip(nouns, heads)]
            for cap, ns, head in zip(captions, prompt_nouns, heads):
                ps, from_nouns = make_prompts(cap, k, rng, nouns=ns, return_nouns=True)
                prompts.extend(ps)
                pkeys.append([cap if n is None else n for n in from_nouns])  # filler prompts: the caption
                pheads.append([cap if n is None else head.get(n, n) for n in from_nouns])  # "red circle" -> "circle"
                from_caption.append([n is not None for n in from_nouns])
            batch["prompts"] = self._tokens(prompts, cache=True).reshape(len(captions), k, -1)
            keys["prompt"] = pkeys
            batch["prompt_mask"] = torch.tensor(from_caption, dtype=torch.bool)  # [B, K] noun (not filler) prompts
            keys["label"] = [list(dict.fromkeys(list(ns) + [cap])) for cap, ns in zip(captions, prompt_nouns)]
            batch["prompt_keys"] = keys_to_ids([key for row in pkeys for key in row]).view(len(captions), k)
            keys["prompt_head"] = pheads
            batch["prompt_heads"] = (  # without phrases every prompt names its own key: no second hashing
                keys_to_ids([key for row in pheads for key in row]).view(len(captions), k)
                if cfg.data.prompt_phrases else batch["prompt_keys"]
            )
            width = max(len(labels) for labels in keys["label"])
            batch["label_keys"] = label_key_ids(keys["label"], -(-width // self.LABEL_WIDTH) * self.LABEL_WIDTH)
        if cfg.data.text_keys == "caption":
            keys["text"] = captions
        elif cfg.data.text_keys == "nouns":
            keys["text"] = [
                ("nouns",) + tuple(sorted(set(ns))) if ns else ("caption", c) for c, ns in zip(captions, nouns)
            ]
        if "text" in keys:
            batch["text_keys"] = keys_to_ids(keys["text"])
        batch["keys"] = keys
        return batch


def token_row_keys(token_ids: torch.Tensor) -> torch.Tensor:
    """Equal token rows -> equal integer keys ``[N]`` (identical captions are one class in MixReorg's
    segmentation loss: their text embeddings cannot differ)."""
    _, inverse = torch.unique(token_ids, dim=0, return_inverse=True)
    return inverse


def _trim(ids: torch.Tensor) -> torch.Tensor:
    """Drop the all-padding tail columns of ``[N, T]`` token ids. Exact for causal text towers that
    pool at the EOT token: padding after EOT never reaches it. Saves most of the text tower's cost."""
    length = int((ids != 0).sum(-1).max()) if ids.numel() else 1
    return ids[:, : max(1, length)].contiguous()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Prefetcher:
    """Training batches made on a background thread while the step runs: ``next()`` ->
    ``(raw, batch)`` with ``batch = build(raw, step)`` for ``step = start, start + 1, ...``.

    One producer reading ``batches`` in order and a FIFO queue of at most ``depth`` batches: the
    order, and so every batch, is what the loop would have read itself. The stream's position
    is not touched here: the trainer ``observe()``-s each raw batch when it CONSUMES it, so a
    checkpoint saves the consumed position and the batches read ahead are read again on resume.
    ``build`` must not draw from global RNGs (the training step draws from them concurrently);
    :class:`BatchBuilder` seeds its own from ``(seed, step, rank)``. An error in the thread is
    raised by ``next()``; ``close()`` stops the thread.
    """

    def __init__(self, batches: Iterator[dict[str, Any]], build: Callable[[dict[str, Any], int], dict[str, Any]],
                 start: int, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"Prefetcher: depth must be >= 1 batch, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(batches, build, start), daemon=True,
                                        name="mixreorg-prefetch")
        self._thread.start()

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, batches: Iterator[dict[str, Any]], build: Callable, step: int) -> None:
        try:
            while not self._stop.is_set():
                raw = next(batches)
                if not self._put(("batch", raw, build(raw, step))):
                    return
                step += 1
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(("error", err, None))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[dict[str, Any], dict[str, Any]]:
        while True:
            try:
                kind, a, b = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("Prefetcher: the producer thread ended without a batch or an error") from None
        if kind == "error":
            self.close()
            raise a
        return a, b

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10.0)
