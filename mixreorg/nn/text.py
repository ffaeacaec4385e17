"""CLIP-style text encoder (GroupViT's text tower): causal pre-LN transformer, QuickGELU, output =
final LayerNorm at the end-of-text token (the highest token id of each sequence)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Block

__all__ = ["TextEncoder"]


class TextEncoder(nn.Module):
    """Causal transformer over BPE token ids.

    Args:
        context_length: maximum sequence length (position embeddings).
        vocab_size: vocabulary size (CLIP BPE: 49408; its EOT id 49407 is the largest).
        width: channels C.
        layers: number of blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden = ``mlp_ratio * width``.
        act: MLP activation (CLIP: ``"quick_gelu"``).
        use_checkpoint: activation checkpointing of every block.
        attn_backend: ``"sdpa" | "xformers" | "auto"``.

    ``forward(token_ids [B, T]) -> [B, C]`` with ``T <= context_length``; the sequence is pooled at
    ``token_ids.argmax(-1)`` (the EOT token, as in CLIP and GroupViT).
    """

    def __init__(
        self,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 256,
        layers: int = 12,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        act: str = "quick_gelu",
        use_checkpoint: bool = False,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"text width {width} is not divisible by the number of heads {heads}")
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.width = width
        self.num_layers = layers
        self.use_checkpoint = use_checkpoint
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, act=act, causal=True, backend=attn_backend)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP init: token embedding N(0, 0.02), positions N(0, 0.01), scaled block projections."""
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * max(self.num_layers, 1)) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(blk.attn.qkv.bias)
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.proj.bias)
            nn.init.normal_(blk.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be [B, T], got shape {tuple(token_ids.shape)}")
        if token_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        T = token_ids.shape[1]
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds the context length {self.context_length}")
        x = self.token_embed(token_ids) + self.pos_embed[:T]  # [B, T, C]
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.norm(x)
        eot = token_ids.argmax(dim=-1)  # [B]
        return x[torch.arange(x.shape[0], device=x.device), eot]  # [B, C]
