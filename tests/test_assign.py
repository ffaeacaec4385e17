"""The Gumbel assignment op: reference == GroupViT/HF, Triton == reference, edges, determinism."""

from __future__ import annotations

import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixreorg.ops._dispatch as dispatch
import mixreorg.ops.assign as assign_mod
from mixreorg.ops import gumbel_assign, gumbel_assign_reference, sample_gumbel

TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=1e-2, rtol=2e-2),
}
HALF = [torch.float32, torch.float16, torch.bfloat16]


def _logits(B, S, N, dtype=torch.float32, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, N, generator=g) * scale).to(dtype)


def _run(fn, x, ga, gs, **kw):
    """Forward + backward of ``sum(attn * ga) + sum(soft * gs)``; returns (attn, soft, dlogits)."""
    x = x.detach().clone().requires_grad_()
    attn, soft = fn(x, **kw)
    loss = 0.0
    if ga is not None:
        loss = loss + (attn.float() * ga).sum()
    if gs is not None:
        loss = loss + (soft.float() * gs).sum()
    (dx,) = torch.autograd.grad(loss, x)
    return attn, soft, dx


def _compare(x, *, noise, ga=True, gs=True, seed=0, **kw):
    """Triton (interpreter) vs reference, same noise: forward values and gradients."""
    B, S, N = x.shape
    gen = torch.Generator().manual_seed(seed + 1)
    ga = torch.randn(B, S, N, generator=gen).to(x.device) if ga else None
    gs = torch.randn(B, S, N, generator=gen).to(x.device) if gs else None
    ref = _run(gumbel_assign_reference, x, ga, gs, noise=noise, **kw)
    tri = _run(lambda t, **k: gumbel_assign(t, impl="triton", **k), x, ga, gs, noise=noise, **kw)
    for name, r, t in zip(("attn", "soft", "grad"), ref, tri):
        tol = dict(TOL[x.dtype])
        if name == "grad":  # dx = dz / tau: rounding in dz is amplified by 1 / tau
            tol["atol"] *= max(1.0, 1.0 / kw.get("tau", 1.0))
        assert t.dtype == x.dtype and t.shape == x.shape, name
        assert torch.isfinite(t).all(), name
        torch.testing.assert_close(t, r, **tol, msg=lambda m, name=name: f"{name}: {m}")
    return ref, tri


# ---------------------------------------------------------------------------------------------
# the reference is GroupViT / Hugging Face
# ---------------------------------------------------------------------------------------------
def _hf():
    from transformers.models.groupvit import modeling_groupvit

    return modeling_groupvit


def test_reference_is_hugging_face_groupvit_bit_exact():
    """Same global RNG state -> the same noise, values and straight-through gradients as HF."""
    hf = _hf()
    x = _logits(3, 8, 50).requires_grad_()
    g = torch.randn(3, 8, 50)
    for hard in (True, False):
        torch.manual_seed(7)
        a = hf.gumbel_softmax(x, dim=-2, hard=hard)
        a = a / (a.sum(-1, keepdim=True) + 1.0)
        torch.manual_seed(7)
        b, soft = gumbel_assign_reference(x, hard=hard)
        assert torch.equal(a, b)
        assert torch.equal(soft, torch.softmax(x, dim=-2))
        assert torch.equal(*(torch.autograd.grad((t * g).sum(), x)[0] for t in (a, b)))
    # eval: HF's hard_softmax (arg-max, straight-through, no noise)
    a = hf.hard_softmax(x, dim=-2)
    a = a / (a.sum(-1, keepdim=True) + 1.0)
    b, _ = gumbel_assign_reference(x, gumbel=False)
    assert torch.equal(a, b)
    assert torch.equal(*(torch.autograd.grad((t * g).sum(), x)[0] for t in (a, b)))


def test_sample_gumbel_torch_is_torch_distributions_gumbel():
    torch.manual_seed(3)
    ref = torch.distributions.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).sample((4, 5, 6))
    torch.manual_seed(3)
    assert torch.equal(sample_gumbel((4, 5, 6)), ref)
    assert torch.equal(sample_gumbel((4, 5, 6), 11), sample_gumbel((4, 5, 6), 11))
    gen = torch.Generator().manual_seed(11)
    assert torch.equal(sample_gumbel((4, 5, 6), generator=gen), sample_gumbel((4, 5, 6), 11))
    assert not torch.equal(sample_gumbel((4, 5, 6), 11), sample_gumbel((4, 5, 6), 12))
    assert sample_gumbel((2, 3), 1, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float64])
