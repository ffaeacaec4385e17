"""Gumbel assignment: fused Triton kernels vs the torch reference vs ``F.gumbel_softmax(hard=True)``.

    python -m pytest benchmarks/bench_assign.py --benchmark-enable            # timings (+ table)
    python -m pytest benchmarks/bench_assign.py --benchmark-enable -k s1      # GroupViT stage 1
    python benchmarks/bench_assign.py                                         # memory table only
    TRITON_INTERPRET=1 python benchmarks/bench_assign.py     # memory table incl. the fused op on CPU

Impls (all compute ``attn = A / (A.sum(-1) + 1)`` and ``soft = softmax(logits, -2)``):
- ``gumbel_softmax``: the baseline, what GroupViT code does today: ``F.gumbel_softmax(x, hard=True,
  dim=-2)`` in the input dtype, then the normalisation and the plain softmax (5-6 kernels).
- ``torch``: :func:`mixreorg.ops.gumbel_assign_reference` (fp32 compute for half inputs, clamp).
- ``triton``: the fused kernels (CUDA only; on CPU Triton would run in the interpreter).
Cases: ``fwd+bwd`` (training: forward, then backward of ``attn``) and ``fwd`` (training forward
under ``no_grad``). ``bytes`` is what a fused op must move: fwd reads logits and writes attn + soft
(3 tensors), bwd reads logits + grad and writes the logits' grad (3 more).

The memory table (``test_memory_report``, printed with ``-s``, or ``python bench_assign.py``)
gives, per impl, the bytes autograd saves for backward (unique storages, counted with
``torch.autograd.graph.saved_tensors_hooks``) and the peak memory of one forward+backward above
what was allocated before it (CUDA: ``max_memory_allocated``; CPU: the profiler's allocation
events summed in order, op granularity).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _report import record
from _steps import saved_bytes

from mixreorg.ops import gumbel_assign, triton_interpret

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {
    "small": (32, 8, 49),
    "s1": (256, 64, 196),  # GroupViT stage 1: 64 groups x 196 patches, 256 images per GPU
    "s2": (256, 8, 64),  # GroupViT stage 2: 8 groups x 64 segment tokens
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMPLS = ["gumbel_softmax", "torch", "triton"] if DEVICE == "cuda" else ["gumbel_softmax", "torch"]
BASELINE = "gumbel_softmax"
# the memory table also covers the fused op on CPU when run under TRITON_INTERPRET=1 (slow, but
# saved bytes and allocations do not depend on the backend)
MEM_IMPLS = IMPLS + ["triton"] if DEVICE == "cpu" and triton_interpret() else IMPLS


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _params():
    for sname, shape in SHAPES.items():
        for dname, dtype in DTYPES.items():
            if DEVICE == "cpu" and dname != "fp32":
                continue  # CPU: fp32 only (half softmax on CPU is not what anyone trains with)
            yield pytest.param(shape, dtype, id=f"{sname}-{dname}")


def _gumbel_softmax_path(x: torch.Tensor, eps: float = 1.0):
    a = F.gumbel_softmax(x, tau=1.0, hard=True, dim=-2)  # [B, S, N]
    return a / (a.sum(dim=-1, keepdim=True) + eps), x.softmax(dim=-2)


def assign_fn(impl: str):
    """``logits -> (attn, soft)`` for ``impl``."""
    if impl == "gumbel_softmax":
        return _gumbel_softmax_path
    return lambda x: gumbel_assign(x, impl=impl)


def _inputs(shape, dtype, requires_grad=True):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, generator=g, device=DEVICE).mul_(2.0).to(dtype).requires_grad_(requires_grad)
    grad = torch.randn(shape, generator=g, device=DEVICE).to(dtype)
    return x, grad


def _fwd_bwd(f, x, grad):
    attn, _soft = f(x)
    (dx,) = torch.autograd.grad(attn, x, grad)
    return dx


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype", list(_params()))
def test_assign_forward_backward(benchmark, shape, dtype, impl):
    f = assign_fn(impl)
    x, grad = _inputs(shape, dtype)

    def run():
        out = _fwd_bwd(f, x, grad)
        _sync()
        return out

    benchmark(run)
    record(benchmark, case=f"assign fwd+bwd {tuple(shape)} {dtype}", impl=impl, nbytes=6 * x.nbytes, baseline=BASELINE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype", list(_params()))
def test_assign_forward(benchmark, shape, dtype, impl):
    f = assign_fn(impl)
    x, _ = _inputs(shape, dtype, requires_grad=False)

    def run():
        with torch.no_grad():
            out = f(x)
        _sync()
        return out

    benchmark(run)
    record(benchmark, case=f"assign fwd {tuple(shape)} {dtype}", impl=impl, nbytes=3 * x.nbytes, baseline=BASELINE)


# ---------------------------------------------------------------------------------------------
# memory: saved bytes and peak
# ---------------------------------------------------------------------------------------------
def _cpu_peak(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    items = []
    for e in prof.events():
        if e.name == "[memory]":  # a free (or alloc) outside any op
            items.append((e.time_range.start, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage:
            items.append((e.time_range.end, e.self_cpu_memory_usage))
    items.sort()
    cur = peak = 0
    for _, m in items:
        cur += m
        peak = max(peak, cur)
    return peak


def peak_bytes(f, x, grad) -> int:
    """Peak memory of one forward + backward above what was allocated before it."""
    run = lambda: _fwd_bwd(f, x, grad)
    run()  # warm up (Triton compilation, allocator caches)
    if DEVICE == "cuda":
        _sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        _sync()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak(run)


def memory_table() -> list[str]:
    lines = [
        f"memory on {DEVICE}: saved-for-backward bytes and fwd+bwd peak (MiB), logits size for scale",
        f"{'shape':<16} {'dtype':<15} {'impl':<15} {'logits':>8} {'saved':>8} {'peak':>8}",
    ]
    for shape in SHAPES.values():
        for dname, dtype in DTYPES.items():
            if DEVICE == "cpu" and dname == "bf16":
                continue
            x, grad = _inputs(shape, dtype)
            for impl in MEM_IMPLS:
                f = assign_fn(impl)
                mib = 2**20
                lines.append(
                    f"{str(tuple(shape)):<16} {str(dtype):<15} {impl:<15} {x.nbytes / mib:>8.2f} "
                    f"{saved_bytes(f, x) / mib:>8.2f} {peak_bytes(f, x, grad) / mib:>8.2f}"
                )
    return lines


def test_memory_report():
    lines = memory_table()
    print("\n" + "\n".join(lines))
    assert len(lines) > 2


if __name__ == "__main__":
    print("\n".join(memory_table()))
