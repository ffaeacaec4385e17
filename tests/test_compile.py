"""The recipe's CPU speed switches: ``train.compile``, ``data.prefetch`` and ``train.cpu_bf16``.

``torch.compile`` of the recipe's training forward: one graph for the whole trainer model (no graph
break: ``fullgraph=True`` raises on any), compiled once (``error_on_recompile`` raises on a second
compilation), on real batches of the recipe's data path (``BatchBuilder(fixed_length=True)``, as
``train.compile`` builds them), and the same losses as eager.

The ``aot_eager`` backend: graph breaks and recompilations are decided by Dynamo, before any
backend, and AOTAutograd traces the backward as Inductor would; Inductor's C++ code generation
would only add minutes on a shared CPU core (``benchmarks/bench_step.py`` times the Inductor step).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo

from mixreorg.checkpoint import CheckpointManager, load_checkpoint
from mixreorg.recipes.config import get_preset
from mixreorg.recipes.data import BatchBuilder, Prefetcher, build_stream
from mixreorg.recipes.models import build_model
from mixreorg.recipes.train import cpu_bf16_support, resolve_cpu_bf16, train
from tests.test_pretrain import tiny_config

PRESETS = {
    "tiny": {},
    # the MixReorg group size must divide the batch of 8
    "tiny_mixreorg": {"model.name": "mixreorg", "model.mixreorg": {"group_size": 4}},
}
STEPS = 4


def _model_and_batches(preset: str, tmp_path: Path, steps: int):
    cfg = tiny_config(tmp_path, steps=max(steps, 2), **PRESETS[preset])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    stream = build_stream(cfg, cfg.train.batch_size, rank=0, world=1)
    builder = BatchBuilder(cfg, cfg.model.text["context_length"], fixed_length=True)
    it = iter(stream)
    return model, [builder(next(it), step) for step in range(steps)]


def _losses(model: torch.nn.Module, forward, opt, batches: list[dict]) -> list[dict[str, float]]:
    """Optimiser steps with ``forward``; every logged number of every step."""
    prepare = getattr(model, "prepare_batch", None)
    logged = []
    for batch in batches:
        outs = forward(prepare(batch) if prepare is not None else batch)
        opt.zero_grad(set_to_none=True)
        outs["loss"].backward()
        opt.step()
        logged.append({k: float(v) for k, v in outs.items() if isinstance(v, torch.Tensor) and v.numel() == 1})
    return logged


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_training_forward_compiles_once_in_one_graph(preset: str, tmp_path: Path) -> None:
    model, batches = _model_and_batches(preset, tmp_path, STEPS)
    eager_model, _ = _model_and_batches(preset, tmp_path, 1)  # the same seed: the same weights
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier tests
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    first = _losses(model, compiled, opt, batches[:1])
    with torch._dynamo.config.patch(error_on_recompile=True):
        rest = _losses(model, compiled, opt, batches[1:])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.manual_seed(1)
    eager = _losses(eager_model, eager_model, torch.optim.AdamW(eager_model.parameters(), lr=1e-3), batches)
    assert eager[0].keys() == first[0].keys() and {"loss", "acc_i2t", "scale"} <= set(
        k.split("/")[-1] for k in first[0]
    )
    for step, (e, c) in enumerate(zip(eager, first + rest)):
        for key in e:
            assert c[key] == pytest.approx(e[key], rel=1e-4, abs=1e-5), (step, key)


def test_builder_pads_to_the_context_and_keys_are_tensors(tmp_path: Path) -> None:
    """What keeps the compiled step at one shape: token rows padded to the text context, label ids
    to a multiple of ``LABEL_WIDTH``; and every key the objective reads is an int64 tensor."""
    _, batches = _model_and_batches("tiny", tmp_path, 3)
    ctx = 32
    for b in batches:
        assert b["text"].shape == (8, ctx) and b["prompts"].shape == (8, 3, ctx)
        assert b["label_keys"].shape == (8, BatchBuilder.LABEL_WIDTH)
        for key in ("text_keys", "prompt_keys", "label_keys", "caption_keys"):
            assert b[key].dtype == torch.int64, key
    # the shapes do not follow the captions: their token lengths differ between these batches
    lengths = {int((b["text"] != 0).sum(-1).max()) for b in batches}
    assert len(lengths) > 1, lengths


# ---------------------------------------------------------------------------------------------- prefetch
def _trained(out: Path, **extra: object) -> tuple[list[dict], dict]:
    train(tiny_config(out, steps=5, **extra), resume=False, evaluate_at_end=False, quiet=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timing = ("img_s", "time_s", "eta_s")
    final = load_checkpoint(CheckpointManager(out / "checkpoints").latest())
    return [{k: v for k, v in r.items() if k not in timing} for r in records], final["model"]


def test_prefetched_batches_train_the_same_weights(tmp_path: Path) -> None:
    """Batches built on the background thread are the loop's own, in its order: the same metrics
    every step and the same weights (the resume with prefetch: tests/test_resume_signals.py)."""
    plain_records, plain = _trained(tmp_path / "plain", **{"data.augment": "deit"})
    records, weights = _trained(tmp_path / "prefetch", **{"data.augment": "deit", "data.prefetch": 2})
    assert records == plain_records and len(records) == 5
    assert plain.keys() == weights.keys() and all(torch.equal(plain[k], weights[k]) for k in plain)


def test_prefetcher_keeps_order_and_raises_the_producers_error() -> None:
    def build(raw: dict, step: int) -> dict:
        if raw["i"] == 4:
            raise KeyError("no caption in sample 4")
        return {"step": step}

    batches = Prefetcher(iter({"i": i} for i in range(10)), build, start=7, depth=2)
    assert [next(batches) for _ in range(4)] == [({"i": i}, {"step": 7 + i}) for i in range(4)]
    with pytest.raises(KeyError, match="no caption in sample 4"):
        next(batches)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher(iter([]), build, start=0, depth=0)


def test_negative_prefetch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.prefetch must be >= 0"):
        train(tiny_config(tmp_path, **{"data.prefetch": -1}), resume=False, evaluate_at_end=False, quiet=True)


# ---------------------------------------------------------------------------------------------- CPU bf16
def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("the CPU's flags are read from /proc/cpuinfo (Linux)")
    return {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()[2:]}


def test_cpu_bf16_detection_follows_the_cpu_flags() -> None:
    """Native bf16 = AVX512-BF16 or AMX, as the kernel reports the CPU's flags (a second source)."""
    native, found = cpu_bf16_support()
    assert native == bool({"avx512_bf16", "amx_tile", "amx_bf16"} & _cpu_flags()), found
    assert "avx512_bf16=" in found
    assert resolve_cpu_bf16("auto") is native
    assert resolve_cpu_bf16("off") is False


