"""Backend selection shared by every op in :mod:`mixreorg.ops`.

Each op has two implementations: a pure-torch reference (any device, any dtype) and a Triton
kernel. ``impl="auto"`` picks Triton where it can run (CUDA tensors, Triton importable) and torch
otherwise; ``impl="triton"`` or ``impl="torch"`` is a hard request: when it cannot be met we raise
and say why, in the style of xformers' dispatch.

Triton also runs on CPU tensors under its interpreter (``TRITON_INTERPRET=1`` set before Triton
kernels are defined); that is how the test suite checks the kernels on machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable

import torch

__all__ = ["IMPLS", "triton_interpret", "has_triton", "triton_unsupported_reasons", "select_impl"]

IMPLS = ("auto", "triton", "torch")


@functools.cache
def has_triton() -> bool:
    """Whether the ``triton`` package can be imported (cached)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install must not break the torch path
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unsupported_reasons(tensors: Iterable[torch.Tensor]) -> list[str]:
    """Every reason the Triton backend cannot run on ``tensors`` (empty list: it can)."""
    reasons: list[str] = []
    if not has_triton():
        reasons.append("triton is not installed (pip install 'mixreorg[triton]')")
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and triton_interpret():
            continue
        reasons.append(
            f"a tensor is on device '{t.device}': Triton runs on CUDA, or on CPU only under "
            "TRITON_INTERPRET=1 set before mixreorg is imported"
        )
        break
    return reasons


def select_impl(impl: str, tensors: Iterable[torch.Tensor], op: str) -> str:
    """Resolve ``impl`` to ``"triton"`` or ``"torch"`` for ``op`` on ``tensors``.

    ``auto`` never picks the interpreter: Triton on CPU is for testing, not for speed.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    tensors = list(tensors)
    if impl == "torch":
        return "torch"
    reasons = triton_unsupported_reasons(tensors)
    if impl == "triton":
        if reasons:
            raise RuntimeError(f"{op}: impl='triton' cannot run: " + "; ".join(reasons))
        return "triton"
    # auto
    if not reasons and all(t.device.type == "cuda" for t in tensors):
        return "triton"
    return "torch"
