"""Patch mixing: Triton kernel vs torch reference vs autograd through advanced indexing vs clone.

    python -m pytest benchmarks/bench_mix.py --benchmark-enable            # all shapes
    python -m pytest benchmarks/bench_mix.py --benchmark-enable -k paper   # B=256, L=196, C=384

Cases (bytes are what the op must move):
- ``fwd``: mix forward (read + write: 2N) vs ``clone`` (2N).
- ``fwd+bwd``: mix forward and backward (4N) vs ``clone`` + ``clone`` (4N).
- ``bwd``: the backward alone (2N) vs ``clone``; ``advidx`` is what users write today,
  ``x[src, arange(L)]``, whose backward is an index_put with accumulation (a scatter-add).
- ``mix_add``: fused ``y + mix(x)`` (3N) vs ``mix`` then ``add`` (unfused) and ``clone`` of 1.5N.
Triton is timed on CUDA only (on CPU it would run in the interpreter).
"""

from __future__ import annotations

import pytest
import torch
from _report import record

from mixreorg.ops import MixPlan, mix, mix_add, restore

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {
    "small": (32, 49, 192),
    "paper": (256, 196, 384),  # B per GPU, 14x14 patches, ViT-S width
    "large": (512, 196, 768),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ["triton", "torch", "advidx", "clone"] if DEVICE == "cuda" else ["torch", "advidx", "clone"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _setup(shape, dtype, requires_grad=False):
    B, L, C = shape
    plan = MixPlan.create(B, L, 16, seed=0, device=DEVICE)
    x = torch.randn(B, L, C, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    return plan, x


def _params():
    for sname, shape in SHAPES.items():
        for dname, dtype in DTYPES.items():
            if DEVICE == "cpu" and dname == "bf16" and sname != "paper":
                continue  # keep the CPU run short: bf16 only at the paper's shape
            yield pytest.param(shape, dtype, id=f"{sname}-{dname}")


def _advidx(x, plan):
    L = x.shape[1]
    return x[plan.src, torch.arange(L, device=x.device)]


def _forward(impl, x, plan):
    """The forward under test for ``impl`` (``clone``: the bandwidth ceiling)."""
    return {
        "triton": lambda: mix(x, plan, impl="triton"),
        "torch": lambda: mix(x, plan, impl="torch"),
        "advidx": lambda: _advidx(x, plan),
        "clone": lambda: x.clone(),
    }[impl]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype", list(_params()))
def test_mix_forward(benchmark, shape, dtype, impl):
    plan, x = _setup(shape, dtype)
    fn = _forward(impl, x, plan)

    def run():
        out = fn()
        _sync()
        return out

    benchmark(run)
    record(benchmark, case=f"mix fwd {tuple(shape)} {dtype}", impl=impl, nbytes=2 * x.nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype", list(_params()))
def test_mix_forward_backward(benchmark, shape, dtype, impl):
    plan, x = _setup(shape, dtype, requires_grad=impl != "clone")
    grad = torch.randn(x.shape, device=DEVICE, dtype=dtype)
    if impl == "clone":
        def run():
            a = x.clone()
            b = grad.clone()
            _sync()
            return a, b
    else:
        f = _forward(impl, x, plan)

        def run():
            (g,) = torch.autograd.grad(f(), x, grad)
            _sync()
            return g

    benchmark(run)
    record(benchmark, case=f"mix fwd+bwd {tuple(shape)} {dtype}", impl=impl, nbytes=4 * x.nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype", list(_params()))
def test_mix_backward(benchmark, shape, dtype, impl):
    plan, x = _setup(shape, dtype, requires_grad=impl != "clone")
    grad = torch.randn(x.shape, device=DEVICE, dtype=dtype)
    f = _forward(impl, x, plan)

    if impl == "clone":
        def setup():
            return (), {}

        def target():
            out = grad.clone()
            _sync()
            return out
    else:
        def setup():
            out = f()
            _sync()
            return (out,), {}

        def target(out):
            (g,) = torch.autograd.grad(out, x, grad)
            _sync()
            return g

    rounds = 5 if x.nbytes > 50e6 else 20
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
    record(benchmark, case=f"mix bwd {tuple(shape)} {dtype}", impl=impl, nbytes=2 * x.nbytes)


@pytest.mark.parametrize("impl", ["fused-" + i for i in IMPLS if i in ("triton", "torch")] + ["unfused", "clone"])
@pytest.mark.parametrize("shape,dtype", list(_params()))
def test_mix_add(benchmark, shape, dtype, impl):
    plan, x = _setup(shape, dtype)
    y = torch.randn_like(x)
    wide = torch.randn(int(x.numel() * 1.5), device=DEVICE, dtype=dtype)  # clone of 1.5N moves 3N
    fn = {
        "fused-triton": lambda: mix_add(y, x, plan, impl="triton"),
        "fused-torch": lambda: mix_add(y, x, plan, impl="torch"),
        "unfused": lambda: y + mix(x, plan),
        "clone": lambda: wide.clone(),
    }[impl]

    def run():
        out = fn()
        _sync()
        return out

    benchmark(run)
    record(benchmark, case=f"mix_add {tuple(shape)} {dtype}", impl=impl, nbytes=3 * x.nbytes)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i in ("triton", "torch")])
def test_restore_forward(benchmark, impl):
    plan, x = _setup(SHAPES["paper"], torch.float32)

    def run():
        out = restore(x, plan, impl=impl)
        _sync()
        return out

    benchmark(run)
    record(benchmark, case=f"restore fwd {SHAPES['paper']} fp32", impl=impl, nbytes=2 * x.nbytes)


def test_restore_clone(benchmark):
    _, x = _setup(SHAPES["paper"], torch.float32)

    def run():
        out = x.clone()
        _sync()
        return out

    benchmark(run)
    record(benchmark, case=f"restore fwd {SHAPES['paper']} fp32", impl="clone", nbytes=2 * x.nbytes)
