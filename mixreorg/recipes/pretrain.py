"""Text-supervised pretraining of GroupViT / MixReorg: ``python -m mixreorg.recipes.pretrain``.

    python -m mixreorg.recipes.pretrain                      # the tiny CPU demo on SynthShapes
    python -m mixreorg.recipes.pretrain --model mixreorg     # same recipe, MixReorg encoder
    python -m mixreorg.recipes.pretrain --preset groupvit_cc12m --data /data/cc12m/{00000..01242}.tar
    torchrun --nproc_per_node 8 -m mixreorg.recipes.pretrain --preset mixreorg_cc12m --data ...
    python -m mixreorg.recipes.pretrain --set optim.lr=5e-4 --set model.vision.depths=[2,2,2]
    python -m mixreorg.recipes.pretrain --print-config       # show the resolved config and exit

What a run does (the loop: :mod:`mixreorg.recipes.train`; data: :mod:`~mixreorg.recipes.data`; schedule:
:mod:`~mixreorg.recipes.scheduler`; logs: :mod:`~mixreorg.recipes.logger`; ranks: :mod:`~mixreorg.recipes.distributed`):

* data: SynthShapes (embedded), an image-caption folder or CSV, or webdataset shards; every source is
  a resumable stream (:mod:`mixreorg.data.stream`), sharded per rank; captions are tokenized and
  each image gets K noun prompts (deterministic per step and rank);
* AdamW with GroupViT's schedule: peak lr = ``optim.lr * batch / optim.base_batch``, linear warmup,
  cosine decay, no weight decay on 1-D parameters / position embeddings / group tokens; gradient
  clipping; bf16 autocast on CUDA; optional activation checkpointing (``model.use_checkpoint``);
* logs: a progress bar with loss, its parts and the ETA (within ``train.time_limit``), ``metrics.jsonl``
  in the run folder (``--log tensorboard``: the same scalars in ``tb/`` too), and at the end the
  zero-shot evaluation (mIoU table, per-class IoU chart, overlay pictures) plus ``loss.png`` (every
  loss term, accuracies, lr, images/s, eval mIoU);
* checkpoints: atomic, the newest ``train.keep_last`` kept, each with model, optimizer, schedule,
  RNG states (every rank's) and data position (every rank's), so that an interrupted run resumed
  with ``--resume`` (default: resume when the run folder has a checkpoint) equals an uninterrupted
  one; ``config.json`` is written next to them;
* a NaN/inf loss or gradient stops the run at once with the step number; no checkpoint is written
  after the last good one (exit status 3 from the command line).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

if __package__ in (None, ""):  # run as a file: python mixreorg/recipes/pretrain.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "mixreorg.recipes"  # noqa: A001

from mixreorg.recipes.config import PRESETS, PretrainConfig, apply_overrides, get_preset  # noqa: E402
from mixreorg.recipes.logger import fmt_time  # noqa: E402
from mixreorg.recipes.models import is_mixreorg_model  # noqa: E402
from mixreorg.recipes.train import NaNLossError, train  # noqa: E402

__all__ = ["NaNLossError", "build_parser", "config_from_args", "main", "train"]


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
        "--log",
        choices=["jsonl", "tensorboard"],
        help="train.log: jsonl (metrics.jsonl, always written) or tensorboard (also <out>/tb/ scalars)",
    )
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
    p.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="checkpoint and exit at this step without finishing the schedule (the next call resumes)",
    )
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
    if args.log is not None:
        cfg.train.log = args.log
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
        summary = train(cfg, resume=resume, evaluate_at_end=not args.no_eval, stop_at=args.stop_at, quiet=args.quiet)
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
            f"trained {summary['step']} steps in {fmt_time(summary['train_time_s'])} "
            f"(total {fmt_time(time.perf_counter() - t0)}); run folder {summary['out_dir']}"
        )
        if summary.get("loss_plot"):
            print(f"loss plot: {summary['loss_plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
