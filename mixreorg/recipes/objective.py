"""The image-text objective shared by every compared model (GroupViT, GroupViT+, MixReorg).

:class:`ContrastiveObjective` ties L2-normalised image embeddings to the embeddings of their captions
and, optionally, of their noun prompts (GroupViT's multi-label loss). Its switches were chosen by
measurement on SynthShapes (see ``docs``/the recipe notes in :mod:`mixreorg.recipes.config`):

* ``loss="softmax"``: CLIP InfoNCE in both directions (GroupViT). ``loss="sigmoid"``: SigLIP's
  pairwise binary loss ``-sum_ij log sigmoid(z_ij (s <x_i, t_j> + b)) / B`` with ``z_ij = +1`` for
  positives and ``-1`` otherwise, a learnable bias ``b`` (init -10) and scale ``s`` (init 10).
* ``multi_positive``: texts with equal keys (``text_keys``: e.g. identical captions, or the same set
  of nouns) are positives of each other's images, instead of contradicting one-hot targets.
* ``multi_label_pool="max_segment"``: an image scores a noun prompt by its best-matching SEGMENT
  (``seg_embed``) instead of its pooled embedding, so that single segments, not only their mean,
  must carry the nouns (what zero-shot segmentation reads).
* ``multi_label_weight``: weight of the prompt loss. Each image has K prompts (``"a photo of a
  {noun}."``); prompt ``(j, k)`` is a positive of image ``i`` when its key (the noun) is among image
  ``i``'s label keys (default: the keys of its own prompts) -- GroupViT's loss with the one-hot
  targets replaced by the honest multi-positive ones.

Under ``torch.distributed`` every rank gathers the text (and prompt) embeddings of all ranks with
gradient and computes the loss of its own image rows (for the softmax form, also of its own text rows
against all gathered images); each rank averages over its own rows, which with equal local batches
and DDP's gradient averaging equals the single-process loss on the global batch (see
:mod:`mixreorg.distributed`). Keys are hashed with :func:`mixreorg.losses.text_ids` so that equal
keys agree across processes.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mixreorg.distributed import all_gather_no_grad, all_gather_with_grad, get_rank, is_distributed
from mixreorg.losses import text_ids

__all__ = ["ContrastiveObjective", "LOSS_FORMS", "MULTI_LABEL_POOLS", "keys_to_ids", "pairwise_loss"]

LOSS_FORMS = ("softmax", "sigmoid")
MULTI_LABEL_POOLS = ("image", "max_segment")


def keys_to_ids(keys: Sequence[Hashable]) -> torch.Tensor:
    """Stable int64 ids ``[N]`` of hashable keys (strings, tuples of strings, ints), equal across ranks."""
    return text_ids([k if isinstance(k, str) else repr(k) for k in keys])


def _scale(log_scale: torch.Tensor | float, max_scale: float, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(log_scale, dtype=like.dtype, device=like.device)
    if s.numel() != 1:
        raise ValueError(f"logit scales are scalars in log space, got shape {tuple(s.shape)}")
    return s.reshape(()).exp().clamp(max=max_scale)


def pairwise_loss(
    form: str,
    rows: torch.Tensor,
    cols: torch.Tensor,
    positives: torch.Tensor,
    scale: torch.Tensor | float,
    bias: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """One-directional loss of ``rows [R, D]`` against ``cols [M, D]`` with a positive mask ``[R, M]``.

    * ``"sigmoid"``: ``-sum log sigmoid(z * (scale * rows @ cols^T + bias)) / R`` with ``z = +-1``.
    * ``"softmax"``: mean over rows (with a positive) of the cross-entropy against the uniform
      distribution over the row's positives.
    """
    if form not in LOSS_FORMS:
        raise ValueError(f"form must be one of {LOSS_FORMS}, got {form!r}")
    logits = scale * rows @ cols.t()  # [R, M]
    if form == "sigmoid":
        if bias is not None:
            logits = logits + bias
        sign = positives.to(logits.dtype) * 2.0 - 1.0
        return -F.logsigmoid(sign * logits).sum() / rows.shape[0]
    return _soft_ce(logits, positives)


def _soft_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows that have a positive of the soft cross-entropy (uniform target on positives)."""
    target = positives.to(logits.dtype)
    count = target.sum(-1)
    has = count > 0
    ce = -(target * logits.log_softmax(-1)).sum(-1) / count.clamp(min=1)
    return ce[has].mean() if bool(has.any()) else logits.sum() * 0.0