def test_tiny_presets_train_in_bf16_exactly_where_the_cpu_has_it() -> None:
    """The main job's precision (the tiny presets' ``auto``, chosen by the bf16 learning check)
    follows the CPU; the published-config presets stay float32."""
    native, found = cpu_bf16_support()
    for name in ("tiny", "tiny_mixreorg", "tiny_hybrid", "tiny_hybrid_supervised"):
        assert resolve_cpu_bf16(get_preset(name).train.cpu_bf16) is native, (name, found)
    assert resolve_cpu_bf16(get_preset("groupvit_cc12m").train.cpu_bf16) is False


def test_cpu_bf16_on_an_unsupported_cpu_is_refused_with_the_reason() -> None:
    assert resolve_cpu_bf16("auto", native=False) is False and resolve_cpu_bf16("on", native=True) is True
    with pytest.raises(ValueError, match="train.cpu_bf16=on, but this CPU has no native bf16.*slower than float32"):
        resolve_cpu_bf16("on", native=False)
    with pytest.raises(ValueError, match=r"train.cpu_bf16 must be one of off\|auto\|on, got 'yes'"):
        resolve_cpu_bf16("yes")


def test_cpu_bf16_on_trains_under_autocast_or_refuses_to_start(tmp_path: Path) -> None:
    """On this CPU either way: with native bf16 the run trains (bf16 logits differ from float32's),
    without it ``train()`` stops before the first step with the message above."""
    cfg = tiny_config(tmp_path / "bf16", steps=2, **{"train.cpu_bf16": "on"})
    if not cpu_bf16_support()[0]:
        with pytest.raises(ValueError, match="no native bf16"):
            train(cfg, resume=False, evaluate_at_end=False, quiet=True)
        return
    train(cfg, resume=False, evaluate_at_end=False, quiet=True)
    plain_records, _ = _trained(tmp_path / "fp32")
    bf16 = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16)
    assert bf16[0]["loss"] != plain_records[0]["loss"]  # the forward really ran in bf16
