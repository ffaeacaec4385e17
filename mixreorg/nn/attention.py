"""Transformer building blocks shared by the GroupViT image and text encoders.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` (which picks a
flash / memory-efficient kernel on CUDA by itself); ``xformers`` is an optional CUDA backend
(``backend="xformers"``, or ``"auto"`` to use it when it is installed and the tensors are on CUDA).

Where a measurement showed SDPA's own kernel choice to be slow, :data:`SDPA_KERNELS` names the SDPA
kernel to use instead, per device type and dtype (:func:`sdpa_kernel_for`); today one entry: bf16 on
CPU runs SDPA's math kernel (see :data:`SDPA_KERNELS` for the numbers). Everything else (float32 on
CPU, every CUDA dtype) calls SDPA exactly as before.

Blocks are pre-LN (``x + attn(LN(x))``, ``x + mlp(LN(x))``) as in ViT/CLIP; :class:`CrossAttnBlock`
is GroupViT's post-norm cross-attention block used inside the grouping block.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ATTN_BACKENDS",
    "SDPA_KERNELS",
    "sdpa_kernel_for",
    "has_xformers",
    "QuickGELU",
    "make_act",
    "DropPath",
    "Mlp",
    "Attention",
    "CrossAttention",
    "Block",
    "CrossAttnBlock",
]

ATTN_BACKENDS = ("sdpa", "xformers", "auto")

# SDPA kernel per (device type, dtype) where SDPA's own choice measured slow; absent: SDPA chooses.
# ("cpu", bf16) -> "math", measured on the tiny recipe's train step (AVX512-BF16 EPYC, one thread;
# benchmarks/bench_step.py::test_cpu_bf16_attention_kernels, benchmarks/RESULTS.md): under bf16
# autocast SDPA's default CPU kernel (flash, whose bf16 backward is slow) gains 0.97-1.08x over
# float32, its math kernel (float32 softmax from bf16 inputs) 1.58-1.68x (GroupViT and MixReorg).
# float32 with the math kernel gains nothing (0.88-1.06x), so float32 keeps SDPA's choice and its
# bits; CUDA was not measured here and keeps SDPA's choice too. Benchmarks edit this dict to time
# the alternatives.
SDPA_KERNELS: dict[tuple[str, torch.dtype], str] = {("cpu", torch.bfloat16): "math"}


@functools.cache
def has_xformers() -> bool:
    """Whether ``xformers.ops.memory_efficient_attention`` can be imported (cached)."""
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # a broken install must not break the SDPA path
        return False
    return True


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(act: str) -> nn.Module:
    """Activation module by name: ``"gelu"`` (exact erf GELU) or ``"quick_gelu"``."""
    if act == "gelu":
        return nn.GELU()
    if act == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {act!r}: expected 'gelu' or 'quick_gelu'")


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``p`` (training only).

    Kept samples are rescaled by ``1 / (1 - p)`` so the expectation is unchanged.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # [B, 1, 1]
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Two-layer MLP over the last axis: ``fc2(drop(act(fc1(x))))``."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int | None = None,
        act: str = "gelu",
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


def sdpa_kernel_for(device: torch.device | str, dtype: torch.dtype) -> str:
    """The SDPA kernel :func:`_attend` uses for tensors of ``dtype`` on ``device``: ``"math"`` (SDPA's
    math kernel) or ``"default"`` (SDPA picks, as it does when called directly). From :data:`SDPA_KERNELS`."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return SDPA_KERNELS.get((device_type, dtype), "default")


def _check_backend(backend: str) -> str:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTN_BACKENDS}, got {backend!r}")
    return backend


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    dropout_p: float,
    backend: str,
) -> torch.Tensor:
    """Multi-head attention core on ``[B, H, N, D]`` tensors -> ``[B, H, N, D]``.

    Softmax scale is ``D ** -0.5``. ``backend="xformers"`` is a hard request (CUDA + xformers);
    ``"auto"`` uses xformers only where it can run and falls back to SDPA otherwise. The SDPA kernel
    is :func:`sdpa_kernel_for` the tensors' device and dtype.
    """
    use_xf = False
    if backend != "sdpa":
        reasons = []
        if not has_xformers():
            reasons.append("xformers is not installed (pip install 'mixreorg[xformers]')")
        if q.device.type != "cuda":
            reasons.append(f"tensors are on '{q.device}' but xformers kernels are CUDA-only")
        if backend == "xformers" and reasons:
            raise RuntimeError("attention backend 'xformers' cannot run: " + "; ".join(reasons))
        use_xf = not reasons
    if use_xf:
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None
        # xformers wants [B, N, H, D]
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p
        )
        return out.transpose(1, 2)
    if q.dtype == k.dtype == v.dtype and sdpa_kernel_for(q.device, q.dtype) == "math":
        # SDPA's math kernel called as its op, not under torch.nn.attention.sdpa_kernel: that context
        # flips process-wide flags, which would also switch the kernels of attention running at the
        # same time in another thread (a CUDA model, a float32 one). Same op, same bits as that context.
        # Only on one dtype throughout: the op casts nothing, mixed inputs stay with SDPA as before.
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, dropout_p, causal)[0]
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection.

    Args:
        dim: channels C (``dim % num_heads == 0``).
        num_heads: heads H.
        qkv_bias: bias on the ``qkv`` projection.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        causal: causal (autoregressive) mask, as in the CLIP text encoder.
        backend: ``"sdpa"`` (default), ``"xformers"`` (CUDA only) or ``"auto"``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        causal: bool = False,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.backend = _check_backend(backend)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # [B, N, 3C] -> [3, B, H, N, D]
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        drop = self.attn_drop if self.training else 0.0
        out = _attend(q, k, v, causal=self.causal, dropout_p=drop, backend=self.backend)  # [B, H, N, D]
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries ``[B, S, C]`` attend over keys/values ``[B, N, C]``.

    Separate ``q`` and fused ``kv`` projections, output projection ``proj``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = _check_backend(backend)
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, S, C = query.shape
        N = context.shape[1]
        q = self.q(query).reshape(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        kv = self.kv(context).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # [B, H, N, D] each
        drop = self.attn_drop if self.training else 0.0
        out = _attend(q, k, v, causal=False, dropout_p=drop, backend=self.backend)  # [B, H, S, D]
        out = out.transpose(1, 2).reshape(B, S, C)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + DP(attn(norm1(x)))`` then ``x + DP(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act: str = "gelu",
        causal: bool = False,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            causal=causal,
            backend=backend,
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # [B, L, C]
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class CrossAttnBlock(nn.Module):
    """Cross-attention block: queries ``[B, S, C]`` attend over ``[B, N, C]``.

    ``post_norm=True`` (GroupViT's grouping block): no norm before the attention,
    ``x = q + attn(q, kv)``, ``x = x + mlp(norm2(x))``, ``out = norm_post(x)``.
    ``post_norm=False``: pre-norm on queries and keys (``norm_q``, ``norm_kv``), no final norm.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act: str = "gelu",
        post_norm: bool = True,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.post_norm = post_norm
        if post_norm:
            self.norm_post = nn.LayerNorm(dim)
        else:
            self.norm_q = nn.LayerNorm(dim)
            self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, backend=backend
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = query + self.drop_path(self.attn(query, context))  # [B, S, C]
        else:
            x = query + self.drop_path(self.attn(self.norm_q(query), self.norm_kv(context)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.post_norm:
            x = self.norm_post(x)
        return x
