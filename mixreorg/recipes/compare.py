"""The paper's claim, measured on SynthShapes: every compared model, equal steps, several seeds.

    python -m mixreorg.recipes.compare --out runs/compare                 # all rows, 3 seeds
    python -m mixreorg.recipes.compare --rows groupvit mixreorg --seeds 0 1 --steps 300
    python -m mixreorg.recipes.compare --preset tiny_hybrid --seeds 0 1 2 3 4 --steps 100

Each (row, seed) is one real run of :mod:`mixreorg.recipes.pretrain` (``--preset``, default ``tiny``;
``--model ROW``, ``train.seed = data.seed = SEED``, the same ``--steps`` and no time limit, so every row
gets the same number of optimiser steps and images whatever its cost), in its own folder ``OUT/ROW/seedSEED``,
``--jobs`` at a time. A finished run (its ``eval/results.json`` exists) is not run again and an
interrupted one resumes from its checkpoint, so re-running the command after a stop loses nothing; a
finished run of another command (another preset, budget or override) in the same folder is refused.

Rows (default: all): ``groupvit``, ``groupvit_plus`` and the Table 6 MixReorg rows (``mixreorg_cm``,
``mixreorg_no_cm``, ``mixreorg_cm_seg``, ``mixreorg_cm_rc``, ``mixreorg``) zero-shot, and
``supervised`` (the same backbone trained with the masks: the upper bound). The table -- mean ± std
(sample, over seeds) of mIoU, of the 4 "stuff" and the 6 "thing" classes, and the wall time per run
-- is printed and written to ``OUT/table.md`` and ``OUT/table.json``, and drawn as bars with error bars
(± std) in ``OUT/table.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "mixreorg.recipes"  # noqa: A001

__all__ = ["ROWS", "run_command", "collect", "format_table", "save_table_chart", "main"]

ROWS = (
    "groupvit",
    "groupvit_plus",
    "mixreorg_cm",
    "mixreorg_no_cm",
    "mixreorg_cm_seg",
    "mixreorg_cm_rc",
    "mixreorg",
    "supervised",
)
STUFF = ("grass", "water", "sand", "sky")


def run_dir(out: Path, row: str, seed: int) -> Path:
    return out / row / f"seed{seed}"


def run_command(
    row: str, seed: int, out: Path, steps: int, threads: int, overrides: Sequence[str], preset: str = "tiny"
) -> list[str]:
    """The pretrain command line of one (row, seed)."""
    cmd = [
        sys.executable, "-m", "mixreorg.recipes.pretrain",
        "--preset", preset, "--model", row, "--steps", str(steps), "--threads", str(threads),
        "--out", str(run_dir(out, row, seed)), "--quiet",
        "--set", "train.time_limit=0", "--set", f"train.seed={seed}", "--set", f"data.seed={seed}",
    ]  # fmt: skip
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _same_run(recorded: str, cmd: Sequence[str]) -> bool:
    """Whether a finished run's recorded command is ``cmd`` (the interpreter's path may differ: a clone
    elsewhere, another virtual environment)."""
    return recorded.split()[1:] == list(cmd[1:])


def _run_one(
    row: str, seed: int, out: Path, steps: int, threads: int, overrides: Sequence[str], preset: str = "tiny"
) -> dict[str, Any]:
    folder = run_dir(out, row, seed)
    done = folder / "eval" / "results.json"
    timing = folder / "compare_run.json"
    cmd = run_command(row, seed, out, steps, threads, overrides, preset)
    if done.is_file() and timing.is_file():
        info = json.loads(timing.read_text())
        if not _same_run(info["command"], cmd):
            # a table mixing runs of two presets or budgets would be silently wrong: refuse to reuse it
            raise RuntimeError(
                f"{row} seed {seed}: {folder} holds a finished run of another command "
                f"({info['command']!r}, this one: {' '.join(cmd)!r}); use another --out or delete it"
            )
        return {"row": row, "seed": seed, "skipped": True, **info}
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(folder / "compare_run.log", "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{row} seed {seed} failed with exit status {rc}; see {folder / 'compare_run.log'}")
    info = {"wall_s": wall, "command": " ".join(cmd)}
    timing.write_text(json.dumps(info) + "\n")
    return {"row": row, "seed": seed, "skipped": False, **info}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(out: Path, rows: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per row: mean/std over the seeds of mIoU, stuff mIoU, things mIoU, per-class IoU, wall time."""
    table = []
    for row in rows:
        runs = []
        for seed in seeds:
            folder = run_dir(out, row, seed)
            res = json.loads((folder / "eval" / "results.json").read_text())["synthshapes"]
            timing = json.loads((folder / "compare_run.json").read_text())
            names, iou = res["class_names"], res["iou"]
            stuff = [v for n, v in zip(names, iou) if n in STUFF]
            things = [v for n, v in zip(names, iou) if n not in STUFF]
            steps = max(
                (json.loads(line).get("step", 0) for line in (folder / "metrics.jsonl").read_text().splitlines()),
                default=0,
            )
            runs.append(
                {
                    "seed": seed,
                    "miou": res["miou"],
                    "stuff": statistics.fmean(stuff),
                    "things": statistics.fmean(things),
                    "iou": dict(zip(names, iou)),
                    "wall_s": timing["wall_s"],
                    "steps": steps,
                    "chance": res["chance"]["prior_random"],
                }
            )
        entry: dict[str, Any] = {"row": row, "runs": runs}
        for key in ("miou", "stuff", "things", "wall_s"):
            entry[key], entry[key + "_std"] = _mean_std([r[key] for r in runs])
        entry["steps"] = sorted({r["steps"] for r in runs})
        entry["chance"] = runs[0]["chance"]
        table.append(entry)
    return table


