"""The supervised upper bound: a GroupViT image encoder trained with the ground-truth masks.

:class:`SupervisedSegmenter` (``python -m mixreorg.recipes.pretrain --model supervised`` on
SynthShapes, whose stream carries the masks) trains the GroupViT image encoder, its projection head
and a learnable embedding per class ``[K, D]`` with a per-pixel cross-entropy, through the same path
zero-shot inference uses:

    logits[b, k, p] = scale * sum_s soft[b, s, p] * <seg_embed[b, s], class_embed[k]>

(composed soft assignment maps, bilinearly resized to the mask). Everything else -- data, steps,
optimiser, schedule, evaluation -- is the recipe's, so the row it gives in the comparison table is
what the backbone reaches when told the answer at every pixel. Evaluation reads the class
embeddings instead of text prompts (:meth:`SupervisedInference.classifier_embeddings`) and uses no
image-level top-k restriction (nothing trains the image vector here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.utils import first_argmax
from .groupvit import GroupViT

__all__ = ["SupervisedSegmenter", "SupervisedInference", "SUPERVISED_HEADS", "SUPERVISED_MAPS", "SUPERVISED_AUX_TOKENS"]

SUPERVISED_HEADS = ("groups", "patches")
SUPERVISED_MAPS = ("soft", "hard")
SUPERVISED_AUX_TOKENS = ("stage1", "fine", "both")


class SupervisedInference(nn.Module):
    """GroupViT inference interface over the supervised model, closed-vocabulary.

    ``classifier_embeddings(names)`` returns the learned class embeddings ``[K, D]`` for known class
    names (ValueError naming the unknown ones); ``closed_vocabulary = True`` tells
    :func:`mixreorg.recipes.evaluate.evaluate_segmentation` to use them and no top-k.
    """

    closed_vocabulary = True

    def __init__(self, owner: SupervisedSegmenter) -> None:
        super().__init__()
        self.owner = owner

    @property
    def vision(self) -> nn.Module:
        return self.owner.groupvit.vision

    @property
    def text(self) -> nn.Module:
        return self.owner.groupvit.text

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.owner.groupvit.logit_scale

    def scale(self) -> torch.Tensor:
        return self.owner.scale()

    def encode_image(self, images: torch.Tensor, return_maps: bool = False) -> dict:
        return self.owner.encode_image(images, return_maps=return_maps)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        raise ValueError("the supervised upper bound has no text encoder: use classifier_embeddings(names)")

    def classifier_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        return self.owner.class_embeddings(class_names)


class SupervisedSegmenter(nn.Module):
    """The recipe's image encoder + a learned class embedding, trained with per-pixel labels.

    Args:
        groupvit: the backbone (its text tower is frozen and unused; kept so that checkpoints and
            the vision weights have exactly the layout of the contrastive models).
        class_names: the K classes (the order of the mask values).
        ignore_index: mask value that is not scored.
        maps: ``"soft"`` or ``"hard"`` (training only): which assignment maps the per-pixel logits read.
        head: ``"groups"`` (default: through the grouping, as zero-shot inference reads the model) or
            ``"patches"`` (every patch token after the first stage's blocks, before any grouping, is its
            own segment: a plain ViT trained with masks, to tell what the grouping bottleneck costs).
        aux_weight: weight of an auxiliary per-patch cross-entropy (deep supervision of the tokens the
            grouping assigns), through the same final norm, image head and class embeddings (0: none).
        aux_tokens: which tokens it reads: ``"stage1"`` (the first stage's patch tokens after its
            blocks, on the transformer's grid), ``"fine"`` (with ``group_patch_size``: the finer-grid
            tokens the first grouping block actually assigns, so the loss resolves outlines as finely
            as the maps do) or ``"both"`` (one loss on each, both at ``aux_weight``).
    """

    #: the training loop adds ``batch["masks"]`` only for models that declare this
    needs_masks = True

    def __init__(
        self, groupvit: GroupViT, class_names: Sequence[str], ignore_index: int = 255, head: str = "groups",
        maps: str = "soft", aux_weight: float = 0.0, aux_tokens: str = "stage1",
    ) -> None:
        super().__init__()
        if len(set(class_names)) != len(class_names) or not class_names:
            raise ValueError(f"class_names must be distinct and non-empty, got {list(class_names)}")
        if head not in SUPERVISED_HEADS:
            raise ValueError(f"head must be one of {SUPERVISED_HEADS}, got {head!r}")
        if maps not in SUPERVISED_MAPS:
            raise ValueError(f"maps must be one of {SUPERVISED_MAPS}, got {maps!r}")
        if aux_weight < 0 or (aux_weight > 0 and head != "groups"):
            raise ValueError(f"aux_weight must be >= 0 and needs head='groups', got {aux_weight} with head={head!r}")
        if aux_tokens not in SUPERVISED_AUX_TOKENS:
            raise ValueError(f"aux_tokens must be one of {SUPERVISED_AUX_TOKENS}, got {aux_tokens!r}")
        if aux_tokens in ("fine", "both") and getattr(groupvit.vision, "fine_tokens", None) is None:
            raise ValueError(
                f"aux_tokens={aux_tokens!r} needs an encoder that groups a finer grid (model.vision.group_patch_size)"
            )
        self.aux_weight = float(aux_weight)
        self.aux_tokens = aux_tokens
        self.head = head
        self.maps = maps
        self.groupvit = groupvit
        # the text side and the multi-label temperature are not used (kept for the checkpoint layout);
        # GroupViT's logit_scale is the temperature of the per-pixel logits
        self.groupvit.text.requires_grad_(False)
        self.groupvit.text_proj.requires_grad_(False)
        if self.groupvit.multi_label_logit_scale is not None:
            self.groupvit.multi_label_logit_scale.requires_grad_(False)
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.class_embed = nn.Parameter(torch.randn(len(class_names), groupvit.proj_dim) * 0.02)  # [K, D]
        if head == "patches":
            self.patch_proj = nn.Linear(groupvit.vision.width, groupvit.proj_dim)
            # only what the patch path uses is trained (DDP needs every trainable parameter used)
            enc = groupvit.vision
            groupvit.requires_grad_(False)
            for m in (enc.patch_embed, enc.stages[0].blocks, enc.norm):
                m.requires_grad_(True)
            enc.pos_embed.requires_grad_(True)
            groupvit.logit_scale.requires_grad_(True)
            if enc.stages[0].group_token is not None:
                enc.stages[0].group_token.requires_grad_(True)

    def encode_image(self, images: torch.Tensor, return_maps: bool = False) -> dict:
        """The GroupViT ``encode_image`` dict; with ``head="patches"`` every patch is a segment
        (``seg_embed [B, L, D]``, identity maps)."""
        gv = self.groupvit
        if self.head == "groups":
            return gv.encode_image(images, return_maps=return_maps)
        enc = gv.vision
        grid = enc.patch_embed.grid_for(images)
        x = enc.embed(images)  # [B, L, C]
        x, _ = enc.stages[0].forward_blocks(x, enc.stages[0].init_group_tokens(x.shape[0]))
        seg = F.normalize(self.patch_proj(enc.norm(x)), dim=-1)  # [B, L, D]
        b, n, _ = seg.shape
        eye = torch.eye(n, device=seg.device, dtype=seg.dtype).expand(b, n, n)  # [B, S=L, L]
        return {"seg_embed": seg, "image_embed": F.normalize(seg.mean(1), dim=-1), "soft_maps": [eye],
                "hard_maps": [eye], "grid": grid}

    def scale(self) -> torch.Tensor:
        return self.groupvit.scale()

    def class_embeddings(self, class_names: Sequence[str] | None = None) -> torch.Tensor:
        """Normalised class embeddings ``[K, D]`` in the order of ``class_names`` (default: all)."""
        names = self.class_names if class_names is None else list(class_names)
        unknown = [n for n in names if n not in self.class_names]
        if unknown:
            raise ValueError(f"the supervised model knows only {self.class_names}; unknown classes: {unknown}")
        idx = torch.tensor([self.class_names.index(n) for n in names], device=self.class_embed.device)
        return F.normalize(self.class_embed[idx], dim=-1)

    def inference_model(self) -> nn.Module:
        return SupervisedInference(self)

    def no_weight_decay(self) -> set[str]:
        return {f"groupvit.vision.{n}" for n in self.groupvit.vision.no_weight_decay()} | {"class_embed"}

    def _encode_with_patches(self, images: torch.Tensor) -> tuple[dict, list[tuple[torch.Tensor, tuple[int, int]]]]:
        """:meth:`GroupViT.encode_image` (with maps) and the tokens the auxiliary per-patch losses read,
        each with its grid (``aux_tokens``: ``[B, L, C]`` stage-1 patches, ``[B, L*f*f, C]`` fine tokens,
        or both)."""
        out = self.groupvit.encode_image(images, return_maps=True)
        reads = []
        if self.aux_tokens in ("stage1", "both"):
            reads.append((out["stage1_tokens"], self.groupvit.vision.patch_embed.grid_for(images)))
        if self.aux_tokens in ("fine", "both"):
            reads.append((out["fine_tokens"], tuple(out["grid"])))
        return out, reads

    def patch_logits(self, patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """Stage-1 patch tokens ``[B, L, C]`` -> per-pixel logits ``[B, K, H, W]`` through the image head."""
        gv = self.groupvit
        emb = gv.project_patches(patches)  # [B, L, D]
        logits = gv.scale() * emb @ self.class_embeddings().t()  # [B, L, K]
        b, _, k = logits.shape
        logits = logits.transpose(1, 2).reshape(b, k, *grid)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def pixel_logits(self, images: torch.Tensor, with_aux: bool = False):
        """``images [B, 3, H, W] -> logits [B, K, H, W]`` through the composed soft maps (and, with
        ``with_aux``, the list of auxiliary per-patch logits, each ``[B, K, H, W]``)."""
        size = tuple(images.shape[-2:])
        if with_aux:
            out, reads = self._encode_with_patches(images)
        else:
            out = self.encode_image(images, return_maps=True)
        if self.maps == "hard" and self.training:
            out = {**out, "soft_maps": out["hard_maps"]}  # straight-through one-hot: the argmax group's logits
        logits = self.groupvit.segmentation_logits_from(out, self.class_embeddings(), size)
        if not with_aux:
            return logits
        return logits, [self.patch_logits(patches, grid, size) for patches, grid in reads]

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        masks = batch.get("masks")
        if masks is None:
            raise ValueError(
                "the supervised upper bound needs per-pixel labels: batch['masks'] (the SynthShapes stream has them)"
            )
        masks = masks.to(batch["images"].device).long()
        aux = None
        if self.aux_weight > 0:
            logits, aux_logits = self.pixel_logits(batch["images"], with_aux=True)  # [B, K, H, W], list of them
            aux = sum(F.cross_entropy(a.float(), masks, ignore_index=self.ignore_index) for a in aux_logits)
        else:
            logits = self.pixel_logits(batch["images"])  # [B, K, H, W]
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)
        seg_loss = loss
        if aux is not None:
            loss = loss + self.aux_weight * aux
        with torch.no_grad():
            valid = masks != self.ignore_index
            acc = (first_argmax(logits, 1) == masks)[valid].float().mean()
        out = {"loss": loss, "pixel_acc": float(acc), "scale": float(self.scale().detach())}
        if aux is not None:
            out.update(seg_loss=seg_loss.detach(), aux_loss=aux.detach())  # the loop reads them once per log record
        return out

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.training_losses(batch)
