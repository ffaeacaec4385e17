"""Patch mixing across the images of a batch: ``mix``, ``restore`` and fused ``mix_add``.

All three are one primitive, a *row gather along the batch axis*: for a ``[B, L, C]`` sequence,
``out[b, t] = x[index[b, t - prefix], t]`` on the patch span and ``out[b, t] = x[b, t]`` on the
prefix/suffix tokens (CLS, registers, group tokens), which are never mixed. ``mix`` uses the plan's
``src`` index, ``restore`` its inverse ``inv``. Because the index is a permutation, the
vector-Jacobian product of the gather with ``src`` is the gather with ``inv``: the backward of
``mix`` *is* ``restore`` (and vice versa), never a scatter-add, never atomics.

Two implementations, bit-identical (data movement only; ``mix_add`` adds in the input dtype,
which equals an fp32 add rounded once):

* ``torch``: ``index_select`` over the flattened ``[B * L, C]`` rows (memcpy-speed on CPU).
* ``triton``: one fused kernel reading strided inputs directly (no ``.contiguous()`` copies) and,
  for ``mix_add``, reading ``y`` and ``x`` once and writing once.

The primitives are registered as ``torch.library`` custom ops (``mixreorg::patch_gather`` and
``mixreorg::patch_gather_add``) with fake kernels and autograd, so ``torch.compile`` traces them
without graph breaks.
"""

from __future__ import annotations

import torch

from ._dispatch import has_triton, select_impl
from .plan import MixPlan

__all__ = [
    "mix",
    "restore",
    "mix_add",
    "patch_gather",
    "patch_gather_add",
    "patch_gather_reference",
    "patch_gather_add_reference",
    "mix_reference",
    "restore_reference",
    "mix_add_reference",
]


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------
def _flat_rows(index: torch.Tensor, seq_len: int, prefix: int) -> torch.Tensor:
    B, Lp = index.shape
    t = torch.arange(seq_len, device=index.device)
    rows = torch.arange(B, device=index.device).view(B, 1) * seq_len + t.view(1, seq_len)
    rows[:, prefix : prefix + Lp] = index * seq_len + t[prefix : prefix + Lp].view(1, Lp)
    return rows.reshape(-1)


