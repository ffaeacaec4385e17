"""Contrastive losses of GroupViT: image-text InfoNCE and the multi-label prompt loss.

Conventions shared by both losses:

* Embeddings are expected L2-normalised (``GroupViT.encode_image`` / ``encode_text`` return them so);
  ``normalize=True`` normalises them here instead. Nothing is asserted (that would cost a sync).
* Logits are computed in (at least) float32, whatever the embeddings' dtype.
* ``logit_scale`` is given in LOG space (the model's learnable parameter, initialised at
  ``log(1/0.07)``); the loss uses ``logit_scale.exp().clamp(max=max_logit_scale)`` (100), as GroupViT.
* Under ``torch.distributed`` (world > 1) features are gathered from all ranks with gradient
  (:func:`mixreorg.distributed.all_gather_with_grad`) and this rank's targets are offset by
  ``rank * B``. Each rank returns the mean over ITS rows; with equal local batches the mean over
  ranks is the single-process loss on the global batch, and DDP's gradient averaging yields the
  single-process parameter gradients (see :mod:`mixreorg.distributed` for the derivation).
* Optional multi-positive targets: integer ids (``labels`` / ``prompt_labels``); texts that share an id
  are all positives of each other's images and the target spreads uniformly over them. Use
  :func:`text_ids` to hash strings to ids that agree across processes. Default off (one-hot).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixreorg.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    check_same_batch_size,
    get_rank,
    is_distributed,
)

__all__ = [
    "ImageTextContrastiveLoss",
    "MultiLabelContrastiveLoss",
    "soft_cross_entropy",
    "text_ids",
]


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_j t_ij log softmax(logits)_ij`` with ``t`` = positives row-normalised.

    ``positives`` is a bool/0-1 mask (or non-negative weights) of the logits' shape; every row needs
    at least one positive.
    """
    target = positives.to(logits.dtype)
    target = target / target.sum(dim=-1, keepdim=True)
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def text_ids(texts: Sequence[str]) -> torch.Tensor:
    """Stable 63-bit ids of strings -> ``LongTensor [N]``; equal strings get equal ids on every rank.

    (Python's ``hash`` is salted per process, so it cannot be used across ranks.)
    """
    ids = []
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"text_ids expects strings, got {type(t).__name__}")
        digest = hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest()
        ids.append(int.from_bytes(digest, "little") >> 1)
    return torch.tensor(ids, dtype=torch.long)


def _scale(logit_scale: torch.Tensor | float, max_logit_scale: float, like: torch.Tensor) -> torch.Tensor:
    # the logits are computed in at least float32 (bf16/fp16 embeddings are upcast)
    dtype = torch.promote_types(like.dtype, torch.float32)
    if isinstance(logit_scale, torch.Tensor):
        s = logit_scale.to(device=like.device, dtype=dtype)
    else:
        s = torch.tensor(float(logit_scale), device=like.device, dtype=dtype)
    if s.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar (log space), got shape {tuple(s.shape)}")
    return s.reshape(()).exp().clamp(max=max_logit_scale)


