"""The SDPA kernel per device and dtype (mixreorg.nn.attention.SDPA_KERNELS): CPU bf16 runs SDPA's
math kernel, everything else calls SDPA as before (same ops, same bits); bf16 agrees with float32
within bf16 tolerances forward and backward. Which kernel is faster is measured in
benchmarks/bench_step.py, never here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from mixreorg.nn.attention import ATTN_BACKENDS, Attention, CrossAttention, _attend, sdpa_kernel_for

FLASH_CPU = "aten._scaled_dot_product_flash_attention_for_cpu.default"


class _Ops(TorchDispatchMode):
    """Names of the aten ops that reach the dispatcher (composite ops arrive decomposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _qkv(dtype: torch.dtype, n: int = 9, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 16, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def test_table_picks_math_for_cpu_bf16_only():
    assert sdpa_kernel_for("cpu", torch.bfloat16) == "math"
    assert sdpa_kernel_for(torch.device("cpu"), torch.bfloat16) == "math"
    for device, dtype in [("cpu", torch.float32), ("cpu", torch.float16), ("cpu", torch.float64),
                          ("cuda", torch.bfloat16), ("cuda", torch.float16), ("cuda", torch.float32),
                          (torch.device("cuda", 1), torch.bfloat16)]:
        assert sdpa_kernel_for(device, dtype) == "default", (device, dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_bf16_runs_the_math_kernel_float32_keeps_sdpas_choice(causal):
    """The kernel that really runs: bf16 never reaches the CPU flash kernel (forward or backward),
    float32 calls exactly the ops a direct SDPA call does."""
    q, k, v = _qkv(torch.bfloat16)
    with _Ops() as ops:
        _attend(q, k, v, causal=causal, dropout_p=0.0, backend="sdpa").sum().backward()
    assert not any("flash" in name for name in ops.names), ops.names
    assert any("bmm" in name for name in ops.names)  # the math kernel's matmuls

    q, k, v = _qkv(torch.float32)
    with _Ops() as ours:
        _attend(q, k, v, causal=causal, dropout_p=0.0, backend="sdpa").sum().backward()
    q, k, v = _qkv(torch.float32)  # fresh leaves: no .grad to accumulate into
    with _Ops() as direct:
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    assert FLASH_CPU in direct.names  # this torch's own choice for the case
    assert ours.names == direct.names


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_bits_fp32_as_sdpa_bf16_as_sdpas_math_kernel(causal, backend):
    """float32: the bits of a direct SDPA call; bf16: the bits of SDPA under
    ``sdpa_kernel(SDPBackend.MATH)`` (the kernel the benchmark measured), forward and backward."""
    for dtype, ctx in ((torch.float32, None), (torch.bfloat16, SDPBackend.MATH)):
        q, k, v = _qkv(dtype)
        out = _attend(q, k, v, causal=causal, dropout_p=0.0, backend=backend)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        if ctx is None:
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            with sdpa_kernel(ctx):
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        assert torch.equal(out, ref), dtype
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads)), dtype


def _assert_bf16_close(a: torch.Tensor, b: torch.Tensor) -> None:
    # bf16 keeps 8 significant bits (relative step 2**-8 = 0.4%); a few roundings through a layer
    # compound that, so allow 3% of the reference's scale
    scale = b.abs().max().item()
    torch.testing.assert_close(a.float(), b, atol=3e-2 * scale, rtol=3e-2)


@pytest.mark.parametrize("kind", ["self", "causal", "cross"])
def test_bf16_autocast_agrees_with_float32_forward_and_backward(kind):
    torch.manual_seed(0)
    if kind == "cross":
        m = CrossAttention(64, 4).train()
        inputs = [torch.randn(4, 8, 64), torch.randn(4, 50, 64)]
    else:
        m = Attention(64, 4, causal=kind == "causal").train()
        inputs = [torch.randn(4, 50, 64)]

    def run(bf16: bool):
        xs = [x.clone().requires_grad_() for x in inputs]
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(*xs)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out, [x.grad for x in xs] + [p.grad for p in m.parameters()]

    ref, ref_grads = run(False)
    out, grads = run(True)
    assert out.dtype == torch.bfloat16  # the case really ran in bf16
    _assert_bf16_close(out, ref)
    for g, g_ref in zip(grads, ref_grads):
        _assert_bf16_close(g, g_ref)


def test_cpu_bf16_math_kernel_keeps_dropout():
    torch.manual_seed(0)
    m = Attention(32, 4, attn_drop=0.5).to(torch.bfloat16)
    x = torch.randn(2, 20, 32, dtype=torch.bfloat16)
    torch.manual_seed(1)
    a = m.train()(x)
    torch.manual_seed(1)
    b = m(x)
    assert torch.equal(a, b)  # the generator drives the mask
    assert not torch.equal(a, m.eval()(x))  # and it is applied


def test_cpu_bf16_compiles_fullgraph_with_the_same_bits():
    torch.manual_seed(0)
    m = Attention(32, 4, causal=True).eval()
    x = torch.randn(2, 20, 32)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(compiled(x), m(x))


def test_bad_backend_names_still_raise():
    for name in ("math", "flash", "SDPA", ""):
        with pytest.raises(ValueError, match="attention backend must be one of") as err:
            Attention(8, 2, backend=name)
        assert all(b in str(err.value) for b in ATTN_BACKENDS)
        with pytest.raises(ValueError, match="attention backend must be one of"):
            CrossAttention(8, 2, backend=name)
