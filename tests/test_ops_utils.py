"""The shared op helpers: the one float32 -> bfloat16 rounding (torch emulation and Triton helper),
and the index validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixreorg.ops import patch_gather_add, sample_gumbel
from mixreorg.ops._dispatch import has_triton
from mixreorg.ops.utils import BF16_NAN_BITS, check_index_range, check_index_tensor, f32_to_bf16_rtne_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the interpreter, set by conftest

# (float32 bits, bfloat16 bits of the rounded value): one row per edge of the rounding
EXACT = [
    (0x00000000, 0x0000),  # +0
    (0x80000000, 0x8000),  # -0
    (0x7F800000, 0x7F80),  # +inf
    (0xFF800000, 0xFF80),  # -inf
    (0x3F800000, 0x3F80),  # 1.0, exact
    (0x3F808000, 0x3F80),  # tie, even neighbour below: stays
    (0x3F818000, 0x3F82),  # tie, odd neighbour below: rounds up to even
    (0x3F808001, 0x3F81),  # just above the tie: up
    (0x3F807FFF, 0x3F80),  # just below the tie: down
    (0xBF818000, 0xBF82),  # negative tie, odd: away from zero to even
    (0x7F7FFFFF, 0x7F80),  # float32 max rounds up to +inf
    (0xFF7FFFFF, 0xFF80),  # -max rounds to -inf
    (0x7F7F7FFF, 0x7F7F),  # just below the overflow tie: stays finite (bf16 max)
    (0x00000001, 0x0000),  # smallest subnormal: to +0
    (0x80000001, 0x8000),  # smallest negative subnormal: to -0
    (0x00008000, 0x0000),  # subnormal tie, even: down to 0
    (0x00018000, 0x0002),  # subnormal tie, odd: up to even
    (0x00010000, 0x0001),  # smallest bf16 subnormal, exact
    (0x007FFFFF, 0x0080),  # largest subnormal rounds up into the normal range (FLT_MIN)
    (0x807FFFFF, 0x8080),  # and its negative
    (0x007F7FFF, 0x007F),  # largest subnormal that stays subnormal
    (0x00800000, 0x0080),  # FLT_MIN, exact
]
NANS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC00000, 0xFFC00000, 0xFF800001, 0x7FBFFFFF, 0xFFFF8001]


def _f32(bits: list[int]) -> torch.Tensor:
    """float32 tensor with exactly these bit patterns (given as unsigned 32-bit ints)."""
    signed = [b - (1 << 32) if b >= 1 << 31 else b for b in bits]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


def _bits(bf16: torch.Tensor) -> list[int]:
    return [b & 0xFFFF for b in bf16.view(torch.int16).tolist()]


def test_emulation_exact_values_and_torch_cast():
    x = _f32([f for f, _ in EXACT])
    got = f32_to_bf16_rtne_torch(x)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert _bits(got) == [b for _, b in EXACT]
    assert _bits(got) == _bits(x.to(torch.bfloat16))
    assert _bits(got) == [_bits(x[i : i + 1].to(torch.bfloat16))[0] for i in range(len(EXACT))]  # scalar path


def test_emulation_turns_every_nan_into_the_quiet_nan():
    """Any sign, any payload (incl. CUDA's canonical 0x7FFFFFFF, signalling NaNs): 0x7FC0."""
    x = _f32(NANS)
    got = f32_to_bf16_rtne_torch(x)
    assert torch.isnan(got).all() and torch.isnan(x.to(torch.bfloat16)).all()  # torch's bits differ
    assert _bits(got) == [BF16_NAN_BITS] * len(NANS)


@settings(deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=300))
def test_emulation_is_torch_cast_for_every_bit_pattern(bits):
    x = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    got, ref = f32_to_bf16_rtne_torch(x), x.to(torch.bfloat16)
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])


def test_emulation_keeps_shape_and_strides_semantics():
    x = torch.randn(4, 6).t()  # non-contiguous
    assert torch.equal(f32_to_bf16_rtne_torch(x), x.to(torch.bfloat16))
    with pytest.raises(ValueError, match="float32"):
        f32_to_bf16_rtne_torch(x.double())


# ------------------------------------------------------------------------ the Triton helper itself
if has_triton():
    import triton
    import triton.language as tl

    from mixreorg.ops.utils import block_range, f32_to_bf16_rtne

    @triton.jit
    def _round_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs, mask = block_range(tl.program_id(0), BLOCK, n)
        f = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.float32, bitcast=True)  # bits kept, NaNs too
        tl.store(out_ptr + offs, f32_to_bf16_rtne(f).to(tl.int16, bitcast=True), mask=mask)

    def _triton_round(x: torch.Tensor) -> torch.Tensor:
        bits = x.view(torch.int32).to(DEVICE)
        out = torch.empty(bits.shape, dtype=torch.int16, device=DEVICE)
        block = 256
        _round_kernel[(triton.cdiv(bits.numel(), block),)](bits, out, bits.numel(), BLOCK=block)
        return out.cpu().view(torch.bfloat16)


