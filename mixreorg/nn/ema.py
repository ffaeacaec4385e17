"""An exponential moving average of a module's weights: a teacher that is not the student.

Self-training reads its labels from a model; when that model is the student itself, whatever the
student leans to is confirmed at the next step (the confirmation bias of pseudo-labelling). A
slowly moving average of the student's past weights (mean teacher, Tarvainen & Valpola 2017; BYOL,
DINO) or a copy frozen at one step (``momentum=1``) breaks that loop.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEma"]


class ModelEma(nn.Module):
    """A gradient-free copy of ``model`` whose weights follow it: ``w <- m * w + (1 - m) * w_student``.

    Args:
        model: the student (copied now; its parameters are not shared).
        momentum: ``m`` in ``[0, 1]``: 0 copies the student at every update, 1 keeps the weights of
            the last :meth:`copy_from` (a frozen teacher).

    Buffers (e.g. BatchNorm statistics) are copied, not averaged. The copy is part of the owner's
    ``state_dict`` (an exact resume restores the teacher too) and its parameters do not require
    gradients (optimizers built from ``requires_grad`` leave them out). ``module`` is the copy.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(copy's parameters, student's, copy's buffers, student's), matched by name."""
        mine, theirs = dict(self.module.named_parameters()), dict(model.named_parameters())
        bm, bt = dict(self.module.named_buffers()), dict(model.named_buffers())
        if mine.keys() != theirs.keys() or bm.keys() != bt.keys():
            diff = sorted((mine.keys() ^ theirs.keys()) | (bm.keys() ^ bt.keys()))
            raise ValueError(f"ModelEma: the model is not the copy's architecture (differs in {diff[:4]})")
        names, bufs = sorted(mine), sorted(bm)
        return ([mine[n] for n in names], [theirs[n].detach() for n in names], [bm[n] for n in bufs],
                [bt[n] for n in bufs])

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Set every weight and buffer to the student's."""
        p, q, b, c = self._pairs(model)
        torch._foreach_copy_(p, q)
        for x, y in zip(b, c):
            x.copy_(y)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards the student's current weights."""
        if self.momentum == 1.0:
            return
        p, q, b, c = self._pairs(model)
        torch._foreach_lerp_(p, q, 1.0 - self.momentum)
        for x, y in zip(b, c):
            x.copy_(y)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
