"""Trainer models: what :mod:`mixreorg.recipes.pretrain` trains, built by name from the config.

The loop only knows the trainer-model interface (MODEL_API.md)::

    model.training_losses(batch) -> dict(loss=scalar tensor, **floats or tensors to log)
    model.inference_model()      -> a GroupViT-interface module for zero-shot evaluation
                                    (encode_image(images, return_maps), encode_text, logit_scale)

``batch`` = ``dict(images [B, 3, H, W], text [B, T] ids, prompts [B, K, T] ids (optional),
text_keys list (optional), prompt_keys [B][K] (optional), label_keys [B][...] (optional))``.

Registry (:data:`MODEL_BUILDERS`, extend with :func:`register_model`):

* ``groupvit``: :class:`GroupViTPretrainer` -- GroupViT + :class:`ContrastiveObjective`.
* ``groupvit_plus``: GroupViT with one more stage-1 block ("GroupViT+", MixReorg's inference size;
  the paper's parameter-matched baseline, Table 6).
* ``mixreorg``: :class:`mixreorg.recipes.mixreorg_trainer.MixReorgPretrainer` (three branches,
  L_seg + the shared objective on the original and restored branches).
* ``mixreorg_cm``, ``mixreorg_no_cm``, ``mixreorg_cm_seg``, ``mixreorg_cm_rc``: the Table 6 ablation
  rows of :mod:`mixreorg.presets` (their switches over ``cfg.model.mixreorg``).
* ``supervised``: :class:`mixreorg.recipes.supervised.SupervisedSegmenter` -- the same backbone
  trained with SynthShapes' masks (the comparison table's upper bound).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mixreorg.losses import ContrastiveObjective
from mixreorg.nn.groupvit import GroupViT, assigned_pool

from .config import PretrainConfig

__all__ = [
    "IMAGE_POOLS",
    "assigned_pool",
    "AssignedPoolGroupViT",
    "GroupViTPretrainer",
    "MODEL_BUILDERS",
    "register_model",
    "build_model",
    "build_groupvit",
    "build_objective",
    "is_mixreorg_model",
    "no_weight_decay_names",
    "table6_builder",
]


def build_objective(cfg: PretrainConfig) -> ContrastiveObjective:
    """The shared objective from ``cfg.objective`` (identical for every model)."""
    o = cfg.objective
    return ContrastiveObjective(
        o.loss,
        multi_positive=o.multi_positive,
        multi_label_weight=o.multi_label_weight,
        multi_label_pool=o.multi_label_pool,
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
    )


IMAGE_POOLS = ("mean", "assigned")


class AssignedPoolGroupViT(nn.Module):
    """A GroupViT whose ``image_embed`` uses :func:`assigned_pool` (the same weights, no copy).

    It has the GroupViT inference interface (``encode_image``, ``encode_text``, ``logit_scale``,
    ``scale()``, ``vision``, ``text``), so :mod:`mixreorg.zeroshot` uses it unchanged and the
    image-level top-k of zero-shot segmentation sees the vector that was trained.
    """

    def __init__(self, groupvit: GroupViT) -> None:
        super().__init__()
        self.groupvit = groupvit

    @property
    def vision(self) -> nn.Module:
        return self.groupvit.vision

    @property
    def text(self) -> nn.Module:
        return self.groupvit.text

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.groupvit.logit_scale

    @property
    def logit_scale_max(self) -> float:
        return self.groupvit.logit_scale_max

    def scale(self) -> torch.Tensor:
        return self.groupvit.scale()

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.groupvit.encode_text(token_ids)

    def encode_image(self, images: torch.Tensor, return_maps: bool = False) -> dict:
        out = dict(self.groupvit.vision(images, return_maps=True))
        out["pooled"] = assigned_pool(out)
        res = self.groupvit.project_image(out, with_seg=return_maps)
        if not return_maps:
            res["hard_maps"], res["soft_maps"] = [], []
        return res


class GroupViTPretrainer(nn.Module):
    """GroupViT trained with the shared :class:`ContrastiveObjective` (the trainer-model interface).

    ``training_losses(batch)`` encodes the images, captions and (when the objective uses them) the
    noun prompts, and returns the objective's dict: ``loss`` (scalar tensor) plus ``itc``, ``ml``,
    in-batch retrieval accuracies and the current scale / bias.
    """

    def __init__(self, groupvit: GroupViT, objective: ContrastiveObjective, image_pool: str = "mean") -> None:
        super().__init__()
        if image_pool not in IMAGE_POOLS:
            raise ValueError(f"image_pool must be one of {IMAGE_POOLS}, got {image_pool!r}")
        self.groupvit = groupvit
        self.objective = objective
        self.image_pool = image_pool

    def inference_model(self) -> nn.Module:
        """The model zero-shot evaluation uses (GroupViT interface, same weights)."""
        return self.groupvit if self.image_pool == "mean" else AssignedPoolGroupViT(self.groupvit)

    def no_weight_decay(self) -> set[str]:
        return {f"groupvit.vision.{n}" for n in self.groupvit.vision.no_weight_decay()}

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        gv = self.groupvit
        images, text = batch["images"], batch["text"]
        needs_seg = self.objective.multi_label_pool == "max_segment" and self.objective.multi_label_weight > 0
        if self.image_pool == "assigned":
            vis = AssignedPoolGroupViT(gv).encode_image(images, return_maps=needs_seg)
        else:
            vis = gv.encode_image(images, return_maps=needs_seg)
        image_embed = vis["image_embed"]  # [B, D]
        prompts = batch.get("prompts")
        use_prompts = self.objective.multi_label_weight > 0
        if use_prompts and prompts is None:
            raise ValueError("the objective's multi-label loss needs batch['prompts'] [B, K, T]")
        if use_prompts:
            # two passes: captions and prompts are trimmed to their own lengths (cheaper than padding
            # the short prompts to the captions' length); a BatchNorm head sees each set separately
            text_embed = gv.encode_text(text)  # [B, D]
            prompt_embed = gv.encode_text(prompts)  # [B, K, D]
        else:
            text_embed, prompt_embed = gv.encode_text(text), None
        ml_scale = gv.multi_label_logit_scale if gv.multi_label_logit_scale is not None else gv.logit_scale
        return self.objective(
            image_embed,
            text_embed,
            logit_scale=gv.logit_scale,
            prompt_embed=prompt_embed,
            multi_label_scale=ml_scale,
            text_keys=batch.get("text_keys"),
            prompt_keys=batch.get("prompt_keys"),
            label_keys=batch.get("label_keys"),
            seg_embed=vis.get("seg_embed") if needs_seg else None,
        )

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Same as :meth:`training_losses` (so DDP wraps the module and hooks run)."""
        return self.training_losses(batch)