needs_triton = pytest.mark.skipif(not has_triton(), reason="needs triton")


@needs_triton
def test_triton_helper_is_the_emulation_bit_for_bit_nans_included():
    x = _f32([f for f, _ in EXACT] + NANS)
    assert _bits(_triton_round(x)) == _bits(f32_to_bf16_rtne_torch(x))


@needs_triton
@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=600))
def test_triton_helper_is_the_emulation_for_every_bit_pattern(bits):
    x = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    assert torch.equal(_triton_round(x).view(torch.int16), f32_to_bf16_rtne_torch(x).view(torch.int16))


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, on purpose
def test_kernels_store_bf16_through_the_helper():
    """The real kernels: the Gumbel noise kernel and the fused bf16 add of patch_gather_add (whose
    bf16 subnormal inputs also check the exact upcast ``to_f32``)."""
    g32 = sample_gumbel((3, 700), 5, device=DEVICE, impl="triton")
    g16 = sample_gumbel((3, 700), 5, dtype=torch.bfloat16, device=DEVICE, impl="triton")
    assert torch.equal(g16.view(torch.int16), f32_to_bf16_rtne_torch(g32).view(torch.int16))
    # y + x in fp32 over special values, rounded once: +-inf, inf - inf = NaN, ties, overflow
    B, L, C = 2, 3, len(EXACT)
    x = _f32([f for f, _ in EXACT]).to(torch.bfloat16).repeat(B, L, 1)
    y = torch.cat([x[..., 1:], x[..., :1]], dim=-1)  # pairs each value with its neighbour
    x[0, 0, :2] = torch.tensor([float("inf"), 1.0])
    y[0, 0, :2] = torch.tensor([-float("inf"), 2.0**-8])  # NaN; 1 + 2**-8 is a tie in bf16
    n = B * L
    perm = torch.randperm(n - 1, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([torch.zeros(1, dtype=torch.int64), 1 + perm])  # rows[0] = 0: out[0, 0] = y + x there
    inv = torch.argsort(rows)
    x, y, rows, inv = (t.to(DEVICE) for t in (x, y, rows, inv))
    out = patch_gather_add(y, x, rows, inv, impl="triton").cpu()
    gathered = x.cpu().reshape(n, C)[rows.cpu()].view(B, L, C)
    ref = f32_to_bf16_rtne_torch(y.cpu().float() + gathered.float())
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
    assert torch.isnan(out[0, 0, 0]) and out[0, 0, 1] == 1.0


# ------------------------------------------------------------------------ index validation
def test_check_index_tensor_names_the_problem():
    dev = torch.device("cpu")
    check_index_tensor("op", "rows", torch.arange(4), 4, dev)
    with pytest.raises(ValueError, match=r"op: rows must be a torch.Tensor, got list"):
        check_index_tensor("op", "rows", [0, 1], 2, dev)
    with pytest.raises(ValueError, match=r"op: rows must be int64, got torch.int32"):
        check_index_tensor("op", "rows", torch.arange(4, dtype=torch.int32), 4, dev)
    with pytest.raises(ValueError, match=r"op: idx must have shape \[4\].*got \(2, 2\)"):
        check_index_tensor("op", "idx", torch.arange(4).view(2, 2), 4, dev)
    with pytest.raises(ValueError, match=r"op: rows is on meta but the data is on cpu"):
        check_index_tensor("op", "rows", torch.arange(4, device="meta"), 4, dev)


def test_check_index_range_names_tensor_entry_value_and_range():
    good = torch.arange(5)
    check_index_range("op", [("a", good), ("b", good.flip(0)), ("empty", good[:0])], 5)
    with pytest.raises(ValueError, match=r"op: b\[3\] = 7 is out of range; valid rows are 0\.\.4"):
        check_index_range("op", [("a", good), ("b", torch.tensor([0, 1, 2, 7, 9]))], 5)
    with pytest.raises(ValueError, match=r"op: a\[1\] = -2 .*got values in \[-2, 4\]"):
        check_index_range("op", [("a", torch.tensor([0, -2, 4]))], 5)



@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    data=st.data(),
    levels=st.integers(1, 4),
    keepdim=st.booleans(),
)
def test_first_argmax_is_torch_argmax_on_ties_and_nans(shape, data, levels, keepdim) -> None:
    """``first_argmax`` returns exactly ``torch.argmax``'s indices over any dimension: the first
    maximum on ties (few distinct values make many) and NaN counted as the maximum."""
    from mixreorg.ops.utils import first_argmax

    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, shape, generator=g).float()
    if data.draw(st.booleans()):
        x[torch.rand(shape, generator=g) < 0.2] = float("nan")
    for t in (x, x.transpose(0, -1)):  # contiguous and strided inputs
        out = first_argmax(t, dim, keepdim=keepdim)
        assert torch.equal(out, torch.argmax(t, dim=dim, keepdim=keepdim))
