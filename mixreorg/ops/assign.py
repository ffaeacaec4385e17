"""GroupViT's token-to-group assignment: hard Gumbel-softmax over groups + token normalisation.

For logits ``[B, S, N]`` (S groups, N tokens) the op computes, over the GROUP axis (dim -2)::

    z    = clamp((logits + g) / tau, -LIM, LIM)     # g ~ Gumbel(0, 1); g = 0 when gumbel=False
    y    = softmax(z, dim=-2)
    A    = one_hot(argmax(z, dim=-2)) - y.detach() + y  if hard  else  y   # straight-through
    attn = A / (A.sum(-1, keepdim=True) + eps)            # token-axis normalisation
    soft = softmax(clamp(logits, -LIM, LIM), dim=-2)      # no noise, no tau (segmentation maps)

and returns ``(attn, soft)``, both in the input dtype. This is what GroupViT (NVlabs) and Hugging
Face's ``GroupViTAssignAttention`` do, with three documented deviations that only matter at edges:

* ``LIM = 1e30`` clamps the softmax arguments, so ``+-inf`` logits (and ``tau`` so small that
  ``logits / tau`` overflows) never give NaN: a column of ``-inf`` becomes uniform, a clamped entry
  gets zero gradient (the gradient of ``clamp``). Finite logits with ``|logits / tau| <= 1e30`` are
  untouched. NaN logits are a caller bug and propagate (checking would cost a device sync).
* the arg-max is taken over ``z`` rather than over ``y``; they agree except where rounding in
  ``exp`` makes two different ``z`` give the same ``y``. Ties go to the first (lowest) group in
  both implementations.
* a zero normaliser (``eps = 0`` and an empty group) is replaced by 1, so an empty group gives
  zeros instead of ``0 / 0``. With ``eps > 0`` (GroupViT: 1) this never triggers.

Half inputs (float16/bfloat16) are computed in float32 and the results rounded to the input dtype.
``eval`` mode is ``gumbel=False``: no noise, a plain arg-max (still with the straight-through
gradient, as Hugging Face's ``hard_softmax``). ``tau`` also divides the logits when
``gumbel=False``; GroupViT always uses ``tau = 1``.

Two implementations (``impl="auto"|"triton"|"torch"``, resolved by
:func:`mixreorg.ops._dispatch.select_impl`):

* ``torch`` (:func:`gumbel_assign_reference`): the formulas above, autograd does the rest.
* ``triton``: one kernel (``_assign_kernel``) launched in four stages, two forward and two
  backward, each over a (batch row, block of tokens) grid whose tiles hold the whole (padded)
  group column, so the group-axis softmax and arg-max stay in registers. The token-axis
  normaliser is a reduction over N: the first stage writes per-block partial sums (exact counts
  in the hard case) to a small ``[B, NB, S]`` buffer, the second sums them in a fixed order -- no
  atomics, so the op is deterministic. The Gumbel noise is generated inside the kernel from
  ``seed`` with Philox (``tl.rand``), never materialised. Forward stage 1 reads the logits (and
  noise) once and writes ``soft``, the ``[B, N]`` int16 arg-max and the partials; stage 2 writes
  ``attn`` from the arg-max alone (hard) or recomputes ``y`` (soft). Backward recomputes ``y``
  from the saved logits (and seed or given noise), so the op saves the logits plus the arg-max
  and ``[B, S]`` float32 normalisers, where the torch paths save three to five ``[B, S, N]``
  tensors.

Forward value of the hard path: the Triton kernel returns the exact one-hot divided by the
normaliser ``count + eps`` (counts are exact integers). The reference returns
``(one_hot - y) + y``, which differs from the one-hot by float rounding (about one ulp of the
compute dtype); the two agree to ~1e-6 in float32, and to the output dtype's rounding otherwise.

Noise and seeds. ``noise=`` (a ``[B, S, N]`` tensor of Gumbel samples) feeds both
implementations the same noise, which is how the tests compare them; noise is treated as a
constant (no gradient flows into it on the Triton path). ``seed=`` (int) makes a call
deterministic *within* an implementation, but the streams differ: the reference draws from a
``torch.Generator`` seeded with ``seed``, the kernel from Philox(seed, flat index).
:func:`sample_gumbel` reproduces either stream (``impl="torch"`` or ``impl="triton"``), so
``gumbel_assign(x, seed=s, impl="triton")`` agrees (to float rounding) with
``gumbel_assign_reference(x, noise=sample_gumbel(x.shape, s, device=x.device, impl="triton"))``.
With neither ``seed`` nor ``noise`` the reference draws from torch's global RNG exactly like
``torch.distributions.Gumbel`` (so it reproduces Hugging Face's ``gumbel_softmax`` under the same
``torch.manual_seed``), and the kernel draws its seed from torch's global (CPU) RNG.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import has_triton, select_impl
from .utils import first_argmax

__all__ = ["gumbel_assign", "gumbel_assign_reference", "sample_gumbel"]

_OP = "gumbel_assign"
_LIM = 1e30  # clamp of the softmax arguments: keeps +-inf and overflow away from NaN
_MAX_TRITON_GROUPS = 1024  # [BLOCK_S, BLOCK_N] tiles; the arg-max index is saved as int16
_TILE_ELEMS = 2048  # elements per [BLOCK_S, BLOCK_N] tile (tests lower it to get many blocks)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _check_seed(seed: int | None, op: str) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{op}: seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{op}: seed must be in [0, 2**63), got {seed}")


def _validate(
    logits: torch.Tensor,
    tau: float,
    eps: float,
    seed: int | None,
    noise: torch.Tensor | None,
) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{_OP}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{_OP}: logits must have rank 3 [B, S (groups), N (tokens)], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{_OP}: logits must be a floating dtype, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError(f"{_OP}: logits need at least one group (S >= 1), got shape {tuple(logits.shape)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{_OP}: tau must be a finite number > 0, got {tau!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{_OP}: eps must be a finite number >= 0, got {eps!r}")
    _check_seed(seed, _OP)
    if noise is not None:
        if seed is not None:
            raise ValueError(f"{_OP}: give either noise or seed, not both")
        if not isinstance(noise, torch.Tensor):
            raise ValueError(f"{_OP}: noise must be a torch.Tensor or None, got {type(noise).__name__}")
        if noise.shape != logits.shape:
            raise ValueError(
                f"{_OP}: noise shape {tuple(noise.shape)} does not match logits shape {tuple(logits.shape)}"
            )
        if noise.device != logits.device:
            raise ValueError(f"{_OP}: noise is on {noise.device} but logits are on {logits.device}")
        if not noise.is_floating_point():
            raise ValueError(f"{_OP}: noise must be a floating dtype, got {noise.dtype}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _random_seed() -> int:
    """A seed drawn from torch's global CPU RNG (so ``torch.manual_seed`` governs it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


