"""Patch mixing across the images of a batch: ``mix``, ``restore`` and fused ``mix_add``.

All three are one primitive, a *row gather*: a ``[B, L, C]`` sequence is seen as ``B * L`` rows
and ``out.row[r] = x.row[rows[r]]`` with a permutation ``rows`` of the flat ``(b, t)`` indices
that the plan tabulates once per sequence layout (``MixPlan.rows``): on the patch span
``out[b, t] = x[src[b, t - prefix], t]``, on the prefix/suffix tokens (CLS, registers, group
tokens, never mixed) ``out[b, t] = x[b, t]``. ``mix`` uses the table of ``src``, ``restore`` the
inverse table. Because the table is a permutation, the vector-Jacobian product of the gather is
the gather with the inverse table: the backward of ``mix`` *is* ``restore`` (and vice versa),
never a scatter-add, never atomics.

Two implementations, bit-identical (data movement only; ``mix_add`` adds in the input dtype,
which equals an fp32 add rounded once):

* ``torch``: ``index_select`` over the flattened ``[B * L, C]`` rows, as wide integer words (1-2 KiB
  rows as 128-512 B pieces), into an output that asks for huge pages when it is large
  (``utils.empty_output``).
* ``triton``: one fused kernel reading strided inputs directly (no ``.contiguous()`` copies) and,
  for ``mix_add``, reading ``y`` and ``x`` once and writing once.

``patch_gather`` / ``patch_gather_add`` take arbitrary row tables and check them (dtype, length,
device, and every entry in ``[0, B * L)``: a kernel reading through a bad entry would read out of
bounds); ``mix`` / ``restore`` / ``mix_add`` use a plan's tables, permutations by construction.

The primitives are registered as ``torch.library`` custom ops (``mixreorg::patch_gather`` and
``mixreorg::patch_gather_add``) with fake kernels and autograd, so ``torch.compile`` traces them
without graph breaks.
"""

from __future__ import annotations

import torch