def _build_groupvit_trainer(cfg: PretrainConfig) -> nn.Module:
    return GroupViTPretrainer(build_groupvit(cfg), build_objective(cfg), image_pool=cfg.model.image_pool)


def _build_groupvit_plus_trainer(cfg: PretrainConfig) -> nn.Module:
    cfg = copy.deepcopy(cfg)
    depths = list(cfg.model.vision.get("depths", (6, 3, 3)))
    depths[0] += 1
    cfg.model.vision = dict(cfg.model.vision, depths=tuple(depths))
    return _build_groupvit_trainer(cfg)


MODEL_BUILDERS: dict[str, Callable[[PretrainConfig], nn.Module]] = {
    "groupvit": _build_groupvit_trainer,
    "groupvit_plus": _build_groupvit_plus_trainer,
}

# MixReorg (mixreorg/recipes/mixreorg_trainer.py): the same backbone builder, the same objective
# (build_objective), and every branch pooled as cfg.model.image_pool says.
def _build_mixreorg(cfg: PretrainConfig) -> nn.Module:
    from .mixreorg_trainer import build_mixreorg_trainer

    return build_mixreorg_trainer(cfg)


MODEL_BUILDERS["mixreorg"] = _build_mixreorg


def table6_builder(preset: str) -> Callable[[PretrainConfig], nn.Module]:
    """Builder of a Table 6 MixReorg row (:data:`mixreorg.presets.PRESETS`): the row's switches
    (contextual mixing, L_seg / L_rc weights) over ``cfg.model.mixreorg`` (which keeps e.g. the group
    size); every other part -- backbone, objective, pooling -- is the recipe's."""
    from mixreorg.presets import PRESETS as TABLE6_PRESETS

    p = TABLE6_PRESETS[preset]
    if p.kind != "mixreorg":
        raise ValueError(f"{preset!r} is not a MixReorg row")

    def build(cfg: PretrainConfig) -> nn.Module:
        cfg = copy.deepcopy(cfg)
        cfg.model.mixreorg = {
            **dict(cfg.model.mixreorg),
            **p.mixreorg,
            "seg_weight": p.seg_weight,
            "restored_weight": p.restored_weight,
        }
        return _build_mixreorg(cfg)

    return build


def _register_table6() -> None:
    from mixreorg.presets import PRESETS as TABLE6_PRESETS

    for name, p in TABLE6_PRESETS.items():
        if p.kind == "mixreorg" and name != "mixreorg":
            MODEL_BUILDERS[name] = table6_builder(name)


_register_table6()


def is_mixreorg_model(name: str) -> bool:
    """Whether ``name`` builds a MixReorg trainer (``mixreorg`` or a Table 6 MixReorg row)."""
    from mixreorg.presets import PRESETS as TABLE6_PRESETS

    return name == "mixreorg" or (name in TABLE6_PRESETS and TABLE6_PRESETS[name].kind == "mixreorg")


# The supervised upper bound (mixreorg/recipes/supervised.py): the same backbone trained with masks.
def _build_supervised(cfg: PretrainConfig) -> nn.Module:
    from .supervised import build_supervised_trainer

    return build_supervised_trainer(cfg)


MODEL_BUILDERS["supervised"] = _build_supervised


def register_model(name: str, builder: Callable[[PretrainConfig], nn.Module]) -> None:
    """Add (or replace) a trainer-model builder under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    MODEL_BUILDERS[name] = builder


def build_model(cfg: PretrainConfig | str) -> nn.Module:
    """The trainer model for ``cfg.model.name`` (or a preset name, built with that preset's config)."""
    if isinstance(cfg, str):
        from .config import PRESETS, get_preset

        if cfg in PRESETS:
            cfg = get_preset(cfg)
        else:
            name = cfg
            cfg = get_preset("tiny")
            cfg.model.name = name
    name = cfg.model.name
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_BUILDERS))}")
    return MODEL_BUILDERS[name](cfg)


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
