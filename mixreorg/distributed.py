"""Small torch.distributed helpers: rank / world size, and all-gather with or without gradient.

All helpers work in a single process (no process group, or a world of 1): they then return the
input unchanged and rank 0 / world size 1.

Gradient convention of :func:`all_gather_with_grad` (the one of GroupViT and open_clip, and the one
DistributedDataParallel expects): the backward sums, over all ranks, the gradients that reach each
rank's slice of the gathered tensor. If every rank computes a loss ``L_r`` that averages over its own
rows, with equal local batches, the global loss is ``L = mean_r L_r`` and each rank's gradient w.r.t.
its local input rows is ``world_size * dL/dx_r``; DDP's averaging of parameter gradients over the
ranks then gives exactly ``dL/dtheta``, the single-process gradient on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "check_same_batch_size",
]


def is_distributed() -> bool:
    """True when a default process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward: all-reduce (sum), keep this rank's rows.

    Written with all_gather + all_reduce only, so it runs on every backend (gloo has no
    reduce-scatter).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rank = dist.get_rank()
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)  # [W*B, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` on each rank -> ``[world*B, ...]`` (rank order), differentiable.

    Every rank must pass the same shape (use ``drop_last`` batches; see
    :func:`check_same_batch_size`). Returns ``x`` itself when not distributed.
    """
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` on each rank -> ``[world*B, ...]`` (rank order), no gradient (labels, ids)."""
    if not is_distributed():
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def check_same_batch_size(batch: int, device: torch.device | str = "cpu") -> None:
    """Raise ``ValueError`` unless every rank has the same local batch ``batch`` (one tiny collective).

    Gathering tensors of different lengths fails or hangs in torch.distributed, with unhelpful
    messages; this turns it into a clear error. A no-op when not distributed.
    """
    if not is_distributed():
        return
    sizes = all_gather_no_grad(torch.tensor([batch], dtype=torch.long, device=device)).tolist()
    if len(set(sizes)) != 1:
        raise ValueError(
            f"local batch sizes differ across ranks: {sizes}; gathering needs equal batches (use drop_last=True)"
        )
