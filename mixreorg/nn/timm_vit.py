"""Patch mixing inside a timm ``VisionTransformer`` (no timm import needed here).

``forward_mixed(vit, images, mixer, after_block=k)`` runs timm's own sub-modules in timm's order
(patch embed, position embedding, pre-norm, blocks) and mixes the patch tokens after block ``k``
(CLS/register tokens stay in place: ``mixer.num_prefix_tokens`` must equal
``vit.num_prefix_tokens``), runs the remaining blocks on the mixed sequence, and restores every
patch to its own image before the final norm and head::

    import timm
    from mixreorg.nn import MixedPatchMixer
    from mixreorg.nn.timm_vit import forward_mixed

    vit = timm.create_model("vit_small_patch16_224", num_classes=10)
    mixer = MixedPatchMixer(group_size=8, num_prefix_tokens=vit.num_prefix_tokens)
    out = forward_mixed(vit, images, mixer, after_block=3)
    loss = F.cross_entropy(out.logits, targets)      # the head sees restored tokens
    # out.mixed_tokens [B, L, C]: the mixed sequence after the last block (per-patch tasks)
    # out.plan.labels  [B, L_patches]: which image of the group each mixed patch came from
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..ops.plan import MixPlan
from .mixer import MixedPatchMixer

__all__ = ["MixedForward", "forward_mixed"]


class MixedForward(NamedTuple):
    logits: torch.Tensor  # [B, num_classes] head on the restored tokens
    restored_tokens: torch.Tensor  # [B, L, C] after the final norm
    mixed_tokens: torch.Tensor  # [B, L, C] mixed branch after the last block (final norm applied)
    plan: MixPlan


def forward_mixed(
    vit: nn.Module,
    images: torch.Tensor,
    mixer: MixedPatchMixer,
    *,
    after_block: int,
    plan: MixPlan | None = None,
    generator: torch.Generator | None = None,
) -> MixedForward:
    """Forward a timm ``VisionTransformer`` with patch mixing after block ``after_block``
    (0 = right after the position embedding, ``len(vit.blocks)`` = after the last block)."""
    depth = len(vit.blocks)
    if not 0 <= after_block <= depth:
        raise ValueError(f"forward_mixed: after_block must be in [0, {depth}], got {after_block}")
    prefix = getattr(vit, "num_prefix_tokens", 0)
    if mixer.num_prefix_tokens != prefix or mixer.num_suffix_tokens != 0:
        raise ValueError(
            f"forward_mixed: the model has {prefix} prefix tokens (CLS/registers); build the mixer with "
            f"num_prefix_tokens={prefix} and num_suffix_tokens=0"
        )
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)  # [B, L, C]
    for blk in vit.blocks[:after_block]:
        x = blk(x)
    x, plan = mixer(x, plan, generator=generator)  # mixed sequence, same layout
    for blk in vit.blocks[after_block:]:
        x = blk(x)
    mixed = vit.norm(x)
    restored = mixer.restore(mixed, plan)  # every patch back in its own image
    logits = vit.forward_head(restored)
    return MixedForward(logits, restored, mixed, plan)