@pytest.mark.parametrize("gumbel", [True, False])
def test_reference_gradcheck_soft_path_fp64(dtype, gumbel):
    """The smooth path (hard=False) incl. the token normalisation, against finite differences."""
    x = _logits(1, 3, 5, dtype, scale=1.0).requires_grad_()
    noise = sample_gumbel(x.shape, 0, dtype=dtype)
    for eps in (1.0, 0.0):

        def f(t, eps=eps):
            return gumbel_assign_reference(t, hard=False, gumbel=gumbel, noise=noise, tau=0.7, eps=eps)

        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_reference_hard_gradient_is_straight_through_of_soft_fp64():
    """d attn_hard / dx == d/dx [y / (sum_n A + eps)] with A's value frozen at the one-hot."""
    x = _logits(2, 4, 6, torch.float64).requires_grad_()
    noise = sample_gumbel(x.shape, 5, dtype=torch.float64)
    g = torch.randn(2, 4, 6, dtype=torch.float64)
    attn, _ = gumbel_assign_reference(x, noise=noise, tau=0.5)
    (d_hard,) = torch.autograd.grad((attn * g).sum(), x)
    y = torch.softmax((x + noise) / 0.5, dim=-2)
    one_hot = torch.nn.functional.one_hot(y.argmax(-2), 4).transpose(1, 2).to(y)
    a = one_hot + (y - y.detach())
    (d_st,) = torch.autograd.grad((a / (a.sum(-1, keepdim=True) + 1.0) * g).sum(), x)
    torch.testing.assert_close(d_hard, d_st, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) == reference with the same noise
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(2, 1, 7), (2, 3, 49), (1, 8, 7), (2, 64, 49), (1, 64, 197)])
@pytest.mark.parametrize("hard", [True, False])
def test_triton_matches_reference_same_noise(dtype, shape, hard):
    x = _logits(*shape, dtype=dtype, seed=sum(shape))
    noise = sample_gumbel(shape, 1, dtype=dtype)
    _compare(x, noise=noise, hard=hard, gumbel=True)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("hard", [True, False])
def test_triton_matches_reference_eval(dtype, hard):
    _compare(_logits(2, 8, 49, dtype=dtype, seed=4), noise=None, hard=hard, gumbel=False)