def patch_gather_reference(x: torch.Tensor, index: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """``out[b, t] = x[index[b, t - prefix], t]`` on the patch span, identity elsewhere.

    x: ``[B, L, C]``; index: ``[B, Lp]`` int64 global batch rows.
    """
    B, L, C = x.shape
    rows = _flat_rows(index, L, prefix)  # [B * L]
    return x.reshape(B * L, C).index_select(0, rows).view(B, L, C)  # [B, L, C]


def _gather_torch(x: torch.Tensor, index: torch.Tensor, prefix: int) -> torch.Tensor:
    """The reference for use inside the custom op: it must return a base tensor, not a view
    (custom ops copy outputs that are views), hence ``index_select(out=...)``."""
    B, L, C = x.shape
    rows = _flat_rows(index, L, prefix)  # [B * L]
    out = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    src = x.reshape(B * L, C)
    dst = out.view(B * L, C)
    if src.is_contiguous() and not src.is_complex():
        # pure data movement: copy each row as the widest integer words that tile it (faster
        # index_select kernels, e.g. 4x fewer elements for bf16 rows), bit-identical by construction
        src, dst = _wide_rows(src), _wide_rows(dst)
    torch.index_select(src, 0, rows, out=dst)
    return out  # [B, L, C]


def _wide_rows(t: torch.Tensor) -> torch.Tensor:
    """View contiguous ``[R, C]`` rows as the widest integer dtype (8, 4 or 2 bytes) that tiles
    each row and matches the pointer alignment; the tensor itself when none does."""
    row_bytes = t.shape[1] * t.element_size()
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if size >= t.element_size() and row_bytes % size == 0 and t.data_ptr() % size == 0:
            return t.view(dtype)
    return t


def patch_gather_add_reference(y: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                               prefix: int = 0) -> torch.Tensor:
    """``y + patch_gather_reference(x, index, prefix)``."""
    out = patch_gather_reference(x, index, prefix)
    return out.add_(y)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _f32_to_bf16_rtne(f):
        # fp32 -> bf16 with round-to-nearest-even, as torch rounds (NaN -> canonical 0x7FC0).
        # Written with integer ops so that Triton's CPU interpreter (whose bf16 casts truncate)
        # and the GPU agree bit for bit.
        bits = f.to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        rounded = tl.where(f != f, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _patch_gather_kernel(
        x_ptr, y_ptr, out_ptr, idx_ptr,
        n_rows, L, C, prefix, Lp,
        sxb, sxl, sxc, syb, syl, syc,
        ADD: tl.constexpr, ADD_MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_r = tl.program_id(0).to(tl.int64)
        pid_c = tl.program_id(1).to(tl.int64)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # flat (b, t) rows
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        rmask = rows < n_rows
        cmask = cols < C
        b = rows // L
        t = rows - b * L
        p = t - prefix
        in_span = rmask & (p >= 0) & (p < Lp)
        p_safe = tl.where(in_span, p, 0)
        src = tl.load(idx_ptr + b * Lp + p_safe, mask=in_span, other=0)
        src = tl.where(in_span, src, b)
        mask = rmask[:, None] & cmask[None, :]
        x_off = src[:, None] * sxb + t[:, None] * sxl + cols[None, :] * sxc
        v = tl.load(x_ptr + x_off, mask=mask)
        if ADD:
            y_off = b[:, None] * syb + t[:, None] * syl + cols[None, :] * syc
            w = tl.load(y_ptr + y_off, mask=mask)
            # half types: one fp32 add rounded once == the correctly rounded add (p' >= 2p + 2),
            # which is what torch computes.
            if ADD_MODE == 1:  # fp16
                v = (w.to(tl.float32) + v.to(tl.float32)).to(tl.float16)
            elif ADD_MODE == 2:  # bf16
                v = _f32_to_bf16_rtne(w.to(tl.float32) + v.to(tl.float32))
            else:
                v = w + v
        tl.store(out_ptr + rows[:, None] * C + cols[None, :], v, mask=mask)

    _ADD_MODE = {torch.float16: 1, torch.bfloat16: 2}

    def _launch(x: torch.Tensor, index: torch.Tensor, prefix: int, y: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        out = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
        n_rows = B * L
        if n_rows == 0 or C == 0:
            return out
        block_c = min(triton.next_power_of_2(C), 1024)
        # ~4096 elements per program on GPU; the CPU interpreter prefers fewer, larger programs.
        target = 4096 if x.is_cuda else 1 << 16
        block_r = max(1, min(triton.next_power_of_2(n_rows), target // block_c))
        grid = (triton.cdiv(n_rows, block_r), triton.cdiv(C, block_c))
        ys = y if y is not None else x
        _patch_gather_kernel[grid](
            x, ys, out, index,
            n_rows, L, C, prefix, index.shape[1],
            x.stride(0), x.stride(1), x.stride(2), ys.stride(0), ys.stride(1), ys.stride(2),
            ADD=y is not None, ADD_MODE=_ADD_MODE.get(x.dtype, 0), BLOCK_R=block_r, BLOCK_C=block_c,
        )
        return out
else:  # pragma: no cover - exercised only where triton is absent

    def _launch(x, index, prefix, y):
        raise RuntimeError("triton is not installed")


# ---------------------------------------------------------------------------------------------
# custom ops (+ autograd: the backward of a permutation gather is the inverse gather)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mixreorg::patch_gather", mutates_args=())
def _patch_gather_op(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, prefix: int,
                     impl: str) -> torch.Tensor:
    if impl == "triton":
        return _launch(x, index, prefix, None)
    return _gather_torch(x, index, prefix)


@_patch_gather_op.register_fake
def _(x, index, inverse, prefix, impl):
    return x.new_empty(x.shape)


def _gather_setup(ctx, inputs, output):
    _, index, inverse, prefix, impl = inputs
    ctx.save_for_backward(index, inverse)
    ctx.prefix, ctx.impl = prefix, impl


def _gather_backward(ctx, grad):
    index, inverse = ctx.saved_tensors
    return _patch_gather_op(grad, inverse, index, ctx.prefix, ctx.impl), None, None, None, None


_patch_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("mixreorg::patch_gather_add", mutates_args=())
def _patch_gather_add_op(y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor,
                         prefix: int, impl: str) -> torch.Tensor:
    if impl == "triton":
        return _launch(x, index, prefix, y)
    return _gather_torch(x, index, prefix).add_(y)


@_patch_gather_add_op.register_fake
def _(y, x, index, inverse, prefix, impl):
    return y.new_empty(y.shape)


def _gather_add_setup(ctx, inputs, output):
    _, _, index, inverse, prefix, impl = inputs
    ctx.save_for_backward(index, inverse)
    ctx.prefix, ctx.impl = prefix, impl


def _gather_add_backward(ctx, grad):
    index, inverse = ctx.saved_tensors
    grad_x = _patch_gather_op(grad, inverse, index, ctx.prefix, ctx.impl)
    return grad, grad_x, None, None, None, None


_patch_gather_add_op.register_autograd(_gather_add_backward, setup_context=_gather_add_setup)


# ---------------------------------------------------------------------------------------------
# public functional API
# ---------------------------------------------------------------------------------------------
def patch_gather(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, prefix: int = 0,
                 impl: str = "auto") -> torch.Tensor:
    """Low-level: gather rows of ``x: [B, L, C]`` along the batch axis by the permutation
    ``index: [B, Lp]`` (its inverse ``inverse`` drives the backward) on the span starting at
    ``prefix``. Prefer :func:`mix` / :func:`restore`."""
    impl = select_impl(impl, (x, index), "patch_gather")
    return _patch_gather_op(x, index, inverse, prefix, impl)


def patch_gather_add(y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor,
                     prefix: int = 0, impl: str = "auto") -> torch.Tensor:
    """Low-level fused ``y + patch_gather(x, ...)``."""
    impl = select_impl(impl, (y, x, index), "patch_gather_add")
    return _patch_gather_add_op(y, x, index, inverse, prefix, impl)


def _check(x: torch.Tensor, plan: MixPlan, pre: int, suf: int, op: str) -> None:
    if not isinstance(plan, MixPlan):
        raise ValueError(f"{op}: plan must be a MixPlan, got {type(plan).__name__}")
    plan.validate_for(x, pre, suf, op)


def mix(x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0,
        impl: str = "auto") -> torch.Tensor:
    """Mix the patch tokens of ``x: [B, L, C]`` across the images of each group.

    ``mixed[g*G + m, p] = x[g*G + pi_p(m), p]`` on the patch span; the ``num_prefix_tokens``
    first and ``num_suffix_tokens`` last tokens are copied unchanged. Differentiable; the
    backward is :func:`restore` of the cotangent.
    """
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "mix")
    return patch_gather(x, plan.src, plan.inv, num_prefix_tokens, impl)


def restore(x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0,
            impl: str = "auto") -> torch.Tensor:
    """Undo :func:`mix`: ``restore(mix(x, plan), plan) == x`` bit for bit."""
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "restore")
    return patch_gather(x, plan.inv, plan.src, num_prefix_tokens, impl)


def mix_add(y: torch.Tensor, x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0,
            num_suffix_tokens: int = 0, impl: str = "auto") -> torch.Tensor:
    """Fused ``y + mix(x, plan)`` (progressive mixing): one read of each input, one write.

    On the prefix/suffix tokens this is ``y + x``.
    """
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "mix_add")
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        raise ValueError(
            f"mix_add: y and x must have the same shape, dtype and device; got y {tuple(y.shape)} "
            f"{y.dtype} {y.device} and x {tuple(x.shape)} {x.dtype} {x.device}"
        )
    return patch_gather_add(y, x, plan.src, plan.inv, num_prefix_tokens, impl)


# references with the same signature (used by tests and benchmarks)
def mix_reference(x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0,
                  num_suffix_tokens: int = 0) -> torch.Tensor:
    """Pure-torch :func:`mix` (no custom op)."""
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "mix_reference")
    return patch_gather_reference(x, plan.src, num_prefix_tokens)


def restore_reference(x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0,
                      num_suffix_tokens: int = 0) -> torch.Tensor:
    """Pure-torch :func:`restore` (no custom op)."""
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "restore_reference")
    return patch_gather_reference(x, plan.inv, num_prefix_tokens)


def mix_add_reference(y: torch.Tensor, x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0,
                      num_suffix_tokens: int = 0) -> torch.Tensor:
    """Pure-torch :func:`mix_add` (no custom op)."""
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "mix_add_reference")
    return patch_gather_add_reference(y, x, plan.src, num_prefix_tokens)
