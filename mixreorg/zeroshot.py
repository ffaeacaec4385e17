"""Zero-shot inference with a GroupViT-style model: class prompts, segmentation, classification.

Works on any model with the ``GroupViT`` interface of ``mixreorg.nn`` (``encode_text(ids) -> [N, D]``
normalised, ``encode_image(images, return_maps=True) -> dict(image_embed [B, D], seg_embed
[B, S, D], soft_maps [[B, S_i, N_i], ...], grid (h, w) optional)``, ``logit_scale`` in log space).

Segmentation follows GroupViT's released inference (``GroupViTSegInference``):

1. maps = composition of the per-stage soft assignments, patches -> final groups ``[B, S, h*w]``,
   reshaped to the patch grid and bilinearly upsampled to the image;
2. each pixel goes to its argmax group (``hard=True``; ``hard=False`` keeps the soft weights);
3. group-class affinity from ``scale * seg @ T^T``, restricted to the image-level top-k classes
   (by ``image_embed @ T^T``): ``A = softmax(restricted) * softmax(unrestricted)`` (the product is
   applied even when nothing is restricted, as in GroupViT's code);
4. pixel logits = (one-hot) maps @ A, ``[B, K, H, W]``;
5. with ``bg_thresh``: a background channel 0 is prepended, 1 where the best class score is below
   ``min(bg_thresh, max(A))`` and 0 elsewhere (VOC / COCO: 0.95, Context: 0.35 in GroupViT).

``mode="slide"`` runs that on overlapping crops (GroupViT: short side 448, crop 448, stride 224) and
averages the logits where crops overlap. The model is put in eval mode during these calls (and
restored after) and no gradient is recorded.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixreorg.losses.contrastive import MAX_LOGIT_SCALE, logit_scale_value
from mixreorg.nn.groupvit import assignment_to_image, compose_assignments
from mixreorg.ops.utils import first_argmax
from mixreorg.text.prompts import SEGMENTATION_TEMPLATES
from mixreorg.text.tokenizer import CONTEXT_LENGTH, get_tokenizer

__all__ = [
    "check_class_names",
    "class_embeddings",
    "classify",
    "segment",
    "segment_from_features",
]


# ---------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode + no_grad; every submodule's training flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in modes:
            m.training = flag


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _scale(model: nn.Module) -> torch.Tensor:
    return logit_scale_value(model.logit_scale.detach(), getattr(model, "logit_scale_max", MAX_LOGIT_SCALE))


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return v  # type: ignore[return-value]


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """Validate a class list: non-empty, strings, no duplicates (compared case- and space-insensitively,
    as the tokenizer sees them). Returns it as a list; raises ``ValueError`` naming the problem."""
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise ValueError(f"class_names must be a sequence of str, got {type(class_names).__name__}")
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty")
    seen: dict[str, str] = {}
    duplicates: list[str] = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class_names[{i}] must be a non-empty str, got {name!r}")
        key = re.sub(r"\s+", " ", name).strip().lower()
        if key in seen:
            duplicates.append(name if name == seen[key] else f"{seen[key]!r}/{name!r}")
        else:
            seen[key] = name
    if duplicates:
        raise ValueError(f"duplicated class names: {sorted(set(map(str, duplicates)))}")
    return names


# ---------------------------------------------------------------------------- class embeddings


def class_embeddings(
    model: nn.Module,
    class_names: Sequence[str],
    templates: Sequence[str] = SEGMENTATION_TEMPLATES,
    *,
    tokenizer: Callable[..., torch.Tensor] | None = None,
    context_length: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Class names -> ``[K, D]`` L2-normalised text embeddings (mean over the templates, renormalised).

    Args:
        model: a GroupViT-style model (``encode_text``).
        class_names: K distinct names; an empty or duplicated list raises ``ValueError``.
        templates: prompt strings with one ``{}`` (segmentation: ``"a photo of a {}."``; classification:
            ``mixreorg.text.IMAGENET_TEMPLATES``).
        tokenizer: ``tokenizer(texts, context_length) -> LongTensor`` (default: the CLIP tokenizer).
            Prompts longer than the context are truncated with EOT kept (documented, not an error).
        context_length: default ``model.text.context_length`` or 77.
        batch_size: prompts per text-encoder call.
    """
    names = check_class_names(class_names)
    if isinstance(templates, str) or not templates:
        raise ValueError("templates must be a non-empty sequence of strings with one '{}'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"each template needs exactly one '{{}}' placeholder, got {t!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
    if context_length is None:
        context_length = int(getattr(getattr(model, "text", None), "context_length", CONTEXT_LENGTH))
    prompts = [t.format(name) for name in names for t in templates]  # K*T, class-major
    device = _device(model)
    with _inference(model):
        chunks = []
        for start in range(0, len(prompts), batch_size):
            ids = tokenizer(prompts[start : start + batch_size], context_length).to(device)
            chunks.append(F.normalize(model.encode_text(ids).float(), dim=-1))
        emb = torch.cat(chunks).reshape(len(names), len(templates), -1)  # [K, T, D]
    return F.normalize(emb.mean(dim=1), dim=-1)  # [K, D]


# ---------------------------------------------------------------------------- classification


def classify(model: nn.Module, images: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """Zero-shot classification logits ``[B, K] = scale * image_embed @ class_embeds^T``.

    ``scale = min(exp(model.logit_scale), 100)``; softmax gives class probabilities, argmax the class.
    """
    _check_images(images)
    class_embeds = _check_class_embeds(class_embeds)
    with _inference(model):
        image = model.encode_image(images.to(_device(model)))["image_embed"].float()  # [B, D]
        if image.shape[-1] != class_embeds.shape[-1]:
            raise ValueError(f"class_embeds have dim {class_embeds.shape[-1]}, the model's images {image.shape[-1]}")
        return _scale(model) * F.normalize(image, dim=-1) @ class_embeds.to(image.device).t()


# ---------------------------------------------------------------------------- segmentation


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")


def _check_class_embeds(class_embeds: torch.Tensor) -> torch.Tensor:
    if not isinstance(class_embeds, torch.Tensor) or class_embeds.ndim != 2 or class_embeds.shape[0] == 0:
        raise ValueError(
            f"class_embeds must be a [K>0, D] tensor, got {getattr(class_embeds, 'shape', type(class_embeds))}"
        )
    return F.normalize(class_embeds.float(), dim=-1)


def segment_from_features(
    seg_embed: torch.Tensor,
    image_embed: torch.Tensor,
    maps: torch.Tensor,
    class_embeds: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    bg_thresh: float | None = None,
    topk: int | None = 5,
    hard: bool = True,
) -> torch.Tensor:
    """Steps 2-5 of the module doc on precomputed features -> logits ``[B, K(+1), H, W]``.

    Args:
        seg_embed: ``[B, S, D]`` normalised group embeddings; image_embed: ``[B, D]``.
        maps: ``[B, S, H, W]`` group maps at image resolution (composed soft assignments).
        class_embeds: ``[K, D]``; scale: the logit multiplier (``exp`` of the log scale, clamped).
        bg_thresh: None (no background channel) or a threshold in [0, 1].
        topk: restrict to the image's top-k classes (None or >= K: no restriction).
        hard: one-hot argmax group per pixel (GroupViT) or the soft map weights.
    """
    b, s, d = seg_embed.shape
    if maps.shape[:2] != (b, s) or maps.ndim != 4:
        raise ValueError(f"maps must be [B={b}, S={s}, H, W], got {tuple(maps.shape)}")
    if image_embed.shape != (b, d):
        raise ValueError(f"image_embed must be [B={b}, D={d}], got {tuple(image_embed.shape)}")
    text = _check_class_embeds(class_embeds).to(seg_embed.device)
    if text.shape[1] != d:
        raise ValueError(f"class_embeds have dim {text.shape[1]}, the segment embeddings {d}")
    if topk is not None and (not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    if bg_thresh is not None and not 0.0 <= float(bg_thresh) <= 1.0:
        raise ValueError(f"bg_thresh must be in [0, 1] or None, got {bg_thresh!r}")
    k = text.shape[0]
    group_logits = scale * seg_embed.float() @ text.t()  # [B, S, K]
    pre = group_logits.softmax(dim=-1)  # [B, S, K]
    if topk is not None and topk < k:
        top = (image_embed.float() @ text.t()).topk(topk, dim=-1).indices  # [B, topk]
        keep = torch.zeros(b, k, dtype=torch.bool, device=text.device).scatter_(1, top, True)
        group_logits = group_logits.masked_fill(~keep[:, None, :], float("-inf"))
    # GroupViT multiplies the (restricted) softmax by the unrestricted one, restriction or not
    affinity = group_logits.softmax(dim=-1) * pre  # [B, S, K]
    _, _, h, w = maps.shape
    if hard:
        group = maps.argmax(dim=1).reshape(b, 1, h * w).expand(b, k, h * w)  # [B, K, HW]
        logits = affinity.transpose(1, 2).gather(2, group).reshape(b, k, h, w)  # [B, K, H, W]
    else:
        logits = torch.einsum("bshw,bsk->bkhw", maps.float(), affinity)
    if bg_thresh is None:
        return logits
    thresh = affinity.flatten(1).amax(dim=1).clamp(max=float(bg_thresh))  # [B]
    background = (logits.amax(dim=1) < thresh[:, None, None]).to(logits.dtype)  # [B, H, W]
    return torch.cat([background[:, None], logits], dim=1)


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The model's patch size when it exposes one (``model.vision.patch_embed.patch_size``)."""
    p = getattr(getattr(getattr(model, "vision", None), "patch_embed", None), "patch_size", None)
    if p is None:
        return None
    return _pair(p, "patch_size")


def _segment_whole(model, images, text, scale, **kw) -> torch.Tensor:
    h, w = images.shape[-2:]
    patch = _patch_size(model)
    if patch is not None and (h % patch[0] or w % patch[1]):
        # pad bottom/right with zeros to a multiple of the patch size; the logits are cropped back
        images = F.pad(images, (0, -w % patch[1], 0, -h % patch[0]))
    out = model.encode_image(images, return_maps=True)
    if out.get("seg_embed") is None:
        raise ValueError("encode_image(..., return_maps=True) returned no seg_embed")
    maps = assignment_to_image(compose_assignments(out["soft_maps"], torch.float32), out.get("grid"),
                               tuple(images.shape[-2:]))
    maps = maps[:, :, :h, :w]
    return segment_from_features(
        F.normalize(out["seg_embed"].float(), dim=-1), out["image_embed"].float(), maps, text, scale, **kw
    )


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    n = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, length - crop) for i in range(n)})


def segment(
    model: nn.Module,
    images: torch.Tensor,
    class_embeds: torch.Tensor,
    *,
    bg_thresh: float | None = None,
    topk: int | None = 5,
    mode: str = "whole",
    crop_size: int | Sequence[int] = 448,
    stride: int | Sequence[int] = 224,
    short_side: int | None = None,
    hard: bool = True,
    crop_batch: int = 8,
    return_labels: bool = False,
) -> torch.Tensor:
    """Zero-shot segmentation of ``images [B, C, H, W]`` (normalised as the model expects).

    Args:
        class_embeds: ``[K, D]`` from :func:`class_embeddings`.
        bg_thresh: add a background class 0 (see the module doc); None: K classes only.
        topk: image-level class restriction (GroupViT: 5); None disables it.
        mode: ``"whole"`` (one pass per image) or ``"slide"`` (overlapping crops, logits averaged).
        crop_size, stride: slide window (int or (h, w)); crops larger than the image shrink to it.
            An image (or crop) whose size is not a multiple of the model's patch size is padded
            with zeros at the bottom/right for the forward pass; the logits are cropped back.
        short_side: resize so the short side has this length first (GroupViT: 448), logits are
            resized back to ``(H, W)``; None: native size.
        hard: argmax group per pixel (GroupViT) or soft group weights.
        crop_batch: crops per forward in slide mode.
        return_labels: return the ``[B, H, W]`` argmax label map (0 = background when bg_thresh is
            given, else class index) instead of the logits.

    Returns:
        logits ``[B, K(+1), H, W]`` (float32), or labels ``[B, H, W]`` (int64).
    """
    _check_images(images)
    text = _check_class_embeds(class_embeds)
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if short_side is not None and (not isinstance(short_side, int) or short_side < 1):
        raise ValueError(f"short_side must be a positive int or None, got {short_side!r}")
    if crop_batch < 1:
        raise ValueError(f"crop_batch must be >= 1, got {crop_batch}")
    crop_hw, stride_hw = _pair(crop_size, "crop_size"), _pair(stride, "stride")
    kw = dict(bg_thresh=bg_thresh, topk=topk, hard=hard)
    size = tuple(images.shape[-2:])
    with _inference(model):
        device = _device(model)
        x = images.to(device)
        text = text.to(device)
        scale = _scale(model)
        if short_side is not None:
            r = short_side / min(size)
            x = F.interpolate(x, size=(round(size[0] * r), round(size[1] * r)), mode="bilinear", align_corners=False)
        if mode == "whole":
            logits = _segment_whole(model, x, text, scale, **kw)
        else:
            logits = _segment_slide(model, x, text, scale, crop_hw, stride_hw, crop_batch, **kw)
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return first_argmax(logits, dim=1) if return_labels else logits


def _segment_slide(model, x, text, scale, crop_hw, stride_hw, crop_batch, **kw) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = min(crop_hw[0], h), min(crop_hw[1], w)
    windows = [(y, z) for y in _window_starts(h, ch, stride_hw[0]) for z in _window_starts(w, cw, stride_hw[1])]
    out: torch.Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=x.device)
    per_call = max(1, crop_batch // b)
    for start in range(0, len(windows), per_call):
        chunk = windows[start : start + per_call]
        crops = torch.cat([x[:, :, y : y + ch, z : z + cw] for y, z in chunk])  # [n*B, C, ch, cw]
        logits = _segment_whole(model, crops, text, scale, **kw)  # [n*B, C', ch, cw]
        if out is None:
            out = torch.zeros(b, logits.shape[1], h, w, device=x.device)
        for i, (y, z) in enumerate(chunk):
            out[:, :, y : y + ch, z : z + cw] += logits[i * b : (i + 1) * b]
            count[:, :, y : y + ch, z : z + cw] += 1
    assert out is not None and bool((count > 0).all())
    return out / count
