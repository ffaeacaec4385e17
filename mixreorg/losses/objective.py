"""The image-text objective every compared model trains with (GroupViT, GroupViT+, MixReorg).

:class:`ContrastiveObjective` ties L2-normalised image embeddings to the embeddings of their captions
and, optionally, of their noun prompts (GroupViT's multi-label loss). It composes the two terms of
:mod:`mixreorg.losses.contrastive` (the same functions the standalone losses run). Its defaults are
GroupViT's as published; the recipe's tiny preset changes some of them, by measurement (see
:func:`mixreorg.recipes.config.get_preset`):

* ``loss="softmax"``: CLIP InfoNCE in both directions (GroupViT). ``loss="sigmoid"``: SigLIP's
  pairwise binary loss ``-sum_ij log sigmoid(z_ij (s <x_i, t_j> + b)) / B`` with ``z_ij = +1`` for
  positives and ``-1`` otherwise, a learnable bias ``b`` (init -10).
* ``multi_positive`` (default off): texts with equal keys (``text_keys``: e.g. identical captions,
  or the same set of nouns) are positives of each other's images, instead of contradicting one-hot
  targets.
* ``multi_label_pool="max_segment"``: an image scores a noun prompt by its best-matching SEGMENT
  (``seg_embed``) instead of its pooled embedding, so that single segments, not only their mean,
  must carry the nouns (what zero-shot segmentation reads).
* ``patch_label_weight`` (default 0, off) [R]: the same prompt loss once more, with every image
  scoring a prompt by its best-matching PATCH (``patch_embed [B, L, D]``: e.g. the first stage's
  patch tokens through the image head, :meth:`mixreorg.nn.GroupViT.project_patches`). A noun must
  then be found in some patch of the images that show it and in none of the others' (multiple-
  instance learning from the captions alone), meant to make the patch tokens the grouping assigns
  noun-discriminative: the text-supervised counterpart of deep supervision. Not in the paper. On the
  tiny recipe (docs/investigation/LOG.md, session 6) it breaks the one-group collapse (4 groups used
  per image instead of 1) but does not teach the shapes in 300 steps.
* ``patch_mean_weight`` (default 0, off) [R]: the caption and prompt losses once more on the MEAN
  of the patch embeddings (``patch_embed``), i.e. the image vector without the grouping: deep
  supervision of the tokens the grouping assigns, the text-supervised counterpart of the supervised
  bound's ``supervised_aux``. On the tiny recipe the grouped image vector does not learn the shapes
  from image-level labels while the mean of the same patch tokens does (docs/investigation/LOG.md,
  session 7). Not in the paper.
* ``prompt_uniformity_weight`` (default 0, off) [R]: Wang & Isola's uniformity,
  ``log mean exp(-2 ||p_a - p_b||^2)`` over the pairs of prompt embeddings with DIFFERENT keys (nouns),
  which keeps distinct nouns apart in the text space. Without it the tiny recipe's text tower maps
  all six SynthShapes shape prompts to one embedding (cosine 0.999 after 300 steps: the image side
  cannot tell the shapes apart yet, so the text side merges them, and then the image side gets no
  signal to tell them apart): a joint collapse this term rules out. Not in the paper.
* ``grounded_seg_weight`` (default 0, off) [R]: :func:`mixreorg.losses.grounded.grounded_seg_loss`:
  every grouped position, through its segment, must name what the patch tokens find there among
  the image's own noun prompts (needs ``patch_embed``, ``seg_embed``, ``assign`` and ``prompt_mask``).
* ``grounded_patch_weight`` (default 0, off) [R]: :func:`mixreorg.losses.grounded.grounded_patch_loss`:
  the same label on the patch tokens themselves, told apart from every noun prompt of the batch
  (``grounded_seg_scope`` ``batch`` or ``noun``): deep supervision from the captions.
  ``grounded_patch_on="phrases"`` and ``grounded_patch_threshold`` teach only the patches whose
  label is, confidently, one of the caption's modified nouns ("red circle"), hard.
* ``grounded_teacher`` (default ``"self"``) [R]: who labels the patches for the grounded terms: the
  student's own patch tokens (``"self"``), or (``"ema"``) the ``teacher_patch_embed`` /
  ``teacher_prompt_embed`` the trainer passes (an EMA copy of the model, :class:`mixreorg.nn.ModelEma`);
  then the patch term waits until a teacher is passed (the segment term uses the student's own
  labels until then). ``"oracle"`` (a diagnostic, SynthShapes only): ``teacher_labels [B, L, K]``,
  each patch's class from the masks as the caption's prompts that name it; what the terms teach
  with right labels.
* ``grounded_vocab`` (default ``"prompts"``) [R]: what the grounded terms' students are told apart
  from: every noun prompt of the batch, or (``"nouns"``, with ``grounded_seg_scope="noun"``) the bare
  nouns' prompts only, each taking the teacher's mass of every prompt with its head noun: the
  choice zero-shot inference makes ("circle" among nouns), without asking a red circle to match
  "blue circle".
* ``grounded_labels`` (default ``"soft"``) [R]: how the teacher's patch-prompt similarities become
  labels (:func:`mixreorg.losses.grounded.teacher_labels`): the softmax over the image's prompts, or
  (``"cam"``) hard labels from each prompt's activation map min-max normalised over the image,
  thresholded at ``grounded_cam_threshold`` (below it a patch is left unlabelled). With
  ``grounded_teacher="ema"`` the rule labels the teacher's patches; before the copy is taken the
  segment term keeps the student's own soft labels.
* ``multi_label_weight`` (default 1): weight of the prompt loss. Each image has K prompts (``"a photo
  of a {noun}."``); prompt ``(j, k)`` is a positive of image ``i`` when its key (the noun) is among
  image ``i``'s label keys (default: the keys of its own prompts).

Keys are hashed with :func:`mixreorg.losses.keys_to_ids` so that equal keys agree across processes;
integer id tensors are accepted as they are.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mixreorg.distributed import get_rank, is_distributed

from .contrastive import (
    LOSS_FORMS,
    MAX_LOGIT_SCALE,
    caption_loss,
    check_pair,
    keys_to_ids,
    logit_scale_value,
    prompt_loss,
)
from .grounded import GROUNDED_LABELS, GROUNDED_PATCH_ON, GROUNDED_SCOPES, grounded_patch_loss, grounded_seg_loss

__all__ = ["ContrastiveObjective", "GROUNDED_TEACHERS", "GROUNDED_VOCABS", "MULTI_LABEL_POOLS", "label_key_ids"]

MULTI_LABEL_POOLS = ("image", "max_segment")
GROUNDED_TEACHERS = ("self", "ema", "oracle")  # who labels the patches for the grounded terms
GROUNDED_VOCABS = ("prompts", "nouns")  # what the grounded terms' students are told apart from


@torch.compiler.disable
def _hash_keys(rows: list, shape: tuple[int, ...]) -> torch.Tensor:
    # hashing Python strings cannot be traced: under torch.compile this runs eagerly (one graph
    # break); recipes hand in the tensors BatchBuilder hashed already and never get here
    return keys_to_ids(rows).view(shape)


def _ids(keys: Sequence[Hashable] | torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Keys (hashables, nested one level for ``[B][K]``) or an integer tensor -> int64 ids of ``shape``."""
    if isinstance(keys, torch.Tensor):
        ids = keys
    else:
        rows = list(keys)
        if len(shape) == 2:
            if len(rows) != shape[0] or any(len(r) != shape[1] for r in rows):
                raise ValueError(f"{name} must be [B={shape[0]}][K={shape[1]}]")
            rows = [key for r in rows for key in r]
        elif len(rows) != shape[0]:
            raise ValueError(f"{name} has {len(rows)} entries for a batch of {shape[0]}")
        ids = _hash_keys(rows, shape)
    if ids.shape != shape or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} must be integer ids of shape {list(shape)}, got {ids.dtype} {tuple(ids.shape)}")
    return ids


