"""DeiT-style image augmentation and evaluation transforms in plain PIL + torch (no torchvision).

torchvision does not import on this project's CPU torch, so the few transforms the recipes need live
here. Every random transform takes an explicit ``numpy.random.Generator`` so that augmentation is a
function of the sample's identity (the data streams derive the generator from seed, epoch and sample
position): a resumed run re-draws exactly the crops of the uninterrupted run, whatever the global
RNG state.

Train pipeline (:func:`train_transform`), as GroupViT's DeiT-style recipe minus RandAugment:
``RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3), bilinear)`` -> horizontal flip (p=0.5) ->
colour jitter (brightness/contrast/saturation 0.4, random order) -> tensor -> normalise
(CLIP mean/std by default) -> random erasing (p=0.25, per-pixel normal noise).
Eval pipeline (:func:`eval_transform`): resize the short side to ``size / crop_pct``, centre crop.
Segmentation eval (:class:`ResizeKeepRatio`): mmseg's ``Resize(img_scale=(2048, 448),
keep_ratio=True)``: scale so the image fits inside the long/short bounds.

Every transform is a callable ``t(x, rng=None)``; ``rng=None`` draws fresh OS entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "RandomResizedCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "RandomErasing",
    "Resize",
    "CenterCrop",
    "ResizeKeepRatio",
    "ToTensor",
    "Normalize",
    "to_tensor",
    "normalize",
    "denormalize",
    "train_transform",
    "eval_transform",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _interp(name: str) -> Image.Resampling:
    try:
        return _INTERP[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; choose one of {sorted(_INTERP)}") from None


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return np.random.default_rng() if rng is None else rng


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or uint8 ``[H, W, 3]`` array -> float32 ``[3, H, W]`` in ``[0, 1]``."""
    if isinstance(img, Image.Image):
        arr = np.asarray(img.convert("RGB"))
    else:
        arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"to_tensor expects a uint8 [H, W, 3] image, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """``(x - mean) / std`` over the channel axis of ``[..., 3, H, W]``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to ``[0, 1]``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * s + m).clamp_(0.0, 1.0)


class Compose:
    """Chain transforms, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Callable[..., Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any, rng: np.random.Generator | None = None) -> Any:
        rng = _rng(rng)
        for t in self.transforms:
            x = t(x, rng)
        return x

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize to ``size``.

    Parameter sampling follows the Inception/torchvision recipe: ten tries, then a centre crop with
    the ratio clamped into range.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
    ) -> None:
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"RandomResizedCrop: scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"RandomResizedCrop: ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.size = _size2(size)
        self.scale = scale
        self.ratio = ratio
        self.interpolation = interpolation
        self._resample = _interp(interpolation)

    def params(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop box."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        top, left, h, w = self.params(img.width, img.height, _rng(rng))
        out_h, out_w = self.size
        return img.resize((out_w, out_h), self._resample, box=(left, top, left + w, top + h))

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, {self.interpolation})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (PIL image or ``[..., H, W]`` tensor)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: Any, rng: np.random.Generator | None = None) -> Any:
        if _rng(rng).random() >= self.p:
            return x
        if isinstance(x, Image.Image):
            return x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return x.flip(-1)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def _gray(x: torch.Tensor) -> torch.Tensor:
    # [3, H, W] -> [1, H, W], ITU-R 601 luma (as PIL's "L")
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


class ColorJitter:
    """Random brightness, contrast and saturation factors in ``[1 - s, 1 + s]``, applied in random
    order to a ``[3, H, W]`` float tensor in ``[0, 1]`` (as torchvision's, without hue)."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4) -> None:
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= v < 1:
                raise ValueError(f"ColorJitter: {name} must be in [0, 1), got {v}")
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def __call__(self, x: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = _rng(rng)
        factors = [
            rng.uniform(1 - s, 1 + s) if s > 0 else 1.0 for s in (self.brightness, self.contrast, self.saturation)
        ]
        for op in rng.permutation(3):
            f = float(factors[op])
            if f == 1.0:
                continue
            if op == 0:  # brightness: blend with black
                x = x * f
            elif op == 1:  # contrast: blend with the mean grey level
                x = (x - _gray(x).mean()) * f + _gray(x).mean()
            else:  # saturation: blend with the grey image
                g = _gray(x)
                x = (x - g) * f + g
            x = x.clamp(0.0, 1.0)
        return x

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation})"