class ImageTextContrastiveLoss(nn.Module):
    """CLIP InfoNCE in both directions, averaged: ``0.5 * (CE(img->txt) + CE(txt->img))``.

    Args:
        max_logit_scale: clamp of ``exp(logit_scale)`` (GroupViT: 100).
        normalize: L2-normalise the embeddings here (default False: the model already did).
        gather: gather features across ranks when distributed (default True).
        check_batch_sizes: when distributed, verify equal local batches first (one scalar collective).

    Forward:
        image_embed ``[B, D]``, text_embed ``[B, D]``, logit_scale (log space, scalar tensor or
        float), labels ``[B]`` int (optional multi-positive ids, e.g. :func:`text_ids` of the
        captions) -> scalar loss.
    """

    def __init__(
        self,
        max_logit_scale: float = 100.0,
        normalize: bool = False,
        gather: bool = True,
        check_batch_sizes: bool = True,
    ) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale
        self.normalize = normalize
        self.gather = gather
        self.check_batch_sizes = check_batch_sizes

    def forward(
        self,
        image_embed: torch.Tensor,
        text_embed: torch.Tensor,
        logit_scale: torch.Tensor | float,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_embed.ndim != 2 or image_embed.shape != text_embed.shape:
            raise ValueError(
                "image_embed and text_embed must both be [B, D] of the same shape, got "
                f"{tuple(image_embed.shape)} and {tuple(text_embed.shape)}"
            )
        batch = image_embed.shape[0]
        if batch == 0:
            raise ValueError("empty batch")
        if labels is not None and (labels.shape != (batch,) or labels.is_floating_point()):
            raise ValueError(
                f"labels must be an integer tensor of shape [{batch}], got {labels.dtype} {tuple(labels.shape)}"
            )
        if self.normalize:
            image_embed = F.normalize(image_embed, dim=-1)
            text_embed = F.normalize(text_embed, dim=-1)
        scale = _scale(logit_scale, self.max_logit_scale, image_embed)

        distributed = self.gather and is_distributed()
        if distributed:
            if self.check_batch_sizes:
                check_same_batch_size(batch, image_embed.device)
            all_image = all_gather_with_grad(image_embed)  # [W*B, D]
            all_text = all_gather_with_grad(text_embed)  # [W*B, D]
            offset = get_rank() * batch
        else:
            all_image, all_text, offset = image_embed, text_embed, 0

        dt = scale.dtype
        logits_per_image = scale * image_embed.to(dt) @ all_text.to(dt).t()  # [B, W*B]
        logits_per_text = scale * text_embed.to(dt) @ all_image.to(dt).t()  # [B, W*B]
        if labels is None:
            target = torch.arange(batch, device=image_embed.device) + offset
            loss_i = F.cross_entropy(logits_per_image, target)
            loss_t = F.cross_entropy(logits_per_text, target)
        else:
            labels = labels.to(image_embed.device)
            all_labels = all_gather_no_grad(labels) if distributed else labels  # [W*B]
            positives = labels[:, None] == all_labels[None, :]  # [B, W*B]
            loss_i = soft_cross_entropy(logits_per_image, positives)
            loss_t = soft_cross_entropy(logits_per_text, positives)
        return 0.5 * (loss_i + loss_t)


class MultiLabelContrastiveLoss(nn.Module):
    """GroupViT's multi-label contrastive loss between images and their K noun prompts.

    Image side: soft cross-entropy of each image over all (gathered) prompts, target ``1/K`` on its
    own K prompts. Prompt side: cross-entropy of each prompt over all (gathered) images, target its
    own image. Loss = mean of the two. The model owns a separate learnable scale for it.

    Args: as :class:`ImageTextContrastiveLoss`.

    Forward:
        image_embed ``[B, D]``, prompt_embed ``[B, K, D]``, logit_scale (log space),
        prompt_labels ``[B, K]`` int (optional): prompts with equal ids count as the same text, so
        image i's positives are all prompts whose id is among its own prompts' ids, and prompt
        (i, k)'s positives are all images having that id among their prompts.
    """

    def __init__(
        self,
        max_logit_scale: float = 100.0,
        normalize: bool = False,
        gather: bool = True,
        check_batch_sizes: bool = True,
    ) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale
        self.normalize = normalize
        self.gather = gather
        self.check_batch_sizes = check_batch_sizes

    def forward(
        self,
        image_embed: torch.Tensor,
        prompt_embed: torch.Tensor,
        logit_scale: torch.Tensor | float,
        prompt_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_embed.ndim != 2 or prompt_embed.ndim != 3:
            raise ValueError(
                "expected image_embed [B, D] and prompt_embed [B, K, D], got "
                f"{tuple(image_embed.shape)} and {tuple(prompt_embed.shape)}"
            )
        batch, dim = image_embed.shape
        if prompt_embed.shape[0] != batch or prompt_embed.shape[2] != dim or prompt_embed.shape[1] == 0:
            raise ValueError(f"prompt_embed must be [B={batch}, K>0, D={dim}], got {tuple(prompt_embed.shape)}")
        if batch == 0:
            raise ValueError("empty batch")
        k = prompt_embed.shape[1]
        if prompt_labels is not None and (prompt_labels.shape != (batch, k) or prompt_labels.is_floating_point()):
            raise ValueError(
                f"prompt_labels must be an integer tensor of shape [{batch}, {k}], got "
                f"{prompt_labels.dtype} {tuple(prompt_labels.shape)}"
            )
        if self.normalize:
            image_embed = F.normalize(image_embed, dim=-1)
            prompt_embed = F.normalize(prompt_embed, dim=-1)
        scale = _scale(logit_scale, self.max_logit_scale, image_embed)

        distributed = self.gather and is_distributed()
        if distributed:
            if self.check_batch_sizes:
                check_same_batch_size(batch, image_embed.device)
            all_image = all_gather_with_grad(image_embed)  # [W*B, D]
            all_prompt = all_gather_with_grad(prompt_embed)  # [W*B, K, D]
            offset = get_rank() * batch
        else:
            all_image, all_prompt, offset = image_embed, prompt_embed, 0
        total = all_image.shape[0]  # W*B

        dt = scale.dtype
        logits_img = scale * image_embed.to(dt) @ all_prompt.reshape(total * k, dim).to(dt).t()  # [B, W*B*K]
        logits_prm = scale * prompt_embed.reshape(batch * k, dim).to(dt) @ all_image.to(dt).t()  # [B*K, W*B]
        device = image_embed.device
        if prompt_labels is None:
            own = torch.arange(batch, device=device) + offset  # [B]
            pos_img = own[:, None] == torch.arange(total, device=device)[None, :]  # [B, W*B]
            pos_img = pos_img[:, :, None].expand(batch, total, k).reshape(batch, total * k)
            loss_img = soft_cross_entropy(logits_img, pos_img)
            loss_prm = F.cross_entropy(logits_prm, own.repeat_interleave(k))
        else:
            prompt_labels = prompt_labels.to(device)
            all_labels = all_gather_no_grad(prompt_labels) if distributed else prompt_labels  # [W*B, K]
            # equal[i, a, j, b] = label(i, a) == label(j, b)  -- [B, K, W*B, K]
            equal = prompt_labels[:, :, None, None] == all_labels[None, None, :, :]
            pos_img = equal.any(dim=1).reshape(batch, total * k)  # [B, W*B*K]
            pos_prm = equal.any(dim=3).reshape(batch * k, total)  # [B*K, W*B]
            loss_img = soft_cross_entropy(logits_img, pos_img)
            loss_prm = soft_cross_entropy(logits_prm, pos_prm)
        return 0.5 * (loss_img + loss_prm)
