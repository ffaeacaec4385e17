"""MixReorg's losses: the mixed segmentation loss and the total objective.

``L = w_seg * L_seg(mixed) + w_orig * L_contrast(original) + w_rest * L_contrast(restored)``,
each contrast being image-text InfoNCE + the multi-label prompt loss (paper: every weight 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.plan import MixPlan
from .contrastive import MAX_LOGIT_SCALE, logit_scale_value
from .grounded import grounded_mixed_loss
from .objective import ContrastiveObjective

__all__ = ["MixedSegmentationLoss", "MixReorgLoss", "canonical_caption_index"]


def canonical_caption_index(keys: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` keys (e.g. caption ids) -> ``[B]`` in-group index of the FIRST caption of the group
    equal to each one. Captions that repeat inside a group are one class for the segmentation loss
    (their text embeddings are identical, so no model could tell their patches apart)."""
    B = keys.shape[0]
    k = keys.view(B // group_size, group_size)  # [nG, G]
    same = k[:, :, None] == k[:, None, :]  # [nG, G, G]: same[g, i, j] = key_i == key_j
    first = same.to(torch.int8).argmax(dim=2)  # first j equal to i
    return first.reshape(B)


class MixedSegmentationLoss(nn.Module):
    """Cross-entropy of every mixed patch against the caption of its source image.

    For mixed image ``m`` of group ``g`` with composed assignment ``A_m [S, L]`` (patch -> final
    segment; straight-through hard in training), normalised segment embeddings ``seg_m [S, D]``
    and the group's normalised caption embeddings ``T_g [G, D]``::

        logits[m, p, j] = scale * sum_k A_m[k, p] * <seg_m[k], T_g[j]>        target = label[m, p]

    ``caption_keys [B]`` (optional) merges identical captions inside a group into one class (the
    duplicate columns are masked and targets point at the first copy).

    ``assign=None``: every token is its own segment (``seg_embed [B, L, D]``, e.g. the mixed branch's
    patch tokens through the image head: the loss at the patch level, before any grouping).
    """

    def forward(self, assign: torch.Tensor | None, seg_embed: torch.Tensor, text_embed: torch.Tensor,
                plan: MixPlan, scale: torch.Tensor | float, caption_keys: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict:
        if assign is None:  # identity maps, without materialising the [B, L, L] eye
            B, L = seg_embed.shape[:2]
            S = L
        else:
            B, S, L = assign.shape
        G = plan.group_size
        labels = plan.labels if labels is None else labels  # [B, L]: fine-grid labels of a fine-grouping model
        if seg_embed.shape[:2] != (B, S) or text_embed.shape[0] != B or labels.shape != (B, L):
            raise ValueError(
                f"MixedSegmentationLoss: shapes do not agree: assign {tuple(assign.shape)}, seg_embed "
                f"{tuple(seg_embed.shape)}, text_embed {tuple(text_embed.shape)}, "
                f"labels {tuple(labels.shape)}"
            )
        nG, D = B // G, text_embed.shape[-1]
        text = text_embed.view(nG, G, D)
        sim = torch.einsum("ngsd,njd->ngsj", seg_embed.view(nG, G, S, D), text.to(seg_embed.dtype))  # [nG, G, S, G]
        if assign is None:
            logits = sim  # [nG, G, L, G]
        else:
            logits = torch.einsum("ngsl,ngsj->nglj", assign.view(nG, G, S, L).to(sim.dtype), sim)  # [nG, G, L, G]
        logits = logits * scale
        target = labels.view(nG, G, L)
        if caption_keys is not None:
            first = canonical_caption_index(caption_keys.to(labels.device), G).view(nG, G)
            dup = first != torch.arange(G, device=first.device)  # [nG, G] column is a repeat
            logits = logits.masked_fill(dup[:, None, None, :], float("-inf"))
            target = torch.gather(first, 1, target.reshape(nG, G * L)).view(nG, G, L)
        flat = logits.reshape(-1, G).float()
        loss = F.cross_entropy(flat, target.reshape(-1))
        with torch.no_grad():
            acc = (flat.argmax(-1) == target.reshape(-1)).float().mean()
        return {"loss": loss, "acc": acc, "logits": logits.view(B, L, G)}


class MixReorgLoss(nn.Module):
    """The total MixReorg loss over the dict returned by ``MixReorg.forward``.

    Args:
        contrastive: the image-text objective applied to the original and restored branches
            (default: :class:`ContrastiveObjective` with GroupViT's defaults); the same module serves
            every compared model.
        seg_weight, original_weight, restored_weight: loss weights (paper: 1, 1, 1); a weight
            of 0 switches that term off (the ablations of Table 6).
        merge_duplicate_captions: treat identical captions inside a group as one class in L_seg.
        patch_seg_weight: weight of L_seg at the PATCH level [R]: every mixed patch token (stage 1's
            output, through the final norm and the image head: ``out["mixed_patch_embed"]``, which
            ``MixReorg.forward(..., patch_embed=True)`` returns) classified against its group's
            captions, before any grouping (deep supervision; 0: off, the paper).
        mixed_grounded_weight: weight of :func:`mixreorg.losses.grounded.grounded_mixed_loss` [R]: every
            mixed position named by the caption-grounded label of the original patch it came from
            (the mixed image's per-patch NOUNS, where L_seg uses its per-patch captions). Needs a
            contrastive objective with a per-patch term (the original branch's ``patch_embed``) and
            ``grounded_seg_scope`` ``batch`` or ``noun``; 0: off. On the ``tiny_grounded_mixreorg``
            preset (320 steps, G = 8) it lifts the zero-shot mIoU from 0.151 / 0.139 to 0.240 /
            0.163 (seeds 0 / 1; docs/investigation/LOG.md, session 12).
    """

    def __init__(self, contrastive: nn.Module | Callable | None = None, seg_weight: float = 1.0,
                 original_weight: float = 1.0, restored_weight: float = 1.0,
                 merge_duplicate_captions: bool = True, patch_seg_weight: float = 0.0,
                 mixed_grounded_weight: float = 0.0) -> None:
        super().__init__()
        if not patch_seg_weight >= 0:
            raise ValueError(f"patch_seg_weight must be >= 0, got {patch_seg_weight!r}")
        if not mixed_grounded_weight >= 0:
            raise ValueError(f"mixed_grounded_weight must be >= 0, got {mixed_grounded_weight!r}")
        self.contrastive = contrastive if contrastive is not None else ContrastiveObjective()
        self.seg = MixedSegmentationLoss()
        self.seg_weight, self.original_weight, self.restored_weight = seg_weight, original_weight, restored_weight
        self.patch_seg_weight = float(patch_seg_weight)
        self.mixed_grounded_weight = float(mixed_grounded_weight)
        if self.mixed_grounded_weight > 0 and getattr(self.contrastive, "grounded_seg_scope", "image") == "image":
            raise ValueError("mixed_grounded_weight > 0 needs a contrastive objective with grounded_seg_scope "
                             "'batch' or 'noun' (a mixed image has no prompts of its own)")
        self._reads_segments = bool(getattr(self.contrastive, "reads_segments", False))
        self._grounded = getattr(self.contrastive, "grounded_seg_weight", 0.0) > 0
        self.reads_patches = bool(getattr(self.contrastive, "reads_patches", False)) or self.mixed_grounded_weight > 0
        self.merge_duplicate_captions = merge_duplicate_captions

    def forward(self, out: dict, caption_keys: torch.Tensor | None = None, **contrastive_kwargs) -> dict:
        kw = dict(prompt_embed=out.get("prompt_embed"), logit_scale=out["logit_scale"],
                  multi_label_scale=out.get("multi_label_logit_scale"), **contrastive_kwargs)
        logs: dict = {}
        total = out["text_embed"].new_zeros(())
        for name, w in (("original", self.original_weight), ("restored", self.restored_weight)):
            if not w:
                continue
            # an objective that scores prompts by the best segment reads this branch's segments
            seg = {"seg_embed": out[name]["seg_embed"]} if self._reads_segments else {}
            if self._grounded:  # the caption-grounded term reads this branch's hard map
                seg["assign"] = out[name]["assign"]
            if self.reads_patches:  # a per-patch prompt term reads this branch's own patches
                if out[name].get("patch_embed") is None:
                    raise ValueError(f"the objective's patch_label_weight / patch_mean_weight needs "
                                     f"out[{name!r}]['patch_embed']: call MixReorg.forward(..., "
                                     "branch_patches='stage1'|'embed')")
                seg["patch_embed"] = out[name]["patch_embed"]
            c = self.contrastive(out[name]["image_embed"], out["text_embed"], **seg, **kw)
            total = total + w * c["loss"]
            logs.update({f"{name}/{k}": v for k, v in c.items()})
        max_scale = getattr(self.contrastive, "max_logit_scale", MAX_LOGIT_SCALE)
        scale = logit_scale_value(out["logit_scale"], max_scale, out["text_embed"])
        seg = self.seg(out["mixed_assign"], out["mixed"]["seg_embed"], out["text_embed"], out["plan"], scale,
                       caption_keys if self.merge_duplicate_captions else None, labels=out.get("mixed_labels"))
        if self.seg_weight:
            total = total + self.seg_weight * seg["loss"]
        logs["seg/loss"] = seg["loss"]
        logs["seg/acc"] = seg["acc"]  # mixed-patch accuracy (chance: 1/G)
        if self.patch_seg_weight:
            patches = out.get("mixed_patch_embed")
            if patches is None:
                raise ValueError("patch_seg_weight > 0 needs out['mixed_patch_embed']: call MixReorg.forward(..., "
                                 "patch_embed=True)")
            ps = self.seg(None, patches, out["text_embed"], out["plan"], scale,
                          caption_keys if self.merge_duplicate_captions else None)
            total = total + self.patch_seg_weight * ps["loss"]
            logs["patch_seg/loss"] = ps["loss"]
            logs["patch_seg/acc"] = ps["acc"]
        if self.mixed_grounded_weight:
            total = total + self.mixed_grounded_weight * self._mixed_grounded(out, logs, contrastive_kwargs)
        logs["loss"] = total
        return logs

    def _mixed_grounded(self, out: dict, logs: dict, kw: dict) -> torch.Tensor:
        patches = out["original"].get("patch_embed")
        mask = kw.get("prompt_mask")
        if patches is None or out.get("prompt_embed") is None or mask is None:
            raise ValueError("mixed_grounded_weight > 0 needs out['original']['patch_embed'], out['prompt_embed'] "
                             "and the batch's prompt_mask")
        ids = self.contrastive.grounded_prompt_ids(kw.get("prompt_keys"), kw.get("prompt_heads"), mask)
        ml_scale = out.get("multi_label_logit_scale")
        ml_scale = out["logit_scale"] if ml_scale is None else ml_scale
        ml = logit_scale_value(ml_scale, getattr(self.contrastive, "max_logit_scale", MAX_LOGIT_SCALE),
                               out["text_embed"])
        term = grounded_mixed_loss(patches, out["mixed"]["seg_embed"], out["mixed"]["assign"], out["plan"].src,
                                   out["prompt_embed"], mask, ml, scope=self.contrastive.grounded_seg_scope,
                                   prompt_ids=ids, vocab_mask=self.contrastive.grounded_vocab_mask(
                                       kw.get("prompt_keys"), kw.get("prompt_heads"), mask),
                                   **self.contrastive.grounded_label_kwargs)
        logs["mixed/grounded"] = term
        return term
