"""GroupViT image encoder: patch embedding, stages of transformer blocks with group tokens, and
grouping blocks that merge tokens into fewer and fewer segment tokens (196 -> 64 -> 8 by default).

Stage ``i`` runs its blocks on ``[tokens; group tokens]`` (``[B, L + S_i, C]``), splits the group
tokens off and, except for the last stage, groups the tokens into ``num_output_groups[i]`` segment
tokens. From the second stage on the group tokens are a (zero-init) parameter plus a projection of
the previous stage's group tokens (after its blocks, before its grouping).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Block
from .grouping import GroupingBlock, TokenMlp
from .stem import ConvTrunk, FineTokens

__all__ = ["PatchEmbed", "GroupProjector", "GroupViTStage", "GroupViTVisionEncoder", "interpolate_pos_embed"]


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    t = tuple(int(v) for v in x)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {x!r}")
    return t  # type: ignore[return-value]


def interpolate_pos_embed(
    pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Bicubic resize of a ``[1, h*w, C]`` position embedding from ``src_grid`` to ``dst_grid``.

    Returns the input unchanged when the grids are equal (align_corners=False otherwise).
    """
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    h0, w0 = src_grid
    C = pos_embed.shape[-1]
    if pos_embed.shape[1] != h0 * w0:
        raise ValueError(f"position embedding has {pos_embed.shape[1]} positions, not {h0}x{w0}")
    grid = pos_embed.reshape(1, h0, w0, C).permute(0, 3, 1, 2)  # [1, C, h0, w0]
    grid = F.interpolate(grid.float(), size=tuple(dst_grid), mode="bicubic", align_corners=False)
    return grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, C)  # [1, h*w, C]