def _check_parts(parts: torch.Tensor | None, batch: int, dim: int, what: str, name: str) -> None:
    if parts is None or parts.ndim != 3 or parts.shape[0] != batch or parts.shape[2] != dim:
        raise ValueError(
            f"{what} [B={batch}, P, D={dim}] (normalised {name} embeddings), "
            f"got {None if parts is None else tuple(parts.shape)}"
        )


@torch.compiler.disable
def label_key_ids(label_keys: Sequence[Iterable[Hashable]], width: int = 1) -> torch.Tensor:
    """Every image's label keys -> ``LongTensor [B, M]`` of their ids (:func:`keys_to_ids`), -1 padded.

    ``M`` is ``width`` or, when an image has more distinct keys, that count: a fixed ``width`` keeps
    the shape of every batch the same (one compiled graph). Repeated keys of an image count once.
    """
    sets = [list(dict.fromkeys(k)) for k in label_keys]
    m = max([int(width), 1] + [len(s) for s in sets])
    out = torch.full((len(sets), m), -1, dtype=torch.long)
    for i, s in enumerate(sets):
        if s:
            out[i, : len(s)] = keys_to_ids(s)
    return out


def _pad_label_ids_across_ranks(ids: torch.Tensor) -> torch.Tensor:
    """Pad ``[B, M]`` label ids with -1 to the largest ``M`` of all ranks (all_gather needs one shape)."""
    t = torch.tensor([ids.shape[1]], dtype=torch.long, device=ids.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    m = int(t.item())
    return F.pad(ids, (0, m - ids.shape[1]), value=-1) if m > ids.shape[1] else ids


class ContrastiveObjective(nn.Module):
    """The image-text objective (see the module docstring).

    Args:
        loss: ``"softmax"`` (InfoNCE) or ``"sigmoid"`` (SigLIP).
        multi_positive: texts with equal ``text_keys`` count as positives of each other's images.
        multi_label_weight: weight of the prompt loss (0: off; it then needs no prompts).
        multi_label_pool: how an image scores a prompt: ``"image"`` (its pooled embedding, GroupViT)
            or ``"max_segment"`` (its best-matching segment embedding; needs ``seg_embed``).
        prompt_uniformity_weight: weight of the uniformity of the prompts with different keys [R].
        patch_label_weight: weight of the prompt loss scored by the best PATCH (needs ``patch_embed``;
            0: off, the paper) [R].
        patch_mean_weight: weight of the caption + prompt losses of the mean patch embedding (needs
            ``patch_embed``; 0: off, the paper) [R].
        bias_init: initial bias of the sigmoid form for the captions (SigLIP: -10, i.e. about
            ``-log(batch)`` of a 32k batch); ml_bias_init: the prompts' bias (default: ``bias_init``).
        learn_bias: make the biases learnable (sigmoid form).
        max_logit_scale: clamp of ``exp(logit_scale)``.
        gather: gather embeddings across ranks when distributed.

    Forward (keyword-only after the embeddings)::

        objective(image_embed [B, D], text_embed [B, D], *, logit_scale,
                  prompt_embed [B, K, D] | None = None, multi_label_scale | None = None,
                  text_keys: list[hashable] | LongTensor [B] | None = None,
                  prompt_keys: list[list[hashable]] | LongTensor [B, K] | None = None,
                  label_keys: list[iterable[hashable]] | LongTensor [B, M] | None = None,
                  seg_embed [B, S, D] | None = None, patch_embed [B, L, D] | None = None)
        -> dict(loss, itc, [ml], [patch_ml], [patch_mean], [uniformity], acc_i2t, acc_t2i, scale, [bias])

    ``logit_scale`` / ``multi_label_scale`` are LOG-space scalars (the model's parameters).
    ``prompt_keys[j][k]`` names prompt ``(j, k)`` (its noun); ``label_keys[i]`` lists what image ``i``
    shows (default: its own prompts' keys; as ids: ``[B, M]``, -1 = padding). The returned ``acc_*``
    are in-batch retrieval accuracies (top-1 is one of the positives) and ``scale`` / ``bias`` the
    current values, all detached 0-d tensors (no host sync per step; ``float()`` them to log).
    Logits are float32 (at least), also under autocast.
    """

    def __init__(
        self,
        loss: str = "softmax",
        *,
        multi_positive: bool = False,
        multi_label_weight: float = 1.0,
        multi_label_pool: str = "image",
        patch_label_weight: float = 0.0,
        prompt_uniformity_weight: float = 0.0,
        patch_mean_weight: float = 0.0,
        grounded_seg_weight: float = 0.0,
        grounded_seg_scope: str = "image",
        grounded_patch_weight: float = 0.0,
        grounded_patch_on: str = "all",
        grounded_patch_threshold: float = 0.0,
        grounded_teacher: str = "self",
        grounded_vocab: str = "prompts",
        grounded_labels: str = "soft",
        grounded_cam_threshold: float = 0.7,
        bias_init: float = -10.0,
        ml_bias_init: float | None = None,
        learn_bias: bool = True,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if loss not in LOSS_FORMS:
            raise ValueError(f"loss must be one of {LOSS_FORMS}, got {loss!r}")
        if multi_label_pool not in MULTI_LABEL_POOLS:
            raise ValueError(f"multi_label_pool must be one of {MULTI_LABEL_POOLS}, got {multi_label_pool!r}")
        if not prompt_uniformity_weight >= 0:
            raise ValueError(f"prompt_uniformity_weight must be >= 0, got {prompt_uniformity_weight!r}")
        if not patch_label_weight >= 0:
            raise ValueError(f"patch_label_weight must be >= 0, got {patch_label_weight!r}")
        if not grounded_seg_weight >= 0:
            raise ValueError(f"grounded_seg_weight must be >= 0, got {grounded_seg_weight!r}")
        if not grounded_patch_weight >= 0:
            raise ValueError(f"grounded_patch_weight must be >= 0, got {grounded_patch_weight!r}")
        if grounded_patch_weight > 0 and grounded_seg_scope == "image":
            raise ValueError("grounded_patch_weight > 0 needs grounded_seg_scope 'batch' or 'noun' (in the image "
                             "scope a patch is its own teacher: zero gradient)")
        if not patch_mean_weight >= 0:
            raise ValueError(f"patch_mean_weight must be >= 0, got {patch_mean_weight!r}")
        if multi_label_weight < 0:
            raise ValueError(f"multi_label_weight must be >= 0, got {multi_label_weight}")
        self.loss_form = loss
        self.multi_positive = bool(multi_positive)
        self.multi_label_weight = float(multi_label_weight)
        self.multi_label_pool = multi_label_pool
        self.patch_label_weight = float(patch_label_weight)
        self.prompt_uniformity_weight = float(prompt_uniformity_weight)
        self.patch_mean_weight = float(patch_mean_weight)
        self.grounded_seg_weight = float(grounded_seg_weight)
        if grounded_seg_scope not in GROUNDED_SCOPES:
            raise ValueError(f"grounded_seg_scope must be one of {GROUNDED_SCOPES}, got {grounded_seg_scope!r}")
        self.grounded_seg_scope = grounded_seg_scope
        self.grounded_patch_weight = float(grounded_patch_weight)
        if grounded_patch_on not in GROUNDED_PATCH_ON:
            raise ValueError(f"grounded_patch_on must be one of {GROUNDED_PATCH_ON}, got {grounded_patch_on!r}")
        if not 0.0 <= grounded_patch_threshold < 1.0:
            raise ValueError(f"grounded_patch_threshold must be in [0, 1), got {grounded_patch_threshold!r}")
        self.grounded_patch_on, self.grounded_patch_threshold = grounded_patch_on, float(grounded_patch_threshold)
        if grounded_teacher not in GROUNDED_TEACHERS:
            raise ValueError(f"grounded_teacher must be one of {GROUNDED_TEACHERS}, got {grounded_teacher!r}")
        self.grounded_teacher = grounded_teacher
        if grounded_vocab not in GROUNDED_VOCABS:
            raise ValueError(f"grounded_vocab must be one of {GROUNDED_VOCABS}, got {grounded_vocab!r}")
        if grounded_vocab == "nouns" and grounded_seg_scope != "noun":
            raise ValueError("grounded_vocab='nouns' needs grounded_seg_scope='noun' (a phrase's mass goes to its "
                             "head noun's prompts)")
        self.grounded_vocab = grounded_vocab
        if grounded_labels not in GROUNDED_LABELS:
            raise ValueError(f"grounded_labels must be one of {GROUNDED_LABELS}, got {grounded_labels!r}")
        if not 0.0 <= grounded_cam_threshold < 1.0:
            raise ValueError(f"grounded_cam_threshold must be in [0, 1), got {grounded_cam_threshold!r}")
        self.grounded_labels, self.grounded_cam_threshold = grounded_labels, float(grounded_cam_threshold)
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
            f"multi_label_weight={self.multi_label_weight}, multi_label_pool={self.multi_label_pool!r}, "
            f"patch_label_weight={self.patch_label_weight}, prompt_uniformity_weight={self.prompt_uniformity_weight}, "
            f"patch_mean_weight={self.patch_mean_weight}, grounded_seg_weight={self.grounded_seg_weight}, "
            f"grounded_seg_scope={self.grounded_seg_scope!r}, grounded_patch_weight={self.grounded_patch_weight}, "
            f"grounded_teacher={self.grounded_teacher!r}, grounded_vocab={self.grounded_vocab!r}, "
            f"grounded_labels={self.grounded_labels!r}"
            + (f", grounded_cam_threshold={self.grounded_cam_threshold}" if self.grounded_labels == "cam" else "")
        )

    @property
    def reads_patches(self) -> bool:
        """Whether ``forward`` needs ``patch_embed`` (a per-patch or mean-patch term is on)."""
        return (self.patch_label_weight > 0 or self.patch_mean_weight > 0 or self.grounded_seg_weight > 0
                or self.grounded_patch_weight > 0)

    @property
    def reads_segments(self) -> bool:
        """Whether :meth:`forward` needs ``seg_embed`` (and, for the grounded term, ``assign``)."""
        return (self.multi_label_pool == "max_segment" and self.multi_label_weight > 0) or self.grounded_seg_weight > 0

    def _label_ids(self, label_keys: Sequence[Iterable[Hashable]] | torch.Tensor, batch: int, device) -> torch.Tensor:
        """``[B, M]`` ids of every image's label keys (-1 = padding), the same M on every rank."""
        if isinstance(label_keys, torch.Tensor):
            ids = label_keys
            if ids.ndim != 2 or ids.shape[0] != batch or ids.is_floating_point() or ids.is_complex():
                raise ValueError(
                    f"label_keys must be integer ids [B={batch}, M] (-1 = padding), got {ids.dtype} {tuple(ids.shape)}"
                )
        else:
            label_keys = list(label_keys)
            if len(label_keys) != batch:
                raise ValueError(f"label_keys has {len(label_keys)} entries for a batch of {batch}")
            ids = label_key_ids(label_keys)
        ids = ids.to(device)
        if self.gather and is_distributed():
            ids = _pad_label_ids_across_ranks(ids)
        return ids

    def _retrieval_accuracy(self, logits: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # 0-d tensors, not floats: a float would sync the device every step and break a compiled graph
        batch = logits.shape[0]
        offset = get_rank() * batch if self.gather and is_distributed() else 0
        rows = torch.arange(batch, device=logits.device)
        acc_i2t = pos[rows, logits.argmax(-1)].float().mean()
        top_t = logits[:, offset : offset + batch].argmax(0)  # within this rank's batch
        acc_t2i = pos[top_t, rows + offset].float().mean()
        return acc_i2t, acc_t2i

    def forward(
        self,
        image_embed: torch.Tensor,
        text_embed: torch.Tensor,
        *,
        logit_scale: torch.Tensor | float,
        prompt_embed: torch.Tensor | None = None,
        multi_label_scale: torch.Tensor | float | None = None,
        text_keys: Sequence[Hashable] | torch.Tensor | None = None,
        prompt_keys: Sequence[Sequence[Hashable]] | torch.Tensor | None = None,
        label_keys: Sequence[Iterable[Hashable]] | torch.Tensor | None = None,
        seg_embed: torch.Tensor | None = None,
        patch_embed: torch.Tensor | None = None,
        assign: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        prompt_heads: Sequence[Sequence[Hashable]] | torch.Tensor | None = None,
        teacher_patch_embed: torch.Tensor | None = None,
        teacher_prompt_embed: torch.Tensor | None = None,
        teacher_labels: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        check_pair(image_embed, text_embed)
        batch, dim = image_embed.shape
        if batch == 0:
            raise ValueError("empty batch")
        scale = logit_scale_value(logit_scale, self.max_logit_scale, image_embed)
        ids = _ids(text_keys, "text_keys", (batch,)) if self.multi_positive and text_keys is not None else None
        itc, logits, pos = caption_loss(
            image_embed, text_embed, scale, ids=ids, form=self.loss_form, bias=self.bias, gather=self.gather
        )
        with torch.no_grad():
            acc_i2t, acc_t2i = self._retrieval_accuracy(logits, pos)
        out: dict[str, Any] = {"itc": itc, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i, "scale": scale.detach()}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        loss = itc
        ml_log_scale = logit_scale if multi_label_scale is None else multi_label_scale
        if self.multi_label_weight > 0:
            segments = seg_embed if self.multi_label_pool == "max_segment" else None
            if self.multi_label_pool == "max_segment":
                _check_parts(segments, batch, dim, "multi_label_pool='max_segment' needs seg_embed", "segment")
            ml = self._multi_label(image_embed, prompt_embed, segments, ml_log_scale, prompt_keys, label_keys)
            out["ml"] = ml
            loss = loss + self.multi_label_weight * ml
        if self.patch_label_weight > 0:
            _check_parts(patch_embed, batch, dim, "patch_label_weight > 0 needs patch_embed", "patch")
            patch_ml = self._multi_label(image_embed, prompt_embed, patch_embed, ml_log_scale, prompt_keys, label_keys)
            out["patch_ml"] = patch_ml
            loss = loss + self.patch_label_weight * patch_ml
        if self.patch_mean_weight > 0:
            _check_parts(patch_embed, batch, dim, "patch_mean_weight > 0 needs patch_embed", "patch")
            mean_embed = F.normalize(patch_embed.mean(1), dim=-1)  # [B, D] the image vector without the grouping
            term, _, _ = caption_loss(
                mean_embed, text_embed, scale, ids=ids, form=self.loss_form, bias=self.bias, gather=self.gather
            )
            if self.multi_label_weight > 0:
                term = term + self.multi_label_weight * self._multi_label(
                    mean_embed, prompt_embed, None, ml_log_scale, prompt_keys, label_keys)
            out["patch_mean"] = term
            loss = loss + self.patch_mean_weight * term
        if self.grounded_seg_weight > 0 or self.grounded_patch_weight > 0:
            loss = loss + self._grounded(out, patch_embed, seg_embed, assign, prompt_embed, prompt_mask,
                                         prompt_keys, prompt_heads,
                                         logit_scale_value(ml_log_scale, self.max_logit_scale, image_embed),
                                         self.grounded_teacher_of(teacher_patch_embed, teacher_prompt_embed,
                                                                  teacher_labels))
        if self.prompt_uniformity_weight > 0:
            uni = self._prompt_uniformity(prompt_embed, prompt_keys)
            out["uniformity"] = uni
            loss = loss + self.prompt_uniformity_weight * uni
        out["loss"] = loss
        return out

    def grounded_prompt_ids(self, prompt_keys, prompt_heads, prompt_mask: torch.Tensor) -> torch.Tensor | None:
        """``[B, K]`` ids by which the grounded terms share a teacher's mass (``grounded_seg_scope``:
        ``batch`` the prompt keys, ``noun`` the head nouns; ``image``: None)."""
        if self.grounded_seg_scope == "image":
            return None
        which = prompt_keys if self.grounded_seg_scope == "batch" else prompt_heads
        name = "prompt_keys" if self.grounded_seg_scope == "batch" else "prompt_heads"
        if which is None:
            raise ValueError(f"grounded_seg_scope={self.grounded_seg_scope!r} needs {name}")
        return _ids(which, name, tuple(prompt_mask.shape))

    def grounded_vocab_mask(self, prompt_keys, prompt_heads, prompt_mask: torch.Tensor) -> torch.Tensor | None:
        """``[B, K]`` bool: the prompts the grounded terms' students choose among (``grounded_vocab``
        ``"nouns"``: the bare nouns' prompts, whose key is their head noun), or None (every noun prompt)."""
        if self.grounded_vocab == "prompts":
            return None
        if prompt_keys is None or prompt_heads is None:
            raise ValueError("grounded_vocab='nouns' needs prompt_keys and prompt_heads")
        shape = tuple(prompt_mask.shape)
        bare = _ids(prompt_keys, "prompt_keys", shape) == _ids(prompt_heads, "prompt_heads", shape)
        return bare.to(prompt_mask.device) & prompt_mask

    @property
    def grounded_label_kwargs(self) -> dict:
        """How the grounded terms' teacher turns similarities into labels (``labels``, ``cam_threshold``
        of :func:`mixreorg.losses.grounded.teacher_labels`)."""
        return {"labels": self.grounded_labels, "cam_threshold": self.grounded_cam_threshold}

    def grounded_teacher_of(self, patch_embed: torch.Tensor | None, prompt_embed: torch.Tensor | None,
                            labels: torch.Tensor | None = None) -> tuple | torch.Tensor | None:
        """The teacher of the grounded terms, checked: ``(patch_embed, prompt_embed)`` (both or
        neither) with ``grounded_teacher="ema"``, ``labels [B, L, K]`` with ``"oracle"``."""
        if labels is not None:
            if self.grounded_teacher != "oracle" or patch_embed is not None or prompt_embed is not None:
                raise ValueError("teacher_labels go alone, to an objective with grounded_teacher='oracle'")
            return labels.detach()
        if (patch_embed is None) != (prompt_embed is None):
            raise ValueError("teacher_patch_embed and teacher_prompt_embed go together")
        if patch_embed is None:
            return None
        if self.grounded_teacher != "ema":
            raise ValueError(
                f"teacher embeddings given to an objective with grounded_teacher={self.grounded_teacher!r}")
        return patch_embed.detach(), prompt_embed.detach()

    def _grounded(self, out, patch_embed, seg_embed, assign, prompt_embed, prompt_mask, prompt_keys, prompt_heads,
                  scale, teacher=None) -> torch.Tensor:
        """The grounded terms (segments and/or patches), each logged in ``out``; their weighted sum."""
        need = {"patch_embed": patch_embed, "prompt_embed": prompt_embed, "prompt_mask": prompt_mask}
        if self.grounded_seg_weight > 0:
            need.update(seg_embed=seg_embed, assign=assign)
        missing = [name for name, t in need.items() if t is None]
        if missing:
            raise ValueError(f"the grounded terms need {', '.join(need)}; missing: {', '.join(missing)}")
        ids = self.grounded_prompt_ids(prompt_keys, prompt_heads, prompt_mask)
        vocab = self.grounded_vocab_mask(prompt_keys, prompt_heads, prompt_mask)
        labels = self.grounded_label_kwargs
        if self.grounded_teacher == "ema" and teacher is None:
            # before the EMA copy exists the segment term reads the student's own soft labels: hard
            # "cam" labels from untrained patches teach the grouping noise (LOG, session 14)
            labels = {**labels, "labels": "soft"}
        total = patch_embed.new_zeros(())
        if self.grounded_seg_weight > 0:
            out["grounded"] = grounded_seg_loss(patch_embed, seg_embed, assign, prompt_embed, prompt_mask, scale,
                                                scope=self.grounded_seg_scope, prompt_ids=ids, teacher=teacher,
                                                vocab_mask=vocab, **labels)
            total = total + self.grounded_seg_weight * out["grounded"]
        # with an EMA teacher, the patch term waits for it (self-taught patches collapse: LOG session 12)
        if self.grounded_patch_weight > 0 and (teacher is not None or self.grounded_teacher == "self"):
            teach_on = None
            if self.grounded_patch_on == "phrases":  # a phrase's key differs from its head noun's
                if prompt_keys is None or prompt_heads is None:
                    raise ValueError("grounded_patch_on='phrases' needs prompt_keys and prompt_heads")
                shape = tuple(prompt_mask.shape)
                teach_on = _ids(prompt_keys, "prompt_keys", shape) != _ids(prompt_heads, "prompt_heads", shape)
                teach_on = teach_on.to(prompt_mask.device) & prompt_mask
            out["grounded_patch"] = grounded_patch_loss(patch_embed, prompt_embed, prompt_mask, scale,
                                                        scope=self.grounded_seg_scope, prompt_ids=ids,
                                                        teach_on=teach_on, threshold=self.grounded_patch_threshold,
                                                        teacher=teacher, vocab_mask=vocab, **labels)
            total = total + self.grounded_patch_weight * out["grounded_patch"]
        return total

    def _prompt_uniformity(self, prompt_embed: torch.Tensor | None, prompt_keys) -> torch.Tensor:
        """``log mean exp(-2 ||p_a - p_b||^2)`` over this rank's prompt pairs with different keys."""
        if prompt_embed is None or prompt_embed.ndim != 3:
            raise ValueError("prompt_uniformity_weight > 0 needs prompt_embed [B, K, D]")
        if prompt_keys is None:
            raise ValueError("prompt_uniformity_weight > 0 needs prompt_keys (prompts of one noun are one text)")
        b, k, _ = prompt_embed.shape
        ids = _ids(prompt_keys, "prompt_keys", (b, k)).to(prompt_embed.device).reshape(-1)  # [B*K]
        p = prompt_embed.reshape(b * k, -1).float()
        with torch.autocast(p.device.type, enabled=False):  # a bf16 matmul would round the distances
            sq = (2.0 - 2.0 * p @ p.t()).clamp_min(0)  # squared distances of unit vectors [B*K, B*K]
        other = ids[:, None] != ids[None, :]
        # -1e4, not -inf: exp underflows to exactly 0 all the same, and a batch whose prompts share
        # one key (no pair: the term is 0) keeps a finite, zero gradient
        logits = (-2.0 * sq).masked_fill(~other, -1e4).flatten()
        count = other.sum()
        return torch.where(count > 0, torch.logsumexp(logits, 0) - count.clamp_min(1).float().log(),
                           logits.new_zeros(()))

    def _multi_label(self, image_embed, prompt_embed, parts, log_scale, prompt_keys, label_keys) -> torch.Tensor:
        """The prompt loss; ``parts [B, P, D]`` (segments or patches): an image scores a prompt by its
        best part, else by ``image_embed``."""
        batch, dim = image_embed.shape
        if prompt_embed is None:
            raise ValueError("multi_label_weight > 0 needs prompt_embed [B, K, D] (or set it to 0)")
        if prompt_embed.ndim != 3 or prompt_embed.shape[0] != batch or prompt_embed.shape[2] != dim:
            raise ValueError(f"prompt_embed must be [B={batch}, K, D={dim}], got {tuple(prompt_embed.shape)}")
        k = prompt_embed.shape[1]
        prompt_ids = label_ids = None
        if prompt_keys is not None:
            prompt_ids = _ids(prompt_keys, "prompt_keys", (batch, k))
            if label_keys is not None:
                label_ids = self._label_ids(label_keys, batch, image_embed.device)
        return prompt_loss(
            image_embed, prompt_embed, logit_scale_value(log_scale, self.max_logit_scale, image_embed),
            prompt_ids=prompt_ids, label_ids=label_ids, seg_embed=parts, form=self.loss_form,
            bias=self.ml_bias, gather=self.gather,
        )
