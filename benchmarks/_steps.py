"""One optimiser step of a GroupViT (contrastive loss) or a MixReorg (three-branch loss), shared by the
train-step benchmarks so that every table times the same step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from mixreorg.nn import MixReorg

__all__ = ["saved_bytes", "train_step"]


def train_step(net: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor, opt: torch.optim.Optimizer,
               objective: torch.nn.Module, mix_loss: torch.nn.Module,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """Forward, loss (``mix_loss`` for MixReorg, ``objective`` otherwise) under ``autocast()``,
    backward, optimiser step."""
    with autocast():
        if isinstance(net, MixReorg):
            loss = mix_loss(net(images, ids))["loss"]
        else:
            loss = objective(net.encode_image(images)["image_embed"], net.encode_text(ids),
                             logit_scale=net.logit_scale)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def saved_bytes(f: Callable, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``f(x)``."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(x)
    return sum(seen.values())
