"""Properties of the patch mixing operator: invertibility, gradients, labels, backends."""

from __future__ import annotations

import unittest.mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixreorg.ops._dispatch as dispatch
import mixreorg.ops.patch_mix as patch_mix
import mixreorg.ops.utils as utils
from mixreorg.ops import (
    MixPlan,
    mix,
    mix_add,
    mix_add_reference,
    mix_reference,
    patch_gather,
    patch_gather_add,
    restore,
    restore_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
IMPLS = ["torch", "triton"]


@st.composite
def cases(draw):
    G = draw(st.integers(1, 5))
    n_groups = draw(st.sampled_from([1, 2, 3, 5]))  # odd group counts included
    L = draw(st.sampled_from([1, 2, 3, 5, 7, 11, 13, 16]))  # primes included
    C = draw(st.sampled_from([1, 2, 3, 5, 7, 17, 31]))
    pre = draw(st.integers(0, 2))
    suf = draw(st.integers(0, 2))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    impl = draw(st.sampled_from(IMPLS))
    return G * n_groups, G, L, C, pre, suf, dtype, seed, impl


def _tokens(B, L, C, pre, suf, dtype, seed, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        return torch.randn(B, L + pre + suf, C, generator=g).to(dtype)
    # a channel-major view: strides (C*Ltot, 1, Ltot)
    return torch.randn(B, C, L + pre + suf, generator=g).to(dtype).transpose(1, 2)


@settings(deadline=None)
@given(cases(), st.booleans())
def test_restore_mix_is_identity_bit_exact(case, contiguous):
    B, G, L, C, pre, suf, dtype, seed, impl = case
    plan = MixPlan.create(B, L, G, seed=seed)
    x = _tokens(B, L, C, pre, suf, dtype, seed, contiguous)
    kw = dict(num_prefix_tokens=pre, num_suffix_tokens=suf, impl=impl)
    mixed = mix(x, plan, **kw)
    assert mixed.dtype == dtype and mixed.shape == x.shape
    assert torch.equal(restore(mixed, plan, **kw), x)
    assert torch.equal(mix(restore(x, plan, **kw), plan, **kw), x)
    # prefix / suffix tokens untouched
    assert torch.equal(mixed[:, :pre], x[:, :pre])
    assert torch.equal(mixed[:, pre + L :], x[:, pre + L :])


@settings(deadline=None)
@given(cases())
def test_labels_say_where_each_patch_comes_from(case):
    B, G, L, C, pre, suf, dtype, seed, impl = case
    plan = MixPlan.create(B, L, G, seed=seed)
    x = _tokens(B, L, C, pre, suf, dtype, seed)
    mixed = mix(x, plan, num_prefix_tokens=pre, num_suffix_tokens=suf, impl=impl)
    group_base = (torch.arange(B) // G * G).view(B, 1)
    source = group_base + plan.labels  # [B, L]
    assert torch.equal(source, plan.src)
    assert plan.labels.min() >= 0 and plan.labels.max() < G
    expected = x[source, torch.arange(L).view(1, L) + pre]  # [B, L, C] by advanced indexing
    assert torch.equal(mixed[:, pre : pre + L], expected)
    # every patch of every source image appears exactly once per group and position
    for g in range(B // G):
        block = plan.labels[g * G : (g + 1) * G]  # [G, L]
        assert torch.equal(block.sort(dim=0).values, torch.arange(G).view(G, 1).expand(G, L))


@settings(deadline=None)
@given(cases())
def test_vjp_of_mix_is_restore_and_vice_versa(case):
    B, G, L, C, pre, suf, dtype, seed, impl = case
    plan = MixPlan.create(B, L, G, seed=seed)
    kw = dict(num_prefix_tokens=pre, num_suffix_tokens=suf, impl=impl)
    x = _tokens(B, L, C, pre, suf, dtype, seed).requires_grad_()
    cot = _tokens(B, L, C, pre, suf, dtype, seed + 1)
    (gx,) = torch.autograd.grad(mix(x, plan, **kw), x, cot)
    assert torch.equal(gx, restore(cot, plan, **kw))
    (gx,) = torch.autograd.grad(restore(x, plan, **kw), x, cot)
    assert torch.equal(gx, mix(cot, plan, **kw))


@settings(deadline=None)
@given(cases())
def test_mix_add_matches_mix_then_add_and_its_gradients(case):
    B, G, L, C, pre, suf, dtype, seed, impl = case
    plan = MixPlan.create(B, L, G, seed=seed)
    kw = dict(num_prefix_tokens=pre, num_suffix_tokens=suf)
    x = _tokens(B, L, C, pre, suf, dtype, seed).requires_grad_()
    y = _tokens(B, L, C, pre, suf, dtype, seed + 7).requires_grad_()
    out = mix_add(y, x, plan, impl=impl, **kw)
    assert torch.equal(out, y + mix_reference(x, plan, **kw))
    assert torch.equal(out, mix_add_reference(y, x, plan, **kw))
    cot = _tokens(B, L, C, pre, suf, dtype, seed + 3)
    gy, gx = torch.autograd.grad(out, (y, x), cot)
    assert torch.equal(gy, cot)
    assert torch.equal(gx, restore_reference(cot, plan, **kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (6, 7, 13), (12, 49, 33), (4, 196, 384)])
def test_triton_matches_torch_bit_exact(dtype, shape):
    B, L, C = shape
    G = 2 if B % 2 == 0 else 1
    plan = MixPlan.create(B, L, G, seed=B * L + C)
    x = torch.randn(B, L + 1, C).to(dtype)
    y = torch.randn(B, L + 1, C).to(dtype)
    kw = dict(num_prefix_tokens=1)
    assert torch.equal(mix(x, plan, impl="triton", **kw), mix(x, plan, impl="torch", **kw))
    assert torch.equal(restore(x, plan, impl="triton", **kw), restore(x, plan, impl="torch", **kw))
    assert torch.equal(mix_add(y, x, plan, impl="triton", **kw), mix_add(y, x, plan, impl="torch", **kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_special_values_pass_through_bit_for_bit(impl):
    B, L, C = 4, 5, 3
    plan = MixPlan.create(B, L, 2, seed=0)
    bits = torch.randint(-(2**31), 2**31 - 1, (B, L, C), dtype=torch.int32)
    bits[0, 0, 0] = 0x7FC00001  # quiet NaN with a payload
    bits[1, 2, 1] = -0x00400001  # a negative NaN (sign bit set)
    bits[2, 3, 2] = 0x7F800000  # +inf
    bits[3, 4, 0] = -(2**31)  # -0.0
    x = bits.view(torch.float32)
    mixed = mix(x, plan, impl=impl)
    assert torch.equal(mix(x.view(torch.int32), plan, impl="torch").view(torch.float32).view(torch.int32),
                       mixed.view(torch.int32))
    assert torch.equal(restore(mixed, plan, impl=impl).view(torch.int32), bits)


def test_same_seed_same_plan_and_generator_reproducible():
    a = MixPlan.create(32, 49, 16, seed=123)
    b = MixPlan.create(32, 49, 16, seed=123)
    c = MixPlan.create(32, 49, 16, seed=124)
    assert torch.equal(a.src, b.src) and torch.equal(a.labels, b.labels) and torch.equal(a.inv, b.inv)
    assert not torch.equal(a.src, c.src)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(MixPlan.create(8, 9, 4, generator=g1).src, MixPlan.create(8, 9, 4, generator=g2).src)


def test_group_size_one_is_identity_and_group_of_whole_batch():
    x = torch.randn(5, 7, 3)
    assert torch.equal(mix(x, MixPlan.create(5, 7, 1, seed=0)), x)
    plan = MixPlan.create(5, 7, 5, seed=0)
    assert plan.num_groups == 1 and plan.labels.max() <= 4


def test_plan_inverse_and_from_permutation():
    pi = torch.tensor([[[1, 0], [0, 1], [1, 0]]])  # one group, L=3, G=2
    plan = MixPlan.from_permutation(pi, grid=(1, 3))
    x = torch.arange(2 * 3).view(2, 3, 1).float()
    assert mix(x, plan).flatten().tolist() == [3.0, 1.0, 5.0, 0.0, 4.0, 2.0]
    assert torch.equal(mix(x, plan.inverse()), restore(x, plan))
    with pytest.raises(ValueError, match="permutation"):
        MixPlan.from_permutation(torch.tensor([[[0, 0]]]))


def test_pixel_labels_upsample_the_patch_grid():
    plan = MixPlan.create(4, 6, 2, grid=(2, 3), seed=0)
    px = plan.pixel_labels(4)
    assert px.shape == (4, 8, 12)
    assert torch.equal(px[:, ::4, ::4], plan.label_grid())
    px2 = plan.pixel_labels((2, 3))
    assert px2.shape == (4, 4, 9)
    assert torch.equal(px2[:, 1::2, 2::3], plan.label_grid())


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=10, num_patches=4, group_size=4), "not divisible"),
        (dict(batch_size=8, num_patches=4, group_size=0), "group_size"),
        (dict(batch_size=8, num_patches=4, group_size=-2), "group_size"),
        (dict(batch_size=8, num_patches=0, group_size=2), "num_patches"),
        (dict(batch_size=8, num_patches=6, group_size=2, grid=(2, 2)), "grid"),
    ],
)
def test_bad_plans_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixPlan.create(**kwargs)


def test_bad_inputs_raise_clear_errors():
    plan = MixPlan.create(8, 4, 4, seed=0)
    with pytest.raises(ValueError, match="rank 3"):
        mix(torch.randn(8, 4), plan)
    with pytest.raises(ValueError, match="batch size 8"):
        mix(torch.randn(4, 4, 2), plan)
    with pytest.raises(ValueError, match="4 patch tokens"):
        mix(torch.randn(8, 5, 2), plan)
    with pytest.raises(ValueError, match="4 patch tokens"):
        mix(torch.randn(8, 5, 2), plan, num_prefix_tokens=2)
    with pytest.raises(ValueError, match="plan is on cpu"):
        mix(torch.randn(8, 4, 2, device="meta"), plan)
    with pytest.raises(ValueError, match="MixPlan"):
        mix(torch.randn(8, 4, 2), "not a plan")
    with pytest.raises(ValueError, match="same shape"):
        mix_add(torch.randn(8, 4, 3), torch.randn(8, 4, 2), plan)
    with pytest.raises(ValueError, match="impl must be one of"):
        mix(torch.randn(8, 4, 2), plan, impl="cuda")


def test_explicit_triton_request_that_cannot_run_says_why(monkeypatch):
    plan = MixPlan.create(4, 4, 2, seed=0)
    x = torch.randn(4, 4, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mix(x, plan, impl="triton")
    monkeypatch.setattr(dispatch, "has_triton", lambda: False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        mix(x, plan, impl="triton")
    # auto falls back to torch on CPU, silently and correctly
    assert torch.equal(mix(x, plan, impl="auto"), mix_reference(x, plan))


def test_auto_uses_torch_on_cpu_even_under_the_interpreter():
    x = torch.randn(4, 4, 2)
    assert dispatch.select_impl("auto", [x], "mix") == "torch"
    assert dispatch.select_impl("triton", [x], "mix") == "triton"  # interpreter set by conftest


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile_traces_without_graph_breaks(impl):
    plan = MixPlan.create(4, 6, 2, seed=0)

    def f(x, y):
        m = mix(x, plan, num_prefix_tokens=1, impl=impl)
        m = mix_add(m, y, plan, num_prefix_tokens=1, impl=impl)
        return restore(m, plan, num_prefix_tokens=1, impl=impl).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 7, 3, requires_grad=True)
    y = torch.randn(4, 7, 3, requires_grad=True)
    out = compiled(x, y)
    ref = f(x, y)
    assert torch.equal(out, ref)
    gx, gy = torch.autograd.grad(out, (x, y))
    rx, ry = torch.autograd.grad(ref, (x, y))
    assert torch.equal(gx, rx) and torch.equal(gy, ry)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_triton_matches_torch(dtype):
    B, L, C = 32, 196, 384
    plan = MixPlan.create(B, L, 16, seed=0, device="cuda")
    x = torch.randn(B, L + 1, C, device="cuda").to(dtype)
    y = torch.randn(B, L + 1, C, device="cuda").to(dtype)
    for f in (mix, restore):
        kw = dict(num_prefix_tokens=1)
        assert torch.equal(f(x, plan, impl="triton", **kw), f(x, plan, impl="torch", **kw))
    assert torch.equal(mix_add(y, x, plan, num_prefix_tokens=1, impl="triton"),
                       mix_add(y, x, plan, num_prefix_tokens=1, impl="torch"))
    assert dispatch.select_impl("auto", [x], "mix") == "triton"


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool, torch.int32, torch.int64, torch.complex64])
@pytest.mark.parametrize("C", [1, 3, 4, 8, 12])
def test_data_movement_of_any_dtype_and_row_width(dtype, C):
    """The torch path copies rows as wide integer words when it can: check it for every row width."""
    B, L = 4, 5
    plan = MixPlan.create(B, L, 2, seed=C)
    x = (torch.randn(B, L + 1, C) * 100).to(dtype) if dtype is not torch.bool else torch.rand(B, L + 1, C) > 0.5
    mixed = mix(x, plan, num_prefix_tokens=1, impl="torch")
    expected = x[torch.cat([torch.arange(B).view(B, 1), plan.src], 1), torch.arange(L + 1).view(1, L + 1)]
    assert torch.equal(mixed, expected)
    assert torch.equal(restore(mixed, plan, num_prefix_tokens=1, impl="torch"), x)
    offset = x[:, :, 1:] if C > 1 else x  # a view whose rows do not start on a word boundary
    assert torch.equal(restore(mix(offset, plan, num_prefix_tokens=1), plan, num_prefix_tokens=1), offset)


# ------------------------------------------------------------------------ patch_gather validation
def _tables(n, seed=0):
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return rows, torch.argsort(rows)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["rows", "inv_rows"])
@pytest.mark.parametrize("bad, pattern", [(-1, r"= -1 is out of range"), (24, r"= 24 is out of range"),
                                          (10**12, r"= 1000000000000 is out of range")])