class RandomErasing:
    """With probability ``p`` replace a random rectangle of a *normalised* ``[3, H, W]`` tensor by
    per-pixel standard-normal noise (timm's ``mode='pixel'``, one rectangle)."""

    def __init__(self, p: float = 0.25, scale: tuple[float, float] = (0.02, 1 / 3), ratio: float = 0.3) -> None:
        self.p, self.scale, self.ratio = p, scale, ratio

    def __call__(self, x: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = _rng(rng)
        if rng.random() >= self.p:
            return x
        _, height, width = x.shape
        area = height * width
        log_ratio = (math.log(self.ratio), math.log(1 / self.ratio))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < h < height and 0 < w < width:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                noise = rng.standard_normal((x.shape[0], h, w)).astype(np.float32)
                x = x.clone()
                x[:, top : top + h, left : left + w] = torch.from_numpy(noise).to(x.dtype)
                break
        return x

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.p}, scale={self.scale}, ratio={self.ratio})"


class Resize:
    """Resize so the short side equals ``size`` (keeping the aspect ratio)."""

    def __init__(self, size: int, interpolation: str = "bicubic") -> None:
        self.size = int(size)
        self.interpolation = interpolation
        self._resample = _interp(interpolation)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        w, h = img.size
        if w <= h:
            new_w, new_h = self.size, max(1, int(round(h * self.size / w)))
        else:
            new_w, new_h = max(1, int(round(w * self.size / h))), self.size
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), self._resample)

    def __repr__(self) -> str:
        return f"Resize(short_side={self.size}, {self.interpolation})"


class CenterCrop:
    """Crop the central ``size`` region (padding with black where the image is smaller)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size2(size)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        out_h, out_w = self.size
        left = int(round((img.width - out_w) / 2.0))
        top = int(round((img.height - out_h) / 2.0))
        return img.crop((left, top, left + out_w, top + out_h))

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


class ResizeKeepRatio:
    """mmseg's ``Resize(img_scale=(long, short), keep_ratio=True)``: the largest scale at which the
    long side is ``<= long`` and the short side ``<= short`` (GroupViT evaluates at ``(2048, 448)``).
    """

    def __init__(self, scale: tuple[int, int] = (2048, 448), interpolation: str = "bilinear") -> None:
        self.long, self.short = max(scale), min(scale)
        self.interpolation = interpolation
        self._resample = _interp(interpolation)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after resizing."""
        factor = min(self.long / max(width, height), self.short / min(width, height))
        return int(width * factor + 0.5), int(height * factor + 0.5)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        size = self.output_size(img.width, img.height)
        return img if size == img.size else img.resize(size, self._resample)

    def __repr__(self) -> str:
        return f"ResizeKeepRatio(scale=({self.long}, {self.short}), {self.interpolation})"


class ToTensor:
    """PIL image -> float ``[3, H, W]`` in ``[0, 1]``."""

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return to_tensor(img)

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """``(x - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, x: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        return normalize(x, self.mean, self.std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def train_transform(
    size: int = 224,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    re_prob: float = 0.25,
    interpolation: str = "bilinear",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Compose:
    """DeiT-style training augmentation (see the module docstring); returns ``[3, size, size]``."""
    ops: list[Callable[..., Any]] = [RandomResizedCrop(size, scale, ratio, interpolation)]
    if hflip > 0:
        ops.append(RandomHorizontalFlip(hflip))
    ops.append(ToTensor())
    if color_jitter > 0:
        ops.append(ColorJitter(color_jitter, color_jitter, color_jitter))
    ops.append(Normalize(mean, std))
    if re_prob > 0:
        ops.append(RandomErasing(re_prob))
    return Compose(ops)


def eval_transform(
    size: int = 224,
    *,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Compose:
    """Resize the short side to ``size / crop_pct``, centre-crop ``size``, normalise."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return Compose(
        [Resize(int(math.floor(size / crop_pct)), interpolation), CenterCrop(size), ToTensor(), Normalize(mean, std)]
    )
