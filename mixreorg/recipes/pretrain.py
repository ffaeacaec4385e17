"""Text-supervised pretraining of GroupViT / MixReorg: ``python -m mixreorg.recipes.pretrain``.

    python -m mixreorg.recipes.pretrain                      # the tiny CPU demo on SynthShapes
    python -m mixreorg.recipes.pretrain --model mixreorg     # same recipe, MixReorg encoder
    python -m mixreorg.recipes.pretrain --preset groupvit_cc12m --data /data/cc12m/{00000..01242}.tar
    torchrun --nproc_per_node 8 -m mixreorg.recipes.pretrain --preset mixreorg_cc12m --data ...
    python -m mixreorg.recipes.pretrain --set optim.lr=5e-4 --set model.vision.depths=[2,2,2]
    python -m mixreorg.recipes.pretrain --print-config       # show the resolved config and exit

What a run does (see :func:`train`):

* data: SynthShapes (embedded), an image-caption folder or CSV, or webdataset shards; every source is
  a resumable stream (:mod:`mixreorg.data.stream`), sharded per rank; captions are tokenized and
  each image gets K noun prompts (deterministic per step and rank);
* AdamW with GroupViT's schedule: peak lr = ``optim.lr * batch / optim.base_batch``, linear warmup,
  cosine decay, no weight decay on 1-D parameters / position embeddings / group tokens; gradient
  clipping; bf16 autocast on CUDA; optional activation checkpointing (``model.use_checkpoint``);
* logs: a progress line with loss and images/s, ``metrics.jsonl`` in the run folder, and at the
  end ``loss.png`` (the curves) plus the zero-shot evaluation (mIoU table and overlay pictures);
* checkpoints: atomic, the newest ``train.keep_last`` kept, each with model, optimizer, schedule,
  RNG states (every rank's) and data position (every rank's), so that an interrupted run resumed
  with ``--resume`` (default: resume when the run folder has a checkpoint) equals an uninterrupted
  one; ``config.json`` is written next to them;
* a NaN/inf loss or gradient stops the run at once with the step number; no checkpoint is written
  after the last good one (exit status 3 from the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a file: python mixreorg/recipes/pretrain.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "mixreorg.recipes"  # noqa: A001

from mixreorg.checkpoint import (  # noqa: E402
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    restore_training_state,
    training_state,
)
from mixreorg.recipes.config import (  # noqa: E402
    PRESETS,
    PretrainConfig,
    apply_overrides,
    config_from_dict,
    get_preset,
)
from mixreorg.recipes.models import build_model, is_mixreorg_model, no_weight_decay_names  # noqa: E402
from mixreorg.text import make_prompts, tokenize  # noqa: E402
from mixreorg.text.nouns import extract_nouns  # noqa: E402

__all__ = [
    "NaNLossError",
    "WarmupCosine",
    "BatchBuilder",
    "build_optimizer",
    "build_stream",
    "train",
    "main",
]

logger = logging.getLogger("mixreorg.pretrain")


class NaNLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; ``step`` is the failing step (1-based),
    ``checkpoint`` the last good checkpoint (or None)."""

    def __init__(self, step: int, what: str, checkpoint: Path | None) -> None:
        self.step, self.what, self.checkpoint = step, what, checkpoint
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"non-finite {what} at step {step}: training stopped; {kept}")


