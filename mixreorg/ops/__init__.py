"""Functional ops: each has a torch reference, a Triton kernel, and ``impl=`` dispatch."""

from ._dispatch import has_triton, select_impl, triton_interpret

__all__ = ["has_triton", "select_impl", "triton_interpret"]
