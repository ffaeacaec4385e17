"""GroupViT's grouping: assign tokens to learnable groups and merge them into segment tokens.

:class:`AssignAttention` computes one-head logits ``q k^T / sqrt(C)`` between the groups
(queries, ``[B, S, C]``) and the tokens (``[B, N, C]``), assigns every token to one group over the
GROUP axis (Gumbel-softmax, hard straight-through, in training; argmax in eval; via
:func:`mixreorg.ops.assign.gumbel_assign`), averages the values of the tokens of each group and
projects them. :class:`GroupingBlock` wraps it with GroupViT's token-axis MLP and cross-attention.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.assign import gumbel_assign
from .attention import CrossAttnBlock, Mlp

__all__ = ["TokenMlp", "AssignAttention", "GroupingBlock", "unnormalise_assignment"]


class TokenMlp(Mlp):
    """MLP over the token axis (MLP-Mixer style): ``[B, S_in, C] -> [B, S_out, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def unnormalise_assignment(attn: torch.Tensor, eps: float) -> torch.Tensor:
    """Invert ``attn = A / (A.sum(-1, keepdim=True) + eps)`` and return ``A`` (``eps > 0``).

    With ``t = attn.sum(-1)`` one has ``A.sum(-1) + eps = eps / (1 - t)``, so
    ``A = attn * eps / (1 - t)``. The map is the exact inverse of the normalisation, so autograd
    through it reproduces the gradient of ``A`` itself (straight-through included). Computed in
    float32; ``1 - t >= eps / (N + eps)`` keeps it well conditioned for any token count N.
    """
    a = attn.float()
    denom = (1.0 - a.sum(dim=-1, keepdim=True)).clamp_min(torch.finfo(torch.float32).tiny)
    return a * (eps / denom)


class AssignAttention(nn.Module):
    """One-head assignment attention from groups (queries) to tokens (keys/values).

    Args:
        dim: channels C.
        qkv_bias: bias on the ``q`` and ``kv`` projections.
        hard: one-hot assignment (straight-through) instead of the softmax itself.
        gumbel: add Gumbel noise in training (never in eval).
        tau: Gumbel-softmax temperature.
        assign_eps: ``A / (A.sum(tokens) + eps)``: with ``eps = 1`` a group's output is about the
            mean of its tokens, and an empty group outputs 0. Must be > 0.
        impl: backend of :func:`gumbel_assign` (``"auto" | "triton" | "torch"``).

    ``forward(query [B, S, C], context [B, N, C], noise=None)`` returns
    ``(out [B, S, C], hard [B, S, N], soft [B, S, N])`` where ``hard`` is the assignment before the
    token normalisation (one-hot straight-through when ``hard=True``) and ``soft`` the plain
    softmax over groups without noise (for segmentation maps).
    """

    def __init__(
        self,
        dim: int,
        qkv_bias: bool = True,
        hard: bool = True,
        gumbel: bool = True,
        tau: float = 1.0,
        assign_eps: float = 1.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if assign_eps <= 0:
            raise ValueError(f"assign_eps must be > 0, got {assign_eps}")
        self.scale = dim**-0.5
        self.hard = hard
        self.gumbel = gumbel
        self.tau = tau
        self.assign_eps = assign_eps
        self.impl = impl
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.q(query)  # [B, S, C]
        k, v = self.kv(context).chunk(2, dim=-1)  # [B, N, C] each
        # logits in float32 (also under autocast): the arg-max, the Gumbel-softmax and the
        # normalisation (and its inversion for the hard map) are sensitive to rounding
        with torch.autocast(device_type=q.device.type, enabled=False):
            logits = torch.matmul(q.float(), k.float().transpose(-2, -1)) * self.scale  # [B, S, N]
        attn, soft = gumbel_assign(
            logits,
            tau=self.tau,
            hard=self.hard,
            gumbel=self.gumbel and self.training,
            eps=self.assign_eps,
            noise=noise,
            impl=self.impl,
        )
        hard_map = unnormalise_assignment(attn, self.assign_eps)  # [B, S, N]
        out = torch.matmul(attn.to(v.dtype), v)  # [B, S, C]
        return self.proj(out), hard_map, soft

    def extra_repr(self) -> str:
        return f"hard={self.hard}, gumbel={self.gumbel}, tau={self.tau}, assign_eps={self.assign_eps}"


class GroupingBlock(nn.Module):
    """GroupViT grouping block: ``S_in`` group tokens and N tokens -> ``S_out`` segment tokens.

    ``g = LN(group_mlp(LN(groups)))`` (token-axis MLP ``S_in -> ratio[0]*C -> S_out``);
    ``g = cross_attn(g, LN(x))`` (post-norm cross-attention block); ``(o, hard, soft) =
    assign(g, LN(x))``; ``o = o + g``; ``out = o + mlp(LN(o))`` (channel MLP, ``ratio[1]*C``).
    The cross-attention block's MLP has ``cross_attn_mlp_ratio * C`` hidden units (GroupViT: 4).

    ``forward(x [B, N, C], groups [B, S_in, C])`` returns ``(out [B, S_out, C], hard [B, S_out,
    N], soft [B, S_out, N])``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_group_tokens: int,
        num_output_groups: int,
        assign_mlp_ratio: tuple[float, float] = (0.5, 4.0),
        cross_attn_mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        hard: bool = True,
        gumbel: bool = True,
        tau: float = 1.0,
        assign_eps: float = 1.0,
        act: str = "gelu",
        attn_backend: str = "sdpa",
        assign_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.num_group_tokens = num_group_tokens
        self.num_output_groups = num_output_groups
        tokens_hidden, channels_hidden = (int(r * dim) for r in assign_mlp_ratio)
        self.norm_groups = nn.LayerNorm(dim)
        self.group_mlp = TokenMlp(num_group_tokens, tokens_hidden, num_output_groups, act=act)
        self.norm_group_mlp = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.cross_attn = CrossAttnBlock(
            dim,
            num_heads,
            mlp_ratio=cross_attn_mlp_ratio,
            qkv_bias=True,
            act=act,
            post_norm=True,
            backend=attn_backend,
        )
        self.assign = AssignAttention(
            dim,
            qkv_bias=qkv_bias,
            hard=hard,
            gumbel=gumbel,
            tau=tau,
            assign_eps=assign_eps,
            impl=assign_impl,
        )
        self.norm_out = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, channels_hidden, dim, act=act)

    def project_groups(self, groups: torch.Tensor) -> torch.Tensor:
        """``[B, S_in, C]`` (already normed) -> ``[B, S_out, C]`` output group queries."""
        return self.norm_group_mlp(self.group_mlp(groups))

    def forward(
        self, x: torch.Tensor, groups: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if groups.shape[1] != self.num_group_tokens:
            raise ValueError(f"grouping block expects {self.num_group_tokens} group tokens, got {groups.shape[1]}")
        groups = self.norm_groups(groups)  # [B, S_in, C]
        x = self.norm_x(x)  # [B, N, C]
        g = self.project_groups(groups)  # [B, S_out, C]
        g = self.cross_attn(g, x)
        out, hard, soft = self.assign(g, x, noise=noise)  # [B, S_out, C], [B, S_out, N] x2
        out = out + g
        out = out + self.mlp(self.norm_out(out))
        return out, hard, soft
