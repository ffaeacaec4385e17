"""The parts every trainer model shares, built from the config: the GroupViT backbone, the
image-text objective, and the weight-decay split."""

from __future__ import annotations

import math

from torch import nn

from mixreorg.losses import ContrastiveObjective
from mixreorg.nn.groupvit import GroupViT

from .config import PretrainConfig

__all__ = ["build_groupvit", "build_objective", "no_weight_decay_names"]


def build_objective(cfg: PretrainConfig) -> ContrastiveObjective:
    """The shared objective from ``cfg.objective`` (identical for every model)."""
    o = cfg.objective
    return ContrastiveObjective(
        o.loss,
        multi_positive=o.multi_positive,
        multi_label_weight=o.multi_label_weight,
        multi_label_pool=o.multi_label_pool,
        patch_label_weight=o.patch_label_weight,
        prompt_uniformity_weight=o.prompt_uniformity_weight,
        grounded_seg_weight=o.grounded_seg_weight,
        grounded_seg_scope=o.grounded_seg_scope,
        grounded_patch_weight=o.grounded_patch_weight,
        grounded_patch_on=o.grounded_patch_on,
        grounded_patch_threshold=o.grounded_patch_threshold,
        grounded_teacher=o.grounded_teacher,
        grounded_vocab=o.grounded_vocab,
        grounded_labels=o.grounded_labels,
        grounded_cam_threshold=o.grounded_cam_threshold,
        patch_mean_weight=o.patch_mean_weight,
        bias_init=o.bias_init,
        ml_bias_init=o.ml_bias_init,
    )


def build_groupvit(cfg: PretrainConfig) -> GroupViT:
    """The GroupViT backbone from ``cfg.model`` (``img_size`` follows ``cfg.data.image_size``)."""
    m = cfg.model
    vision = dict(m.vision)
    vision.setdefault("img_size", cfg.data.image_size)
    vision["use_checkpoint"] = bool(m.use_checkpoint)
    text = dict(m.text)
    text["use_checkpoint"] = bool(m.use_checkpoint)
    return GroupViT(
        vision,
        text,
        proj_dim=m.proj_dim,
        proj_hidden=m.proj_hidden,
        proj_layers=m.proj_layers,
        logit_scale_init=math.log(m.logit_scale_init),
        image_pool=m.image_pool,
        pool_weight_grad=m.image_pool_grad,
    )


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters excluded from weight decay: every parameter with ndim <= 1 (biases, norms,
    scales), plus what the model lists in ``no_weight_decay()`` (position embeddings, group tokens)."""
    names = {n for n, p in model.named_parameters() if p.ndim <= 1}
    extra = getattr(model, "no_weight_decay", None)
    if callable(extra):
        listed = set(extra())
        for n, _ in model.named_parameters():
            if n in listed or any(n.endswith("." + x) or n == x for x in listed):
                names.add(n)
    for n, _ in model.named_parameters():
        if n.endswith("pos_embed") or n.endswith("group_token"):
            names.add(n)
    return names
