"""Convolutional trunks that turn images into patch tokens (hybrid GroupViT, as the ViT paper's R50+ViT).

GroupViT's linear patch embedding sees each patch on its own; the transformer must then learn shape
from tokens that each hold one opaque 8x8 (or 16x16) crop. A small convolutional trunk with
BatchNorm gives every token local edge and corner features of its neighbourhood, the inductive
bias a tiny model trained for minutes cannot learn by itself (docs/investigation/LOG.md, session 3:
on SynthShapes the trunk is what lets the backbone tell the shapes apart).

:class:`ConvTrunk` downsamples by 2 per level, ``len(widths) = log2(patch)`` levels; each level is
a stride-2 3x3 convolution followed by ``depths[i] - 1`` residual 3x3 blocks, all with BatchNorm +
ReLU; a 1x1 convolution projects to the token width. Tokens come out on the ``H/p x W/p`` grid in
row-major order, exactly where a ``Conv2d(kernel = stride = p)`` patch embedding puts them, so
everything downstream (position embedding, grouping maps, patch mixing) is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ConvBNReLU", "ResidualConvBlock", "ConvTrunk", "FineTokens"]


class ConvBNReLU(nn.Sequential):
    """``Conv2d(3x3, stride) -> BatchNorm2d -> ReLU`` (no conv bias: BatchNorm has one)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class ResidualConvBlock(nn.Module):
    """``x + BN(conv(ReLU(BN(conv(x)))))`` then ReLU. With ``zero_init`` (default) the last BatchNorm
    starts at zero, so every block starts as the identity (Goyal et al. 2017) and depth costs nothing
    at initialisation; ``zero_init=False`` starts it at one (PyTorch's BatchNorm default)."""

    def __init__(self, ch: int, zero_init: bool = True) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(ch, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        if zero_init:
            nn.init.zeros_(self.bn2.weight)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.conv2(self.conv1(x))))


class ConvTrunk(nn.Module):
    """Image ``[B, C_in, H, W]`` -> feature map ``[B, embed_dim, H/p, W/p]`` with ``p = 2**len(widths)``.

    Args:
        in_chans: input channels.
        embed_dim: output channels (the token width).
        widths: channels of each stride-2 level.
        depths: convolutions per level (>= 1: the strided one, then ``depth - 1`` residual blocks of two
            convolutions each).
        zero_init_residual: residual blocks start as the identity (default, as the trunk was first
            measured) or at full strength. Under image-level labels only (the caption's nouns as
            targets, no masks) the identity start learns the shapes far more slowly: ROC AUC 0.73
            vs 0.82 after 800-1000 steps (``docs/investigation/presence_probe.py``, LOG session 7).
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        widths: Sequence[int],
        depths: Sequence[int],
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        widths, depths = [int(w) for w in widths], [int(d) for d in depths]
        if not widths:
            raise ValueError("ConvTrunk needs at least one level (widths is empty)")
        if len(depths) != len(widths):
            raise ValueError(f"ConvTrunk: depths needs one value per level ({len(widths)}), got {depths}")
        if any(w < 1 for w in widths) or any(d < 1 for d in depths):
            raise ValueError(f"ConvTrunk: widths and depths must be >= 1, got {widths} / {depths}")
        self.widths, self.depths = tuple(widths), tuple(depths)
        levels: list[nn.Module] = []
        prev = in_chans
        for w, d in zip(widths, depths):
            blocks = (ResidualConvBlock(w, zero_init=zero_init_residual) for _ in range(d - 1))
            levels.append(nn.Sequential(ConvBNReLU(prev, w, stride=2), *blocks))
            prev = w
        self.levels = nn.ModuleList(levels)
        self.proj = nn.Conv2d(prev, embed_dim, 1)

    @property
    def stride(self) -> int:
        return 2 ** len(self.widths)

    def level_channels(self, stride: int) -> int:
        """Channels of the level whose output has ``stride`` (2, 4, ... up to :attr:`stride`)."""
        strides = [2 ** (i + 1) for i in range(len(self.widths))]
        if stride not in strides:
            raise ValueError(f"the trunk's levels have strides {strides}, not {stride}")
        return self.widths[strides.index(stride)]

    def forward(self, images: torch.Tensor, return_stride: int | None = None):
        """``[B, C, H/p, W/p]``; with ``return_stride=s`` also the output of the level at stride ``s``:
        ``(token_map, level_map [B, C_s, H/s, W/s])``."""
        feat, level = images, None
        for i, lv in enumerate(self.levels):
            feat = lv(feat)
            if return_stride == 2 ** (i + 1):
                level = feat
        out = self.proj(feat)  # [B, C, H/p, W/p]
        if return_stride is None:
            return out
        if level is None:
            self.level_channels(return_stride)  # raises naming the strides
        return out, level


class FineTokens(nn.Module):
    """Tokens on a grid ``factor`` times finer than the transformer's, for the first grouping block.

    The transformer blocks run on the coarse ``h x w`` grid (cheap); the grouping block then assigns
    ``(h f) x (w f)`` tokens: the coarse token of each cell (nearest upsampling) plus a LayerNorm-ed
    1x1 projection of the convolutional trunk's features at that finer stride -- a U-Net skip
    connection, so that the assignment maps resolve object outlines ``f`` times more finely than the
    tokens (the 8x8 grid of a 64-pixel image caps a perfect segmenter at 0.81 mIoU on SynthShapes'
    eval split, 16x16 at 0.93: ``docs/investigation/LOG.md``, session 3).

    The skip features travel in *patch-major* layout ``[B, L, f*f*C]`` (the ``f x f`` sub-tokens of
    each coarse patch side by side in one row), so that patch mixing moves them with their patch:
    ``mix(skip, plan)`` is the skip of the mixed images.
    """

    def __init__(self, in_ch: int, dim: int, factor: int) -> None:
        super().__init__()
        if factor < 2:
            raise ValueError(f"FineTokens needs a factor >= 2, got {factor}")
        self.factor = factor
        self.dim = dim
        self.proj = nn.Conv2d(in_ch, dim, 1)
        self.norm = nn.LayerNorm(dim)

    def skip(self, level: torch.Tensor) -> torch.Tensor:
        """Trunk level ``[B, C_s, h f, w f]`` -> patch-major skip ``[B, h*w, f*f*C]``."""
        f = self.factor
        z = self.proj(level)  # [B, C, h f, w f]
        B, C, H, W = z.shape
        z = z.reshape(B, C, H // f, f, W // f, f).permute(0, 2, 4, 3, 5, 1)  # [B, h, w, f, f, C]
        return z.reshape(B, (H // f) * (W // f), f * f * C)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Coarse tokens ``x [B, h*w, C]`` + skip ``[B, h*w, f*f*C]`` -> fine tokens ``[B, (h f)(w f), C]``
        in row-major order of the fine grid."""
        h, w = grid
        f, C = self.factor, self.dim
        B, L, _ = x.shape
        if L != h * w or skip.shape != (B, L, f * f * C):
            raise ValueError(
                f"FineTokens: tokens {tuple(x.shape)} and skip {tuple(skip.shape)} do not fit the grid {h}x{w} "
                f"(expected skip [{B}, {h * w}, {f * f * C}])"
            )
        fine = self.norm(skip.reshape(B, h, w, f, f, C))  # [B, h, w, f, f, C]
        fine = fine + x.reshape(B, h, w, 1, 1, C)
        return fine.permute(0, 1, 3, 2, 4, 5).reshape(B, h * f * w * f, C)  # [B, (h f)(w f), C]
