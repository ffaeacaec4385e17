"""GroupViT's optimiser and learning-rate schedule: AdamW without decay on 1-D parameters, position
embeddings and group tokens; linear warmup then cosine, with linear lr scaling by the batch."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .builders import no_weight_decay_names
from .config import PretrainConfig

__all__ = ["WarmupCosine", "build_optimizer"]


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
