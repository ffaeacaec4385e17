"""The training loop of :mod:`mixreorg.recipes.pretrain`: set-up, resume, steps, logging,
checkpoints, the time budget and the final evaluation, one function each.

What makes a resumed run equal an uninterrupted one: every checkpoint holds the model, optimizer,
schedule, every rank's RNG state and data position; a record of ``metrics.jsonl`` past the resumed
step is dropped; the time budget continues from the training seconds already spent.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mixreorg.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    restore_training_state,
    training_state,
)

from .config import PretrainConfig, config_from_dict
from .data import BatchBuilder, Prefetcher, build_stream, to_device
from .distributed import all_gather_object, init_distributed
from .evaluation import evaluate_datasets
from .logger import MetricsLog, Progress, eta_seconds, plot_metrics, scalar_value, truncate_jsonl
from .models import build_model
from .scheduler import WarmupCosine, build_optimizer

__all__ = ["NaNLossError", "Run", "cpu_bf16_support", "resolve_cpu_bf16", "train"]

CPU_BF16_MODES = ("off", "auto", "on")


class NaNLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; ``step`` is the failing step (1-based),
    ``checkpoint`` the last good checkpoint (or None)."""

    def __init__(self, step: int, what: str, checkpoint: Path | None) -> None:
        self.step, self.what, self.checkpoint = step, what, checkpoint
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"non-finite {what} at step {step}: training stopped; {kept}")


