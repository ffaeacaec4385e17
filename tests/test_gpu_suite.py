"""benchmarks/gpu_suite.py on CPU: its --smoke run as a real subprocess, and its section runner."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixreorg.ops import has_triton

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
SECTIONS = ["cuda_tests", "bitexact", "mix_bench", "assign_bench", "train_step", "compile_mixer", "torchrun"]
CUDA_ONLY = ["cuda_tests", "compile_mixer", "torchrun"]
PATCH_OPS = ("mix", "restore", "mix_add", "patch_gather", "patch_gather_add")


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One ``--smoke`` run on CPU (CUDA hidden, one thread): (process, JSON report, Markdown report)."""
    out = tmp_path_factory.mktemp("gpu_suite")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--smoke", "--budget-s", "150"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    return proc, report, (out / "gpu_suite.md").read_text()


def _section(report, name):
    return next(s for s in report["sections"] if s["section"] == name)


def test_smoke_run_reports_every_section(smoke):
    proc, report, _ = smoke
    assert [s["section"] for s in report["sections"]] == SECTIONS
    assert report["ok"] is True
    for s in report["sections"]:
        assert s["status"] in ("ok", "skipped"), s
        assert all(r["status"] in ("ok", "skipped") for r in s["rows"]), s["rows"]
    assert report["env"]["torch"] == torch.__version__ and report["env"]["mode"] == "smoke"
    # the sections that run on CPU produced measured rows
    for name in ("mix_bench", "assign_bench", "train_step"):
        rows = _section(report, name)["rows"]
        assert _section(report, name)["status"] == "ok"
        assert any(r["status"] == "ok" and r["ms"] > 0 for r in rows), name
    clone = next(r for r in _section(report, "mix_bench")["rows"] if r["impl"] == "clone")
    assert clone["x_clone"] == 1.0 and clone["GBps"] > 0


def test_cuda_only_work_is_reported_not_run_with_a_reason(smoke):
    _, report, _ = smoke
    for name in CUDA_ONLY:
        s = _section(report, name)
        assert s["status"] == "skipped" and s["rows"] == []
        assert "not run" in s["reason"] and "CUDA" in s["reason"], s
    for name in ("mix_bench", "assign_bench"):
        triton_rows = [r for r in _section(report, name)["rows"] if r["impl"] == "triton"]
        assert triton_rows and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in triton_rows)


def test_bitexact_compares_triton_and_torch_under_the_interpreter(smoke):
    _, report, _ = smoke
    s = _section(report, "bitexact")
    if not has_triton():
        assert s["status"] == "skipped" and "triton" in s["reason"]
        return
    assert s["status"] == "ok"
    by_name = {r["name"]: r for r in s["rows"]}
    for op in PATCH_OPS:
        r = by_name[f"{op} fwd"]
        assert r["status"] == "ok" and r["checks"] == 12 and "bitwise" in r["compare"], r
    for op in ("mix", "restore", "mix_add"):
        assert by_name[f"{op} bwd"]["status"] == "ok"
    for d in ("fp32", "fp16", "bf16"):
        assert by_name[f"gumbel_assign fwd+bwd {d}"]["status"] == "ok"
    assert by_name["gumbel_assign fwd+bwd fp64"]["status"] == "skipped"


def test_markdown_has_the_header_and_every_section(smoke):
    proc, _, md = smoke
    assert md.startswith("# GPU suite")
    assert f"| torch | {torch.__version__} |" in md
    assert "| triton | " in md and "| cuda | none (CPU build of torch) |" in md and "| device | CPU" in md
    for name in SECTIONS:
        assert f"## {name}: " in md
    assert md in proc.stdout  # the table is printed too


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path):
    suite = _load_suite()

    def boom(ctx):
        yield suite.row("before the error", x=1.5)
        raise ValueError("boom in the section")

    def fine(ctx):
        yield suite.row("fine row", ms=2.0)
        yield suite.guarded("guarded row", lambda: 1 / 0)

    sections = [suite.Section("boom", "raises", boom), suite.Section("fine", "runs", fine)]
    seen = []
    results = suite.run_sections(sections, suite.Ctx(out=tmp_path, smoke=True, budget_s=60), on_result=seen.append)
    assert [r["section"] for r in results] == ["boom", "fine"] and len(seen) == 2
    failed, ok = results
    assert failed["status"] == "fail" and "ValueError: boom in the section" in failed["reason"]
    assert "boom in the section" in failed["traceback"] and failed["rows"][0]["name"] == "before the error"
    assert ok["status"] == "fail" and ok["reason"] == "1 of 2 rows failed"  # the guarded row failed alone
    assert ok["rows"][0]["status"] == "ok" and "ZeroDivisionError" in ok["rows"][1]["reason"]
    md = suite.render_markdown({"torch": torch.__version__}, results, 1.0)
    assert "boom in the section" in md and "| fine row | ok |" in md


def test_a_spent_budget_skips_what_is_left(tmp_path):
    suite = _load_suite()
    ran = []
    section = suite.Section("late", "never runs", lambda ctx: ran.append(1) or iter(()))
    (res,) = suite.run_sections([section], suite.Ctx(out=tmp_path, budget_s=0.0))
    assert res["status"] == "skipped" and "budget" in res["reason"] and not ran
