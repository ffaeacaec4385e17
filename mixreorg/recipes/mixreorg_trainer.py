"""MixReorg as a trainer model for :mod:`mixreorg.recipes.pretrain` (``--model mixreorg`` and the
Table 6 presets), trained with the same image-text objective as every compared model.

``training_losses(batch)``: one step's three branches (original, mixed, restored) and
``L = w_seg * L_seg(mixed) + L_contrast(original) + w_rest * L_contrast(restored)``, where each
contrast is the shared :class:`~mixreorg.losses.ContrastiveObjective`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixreorg.losses import MixReorgLoss, text_ids
from mixreorg.nn.mixreorg import MixReorg

from .builders import build_groupvit, build_objective

__all__ = ["MixReorgPretrainer", "build_mixreorg_trainer"]


class MixReorgPretrainer(nn.Module):
    """MixReorg + the shared objective, behind the trainer-model interface.

    Args:
        model: the :class:`MixReorg` model.
        objective: the image-text objective shared by every compared model.
        seg_weight, restored_weight: loss weights (0 switches a term off: Table 6 rows).
    """

    def __init__(self, model: MixReorg, objective: nn.Module, seg_weight: float = 1.0,
                 restored_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.loss = MixReorgLoss(objective, seg_weight=seg_weight, restored_weight=restored_weight)

    def inference_model(self) -> nn.Module:
        """GroupViT+ with the trained weights: the original branch alone (same cost as GroupViT),
        pooled as in training."""
        return self.model.to_groupvit()

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, text = batch["images"], batch["text"]
        prompts = batch.get("prompts") if getattr(self.objective, "multi_label_weight", 1.0) else None
        out = self.model(images, text, prompt_ids=prompts)
        captions = batch.get("captions")
        keys = text_ids(captions).to(images.device) if captions is not None else _row_keys(text)
        extra = {k: batch.get(k) for k in ("text_keys", "prompt_keys", "label_keys")}
        return self.loss(out, caption_keys=keys, **extra)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.training_losses(batch)


def _row_keys(token_ids: torch.Tensor) -> torch.Tensor:
    """Equal token rows -> equal integer keys (for merging duplicate captions in a group)."""
    _, inverse = torch.unique(token_ids, dim=0, return_inverse=True)
    return inverse


def build_mixreorg_trainer(cfg) -> MixReorgPretrainer:
    """``--model mixreorg``: the recipe's GroupViT backbone and shared objective, MixReorg switches
    from ``cfg.model.mixreorg`` (:class:`MixReorgConfig` fields plus ``seg_weight`` /
    ``restored_weight``); every branch pools as ``cfg.model.image_pool`` says (the backbone's)."""
    opts = dict(cfg.model.mixreorg)
    weights = {k: opts.pop(k) for k in ("seg_weight", "restored_weight") if k in opts}
    return MixReorgPretrainer(MixReorg(build_groupvit(cfg), opts), build_objective(cfg), **weights)