@dataclass
class Run:
    """Everything one process of a run holds: config, ranks, model, optimiser, data and its files."""

    cfg: PretrainConfig
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    stream: Any
    manager: CheckpointManager
    start: int = 0  # the step this process starts from (a resumed run: the checkpoint's)
    elapsed_before: float = 0.0  # training seconds of the interrupted run (time budgets continue)
    last_good: Path | None = None
    cpu_bf16: bool = False  # bf16 autocast on CPU (train.cpu_bf16, resolved against this CPU)
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def local_batch(self) -> int:
        return self.cfg.train.batch_size // self.world

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start + self.elapsed_before


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively -> ``(native, what torch found)``.

    Native: AVX512-BF16 or AMX tiles (the instructions oneDNN's bf16 kernels use). Elsewhere
    (e.g. AVX2 only) bf16 autocast converts to float32 and back around every op: slower, never faster.
    """
    found = {
        name: bool(probe())
        for name, probe in (("avx512_bf16", getattr(torch.cpu, "_is_avx512_bf16_supported", None)),
                            ("amx", getattr(torch.cpu, "_is_amx_tile_supported", None)))
        if probe is not None
    }
    if not found and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported"):
        found["mkldnn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    native = any(found.values())
    return native, ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in found.items()) or "no probe in this torch"


def resolve_cpu_bf16(mode: str, native: bool | None = None) -> bool:
    """``train.cpu_bf16`` -> whether the CPU steps run under bf16 autocast. ``native``: the CPU's
    support (default: :func:`cpu_bf16_support`). ``"on"`` without it raises ``ValueError``."""
    if mode not in CPU_BF16_MODES:
        raise ValueError(f"train.cpu_bf16 must be one of {'|'.join(CPU_BF16_MODES)}, got {mode!r}")
    if mode == "off":
        return False
    found = "given"
    if native is None:
        native, found = cpu_bf16_support()
    if mode == "on" and not native:
        raise ValueError(
            f"train.cpu_bf16=on, but this CPU has no native bf16 ({found}): bf16 autocast would be "
            "emulated, slower than float32. Use train.cpu_bf16=auto (bf16 only where native) or off"
        )
    return native


def _setup(cfg: PretrainConfig) -> Run:
    cfg.validate()
    if cfg.data.prefetch < 0:
        raise ValueError(f"data.prefetch must be >= 0 batches (0: no background thread), got {cfg.data.prefetch}")
    rank, world, device = init_distributed()
    cpu_bf16 = resolve_cpu_bf16(cfg.train.cpu_bf16) if device.type == "cpu" else False
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by the {world} ranks")
    manager = CheckpointManager(Path(cfg.train.out_dir) / "checkpoints", keep_last=cfg.train.keep_last)
    # the same seeds give the same weights: seed before anything draws
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    random.seed(cfg.train.seed * 1000 + rank)
    np.random.seed(cfg.train.seed * 1000 + rank)  # noqa: NPY002 - the global state, as checkpoints save it
    model = build_model(cfg).to(device)
    optimizer, schedule = build_optimizer(model, cfg)
    stream = build_stream(cfg, cfg.train.batch_size // world, rank, world)
    return Run(cfg, rank, world, device, model, optimizer, schedule, stream, manager, cpu_bf16=cpu_bf16)


def _checkpoint_to_resume(run: Run, resume: str | bool | os.PathLike) -> Path | None:
    if resume in (False, "never"):
        if run.manager.latest() is not None:
            raise ValueError(
                f"{run.manager.directory} already holds checkpoints; resume, or choose another train.out_dir"
            )
        return None
    if isinstance(resume, (str, os.PathLike)) and not isinstance(resume, bool) and resume != "auto":
        return Path(resume)
    path = run.manager.latest()
    if path is None and resume is True:
        raise ValueError(f"--resume: no checkpoint in {run.manager.directory}")
    return path


def _resume(run: Run, path: Path, quiet: bool) -> None:
    saved = load_checkpoint(path)
    if saved.get("config") is not None:
        # through the dataclasses: keys added to the config since the checkpoint take their
        # defaults (an older run resumes), unknown keys raise a ValueError naming them
        saved = {**saved, "config": config_from_dict(saved["config"]).to_dict()}
    info = restore_training_state(
        saved,
        run.model,
        run.optimizer,
        run.schedule,
        config=run.cfg.to_dict(),
        # data.prefetch changes when batches are made, not which: a resumed run may switch it
        ignore_config_keys=("train.time_limit", "eval", "train.log_every", "train.log", "data.prefetch"),
        restore_rng=False,
    )
    run.start = info["step"]
    extra = info.get("extra") or {}
    data_states = (info.get("data") or {}).get("ranks")
    if data_states is None or len(data_states) != run.world:
        raise ValueError(f"checkpoint {path} was written by {len(data_states or [])} ranks, now {run.world}")
    run.stream.load_state_dict(data_states[run.rank])
    run.elapsed_before = float(extra.get("elapsed_s", 0.0))
    rng_states = extra.get("rng_ranks")
    if rng_states is not None and len(rng_states) == run.world:
        restore_rng_state(rng_states[run.rank])
    if run.rank == 0:
        truncate_jsonl(run.metrics_path, run.start)
        if not quiet:
            print(f"resumed from {path} at step {run.start}", file=sys.stderr, flush=True)


def save_checkpoint(run: Run, step: int) -> Path | None:
    """Every rank's data position and RNG state, gathered; rank 0 writes the checkpoint (atomic)."""
    data_states = all_gather_object(run.stream.state_dict(), run.world)
    rng_states = all_gather_object(capture_rng_state(), run.world)
    path = None
    if run.rank == 0:
        state = training_state(
            run.model,
            run.optimizer,
            run.schedule,
            step=step,
            config=run.cfg.to_dict(),
            data_state={"ranks": data_states},
            extra={"rng_ranks": rng_states, "elapsed_s": run.elapsed()},
        )
        path = run.manager.save(state, step)
    if run.world > 1:
        dist.barrier()
    return path


def _any_rank(run: Run, flag: bool) -> bool:
    if run.world == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _apply_schedule(run: Run) -> float:
    """Set this step's learning rate; with ``schedule_by_time`` the schedule follows whichever is
    further along, the steps or the time budget (the same on every rank). Returns the lr."""
    cfg = run.cfg
    if cfg.train.time_limit > 0 and cfg.train.schedule_by_time:
        frac = run.elapsed() / cfg.train.time_limit
        if run.world > 1:
            t = torch.tensor([frac], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            frac = float(t.item())
        run.schedule.apply(at=frac * cfg.train.steps)
    else:
        run.schedule.apply()
    return run.optimizer.param_groups[0]["lr"]


def train_step(run: Run, train_model: nn.Module, batch: dict[str, Any], step: int) -> tuple[dict[str, Any], float]:
    """One optimiser step (``step`` 0-based) -> ``(the model's outputs, gradient norm)``; raises
    :class:`NaNLossError` before the update when the loss or the gradient is not finite."""
    cfg = run.cfg
    if run.device.type == "cuda" and cfg.train.amp:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    elif run.device.type == "cpu" and run.cpu_bf16:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext()
    with autocast:
        outs = train_model(batch)
    loss = outs["loss"]
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NaNLossError(step + 1, "loss", run.last_good)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
    gnorm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    if not bool(torch.isfinite(gnorm)):
        raise NaNLossError(step + 1, "gradient norm", run.last_good)
    run.optimizer.step()
    run.schedule.step()
    return outs, float(gnorm)


class _Window:
    """Means of the logged numbers since the last record, and the images/s over that window.

    Tensors are summed as (detached) tensors and read once per record: reading them every step
    would wait for the device every step.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, outs: dict[str, Any], gnorm: float, images: int) -> None:
        for key, value in outs.items():
            if isinstance(value, torch.Tensor):
                v = value.detach().float().reshape(()) if value.numel() == 1 else None
            else:
                v = scalar_value(value)
            if v is not None:
                self.sums[key] = self.sums.get(key, 0.0) + v
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + gnorm
        self.count += 1
        self.images += images

    def record(self, run: Run, step: int, lr: float) -> dict[str, Any]:
        now = time.perf_counter()
        train_time = now - run.t_start
        rec: dict[str, Any] = {"kind": "train", "step": step, "lr": lr,
                               "img_s": self.images / max(now - self.t0, 1e-9), "time_s": train_time}
        rec.update({k: float(v) / self.count for k, v in self.sums.items()})
        t = run.cfg.train
        rec["eta_s"] = eta_seconds(step, t.steps, run.start, train_time, run.elapsed(), t.time_limit)
        self.reset()
        return rec


def _train_model(run: Run) -> nn.Module:
    if run.world == 1:
        return run.model
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(run.model, device_ids=device_ids)


def _loader(run: Run) -> Iterator[dict[str, Any]]:
    # own generator: creating the loader's iterator must not draw from the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(
        run.stream,
        batch_size=None,
        num_workers=run.cfg.data.num_workers,
        persistent_workers=run.cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(run.cfg.data.seed),
    )
    return iter(loader)


def _batches(run: Run, builder: BatchBuilder) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(raw, batch)`` for the steps from ``run.start`` on, made on a background thread with
    ``data.prefetch`` > 0 (:class:`Prefetcher`), else in the loop."""
    it = _loader(run)
    if run.cfg.data.prefetch > 0:
        return Prefetcher(it, builder, run.start, run.cfg.data.prefetch)
    return ((raw, builder(raw, step)) for step, raw in enumerate(it, start=run.start))


def _compiled(run: Run, train_model: nn.Module) -> nn.Module:
    if not run.cfg.train.compile:
        return train_model
    # the forward and its backward; the optimiser step and the NaN checks stay eager
    return torch.compile(train_model)


def train_loop(run: Run, end: int, quiet: bool) -> int:
    """Train from ``run.start`` to ``end`` (or the time budget); checkpoints every
    ``train.save_every`` steps and at the last one. Returns the step reached."""
    cfg = run.cfg
    train_model = _compiled(run, _train_model(run))
    prepare = getattr(run.model, "prepare_batch", None)  # eager per-step inputs (MixReorg's plan)
    ctx_len = int(getattr(run.model.inference_model().text, "context_length", 77))
    builder = BatchBuilder(cfg, ctx_len, run.rank, with_masks=getattr(run.model, "needs_masks", False),
                           fixed_length=cfg.train.compile)
    batches = _batches(run, builder)
    log = _metrics_log(run, purge_step=run.start + 1 if run.start > 0 else None)
    progress = Progress(cfg.train.steps, enabled=(run.rank == 0 and not quiet), start=run.start)
    window = _Window()
    run.model.train()
    step = run.start
    run.t_start = time.perf_counter()
    try:
        while step < end:
            raw, batch = next(batches)
            run.stream.observe(raw)
            batch = to_device(batch, run.device)
            if prepare is not None:
                batch = prepare(batch)
            lr = _apply_schedule(run)
            outs, gnorm = train_step(run, train_model, batch, step)
            step += 1
            window.add(outs, gnorm, run.local_batch * run.world)
            if step % cfg.train.log_every == 0 or step == end:
                rec = window.record(run, step, lr)
                log.write(rec)
                progress.update(step, rec)
            out_of_time = _any_rank(run, cfg.train.time_limit > 0 and run.elapsed() >= cfg.train.time_limit)
            if (cfg.train.save_every > 0 and step % cfg.train.save_every == 0) or step == end or out_of_time:
                run.last_good = save_checkpoint(run, step) or run.last_good
            if cfg.eval.every > 0 and step % cfg.eval.every == 0 and step < end and run.rank == 0:
                with torch.random.fork_rng(devices=[]):
                    res = _evaluate(run, write=False)
                log.write({"kind": "eval", "step": step, **_flat_eval(res)})
            if out_of_time:
                if run.rank == 0 and not quiet:
                    progress.close()
                    print(f"time limit {cfg.train.time_limit:.0f}s reached at step {step}", file=sys.stderr)
                break
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
        progress.close()
        log.close()
    return step


def _metrics_log(run: Run, purge_step: int | None = None) -> MetricsLog:
    """``metrics.jsonl`` (rank 0), and with ``train.log=tensorboard`` the same scalars in ``tb/``."""
    tb = run.out / "tb" if run.cfg.train.log == "tensorboard" else None
    return MetricsLog(run.metrics_path, enabled=run.rank == 0, tensorboard=tb, purge_step=purge_step)


def _flat_eval(res: dict[str, Any]) -> dict[str, Any]:
    return {f"{name}/mIoU": r["miou"] for name, r in res.items() if isinstance(r, dict) and "miou" in r}


def _evaluate(run: Run, write: bool) -> dict[str, Any]:
    out_dir = run.out / "eval" if write else None
    return evaluate_datasets(run.model, run.cfg, out_dir=out_dir, device=run.device, verbose=write)


def _finish(run: Run, step: int, evaluate_at_end: bool) -> dict[str, Any]:
    """(rank 0) The zero-shot evaluation of the finished run, then the loss plot (its mIoU included)."""
    summary: dict[str, Any] = {}
    if run.rank == 0:
        if evaluate_at_end and run.cfg.eval.every >= 0:
            res = _evaluate(run, write=True)
            summary["eval"] = res
            log = _metrics_log(run)
            log.write({"kind": "eval", "step": step, **_flat_eval(res)})
            log.close()
        inner = getattr(run.model, "model", run.model)  # the MixReorg trainer wraps the model
        group = getattr(inner, "group_size", None)  # MixReorg: seg/acc's chance is 1/G
        chance = {"seg/acc": 1.0 / group} if isinstance(group, int) and group > 0 else None
        png = plot_metrics(run.metrics_path, run.out / "loss.png", chance=chance)
        summary["loss_plot"] = str(png) if png else None
    if run.world > 1:
        dist.barrier()
    return summary


def train(
    cfg: PretrainConfig,
    *,
    resume: str | bool = "auto",
    evaluate_at_end: bool = True,
    stop_at: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the pretraining described by ``cfg``; returns a summary dict.

    Args:
        resume: ``"auto"`` (resume from the newest checkpoint in ``train.out_dir`` if any), ``True``
            (require one), ``False`` (start fresh; refuses a folder that already has checkpoints),
            or a checkpoint path.
        evaluate_at_end: run the zero-shot evaluation (rank 0) and write overlays and the loss plot.
        stop_at: checkpoint and return at this step without finishing the schedule (a long run split
            into jobs of a fixed length; the next call resumes it). None: train to ``train.steps``.
        quiet: no progress line.

    Returns ``dict(step, out_dir, checkpoint, train_time_s, stream, [loss_plot, eval])``. Raises
    :class:`NaNLossError`.
    """
    run = _setup(cfg)
    path = _checkpoint_to_resume(run, resume)
    if path is not None:
        _resume(run, path, quiet)
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        cfg.save(run.out / "config.json")
    run.last_good = run.manager.latest() if run.rank == 0 else None
    total = cfg.train.steps
    step = train_loop(run, total if stop_at is None else min(total, stop_at), quiet)
    summary: dict[str, Any] = {
        "step": step,
        "out_dir": str(run.out),
        "checkpoint": str(run.last_good) if run.last_good else None,
        "train_time_s": time.perf_counter() - run.t_start,
    }
    if run.rank == 0:
        summary["stream"] = run.stream.stats_report()
    if stop_at is not None and step < total:
        return summary
    return {**summary, **_finish(run, step, evaluate_at_end)}
