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
* ``triton``: two forward and two backward kernels, each over a (batch row, block of tokens)
  grid whose tiles hold the whole (padded) group column, so the group-axis softmax and arg-max
  stay in registers. The token-axis normaliser is a reduction over N: the first kernel writes
  per-block partial sums (exact counts in the hard case) to a small ``[B, NB, S]`` buffer, the
  second sums them in a fixed order -- no atomics, so the op is deterministic. The Gumbel noise
  is generated inside the kernel from ``seed`` with Philox (``tl.rand``), never materialised.
  Forward kernel 1 reads the logits (and noise) once and writes ``soft``, the ``[B, N]`` int16
  arg-max and the partials; kernel 2 writes ``attn`` from the arg-max alone (hard) or recomputes
  ``y`` (soft). Backward recomputes ``y`` from the saved logits (and seed or given noise), so the
  op saves the logits plus the arg-max and ``[B, S]`` float32 normalisers, where the torch paths
  save three to five ``[B, S, N]`` tensors.

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
# Triton kernels (defined only when triton imports)
# ---------------------------------------------------------------------------------------------
if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _gumbel_from_philox(seed, offs):
        """Gumbel(0, 1) samples for int64 ``offs`` from Philox(seed): ``-log(-log(u))``.

        ``u`` is clamped to ``[tiny, 1 - eps]`` as torch's Gumbel does, and ``-log(u)`` to
        ``>= eps`` so that an approximate ``log`` near 1 can never give ``log(0)`` or a NaN.
        The noise therefore lies in ``[-4.47, 15.9]``.
        """
        u = tl.rand(seed, offs)
        u = tl.minimum(tl.maximum(u, 1.1754943508222875e-38), 0.9999998807907104)
        t = tl.maximum(-tl.log(u), 1.1920928955078125e-07)
        return -tl.log(t)

    @triton.jit
    def _to_out(v, ptr):
        """Round float32 ``v`` to ``ptr``'s element type, round-to-nearest-even.

        For bfloat16 the rounding is done on the bits first: Triton's interpreter truncates
        float32 -> bfloat16 casts, the GPU rounds; pre-rounding makes both (and torch) agree.
        """
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            v = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        return v.to(ptr.dtype.element_ty)

    @triton.jit
    def _scores(
        x_ptr,
        g_ptr,
        b,
        offs_s,
        offs_n,
        mask,
        S,
        N,
        seed,
        tau,
        sxb,
        sxs,
        sxn,
        sgb,
        sgs,
        sgn,
        GUMBEL: tl.constexpr,
        NOISE_GIVEN: tl.constexpr,
    ):
        """Load a ``[BLOCK_S, BLOCK_N]`` tile and return (x, z_raw, z) in float32.

        ``z_raw = (x + g) / tau`` (IEEE division), ``z = clamp(z_raw, -LIM, LIM)`` with the padded
        group rows set to ``-inf`` so they never win the softmax or the arg-max.
        """
        x = tl.load(x_ptr + b * sxb + offs_s[:, None] * sxs + offs_n[None, :] * sxn, mask=mask, other=0.0).to(
            tl.float32
        )
        if GUMBEL:
            if NOISE_GIVEN:
                g = tl.load(g_ptr + b * sgb + offs_s[:, None] * sgs + offs_n[None, :] * sgn, mask=mask, other=0.0).to(
                    tl.float32
                )
            else:
                flat = b * S * N + offs_s[:, None] * N + offs_n[None, :]  # int64 flat index
                g = _gumbel_from_philox(seed, flat)
            z_raw = tl.math.div_rn(x + g, tau)
        else:
            z_raw = tl.math.div_rn(x, tau)
        z = tl.minimum(tl.maximum(z_raw, -1e30), 1e30)
        z = tl.where(offs_s[:, None] < S, z, float("-inf"))  # padded token columns stay finite
        return x, z_raw, z

    @triton.jit
    def _col_softmax(z):
        """Softmax over axis 0 of a tile whose padded rows are -inf (every column has a real row)."""
        m = tl.max(z, axis=0)
        e = tl.exp(z - m[None, :])
        return e / tl.sum(e, axis=0)[None, :]

    @triton.jit
    def _tile(b, nb, S, N, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_s = tl.arange(0, BLOCK_S)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_s = offs_s < S
        mask_n = offs_n < N
        return offs_s, offs_n, mask_s, mask_n, mask_s[:, None] & mask_n[None, :]

    @triton.jit
    def _sum_partials(part_ptr, b, offs_s, mask_s, S, NB):
        """Sum the ``[B, NB, S]`` per-block partials of row ``b`` in block order (deterministic)."""
        acc = tl.zeros(offs_s.shape, dtype=tl.float32)
        for j in range(0, NB):
            acc += tl.load(part_ptr + (b * NB + j) * S + offs_s, mask=mask_s, other=0.0)
        return acc

    @triton.jit(do_not_specialize=["seed"])
    def _assign_fwd_kernel(
        x_ptr,
        g_ptr,
        soft_ptr,
        idx_ptr,
        part_ptr,
        S,
        N,
        NB,
        seed,
        tau,
        sxb,
        sxs,
        sxn,
        sgb,
        sgs,
        sgn,
        HARD: tl.constexpr,
        GUMBEL: tl.constexpr,
        NOISE_GIVEN: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Forward, kernel 1 of 2, one program per (batch row, block of tokens): ``soft``, the
        arg-max (hard) and the block's per-group partial sum of ``A`` over its tokens."""
        b = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
        offs_s, offs_n, mask_s, mask_n, mask = _tile(b, nb, S, N, BLOCK_S, BLOCK_N)
        x, _, z = _scores(
            x_ptr, g_ptr, b, offs_s, offs_n, mask, S, N, seed, tau, sxb, sxs, sxn, sgb, sgs, sgn, GUMBEL, NOISE_GIVEN
        )
        xs = tl.where(mask_s[:, None], tl.minimum(tl.maximum(x, -1e30), 1e30), float("-inf"))
        p = _col_softmax(xs)
        tl.store(soft_ptr + b * S * N + offs_s[:, None] * N + offs_n[None, :], _to_out(p, soft_ptr), mask=mask)
        if HARD:
            idx = tl.argmax(z, axis=0, tie_break_left=True)  # [BLOCK_N], first max
            tl.store(idx_ptr + b * N + offs_n, idx.to(tl.int16), mask=mask_n)
            hit = (offs_s[:, None] == idx[None, :]) & mask
            part = tl.sum(hit.to(tl.float32), axis=1)  # exact counts
        else:
            y = _col_softmax(z)
            part = tl.sum(tl.where(mask, y, 0.0), axis=1)
        tl.store(part_ptr + (b * NB + nb) * S + offs_s, part, mask=mask_s)

    @triton.jit(do_not_specialize=["seed"])
    def _assign_norm_kernel(
        x_ptr,
        g_ptr,
        attn_ptr,
        idx_ptr,
        part_ptr,
        denom_ptr,
        S,
        N,
        NB,
        seed,
        tau,
        eps,
        sxb,
        sxs,
        sxn,
        sgb,
        sgs,
        sgn,
        HARD: tl.constexpr,
        GUMBEL: tl.constexpr,
        NOISE_GIVEN: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Forward, kernel 2 of 2: normaliser ``D = sum(partials) + eps`` (0 -> 1), ``attn = A / D``."""
        b = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
        offs_s, offs_n, mask_s, mask_n, mask = _tile(b, nb, S, N, BLOCK_S, BLOCK_N)
        denom = _sum_partials(part_ptr, b, offs_s, mask_s, S, NB) + eps
        denom = tl.where(denom > 0, denom, 1.0)
        if nb == 0:  # saved for backward
            tl.store(denom_ptr + b * S + offs_s, denom, mask=mask_s)
        if HARD:
            idx = tl.load(idx_ptr + b * N + offs_n, mask=mask_n, other=-1).to(tl.int32)
            a = tl.where(offs_s[:, None] == idx[None, :], 1.0, 0.0)  # the exact one-hot
        else:
            _, _, z = _scores(
                x_ptr,
                g_ptr,
                b,
                offs_s,
                offs_n,
                mask,
                S,
                N,
                seed,
                tau,
                sxb,
                sxs,
                sxn,
                sgb,
                sgs,
                sgn,
                GUMBEL,
                NOISE_GIVEN,
            )
            a = _col_softmax(z)
        attn = a / denom[:, None]
        tl.store(attn_ptr + b * S * N + offs_s[:, None] * N + offs_n[None, :], _to_out(attn, attn_ptr), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _assign_bwd_reduce_kernel(
        x_ptr,
        g_ptr,
        idx_ptr,
        ga_ptr,
        part_ptr,
        S,
        N,
        NB,
        seed,
        tau,
        sxb,
        sxs,
        sxn,
        sgb,
        sgs,
        sgn,
        sab,
        sas,
        san,
        HARD: tl.constexpr,
        GUMBEL: tl.constexpr,
        NOISE_GIVEN: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Backward, kernel 1 of 2: per-block partials of ``sum_n G[s, n] * A[s, n]``."""
        b = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
        offs_s, offs_n, mask_s, mask_n, mask = _tile(b, nb, S, N, BLOCK_S, BLOCK_N)
        if HARD:
            # only the chosen group of each token contributes: gather G[idx[n], n]
            idx = tl.load(idx_ptr + b * N + offs_n, mask=mask_n, other=0).to(tl.int32)
            gsel = tl.load(ga_ptr + b * sab + idx * sas + offs_n * san, mask=mask_n, other=0.0).to(tl.float32)
            hit = (offs_s[:, None] == idx[None, :]) & mask
            part = tl.sum(tl.where(hit, gsel[None, :], 0.0), axis=1)
        else:
            _, _, z = _scores(
                x_ptr,
                g_ptr,
                b,
                offs_s,
                offs_n,
                mask,
                S,
                N,
                seed,
                tau,
                sxb,
                sxs,
                sxn,
                sgb,
                sgs,
                sgn,
                GUMBEL,
                NOISE_GIVEN,
            )
            y = _col_softmax(z)
            ga = tl.load(ga_ptr + b * sab + offs_s[:, None] * sas + offs_n[None, :] * san, mask=mask, other=0.0).to(
                tl.float32
            )
            part = tl.sum(tl.where(mask, ga * y, 0.0), axis=1)
        tl.store(part_ptr + (b * NB + nb) * S + offs_s, part, mask=mask_s)

    @triton.jit(do_not_specialize=["seed"])
    def _assign_bwd_kernel(
        x_ptr,
        g_ptr,
        denom_ptr,
        part_ptr,
        ga_ptr,
        gs_ptr,
        dx_ptr,
        S,
        N,
        NB,
        seed,
        tau,
        sxb,
        sxs,
        sxn,
        sgb,
        sgs,
        sgn,
        sab,
        sas,
        san,
        ssb,
        sss,
        ssn,
        HARD: tl.constexpr,
        GUMBEL: tl.constexpr,
        NOISE_GIVEN: tl.constexpr,
        HAS_GA: tl.constexpr,
        HAS_GS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Backward, kernel 2 of 2: the vector-Jacobian product for one tile.

        Normalisation (quotient rule): ``dA = (G - r) / D`` with ``r[s] = sum_n G[s, n] A[s, n] / D``
        (the partials of kernel 1). Straight-through: ``dy = dA``. Softmax over groups:
        ``dz = w - y * sum_s w`` with ``w = y * dy = (y / D) * (G - r)``, a form without the huge
        ``G / D`` terms that cancel when ``eps = 0`` leaves a tiny normaliser; ``dx = dz / tau``
        where the clamp is inactive. The soft output adds ``p * (Gs - sum_s p Gs)``.
        """
        b = tl.program_id(0).to(tl.int64)
        nb = tl.program_id(1)
        offs_s, offs_n, mask_s, mask_n, mask = _tile(b, nb, S, N, BLOCK_S, BLOCK_N)
        x, z_raw, z = _scores(
            x_ptr, g_ptr, b, offs_s, offs_n, mask, S, N, seed, tau, sxb, sxs, sxn, sgb, sgs, sgn, GUMBEL, NOISE_GIVEN
        )
        dx = tl.zeros([BLOCK_S, BLOCK_N], dtype=tl.float32)
        if HAS_GA:
            denom = tl.load(denom_ptr + b * S + offs_s, mask=mask_s, other=1.0)
            r = _sum_partials(part_ptr, b, offs_s, mask_s, S, NB) / denom
            y = _col_softmax(z)
            ga = tl.load(ga_ptr + b * sab + offs_s[:, None] * sas + offs_n[None, :] * san, mask=mask, other=0.0).to(
                tl.float32
            )
            w = tl.where(mask, (y / denom[:, None]) * (ga - r[:, None]), 0.0)  # y * dy
            dz = w - y * tl.sum(w, axis=0)[None, :]
            live = (z_raw >= -1e30) & (z_raw <= 1e30)  # the gradient of the clamp
            dx += tl.where(live, tl.math.div_rn(dz, tau), 0.0)
        if HAS_GS:
            xs = tl.where(mask_s[:, None], tl.minimum(tl.maximum(x, -1e30), 1e30), float("-inf"))
            p = _col_softmax(xs)
            gs = tl.load(gs_ptr + b * ssb + offs_s[:, None] * sss + offs_n[None, :] * ssn, mask=mask, other=0.0).to(
                tl.float32
            )
            dp = p * (gs - tl.sum(p * gs, axis=0)[None, :])
            dx += tl.where((x >= -1e30) & (x <= 1e30), dp, 0.0)
        tl.store(dx_ptr + b * S * N + offs_s[:, None] * N + offs_n[None, :], _to_out(dx, dx_ptr), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _gumbel_noise_kernel(out_ptr, numel, seed, BLOCK: tl.constexpr):
        """The kernel's in-register noise, materialised (flat index -> Philox(seed, index))."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        g = _gumbel_from_philox(seed, offs)
        tl.store(out_ptr + offs, _to_out(g, out_ptr), mask=offs < numel)


def _blocks(S: int, N: int) -> tuple[int, int, int]:
    """Tile sizes: the whole (padded) group column times BLOCK_N tokens, ~2048 elements.

    2048-element tiles with 8 warps keep the Philox + softmax tile in registers without spills
    on sm_90 (checked with cuobjdump: <= 150 registers per thread).
    """
    block_s = triton.next_power_of_2(S)
    block_n = max(1, min(_TILE_ELEMS // block_s, 256, triton.next_power_of_2(N)))
    num_warps = 8 if block_s * block_n >= 2048 else 4
    return block_s, block_n, num_warps


def _noise_strides(noise: torch.Tensor | None) -> tuple[int, int, int]:
    return tuple(noise.stride()) if noise is not None else (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# autograd Function around the kernels
# ---------------------------------------------------------------------------------------------
class _GumbelAssignTriton(torch.autograd.Function):
    """Fused forward/backward. Saves logits, (noise if given), int16 arg-max [B, N], normaliser [B, S].

    Grid (B, cdiv(N, BLOCK_N)) in each of the two forward and two backward kernels; the
    token-axis reductions go through ``[B, NB, S]`` float32 partials summed in a fixed order (no
    atomics: deterministic).
    """

    @staticmethod
    def forward(ctx, logits, noise, seed, tau, hard, gumbel, eps):  # type: ignore[override]
        B, S, N = logits.shape
        dev = logits.device
        block_s, block_n, num_warps = _blocks(S, N)
        nb = triton.cdiv(N, block_n)
        attn = torch.empty((B, S, N), dtype=logits.dtype, device=dev)
        soft = torch.empty_like(attn)
        part = torch.empty((B, nb, S), dtype=torch.float32, device=dev)
        denom = torch.empty((B, S), dtype=torch.float32, device=dev)
        idx = torch.empty((B, N), dtype=torch.int16, device=dev) if hard else None
        noise_given = gumbel and noise is not None
        g_arg = noise if noise_given else logits  # never read when not given
        common = dict(
            HARD=hard, GUMBEL=gumbel, NOISE_GIVEN=noise_given, BLOCK_S=block_s, BLOCK_N=block_n, num_warps=num_warps
        )
        strides = (*logits.stride(), *_noise_strides(noise if noise_given else None))
        idx_arg = idx if hard else part  # never read when not hard
        _assign_fwd_kernel[(B, nb)](logits, g_arg, soft, idx_arg, part, S, N, nb, seed, float(tau), *strides, **common)
        _assign_norm_kernel[(B, nb)](
            logits,
            g_arg,
            attn,
            idx_arg,
            part,
            denom,
            S,
            N,
            nb,
            seed,
            float(tau),
            float(eps),
            *strides,
            **common,
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, noise if noise_given else None, idx, denom)
        ctx.cfg = (seed, float(tau), hard, gumbel, noise_given)
        return attn, soft

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_attn, grad_soft):  # type: ignore[override]
        logits, noise, idx, denom = ctx.saved_tensors
        seed, tau, hard, gumbel, noise_given = ctx.cfg
        if (grad_attn is None and grad_soft is None) or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        B, S, N = logits.shape
        block_s, block_n, num_warps = _blocks(S, N)
        nb = triton.cdiv(N, block_n)
        dx = torch.empty((B, S, N), dtype=logits.dtype, device=logits.device)
        part = torch.empty((B, nb, S), dtype=torch.float32, device=logits.device)
        ga = grad_attn if grad_attn is not None else dx  # never read when absent
        gs = grad_soft if grad_soft is not None else dx
        g_arg = noise if noise_given else logits
        strides = (*logits.stride(), *_noise_strides(noise))
        ga_strides = ga.stride() if grad_attn is not None else (0, 0, 0)
        gs_strides = gs.stride() if grad_soft is not None else (0, 0, 0)
        common = dict(
            HARD=hard, GUMBEL=gumbel, NOISE_GIVEN=noise_given, BLOCK_S=block_s, BLOCK_N=block_n, num_warps=num_warps
        )
        if grad_attn is not None:
            _assign_bwd_reduce_kernel[(B, nb)](
                logits,
                g_arg,
                idx if hard else part,
                ga,
                part,
                S,
                N,
                nb,
                seed,
                tau,
                *strides,
                *ga_strides,
                **common,
            )
        _assign_bwd_kernel[(B, nb)](
            logits,
            g_arg,
            denom,
            part,
            ga,
            gs,
            dx,
            S,
            N,
            nb,
            seed,
            tau,
            *strides,
            *ga_strides,
            *gs_strides,
            HAS_GA=grad_attn is not None,
            HAS_GS=grad_soft is not None,
            **common,
        )
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
    logits: torch.Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    gumbel: bool = True,
    eps: float = 1.0,
    seed: int | None = None,
    noise: torch.Tensor | None = None,
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
        index = z.argmax(dim=-2, keepdim=True)  # [B, 1, N], first max on ties
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
    logits: torch.Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    gumbel: bool = True,
    eps: float = 1.0,
    seed: int | None = None,
    noise: torch.Tensor | None = None,
    impl: str = "auto",
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
