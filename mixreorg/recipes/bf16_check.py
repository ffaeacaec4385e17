"""Does MixReorg learn as well under CPU bf16 autocast as in float32? (issue 11's learning check)

    python -m mixreorg.recipes.bf16_check --out runs/bf16_check                 # 3 seeds each, 450 steps
    python -m mixreorg.recipes.bf16_check --seeds 0 1 2 3 4 --steps 600 --jobs 1 --threads 2

The patch-stem MixReorg (``--preset tiny --model mixreorg``, the main job until session 16; ``--preset
tiny_grounded_mixreorg`` checks today's main job, ``--rows`` other models) is trained with the
same seeds and the same number of steps twice through :mod:`mixreorg.recipes.compare`: once in
float32 (``OUT/fp32``) and once with ``train.cpu_bf16=on`` (``OUT/bf16``). Equal steps, not the main
job's time limit, so that the check compares learning per step; bf16's speed is the benchmarks' part
(``benchmarks/bench_step.py``). The verdict: bf16's mean zero-shot mIoU lies within the seed spread
of float32 (between its lowest and its highest run). Printed, and written to ``OUT/bf16_check.md`` and
``OUT/bf16_check.json``; finished runs are kept, so an interrupted check resumes.

It needs a CPU that computes bf16 natively (AVX512-BF16 or AMX,
:func:`mixreorg.recipes.train.cpu_bf16_support`): elsewhere autocast is emulated, slower than
float32, and the check exits at once with status 2 saying so, before any run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "mixreorg.recipes"  # noqa: A001

__all__ = ["verdict", "format_verdict", "main"]


def verdict(fp32: Sequence[float], bf16: Sequence[float]) -> dict[str, Any]:
    """The check on the per-seed mIoUs of the two precisions: ``within_spread`` iff the bf16 mean lies
    in ``[min(fp32), max(fp32)]``. Needs at least two float32 runs (one run has no spread)."""
    if len(fp32) < 2 or not bf16:
        raise ValueError(f"the check needs >= 2 float32 runs and >= 1 bf16 run, got {len(fp32)} and {len(bf16)}")
    mean_bf16 = statistics.fmean(bf16)
    return {
        "fp32": list(fp32),
        "bf16": list(bf16),
        "fp32_mean": statistics.fmean(fp32),
        "fp32_std": statistics.stdev(fp32),
        "bf16_mean": mean_bf16,
        "bf16_std": statistics.stdev(bf16) if len(bf16) > 1 else 0.0,
        "fp32_spread": [min(fp32), max(fp32)],
        # the tolerance: the mean of equal values may land an ulp past them
        "within_spread": min(fp32) - 1e-12 <= mean_bf16 <= max(fp32) + 1e-12,
    }


def format_verdict(row: str, v: dict[str, Any]) -> str:
    lo, hi = v["fp32_spread"]
    word = "within" if v["within_spread"] else "OUTSIDE"
    return (
        f"{row}: float32 mIoU {100 * v['fp32_mean']:.1f} ± {100 * v['fp32_std']:.1f} (runs {100 * lo:.1f}-"
        f"{100 * hi:.1f}), bf16 {100 * v['bf16_mean']:.1f} ± {100 * v['bf16_std']:.1f}: bf16 is {word} "
        f"float32's seed spread ({len(v['fp32'])} + {len(v['bf16'])} seeds)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixreorg.recipes.bf16_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=["mixreorg"], help="models to check (default: mixreorg)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=450,
                   help="optimiser steps of every run (the patch-stem main job's ~450)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bf16_check")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .compare import main as compare_main
    from .train import cpu_bf16_support

    native, found = cpu_bf16_support()
    if not native:
        print(f"error: the bf16 learning check needs a CPU with native bf16 (AVX512-BF16 or AMX); this one "
              f"has none ({found}), and emulated bf16 would not be what the check is about", file=sys.stderr)
        return 2
    if len(args.seeds) < 2:
        print(f"error: the check needs >= 2 seeds (a seed spread), got {args.seeds}", file=sys.stderr)
        return 2
    if any(s.startswith("train.cpu_bf16") for s in args.set):
        print("error: --set train.cpu_bf16 is what the check sets itself", file=sys.stderr)
        return 2
    out = Path(args.out)
    common = ["--rows", *args.rows, "--preset", args.preset, "--seeds", *map(str, args.seeds),
              "--steps", str(args.steps), "--jobs", str(args.jobs), "--threads", str(args.threads)]  # fmt: skip
    for s in args.set:
        common += ["--set", s]
    for name, extra in (("fp32", ["--set", "train.cpu_bf16=off"]), ("bf16", ["--set", "train.cpu_bf16=on"])):
        rc = compare_main(common + extra + ["--out", str(out / name)])
        if rc != 0:
            print(f"error: the {name} runs failed (compare exit status {rc})", file=sys.stderr)
            return rc
    tables = {name: json.loads((out / name / "table.json").read_text())["rows"] for name in ("fp32", "bf16")}
    result, lines = {}, []
    for row32, row16 in zip(tables["fp32"], tables["bf16"]):
        v = verdict([r["miou"] for r in row32["runs"]], [r["miou"] for r in row16["runs"]])
        result[row32["row"]] = v
        lines.append(format_verdict(row32["row"], v))
    text = "\n".join(lines)
    print("\n" + text)
    (out / "bf16_check.md").write_text(text + "\n")
    (out / "bf16_check.json").write_text(json.dumps({"rows": result, "args": vars(args)}, indent=2) + "\n")
    return 0 if all(v["within_spread"] for v in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
