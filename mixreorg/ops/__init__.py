"""Functional ops: each has a torch reference, a Triton kernel, and ``impl=`` dispatch."""

from ._dispatch import has_triton, select_impl, triton_interpret
from .assign import gumbel_assign, gumbel_assign_reference, sample_gumbel
from .patch_mix import (
    mix,
    mix_add,
    mix_add_reference,
    mix_reference,
    patch_gather,
    patch_gather_add,
    restore,
    restore_reference,
)
from .plan import MixPlan

__all__ = [
    "MixPlan",
    "mix",
    "restore",
    "mix_add",
    "mix_reference",
    "restore_reference",
    "mix_add_reference",
    "patch_gather",
    "patch_gather_add",
    "gumbel_assign",
    "gumbel_assign_reference",
    "sample_gumbel",
    "has_triton",
    "select_impl",
    "triton_interpret",
]
