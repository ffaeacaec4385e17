"""Collects benchmark means for the side-by-side summary printed by ``conftest.py``."""

from __future__ import annotations

__all__ = ["RESULTS", "record"]

RESULTS: list[dict] = []


def record(benchmark, *, case: str, impl: str, nbytes: int, baseline: str = "clone") -> None:
    """Store the finished ``benchmark``'s mean under ``case``/``impl`` for the summary table."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: nothing was timed
        return
    mean = stats.stats.min  # best of the rounds: the least disturbed by other jobs on a shared machine
    benchmark.extra_info.update(case=case, impl=impl, bytes=nbytes, gbps=nbytes / mean / 1e9)
    RESULTS.append(dict(case=case, impl=impl, mean=mean, bytes=nbytes, baseline=baseline))
