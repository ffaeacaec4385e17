"""The bf16 learning check (``python -m mixreorg.recipes.bf16_check``): its verdict, its refusals, and
on a CPU with native bf16 a real (tiny) run of both precisions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mixreorg.recipes import train
from mixreorg.recipes.bf16_check import format_verdict, main, verdict
from mixreorg.recipes.train import cpu_bf16_support

MIOU = st.floats(0.0, 1.0, allow_nan=False)
NATIVE, FOUND = cpu_bf16_support()
SMALL = ["model.vision.embed_dim=32", "model.vision.num_heads=2", "model.vision.depths=[1,1]",
         "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "model.proj_dim=16",
         "model.proj_hidden=32", "data.image_size=32", "train.batch_size=8", "optim.warmup_steps=1",
         "eval.size=8", "eval.batch_size=8", "eval.overlays=0"]  # fmt: skip


@given(st.lists(MIOU, min_size=2, max_size=6))
def test_the_same_runs_are_within_their_own_spread(fp32):
    v = verdict(fp32, fp32)
    assert v["within_spread"] and v["fp32_spread"] == [min(fp32), max(fp32)]
    assert v["bf16_mean"] == pytest.approx(v["fp32_mean"])


@given(st.lists(MIOU, min_size=2, max_size=6), st.floats(1e-3, 0.5))
def test_a_bf16_mean_below_or_above_every_float32_run_fails(fp32, gap):
    assert not verdict(fp32, [min(fp32) - gap])["within_spread"]
    assert not verdict(fp32, [max(fp32) + gap, max(fp32) + gap])["within_spread"]
    assert "OUTSIDE" in format_verdict("mixreorg", verdict(fp32, [min(fp32) - gap]))


def test_verdict_needs_a_spread():
    with pytest.raises(ValueError, match=">= 2 float32 runs"):
        verdict([0.3], [0.3])


def test_refuses_at_once_without_native_bf16(tmp_path: Path, monkeypatch, capsys):
    if NATIVE:  # this CPU has bf16: only the detection's answer is replaced, the check is the real one
        monkeypatch.setattr(train, "cpu_bf16_support", lambda: (False, "avx512_bf16=no, amx=no"))
        assert main(["--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
    else:  # the real command on a CPU without it
        proc = subprocess.run([sys.executable, "-m", "mixreorg.recipes.bf16_check", "--out", str(tmp_path / "c")],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2
        err = proc.stderr
    assert "needs a CPU with native bf16" in err
    assert not (tmp_path / "c").exists()  # nothing was run


@pytest.mark.skipif(not NATIVE, reason=f"needs a CPU with native bf16 ({FOUND})")
def test_runs_both_precisions_and_writes_the_verdict(tmp_path: Path):
    out = tmp_path / "c"
    args = ["--seeds", "0", "1", "--steps", "2", "--out", str(out)] + [a for s in SMALL for a in ("--set", s)]
    assert main(args + ["--set", "train.cpu_bf16=on"]) == 2  # the check sets the precision itself
    assert main(args) in (0, 1)
    res = json.loads((out / "bf16_check.json").read_text())["rows"]["mixreorg"]
    assert len(res["fp32"]) == len(res["bf16"]) == 2
    bf16_log = (out / "bf16" / "mixreorg" / "seed0" / "compare_run.json").read_text()
    assert "train.cpu_bf16=on" in bf16_log