def init_linear_and_norm(m: nn.Module) -> None:
    """GroupViT's init of one module (use with ``Module.apply``): trunc-normal(0.02) Linear
    weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


STEMS = ("patch", "conv", "hybrid")


class PatchEmbed(nn.Module):
    """Image -> patch tokens, then LayerNorm.

    ``stem="patch"`` (GroupViT, ViT): non-overlapping patches, ``Conv2d(kernel = stride = patch)``.
    ``stem="conv"`` (Xiao et al. 2021, "Early convolutions help transformers see better"): log2(p)
    3x3 stride-2 convolutions with BatchNorm + ReLU (widths C/2^(n-1) .. C) and a 1x1 projection;
    each token then sees a little past its own patch (receptive field 2p - 1 pixels). Needs a
    power-of-2 patch size.
    ``stem="hybrid"``: a :class:`~mixreorg.nn.stem.ConvTrunk` (residual 3x3 convolutions with
    BatchNorm, ``stem_widths`` channels per stride-2 level, ``stem_depths`` convolutions per level;
    defaults ``(32, 64, ...)`` and 2 per level) and a 1x1 projection, the R50+ViT hybrid of the ViT
    paper at a tiny scale. Needs a square power-of-2 patch size of ``2 ** len(stem_widths)``.

    ``forward(images [B, C_in, H, W]) -> (tokens [B, H/p * W/p, C], (H/p, W/p))``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        stem: str = "patch",
        stem_widths: Sequence[int] | None = None,
        stem_depths: Sequence[int] | None = None,
        stem_zero_init: bool | None = None,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.in_chans = in_chans
        self.stem = stem
        for s, p, name in zip(self.img_size, self.patch_size, ("height", "width")):
            if s % p != 0:
                raise ValueError(f"image {name} {s} is not divisible by the patch size {p}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if stem != "hybrid" and (stem_widths is not None or stem_depths is not None or stem_zero_init is not None):
            raise ValueError(
                f"stem_widths / stem_depths / stem_zero_init configure stem='hybrid' only, got stem={stem!r}"
            )
        if stem == "patch":
            self.proj: nn.Module = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        elif stem == "conv":
            ph, pw = self.patch_size
            if ph != pw or ph < 2 or ph & (ph - 1):
                raise ValueError(f"stem='conv' needs a square power-of-2 patch size, got {ph}x{pw}")
            n = ph.bit_length() - 1  # stride-2 convolutions
            widths = [max(embed_dim >> (n - 1 - i), 8) for i in range(n)]
            layers: list[nn.Module] = []
            prev = in_chans
            for w in widths:
                layers += [nn.Conv2d(prev, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True)]
                prev = w
            layers.append(nn.Conv2d(prev, embed_dim, 1))
            self.proj = nn.Sequential(*layers)
        elif stem == "hybrid":
            ph, pw = self.patch_size
            if ph != pw or ph < 2 or ph & (ph - 1):
                raise ValueError(f"stem='hybrid' needs a square power-of-2 patch size, got {ph}x{pw}")
            n = ph.bit_length() - 1
            widths = list(stem_widths) if stem_widths is not None else [min(32 << i, embed_dim) for i in range(n)]
            if len(widths) != n:
                raise ValueError(
                    f"stem='hybrid' with patch size {ph} needs {n} stem_widths (one per stride-2 level), got {widths}"
                )
            depths = list(stem_depths) if stem_depths is not None else [2] * n
            zero_init = True if stem_zero_init is None else bool(stem_zero_init)
            self.proj = ConvTrunk(in_chans, embed_dim, widths, depths, zero_init_residual=zero_init)
        else:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        self.norm = nn.LayerNorm(embed_dim)

    def grid_for(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(H/p, W/p)`` of ``images``; ValueError on a bad shape or size."""
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] != self.in_chans:
            raise ValueError(f"images have {images.shape[1]} channels, the model expects {self.in_chans}")
        H, W = images.shape[-2:]
        ph, pw = self.patch_size
        if H % ph != 0 or W % pw != 0:
            raise ValueError(
                f"image size {H}x{W} is not divisible by the patch size {ph}x{pw}: resize or pad the "
                f"images to a multiple of the patch size"
            )
        return (H // ph, W // pw)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.grid_for(images)
        x = self.proj(images).flatten(2).transpose(1, 2)  # [B, L, C]
        return self.norm(x), grid

    def forward_with_level(
        self, images: torch.Tensor, stride: int
    ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        """``(tokens [B, L, C], grid, level [B, C_s, H/s, W/s])``: also the hybrid trunk's feature map at
        ``stride`` (for :class:`~mixreorg.nn.stem.FineTokens`)."""
        if not isinstance(self.proj, ConvTrunk):
            raise ValueError(f"only stem='hybrid' has intermediate feature levels, this stem is {self.stem!r}")
        grid = self.grid_for(images)
        out, level = self.proj(images, return_stride=stride)
        return self.norm(out.flatten(2).transpose(1, 2)), grid, level


class GroupProjector(nn.Module):
    """Previous stage's group tokens ``[B, S_prev, C]`` -> ``[B, S, C]``: LayerNorm + token MLP."""

    def __init__(self, dim: int, num_prev: int, num_out: int, hidden: int | None = None, act: str = "gelu") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = TokenMlp(num_prev, dim // 2 if hidden is None else hidden, num_out, act=act)

    def forward(self, prev_groups: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(prev_groups))


class GroupViTStage(nn.Module):
    """One GroupViT stage: blocks on ``[tokens; group tokens]`` then an optional grouping block.

    Attributes: ``group_token`` (``[1, S, C]`` parameter or None), ``group_projector``
    (:class:`GroupProjector` or None), ``blocks`` (``ModuleList`` of :class:`Block`), ``downsample``
    (:class:`GroupingBlock` or None).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        num_group_tokens: int,
        num_prev_group_tokens: int,
        num_output_groups: int | None,
        drop_path: Sequence[float],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        hard_assignment: bool = True,
        gumbel: bool = True,
        gumbel_tau: float = 1.0,
        assign_eps: float = 1.0,
        assign_mlp_ratio: tuple[float, float] = (0.5, 4.0),
        cross_attn_mlp_ratio: float = 4.0,
        act: str = "gelu",
        use_checkpoint: bool = False,
        attn_backend: str = "sdpa",
        assign_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.num_group_tokens = num_group_tokens
        self.use_checkpoint = use_checkpoint
        if num_group_tokens > 0:
            self.group_token = nn.Parameter(torch.zeros(1, num_group_tokens, dim))
        else:
            self.register_parameter("group_token", None)
        if num_group_tokens > 0 and num_prev_group_tokens > 0:
            self.group_projector: GroupProjector | None = GroupProjector(
                dim, num_prev_group_tokens, num_group_tokens, act=act
            )
        else:
            self.group_projector = None
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path[j],
                act=act,
                backend=attn_backend,
            )
            for j in range(depth)
        )
        if num_output_groups is not None:
            self.downsample: GroupingBlock | None = GroupingBlock(
                dim,
                num_heads,
                num_group_tokens,
                num_output_groups,
                assign_mlp_ratio=assign_mlp_ratio,
                cross_attn_mlp_ratio=cross_attn_mlp_ratio,
                qkv_bias=qkv_bias,
                hard=hard_assignment,
                gumbel=gumbel,
                tau=gumbel_tau,
                assign_eps=assign_eps,
                act=act,
                attn_backend=attn_backend,
                assign_impl=assign_impl,
            )
        else:
            self.downsample = None

    def init_group_tokens(self, batch: int, prev_group_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """This stage's group tokens ``[B, S, C]`` (None if it has none)."""
        if self.group_token is None:
            return None
        g = self.group_token.expand(batch, -1, -1)
        if self.group_projector is not None:
            if prev_group_tokens is None:
                raise ValueError("this stage projects the previous stage's group tokens: pass them")
            g = g + self.group_projector(prev_group_tokens)
        return g

    def run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one block on ``x``, under activation checkpointing when ``use_checkpoint`` is on."""
        if self.use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_blocks(
        self, x: torch.Tensor, group_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the blocks on ``[x; group_tokens]``; return ``(x [B, L, C], group_tokens [B, S, C])``."""
        L = x.shape[1]
        h = x if group_tokens is None else torch.cat([x, group_tokens], dim=1)  # [B, L + S, C]
        for blk in self.blocks:
            h = self.run_block(blk, h)
        if group_tokens is None:
            return h, None
        return h[:, :L], h[:, L:]

    def group(self, x: torch.Tensor, group_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grouping block: ``(segment tokens [B, S_out, C], hard [B, S_out, L], soft [B, S_out, L])``."""
        if self.downsample is None:
            raise ValueError("this stage has no grouping block (it is the last stage)")
        return self.downsample(x, group_tokens)

    def forward(
        self, x: torch.Tensor, prev_group_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(x_out, group_tokens_after_blocks, hard, soft)``; maps are None without grouping."""
        g = self.init_group_tokens(x.shape[0], prev_group_tokens)
        x, g = self.forward_blocks(x, g)
        if self.downsample is None:
            return x, g, None, None
        out, hard, soft = self.group(x, g)
        return out, g, hard, soft


def _check_stage_layout(
    depths: list[int], num_group_tokens: list[int], num_output_groups: list[int], embed_dim: int, num_heads: int
) -> None:
    """Refuse stage lists that do not describe a GroupViT (one grouping block between consecutive
    stages, none after the last) before any module is built."""
    n = len(depths)
    if n < 1 or any(d < 0 for d in depths):
        raise ValueError(f"depths must be a non-empty list of non-negative ints, got {depths}")
    if len(num_group_tokens) != n:
        raise ValueError(f"num_group_tokens needs one value per stage ({n}), got {num_group_tokens}")
    if len(num_output_groups) != n - 1:
        raise ValueError(f"num_output_groups needs one value per grouping stage ({n - 1}), got {num_output_groups}")
    if num_group_tokens[-1] != 0:
        raise ValueError(
            f"the last stage has no grouping block: num_group_tokens[-1] must be 0, got {num_group_tokens}"
        )
    if any(s <= 0 for s in num_group_tokens[:-1]) or any(s <= 0 for s in num_output_groups):
        raise ValueError(
            f"every grouping stage needs > 0 group tokens and output groups, got {num_group_tokens} / "
            f"{num_output_groups}"
        )
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")


def _build_stages(
    dim: int,
    num_heads: int,
    depths: list[int],
    num_group_tokens: list[int],
    num_output_groups: list[int],
    drop_path_rate: float,
    shared: dict,
) -> list[GroupViTStage]:
    """The stages, each fed the previous one's group-token count; ``shared``: the
    :class:`GroupViTStage` options common to all stages.

    Stochastic depth rises linearly from 0 to ``drop_path_rate`` over all blocks of all stages
    (not per stage), as in GroupViT.
    """
    n = len(depths)
    total = sum(depths)
    dpr = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]
    stages = []
    start = 0
    for i in range(n):
        stages.append(
            GroupViTStage(
                dim,
                depths[i],
                num_heads,
                num_group_tokens=num_group_tokens[i],
                num_prev_group_tokens=num_group_tokens[i - 1] if i > 0 else 0,
                num_output_groups=num_output_groups[i] if i < n - 1 else None,
                drop_path=dpr[start : start + depths[i]],
                **shared,
            )
        )
        start += depths[i]
    return stages


class GroupViTVisionEncoder(nn.Module):
    """Configurable GroupViT image encoder (defaults: GroupViT-S, 224 px, patch 16, width 384).

    Args:
        img_size: training image size (int or (H, W)); other sizes divisible by the patch size
            work too, with a bicubic-interpolated position embedding.
        patch_size: patch size p.
        in_chans: input channels.
        embed_dim: width C.
        num_heads: attention heads (all stages).
        depths: blocks per stage.
        num_group_tokens: group tokens per stage (last stage: 0).
        num_output_groups: segment tokens out of each grouping block (``len(depths) - 1`` values).
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate: block options.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        hard_assignment: one-hot (straight-through) assignment; gumbel: Gumbel noise in training.
        gumbel_tau, assign_eps, assign_mlp_ratio: grouping options (GroupViT: 1, 1, (0.5, 4)).
        cross_attn_mlp_ratio: MLP ratio of the grouping blocks' cross-attention (None: ``mlp_ratio``,
            as Hugging Face; NVlabs fixes it at 4, the same value at the default ``mlp_ratio``).
        act: MLP activation (``"gelu"``).
        use_checkpoint: activation checkpointing of every block (``torch.utils.checkpoint``).
        attn_backend: ``"sdpa" | "xformers" | "auto"``; assign_impl: ``gumbel_assign`` backend.
        stem: ``"patch"`` (GroupViT's linear patch embedding), ``"conv"`` (a convolutional stem) or
            ``"hybrid"`` (a residual convolutional trunk), see :class:`PatchEmbed`; stem_widths /
            stem_depths: the hybrid trunk's channels and convolutions per stride-2 level;
            stem_zero_init: its residual blocks start as the identity (None / True, the default) or at
            full strength (False: learns the shapes faster from image-level labels, see
            :class:`~mixreorg.nn.stem.ConvTrunk`).
        group_patch_size: patch size of the tokens the FIRST grouping block assigns (None: ``patch_size``).
            Smaller than ``patch_size`` (hybrid stem only): the blocks run on the ``patch_size`` grid and
            the grouping on a grid ``patch_size / group_patch_size`` times finer, built by
            :class:`~mixreorg.nn.stem.FineTokens` from the trunk's features at that stride (the
            assignment maps and ``grid`` of the output are then on the fine grid).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        num_heads: int = 6,
        depths: Sequence[int] = (6, 3, 3),
        num_group_tokens: Sequence[int] = (64, 8, 0),
        num_output_groups: Sequence[int] = (64, 8),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        hard_assignment: bool = True,
        gumbel: bool = True,
        gumbel_tau: float = 1.0,
        assign_eps: float = 1.0,
        assign_mlp_ratio: Sequence[float] = (0.5, 4.0),
        cross_attn_mlp_ratio: float | None = None,
        act: str = "gelu",
        use_checkpoint: bool = False,
        attn_backend: str = "sdpa",
        assign_impl: str = "auto",
        stem: str = "patch",
        stem_widths: Sequence[int] | None = None,
        stem_depths: Sequence[int] | None = None,
        stem_zero_init: bool | None = None,
        group_patch_size: int | None = None,
    ) -> None:
        super().__init__()
        depths, num_group_tokens, num_output_groups = list(depths), list(num_group_tokens), list(num_output_groups)
        _check_stage_layout(depths, num_group_tokens, num_output_groups, embed_dim, num_heads)
        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.num_group_tokens = tuple(num_group_tokens)
        self.num_output_groups = tuple(num_output_groups)

        # registration order (patch_embed, pos_embed, fine_tokens, pos_drop, stages, norm) is the
        # state_dict order and the order of the random initialisation: checkpoints depend on it
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, stem=stem, stem_widths=stem_widths, stem_depths=stem_depths,
            stem_zero_init=stem_zero_init,
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.fine_tokens: FineTokens | None = None
        self._set_group_grid(group_patch_size, stem, len(depths))
        self.pos_drop = nn.Dropout(drop_rate)
        shared = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            hard_assignment=hard_assignment,
            gumbel=gumbel,
            gumbel_tau=gumbel_tau,
            assign_eps=assign_eps,
            assign_mlp_ratio=tuple(assign_mlp_ratio),
            cross_attn_mlp_ratio=mlp_ratio if cross_attn_mlp_ratio is None else cross_attn_mlp_ratio,
            act=act,
            use_checkpoint=use_checkpoint,
            attn_backend=attn_backend,
            assign_impl=assign_impl,
        )
        self.stages = nn.ModuleList(
            _build_stages(embed_dim, num_heads, depths, num_group_tokens, num_output_groups, drop_path_rate, shared)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.reset_parameters()

    def _set_group_grid(self, group_patch_size: int | None, stem: str, num_stages: int) -> None:
        """``self.group_patch_size`` and, when it is finer than the patch size, ``self.fine_tokens``
        (the module that builds the first grouping's finer token grid from the hybrid trunk)."""
        p = self.patch_embed.patch_size[0]
        self.group_patch_size = p if group_patch_size is None else int(group_patch_size)
        if self.group_patch_size != p:
            g = self.group_patch_size
            if stem != "hybrid":
                raise ValueError(f"group_patch_size={g} (finer than patch_size={p}) needs stem='hybrid', got {stem!r}")
            if num_stages < 2:
                raise ValueError("group_patch_size < patch_size needs a grouping stage (at least two stages)")
            if g < 2 or g >= p or p % g:
                raise ValueError(f"group_patch_size must divide patch_size={p} and be in [2, {p}), got {g}")
            self.fine_tokens = FineTokens(self.patch_embed.proj.level_channels(g), self.embed_dim, p // g)

    # ------------------------------------------------------------------ set-up
    def reset_parameters(self) -> None:
        """GroupViT init: trunc-normal(0.02) Linear weights and position embedding, zero biases,
        unit LayerNorms, trunc-normal first-stage group tokens, zero projected group tokens."""

        self.apply(init_linear_and_norm)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for st in self.stages:
            if st.group_token is not None:
                if st.group_projector is None:
                    nn.init.trunc_normal_(st.group_token, std=0.02)
                else:
                    nn.init.zeros_(st.group_token)

    @property
    def width(self) -> int:
        """Channel width C of the output tokens."""
        return self.embed_dim

    @property
    def use_checkpoint(self) -> bool:
        """Activation checkpointing of the transformer blocks (settable)."""
        return all(st.use_checkpoint for st in self.stages)

    @use_checkpoint.setter
    def use_checkpoint(self, flag: bool) -> None:
        for st in self.stages:
            st.use_checkpoint = bool(flag)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be weight-decayed (position embedding, group tokens)."""
        names = {"pos_embed"}
        names |= {f"stages.{i}.group_token" for i, st in enumerate(self.stages) if st.group_token is not None}
        return names

    # ------------------------------------------------------------------ pieces
    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embedding ``[1, h*w, C]`` for a patch grid (bicubic-interpolated if needed)."""
        return interpolate_pos_embed(self.pos_embed, self.patch_embed.grid_size, grid)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C_in, H, W] -> tokens [B, L, C]`` with position embedding (and dropout)."""
        x, grid = self.patch_embed(images)  # [B, L, C]
        return self.pos_drop(x + self.pos_embed_for(grid))

    @property
    def fine_factor(self) -> int:
        """How many times finer the first grouping's grid is than the token grid (1: the same)."""
        return 1 if self.fine_tokens is None else self.fine_tokens.factor

    def embed_with_skip(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`embed` plus the patch-major skip features ``[B, L, f*f*C]`` the first grouping block
        reads (None without ``group_patch_size``); mixing moves both with the same plan."""
        if self.fine_tokens is None:
            return self.embed(images), None
        x, grid, level = self.patch_embed.forward_with_level(images, self.group_patch_size)
        return self.pos_drop(x + self.pos_embed_for(grid)), self.fine_tokens.skip(level)

    def forward_stage(
        self, i: int, x: torch.Tensor, prev_group_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Stage ``i``: ``(x_out, group_tokens_after_blocks, hard, soft)`` (see GroupViTStage)."""
        if i == 0 and self.fine_tokens is not None:
            # the stage's grouping would assign the coarse tokens, not the fine grid it was trained on
            raise ValueError(
                "this encoder groups a finer grid (group_patch_size): run stage 0's blocks with "
                "stages[0].forward_blocks, then forward_from_stage_output(0, ..., skip=, grid=)"
            )
        return self.stages[i](x, prev_group_tokens)

    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final LayerNorm and average pool: ``(tokens [B, S, C], pooled [B, C])``."""
        x = self.norm(x)
        return x, x.mean(dim=1)

    def forward_from_stage_output(
        self,
        i: int,
        x: torch.Tensor,
        group_tokens: torch.Tensor | None,
        return_maps: bool = False,
        grid: tuple[int, int] | None = None,
        skip: torch.Tensor | None = None,
    ) -> dict:
        """Continue after the BLOCKS of stage ``i``: its grouping, stages ``i+1..``, norm and pool.

        ``x [B, L, C]`` and ``group_tokens [B, S_i, C]`` are stage ``i``'s outputs of
        :meth:`GroupViTStage.forward_blocks`. Returns the same dict as :meth:`forward` (only the
        maps of stages ``>= i``). With ``group_patch_size``, stage 0's grouping needs ``skip`` (from
        :meth:`embed_with_skip`) and ``grid``; the maps and the returned ``grid`` are the fine grid's.
        """
        hard_maps: list[torch.Tensor] = []
        soft_maps: list[torch.Tensor] = []
        fine = None
        if i == 0 and self.fine_tokens is not None:
            if skip is None or grid is None:
                raise ValueError(
                    "this encoder groups a finer grid (group_patch_size): pass skip= (embed_with_skip) and grid="
                )
            x = self.fine_tokens(x, skip, grid)  # [B, L*f*f, C]
            f = self.fine_tokens.factor
            grid = (grid[0] * f, grid[1] * f)
            fine = x
        st = self.stages[i]
        if st.downsample is not None:
            x, hard, soft = st.group(x, group_tokens)
            hard_maps.append(hard)
            soft_maps.append(soft)
        prev = group_tokens
        for j in range(i + 1, len(self.stages)):
            x, prev, hard, soft = self.stages[j](x, prev)
            if hard is not None:
                hard_maps.append(hard)
                soft_maps.append(soft)
        tokens, pooled = self.head(x)
        out = {
            "tokens": tokens,
            "pooled": pooled,
            "hard_maps": hard_maps if return_maps else [],
            "soft_maps": soft_maps if return_maps else [],
            "grid": grid,
        }
        if fine is not None:
            out["fine_tokens"] = fine  # [B, L*f*f, C] what the first grouping assigned, on `grid`
        return out

    def forward_from_stage1_output(
        self,
        x: torch.Tensor,
        group_tokens: torch.Tensor,
        return_maps: bool = False,
        grid: tuple[int, int] | None = None,
        skip: torch.Tensor | None = None,
    ) -> dict:
        """Hand-off for encoders that run the first stage's blocks themselves (MixReorg).

        Typical use: ``x = enc.embed(images)``; ``g = enc.stages[0].init_group_tokens(B)``;
        run ``enc.stages[0].blocks`` on ``[x; g]`` (or :meth:`GroupViTStage.forward_blocks`);
        then ``enc.forward_from_stage1_output(x, g)``.
        """
        return self.forward_from_stage_output(0, x, group_tokens, return_maps=return_maps, grid=grid, skip=skip)

    def forward(self, images: torch.Tensor, return_maps: bool = False) -> dict:
        """Encode images.

        Returns a dict: ``tokens [B, S_final, C]`` (after the final norm), ``pooled [B, C]``,
        ``hard_maps`` / ``soft_maps`` (lists of ``[B, S_i, N_i]``, one per grouping stage, empty
        unless ``return_maps``), ``grid`` (the patch grid ``(H/p, W/p)``) and ``stage1_tokens
        [B, L, C]`` (the first stage's patch tokens after its blocks, before any grouping: what
        per-patch losses read; no extra compute) and ``embed_tokens [B, L, C]`` (the embedded patches
        with their positions, before any block: local features, for a per-patch loss that must stay
        local). With ``group_patch_size`` also ``fine_tokens [B, L*f*f, C]``: the fine-grid tokens the
        first grouping assigned, in row-major order of the returned ``grid``.
        """
        grid = self.patch_embed.grid_for(images)
        x, g, x0, skip = self.forward_stage1_blocks(images)
        out = self.forward_from_stage_output(0, x, g, return_maps=return_maps, grid=grid, skip=skip)
        out["stage1_tokens"], out["embed_tokens"] = x, x0
        return out

    def forward_stage1_blocks(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Embedding and the first stage's blocks, no grouping: ``(patch tokens [B, L, C], group
        tokens [B, S, C], embedded patches [B, L, C], skip features or None)``."""
        x0, skip = self.embed_with_skip(images)
        x, g = self.stages[0].forward_blocks(x0, self.stages[0].init_group_tokens(x0.shape[0]))
        return x, g, x0, skip