def test_patch_gather_rejects_out_of_range_rows(impl, which, bad, pattern):
    """Out-of-range rows would be an out-of-bounds read in the kernel: a ValueError naming the
    tensor, the entry, the value and the valid range, for both ops and both backends."""
    x, y = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    tables = dict(zip(("rows", "inv_rows"), _tables(24)))
    tables[which][5] = bad
    match = rf"{which}\[5\] {pattern}; valid rows are 0\.\.23 \(24 flat rows\)"
    with pytest.raises(ValueError, match=r"patch_gather: " + match):
        patch_gather(x, tables["rows"], tables["inv_rows"], impl=impl)
    with pytest.raises(ValueError, match=r"patch_gather_add: " + match):
        patch_gather_add(y, x, tables["rows"], tables["inv_rows"], impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_patch_gather_rejects_bad_row_tables(impl):
    x = torch.randn(4, 6, 3)
    rows, inv = _tables(24)
    cases = [
        ((rows.int(), inv), r"patch_gather: rows must be int64, got torch.int32"),
        ((rows, inv.float()), r"patch_gather: inv_rows must be int64, got torch.float32"),
        ((rows[:23], inv), r"rows must have shape \[24\] \(one entry per flat row\), got \(23,\)"),
        ((rows, torch.cat([inv, inv])), r"inv_rows must have shape \[24\].*got \(48,\)"),
        ((rows.view(4, 6), inv), r"rows must have shape \[24\].*got \(4, 6\)"),
        ((rows.to("meta"), inv), r"rows is on meta but the data is on cpu"),
        ((rows.tolist(), inv), r"rows must be a torch.Tensor, got list"),
    ]
    for (r, i), match in cases:
        with pytest.raises(ValueError, match=match):
            patch_gather(x, r, i, impl=impl)
    with pytest.raises(ValueError, match=r"patch_gather: x must be a \[B, L, C\] tensor \(rank 3\), got \(24, 3\)"):
        patch_gather(x.view(24, 3), rows, inv, impl=impl)
    with pytest.raises(ValueError, match=r"patch_gather_add: y and x must have the same shape, dtype and device"):
        patch_gather_add(x.double(), x, rows, inv, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_patch_gather_is_the_reference_and_differentiable(impl):
    x = torch.randn(3, 5, 4, requires_grad=True)
    y = torch.randn(3, 5, 4, requires_grad=True)
    rows, inv = _tables(15, seed=3)
    out = patch_gather_add(y, x, rows, inv, impl=impl)
    assert torch.equal(out, y + x.reshape(15, 4)[rows].view(3, 5, 4))
    assert torch.equal(patch_gather(x, rows, inv, impl=impl), x.reshape(15, 4)[rows].view(3, 5, 4))
    cot = torch.randn(3, 5, 4)
    gy, gx = torch.autograd.grad(out, (y, x), cot)
    assert torch.equal(gy, cot) and torch.equal(gx, cot.reshape(15, 4)[inv].view(3, 5, 4))


def test_patch_gather_checks_rows_when_compiled():
    """The range check runs inside the custom op, so a compiled graph keeps it (and has no break)."""
    x = torch.randn(2, 3, 4)
    rows, inv = _tables(6)
    f = torch.compile(lambda x, r, i: patch_gather(x, r, i, impl="torch"), backend="aot_eager", fullgraph=True)
    assert torch.equal(f(x, rows, inv), x.reshape(6, 4)[rows].view(2, 3, 4))
    bad = rows.clone()
    bad[2] = 6
    with pytest.raises(ValueError, match=r"rows\[2\] = 6 is out of range"):
        f(x, bad, inv)


# ------------------------------------------------------------------ large outputs (huge-page hint)
@settings(deadline=None)
@given(st.integers(0, 2**47), st.integers(0, 2**31))
def test_huge_page_range_is_the_whole_pages_inside_the_block(ptr, nbytes):
    """The hint must never reach bytes outside the block: they may belong to other allocations."""
    page = 2 << 20
    span = utils.huge_page_range(ptr, nbytes)
    if span is None:
        assert -(-ptr // page) * page + page > ptr + nbytes  # not one whole page fits
        return
    start, length = span
    assert start % page == 0 and length % page == 0 and length > 0
    assert ptr <= start and start + length <= ptr + nbytes
    assert start - ptr < page and ptr + nbytes - (start + length) < page  # and none is left out


def test_empty_output_hints_only_large_cpu_blocks(monkeypatch):
    calls = []
    monkeypatch.setattr(utils, "_madvise", lambda: lambda start, length, advice: calls.append((start, length, advice)))
    like = torch.empty(0, dtype=torch.bfloat16)
    small = utils.empty_output((utils.HUGE_PAGE_MIN_BYTES // 2 - 1,), like)
    assert small.dtype == torch.bfloat16 and not calls
    big = utils.empty_output((4, utils.HUGE_PAGE_MIN_BYTES // 8), like)
    assert big.shape == (4, utils.HUGE_PAGE_MIN_BYTES // 8) and big.dtype == torch.bfloat16
    ((start, length, advice),) = calls
    assert advice == 14 and (start, length) == utils.huge_page_range(big.data_ptr(), big.nbytes)
    assert utils.empty_output((8, 2**20), torch.empty(0, device="meta")).device.type == "meta" and len(calls) == 1


def _random_bits(shape, dtype, seed):
    """Tokens of ``dtype`` with uniformly random bits: NaNs with payloads, -0.0, subnormals, infs."""
    g = torch.Generator().manual_seed(seed)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    info = torch.iinfo(ints)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=ints).view(dtype)


def _bits(t):
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


@st.composite
def large_cases(draw):
    """Shapes whose outputs span whole 2 MiB pages (so the hint is really given), rows of any width."""
    G = draw(st.sampled_from([2, 4, 16]))
    B = G * draw(st.integers(1, 2))
    L = draw(st.sampled_from([49, 196]))
    pre, suf = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    dtype = draw(st.sampled_from(DTYPES))
    C = -(-_LARGE_TEST_BYTES // (B * (L + pre + suf) * dtype.itemsize)) + draw(st.integers(0, 3))
    return B, G, L, C, pre, suf, dtype, draw(st.integers(0, 2**31 - 1)), draw(st.booleans())


_LARGE_TEST_BYTES = 4 << 20  # at least one whole 2 MiB page inside, wherever the block starts


@settings(deadline=None, max_examples=25)
@given(large_cases())
def test_large_outputs_are_bit_exact_forward_and_backward(case):
    """With the hint's threshold lowered to 2 MiB, every output here takes the huge-page path:
    random bit patterns (NaN payloads, -0.0) come out bit for bit, for mix, restore and mix_add,
    forward and backward, contiguous and channel-major inputs."""
    B, G, L, C, pre, suf, dtype, seed, contiguous = case
    plan = MixPlan.create(B, L, G, seed=seed)
    Lt = L + pre + suf
    x = _random_bits((B, Lt, C) if contiguous else (B, C, Lt), dtype, seed)
    x = (x if contiguous else x.transpose(1, 2)).requires_grad_()
    cot = _random_bits((B, Lt, C), dtype, seed + 1)
    kw = dict(num_prefix_tokens=pre, num_suffix_tokens=suf)
    rows = torch.cat([torch.arange(B).view(B, 1).expand(B, pre), plan.src,
                      torch.arange(B).view(B, 1).expand(B, suf)], 1)
    expected = x.detach()[rows, torch.arange(Lt).view(1, Lt)]  # advanced indexing, no custom op
    hints = []
    real = utils._madvise()
    with (unittest.mock.patch.object(utils, "HUGE_PAGE_MIN_BYTES", 2 << 20),
          unittest.mock.patch.object(utils, "_madvise", lambda: lambda *a: hints.append(a) or real(*a))):
        mixed = mix(x, plan, impl="torch", **kw)
        assert torch.equal(_bits(mixed), _bits(expected))
        assert torch.equal(_bits(restore(mixed, plan, impl="torch", **kw)), _bits(x.detach()))
        (gx,) = torch.autograd.grad(mixed, x, cot)
        assert torch.equal(_bits(gx), _bits(restore_reference(cot, plan, **kw)))
        y = _random_bits((B, Lt, C), dtype, seed + 2)
        out = mix_add(y, x.detach(), plan, impl="torch", **kw)
        assert torch.equal(_bits(out), _bits(mix_add_reference(y, x.detach(), plan, **kw)))
    assert len(hints) == 4  # mixed, restored, the gradient, the mix_add output


@settings(deadline=None)
@given(st.integers(1000, 2100), st.sampled_from(DTYPES + [torch.int8, torch.int32]), st.integers(0, 2),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_rows_cut_into_pieces_are_bit_exact_forward_and_backward(row_bytes, dtype, pre, contiguous, seed):
    """Rows of 1-2 KiB are gathered as pieces of <= 512 B (patch_mix._split_rows): every width
    around that band (odd ones included), every dtype, both layouts, bits forward and backward."""
    C = max(1, row_bytes // dtype.itemsize)
    B, L, G = 4, 3, 2
    plan = MixPlan.create(B, L, G, seed=seed)
    Lt = L + pre
    x = _random_bits((B, Lt, C) if contiguous else (B, C, Lt), dtype, seed)
    x = x if contiguous else x.transpose(1, 2)
    rows = torch.cat([torch.arange(B).view(B, 1).expand(B, pre), plan.src], 1)
    mixed = mix(x, plan, num_prefix_tokens=pre, impl="torch")
    assert torch.equal(_bits(mixed), _bits(x[rows, torch.arange(Lt).view(1, Lt)]))
    assert torch.equal(_bits(restore(mixed, plan, num_prefix_tokens=pre, impl="torch")), _bits(x))
    if dtype.is_floating_point:
        xg = x.detach().requires_grad_()
        cot = _random_bits((B, Lt, C), dtype, seed + 1)
        (gx,) = torch.autograd.grad(mix(xg, plan, num_prefix_tokens=pre, impl="torch"), xg, cot)
        assert torch.equal(_bits(gx), _bits(restore_reference(cot, plan, num_prefix_tokens=pre)))


@pytest.mark.parametrize("C, dtype, pieces", [
    (384, torch.float32, 3), (768, torch.bfloat16, 3), (256, torch.float64, 4), (385, torch.float32, 5),
    (256, torch.float32, 1), (512, torch.float64, 1),  # 1 KiB and 4 KiB rows stay whole
    (1031, torch.int8, 1),  # a prime width: no piece of 128..512 B tiles it
])
def test_split_rows_cuts_only_the_1_to_2_kib_band(C, dtype, pieces):
    """Which widths are cut, into how many pieces (1: left whole); the table follows the pieces."""
    src = patch_mix._wide_rows(_random_bits((6, C), dtype, 0))
    rows = torch.tensor([5, 0, 3, 1, 4, 2])
    s, d, r = patch_mix._split_rows(src, torch.empty_like(src), rows)
    assert s.shape[0] == d.shape[0] == 6 * pieces and r.shape == (6 * pieces,)
    if pieces > 1:
        assert 128 <= s.element_size() * s.shape[1] <= 512
    assert torch.equal(torch.index_select(s, 0, r).view(6, -1), src[rows])


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_over_the_real_threshold_are_bit_exact(dtype, contiguous):
    """A >= 32 MiB output under the shipped threshold (no patching): forward and backward bits."""
    B, L, C = 32, 196, utils.HUGE_PAGE_MIN_BYTES // (32 * 196 * dtype.itemsize) + 1
    plan = MixPlan.create(B, L, 16, seed=1)
    x = _random_bits((B, L, C) if contiguous else (B, C, L), dtype, 0)
    x = (x if contiguous else x.transpose(1, 2)).requires_grad_()
    cot = _random_bits((B, L, C), dtype, 1)
    mixed = mix(x, plan)
    assert mixed.nbytes >= utils.HUGE_PAGE_MIN_BYTES
    assert torch.equal(_bits(mixed), _bits(x.detach()[plan.src, torch.arange(L)]))
    (gx,) = torch.autograd.grad(mixed, x, cot)
    assert torch.equal(_bits(gx), _bits(restore_reference(cot, plan)))
