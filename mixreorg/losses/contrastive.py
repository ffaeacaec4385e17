"""The contrastive core of GroupViT's objective: the caption term, the multi-label prompt term, and
the two ``nn.Module`` losses built on them.

Conventions shared by everything here (and by :class:`mixreorg.losses.ContrastiveObjective`, which
composes :func:`caption_loss` and :func:`prompt_loss`):

* Embeddings are expected L2-normalised (``GroupViT.encode_image`` / ``encode_text`` return them so);
  ``normalize=True`` on the modules normalises them here instead. Nothing is asserted (a sync).
* Logits are computed in at least float32 whatever the embeddings' dtype, with autocast disabled
  for the similarity matmuls (:func:`similarity_logits`): under bf16 autocast a bf16 matmul would
  round every logit to 8 bits of mantissa, i.e. steps of 0.4 at scale 100.
* ``logit_scale`` is given in LOG space (the model's learnable parameter, initialised at
  ``log(1/0.07)``); every loss uses :func:`logit_scale_value` = ``exp(.).clamp(max=100)``, as GroupViT.
* Under ``torch.distributed`` (world > 1) embeddings are gathered from all ranks with gradient
  (:func:`mixreorg.distributed.all_gather_with_grad`) and this rank's own pairs are offset by
  ``rank * B``. Each rank returns the mean over ITS rows; with equal local batches the mean over
  ranks is the single-process loss on the global batch, and DDP's gradient averaging yields the
  single-process parameter gradients (see :mod:`mixreorg.distributed` for the derivation).
* Multi-positive targets: integer ids (``ids`` / ``labels`` / ``prompt_labels``); texts that share an
  id are all positives of each other's images and the target spreads uniformly over them. Use
  :func:`text_ids` / :func:`keys_to_ids` to hash strings to ids that agree across processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence

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
    "LOSS_FORMS",
    "MAX_LOGIT_SCALE",
    "caption_loss",
    "prompt_loss",
    "keys_to_ids",
    "logit_scale_value",
    "similarity_logits",
    "soft_cross_entropy",
    "text_ids",
]

LOSS_FORMS = ("softmax", "sigmoid")
MAX_LOGIT_SCALE = 100.0  # GroupViT / CLIP clamp of exp(logit_scale)


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_j t_ij log softmax(logits)_ij`` with ``t`` = positives row-normalised.

    ``positives`` is a bool/0-1 mask (or non-negative weights) of the logits' shape. Rows without a
    positive are left out of the mean (0 when no row has one), without a host sync.
    """
    target = positives.to(logits.dtype)
    count = target.sum(dim=-1)  # [R]
    ce = -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1) / count.clamp(min=1)
    has = (count > 0).to(logits.dtype)
    return (ce * has).sum() / has.sum().clamp(min=1)


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


def keys_to_ids(keys: Sequence[Hashable]) -> torch.Tensor:
    """Stable int64 ids ``[N]`` of hashable keys (strings, tuples of strings, ints), equal across ranks."""
    return text_ids([k if isinstance(k, str) else repr(k) for k in keys])


def logit_scale_value(
    log_scale: torch.Tensor | float, max_logit_scale: float = MAX_LOGIT_SCALE, like: torch.Tensor | None = None
) -> torch.Tensor:
    """``exp(log_scale).clamp(max=max_logit_scale)`` as a 0-d tensor in at least float32, on ``like``'s
    device (float64 stays float64, so gradcheck sees the exact function)."""
    device = like.device if like is not None else None
    dtype = torch.promote_types(like.dtype if like is not None else torch.float32, torch.float32)
    if isinstance(log_scale, torch.Tensor):
        s = log_scale.to(device=device if device is not None else log_scale.device, dtype=dtype)
    else:
        s = torch.tensor(float(log_scale), device=device, dtype=dtype)
    if s.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar (log space), got shape {tuple(s.shape)}")
    return s.reshape(()).exp().clamp(max=max_logit_scale)


