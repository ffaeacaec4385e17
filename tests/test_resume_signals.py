"""A pretraining process killed with SIGKILL mid-run and resumed from its newest checkpoint ends
bit-for-bit where an uninterrupted process with the same seeds ends (GroupViT and MixReorg, with
the DeiT augmentation on; the interrupted run builds its batches on the prefetch thread, the
uninterrupted one in the loop): real subprocesses of ``python -m mixreorg.recipes.pretrain``, a real
signal, nothing of the training loop imported or patched.

Why the kill always lands mid-run: the interrupted process is killed as soon as its first
checkpoint (step 2 of 40) is on disk, and at this size a step takes about 0.1 s on one CPU thread,
so ~4 s of training (and the final checkpoint and loss plot) are still ahead of it; its exit
status -9 proves that it was still running when the signal came.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mixreorg.checkpoint import CheckpointManager, load_checkpoint
from tests.test_pretrain import TINY  # a model small enough for a few CPU steps per second

ROOT = Path(__file__).resolve().parents[1]


STEPS = 40
SAVE_EVERY = 2
# batches read ahead when B is killed are read again on resume: the position saved is the consumed one
PREFETCH = ("--set", "data.prefetch=2")
# numbers of a metrics.jsonl record that depend on the wall clock, not on the training
TIMING_KEYS = ("img_s", "time_s", "eta_s")

PRESETS = {
    "tiny": [],
    # the MixReorg group size must divide the batch of 8
    "tiny_mixreorg": ['model.mixreorg={"group_size": 4}'],
}


def _command(preset: str, out: Path, augment: str, *extra: str) -> list[str]:
    sets = (
        TINY
        + PRESETS[preset]
        + [
            f"data.augment={augment}",
            f"train.save_every={SAVE_EVERY}",
            f"train.keep_last={STEPS}",  # every checkpoint of the run stays on disk
        ]
    )
    return [
        sys.executable, "-m", "mixreorg.recipes.pretrain", "--preset", preset, "--steps", str(STEPS),
        "--out", str(out), "--no-eval", "--threads", "1", *[a for s in sets for a in ("--set", s)], *extra,
    ]  # fmt: skip


def _start(cmd: list[str], hashseed: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED=hashseed)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str], what: str) -> str:
    """Wait for a process that must succeed; returns its stderr."""
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    return err


def _steps(out: Path) -> list[int]:
    return [step for step, _ in CheckpointManager(out / "checkpoints").checkpoints()]


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line the kill may have cut short."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return float("inf")


def _assert_identical(a: Any, b: Any, where: str) -> None:
    """``a`` and ``b`` equal to the bit: tensors by ``torch.equal`` (and dtype), containers recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (
            f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        )
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _without_numpy(rng: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rng.items() if k != "numpy"}


