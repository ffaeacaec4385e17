"""MixReorg as a trainer model for :mod:`mixreorg.recipes.pretrain` (``--model mixreorg`` and the
Table 6 presets), trained with the same image-text objective as every compared model.

``training_losses(batch)``: one step's three branches (original, mixed, restored) and
``L = w_seg * L_seg(mixed) + L_contrast(original) + w_rest * L_contrast(restored)``, where each
contrast is the shared :class:`~mixreorg.losses.ContrastiveObjective`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mixreorg.losses import MixReorgLoss, text_ids
from mixreorg.nn.mixreorg import MixReorg

from .builders import build_groupvit, build_objective
from .config import PATCH_LABEL_TOKENS
from .data import token_row_keys

__all__ = ["MixReorgPretrainer", "build_mixreorg_trainer"]


class MixReorgPretrainer(nn.Module):
    """MixReorg + the shared objective, behind the trainer-model interface.

    Args:
        model: the :class:`MixReorg` model.
        objective: the image-text objective shared by every compared model.
        seg_weight, restored_weight: loss weights (0 switches a term off: Table 6 rows).
        patch_seg_weight: weight of L_seg at the patch level (:class:`~mixreorg.losses.MixReorgLoss`).
        mixed_grounded_weight: weight of the caption-grounded term on the mixed images (same class).
        patch_tokens: the patches an objective with ``patch_label_weight > 0`` scores (``"stage1"`` or
            ``"embed"``, as :class:`mixreorg.recipes.models.GroupViTPretrainer`).
    """

    def __init__(self, model: MixReorg, objective: nn.Module, seg_weight: float = 1.0,
                 restored_weight: float = 1.0, patch_seg_weight: float = 0.0, patch_tokens: str = "stage1",
                 mixed_grounded_weight: float = 0.0) -> None:
        super().__init__()
        if patch_tokens not in PATCH_LABEL_TOKENS:
            raise ValueError(f"patch_tokens must be one of {PATCH_LABEL_TOKENS}, got {patch_tokens!r}")
        if getattr(objective, "grounded_teacher", "self") != "self":
            raise ValueError(f"MixReorgPretrainer: grounded_teacher={objective.grounded_teacher!r} is built for the "
                             "GroupViT trainer only (the MixReorg branches read the student's own labels)")
        self.patch_tokens = patch_tokens
        self.model = model
        self.objective = objective
        self.loss = MixReorgLoss(objective, seg_weight=seg_weight, restored_weight=restored_weight,
                                 patch_seg_weight=patch_seg_weight, mixed_grounded_weight=mixed_grounded_weight)

    def inference_model(self) -> nn.Module:
        """GroupViT+ with the trained weights: the original branch alone (same cost as GroupViT),
        pooled as in training."""
        return self.model.to_groupvit()

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with this step's mixing ``plan`` drawn (from the global RNG, as the forward would).

        The training loop calls it eagerly before the forward: drawing and checking a plan reads
        tensor values, which would break a ``torch.compile``-d forward; given one, the forward
        only indexes with it. Without it the forward draws the plan itself, the same way.
        """
        if batch.get("plan") is not None:
            return batch
        images = batch["images"]
        grid = self.model.vision.patch_embed.grid_for(images)
        return {**batch, "plan": self.model.make_plan(images.shape[0], grid, images.device)}

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, text = batch["images"], batch["text"]
        obj = self.objective
        uses_prompts = any(getattr(obj, w, d) for w, d in (
            ("multi_label_weight", 1.0), ("patch_label_weight", 0.0), ("prompt_uniformity_weight", 0.0),
            ("grounded_seg_weight", 0.0), ("grounded_patch_weight", 0.0))) or self.loss.mixed_grounded_weight > 0
        prompts = batch.get("prompts") if uses_prompts else None
        out = self.model(images, text, prompt_ids=prompts, plan=batch.get("plan"),
                         patch_embed=self.loss.patch_seg_weight > 0,
                         branch_patches=self.patch_tokens if self.loss.reads_patches else None)
        keys = batch.get("caption_keys")
        if keys is None:
            captions = batch.get("captions")
            keys = text_ids(captions).to(images.device) if captions is not None else token_row_keys(text)
        extra = {k: batch.get(k) for k in ("text_keys", "prompt_keys", "label_keys", "prompt_mask", "prompt_heads")}
        return self.loss(out, caption_keys=keys, **extra)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.training_losses(batch)


def build_mixreorg_trainer(cfg) -> MixReorgPretrainer:
    """``--model mixreorg``: the recipe's GroupViT backbone and shared objective, MixReorg switches
    from ``cfg.model.mixreorg`` (:class:`MixReorgConfig` fields plus ``seg_weight`` /
    ``restored_weight`` / ``patch_seg_weight`` / ``mixed_grounded_weight``); every branch pools as
    ``cfg.model.image_pool`` says (the backbone's)."""
    opts = dict(cfg.model.mixreorg)
    weights = {k: opts.pop(k) for k in ("seg_weight", "restored_weight", "patch_seg_weight", "mixed_grounded_weight")
               if k in opts}
    return MixReorgPretrainer(MixReorg(build_groupvit(cfg), opts), build_objective(cfg),
                              patch_tokens=cfg.objective.patch_label_tokens, **weights)