# ---------------------------------------------------------------------------------------------
# Triton kernel (defined only when triton imports)
# ---------------------------------------------------------------------------------------------
if has_triton():
    import triton
    import triton.language as tl

    from .utils import block_range, cast_for_store, gumbel_from_philox, load_tile_f32, to_f32

    # The stages of _assign_kernel, one launch each, in this order within a step.
    _FWD_SCORES, _FWD_NORM, _BWD_REDUCE, _BWD_VJP = (tl.constexpr(i) for i in range(4))

    @triton.jit
    def _clamp(v):
        return tl.minimum(tl.maximum(v, -1e30), 1e30)

    @triton.jit
    def _unclamped(v):
        """Where the clamp passes the gradient through."""
        return (v >= -1e30) & (v <= 1e30)

    @triton.jit
    def _col_softmax(z):
        """Softmax over axis 0 of a tile whose padded rows are -inf (every column has a real row)."""
        m = tl.max(z, axis=0)
        e = tl.exp(z - m[None, :])
        return e / tl.sum(e, axis=0)[None, :]

    @triton.jit
    def _soft(x, mask_s):
        """The ``soft`` output: softmax over the groups of the clamped logits (no noise, no tau)."""
        return _col_softmax(tl.where(mask_s[:, None], _clamp(x), float("-inf")))

    @triton.jit
    def _one_hot(offs_s, idx):
        return offs_s[:, None] == idx[None, :]

    @triton.jit
    def _load_argmax(idx_ptr, b, N, offs_n, mask_n):
        """The saved int16 arg-max of the block's tokens; -1 (no group) on padded tokens."""
        return tl.load(idx_ptr + b * N + offs_n, mask=mask_n, other=-1).to(tl.int32)

    @triton.jit
    def _sum_partials(part_ptr, b, offs_s, mask_s, S, NB):
        """Sum the ``[B, NB, S]`` per-block partials of row ``b`` in block order (deterministic)."""
        acc = tl.zeros(offs_s.shape, dtype=tl.float32)
        for j in range(0, NB):
            acc += tl.load(part_ptr + (b * NB + j) * S + offs_s, mask=mask_s, other=0.0)
        return acc

    @triton.jit
    def _vjp_attn(y, z_raw, ga, denom, r, mask, tau):
        """``dx`` from the cotangent ``ga`` of ``attn``, with ``r[s] = sum_n G[s, n] A[s, n] / D``.

        Normalisation (quotient rule): ``dA = (G - r) / D``. Straight-through: ``dy = dA``.
        Softmax over groups: ``dz = w - y * sum_s w`` with ``w = y * dy = (y / D) * (G - r)``, a
        form without the huge ``G / D`` terms that cancel when ``eps = 0`` leaves a tiny
        normaliser; ``dx = dz / tau`` where the clamp is inactive.
        """
        w = tl.where(mask, (y / denom[:, None]) * (ga - r[:, None]), 0.0)  # y * dy
        dz = w - y * tl.sum(w, axis=0)[None, :]
        return tl.where(_unclamped(z_raw), tl.math.div_rn(dz, tau), 0.0)

    @triton.jit
    def _vjp_soft(x, gs, mask_s):
        """``dx`` from the cotangent ``gs`` of ``soft``: ``p * (Gs - sum_s p Gs)`` where unclamped."""
        p = _soft(x, mask_s)
        dp = p * (gs - tl.sum(p * gs, axis=0)[None, :])
        return tl.where(_unclamped(x), dp, 0.0)

    @triton.jit(do_not_specialize=["seed"])
    def _assign_kernel(
        x_ptr, g_ptr, ga_ptr, gs_ptr, out_ptr, idx_ptr, part_ptr, denom_ptr,
        S, N, NB, seed, tau, eps,
        sxb, sxs, sxn, sgb, sgs, sgn, sab, sas, san, ssb, sss, ssn,
        STAGE: tl.constexpr, HARD: tl.constexpr, GUMBEL: tl.constexpr, NOISE_GIVEN: tl.constexpr,
        HAS_GA: tl.constexpr, HAS_GS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One stage of the op on the tile (batch row ``b``, block ``nb`` of ``BLOCK_N`` tokens) x
        (every group, padded to ``BLOCK_S``). Pointers and strides a stage does not use are never read.

        * ``_FWD_SCORES``: ``soft`` -> out, the arg-max -> idx (hard), the block's per-group
          partial sums of ``A`` over its tokens -> part (exact counts when hard).
        * ``_FWD_NORM``: ``D = sum(part) + eps`` (0 -> 1) -> denom, ``attn = A / D`` -> out.
        * ``_BWD_REDUCE``: the block's partials of ``sum_n G[s, n] A[s, n]`` -> part.
        * ``_BWD_VJP``: ``dlogits`` -> out (:func:`_vjp_attn` + :func:`_vjp_soft`).
        """
        b = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        offs_n, mask_n = block_range(nb, BLOCK_N, N)
        mask = mask_s[:, None] & mask_n[None, :]
        flat = b * S * N + offs_s[:, None] * N + offs_n[None, :]  # into the [B, S, N] outputs; Philox index
        part_row = part_ptr + (b * NB + nb) * S + offs_s
        # the hard normaliser and the hard reduction need only the saved arg-max, not the scores
        SCORES: tl.constexpr = (STAGE == _FWD_SCORES or STAGE == _BWD_VJP) or not HARD
        if SCORES:  # z_raw = (x + g) / tau (IEEE division); z: clamped, padded groups -inf (never win)
            x = load_tile_f32(x_ptr + b * sxb, offs_s, offs_n, sxs, sxn, mask)
            z_raw = x
            if GUMBEL:
                if NOISE_GIVEN:
                    g = load_tile_f32(g_ptr + b * sgb, offs_s, offs_n, sgs, sgn, mask)
                else:
                    g = gumbel_from_philox(seed, flat)
                z_raw = x + g
            z_raw = tl.math.div_rn(z_raw, tau)
            z = tl.where(mask_s[:, None], _clamp(z_raw), float("-inf"))
        if STAGE == _FWD_SCORES:
            tl.store(out_ptr + flat, cast_for_store(_soft(x, mask_s), out_ptr), mask=mask)
            if HARD:
                idx = tl.argmax(z, axis=0, tie_break_left=True)  # [BLOCK_N], first max
                tl.store(idx_ptr + b * N + offs_n, idx.to(tl.int16), mask=mask_n)
                part = tl.sum((_one_hot(offs_s, idx) & mask).to(tl.float32), axis=1)  # exact counts
            else:
                part = tl.sum(tl.where(mask, _col_softmax(z), 0.0), axis=1)
            tl.store(part_row, part, mask=mask_s)
        elif STAGE == _FWD_NORM:
            denom = _sum_partials(part_ptr, b, offs_s, mask_s, S, NB) + eps
            denom = tl.where(denom > 0, denom, 1.0)
            if nb == 0:  # saved for backward
                tl.store(denom_ptr + b * S + offs_s, denom, mask=mask_s)
            if HARD:
                a = tl.where(_one_hot(offs_s, _load_argmax(idx_ptr, b, N, offs_n, mask_n)), 1.0, 0.0)
            else:
                a = _col_softmax(z)
            tl.store(out_ptr + flat, cast_for_store(a / denom[:, None], out_ptr), mask=mask)
        elif STAGE == _BWD_REDUCE:
            if HARD:  # only the chosen group of each token contributes: gather G[idx[n], n]
                idx = _load_argmax(idx_ptr, b, N, offs_n, mask_n)
                gsel = to_f32(tl.load(ga_ptr + b * sab + idx * sas + offs_n * san, mask=mask_n, other=0.0))
                part = tl.sum(tl.where(_one_hot(offs_s, idx) & mask, gsel[None, :], 0.0), axis=1)
            else:
                ga = load_tile_f32(ga_ptr + b * sab, offs_s, offs_n, sas, san, mask)
                part = tl.sum(tl.where(mask, ga * _col_softmax(z), 0.0), axis=1)
            tl.store(part_row, part, mask=mask_s)
        else:
            dx = tl.zeros([BLOCK_S, BLOCK_N], dtype=tl.float32)
            if HAS_GA:
                denom = tl.load(denom_ptr + b * S + offs_s, mask=mask_s, other=1.0)
                r = _sum_partials(part_ptr, b, offs_s, mask_s, S, NB) / denom
                ga = load_tile_f32(ga_ptr + b * sab, offs_s, offs_n, sas, san, mask)
                dx += _vjp_attn(_col_softmax(z), z_raw, ga, denom, r, mask, tau)
            if HAS_GS:
                dx += _vjp_soft(x, load_tile_f32(gs_ptr + b * ssb, offs_s, offs_n, sss, ssn, mask), mask_s)
            tl.store(out_ptr + flat, cast_for_store(dx, out_ptr), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _gumbel_noise_kernel(out_ptr, numel, seed, BLOCK: tl.constexpr):
        """The kernel's in-register noise, materialised (flat index -> Philox(seed, index))."""
        offs, mask = block_range(tl.program_id(0), BLOCK, numel)
        tl.store(out_ptr + offs, cast_for_store(gumbel_from_philox(seed, offs), out_ptr), mask=mask)


def _blocks(S: int, N: int) -> tuple[int, int, int]:
    """Tile sizes: the whole (padded) group column times BLOCK_N tokens, ~2048 elements.

    2048-element tiles with 8 warps keep the Philox + softmax tile in registers without spills
    on sm_90 (checked with cuobjdump: <= 150 registers per thread).
    """
    block_s = triton.next_power_of_2(S)
    block_n = max(1, min(_TILE_ELEMS // block_s, 256, triton.next_power_of_2(N)))
    num_warps = 8 if block_s * block_n >= 2048 else 4
    return block_s, block_n, num_warps


def _partials(logits: torch.Tensor) -> torch.Tensor:
    """The ``[B, NB, S]`` float32 buffer of per-block partial sums over the token axis."""
    B, S, N = logits.shape
    return torch.empty((B, triton.cdiv(N, _blocks(S, N)[1]), S), dtype=torch.float32, device=logits.device)


def _launch(stage, logits, noise, cfg, *, part, out=None, idx=None, denom=None, ga=None, gs=None, eps=0.0):
    """Run ``stage`` of :func:`_assign_kernel` on the ``(B, NB)`` grid.

    ``cfg = (seed, tau, hard, gumbel)``; ``noise`` is None unless given and used. A tensor a stage
    does not use may be None: the kernel gets ``logits`` in its place and never reads it.
    """
    B, S, N = logits.shape
    block_s, block_n, num_warps = _blocks(S, N)
    seed, tau, hard, gumbel = cfg
    ptrs = [logits if t is None else t for t in (noise, ga, gs, out, idx, part, denom)]
    strides = [s for t in (logits, noise, ga, gs) for s in (t.stride() if t is not None else (0, 0, 0))]
    _assign_kernel[(B, part.shape[1])](
        logits, *ptrs, S, N, part.shape[1], seed, tau, eps, *strides,
        STAGE=stage.value, HARD=hard, GUMBEL=gumbel, NOISE_GIVEN=noise is not None,
        HAS_GA=ga is not None, HAS_GS=gs is not None, BLOCK_S=block_s, BLOCK_N=block_n, num_warps=num_warps,
    )


# ---------------------------------------------------------------------------------------------
# autograd Function around the kernel
# ---------------------------------------------------------------------------------------------
class _GumbelAssignTriton(torch.autograd.Function):
    """Fused forward/backward. Saves logits, (noise if given), int16 arg-max [B, N], normaliser [B, S].

    Two forward and two backward launches of :func:`_assign_kernel` on the grid
    (B, cdiv(N, BLOCK_N)); the token-axis reductions go through ``[B, NB, S]`` float32 partials
    summed in a fixed order (no atomics: deterministic).
    """

    @staticmethod
    def forward(ctx, logits, noise, seed, tau, hard, gumbel, eps):  # type: ignore[override]
        noise = noise if gumbel else None
        cfg = (seed, float(tau), hard, gumbel)
        attn = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        soft = torch.empty_like(attn)
        part = _partials(logits)
        denom = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
        idx = torch.empty((logits.shape[0], logits.shape[2]), dtype=torch.int16, device=logits.device) if hard else None
        _launch(_FWD_SCORES, logits, noise, cfg, part=part, out=soft, idx=idx)
        _launch(_FWD_NORM, logits, noise, cfg, part=part, out=attn, idx=idx, denom=denom, eps=float(eps))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, noise, idx, denom)
        ctx.cfg = cfg
        return attn, soft

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_attn, grad_soft):  # type: ignore[override]
        logits, noise, idx, denom = ctx.saved_tensors
        if (grad_attn is None and grad_soft is None) or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        part = _partials(logits)
        if grad_attn is not None:
            _launch(_BWD_REDUCE, logits, noise, ctx.cfg, part=part, idx=idx, ga=grad_attn)
        _launch(_BWD_VJP, logits, noise, ctx.cfg, part=part, out=dx, denom=denom, ga=grad_attn, gs=grad_soft)
        return dx, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def sample_gumbel(
    shape: tuple[int, ...] | torch.Size,
    seed: int | None = None,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    impl: str = "torch",
) -> torch.Tensor:
    """Gumbel(0, 1) samples ``-log(-log(U))`` of ``shape``, never ``log(0)``.

    ``impl="torch"``: ``U = tiny + rand * (1 - eps - tiny)`` in ``dtype`` exactly as
    ``torch.distributions.Gumbel`` samples, from ``generator``, or a fresh generator seeded with
    ``seed``, or torch's global RNG when both are None.

    ``impl="triton"``: the stream the fused kernel generates in registers, Philox(seed, flat
    index), materialised by a small Triton kernel (computed in float32, stored in ``dtype``); with
    ``seed=None`` a seed is drawn from torch's global CPU RNG. Needs CUDA, or CPU under
    ``TRITON_INTERPRET=1``.
    """
    if impl not in ("torch", "triton"):
        raise ValueError(f"sample_gumbel: impl must be 'torch' or 'triton', got {impl!r}")
    _check_seed(seed, "sample_gumbel")
    if seed is not None and generator is not None:
        raise ValueError("sample_gumbel: give either seed or generator, not both")
    if not dtype.is_floating_point:
        raise ValueError(f"sample_gumbel: dtype must be floating, got {dtype}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"sample_gumbel: negative size in shape {shape}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if impl == "triton":
        if generator is not None:
            raise ValueError("sample_gumbel: impl='triton' takes a seed, not a generator")
        out = torch.empty(shape, dtype=dtype, device=device)
        select_impl("triton", [out], "sample_gumbel")  # raises RuntimeError with the reason
        if out.numel() == 0:
            return out
        seed = _random_seed() if seed is None else seed
        block = 1024
        _gumbel_noise_kernel[(triton.cdiv(out.numel(), block),)](out, out.numel(), seed, BLOCK=block)
        return out
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    finfo = torch.finfo(dtype)
    low = torch.full((), finfo.tiny, dtype=dtype, device=device)
    high = torch.full((), 1.0 - finfo.eps, dtype=dtype, device=device)
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    u = low + u * (high - low)  # in [tiny, 1 - eps): never 0, never 1
    return -torch.log(-torch.log(u))


def gumbel_assign_reference(
    logits: torch.Tensor, *, tau: float = 1.0, hard: bool = True, gumbel: bool = True, eps: float = 1.0,
    seed: int | None = None, noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch assignment (any device, any floating dtype; autograd does the backward).

    See the module docstring for the exact formulas. Returns ``(attn, soft)``, ``[B, S, N]`` each.
    """
    _validate(logits, tau, eps, seed, noise)
    cdt = _compute_dtype(logits.dtype)
    x = logits.to(cdt)  # [B, S, N]
    if gumbel:
        if noise is None:
            noise = sample_gumbel(x.shape, seed, dtype=cdt, device=x.device)
        z = (x + noise.to(cdt)) / tau
    else:
        z = x / tau
    z = z.clamp(-_LIM, _LIM)
    y = torch.softmax(z, dim=-2)  # [B, S, N] over groups
    if hard:
        index = first_argmax(z, dim=-2, keepdim=True)  # [B, 1, N], first max on ties
        y_hard = torch.zeros_like(y).scatter_(-2, index, 1.0)
        a = y_hard - y.detach() + y  # straight-through
    else:
        a = y
    denom = a.sum(dim=-1, keepdim=True) + eps  # [B, S, 1]
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    attn = a / denom
    soft = torch.softmax(x.clamp(-_LIM, _LIM), dim=-2)
    return attn.to(logits.dtype), soft.to(logits.dtype)


def gumbel_assign(
    logits: torch.Tensor, *, tau: float = 1.0, hard: bool = True, gumbel: bool = True, eps: float = 1.0,
    seed: int | None = None, noise: torch.Tensor | None = None, impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign each token to one group: hard Gumbel-softmax over groups, then token normalisation.

    Args:
        logits: ``[B, S, N]`` assignment logits (S groups, N tokens).
        tau: temperature (> 0).
        hard: one-hot arg-max with the straight-through gradient; else the softmax itself.
        gumbel: add Gumbel noise (training); ``False`` is eval (no noise, plain arg-max).
        eps: ``attn = A / (A.sum(-1, keepdim=True) + eps)`` (>= 0; GroupViT uses 1).
        seed: int seed of the noise (deterministic per implementation); None: torch's global RNG.
        noise: ``[B, S, N]`` Gumbel samples to use instead of generating (same shape and
            device as ``logits``); ignored when ``gumbel=False``; exclusive with ``seed``.
        impl: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        ``(attn, soft)``: the normalised assignment ``[B, S, N]`` and ``softmax(logits, -2)``
        without noise ``[B, S, N]``, both in ``logits.dtype``.
    """
    _validate(logits, tau, eps, seed, noise)
    tensors = [logits] if noise is None else [logits, noise]
    resolved = select_impl(impl, tensors, _OP)
    triton_ok = logits.dtype in _TRITON_DTYPES and logits.shape[1] <= _MAX_TRITON_GROUPS
    if resolved == "triton" and not triton_ok:
        if impl == "triton":
            raise RuntimeError(
                f"{_OP}: impl='triton' cannot run: it supports dtypes float16/bfloat16/float32 and "
                f"at most {_MAX_TRITON_GROUPS} groups, got {logits.dtype} with S={logits.shape[1]}"
            )
        resolved = "torch"
    if resolved == "torch" or logits.numel() == 0:
        return gumbel_assign_reference(logits, tau=tau, hard=hard, gumbel=gumbel, eps=eps, seed=seed, noise=noise)
    if gumbel and noise is None and seed is None:
        seed = _random_seed()
    return _GumbelAssignTriton.apply(
        logits, noise if gumbel else None, 0 if seed is None else seed, tau, hard, gumbel, eps
    )
