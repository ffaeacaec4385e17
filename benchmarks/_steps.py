"""One optimiser step of a GroupViT (contrastive loss) or a MixReorg (three-branch loss), shared by the
train-step benchmarks so that every table times the same step."""

from __future__ import annotations

import torch

from mixreorg.nn import MixReorg

__all__ = ["train_step"]


def train_step(net: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor, opt: torch.optim.Optimizer,
               objective: torch.nn.Module, mix_loss: torch.nn.Module) -> None:
    """Forward, loss (``mix_loss`` for MixReorg, ``objective`` otherwise), backward, optimiser step."""
    if isinstance(net, MixReorg):
        loss = mix_loss(net(images, ids))["loss"]
    else:
        loss = objective(net.encode_image(images)["image_embed"], net.encode_text(ids),
                         logit_scale=net.logit_scale)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
