"""Trainer models: what :mod:`mixreorg.recipes.pretrain` trains, built by name from the config.

The loop (:mod:`mixreorg.recipes.train`) only knows the trainer-model interface::

    model.training_losses(batch) -> dict(loss=scalar tensor, **floats or tensors to log)
    model.inference_model()      -> a GroupViT-interface module for zero-shot evaluation
                                    (encode_image(images, return_maps), encode_text, logit_scale)

``batch`` = ``dict(images [B, 3, H, W], text [B, T] ids, prompts [B, K, T] ids (optional),
text_keys [B], prompt_keys [B, K], label_keys [B, M] int64 ids (optional; the BatchBuilder builds them
as tensors, -1 pads label_keys; lists of hashables are accepted too), caption_keys [B] (optional))``.

Registry (:data:`MODEL_BUILDERS`, extend with :func:`register_model`):

* ``groupvit``: :class:`GroupViTPretrainer` -- GroupViT + :class:`ContrastiveObjective`.
* ``groupvit_plus``: GroupViT with one more stage-1 block ("GroupViT+", MixReorg's inference size;
  the paper's parameter-matched baseline, Table 6).
* ``mixreorg``: :class:`mixreorg.recipes.mixreorg_trainer.MixReorgPretrainer` (three branches,
  L_seg + the shared objective on the original and restored branches).
* ``mixreorg_cm``, ``mixreorg_no_cm``, ``mixreorg_cm_seg``, ``mixreorg_cm_rc``: the Table 6 ablation
  rows of :data:`mixreorg.nn.presets.TABLE6_ROWS` (their switches over ``cfg.model.mixreorg``).
* ``supervised``: :class:`mixreorg.nn.supervised.SupervisedSegmenter` -- the same backbone
  trained with SynthShapes' masks (the comparison table's upper bound).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixreorg.data.synthshapes import SynthShapes
from mixreorg.losses import ContrastiveObjective, keys_to_ids
from mixreorg.nn.ema import ModelEma
from mixreorg.nn.groupvit import GroupViT, compose_assignments
from mixreorg.nn.presets import TABLE6_ROWS
from mixreorg.nn.supervised import SupervisedSegmenter

from .builders import build_groupvit, build_objective, no_weight_decay_names
from .config import PATCH_LABEL_TOKENS, PRESETS, PretrainConfig, get_preset
from .mixreorg_trainer import build_mixreorg_trainer

__all__ = [
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


class GroupViTPretrainer(nn.Module):
    """GroupViT trained with the shared :class:`ContrastiveObjective` (the trainer-model interface).

    ``training_losses(batch)`` encodes the images, captions and (when the objective uses them) the
    noun prompts, and returns the objective's dict: ``loss`` (scalar tensor) plus ``itc``, ``ml``,
    in-batch retrieval accuracies and the current scale / bias. The image vector is pooled as the
    backbone's ``image_pool`` says. ``patch_tokens``: the patch tokens an objective with
    ``patch_label_weight > 0`` scores: ``"stage1"`` (after the first stage's blocks, what the grouping
    assigns) or ``"embed"`` (the embedded patches before any block: features that cannot attend to
    the rest of the image, only their trunk's receptive field).
    """

    def __init__(self, groupvit: GroupViT, objective: ContrastiveObjective, patch_tokens: str = "stage1",
                 teacher_start: int = 0, teacher_momentum: float = 0.999) -> None:
        super().__init__()
        if patch_tokens not in PATCH_LABEL_TOKENS:
            raise ValueError(f"patch_tokens must be one of {PATCH_LABEL_TOKENS}, got {patch_tokens!r}")
        if teacher_start < 0:
            raise ValueError(f"teacher_start must be >= 0, got {teacher_start!r}")
        self.groupvit = groupvit
        self.objective = objective
        self.patch_tokens = patch_tokens
        # the grounded terms' EMA teacher (objective.grounded_teacher="ema"), copied at teacher_start
        self.teacher = (ModelEma(groupvit, teacher_momentum) if getattr(objective, "grounded_teacher", "self") == "ema"
                        else None)
        self.teacher_start = int(teacher_start)
        if self.teacher is not None:  # training calls so far, saved with the teacher (exact resume)
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def inference_model(self) -> nn.Module:
        """The model zero-shot evaluation uses (the backbone itself)."""
        return self.groupvit

    def no_weight_decay(self) -> set[str]:
        return {f"groupvit.vision.{n}" for n in self.groupvit.vision.no_weight_decay()}

    @property
    def needs_masks(self) -> bool:
        """The oracle teacher (``objective.grounded_teacher=oracle``, a diagnostic) reads the masks."""
        return getattr(self.objective, "grounded_teacher", "self") == "oracle"

    @staticmethod
    @torch.no_grad()
    def oracle_labels(batch: dict[str, Any], side: int) -> torch.Tensor:
        """``[B, side*side, K]``: each patch's majority class in ``batch["masks"]`` as the image's noun
        prompts that name it (``prompt_heads``), shared equally; zero where the caption names none."""
        masks, heads, mask = batch.get("masks"), batch.get("prompt_heads"), batch.get("prompt_mask")
        if masks is None or heads is None or mask is None:
            raise ValueError("the oracle teacher needs the batch's masks, prompt_heads and prompt_mask")
        names = list(SynthShapes.CLASS_NAMES)
        onehot = F.one_hot(masks.long(), len(names)).permute(0, 3, 1, 2).float()  # [B, C, H, W]
        major = F.adaptive_avg_pool2d(onehot, side).flatten(2).argmax(1)  # [B, L] the class covering most
        class_ids = keys_to_ids(names).to(heads.device)  # the same hashing as the prompts' head nouns
        match = (heads[:, None, :] == class_ids[major][:, :, None]) & mask[:, None, :]  # [B, L, K]
        return match.float() / match.sum(-1, keepdim=True).clamp_min(1)

    @torch.no_grad()
    def _teacher_embeddings(self, images: torch.Tensor, prompts: torch.Tensor) -> tuple | None:
        """This step's EMA teacher: ``(patch_embed [B, L, D], prompt_embed [B, K, D])``, or None
        before ``teacher_start``. Steps the average first (towards the weights the last update made)."""
        if self.teacher is None or not self.training:
            return None
        step = int(self.steps)
        self.steps += 1
        if step < self.teacher_start:
            return None
        if step == self.teacher_start:
            self.teacher.copy_from(self.groupvit)
        else:
            self.teacher.update(self.groupvit)
        t = self.teacher.module
        x, _, x0, _ = t.vision.forward_stage1_blocks(images)
        tokens = x if self.patch_tokens == "stage1" else x0
        return t.project_patches(tokens), t.encode_text(prompts)

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        gv = self.groupvit
        images, text = batch["images"], batch["text"]
        needs_seg = bool(getattr(self.objective, "reads_segments", False))
        vis = gv.encode_image(images, return_maps=needs_seg)
        prompts = batch.get("prompts")
        patch_labels = bool(getattr(self.objective, "reads_patches", False))  # a per-patch or mean-patch term
        use_prompts = (self.objective.multi_label_weight > 0 or patch_labels
                       or getattr(self.objective, "prompt_uniformity_weight", 0.0) > 0)
        if use_prompts and prompts is None:
            raise ValueError("the objective's multi-label loss needs batch['prompts'] [B, K, T]")
        # two passes: captions and prompts are trimmed to their own lengths (cheaper than padding
        # the short prompts to the captions' length); a BatchNorm head sees each set separately
        text_embed = gv.encode_text(text)  # [B, D]
        prompt_embed = gv.encode_text(prompts) if use_prompts else None  # [B, K, D]
        ml_scale = gv.multi_label_logit_scale if gv.multi_label_logit_scale is not None else gv.logit_scale
        teacher = self._teacher_embeddings(images, prompts) if use_prompts else None
        labels = None
        if self.needs_masks:
            side = round(vis[f"{self.patch_tokens}_tokens"].shape[1] ** 0.5)
            labels = self.oracle_labels(batch, side)
        return self.objective(
            vis["image_embed"],
            text_embed,
            logit_scale=gv.logit_scale,
            prompt_embed=prompt_embed,
            multi_label_scale=ml_scale,
            text_keys=batch.get("text_keys"),
            prompt_keys=batch.get("prompt_keys"),
            label_keys=batch.get("label_keys"),
            seg_embed=vis.get("seg_embed") if needs_seg else None,
            patch_embed=gv.project_patches(vis[f"{self.patch_tokens}_tokens"]) if patch_labels else None,  # [B, L, D]
            assign=compose_assignments(vis["hard_maps"]) if needs_seg else None,  # [B, S, N] straight-through
            prompt_mask=batch.get("prompt_mask"),
            prompt_heads=batch.get("prompt_heads"),
            teacher_patch_embed=None if teacher is None else teacher[0],
            teacher_prompt_embed=None if teacher is None else teacher[1],
            teacher_labels=labels,
        )

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Same as :meth:`training_losses` (so DDP wraps the module and hooks run)."""
        return self.training_losses(batch)


def _build_groupvit_trainer(cfg: PretrainConfig) -> nn.Module:
    o = cfg.objective
    return GroupViTPretrainer(build_groupvit(cfg), build_objective(cfg), o.patch_label_tokens,
                              teacher_start=o.grounded_teacher_start, teacher_momentum=o.grounded_teacher_momentum)


def _build_groupvit_plus_trainer(cfg: PretrainConfig) -> nn.Module:
    cfg = copy.deepcopy(cfg)
    depths = list(cfg.model.vision.get("depths", (6, 3, 3)))
    depths[0] += 1
    cfg.model.vision = dict(cfg.model.vision, depths=tuple(depths))
    return _build_groupvit_trainer(cfg)


def _build_supervised_trainer(cfg: PretrainConfig) -> nn.Module:
    """``--model supervised``: the recipe's backbone (``cfg.model``) with SynthShapes' classes."""
    if cfg.data.source != "synthshapes":
        raise ValueError(
            f"--model supervised needs masks: only data.source=synthshapes has them, got {cfg.data.source!r}"
        )
    if cfg.data.augment != "none":
        raise ValueError(
            f"--model supervised needs data.augment=none (the augmentation does not transform the masks), "
            f"got {cfg.data.augment!r}"
        )
    return SupervisedSegmenter(build_groupvit(cfg), SynthShapes.CLASS_NAMES, head=cfg.model.supervised_head,
                               maps=cfg.model.supervised_maps, aux_weight=cfg.model.supervised_aux,
                               aux_tokens=cfg.model.supervised_aux_tokens)


def table6_builder(row: str) -> Callable[[PretrainConfig], nn.Module]:
    """Builder of a Table 6 MixReorg row (:data:`mixreorg.nn.presets.TABLE6_ROWS`): the row's switches
    (contextual mixing, L_seg / L_rc weights) over ``cfg.model.mixreorg`` (which keeps e.g. the group
    size); every other part -- backbone, objective, pooling -- is the recipe's."""
    p = TABLE6_ROWS[row]
    if p.kind != "mixreorg":
        raise ValueError(f"{row!r} is not a MixReorg row")

    def build(cfg: PretrainConfig) -> nn.Module:
        cfg = copy.deepcopy(cfg)
        cfg.model.mixreorg = {
            **dict(cfg.model.mixreorg),
            **p.mixreorg,
            "seg_weight": p.seg_weight,
            "restored_weight": p.restored_weight,
        }
        return build_mixreorg_trainer(cfg)

    return build


MODEL_BUILDERS: dict[str, Callable[[PretrainConfig], nn.Module]] = {
    "groupvit": _build_groupvit_trainer,
    "groupvit_plus": _build_groupvit_plus_trainer,
    "mixreorg": build_mixreorg_trainer,
    **{name: table6_builder(name) for name, p in TABLE6_ROWS.items() if p.kind == "mixreorg" and name != "mixreorg"},
    "supervised": _build_supervised_trainer,
}


def is_mixreorg_model(name: str) -> bool:
    """Whether ``name`` builds a MixReorg trainer (``mixreorg`` or a Table 6 MixReorg row)."""
    return name == "mixreorg" or (name in TABLE6_ROWS and TABLE6_ROWS[name].kind == "mixreorg")


def register_model(name: str, builder: Callable[[PretrainConfig], nn.Module]) -> None:
    """Add (or replace) a trainer-model builder under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    MODEL_BUILDERS[name] = builder


def build_model(cfg: PretrainConfig | str) -> nn.Module:
    """The trainer model for ``cfg.model.name`` (or a preset name, built with that preset's config)."""
    if isinstance(cfg, str):
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