def _training_part(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Everything of a checkpoint but what differs between two processes by design: the run folder,
    the prefetch switch, the seconds spent, and numpy's global RNG state (the trainer seeds
    ``random`` and ``torch``, not numpy, whose global state nothing in training draws from: each
    process starts it from OS entropy)."""
    extra = dict(ckpt.get("extra") or {})
    extra.pop("elapsed_s", None)
    if "rng_ranks" in extra:
        extra["rng_ranks"] = [_without_numpy(r) for r in extra["rng_ranks"]]
    config = json.loads(json.dumps(ckpt["config"]))
    config["train"].pop("out_dir")
    config["data"].pop("prefetch")
    rest = {k: v for k, v in ckpt.items() if k not in ("config", "extra", "rng")}
    return {**rest, "rng": _without_numpy(ckpt["rng"]), "extra": extra, "config": config}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sigkilled_run_resumes_to_the_uninterrupted_weights(tmp_path: Path, preset: str) -> None:
    a_dir, b_dir, plain_dir = tmp_path / "a", tmp_path / "b", tmp_path / "a_no_augment"

    # (a) uninterrupted, and (b) the same run in another folder, killed after its first checkpoint;
    # both at once (one thread each)
    run_a = _start(_command(preset, a_dir, "deit", "--resume", "no", "--quiet"), hashseed="1")
    run_b = _start(_command(preset, b_dir, "deit", "--resume", "no", "--quiet", *PREFETCH), hashseed="2")
    try:
        deadline = time.monotonic() + 240
        while not _steps(b_dir):
            assert run_b.poll() is None, f"run B ended before its first checkpoint:\n{run_b.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "run B wrote no checkpoint in 240 s"
            time.sleep(0.01)
        os.kill(run_b.pid, signal.SIGKILL)
        run_b.communicate(timeout=60)
    finally:
        if run_b.poll() is None:
            run_b.kill()
            run_b.communicate()
    # -9: the process was still training when the signal came (it did not finish on its own)
    assert run_b.returncode == -signal.SIGKILL
    left = _steps(b_dir)
    cut = left[-1]
    assert 0 < cut < STEPS and cut % SAVE_EVERY == 0, left
    assert left == list(range(SAVE_EVERY, cut + 1, SAVE_EVERY))
    cut_file = CheckpointManager(b_dir / "checkpoints").path_for(cut)
    cut_stat = cut_file.stat()
    records_before = (b_dir / "metrics.jsonl").read_text().splitlines()

    # B resumed in a fresh process (another hash seed), and the same seeds as A without augmentation
    resumed_at = time.time_ns()
    run_b2 = _start(_command(preset, b_dir, "deit", "--resume", *PREFETCH), hashseed="3")
    run_plain = _start(_command(preset, plain_dir, "none", "--resume", "no", "--quiet", "--stop-at", "2"), hashseed="1")
    _finish(run_a, "run A")
    resume_log = _finish(run_b2, "the resumed run B")
    _finish(run_plain, "run A without augmentation")

    # (c) B resumed from the intermediate checkpoint...
    assert f"resumed from {cut_file} at step {cut}" in resume_log, resume_log[-3000:]
    assert _steps(b_dir) == _steps(a_dir) == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    after = cut_file.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (cut_stat.st_ino, cut_stat.st_mtime_ns, cut_stat.st_size)
    for step, path in CheckpointManager(b_dir / "checkpoints").checkpoints():
        # written before the kill up to the cut, by the resumed process after it
        assert (path.stat().st_mtime_ns >= resumed_at) == (step > cut), (step, cut)
    # ... its metrics kept the interrupted process's records up to the cut, dropped the ones after
    # it, and then logged every step once
    records_after = (b_dir / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in records_before if _step_of(line) <= cut]
    assert len(kept) == cut and records_after[:cut] == kept
    b_records, a_records = _records(b_dir), _records(a_dir)
    assert [r["step"] for r in b_records] == [r["step"] for r in a_records] == list(range(1, STEPS + 1))
    # ... and the losses, learning rates and gradient norms of every step are A's
    for ra, rb in zip(a_records, b_records):
        _assert_identical(
            {k: v for k, v in ra.items() if k not in TIMING_KEYS},
            {k: v for k, v in rb.items() if k not in TIMING_KEYS},
            f"metrics step {ra['step']}",
        )

    # every tensor of the final state (weights, AdamW moments, schedule, RNG and data positions)
    # is A's, and so is the checkpoint the killed process had written
    final_a = load_checkpoint(CheckpointManager(a_dir / "checkpoints").latest())
    final_b = load_checkpoint(CheckpointManager(b_dir / "checkpoints").latest())
    assert final_a["step"] == final_b["step"] == STEPS
    assert final_a["model"] and final_a["optimizer"]["state"]
    _assert_identical(_training_part(final_a), _training_part(final_b), "final checkpoint")
    at_cut_a = load_checkpoint(CheckpointManager(a_dir / "checkpoints").path_for(cut))
    _assert_identical(_training_part(at_cut_a), _training_part(load_checkpoint(cut_file)), f"checkpoint {cut}")

    # the augmentation is really on: the same seeds without it give other weights after 2 steps
    assert load_checkpoint(CheckpointManager(a_dir / "checkpoints").path_for(2))["config"]["data"]["augment"] == "deit"
    with_aug = load_checkpoint(CheckpointManager(a_dir / "checkpoints").path_for(2))["model"]
    without = load_checkpoint(CheckpointManager(plain_dir / "checkpoints").latest())
    assert without["step"] == 2 and without["config"]["data"]["augment"] == "none"
    assert with_aug.keys() == without["model"].keys()
    differ = [k for k in with_aug if not torch.equal(with_aug[k], without["model"][k])]
    assert differ, "data.augment=deit and data.augment=none trained the same weights"