def format_table(table: Sequence[dict[str, Any]], n_seeds: int) -> str:
    def pm(e: dict[str, Any], key: str) -> str:
        return f"{100 * e[key]:.1f} ± {100 * e[key + '_std']:.1f}"

    lines = [
        "| row | mIoU (%) | stuff (4) | things (6) | steps | wall / run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        steps = "/".join(str(s) for s in e["steps"])
        lines.append(
            f"| {e['row']} | {pm(e, 'miou')} | {pm(e, 'stuff')} | {pm(e, 'things')} | {steps} | {e['wall_s']:.0f} s |"
        )
    if table:
        lines.append(
            f"\nmean ± std over {n_seeds} seed(s); chance (prior-random) mIoU {100 * table[0]['chance']:.1f}%; "
            "`supervised` = the same backbone trained with the masks (upper bound), all other rows zero-shot."
        )
    return "\n".join(lines)


def save_table_chart(table: Sequence[dict[str, Any]], path: str | Path, n_seeds: int | None = None) -> Path:
    """The table of :func:`collect` as grouped bars: per row, mIoU, stuff and things mIoU (%), each
    with its std over the seeds as an error bar; the chance mIoU as a dashed line. Returns ``path``."""
    from mixreorg.viz import plot_bars

    if not table:
        raise ValueError("save_table_chart: empty table")
    keys = {"mIoU": "miou", "stuff (4)": "stuff", "things (6)": "things"}
    series = {label: [100 * e[k] for e in table] for label, k in keys.items()}
    errors = {label: [100 * e[k + "_std"] for e in table] for label, k in keys.items()}
    seeds = f", mean ± std over {n_seeds} seed(s)" if n_seeds else ""
    plot_bars([e["row"] for e in table], series, path, errors=errors, ylabel="IoU (%)",
              title=f"SynthShapes zero-shot segmentation{seeds}", hlines={"chance": 100 * table[0]["chance"]},
              size=(max(720, 110 * len(table) + 230), 440), fmt="%.1f")  # fmt: skip
    return Path(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixreorg.recipes.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows to run (default: {' '.join(ROWS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--preset", default="tiny", help="the pretrain preset every row starts from (e.g. tiny_hybrid)")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps of every run (equal for all rows)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import PRESETS
    from .models import MODEL_BUILDERS

    unknown = [r for r in args.rows if r not in MODEL_BUILDERS]
    problems = [f"unknown rows {unknown}; known: {', '.join(sorted(MODEL_BUILDERS))}"] if unknown else []
    if args.preset not in PRESETS:
        problems.append(f"unknown preset {args.preset!r}; presets: {', '.join(sorted(PRESETS))}")
    if args.steps < 1 or args.jobs < 1 or args.threads < 1:
        problems.append(f"--steps, --jobs and --threads must be >= 1, got {args.steps}, {args.jobs}, {args.threads}")
    if len(set(args.seeds)) != len(args.seeds):
        problems.append(f"--seeds has duplicates: {args.seeds}")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    out = Path(args.out)
    jobs = [(row, seed) for seed in args.seeds for row in args.rows]  # seed-major: a partial run is balanced
    if args.dry_run:
        for row, seed in jobs:
            print(" ".join(run_command(row, seed, out, args.steps, args.threads, args.set, args.preset)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_run_one, r, s, out, args.steps, args.threads, args.set, args.preset)
                   for r, s in jobs]
        for (row, seed), f in zip(jobs, futures):
            try:
                res = f.result()
            except RuntimeError as err:  # one failed run does not stop the others; reported at the end
                failed.append(str(err))
                print(f"{row} seed {seed}: FAILED", flush=True)
                continue
            state = "kept" if res["skipped"] else f"{res['wall_s']:.0f} s"
            print(f"{res['row']} seed {res['seed']}: {state}", flush=True)
    wall = time.perf_counter() - t0
    if failed:
        print("error: " + "\n  ".join([f"{len(failed)} run(s) failed (finished runs are kept):"] + failed),
              file=sys.stderr)
        return 1
    table = collect(out, args.rows, args.seeds)
    text = format_table(table, len(args.seeds))
    cmd = "python -m mixreorg.recipes.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    text += f"\n\ncommand: `{cmd.strip()}`; wall time of this invocation {wall / 60:.1f} min ({args.jobs} at a time)."
    print("\n" + text)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps({"rows": table, "wall_s": wall, "args": vars(args)}, indent=2) + "\n")
    print(f"chart: {save_table_chart(table, out / 'table.png', len(args.seeds))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