# ---------------------------------------------------------------------------------------------- schedule
class WarmupCosine:
    """GroupViT's learning-rate schedule, set on every param group (times its ``lr_mult``).

    ``lr(step)``: linear from ``warmup_lr`` to ``peak`` over ``warmup_steps``, then a cosine from
    ``peak`` to ``min_lr`` at ``total_steps``. ``step`` counts optimiser steps already taken.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        peak: float,
        warmup_lr: float,
        min_lr: float,
        warmup_steps: int,
        total_steps: int,
    ) -> None:
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
        self.optimizer = optimizer
        self.peak, self.warmup_lr, self.min_lr = float(peak), float(warmup_lr), float(min_lr)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.step_count = 0
        self.apply()

    def lr(self, step: float) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak - self.warmup_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, at: float | None = None) -> float:
        """Set the lr of step ``step_count`` (or of the fractional step ``at``, for time budgets)."""
        lr = self.lr(self.step_count if at is None else max(float(self.step_count), at))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def step(self) -> float:
        self.step_count += 1
        return self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.apply()


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> tuple[torch.optim.Optimizer, WarmupCosine]:
    """AdamW with two groups (decay / no decay on 1-D params, pos embeddings, group tokens) + schedule."""
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    o = cfg.optim
    groups = [
        {"params": decay, "weight_decay": o.weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
    ]
    kwargs: dict[str, Any] = {"betas": tuple(o.betas), "eps": o.eps}
    device = next(model.parameters()).device
    if device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    try:
        opt = torch.optim.AdamW(groups, lr=cfg.peak_lr(), **kwargs)
    except (RuntimeError, TypeError):  # fused not supported here
        kwargs.pop("fused", None)
        opt = torch.optim.AdamW(groups, lr=cfg.peak_lr(), **kwargs)
    scale = cfg.train.batch_size / o.base_batch
    sched = WarmupCosine(
        opt,
        peak=cfg.peak_lr(),
        warmup_lr=o.warmup_lr * scale,
        min_lr=o.min_lr * scale,
        warmup_steps=o.warmup_steps,
        total_steps=cfg.train.steps,
    )
    return opt, sched


# ---------------------------------------------------------------------------------------------- data
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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- logging
def _fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """One progress line: step, loss, parts, lr, images/s, ETA (redrawn in place on a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total}", f"loss {rec['loss']:.4f}"]
        for k in ("itc", "ml", "seg"):
            if k in rec:
                parts.append(f"{k} {rec[k]:.3f}")
        if "acc_i2t" in rec:
            parts.append(f"acc {rec['acc_i2t']:.2f}")
        parts += [f"lr {rec['lr']:.2e}", f"{rec['img_s']:.0f} img/s", f"eta {_fmt_time(rec['eta_s'])}"]
        line = " | ".join(parts)
        if self.tty:
            sys.stderr.write("\r" + line[:200].ljust(120))
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item()) if v.numel() == 1 else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records past ``last_step`` (left by an interrupted run that is now resumed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


#: logged numbers that are neither a loss term nor an accuracy (not drawn in the loss plot)
_NOT_PLOTTED = ("step", "lr", "img_s", "time_s", "eta_s", "grad_norm", "epoch")


def _is_accuracy(key: str) -> bool:
    return key.split("/")[-1].startswith(("acc", "pixel_acc"))


def metric_series(jsonl: Path) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[tuple[float, float]]]]:
    """``(losses, accuracies)`` of the training records of ``metrics.jsonl``: ``{key: [(step, value)]}``
    for every logged loss term and every accuracy (keys ending in ``acc*``)."""
    losses: dict[str, list[tuple[float, float]]] = {}
    accs: dict[str, list[tuple[float, float]]] = {}
    if not jsonl.is_file():
        return losses, accs
    for line in jsonl.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind", "train") != "train":
            continue
        for key, value in rec.items():
            if key in _NOT_PLOTTED or key == "kind" or key.split("/")[-1] == "scale":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                (accs if _is_accuracy(key) else losses).setdefault(key, []).append((rec["step"], value))
    return losses, accs


def plot_metrics(jsonl: Path, png: Path) -> Path | None:
    """Every logged loss term (total, contrast of each branch, multi-label, L_seg, ...) over the steps,
    and below it every accuracy (the mixed-patch accuracy ``seg/acc`` among them), as one PNG; None if
    ``jsonl`` has no training record."""
    from PIL import Image

    from mixreorg.viz import plot_curves

    losses, accs = metric_series(jsonl)
    if not losses:
        return None
    panels = [plot_curves(losses, title="pretraining losses", xlabel="step", ylabel="loss", smooth=0.6)]
    if accs:
        title = "accuracies" + (" (seg/acc: source image of each mixed patch, chance 1/G)" if "seg/acc" in accs else "")
        panels.append(plot_curves(accs, title=title, xlabel="step", ylabel="accuracy", smooth=0.6))
    canvas = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for panel in panels:
        canvas.paste(panel, (0, y))
        y += panel.height
    png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png)
    return png