@settings(max_examples=int(os.environ.get("ASSIGN_EXAMPLES", 25)), deadline=None)
@given(
    B=st.integers(1, 2),
    S=st.sampled_from([1, 2, 3, 5, 8, 13]),
    N=st.sampled_from([1, 2, 7, 31, 49]),
    tau=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    eps=st.sampled_from([0.0, 0.5, 1.0]),
    hard=st.booleans(),
    gumbel=st.booleans(),
    which=st.sampled_from(["both", "attn", "soft"]),
    tile=st.sampled_from([2048, 64]),  # 64: many token blocks, exercises the partial sums
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_property(B, S, N, tau, eps, hard, gumbel, which, tile, seed):
    x = _logits(B, S, N, seed=seed, scale=3.0)
    noise = sample_gumbel(x.shape, seed) if gumbel else None
    with mock.patch.object(assign_mod, "_TILE_ELEMS", tile):
        _compare(
            x,
            noise=noise,
            tau=tau,
            eps=eps,
            hard=hard,
            gumbel=gumbel,
            seed=seed,
            ga=which != "soft",
            gs=which != "attn",
        )


def test_triton_strided_inputs_and_expanded_grads():
    """Non-contiguous logits / noise and a stride-0 upstream gradient (from .sum())."""
    base = _logits(2, 37, 5)  # [B, N, S] storage, viewed as [B, S, N]
    x = base.transpose(1, 2).requires_grad_()
    noise = sample_gumbel((2, 37, 5), 2).transpose(1, 2)
    assert not x.is_contiguous() and not noise.is_contiguous()
    outs = []
    for impl in ("torch", "triton"):
        attn, soft = gumbel_assign(x, noise=noise, impl=impl)
        (dx,) = torch.autograd.grad(attn.sum() + 0.5 * soft[:, 1].sum(), x)
        outs.append((attn, soft, dx))
    for r, t in zip(*outs):
        torch.testing.assert_close(t, r, **TOL[torch.float32])


def test_triton_in_kernel_noise_is_sample_gumbel_triton_stream():
    """No noise tensor: Philox(seed) in the kernel == the materialised stream, fwd and bwd."""
    x = _logits(2, 5, 37)
    noise = sample_gumbel(x.shape, 1234, impl="triton")
    g = torch.Generator().manual_seed(0)
    ga, gs = torch.randn(2, 5, 37, generator=g), torch.randn(2, 5, 37, generator=g)
    for hard in (True, False):
        a = _run(lambda t, **k: gumbel_assign(t, impl="triton", **k), x, ga, gs, seed=1234, hard=hard)
        b = _run(lambda t, **k: gumbel_assign(t, impl="triton", **k), x, ga, gs, noise=noise, hard=hard)
        c = _run(gumbel_assign_reference, x, ga, gs, noise=noise, hard=hard)
        for ta, tb, tc in zip(a, b, c):
            assert torch.equal(ta, tb)  # bit-identical
            torch.testing.assert_close(ta, tc, **TOL[torch.float32])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_deterministic_for_a_seed(impl):
    x = _logits(2, 8, 49)
    a1, s1 = gumbel_assign(x, seed=42, impl=impl)
    a2, s2 = gumbel_assign(x, seed=42, impl=impl)
    a3, _ = gumbel_assign(x, seed=43, impl=impl)
    assert torch.equal(a1, a2) and torch.equal(s1, s2)
    assert not torch.equal(a1, a3)
    # without a seed: governed by torch's global RNG
    torch.manual_seed(5)
    b1, _ = gumbel_assign(x, impl=impl)
    torch.manual_seed(5)
    b2, _ = gumbel_assign(x, impl=impl)
    assert torch.equal(b1, b2)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gumbel_noise_distribution(impl):
    """Noise is Gumbel(0, 1) (mean = Euler's gamma, var = pi^2 / 6), finite, never log(0)."""
    n = sample_gumbel((1 << 16,), 99, impl=impl)
    assert torch.isfinite(n).all()
    assert n.min() > -4.5 and n.max() < 16.0  # u in [tiny, 1 - eps]
    assert abs(n.mean().item() - 0.5772157) < 0.02
    assert abs(n.var().item() - math.pi**2 / 6) < 0.05
    u = torch.exp(-torch.exp(-n.double()))  # the inverse CDF: U should be uniform on (0, 1)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs((u < 0.1).double().mean().item() - 0.1) < 0.01


# ---------------------------------------------------------------------------------------------
# properties of the assignment
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", HALF)
def test_eval_hard_is_exact_argmax_one_hot_normalised(impl, dtype):
    # small integers: many ties, which go to the first (lowest) group
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (2, 5, 31), generator=g).to(dtype)
    x[0, :, 0] = 1.0  # a full tie
    eps = 1.0
    attn, soft = gumbel_assign(x, gumbel=False, eps=eps, impl=impl)
    index = x.float().argmax(dim=-2)  # first max
    one_hot = torch.nn.functional.one_hot(index, 5).transpose(1, 2).float()  # [B, S, N]
    expected = one_hot / (one_hot.sum(-1, keepdim=True) + eps)
    assert attn[0, 0, 0] > 0 and (attn[0, 1:, 0] == 0).all()
    assert torch.equal(attn > 0, one_hot > 0)
    torch.testing.assert_close(attn.float(), expected.to(dtype).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(soft.float(), torch.softmax(x.float(), -2), **TOL[dtype])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_hard_columns_sum_to_one(impl):
    """Every token goes to exactly one group: un-normalised hard map columns sum to 1."""
    x = _logits(2, 8, 49)
    eps = 1.0
    for gumbel in (True, False):
        attn, soft = gumbel_assign(x, gumbel=gumbel, seed=3 if gumbel else None, eps=eps, impl=impl)
        support = attn > 0
        assert (support.sum(-2) == 1).all()  # one group per token
        counts = support.sum(-1, keepdim=True).float()
        hard_map = attn * (counts + eps)  # undo the token normalisation
        torch.testing.assert_close(hard_map.sum(-2), torch.ones(2, 49), atol=1e-6, rtol=0)
        torch.testing.assert_close(soft.sum(-2), torch.ones(2, 49), atol=1e-6, rtol=0)
        # a group's row is a mean: sum over tokens = count / (count + eps)
        torch.testing.assert_close(attn.sum(-1, keepdim=True), counts / (counts + eps))


# ---------------------------------------------------------------------------------------------
# extreme input: never NaN
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("hard", [True, False])
def test_extreme_logits_never_nan(dtype, hard):
    """+-1e4 logits in every dtype (fp16 included): finite, and both implementations agree."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 2, (2, 8, 31), generator=g).float() * 2e4 - 1e4).to(dtype)
    x[0, :, :3] = 1e4  # ties at the top
    x[1, :, :3] = -1e4
    noise = sample_gumbel(x.shape, 2)
    _compare(x, noise=noise, hard=hard)
    _compare(x, noise=None, gumbel=False, hard=hard)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hard", [True, False])
def test_infinite_logits_are_clamped_never_nan(dtype, hard):
    """-inf masks a group; an all -inf column is uniform (hard: group 0); +inf wins; zero grad at inf."""
    x = _logits(2, 4, 9, dtype)
    x[0, :, 0] = float("-inf")  # every group masked
    x[0, 1:, 1] = float("-inf")  # only group 0 left
    x[1, 2, 2] = float("inf")
    x[1, :, 3] = float("inf")  # all +inf: uniform too
    noise = sample_gumbel(x.shape, 3)
    for gumbel in (True, False):
        ref, tri = _compare(x, noise=noise if gumbel else None, gumbel=gumbel, hard=hard)
        for attn, soft, grad in (ref, tri):
            torch.testing.assert_close(soft[0, :, 0].float(), torch.full((4,), 0.25))
            assert soft[0, 0, 1] == 1 and soft[1, 2, 2] == 1
            assert (grad[0, :, 0] == 0).all() and (grad[1, :, 3] == 0).all()
            if hard:
                assert attn[0, 0, 0] > 0 and attn[0, 0, 1] > 0 and attn[1, 2, 2] > 0
                assert (attn[0, 1:, :2] == 0).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_tiny_tau_and_zero_eps_never_nan(impl):
    x = _logits(2, 16, 7)  # more groups than tokens: some groups are empty
    attn, soft = gumbel_assign(x, tau=1e-30, eps=0.0, seed=1, impl=impl)
    assert torch.isfinite(attn).all() and torch.isfinite(soft).all()
    empty = (attn == 0).all(-1)
    assert empty.any()
    for hard in (True, False):
        noise = sample_gumbel(x.shape, 4)
        _compare(x, noise=noise, eps=0.0, hard=hard)  # empty groups: zeros, not 0 / 0
        _compare(x, noise=noise, tau=1e-30, hard=hard)


def test_fused_saves_fewer_bytes_than_reference():
    """The fused op keeps the logits + O(B(S+N)) bytes for backward; the torch path ~3 [B, S, N]."""
    from torch.autograd.graph import saved_tensors_hooks

    def saved_bytes(impl, dtype):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = _logits(2, 8, 49, dtype).requires_grad_()
        with saved_tensors_hooks(pack, lambda t: t):
            gumbel_assign(x, seed=1, impl=impl)
        return sum(seen.values())

    for dtype in HALF:
        fused, ref = saved_bytes("triton", dtype), saved_bytes("torch", dtype)
        numel = 2 * 8 * 49
        assert fused <= numel * dtype.itemsize + 2 * 49 * 2 + 2 * 8 * 4
        assert ref >= 2 * fused


# ---------------------------------------------------------------------------------------------
# bad input and dispatch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logits=torch.zeros(2, 3)), "rank 3"),
        (dict(logits=torch.zeros(2, 3, 4, dtype=torch.int64)), "floating"),
        (dict(logits=torch.zeros(2, 0, 4)), "at least one group"),
        (dict(tau=0.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(eps=-0.1), "eps"),
        (dict(eps=float("inf")), "eps"),
        (dict(noise=torch.zeros(2, 3, 5)), "noise shape"),
        (dict(noise=torch.zeros(2, 3, 4, device="meta")), "noise is on"),
        (dict(noise=torch.zeros(2, 3, 4, dtype=torch.int32)), "noise must be a floating"),
        (dict(noise=torch.zeros(2, 3, 4), seed=1), "either noise or seed"),
        (dict(seed=1.5), "seed must be an int"),
        (dict(seed=-1), "seed must be in"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
@pytest.mark.parametrize("fn", ["gumbel_assign", "gumbel_assign_reference"])
def test_bad_input_raises_value_error(kwargs, match, fn):
    if fn == "gumbel_assign_reference" and "impl" in kwargs:
        return  # the reference has no impl argument (covered by gumbel_assign)
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits", torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=match):
        dict(gumbel_assign=gumbel_assign, gumbel_assign_reference=gumbel_assign_reference)[fn](logits, **kwargs)


def test_sample_gumbel_bad_input():
    with pytest.raises(ValueError, match="either seed or generator"):
        sample_gumbel((2,), 1, generator=torch.Generator())
    with pytest.raises(ValueError, match="dtype must be floating"):
        sample_gumbel((2,), dtype=torch.int32)
    with pytest.raises(ValueError, match="impl must be"):
        sample_gumbel((2,), impl="auto")
    with pytest.raises(ValueError, match="negative size"):
        sample_gumbel((2, -1))


def test_dispatch_triton_unavailable(monkeypatch):
    monkeypatch.setattr(dispatch, "has_triton", lambda: False)
    x = _logits(1, 3, 5)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        gumbel_assign(x, impl="triton")
    with pytest.raises(RuntimeError, match="triton is not installed"):
        sample_gumbel((3,), 1, impl="triton")
    # auto falls back to the reference (same torch stream for the same seed)
    a, _ = gumbel_assign(x, seed=3)
    b, _ = gumbel_assign_reference(x, seed=3)
    assert torch.equal(a, b)


def test_dispatch_rules(monkeypatch):
    x = _logits(1, 3, 5)
    # auto on CPU never picks the interpreter
    assert torch.equal(gumbel_assign(x, seed=3)[0], gumbel_assign_reference(x, seed=3)[0])
    with pytest.raises(RuntimeError, match="float64"):
        gumbel_assign(x.double(), impl="triton")
    assert gumbel_assign(x.double(), seed=1)[0].dtype == torch.float64  # auto -> torch
    with pytest.raises(RuntimeError, match="at most 1024 groups"):
        gumbel_assign(torch.zeros(1, 1025, 2), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gumbel_assign(x, impl="triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_empty_batch_or_tokens(impl):
    for shape in ((0, 3, 4), (2, 3, 0)):
        attn, soft = gumbel_assign(torch.zeros(shape), seed=0, impl=impl)
        assert attn.shape == shape and soft.shape == shape


def test_noise_ignored_in_eval_and_gets_no_grad_on_triton():
    x = _logits(1, 4, 6)
    noise = sample_gumbel(x.shape, 0).requires_grad_()
    a, _ = gumbel_assign(x, gumbel=False, noise=noise, impl="triton")
    b, _ = gumbel_assign(x, gumbel=False, impl="triton")
    assert torch.equal(a, b)
    xr = x.clone().requires_grad_()
    a, _ = gumbel_assign(xr, noise=noise, impl="triton")
    dx, dn = torch.autograd.grad(a.sum(), (xr, noise), allow_unused=True)
    assert dn is None and dx is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(256, 64, 196), (256, 8, 64), (3, 5, 1000)])
def test_cuda_triton_matches_reference(dtype, shape):
    x = _logits(*shape, dtype=dtype).cuda()
    noise = sample_gumbel(shape, 1, device="cuda", impl="triton")
    _compare(x, noise=noise, hard=True)
    _compare(x, noise=noise, hard=False)
    a1, _ = gumbel_assign(x, seed=9)
    a2, _ = gumbel_assign(x, seed=9)
    assert torch.equal(a1, a2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_eval_ties_go_to_the_first_group():
    """The interpreter's arg-max is numpy's (always leftmost); the GPU reduction must be too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-1, 2, (64, 64, 196), generator=g).float().cuda()  # ties everywhere
    attn, _ = gumbel_assign(x, gumbel=False, impl="triton")
    ref, _ = gumbel_assign_reference(x, gumbel=False)
    assert torch.equal(attn > 0, ref > 0)
    assert torch.equal((attn > 0).float().argmax(dim=-2), x.argmax(dim=-2))