def similarity_logits(scale: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``scale * rows @ cols^T`` (``[R, D] x [M, D] -> [R, M]``) in ``scale``'s dtype, autocast off."""
    with torch.autocast(rows.device.type, enabled=False):
        return scale * (rows.to(scale.dtype) @ cols.to(scale.dtype).t())


def _own_mask(batch: int, total: int, offset: int, device: torch.device, repeat: int = 1) -> torch.Tensor:
    """``[B, total * repeat]``: row i is positive on the columns of pair ``offset + i``."""
    own = torch.arange(batch, device=device) + offset
    owner = torch.arange(total, device=device).repeat_interleave(repeat)
    return own[:, None] == owner[None, :]


def check_pair(image_embed: torch.Tensor, text_embed: torch.Tensor) -> None:
    """Image and caption embeddings must both be ``[B, D]`` of one shape (ValueError otherwise)."""
    if image_embed.ndim != 2 or image_embed.shape != text_embed.shape:
        raise ValueError(
            "image_embed and text_embed must both be [B, D] of the same shape, got "
            f"{tuple(image_embed.shape)} and {tuple(text_embed.shape)}"
        )


def _check_ids(ids: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if ids.shape != shape or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} must be an integer tensor of shape {list(shape)}, got {ids.dtype} {tuple(ids.shape)}")


def caption_loss(
    image_embed: torch.Tensor,
    text_embed: torch.Tensor,
    scale: torch.Tensor,
    *,
    ids: torch.Tensor | None = None,
    form: str = "softmax",
    bias: torch.Tensor | None = None,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image-caption term -> ``(loss, logits [B, W*B], positives [B, W*B])``.

    ``scale`` is the clamped linear scale (:func:`logit_scale_value`); ``ids [B]`` merge texts with
    equal ids into positives. ``"softmax"``: CLIP InfoNCE in both directions, averaged.
    ``"sigmoid"``: SigLIP's ``-sum log sigmoid(z (logit + bias)) / B`` over this rank's image rows.
    """
    if form not in LOSS_FORMS:
        raise ValueError(f"form must be one of {LOSS_FORMS}, got {form!r}")
    batch, device = image_embed.shape[0], image_embed.device
    distributed = gather and is_distributed()
    all_text = all_gather_with_grad(text_embed) if distributed else text_embed  # [W*B, D]
    total = all_text.shape[0]
    offset = get_rank() * batch if distributed else 0
    pos = _own_mask(batch, total, offset, device)  # [B, W*B]
    if ids is not None:
        _check_ids(ids, (batch,), "ids")
        ids = ids.to(device)
        pos = pos | (ids[:, None] == (all_gather_no_grad(ids) if distributed else ids)[None, :])
    logits = similarity_logits(scale, image_embed, all_text)  # [B, W*B]
    if form == "sigmoid":
        z = logits if bias is None else logits + bias
        loss = -F.logsigmoid((pos.to(z.dtype) * 2.0 - 1.0) * z).sum() / batch
        return loss, logits, pos
    all_image = all_gather_with_grad(image_embed) if distributed else image_embed  # [W*B, D]
    logits_t = similarity_logits(scale, text_embed, all_image)  # [B(txt), W*B(img)]
    # equality of ids is symmetric, so this rank's text rows have the same positive mask
    loss = 0.5 * (soft_cross_entropy(logits, pos) + soft_cross_entropy(logits_t, pos))
    return loss, logits, pos


def prompt_loss(
    image_embed: torch.Tensor,
    prompt_embed: torch.Tensor,
    scale: torch.Tensor,
    *,
    prompt_ids: torch.Tensor | None = None,
    label_ids: torch.Tensor | None = None,
    seg_embed: torch.Tensor | None = None,
    form: str = "softmax",
    bias: torch.Tensor | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """GroupViT's multi-label term between ``image_embed [B, D]`` and ``prompt_embed [B, K, D]``.

    Prompt ``(j, k)`` is a positive of image ``i`` when ``j == i`` or, given ``prompt_ids [B, K]``,
    when its id is among image ``i``'s ``label_ids [B, M]`` (default: its own prompts' ids; ids < 0
    in ``label_ids`` are padding). ``seg_embed [B, S, D]``: an image scores a prompt by its best
    segment instead of its pooled embedding. ``"softmax"``: the image rows' soft cross-entropy over
    all prompts and the prompt rows' over all images, averaged; ``"sigmoid"``: image rows only.
    """
    if form not in LOSS_FORMS:
        raise ValueError(f"form must be one of {LOSS_FORMS}, got {form!r}")
    batch, k, dim = prompt_embed.shape
    device = image_embed.device
    distributed = gather and is_distributed()
    all_prompt = all_gather_with_grad(prompt_embed) if distributed else prompt_embed  # [W*B, K, D]
    total = all_prompt.shape[0]
    offset = get_rank() * batch if distributed else 0
    pos = _own_mask(batch, total, offset, device, repeat=k)  # [B, W*B*K]
    pos_t = _own_mask(batch, total, offset, device).repeat_interleave(k, dim=0)  # [B*K, W*B]
    if prompt_ids is not None:
        _check_ids(prompt_ids, (batch, k), "prompt_ids")
        prompt_ids = prompt_ids.to(device)
        padded = label_ids is not None  # explicit label ids may hold -1 padding; prompt ids are all real
        label_ids = prompt_ids if label_ids is None else label_ids.to(device)
        if label_ids.ndim != 2 or label_ids.shape[0] != batch or label_ids.is_floating_point():
            raise ValueError(f"label_ids must be an integer [B={batch}, M], got {tuple(label_ids.shape)}")
        all_pids = (all_gather_no_grad(prompt_ids) if distributed else prompt_ids).reshape(-1)  # [W*B*K]
        all_lids = all_gather_no_grad(label_ids) if distributed else label_ids  # [W*B, M]
        hit = label_ids[:, :, None] == all_pids[None, None, :]  # [B, M, W*B*K]
        hit_t = prompt_ids.reshape(-1)[:, None, None] == all_lids[None, :, :]  # [B*K, W*B, M]
        if padded:
            hit = hit & (label_ids[:, :, None] >= 0)
            hit_t = hit_t & (all_lids[None] >= 0)
        pos = pos | hit.any(1)
        pos_t = pos_t | hit_t.any(2)
    flat_prompts = all_prompt.reshape(total * k, dim)  # [W*B*K, D]
    if seg_embed is not None:
        # an image matches a prompt as well as its best segment does
        seg_rows = seg_embed.reshape(-1, dim)  # [B*S, D]
        logits = similarity_logits(scale, seg_rows, flat_prompts).view(batch, -1, total * k).amax(1)
    else:
        logits = similarity_logits(scale, image_embed, flat_prompts)  # [B, W*B*K]
    if form == "sigmoid":
        z = logits if bias is None else logits + bias
        return -F.logsigmoid((pos.to(z.dtype) * 2.0 - 1.0) * z).sum() / batch
    local_prompts = prompt_embed.reshape(batch * k, dim)  # [B*K, D]
    if seg_embed is not None:
        all_seg = all_gather_with_grad(seg_embed) if distributed else seg_embed  # [W*B, S, D]
        logits_t = similarity_logits(scale, local_prompts, all_seg.reshape(-1, dim))
        logits_t = logits_t.view(batch * k, total, -1).amax(2)  # [B*K, W*B]
    else:
        all_image = all_gather_with_grad(image_embed) if distributed else image_embed  # [W*B, D]
        logits_t = similarity_logits(scale, local_prompts, all_image)  # [B*K, W*B]
    return 0.5 * (soft_cross_entropy(logits, pos) + soft_cross_entropy(logits_t, pos_t))


class _ContrastiveModule(nn.Module):
    def __init__(
        self,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        normalize: bool = False,
        gather: bool = True,
        check_batch_sizes: bool = True,
    ) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale
        self.normalize = normalize
        self.gather = gather
        self.check_batch_sizes = check_batch_sizes

    def _prepare(self, a: torch.Tensor, b: torch.Tensor, logit_scale) -> tuple[torch.Tensor, ...]:
        if a.shape[0] == 0:
            raise ValueError("empty batch")
        if self.gather and self.check_batch_sizes and is_distributed():
            check_same_batch_size(a.shape[0], a.device)
        if self.normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return a, b, logit_scale_value(logit_scale, self.max_logit_scale, a)


class ImageTextContrastiveLoss(_ContrastiveModule):
    """CLIP InfoNCE in both directions, averaged: ``0.5 * (CE(img->txt) + CE(txt->img))``.

    Args:
        max_logit_scale: clamp of ``exp(logit_scale)`` (GroupViT: 100).
        normalize: L2-normalise the embeddings here (default False: the model already did).
        gather: gather features across ranks when distributed (default True).
        check_batch_sizes: when distributed, verify equal local batches first (one scalar collective).

    Forward:
        image_embed ``[B, D]``, text_embed ``[B, D]``, logit_scale (log space, scalar tensor or
        float), labels ``[B]`` int (optional multi-positive ids, e.g. :func:`text_ids` of the
        captions) -> scalar loss. The same term as ``ContrastiveObjective(multi_label_weight=0)``.
    """

    def forward(
        self,
        image_embed: torch.Tensor,
        text_embed: torch.Tensor,
        logit_scale: torch.Tensor | float,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_pair(image_embed, text_embed)
        if labels is not None:
            _check_ids(labels, (image_embed.shape[0],), "labels")
        image_embed, text_embed, scale = self._prepare(image_embed, text_embed, logit_scale)
        return caption_loss(image_embed, text_embed, scale, ids=labels, gather=self.gather)[0]


class MultiLabelContrastiveLoss(_ContrastiveModule):
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
        if prompt_labels is not None:
            _check_ids(prompt_labels, tuple(prompt_embed.shape[:2]), "prompt_labels")
        image_embed, prompt_embed, scale = self._prepare(image_embed, prompt_embed, logit_scale)
        return prompt_loss(image_embed, prompt_embed, scale, prompt_ids=prompt_labels, gather=self.gather)
