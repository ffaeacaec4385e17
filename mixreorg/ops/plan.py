"""``MixPlan``: which image every patch of every mixed image comes from.

The batch is split into ``B // G`` groups of ``G`` images. For every group ``g`` and every patch
position ``p`` a permutation ``pi_p`` of the group's images is drawn:

    mixed[g*G + m, p]    = x[g*G + pi_p(m), p]        labels[g*G + m, p] = pi_p(m)
    restored[g*G + i, p] = mixed[g*G + pi_p^-1(i), p]

Positions are kept, so position embeddings stay valid, and because each position uses a
permutation the map is a bijection: every patch of every source image appears exactly once among
the ``G`` mixed images of its group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["MixPlan"]


@dataclass(frozen=True, eq=False)
class MixPlan:
    """A batch-wide patch permutation and its inverse.

    Attributes:
        src: ``[B, L]`` int64, global batch row each mixed patch is read from.
        inv: ``[B, L]`` int64, global batch row each restored patch is read from (the inverse).
        labels: ``[B, L]`` int64 in ``[0, G)``, index within the group of the source image.
        group_size: ``G``.
        grid: ``(H, W)`` patch grid with ``H * W == L``.
    """

    src: torch.Tensor
    inv: torch.Tensor
    labels: torch.Tensor
    group_size: int
    grid: tuple[int, int]
    _rows: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        batch_size: int,
        num_patches: int,
        group_size: int = 16,
        *,
        grid: tuple[int, int] | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> MixPlan:
        """Draw a random plan.

        The permutations are drawn on CPU from ``generator`` (or a fresh one seeded with
        ``seed``; or torch's global RNG when both are None) and then moved to ``device``, so the
        same seed gives the same plan on every device.
        """
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"MixPlan: group_size must be an integer >= 1, got {group_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"MixPlan: batch_size must be an integer >= 1, got {batch_size!r}")
        if batch_size % group_size != 0:
            raise ValueError(
                f"MixPlan: batch size {batch_size} is not divisible by group size {group_size}; "
                f"use a batch that is a multiple of {group_size} or a group size dividing it"
            )
        if not isinstance(num_patches, int) or num_patches < 1:
            raise ValueError(f"MixPlan: num_patches must be an integer >= 1, got {num_patches!r}")
        grid = cls._check_grid(grid, num_patches)
        if seed is not None and generator is not None:
            raise ValueError("MixPlan: give either seed or generator, not both")
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        n_groups = batch_size // group_size
        # pi[g, p, m] = pi_p(m) for group g: one random permutation per (group, position)
        keys = torch.rand(n_groups, num_patches, group_size, generator=generator)
        pi = keys.argsort(dim=-1)  # [nG, L, G]
        return cls.from_permutation(pi, grid=grid, device=device)

    @classmethod
    def from_permutation(
        cls,
        pi: torch.Tensor,
        *,
        grid: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> MixPlan:
        """Build a plan from explicit permutations ``pi: [num_groups, L, G]`` (``pi[g, p, m]``
        is the in-group index of the image that mixed image ``m`` takes patch ``p`` from)."""
        if pi.dim() != 3:
            raise ValueError(f"MixPlan: permutations must be [num_groups, L, G], got shape {tuple(pi.shape)}")
        n_groups, num_patches, group_size = pi.shape
        pi = pi.to(torch.int64)
        expected = torch.arange(group_size, device=pi.device).expand_as(pi)
        if not torch.equal(pi.sort(dim=-1).values, expected):
            raise ValueError("MixPlan: every pi[g, p, :] must be a permutation of 0..G-1")
        grid = cls._check_grid(grid, num_patches)
        inv_pi = pi.argsort(dim=-1)  # inv_pi[g, p, pi[g, p, m]] = m
        base = (torch.arange(n_groups, device=pi.device) * group_size).view(n_groups, 1, 1)
        # [nG, L, G] -> [nG, G, L] -> [B, L]
        labels = pi.permute(0, 2, 1).reshape(n_groups * group_size, num_patches)
        src = (pi + base).permute(0, 2, 1).reshape(n_groups * group_size, num_patches)
        inv = (inv_pi + base).permute(0, 2, 1).reshape(n_groups * group_size, num_patches)
        return cls(
            src=src.contiguous().to(device),
            inv=inv.contiguous().to(device),
            labels=labels.contiguous().to(device),
            group_size=group_size,
            grid=grid,
        )

    @staticmethod
    def _check_grid(grid: tuple[int, int] | None, num_patches: int) -> tuple[int, int]:
        if grid is None:
            side = math.isqrt(num_patches)
            if side * side == num_patches:
                return (side, side)
            return (1, num_patches)
        h, w = (int(v) for v in grid)
        if h * w != num_patches:
            raise ValueError(f"MixPlan: grid {grid} has {h * w} cells but there are {num_patches} patches")
        return (h, w)

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self.src.shape[0]

    @property
    def num_patches(self) -> int:
        return self.src.shape[1]

    @property
    def num_groups(self) -> int:
        return self.batch_size // self.group_size

    @property
    def device(self) -> torch.device:
        return self.src.device

    def to(self, device: torch.device | str) -> MixPlan:
        """The same plan on another device."""
        return MixPlan(
            src=self.src.to(device),
            inv=self.inv.to(device),
            labels=self.labels.to(device),
            group_size=self.group_size,
            grid=self.grid,
        )

    def inverse(self) -> MixPlan:
        """The plan whose mix is this plan's restore (labels are then the restore sources)."""
        return MixPlan(
            src=self.inv,
            inv=self.src,
            labels=self.inv - (self.inv // self.group_size) * self.group_size,
            group_size=self.group_size,
            grid=self.grid,
        )

    def source_image(self) -> torch.Tensor:
        """``[B, L]`` global batch index of the image each mixed patch comes from (= ``src``)."""
        return self.src

    def label_grid(self) -> torch.Tensor:
        """Labels on the patch grid: ``[B, H, W]``."""
        return self.labels.view(self.batch_size, *self.grid)

    def pixel_labels(self, patch_size: int | tuple[int, int]) -> torch.Tensor:
        """Labels upsampled to pixels: ``[B, H * ph, W * pw]`` (nearest, patch-constant)."""
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        grid = self.label_grid()
        return grid.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)

    def rows(self, seq_len: int, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat row tables ``(rows, inv_rows)``, each ``[B * seq_len]`` int64, for a
        ``[B, seq_len, C]`` sequence whose patch span starts at token ``prefix``: the gather
        ``out.row[r] = x.row[rows[r]]`` is :func:`mix`, ``inv_rows`` gives :func:`restore`; rows
        outside the span map to themselves. Built once per layout and cached on the plan."""
        key = (int(seq_len), int(prefix))
        tables = self._rows.get(key)
        if tables is None:
            B, Lp = self.src.shape
            if prefix < 0 or prefix + Lp > seq_len:
                raise ValueError(f"MixPlan.rows: a span of {Lp} patches at token {prefix} does not fit "
                                 f"a sequence of {seq_len} tokens")
            dev = self.src.device
            t = torch.arange(seq_len, device=dev)
            ident = torch.arange(B, device=dev).view(B, 1) * seq_len + t.view(1, seq_len)  # [B, L]
            span = t[prefix : prefix + Lp].view(1, Lp)
            tables = []
            for index in (self.src, self.inv):
                r = ident.clone()
                r[:, prefix : prefix + Lp] = index * seq_len + span
                tables.append(r.reshape(-1))
            tables = tuple(tables)
            self._rows[key] = tables
        return tables

    def validate_for(self, x: torch.Tensor, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0,
                     op: str = "mix") -> None:
        """Raise ``ValueError`` naming the problem if ``x`` does not fit this plan."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{op}: expected a tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{op}: expected tokens of shape [B, L, C] (rank 3), got rank {x.dim()} "
                             f"with shape {tuple(x.shape)}")
        if num_prefix_tokens < 0 or num_suffix_tokens < 0:
            raise ValueError(f"{op}: num_prefix_tokens and num_suffix_tokens must be >= 0")
        B, L, _ = x.shape
        if B != self.batch_size:
            raise ValueError(f"{op}: the plan was made for batch size {self.batch_size}, "
                             f"the tensor has batch size {B}")
        span = L - num_prefix_tokens - num_suffix_tokens
        if span != self.num_patches:
            raise ValueError(
                f"{op}: the plan was made for {self.num_patches} patch tokens, the tensor has {span} "
                f"(L={L} minus {num_prefix_tokens} prefix and {num_suffix_tokens} suffix tokens)"
            )
        if x.device != self.device:
            raise ValueError(f"{op}: the plan is on {self.device} but the tensor is on {x.device}; "
                             f"use plan.to(tensor.device)")
