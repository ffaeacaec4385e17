"""``MixedPatchMixer``: drop-in patch mixing for any ViT token sequence.

Usage (inside a ViT forward, after block k)::

    mixer = MixedPatchMixer(group_size=16, num_prefix_tokens=model.num_prefix_tokens)
    mixed, plan = mixer(tokens)            # [B, L, C], a fresh MixPlan
    ...                                    # more blocks on the mixed sequence
    restored = mixer.restore(mixed, plan)  # back to every image's own layout
    targets = plan.labels                  # [B, L_patches] in-group source index per patch

The module has no parameters. ``impl`` selects the backend per call ("auto" = Triton on CUDA when
importable, torch otherwise) and can be switched on the same instance (``mixer.impl = "torch"``).
"""

from __future__ import annotations

import warnings

import torch
from einops import rearrange
from torch import nn

from ..ops import patch_mix as _mix
from ..ops.plan import MixPlan

__all__ = ["MixedPatchMixer", "mix_images", "restore_images", "images_to_patches", "patches_to_images"]


class MixedPatchMixer(nn.Module):
    """Mix patch tokens across the images of each group of ``group_size`` images.

    Args:
        group_size: images per group ``G`` (paper default 16). ``G = 1`` is the identity.
        num_prefix_tokens: leading tokens that are never mixed (e.g. CLS, registers).
        num_suffix_tokens: trailing tokens that are never mixed (e.g. GroupViT's group tokens).
        grid: patch grid ``(H, W)``; default: square when the patch count is a square.
        impl: ``"auto" | "triton" | "torch"``.
    """

    def __init__(
        self,
        group_size: int = 16,
        *,
        num_prefix_tokens: int = 0,
        num_suffix_tokens: int = 0,
        grid: tuple[int, int] | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"MixedPatchMixer: group_size must be an integer >= 1, got {group_size!r}")
        if num_prefix_tokens < 0 or num_suffix_tokens < 0:
            raise ValueError("MixedPatchMixer: num_prefix_tokens and num_suffix_tokens must be >= 0")
        if group_size == 1:
            warnings.warn("MixedPatchMixer: group_size=1 makes mixing the identity", stacklevel=2)
        self.group_size = group_size
        self.num_prefix_tokens = num_prefix_tokens
        self.num_suffix_tokens = num_suffix_tokens
        self.grid = grid
        self.impl = impl

    def extra_repr(self) -> str:
        return (f"group_size={self.group_size}, num_prefix_tokens={self.num_prefix_tokens}, "
                f"num_suffix_tokens={self.num_suffix_tokens}, impl={self.impl!r}")

    def num_patches(self, tokens: torch.Tensor) -> int:
        if tokens.dim() != 3:
            raise ValueError(f"MixedPatchMixer: expected tokens [B, L, C], got shape {tuple(tokens.shape)}")
        n = tokens.shape[1] - self.num_prefix_tokens - self.num_suffix_tokens
        if n < 1:
            raise ValueError(
                f"MixedPatchMixer: sequence of length {tokens.shape[1]} has no patch tokens after "
                f"{self.num_prefix_tokens} prefix and {self.num_suffix_tokens} suffix tokens"
            )
        return n

    def make_plan(
        self,
        tokens: torch.Tensor,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> MixPlan:
        """A fresh plan for ``tokens: [B, L, C]`` on the tokens' device."""
        return MixPlan.create(
            tokens.shape[0],
            self.num_patches(tokens),
            self.group_size,
            grid=self.grid,
            seed=seed,
            generator=generator,
            device=tokens.device,
        )

    def _kw(self) -> dict:
        return dict(num_prefix_tokens=self.num_prefix_tokens, num_suffix_tokens=self.num_suffix_tokens,
                    impl=self.impl)

    def forward(
        self,
        tokens: torch.Tensor,
        plan: MixPlan | None = None,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, MixPlan]:
        """Mix ``tokens: [B, L, C]``; returns ``(mixed [B, L, C], plan)``. A given ``plan`` is
        reused (progressive mixing re-mixes with the same plan)."""
        if plan is None:
            plan = self.make_plan(tokens, seed=seed, generator=generator)
        elif plan.group_size != self.group_size:
            raise ValueError(f"MixedPatchMixer: plan has group size {plan.group_size}, "
                             f"the mixer {self.group_size}")
        return _mix.mix(tokens, plan, **self._kw()), plan

    def restore(self, tokens: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """Put every patch back into its own image: ``restore(mix(x)) == x``."""
        return _mix.restore(tokens, plan, **self._kw())

    def mix_add(self, y: torch.Tensor, x: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """Fused ``y + mix(x, plan)`` (progressive mixing)."""
        return _mix.mix_add(y, x, plan, **self._kw())


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _patch_hw(patch_size: int | tuple[int, int]) -> tuple[int, int]:
    return (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)


def images_to_patches(images: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/ph)*(W/pw), ph*pw*C]`` (row-major patch grid)."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    ph, pw = _patch_hw(patch_size)
    H, W = images.shape[-2:]
    if H % ph or W % pw:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {ph}x{pw}")
    return rearrange(images, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=ph, pw=pw)


def patches_to_images(patches: torch.Tensor, patch_size: int | tuple[int, int],
                      grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`images_to_patches`."""
    ph, pw = _patch_hw(patch_size)
    return rearrange(patches, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=grid[0], w=grid[1], ph=ph, pw=pw)


def _gather_images(images: torch.Tensor, plan: MixPlan, patch_size: int | tuple[int, int], impl: str,
                   op) -> torch.Tensor:
    ph, pw = _patch_hw(patch_size)
    H, W = images.shape[-2:]
    grid = (H // ph, W // pw)
    if tuple(plan.grid) != grid:
        raise ValueError(f"{op.__name__}_images: the plan's grid {plan.grid} does not match the image's patch grid "
                         f"{grid}")
    return patches_to_images(op(images_to_patches(images, patch_size), plan, impl=impl), patch_size, grid)


def mix_images(images: torch.Tensor, plan: MixPlan, patch_size: int | tuple[int, int],
               impl: str = "auto") -> torch.Tensor:
    """Mix raw images ``[B, C, H, W]`` patch-wise with ``plan`` (what the model's mixed branch
    "sees"; for pictures and for input-level mixing)."""
    return _gather_images(images, plan, patch_size, impl, _mix.mix)


def restore_images(images: torch.Tensor, plan: MixPlan, patch_size: int | tuple[int, int],
                   impl: str = "auto") -> torch.Tensor:
    """Inverse of :func:`mix_images`."""
    return _gather_images(images, plan, patch_size, impl, _mix.restore)
