"""Arg-max over a strided dimension: ``torch.argmax`` vs :func:`mixreorg.ops.utils.first_argmax`
(``torch.max(x, dim).indices``, the same indices), side by side.

    python -m pytest benchmarks/bench_argmax.py --benchmark-enable

Cases: the supervised bound's per-pixel logits ``[B, K, H, W]`` over K (its pixel accuracy, and every
zero-shot label map), and the Gumbel assignment's ``[B, S, N]`` logits over the groups S (every
training step of every grouping block on CPU). ``bytes``: the input read once. Baseline: ``argmax``.
"""

from __future__ import annotations

import pytest
import torch
from _report import record

from mixreorg.ops.utils import first_argmax

CASES = {
    "pixel logits [64, 10, 64, 64] dim 1": ((64, 10, 64, 64), 1),
    "assign logits [64, 8, 256] dim -2": ((64, 8, 256), -2),
    "assign logits [256, 64, 196] dim -2": ((256, 64, 196), -2),
}
IMPLS = {"argmax": lambda x, d: torch.argmax(x, dim=d), "first_argmax": first_argmax}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_argmax(benchmark, case, impl):
    shape, dim = CASES[case]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    fn = IMPLS[impl]
    assert torch.equal(fn(x, dim), torch.argmax(x, dim=dim))
    benchmark(fn, x, dim)
    record(benchmark, case=case, impl=impl, nbytes=x.nbytes, baseline="argmax")