class ContrastiveObjective(nn.Module):
    """The image-text objective (see the module docstring).

    Args:
        loss: ``"softmax"`` (InfoNCE) or ``"sigmoid"`` (SigLIP).
        multi_positive: texts with equal ``text_keys`` count as positives of each other's images.
        multi_label_weight: weight of the prompt loss (0: off; it then needs no prompts).
        multi_label_pool: how an image scores a prompt: ``"image"`` (its pooled embedding, GroupViT)
            or ``"max_segment"`` (its best-matching segment embedding; needs ``seg_embed``).
        bias_init: initial bias of the sigmoid form for the captions (SigLIP: -10, i.e. about
            ``-log(batch)`` of a 32k batch); ml_bias_init: the prompts' bias (default: ``bias_init``).
        learn_bias: make the biases learnable (sigmoid form).
        max_logit_scale: clamp of ``exp(logit_scale)``.
        gather: gather embeddings across ranks when distributed.

    Forward (keyword-only after the embeddings)::

        objective(image_embed [B, D], text_embed [B, D], *, logit_scale,
                  prompt_embed [B, K, D] | None = None, multi_label_scale | None = None,
                  text_keys: list[hashable] | None = None,
                  prompt_keys: list[list[hashable]] | None = None,
                  label_keys: list[iterable[hashable]] | None = None)
        -> dict(loss, itc, [ml], acc_i2t, acc_t2i, scale, [bias])

    ``logit_scale`` / ``multi_label_scale`` are LOG-space scalars (the model's parameters).
    ``prompt_keys[j][k]`` names prompt ``(j, k)`` (its noun); ``label_keys[i]`` lists what image ``i``
    shows (default: its own prompts' keys). The returned ``acc_*`` are in-batch retrieval accuracies
    (top-1 is one of the positives), detached floats.
    """

    def __init__(
        self,
        loss: str = "sigmoid",
        *,
        multi_positive: bool = True,
        multi_label_weight: float = 1.0,
        multi_label_pool: str = "image",
        bias_init: float = -10.0,
        ml_bias_init: float | None = None,
        learn_bias: bool = True,
        max_logit_scale: float = 100.0,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if loss not in LOSS_FORMS:
            raise ValueError(f"loss must be one of {LOSS_FORMS}, got {loss!r}")
        if multi_label_pool not in MULTI_LABEL_POOLS:
            raise ValueError(f"multi_label_pool must be one of {MULTI_LABEL_POOLS}, got {multi_label_pool!r}")
        if multi_label_weight < 0:
            raise ValueError(f"multi_label_weight must be >= 0, got {multi_label_weight}")
        self.loss_form = loss
        self.multi_positive = bool(multi_positive)
        self.multi_label_weight = float(multi_label_weight)
        self.multi_label_pool = multi_label_pool
        self.max_logit_scale = float(max_logit_scale)
        self.gather = bool(gather)
        if loss == "sigmoid":
            self.bias = nn.Parameter(torch.tensor(float(bias_init)), requires_grad=learn_bias)
            ml_init = bias_init if ml_bias_init is None else ml_bias_init
            self.ml_bias = nn.Parameter(torch.tensor(float(ml_init)), requires_grad=learn_bias)
        else:
            self.register_parameter("bias", None)
            self.register_parameter("ml_bias", None)

    def extra_repr(self) -> str:
        return (
            f"loss={self.loss_form!r}, multi_positive={self.multi_positive}, "
            f"multi_label_weight={self.multi_label_weight}, multi_label_pool={self.multi_label_pool!r}"
        )

    # ------------------------------------------------------------------ helpers
    def _distributed(self) -> bool:
        return self.gather and is_distributed()

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_with_grad(x) if self._distributed() else x

    def _gather_ids(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_no_grad(x) if self._distributed() else x

    def _offset(self, batch: int) -> int:
        return get_rank() * batch if self._distributed() else 0

    def _caption_positives(self, batch: int, total: int, keys: Sequence[Hashable] | None, device) -> torch.Tensor:
        """``[B, W*B]`` bool: own pair, and (multi_positive) every text with an equal key."""
        own = torch.arange(batch, device=device) + self._offset(batch)
        pos = own[:, None] == torch.arange(total, device=device)[None, :]
        if self.multi_positive and keys is not None:
            if len(keys) != batch:
                raise ValueError(f"text_keys has {len(keys)} entries for a batch of {batch}")
            ids = keys_to_ids(keys).to(device)
            all_ids = self._gather_ids(ids)
            pos = pos | (ids[:, None] == all_ids[None, :])
        return pos

    def _label_ids(self, label_keys: Sequence[Iterable[Hashable]], batch: int, device) -> torch.Tensor:
        """Padded ``[B, M]`` ids of every image's label keys (-1 = padding), same M on every rank."""
        sets = [list(dict.fromkeys(k)) for k in label_keys]
        if len(sets) != batch:
            raise ValueError(f"label_keys has {len(sets)} entries for a batch of {batch}")
        m = max(1, max(len(s) for s in sets))
        if self._distributed():
            t = torch.tensor([m], dtype=torch.long, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            m = int(t.item())
        out = torch.full((batch, m), -1, dtype=torch.long)
        for i, s in enumerate(sets):
            if s:
                out[i, : len(s)] = keys_to_ids(s)
        return out.to(device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        image_embed: torch.Tensor,
        text_embed: torch.Tensor,
        *,
        logit_scale: torch.Tensor | float,
        prompt_embed: torch.Tensor | None = None,
        multi_label_scale: torch.Tensor | float | None = None,
        text_keys: Sequence[Hashable] | None = None,
        prompt_keys: Sequence[Sequence[Hashable]] | None = None,
        label_keys: Sequence[Iterable[Hashable]] | None = None,
        seg_embed: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        if image_embed.ndim != 2 or image_embed.shape != text_embed.shape:
            raise ValueError(
                "image_embed and text_embed must both be [B, D] of the same shape, got "
                f"{tuple(image_embed.shape)} and {tuple(text_embed.shape)}"
            )
        batch, dim = image_embed.shape
        if batch == 0:
            raise ValueError("empty batch")
        device = image_embed.device
        scale = _scale(logit_scale, self.max_logit_scale, image_embed)

        # ---- image <-> caption
        all_text = self._gather(text_embed)  # [W*B, D]
        total = all_text.shape[0]
        pos = self._caption_positives(batch, total, text_keys, device)  # [B, W*B]
        logits = scale * image_embed @ all_text.t()  # [B, W*B]
        if self.loss_form == "sigmoid":
            z = logits + self.bias
            sign = pos.to(z.dtype) * 2.0 - 1.0
            itc = -F.logsigmoid(sign * z).sum() / batch
        else:
            all_image = self._gather(image_embed)  # [W*B, D]
            # text rows of this rank against every image: positives are the transposed mask
            own = torch.arange(batch, device=device) + self._offset(batch)
            pos_t = own[:, None] == torch.arange(total, device=device)[None, :]
            if self.multi_positive and text_keys is not None:
                ids = keys_to_ids(text_keys).to(device)
                pos_t = pos_t | (ids[:, None] == self._gather_ids(ids)[None, :])
            logits_t = scale * text_embed @ all_image.t()  # [B, W*B]
            itc = 0.5 * (_soft_ce(logits, pos) + _soft_ce(logits_t, pos_t))
        with torch.no_grad():
            own = torch.arange(batch, device=device) + self._offset(batch)
            top_i = logits.argmax(-1)
            acc_i2t = pos[torch.arange(batch, device=device), top_i].float().mean().item()
            local = logits[:, self._offset(batch) : self._offset(batch) + batch]  # [B(img), B(txt)] local
            top_t = local.argmax(0)
            acc_t2i = pos[top_t, own].float().mean().item()  # within this rank's batch
        out: dict[str, Any] = {"itc": itc, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i, "scale": float(scale.detach())}
        if self.bias is not None:
            out["bias"] = float(self.bias.detach())
        loss = itc

        # ---- image <-> noun prompts
        if self.multi_label_weight > 0:
            if prompt_embed is None:
                raise ValueError("multi_label_weight > 0 needs prompt_embed [B, K, D] (or set it to 0)")
            if prompt_embed.ndim != 3 or prompt_embed.shape[0] != batch or prompt_embed.shape[2] != dim:
                raise ValueError(f"prompt_embed must be [B={batch}, K, D={dim}], got {tuple(prompt_embed.shape)}")
            k = prompt_embed.shape[1]
            ml_scale = _scale(
                logit_scale if multi_label_scale is None else multi_label_scale, self.max_logit_scale, image_embed
            )
            all_prompt = self._gather(prompt_embed).reshape(-1, dim)  # [W*B*K, D]
            # positives: own prompts always; plus prompts whose key is among the image's label keys
            own = torch.arange(batch, device=device) + self._offset(batch)
            owner = torch.arange(total, device=device).repeat_interleave(k)  # [W*B*K]
            pos_p = own[:, None] == owner[None, :]  # [B, W*B*K]
            if prompt_keys is not None:
                if len(prompt_keys) != batch or any(len(p) != k for p in prompt_keys):
                    raise ValueError(f"prompt_keys must be [B={batch}][K={k}]")
                pids = keys_to_ids([key for p in prompt_keys for key in p]).to(device)  # [B*K]
                all_pids = self._gather_ids(pids)  # [W*B*K]
                lids = self._label_ids(label_keys if label_keys is not None else prompt_keys, batch, device)
                pos_p = pos_p | (lids[:, :, None] == all_pids[None, None, :]).any(1)
            by_segment = self.multi_label_pool == "max_segment"
            if by_segment:
                if seg_embed is None or seg_embed.ndim != 3 or seg_embed.shape[0] != batch or seg_embed.shape[2] != dim:
                    raise ValueError(
                        "multi_label_pool='max_segment' needs seg_embed [B, S, D] (normalised segment embeddings), "
                        f"got {None if seg_embed is None else tuple(seg_embed.shape)}"
                    )
                # an image matches a prompt as well as its best segment does  [B, W*B*K]
                logits_p = ml_scale * torch.einsum("bsd,md->bsm", seg_embed, all_prompt).amax(dim=1)
            else:
                logits_p = ml_scale * image_embed @ all_prompt.t()  # [B, W*B*K]
            if self.loss_form == "sigmoid":
                z = logits_p + self.ml_bias
                sign = pos_p.to(z.dtype) * 2.0 - 1.0
                ml = -F.logsigmoid(sign * z).sum() / batch
            else:
                # local prompts against every image: positive where the image's labels hold the key
                all_pos = self._gather_ids(pos_p.to(torch.uint8)).bool() if self._distributed() else pos_p
                # all_pos [W*B, W*B*K]; columns of this rank's prompts
                start = self._offset(batch) * k
                pos_pt = all_pos[:, start : start + batch * k].t()  # [B*K, W*B]
                local_prompts = prompt_embed.reshape(-1, dim)  # [B*K, D]
                if by_segment:
                    all_seg = self._gather(seg_embed)  # [W*B, S, D]
                    logits_pt = ml_scale * torch.einsum("jsd,md->mjs", all_seg, local_prompts).amax(dim=2)
                else:
                    logits_pt = ml_scale * local_prompts @ self._gather(image_embed).t()  # [B*K, W*B]
                ml = 0.5 * (_soft_ce(logits_p, pos_p) + _soft_ce(logits_pt, pos_pt))
            out["ml"] = ml
            loss = loss + self.multi_label_weight * ml
        out["loss"] = loss
        return out