from ._dispatch import has_triton, select_impl
from .plan import MixPlan
from .utils import check_index_range, check_index_tensor, empty_output

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
def patch_gather_reference(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out.row[r] = x.row[rows[r]]`` over the ``B * L`` rows of ``x: [B, L, C]``
    (``rows: [B * L]`` int64, e.g. ``MixPlan.rows(L, prefix)[0]``). Differentiable by torch."""
    B, L, C = x.shape
    return x.reshape(B * L, C).index_select(0, rows).view(B, L, C)  # [B, L, C]


def _gather_torch(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The reference for use inside the custom op: it must return a base tensor, not a view
    (custom ops copy outputs that are views), hence ``index_select(out=...)``. The output comes
    from :func:`empty_output`: on CPU, faulting in a fresh output costs more than the gather."""
    B, L, C = x.shape
    out = empty_output((B, L, C), x)
    src = x.reshape(B * L, C)
    dst = out.view(B * L, C)
    if src.is_contiguous() and not src.is_complex():
        # pure data movement: copy each row as the widest integer words that tile it (faster
        # index_select kernels, e.g. 4x fewer elements for bf16 rows), bit-identical by construction
        src, dst = _wide_rows(src), _wide_rows(dst)
        src, dst, rows = _split_rows(src, dst, rows)
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


# index_select copies each row with one memcpy, and glibc's memcpy is at its slowest between
# 1 and 2 KiB (measured; presumably its unrolled vector loop, ``rep movsb`` above): on the dev machine
# a fp32 ViT-S row (1536 B) gathers up to ~1.6x faster as three 512 B pieces when memory is quiet
# (no gain once other jobs saturate it), while 768 B and 3 KiB rows gain nothing from splitting.
_SPLIT_ROW_BYTES = (1024, 2048)  # (exclusive, inclusive)
_SPLIT_PIECE_BYTES = (128, 512)  # smaller pieces lose more to the per-memcpy cost than they gain


def _split_rows(src: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor):
    """``(src, dst, rows)`` with every contiguous row cut into ``k`` equal pieces of 128..512 B
    (:data:`_SPLIT_PIECE_BYTES`) and the table expanded to match (row ``r`` -> pieces
    ``r * k .. r * k + k - 1``); the arguments unchanged when the row width needs no cut or has
    no such divisor (e.g. a prime number of elements)."""
    R, W = src.shape
    row_bytes = W * src.element_size()
    if not _SPLIT_ROW_BYTES[0] < row_bytes <= _SPLIT_ROW_BYTES[1]:
        return src, dst, rows
    lo, hi = _SPLIT_PIECE_BYTES
    k = next((k for k in range(2, row_bytes // lo + 1) if W % k == 0 and row_bytes // k <= hi), None)
    if k is None:
        return src, dst, rows
    pieces = (rows.view(-1, 1) * k + torch.arange(k, device=rows.device)).view(-1)
    return src.view(R * k, W // k), dst.view(R * k, W // k), pieces


def patch_gather_add_reference(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``y + patch_gather_reference(x, rows)``."""
    out = patch_gather_reference(x, rows)
    return out.add_(y)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
if has_triton():
    import triton
    import triton.language as tl

    from .utils import block_range, cast_for_store, tile_offsets, to_f32

    @triton.jit
    def _row_offsets(flat, L, stride_b, stride_l):
        """Element offsets of the flat ``(b, t)`` rows ``flat = b * L + t`` of a strided ``[B, L, C]``."""
        b = flat // L
        return b * stride_b + (flat - b * L) * stride_l

    @triton.jit
    def _patch_gather_kernel(
        x_ptr, y_ptr, out_ptr, rows_ptr,
        n_rows, L, C,
        sxb, sxl, sxc, syb, syl, syc,
        ADD: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        r, rmask = block_range(tl.program_id(0), BLOCK_R, n_rows)  # flat (b, t) output rows
        cols, cmask = block_range(tl.program_id(1), BLOCK_C, C)
        mask = rmask[:, None] & cmask[None, :]
        src = tl.load(rows_ptr + r, mask=rmask, other=0)  # flat source row of each output row
        v = tl.load(x_ptr + tile_offsets(_row_offsets(src, L, sxb, sxl), cols, 1, sxc), mask=mask)
        if ADD:
            w = tl.load(y_ptr + tile_offsets(_row_offsets(r, L, syb, syl), cols, 1, syc), mask=mask)
            # half types: one fp32 add rounded once == the correctly rounded add (p' >= 2p + 2),
            # which is what torch computes.
            if HALF:
                v = cast_for_store(to_f32(w) + to_f32(v), out_ptr)
            else:
                v = w + v
        tl.store(out_ptr + tile_offsets(r, cols, C, 1), v, mask=mask)

    def _launch(x: torch.Tensor, rows: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
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
            x, ys, out, rows,
            n_rows, L, C,
            x.stride(0), x.stride(1), x.stride(2), ys.stride(0), ys.stride(1), ys.stride(2),
            ADD=y is not None, HALF=x.dtype in (torch.float16, torch.bfloat16), BLOCK_R=block_r, BLOCK_C=block_c,
        )
        return out
else:  # pragma: no cover - exercised only where triton is absent

    def _launch(x, rows, y):
        raise RuntimeError("triton is not installed")


# ---------------------------------------------------------------------------------------------
# custom ops (+ autograd: the backward of a permutation gather is the inverse gather)
# ---------------------------------------------------------------------------------------------
# ``check`` runs the range check of the row tables inside the op, where it is opaque to
# torch.compile (a data-dependent check in the Python wrapper would break the graph). The backward
# passes False: the forward checked both tables already.
@torch.library.custom_op("mixreorg::patch_gather", mutates_args=())
def _patch_gather_op(x: torch.Tensor, rows: torch.Tensor, inv_rows: torch.Tensor, impl: str,
                     check: bool) -> torch.Tensor:
    if check:
        _check_rows_range("patch_gather", x, rows, inv_rows)
    if impl == "triton":
        return _launch(x, rows, None)
    return _gather_torch(x, rows)


@_patch_gather_op.register_fake
def _(x, rows, inv_rows, impl, check):
    return x.new_empty(x.shape)


def _gather_setup(ctx, inputs, output):
    _, rows, inv_rows, impl, _ = inputs
    ctx.save_for_backward(rows, inv_rows)
    ctx.impl = impl


def _gather_backward(ctx, grad):
    rows, inv_rows = ctx.saved_tensors
    return _patch_gather_op(grad, inv_rows, rows, ctx.impl, False), None, None, None, None


_patch_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("mixreorg::patch_gather_add", mutates_args=())
def _patch_gather_add_op(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, inv_rows: torch.Tensor,
                         impl: str, check: bool) -> torch.Tensor:
    if check:
        _check_rows_range("patch_gather_add", x, rows, inv_rows)
    if impl == "triton":
        return _launch(x, rows, y)
    return _gather_torch(x, rows).add_(y)


@_patch_gather_add_op.register_fake
def _(y, x, rows, inv_rows, impl, check):
    return y.new_empty(y.shape)


def _gather_add_setup(ctx, inputs, output):
    _, _, rows, inv_rows, impl, _ = inputs
    ctx.save_for_backward(rows, inv_rows)
    ctx.impl = impl


def _gather_add_backward(ctx, grad):
    rows, inv_rows = ctx.saved_tensors
    return grad, _patch_gather_op(grad, inv_rows, rows, ctx.impl, False), None, None, None, None


_patch_gather_add_op.register_autograd(_gather_add_backward, setup_context=_gather_add_setup)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _check_rows_meta(op: str, x: torch.Tensor, rows: torch.Tensor, inv_rows: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a [B, L, C] tensor (rank 3), got {shape}")
    n_rows = x.shape[0] * x.shape[1]
    check_index_tensor(op, "rows", rows, n_rows, x.device)
    check_index_tensor(op, "inv_rows", inv_rows, n_rows, x.device)


def _check_rows_range(op: str, x: torch.Tensor, rows: torch.Tensor, inv_rows: torch.Tensor) -> None:
    check_index_range(op, (("rows", rows), ("inv_rows", inv_rows)), x.shape[0] * x.shape[1])


def _check_like(op: str, y: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        got = f"{tuple(y.shape)} {y.dtype} {y.device}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(
            f"{op}: y and x must have the same shape, dtype and device; got y {got} "
            f"and x {tuple(x.shape)} {x.dtype} {x.device}"
        )


def _check(x: torch.Tensor, plan: MixPlan, pre: int, suf: int, op: str) -> None:
    if not isinstance(plan, MixPlan):
        raise ValueError(f"{op}: plan must be a MixPlan, got {type(plan).__name__}")
    plan.validate_for(x, pre, suf, op)


# ---------------------------------------------------------------------------------------------
# public functional API
# ---------------------------------------------------------------------------------------------
def patch_gather(x: torch.Tensor, rows: torch.Tensor, inv_rows: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Low-level row gather of ``x: [B, L, C]``: ``out.row[r] = x.row[rows[r]]`` for a
    permutation ``rows: [B * L]`` (int64, on ``x``'s device) of the flat rows whose inverse
    ``inv_rows`` drives the backward. Prefer :func:`mix` / :func:`restore`.

    Raises ``ValueError`` for a wrong dtype, length or device of ``rows``/``inv_rows`` and for
    entries outside ``[0, B * L)`` (one min/max reduction and one device sync per call); that
    either table is a permutation, and ``inv_rows`` its inverse, is not checked.
    """
    _check_rows_meta("patch_gather", x, rows, inv_rows)
    impl = select_impl(impl, (x, rows, inv_rows), "patch_gather")
    return _patch_gather_op(x, rows, inv_rows, impl, True)


def patch_gather_add(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, inv_rows: torch.Tensor,
                     impl: str = "auto") -> torch.Tensor:
    """Low-level fused ``y + patch_gather(x, ...)``; ``y`` has ``x``'s shape, dtype and device.
    Validates like :func:`patch_gather`."""
    _check_rows_meta("patch_gather_add", x, rows, inv_rows)
    _check_like("patch_gather_add", y, x)
    impl = select_impl(impl, (y, x, rows, inv_rows), "patch_gather_add")
    return _patch_gather_add_op(y, x, rows, inv_rows, impl, True)


# mix / restore / mix_add skip the range check: the tables of a MixPlan are permutations of the
# flat rows by construction (MixPlan.from_permutation checks them), and a per-call check would
# cost a device sync in every mixing layer.
def mix(x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0,
        impl: str = "auto") -> torch.Tensor:
    """Mix the patch tokens of ``x: [B, L, C]`` across the images of each group.

    ``mixed[g*G + m, p] = x[g*G + pi_p(m), p]`` on the patch span; the ``num_prefix_tokens``
    first and ``num_suffix_tokens`` last tokens are copied unchanged. Differentiable; the
    backward is :func:`restore` of the cotangent.
    """
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "mix")
    rows, inv_rows = plan.rows(x.shape[1], num_prefix_tokens)
    return _patch_gather_op(x, rows, inv_rows, select_impl(impl, (x,), "mix"), False)


def restore(x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0,
            impl: str = "auto") -> torch.Tensor:
    """Undo :func:`mix`: ``restore(mix(x, plan), plan) == x`` bit for bit."""
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "restore")
    rows, inv_rows = plan.rows(x.shape[1], num_prefix_tokens)
    return _patch_gather_op(x, inv_rows, rows, select_impl(impl, (x,), "restore"), False)


def mix_add(y: torch.Tensor, x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0,
            num_suffix_tokens: int = 0, impl: str = "auto") -> torch.Tensor:
    """Fused ``y + mix(x, plan)`` (progressive mixing): one read of each input, one write.

    On the prefix/suffix tokens this is ``y + x``.
    """
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "mix_add")
    _check_like("mix_add", y, x)
    rows, inv_rows = plan.rows(x.shape[1], num_prefix_tokens)
    return _patch_gather_add_op(y, x, rows, inv_rows, select_impl(impl, (y, x), "mix_add"), False)


# references with the same signature (used by tests and benchmarks)
def mix_reference(x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0,
                  num_suffix_tokens: int = 0) -> torch.Tensor:
    """Pure-torch :func:`mix` (no custom op)."""
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "mix_reference")
    return patch_gather_reference(x, plan.rows(x.shape[1], num_prefix_tokens)[0])


def restore_reference(x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0,
                      num_suffix_tokens: int = 0) -> torch.Tensor:
    """Pure-torch :func:`restore` (no custom op)."""
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "restore_reference")
    return patch_gather_reference(x, plan.rows(x.shape[1], num_prefix_tokens)[1])


def mix_add_reference(y: torch.Tensor, x: torch.Tensor, plan: MixPlan, *, num_prefix_tokens: int = 0,
                      num_suffix_tokens: int = 0) -> torch.Tensor:
    """Pure-torch :func:`mix_add` (no custom op)."""
    _check(x, plan, num_prefix_tokens, num_suffix_tokens, "mix_add_reference")
    return patch_gather_add_reference(y, x, plan.rows(x.shape[1], num_prefix_tokens)[0])
