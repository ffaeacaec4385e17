"""The GroupViT model: image encoder + text encoder + projection heads + learnable temperature."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.contrastive import logit_scale_value
from .text import TextEncoder
from .vision import GroupViTVisionEncoder

__all__ = [
    "ProjectionHead",
    "GroupViT",
    "IMAGE_POOLS",
    "compose_assignments",
    "assignment_to_image",
    "assigned_pool",
    "token_grid",
]

IMAGE_POOLS = ("mean", "assigned")


class ProjectionHead(nn.Module):
    """GroupViT projection MLP: ``(Linear -> BatchNorm1d -> ReLU) x (num_layers - 1) -> Linear``.

    Works on ``[B, C]`` or ``[B, L, C]`` (BatchNorm statistics over all B*L rows, as GroupViT's
    1x1-conv head). ``num_layers=0`` is the identity (then ``out_dim`` must equal ``in_dim``).
    Parameter names: ``fc1, bn1, ..., out``.
    """

    def __init__(self, in_dim: int, hidden: int = 4096, out_dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        if num_layers == 0 and in_dim != out_dim:
            raise ValueError(f"a 0-layer projection head needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.in_dim, self.hidden, self.out_dim, self.num_layers = in_dim, hidden, out_dim, num_layers
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        d = in_dim
        for i in range(1, num_layers):
            layers[f"fc{i}"] = nn.Linear(d, hidden)
            layers[f"bn{i}"] = nn.BatchNorm1d(hidden)
            layers[f"act{i}"] = nn.ReLU(inplace=True)
            d = hidden
        if num_layers >= 1:
            layers["out"] = nn.Linear(d, out_dim)
        self.net = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.net(x.reshape(-1, shape[-1]))  # [B*L, D]
        return y.reshape(*shape[:-1], y.shape[-1])


def compose_assignments(maps: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Chain per-stage assignment maps ``[B, S_i, N_i]`` (``N_{i+1} = S_i``) into one
    ``[B, S_last, N_0]`` map from the final segments to the input patches.

    Column ``n`` is patch ``n``'s distribution over the final segments (each stage's map sums to 1
    over its segments, so their product does too). ``dtype``: compose in this dtype (zero-shot
    inference composes bf16 maps in float32); default the first map's.
    """
    if len(maps) == 0:
        raise ValueError("no assignment maps to compose (return_maps=True and >= 1 grouping stage needed)")
    out = maps[0] if dtype is None else maps[0].to(dtype)  # [B, S_0, N_0]
    for m in maps[1:]:
        if m.ndim != 3 or m.shape[-1] != out.shape[-2] or m.shape[0] != out.shape[0]:
            raise ValueError(f"cannot compose assignment maps of shapes {tuple(out.shape)} and {tuple(m.shape)}")
        out = torch.matmul(m.to(out.dtype), out)  # [B, S_i, N_0]
    return out


def token_grid(n_tokens: int, size: tuple[int, int]) -> tuple[int, int]:
    """The grid ``(h, w)`` with ``h * w = n_tokens`` whose aspect ratio is closest to ``size``'s."""
    best: tuple[int, tuple[int, int]] | None = None
    for h in range(1, n_tokens + 1):
        if n_tokens % h:
            continue
        w = n_tokens // h
        err = abs(h * size[1] - w * size[0])
        if best is None or err < best[0]:
            best = (err, (h, w))
    if best is None:
        raise ValueError(f"no token grid for {n_tokens} tokens")
    return best[1]