# ---------------------------------------------------------------------------------------------- distributed
def _init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _all_gather_object(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------- training
def train(
    cfg: PretrainConfig,
    *,
    resume: str | bool = "auto",
    evaluate_at_end: bool = True,
    fail_at_step: int | None = None,
    stop_after: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the pretraining described by ``cfg``; returns a summary dict.

    Args:
        resume: ``"auto"`` (resume from the newest checkpoint in ``train.out_dir`` if any), ``True``
            (require one), ``False`` (start fresh; refuses a folder that already has checkpoints),
            or a checkpoint path.
        evaluate_at_end: run the zero-shot evaluation (rank 0) and write overlays and the loss plot.
        fail_at_step: testing aid -- make the loss NaN at that (1-based) step.
        stop_after: testing aid -- simulate an interruption: return after this many steps of the
            schedule (saving a checkpoint there), as if the process had been killed after a save.
        quiet: no progress line.

    Returns ``dict(step, out_dir, checkpoint, metrics, eval)``. Raises :class:`NaNLossError`.
    """
    cfg.validate()
    rank, world, device = _init_distributed()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by the {world} ranks")
    local_batch = cfg.train.batch_size // world
    out = Path(cfg.train.out_dir)
    manager = CheckpointManager(out / "checkpoints", keep_last=cfg.train.keep_last)
    metrics_path = out / "metrics.jsonl"

    torch.manual_seed(cfg.train.seed * 1000 + rank)
    random.seed(cfg.train.seed * 1000 + rank)
    model = build_model(cfg).to(device)
    optimizer, schedule = build_optimizer(model, cfg)
    stream = build_stream(cfg, local_batch, rank, world)

    # ---- resume
    start = 0
    elapsed_before = 0.0  # training seconds of the interrupted run (time budgets continue from there)
    ckpt_path: Path | None = None
    if resume not in (False, "never"):
        if isinstance(resume, (str, os.PathLike)) and resume not in ("auto",) and not isinstance(resume, bool):
            ckpt_path = Path(resume)
        else:
            ckpt_path = manager.latest()
            if ckpt_path is None and resume is True:
                raise ValueError(f"--resume: no checkpoint in {manager.directory}")
    elif manager.latest() is not None:
        raise ValueError(f"{manager.directory} already holds checkpoints; resume, or choose another train.out_dir")
    if ckpt_path is not None:
        saved = load_checkpoint(ckpt_path)
        if saved.get("config") is not None:
            # through the dataclasses: keys added to the config since the checkpoint take their
            # defaults (an older run resumes), unknown keys raise a ValueError naming them
            saved = {**saved, "config": config_from_dict(saved["config"]).to_dict()}
        info = restore_training_state(
            saved,
            model,
            optimizer,
            schedule,
            config=cfg.to_dict(),
            ignore_config_keys=("train.time_limit", "eval", "train.log_every"),
            restore_rng=False,
        )
        start = info["step"]
        extra = info.get("extra") or {}
        data_states = (info.get("data") or {}).get("ranks")
        if data_states is None or len(data_states) != world:
            raise ValueError(f"checkpoint {ckpt_path} was written by {len(data_states or [])} ranks, now {world}")
        stream.load_state_dict(data_states[rank])
        elapsed_before = float(extra.get("elapsed_s", 0.0))
        rng_states = extra.get("rng_ranks")
        if rng_states is not None and len(rng_states) == world:
            restore_rng_state(rng_states[rank])
        if rank == 0:
            _truncate_jsonl(metrics_path, start)
            if not quiet:
                print(f"resumed from {ckpt_path} at step {start}", file=sys.stderr, flush=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    ctx_len = int(getattr(model.inference_model().text, "context_length", 77))
    builder = BatchBuilder(cfg, ctx_len, rank, with_masks=getattr(model, "needs_masks", False))
    # own generator: creating the loader's iterator must not draw from the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.data.seed),
    )
    amp = cfg.train.amp and device.type == "cuda"
    by_time = cfg.train.time_limit > 0 and cfg.train.schedule_by_time

    def save(step: int) -> Path | None:
        data_states = _all_gather_object(stream.state_dict(), world)
        rng_states = _all_gather_object(capture_rng_state(), world)
        path = None
        if rank == 0:
            elapsed = time.perf_counter() - t_start + elapsed_before
            state = training_state(
                model,
                optimizer,
                schedule,
                step=step,
                config=cfg.to_dict(),
                data_state={"ranks": data_states},
                extra={"rng_ranks": rng_states, "elapsed_s": elapsed},
            )
            path = manager.save(state, step)
        if world > 1:
            dist.barrier()
        return path

    last_good = manager.latest() if rank == 0 else None
    total = cfg.train.steps
    end = total if stop_after is None else min(total, stop_after)
    progress = _Progress(total, enabled=(rank == 0 and not quiet))
    model.train()
    step = start
    t_start = time.perf_counter()
    t_log, n_log = t_start, 0
    train_time = 0.0
    sums: dict[str, float] = {}
    count = 0
    it: Iterator[dict[str, Any]] = iter(loader)
    log_f = open(metrics_path, "a") if rank == 0 else None  # noqa: SIM115
    try:
        while step < end:
            raw = next(it)
            stream.observe(raw)
            batch = _to_device(builder(raw, step), device)
            if by_time:  # the schedule follows whichever is further along: steps or the time budget
                frac = (time.perf_counter() - t_start + elapsed_before) / cfg.train.time_limit
                if world > 1:
                    t = torch.tensor([frac], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    frac = float(t.item())
                schedule.apply(at=frac * total)
            else:
                schedule.apply()
            lr = optimizer.param_groups[0]["lr"]
            with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                outs = train_model(batch)
            loss = outs["loss"]
            if fail_at_step is not None and step + 1 == fail_at_step:
                loss = loss * float("nan")
            if not bool(torch.isfinite(loss.detach()).all()):
                raise NaNLossError(step + 1, "loss", last_good)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
            )
            if not bool(torch.isfinite(gnorm)):
                raise NaNLossError(step + 1, "gradient norm", last_good)
            optimizer.step()
            schedule.step()
            step += 1
            n_log += local_batch * world
            count += 1
            for key, value in outs.items():
                v = _scalar(value)
                if v is not None:
                    sums[key] = sums.get(key, 0.0) + v
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(gnorm)
            if step % cfg.train.log_every == 0 or step == end:
                now = time.perf_counter()
                img_s = n_log / max(now - t_log, 1e-9)
                train_time = now - t_start
                rec = {"kind": "train", "step": step, "lr": lr, "img_s": img_s, "time_s": train_time}
                rec.update({k: v / count for k, v in sums.items()})
                rec["eta_s"] = (total - step) * (train_time / max(step - start, 1))
                if log_f is not None:
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
                progress.update(step, rec)
                sums, count, n_log, t_log = {}, 0, 0, now
            stop_for_time = (
                cfg.train.time_limit > 0 and time.perf_counter() - t_start + elapsed_before >= cfg.train.time_limit
            )
            if world > 1:
                flag = torch.tensor([int(stop_for_time)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_for_time = bool(flag.item())
            if (cfg.train.save_every > 0 and step % cfg.train.save_every == 0) or step == end or stop_for_time:
                saved = save(step)
                last_good = saved if saved is not None else last_good
            if cfg.eval.every > 0 and step % cfg.eval.every == 0 and step < end and rank == 0:
                with torch.random.fork_rng(devices=[]):
                    res = _evaluate(model, cfg, device, write=False)
                if log_f is not None:
                    log_f.write(json.dumps({"kind": "eval", "step": step, **_flat_eval(res)}) + "\n")
                    log_f.flush()
            if stop_for_time:
                if rank == 0 and not quiet:
                    progress.close()
                    print(f"time limit {cfg.train.time_limit:.0f}s reached at step {step}", file=sys.stderr)
                break
    finally:
        progress.close()
        if log_f is not None:
            log_f.close()
    train_time = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "step": step,
        "out_dir": str(out),
        "checkpoint": str(last_good) if last_good else None,
        "train_time_s": train_time,
    }
    if rank == 0:
        summary["stream"] = stream.stats_report()
    if stop_after is not None and step < total:
        return summary
    if rank == 0:
        png = plot_metrics(metrics_path, out / "loss.png")
        summary["loss_plot"] = str(png) if png else None
        if evaluate_at_end and cfg.eval.every >= 0:
            res = _evaluate(model, cfg, device, write=True)
            summary["eval"] = res
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"kind": "eval", "step": step, **_flat_eval(res)}) + "\n")
    if world > 1:
        dist.barrier()
    return summary


def _flat_eval(res: dict[str, Any]) -> dict[str, Any]:
    return {f"{name}/mIoU": r["miou"] for name, r in res.items() if isinstance(r, dict) and "miou" in r}


def _evaluate(model: nn.Module, cfg: PretrainConfig, device: torch.device, write: bool) -> dict[str, Any]:
    from mixreorg.recipes.evaluation import evaluate_datasets

    out_dir = Path(cfg.train.out_dir) / "eval" if write else None
    return evaluate_datasets(model, cfg, out_dir=out_dir, device=device, verbose=write)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mixreorg.recipes.pretrain",
        description="Text-supervised pretraining of GroupViT / MixReorg (and zero-shot evaluation at the end).",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="named configuration (default tiny)")
    p.add_argument("--config", help="a config.json to start from (instead of a preset)")
    p.add_argument(
        "--model",
        help="model name (overrides model.name): groupvit | groupvit_plus | mixreorg | the Table 6 rows "
        "mixreorg_cm | mixreorg_no_cm | mixreorg_cm_seg | mixreorg_cm_rc | supervised (the upper bound)",
    )
    p.add_argument("--data", help="data path (folder, CSV or shards; the source is inferred unless --source)")
    p.add_argument("--source", choices=["synthshapes", "folder", "csv", "webdataset"])
    p.add_argument("--out", help="run folder (train.out_dir)")
    p.add_argument("--steps", type=int, help="optimiser steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="global batch (train.batch_size)")
    p.add_argument("--lr", type=float, help="base lr at optim.base_batch (optim.lr)")
    p.add_argument("--time-limit", type=float, help="stop after this many seconds of training")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--workers", type=int, help="DataLoader workers (data.num_workers)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (model.use_checkpoint)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set optim.lr=5e-4 (repeatable)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        default="auto",
        help="resume: auto (default, if the run folder has a checkpoint), yes, no, or a checkpoint path",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation at the end")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    cfg = PretrainConfig.load(args.config) if args.config else get_preset(args.preset)
    if args.model:
        cfg.model.name = args.model
        if is_mixreorg_model(args.model) and not cfg.model.mixreorg and cfg.preset.startswith("tiny"):
            cfg.model.mixreorg = get_preset("tiny_mixreorg").model.mixreorg
    if args.data:
        cfg.data.path = args.data
        if args.source is None:
            path = args.data
            if path.endswith((".csv", ".tsv")):
                cfg.data.source = "csv"
            elif ".tar" in path or "{" in path or "*" in path:
                cfg.data.source = "webdataset"
            elif os.path.isdir(path) and any(Path(path).glob("*.tar")):
                cfg.data.source = "webdataset"
            else:
                cfg.data.source = "folder"
    if args.source:
        cfg.data.source = args.source
    if args.out:
        cfg.train.out_dir = args.out
    if args.steps is not None:
        cfg.train.steps = args.steps
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, args.steps)
    if args.batch_size is not None:
        cfg.train.batch_size = args.batch_size
    if args.lr is not None:
        cfg.optim.lr = args.lr
    if args.time_limit is not None:
        cfg.train.time_limit = args.time_limit
    if args.threads is not None:
        cfg.train.threads = args.threads
    if args.workers is not None:
        cfg.data.num_workers = args.workers
    if args.checkpointing:
        cfg.model.use_checkpoint = True
    apply_overrides(cfg, args.set)
    return cfg.validate()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    resume: str | bool = {"auto": "auto", "yes": True, "no": False}.get(args.resume, args.resume)
    t0 = time.perf_counter()
    try:
        summary = train(cfg, resume=resume, evaluate_at_end=not args.no_eval, quiet=args.quiet)
    except NaNLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.get("out_dir") and (not dist.is_initialized() or dist.get_rank() == 0):
        print(
            f"trained {summary['step']} steps in {_fmt_time(summary['train_time_s'])} "
            f"(total {_fmt_time(time.perf_counter() - t0)}); run folder {summary['out_dir']}"
        )
        if summary.get("loss_plot"):
            print(f"loss plot: {summary['loss_plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
