"""Benchmark set-up: run with ``python -m pytest benchmarks --benchmark-enable``.

Every benchmark that calls ``_report.record`` lands in a side-by-side table printed at the end of the
run: best-of-rounds time, effective bandwidth (bytes the op must move / time) and the ratio to the baseline
of its case (``clone`` of the same tensor, the bandwidth ceiling, by default). Ratios measured in
one run are what we report: absolute numbers on shared machines are noisy.
"""

from __future__ import annotations

import torch

from mixreorg._compat import make_torchvision_importable

make_torchvision_importable()

from _report import RESULTS  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    tr = terminalreporter
    tr.write_sep("=", f"side-by-side results on {device}")
    tr.write_line(f"{'case':<52} {'impl':<14} {'min ms':>9} {'GB/s':>8} {'vs baseline':>12}")
    by_case: dict[str, dict[str, dict]] = {}
    for r in RESULTS:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    for case, impls in by_case.items():
        for impl, r in impls.items():
            base = impls.get(r["baseline"])
            ratio = f"{base['mean'] / r['mean']:.2f}x" if base else "-"
            gbps = f"{r['bytes'] / r['mean'] / 1e9:.2f}" if r["bytes"] else "-"
            tr.write_line(f"{case:<52} {impl:<14} {r['mean'] * 1e3:>9.3f} {gbps:>8} {ratio:>12}")