def assignment_to_image(
    assign: torch.Tensor, grid: tuple[int, int] | None, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """``[B, S, h*w]`` -> ``[B, S, H, W]``: reshape to the token grid (None: the one closest to
    ``size``'s aspect ratio), bilinear resize (``align_corners=False``) to ``size``."""
    B, S, N = assign.shape
    if grid is None:
        if size is None:
            raise ValueError("assignment_to_image needs the token grid or the output size")
        grid = token_grid(N, tuple(size))
    h, w = grid
    if h * w != N:
        raise ValueError(f"assignment map has {N} tokens, the grid {h}x{w} has {h * w}")
    m = assign.reshape(B, S, h, w)
    if size is not None and tuple(size) != (h, w):
        m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
    return m


def assigned_pool(vision_out: dict, weight_grad: bool = True) -> torch.Tensor:
    """Image vector ``[B, C]`` = the segment tokens averaged with weights = the share of patches each
    segment owns (composed hard assignments; straight-through gradient in training).

    GroupViT averages its segment tokens uniformly, so a segment that owns NO patch (its token is
    still fed by the grouping block's cross-attention over the whole image) can carry the image's
    semantics while the segments that own the pixels carry none -- which zero-shot segmentation
    reads. Weighting by ownership makes the pixel-owning segments the ones that must match the text.

    ``weight_grad=False`` stops the gradient through the weights (the vector is the same): the
    image-level losses then cannot move patches into the segment that already matches the caption
    best, a rich-get-richer pull toward one segment per image [R].
    """
    maps = vision_out.get("hard_maps") or []
    if not maps:
        raise ValueError("assigned pooling needs the assignment maps (encode with return_maps=True)")
    weights = compose_assignments(maps).sum(-1)  # [B, S] patches owned by each final segment
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
    if not weight_grad:
        weights = weights.detach()
    return torch.einsum("bs,bsc->bc", weights.to(vision_out["tokens"].dtype), vision_out["tokens"])


class GroupViT(nn.Module):
    """GroupViT: image encoder, text encoder, projection heads and a learnable temperature.

    Args:
        vision: a :class:`GroupViTVisionEncoder` or a dict of its arguments (None: defaults).
        text: a :class:`TextEncoder` or a dict of its arguments (None: defaults).
        proj_dim: joint embedding size D; proj_hidden: hidden size of both heads;
        proj_layers: layers of both heads (GroupViT: 2).
        logit_scale_init: initial ``log`` of the temperature multiplier (``log(1/0.07)``).
        logit_scale_max: clamp of ``exp(logit_scale)`` (100).
        multi_label_scale: keep a separate learnable scale for the multi-label loss.
        image_pool: the image vector the projection head reads: ``"mean"`` (GroupViT: the uniform
            average of the final segment tokens) or ``"assigned"`` (:func:`assigned_pool`: weighted
            by the patches each segment owns). No parameters depend on it.
        pool_weight_grad: ``"assigned"`` only: whether the image-level losses' gradient reaches the
            assignment through the ownership weights (False: :func:`assigned_pool` ``weight_grad``) [R].
    """

    def __init__(
        self,
        vision: dict | GroupViTVisionEncoder | None = None,
        text: dict | TextEncoder | None = None,
        proj_dim: int = 256,
        proj_hidden: int = 4096,
        proj_layers: int = 2,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_scale_max: float = 100.0,
        multi_label_scale: bool = True,
        image_pool: str = "mean",
        pool_weight_grad: bool = True,
    ) -> None:
        super().__init__()
        if image_pool not in IMAGE_POOLS:
            raise ValueError(f"image_pool must be one of {IMAGE_POOLS}, got {image_pool!r}")
        if not pool_weight_grad and image_pool != "assigned":
            raise ValueError(
                "pool_weight_grad=False is an option of image_pool='assigned' (mean pooling has no weights)")
        self.image_pool = image_pool
        self.pool_weight_grad = bool(pool_weight_grad)
        if vision is None or isinstance(vision, dict):
            vision = GroupViTVisionEncoder(**(vision or {}))
        if text is None or isinstance(text, dict):
            text = TextEncoder(**(text or {}))
        self.vision = vision
        self.text = text
        self.proj_dim = proj_dim
        self.logit_scale_max = logit_scale_max
        self.image_proj = ProjectionHead(vision.width, proj_hidden, proj_dim, proj_layers)
        self.text_proj = ProjectionHead(text.width, proj_hidden, proj_dim, proj_layers)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        if multi_label_scale:
            self.multi_label_logit_scale: nn.Parameter | None = nn.Parameter(torch.tensor(float(logit_scale_init)))
        else:
            self.register_parameter("multi_label_logit_scale", None)

    # ------------------------------------------------------------------ temperature
    def scale(self) -> torch.Tensor:
        """The contrastive logit multiplier ``min(exp(logit_scale), logit_scale_max)`` (scalar)."""
        return logit_scale_value(self.logit_scale, self.logit_scale_max, like=self.logit_scale)

    def multi_label_scale(self) -> torch.Tensor:
        """Multiplier of the multi-label loss (its own parameter, or the shared one)."""
        p = self.multi_label_logit_scale if self.multi_label_logit_scale is not None else self.logit_scale
        return logit_scale_value(p, self.logit_scale_max, like=p)

    @property
    def use_checkpoint(self) -> bool:
        """Activation checkpointing in both towers (settable)."""
        return self.vision.use_checkpoint and self.text.use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, flag: bool) -> None:
        self.vision.use_checkpoint = flag
        self.text.use_checkpoint = bool(flag)

    # ------------------------------------------------------------------ encoders
    def project_image(self, vision_out: dict, with_seg: bool = False) -> dict:
        """Project a vision-encoder output dict: adds ``image_embed [B, D]`` and (``with_seg``)
        ``seg_embed [B, S, D]``, both L2-normalised. Note that in training the segment tokens go
        through the head's BatchNorm too (one more update of its running statistics)."""
        out = dict(vision_out)
        out["image_embed"] = F.normalize(self.image_proj(vision_out["pooled"]), dim=-1)
        out["seg_embed"] = F.normalize(self.image_proj(vision_out["tokens"]), dim=-1) if with_seg else None
        return out

    def project_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, L, C]`` (e.g. ``stage1_tokens``) -> ``[B, L, D]`` through the encoder's
        final norm and the image head, L2-normalised: the embedding space of the segments, for
        per-patch losses (in training a BatchNorm head updates its statistics with them too)."""
        return F.normalize(self.image_proj(self.vision.norm(tokens)), dim=-1)

    def pool(self, vision_out: dict) -> dict:
        """``vision_out`` with ``pooled`` as ``image_pool`` says (the encoder's mean, or assigned)."""
        if self.image_pool == "mean":
            return vision_out
        return {**vision_out, "pooled": assigned_pool(vision_out, self.pool_weight_grad)}

    def encode_image(self, images: torch.Tensor, return_maps: bool = False) -> dict:
        """Image features: dict with ``image_embed [B, D]`` (normalised), ``seg_embed
        [B, S_final, D]`` (normalised, only with ``return_maps``, else None), ``hard_maps``,
        ``soft_maps`` (lists of ``[B, S_i, N_i]``; empty without ``return_maps``), ``tokens``,
        ``pooled`` and ``grid``."""
        assigned = self.image_pool == "assigned"  # assigned pooling reads the maps
        out = self.pool(self.vision(images, return_maps=return_maps or assigned))
        out = self.project_image(out, with_seg=return_maps)
        if not return_maps:
            out["hard_maps"], out["soft_maps"] = [], []
        return out

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T] -> [B, D]`` or ``[B, K, T] -> [B, K, D]`` normalised text embeddings."""
        if token_ids.ndim == 3:
            B, K, T = token_ids.shape
            return self.encode_text(token_ids.reshape(B * K, T)).reshape(B, K, -1)
        return F.normalize(self.text_proj(self.text(token_ids)), dim=-1)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> dict:
        """``dict(image_embed [B, D], text_embed [B, D] or [B, K, D], logit_scale,
        multi_label_logit_scale)``. The scales are the LOG-space parameters (as
        :mod:`mixreorg.losses` takes them; the multiplier is :meth:`scale`); the multi-label one
        is the shared ``logit_scale`` when the model has no separate one."""
        ml = self.multi_label_logit_scale if self.multi_label_logit_scale is not None else self.logit_scale
        return {
            "image_embed": self.encode_image(images)["image_embed"],
            "text_embed": self.encode_text(token_ids),
            "logit_scale": self.logit_scale,
            "multi_label_logit_scale": ml,
        }

    # ------------------------------------------------------------------ segmentation
    def segmentation_logits(
        self, images: torch.Tensor, text_embeds: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Per-pixel logits ``[B, K, H, W]`` for K texts (``text_embeds [K, D]``).

        ``logits[b, k, p] = scale * sum_s soft[b, s, p] * <seg_embed[b, s], text[k]>`` with the
        composed soft assignment maps of all grouping stages, bilinearly resized from the patch
        grid to ``output_size`` (default: the image size). Hugging Face's ``GroupViTModel``
        multiplies these logits by the (unclamped) scale a second time.
        """
        size = tuple(images.shape[-2:]) if output_size is None else tuple(output_size)
        return self.segmentation_logits_from(self.encode_image(images, return_maps=True), text_embeds, size)

    def segmentation_logits_from(
        self, image_out: dict, text_embeds: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """:meth:`segmentation_logits` from an :meth:`encode_image` output computed with
        ``return_maps=True`` (``output_size`` None: the patch grid)."""
        if image_out.get("seg_embed") is None or not image_out.get("soft_maps"):
            raise ValueError("image_out must come from encode_image(images, return_maps=True)")
        assign = assignment_to_image(compose_assignments(image_out["soft_maps"]), image_out.get("grid"), output_size)
        seg = image_out["seg_embed"]  # [B, S, D]
        text = F.normalize(text_embeds, dim=-1).to(seg.dtype)  # [K, D]
        group_logits = torch.einsum("bsd,kd->bks", seg, text)  # [B, K, S]
        logits = torch.einsum("bks,bshw->bkhw", group_logits, assign.to(group_logits.dtype))
        return logits * self.scale()
