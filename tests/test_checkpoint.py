"""Atomic checkpoints, keep-last-k, RNG/optimizer/scheduler/data restore, config mismatch, safetensors."""

# ruff: noqa: NPY002 - the legacy global numpy RNG is exactly what a checkpoint must save and restore

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from mixreorg.checkpoint import (
    CheckpointConfigMismatch,
    CheckpointManager,
    capture_rng_state,
    check_config,
    export_safetensors,
    load_checkpoint,
    load_safetensors,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from mixreorg.data import SynthShapesStream


def _failing_serializer(obj, f) -> None:
    f.write(b"half of a checkpoint")
    raise OSError("disk full (simulated)")


def test_atomic_write_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path, serializer=_failing_serializer)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left behind
    assert load_checkpoint(path)["step"] == 1
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_keep_last_k_and_fallback(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path / "run", keep_last=2, keep_every=3)
    assert mgr.latest() is None and mgr.load_latest() is None
    for step in range(1, 8):
        mgr.save({"step": step}, step)
    assert [s for s, _ in mgr.checkpoints()] == [3, 6, 7]  # last two + every 3rd
    with pytest.raises(OSError):
        mgr.save({"step": 8}, 8, serializer=_failing_serializer)
    assert [s for s, _ in mgr.checkpoints()] == [3, 6, 7]  # a failed save prunes nothing
    mgr.latest().write_bytes(b"corrupted on disk")
    state, path = mgr.load_latest()
    assert state["step"] == 6 and path.name == "ckpt-000000006.pt"
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def _draw() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_rng_restore_reproduces_the_next_numbers(tmp_path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    state = capture_rng_state()
    expected = _draw()
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    _draw()
    _draw()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])  # through a weights_only load
    assert _draw() == expected


@dataclasses.dataclass
class ModelCfg:
    width: int = 16
    depth: int = 2


@dataclasses.dataclass
class RunCfg:
    model: ModelCfg = dataclasses.field(default_factory=ModelCfg)
    lr: float = 1e-3
    steps: int = 10


def test_config_mismatch_lists_every_key() -> None:
    saved = RunCfg()
    current = RunCfg(model=ModelCfg(width=32), lr=3e-4, steps=20)
    with pytest.raises(CheckpointConfigMismatch) as err:
        check_config(saved, current)
    msg = str(err.value)
    assert "model.width: checkpoint 16, now 32" in msg and "lr: checkpoint 0.001, now 0.0003" in msg
    assert "steps" in msg and "model.depth" not in msg
    assert len(err.value.differences) == 3 and isinstance(err.value, ValueError)
    check_config(saved, RunCfg(steps=99), ignore=["steps"])  # allowed to change
    with pytest.raises(CheckpointConfigMismatch, match="extra.b: absent from the checkpoint, now 2"):
        check_config({"a": 1}, {"a": 1, "extra": {"b": 2}})
    with pytest.raises(CheckpointConfigMismatch, match="a.b: checkpoint 1, absent from the current config"):
        check_config({"a": {"b": 1}}, {"a": {}})


class Tiny(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _setup(width: int = 16):
    torch.manual_seed(0)
    model = Tiny(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _step(model, opt, sched) -> None:
    # inputs from the torch, numpy and python global RNGs (as augmentation might); dropout uses torch's
    x = torch.randn(4, 8) * (1.0 + float(np.random.rand())) + random.random()
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_resume_equals_uninterrupted(tmp_path) -> None:
    cfg = RunCfg()
    # uninterrupted: 6 steps
    model, opt, sched = _setup()
    random.seed(0)
    np.random.seed(0)
    for _ in range(6):
        _step(model, opt, sched)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    # interrupted after 3 steps (data position saved too), resumed in fresh objects
    model, opt, sched = _setup()
    random.seed(0)
    np.random.seed(0)
    stream = SynthShapesStream(2)
    for batch, _ in zip(stream, range(3)):
        stream.observe(batch)
        _step(model, opt, sched)
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(training_state(model, opt, sched, step=3, config=cfg, data_state=stream.state_dict()), 3)
    _step(model, opt, sched)  # work after the checkpoint is lost in the "crash"

    model2, opt2, sched2 = _setup()
    torch.manual_seed(1234)  # a different RNG state before the restore
    info = restore_training_state(mgr.latest(), model2, opt2, sched2, config=cfg)
    assert info["step"] == 3
    stream2 = SynthShapesStream(2)
    stream2.load_state_dict(info["data"])
    assert next(iter(stream2))["index"].tolist() == [6, 7]
    for _ in range(3):
        _step(model2, opt2, sched2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert sched2.last_epoch == 6 and opt2.param_groups[0]["lr"] == pytest.approx(1e-2 / 7)

    # another config: a clear error, nothing modified
    model3, opt3, sched3 = _setup()
    before = {k: v.clone() for k, v in model3.state_dict().items()}
    with pytest.raises(CheckpointConfigMismatch, match="lr: checkpoint 0.001, now 0.1"):
        restore_training_state(mgr.latest(), model3, opt3, sched3, config=RunCfg(lr=0.1))
    assert all(torch.equal(v, before[k]) for k, v in model3.state_dict().items())


def test_model_mismatch_lists_keys(tmp_path) -> None:
    model, opt, sched = _setup(16)
    path = save_checkpoint(training_state(model, step=0), tmp_path / "m.pt")
    other, _, _ = _setup(32)
    with pytest.raises(ValueError, match=r"fc1.weight: checkpoint \(16, 8\), model \(32, 8\)"):
        restore_training_state(path, other)
    with pytest.raises(ValueError, match="no optimizer state"):
        restore_training_state(path, model, opt)
    with pytest.raises(ValueError, match="not a training state"):
        restore_training_state({"weights": 1}, model)


def test_safetensors_export_and_load(tmp_path) -> None:
    model, _, _ = _setup()
    model.fc2.weight = nn.Parameter(model.fc2.weight.detach().clone())
    model.register_buffer("tied", model.fc1.weight)  # shares storage with a parameter
    path = export_safetensors(model, tmp_path / "w" / "model.safetensors", config=RunCfg(), metadata={"step": 5})
    sd, meta = load_safetensors(path)
    assert set(sd) == set(model.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert json.loads(meta["config"])["model"]["width"] == 16 and meta["step"] == "5"
    fresh = Tiny()
    fresh.register_buffer("tied", torch.zeros(16, 8))
    load_safetensors(path, fresh)
    assert torch.equal(fresh.fc1.weight, model.fc1.weight)
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        load_safetensors(path, nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 1)))
