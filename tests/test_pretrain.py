"""Pretraining recipe: config, schedule, CLI end to end, exact resume, NaN stop, DDP."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixreorg.checkpoint import CheckpointManager, load_checkpoint
from mixreorg.recipes.config import PretrainConfig, apply_overrides, get_preset
from mixreorg.recipes.models import build_model, no_weight_decay_names
from mixreorg.recipes.pretrain import NaNLossError, main, train
from mixreorg.recipes.scheduler import WarmupCosine

ROOT = Path(__file__).resolve().parents[1]

# a model small enough for a few CPU steps per second
TINY = [
    "model.vision.embed_dim=32",
    "model.vision.num_heads=2",
    "model.vision.depths=[1,1,1]",
    "model.vision.num_group_tokens=[4,2,0]",
    "model.vision.num_output_groups=[4,2]",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.text.context_length=32",
    "model.proj_dim=16",
    "model.proj_hidden=32",
    "data.image_size=32",
    "train.batch_size=8",
    "optim.warmup_steps=2",
    "train.log_every=1",
    "eval.size=8",
    "eval.batch_size=8",
    "eval.overlays=2",
    "train.threads=1",
    "train.time_limit=0",
    "train.cpu_bf16=off",  # the tiny presets' "auto" would make these runs differ between CPUs
]


def tiny_config(out: Path, steps: int = 6, **extra: object) -> PretrainConfig:
    cfg = get_preset("tiny")
    apply_overrides(cfg, TINY)
    apply_overrides(cfg, {"train.steps": steps, "train.out_dir": str(out), **extra})
    return cfg.validate()


# ---------------------------------------------------------------------------------------------- config
def test_config_overrides_presets_and_roundtrip(tmp_path: Path) -> None:
    cfg = get_preset("tiny")
    apply_overrides(cfg, ["optim.lr=5e-4", "model.vision.depths=[1,2,3]", "objective.loss=softmax", "train.amp=false"])
    assert cfg.optim.lr == 5e-4 and cfg.model.vision["depths"] == [1, 2, 3]
    assert cfg.objective.loss == "softmax" and cfg.train.amp is False
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(cfg, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="expected an int"):
        apply_overrides(cfg, ["train.steps=abc"])
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    back = PretrainConfig.load(cfg.save(tmp_path / "c.json"))
    assert back.to_dict() == cfg.to_dict()
    paper = get_preset("groupvit_cc12m")
    assert paper.peak_lr() == pytest.approx(1.6e-3) and paper.model.vision["embed_dim"] == 384
    assert get_preset("mixreorg_cc12m").model.name == "mixreorg"


def test_schedule_warmup_cosine_and_no_decay_groups() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = WarmupCosine(opt, peak=1.0, warmup_lr=0.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    lrs = [s.lr(i) for i in range(15)]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    cfg = get_preset("tiny")
    apply_overrides(cfg, TINY)
    model = build_model(cfg)
    skip = no_weight_decay_names(model)
    for name, q in model.named_parameters():
        if q.ndim <= 1 or name.endswith(("pos_embed", "group_token")):
            assert name in skip, name
        else:
            assert name not in skip, name


# ---------------------------------------------------------------------------------------------- loop
def test_cli_pretrain_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["--steps", "4", "--out", str(out), "--quiet"] + [a for s in TINY for a in ("--set", s)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "x chance" in printed
    for f in (
        "config.json",
        "metrics.jsonl",
        "loss.png",
        "eval/synthshapes_overlay.png",
        "eval/results.json",
        "eval/synthshapes_miou.md",
    ):
        assert (out / f).is_file(), f
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["img_s"] > 0 for r in train_recs)
    res = json.loads((out / "eval/results.json").read_text())["synthshapes"]
    assert len(res["iou"]) == 10
    assert res["miou"] == pytest.approx(float(np.nanmean(np.array(res["iou"], dtype=float))))
    saved = load_checkpoint(CheckpointManager(out / "checkpoints").latest())
    assert saved["step"] == 4 and saved["config"]["train"]["steps"] == 4
    # the evaluate CLI reloads the run from its checkpoint alone
    from mixreorg.recipes.evaluate import main as eval_main

    assert eval_main([str(out), "--size", "8", "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "synthshapes_overlay.png").is_file()
    # ... and scores the same split the same as the run did at its end
    again = json.loads((tmp_path / "ev" / "results.json").read_text())["synthshapes"]
    assert again["iou"] == res["iou"] and again["miou"] == res["miou"]
    # an existing run folder is resumed (nothing left to do) rather than overwritten
    assert main(args + ["--no-eval"]) == 0


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    steps = 6
    full = train(tiny_config(tmp_path / "full", steps, **{"train.save_every": 0}), evaluate_at_end=False, quiet=True)
    cut_cfg = tiny_config(tmp_path / "cut", steps, **{"train.save_every": 0})
    first = train(cut_cfg, stop_at=3, evaluate_at_end=False, quiet=True)
    assert first["step"] == 3
    torch.manual_seed(1234)  # a different process state must not matter: everything is restored
    second = train(
        tiny_config(tmp_path / "cut", steps, **{"train.save_every": 0}), resume=True, evaluate_at_end=False, quiet=True
    )
    assert second["step"] == steps
    a = load_checkpoint(full["checkpoint"])
    b = load_checkpoint(second["checkpoint"])
    assert a["step"] == b["step"] == steps
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=0, atol=0)
    la = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


class _NaNAtCall(torch.nn.Module):
    """A trainer model whose loss turns NaN at its ``at``-th training call (counted in this process)."""

    def __init__(self, inner: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def training_losses(self, batch):
        self.calls += 1
        out = self.inner.training_losses(batch)
        return {**out, "loss": out["loss"] * float("nan")} if self.calls == self.at else out

    forward = training_losses

    def inference_model(self):
        return self.inner.inference_model()

    def no_weight_decay(self):
        return {f"inner.{n}" for n in self.inner.no_weight_decay()}


def _register_nan_model(monkeypatch: pytest.MonkeyPatch, name: str, at: int) -> None:
    from mixreorg.recipes.models import MODEL_BUILDERS

    groupvit = MODEL_BUILDERS["groupvit"]
    monkeypatch.setitem(MODEL_BUILDERS, name, lambda cfg: _NaNAtCall(groupvit(cfg), at))


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register_nan_model(monkeypatch, "nan_at_5", 5)
    cfg = tiny_config(tmp_path / "nan", 8, **{"train.save_every": 2, "train.keep_last": 2, "model.name": "nan_at_5"})
    with pytest.raises(NaNLossError) as info:
        train(cfg, evaluate_at_end=False, quiet=True)
    err = info.value
    assert err.step == 5 and "step 5" in str(err)
    steps = [s for s, _ in CheckpointManager(tmp_path / "nan" / "checkpoints").checkpoints()]
    assert steps == [2, 4]
    assert err.checkpoint is not None and err.checkpoint.name.endswith("000000004.pt")
    state = load_checkpoint(err.checkpoint)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the run resumes from the last good checkpoint (the new process's model counts its calls from 0)
    done = train(
        tiny_config(tmp_path / "nan", 8, **{"train.save_every": 2, "train.keep_last": 2, "model.name": "nan_at_5"}),
        evaluate_at_end=False,
        quiet=True,
    )
    assert done["step"] == 8


def test_cli_reports_nan_with_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _register_nan_model(monkeypatch, "nan_at_2", 2)
    args = ["--steps", "4", "--model", "nan_at_2", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(args + [a for s in TINY for a in ("--set", s)]) == 3
    assert "step 2" in capsys.readouterr().err


def test_torchrun_two_processes(tmp_path: Path) -> None:
    """torchrun, 2 gloo ranks x local batch 4: gathered losses, per-rank data shards, a checkpoint that
    holds every rank's data position, one metrics stream (rank 0)."""
    out = tmp_path / "ddp"
    sets = [a for s in TINY for a in ("--set", s)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "mixreorg.recipes.pretrain",
        "--steps",
        "3",
        "--out",
        str(out),
        "--quiet",
        "--no-eval",
        *sets,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(CheckpointManager(out / "checkpoints").latest())
    assert state["step"] == 3 and len(state["data"]["ranks"]) == 2
    assert [d["rank"] for d in state["data"]["ranks"]] == [0, 1]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs)


def test_assigned_pool_ignores_segments_that_own_no_patch() -> None:
    from mixreorg.nn import GroupViT, assigned_pool

    tokens = torch.randn(2, 3, 4)
    hard = torch.zeros(2, 3, 5)
    hard[0, 0, :3] = 1  # image 0: segment 0 owns 3 patches, segment 2 owns 2, segment 1 none
    hard[0, 2, 3:] = 1
    hard[1, 1, :] = 1  # image 1: segment 1 owns everything
    pooled = assigned_pool({"tokens": tokens, "hard_maps": [hard]})
    torch.testing.assert_close(pooled[0], 0.6 * tokens[0, 0] + 0.4 * tokens[0, 2])
    torch.testing.assert_close(pooled[1], tokens[1, 1])
    with pytest.raises(ValueError, match="assignment maps"):
        assigned_pool({"tokens": tokens, "hard_maps": []})
    cfg = get_preset("tiny")
    apply_overrides(cfg, TINY + ["model.image_pool=assigned"])
    model = build_model(cfg).eval()
    view = model.inference_model()
    assert isinstance(view, GroupViT) and view is model.groupvit and view.image_pool == "assigned"
    x = torch.randn(2, 3, 32, 32)
    out = view.encode_image(x, return_maps=True)
    assert out["image_embed"].shape == (2, 16) and out["seg_embed"].shape == (2, 2, 16)
    # the image vector is the projected assigned pool of the segment tokens, not their mean
    with torch.no_grad():
        enc = view.vision(x, return_maps=True)
        want = F.normalize(view.image_proj(assigned_pool(enc)), dim=-1)
        mean = F.normalize(view.image_proj(enc["pooled"]), dim=-1)
    torch.testing.assert_close(out["image_embed"], want)
    assert (out["image_embed"] - mean).abs().max() > 1e-4
    assert view.encode_image(x)["soft_maps"] == []  # maps only on request


def test_assigned_pool_without_weight_grad_is_the_same_vector_with_no_gradient_into_the_maps() -> None:
    from mixreorg.nn import GroupViT, assigned_pool

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 3, 4, generator=gen, requires_grad=True)
    owner = torch.randint(0, 3, (2, 6), generator=gen)
    hard = F.one_hot(owner, 3).transpose(1, 2).float().requires_grad_(True)  # [B, S, N]
    probe = torch.randn(2, 4, generator=gen)
    grads = {}
    for flag in (True, False):
        pooled = assigned_pool({"tokens": tokens, "hard_maps": [hard]}, weight_grad=flag)
        grads[flag] = torch.autograd.grad((pooled * probe).sum(), (tokens, hard), allow_unused=True,
                                          materialize_grads=True)
        grads[flag, "value"] = pooled.detach()
    torch.testing.assert_close(grads[True, "value"], grads[False, "value"])
    torch.testing.assert_close(grads[True][0], grads[False][0])  # the segment tokens learn the same
    assert grads[True][1].abs().sum() > 0 and not grads[False][1].abs().any()
    with pytest.raises(ValueError, match="pool_weight_grad=False is an option of image_pool='assigned'"):
        GroupViT(image_pool="mean", pool_weight_grad=False)
    cfg = get_preset("tiny")
    apply_overrides(cfg, TINY + ["model.image_pool_grad=false"])
    assert build_model(cfg).groupvit.pool_weight_grad is False  # the tiny preset pools "assigned"
    with pytest.raises(ValueError, match="image_pool_grad=false needs model.image_pool=assigned"):
        apply_overrides(get_preset("tiny"), ["model.image_pool=mean", "model.image_pool_grad=false"]).validate()


def test_folder_source_with_deit_augmentation(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    data = tmp_path / "pairs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(f"a photo of a {'cat' if i % 2 else 'dog'} on a red sofa {i}")
    out = tmp_path / "run"
    args = [
        "--steps",
        "2",
        "--out",
        str(out),
        "--quiet",
        "--no-eval",
        "--data",
        str(data),
        "--set",
        "data.augment=deit",
        "--set",
        "data.text_keys=caption",
    ] + [a for s in TINY for a in ("--set", s)]
    assert main(args) == 0
    saved = load_checkpoint(CheckpointManager(out / "checkpoints").latest())
    assert saved["config"]["data"]["source"] == "folder" and saved["step"] == 2


def test_evaluate_background_dataset_layout() -> None:
    """A dataset with a thresholded background class (VOC-style): prompts for classes 1.., label 0 by
    threshold, predictions resized to the mask size; the confusion matrix covers all classes."""
    from mixreorg.recipes.evaluation import evaluate_segmentation

    class Fake:
        CLASS_NAMES = ("background", "circle", "square")
        NUM_CLASSES = 3
        IGNORE_INDEX = 255
        BACKGROUND_INDEX = 0
        BG_THRESH = 0.9

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> dict:
            mask = torch.zeros(20, 24, dtype=torch.long)
            mask[:5] = 255
            mask[10:, :12] = 1 + i % 2
            return {"image": torch.randn(3, 32, 32), "mask": mask}

    cfg = get_preset("tiny")
    apply_overrides(cfg, TINY)
    model = build_model(cfg)
    res = evaluate_segmentation(model, Fake(), batch_size=2, keep=1)
    assert res["bg_thresh"] == 0.9 and len(res["iou"]) == 3 and res["num_images"] == 3
    image, mask, pred = res["kept"][0]
    assert pred.shape == mask.shape == (20, 24) and int(pred.max()) <= 2
    with pytest.raises(ValueError, match="bg_thresh"):
        Fake.BG_THRESH = None
        evaluate_segmentation(model, Fake())


def test_model_registry_builds_groupvit_plus_and_mixreorg_alike():
    from mixreorg.recipes.config import get_preset
    from mixreorg.recipes.mixreorg_trainer import MixReorgPretrainer
    from mixreorg.recipes.models import build_model

    cfg = get_preset("tiny")
    depth = len(build_model(cfg).groupvit.vision.stages[0].blocks)
    cfg.model.name = "groupvit_plus"
    plus = build_model(cfg)
    assert len(plus.groupvit.vision.stages[0].blocks) == depth + 1
    cfg.model.name = "mixreorg"
    cfg.model.mixreorg = dict(group_size=8, seg_weight=0.0)
    mr = build_model(cfg)
    assert isinstance(mr, MixReorgPretrainer) and mr.loss.seg_weight == 0.0
    assert mr.model.groupvit.image_pool == cfg.model.image_pool == mr.inference_model().image_pool
    assert type(mr.objective) is type(plus.objective)  # one objective for every compared model
    n_inf = sum(p.numel() for p in mr.inference_model().parameters())
    assert n_inf == sum(p.numel() for p in plus.groupvit.parameters())  # GroupViT+ size at inference


def test_cli_pretrain_mixreorg_and_evaluate_from_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--model mixreorg`` through the real entry point: the three-branch losses are logged, and the
    evaluate CLI rebuilds the (GroupViT+) inference model from the checkpoint alone."""
    out = tmp_path / "mr"
    args = ["--model", "mixreorg", "--steps", "3", "--out", str(out), "--quiet",
            "--set", "model.mixreorg={\"group_size\": 4}"] + [a for s in TINY for a in ("--set", s)]
    assert main(args) == 0
    assert "mIoU" in capsys.readouterr().out
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert len(train_recs) == 3 and all(math.isfinite(r["loss"]) for r in train_recs)
    assert all("seg/acc" in r and "restored/loss" in r for r in train_recs)
    # the loss plot draws every loss term of the three branches and the mixed-patch accuracy
    from mixreorg.recipes.logger import metric_series

    losses, accs = metric_series(out / "metrics.jsonl")
    assert {"loss", "seg/loss", "original/itc", "restored/itc", "original/ml", "restored/ml"} <= set(losses)
    assert "seg/acc" in accs and "seg/acc" not in losses and not any("scale" in k for k in losses)
    assert [s for s, _ in losses["seg/loss"]] == [1, 2, 3]
    assert (out / "loss.png").is_file()
    from mixreorg.recipes.evaluate import main as eval_main

    assert eval_main([str(out), "--size", "8", "--out", str(tmp_path / "ev")]) == 0


# ---------------------------------------------------------------------------------------------- comparison
def test_table6_rows_by_name_follow_the_presets() -> None:
    from mixreorg.nn.presets import TABLE6_ROWS

    cfg = get_preset("tiny_mixreorg")
    for name, preset in TABLE6_ROWS.items():
        if preset.kind != "mixreorg":
            continue
        cfg.model.name = name
        m = build_model(cfg)
        assert m.model.config.contextual == preset.mixreorg["contextual"], name
        assert (m.loss.seg_weight, m.loss.restored_weight) == (preset.seg_weight, preset.restored_weight), name
        assert m.model.config.group_size == cfg.model.mixreorg["group_size"]  # the recipe's other switches stay


@pytest.mark.parametrize("head", ["groups", "patches"])
def test_supervised_upper_bound_learns_from_masks(tmp_path: Path, head: str) -> None:
    """``--model supervised``: the backbone + class embeddings fit a fixed batch's masks (the loss falls
    well below its start), and evaluation reads the class embeddings, not text prompts."""
    from mixreorg.data.segmentation import build_segmentation_dataset
    from mixreorg.data.synthshapes import SynthShapesStream
    from mixreorg.recipes.evaluation import evaluate_segmentation

    cfg = tiny_config(tmp_path / "sup")
    cfg.model.name = "supervised"
    cfg.model.supervised_head = head
    torch.manual_seed(0)
    model = build_model(cfg)
    raw = next(iter(SynthShapesStream(8, seed=0, image_size=32)))
    batch = {"images": raw["image"], "masks": raw["mask"]}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        out = model.training_losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.6 * losses[0]
    assert all(p.grad is None for p in model.groupvit.text.parameters())  # the text tower is not trained
    # every trainable parameter gets a gradient (DDP-safe), whichever head
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="masks"):
        model.training_losses({"images": raw["image"]})
    with pytest.raises(ValueError, match="unknown classes"):
        model.class_embeddings(["circle", "dog"])
    ds = build_segmentation_dataset("synthshapes", size=4, image_size=32)
    res = evaluate_segmentation(model.eval(), ds, batch_size=4)
    assert res["closed_vocabulary"] and res["topk"] is None
    assert res["miou"] == pytest.approx(float(np.nanmean(np.array(res["iou"], dtype=float))))


def test_compare_runs_rows_and_seeds_and_keeps_finished_runs(tmp_path: Path, capsys) -> None:
    from mixreorg.recipes.compare import ROWS
    from mixreorg.recipes.compare import main as compare_main

    out = tmp_path / "cmp"
    args = ["--rows", "groupvit", "supervised", "--seeds", "0", "1", "--steps", "2", "--out", str(out)]
    args += [a for s in TINY if not s.startswith("train.time_limit") for a in ("--set", s)]
    assert compare_main(args) == 0
    table = json.loads((out / "table.json").read_text())["rows"]
    assert [e["row"] for e in table] == ["groupvit", "supervised"]
    for e in table:
        assert len(e["runs"]) == 2 and e["steps"] == [2]
        mious = [r["miou"] for r in e["runs"]]
        assert e["miou"] == pytest.approx(statistics.fmean(mious))
        assert e["miou_std"] == pytest.approx(statistics.stdev(mious))
    # different seeds train on different data: the two groupvit runs differ
    g = table[0]["runs"]
    assert g[0]["iou"] != g[1]["iou"] or g[0]["miou"] != g[1]["miou"]
    assert "| groupvit |" in (out / "table.md").read_text()
    capsys.readouterr()
    assert compare_main(args) == 0  # finished runs are kept, not retrained
    assert capsys.readouterr().out.count(": kept") == 4
    assert compare_main(["--rows", "nope", "--out", str(out)]) == 2
    assert compare_main(["--preset", "nope", "--out", str(out)]) == 2
    # finished runs of another command (here another preset) are refused, not mixed into the table
    assert compare_main(args + ["--preset", "tiny_hybrid"]) == 1
    err = capsys.readouterr().err
    assert "holds a finished run of another command" in err and "--preset tiny_hybrid" in err
    assert compare_main(["--preset", "tiny_hybrid", "--seeds", "0", "--dry-run", "--out", str(out)]) == 0
    dry = capsys.readouterr().out.splitlines()
    assert len(dry) == len(ROWS) and all("--preset tiny_hybrid --model " in line for line in dry)
    # a failing run is reported with its log, the others still run
    sets = [a for s in TINY if not s.startswith("train.time_limit") for a in ("--set", s)]
    bad = ["--rows", "groupvit", "--seeds", "5", "--steps", "2", "--out", str(tmp_path / "bad")] + sets
    bad += ["--set", "model.vision.num_heads=3"]  # 32 is not divisible by 3: the run exits with an error
    assert compare_main(bad) == 1
    assert "failed" in capsys.readouterr().err


def test_resume_a_checkpoint_written_before_a_config_key_existed(tmp_path: Path) -> None:
    """Keys added to the config later take their defaults when an older run resumes; a real change
    of a setting is still refused."""
    cfg = tiny_config(tmp_path / "old", 4, **{"train.save_every": 0})
    assert train(cfg, stop_at=2, evaluate_at_end=False, quiet=True)["step"] == 2
    path = CheckpointManager(tmp_path / "old" / "checkpoints").latest()
    state = load_checkpoint(path)
    del state["config"]["model"]["supervised_head"]  # as written by a version without that key
    torch.save(state, path)
    again = tiny_config(tmp_path / "old", 4, **{"train.save_every": 0})
    assert train(again, resume=True, evaluate_at_end=False, quiet=True)["step"] == 4
    changed = tiny_config(tmp_path / "old", 6, **{"train.save_every": 0, "optim.lr": 1e-4})
    with pytest.raises(ValueError, match="optim.lr"):
        train(changed, resume=True, evaluate_at_end=False, quiet=True)


def test_supervised_hard_maps_give_each_pixel_its_group_logits(tmp_path: Path) -> None:
    """``model.supervised_maps=hard``: in training every patch's logits are exactly those of ONE group
    (the straight-through one-hot map), in eval the soft maps as before; a bad value is refused."""
    from mixreorg.nn.supervised import SupervisedSegmenter

    cfg = tiny_config(tmp_path / "sup", **{"model.name": "supervised", "model.supervised_maps": "hard"})
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, SupervisedSegmenter) and model.maps == "hard"
    images = torch.randn(4, 3, 32, 32)
    model.train()
    torch.manual_seed(1)
    out = model.encode_image(images, return_maps=True)
    hard = {**out, "soft_maps": out["hard_maps"]}
    logits = model.groupvit.segmentation_logits_from(hard, model.class_embeddings())  # [B, K, h, w] patch grid
    seg = out["seg_embed"]  # [B, S, D]
    per_group = torch.einsum("bsd,kd->bsk", seg, model.class_embeddings()) * model.scale()  # [B, S, K]
    pix = logits.flatten(2).transpose(1, 2)  # [B, h*w, K]
    dist = (pix[:, :, None, :] - per_group[:, None, :, :]).abs().amax(-1)  # [B, h*w, S]
    assert dist.amin(-1).max() < 1e-5
    model.eval()
    soft = SupervisedSegmenter(model.groupvit, model.class_names, maps="soft").eval()
    soft.class_embed = model.class_embed
    torch.testing.assert_close(model.pixel_logits(images), soft.pixel_logits(images))
    with pytest.raises(ValueError, match="supervised_maps must be soft\\|hard"):
        tiny_config(tmp_path / "bad", **{"model.supervised_maps": "argmax"})


def test_supervised_aux_loss_reads_the_first_stage_patches(tmp_path: Path) -> None:
    """``model.supervised_aux=w``: the loss is the per-pixel CE through the grouping plus ``w`` times a
    per-pixel CE of the first stage's patch tokens through the same image head and class embeddings;
    the encoding it runs is the model's own (same segments and maps); bad values are refused."""
    from mixreorg.nn.supervised import SupervisedSegmenter

    cfg = tiny_config(tmp_path / "aux", **{"model.name": "supervised", "model.supervised_aux": 0.5})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert isinstance(model, SupervisedSegmenter) and model.aux_weight == 0.5
    images = torch.randn(4, 3, 32, 32)
    out, [(patches, aux_grid)] = model._encode_with_patches(images)
    assert aux_grid == (4, 4)
    ref = model.encode_image(images, return_maps=True)
    torch.testing.assert_close(out["seg_embed"], ref["seg_embed"])
    torch.testing.assert_close(out["soft_maps"][0], ref["soft_maps"][0])
    assert patches.shape == (4, 16, model.groupvit.vision.width)
    masks = torch.randint(0, len(model.class_names), (4, 32, 32))
    logits, [aux_logits] = model.pixel_logits(images, with_aux=True)
    assert aux_logits.shape == logits.shape == (4, len(model.class_names), 32, 32)
    losses = model.training_losses({"images": images, "masks": masks})
    ce = torch.nn.functional.cross_entropy
    expect = ce(logits, masks) + 0.5 * ce(aux_logits, masks)
    torch.testing.assert_close(losses["loss"], expect)
    # the auxiliary term alone trains the first stage's blocks (and not the grouping)
    model.zero_grad()
    torch.nn.functional.cross_entropy(aux_logits, masks).backward()
    enc = model.groupvit.vision
    assert enc.stages[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert enc.stages[0].downsample.assign.q.weight.grad is None
    with pytest.raises(ValueError, match="aux_weight"):
        SupervisedSegmenter(model.groupvit, model.class_names, head="patches", aux_weight=1.0)
    with pytest.raises(ValueError, match="supervised_aux"):
        tiny_config(tmp_path / "bad", **{"model.supervised_aux": -1.0})


def test_supervised_aux_on_the_fine_grid_reads_the_tokens_the_grouping_assigns(tmp_path: Path) -> None:
    """``model.supervised_aux_tokens=fine`` (with ``group_patch_size``): the auxiliary loss reads the
    fine-grid tokens the first grouping block assigns, on the maps' grid, and trains the trunk's skip
    projection; without a fine grid it is refused with the reason."""
    from mixreorg.nn.supervised import SupervisedSegmenter

    over = {"model.name": "supervised", "model.supervised_aux": 1.0, "model.supervised_aux_tokens": "fine",
            "model.vision.stem": "hybrid", "model.vision.patch_size": 8, "model.vision.group_patch_size": 4}
    cfg = tiny_config(tmp_path / "fine", **over)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert isinstance(model, SupervisedSegmenter) and model.aux_tokens == "fine"
    images = torch.randn(2, 3, 32, 32)
    out, [(tokens, grid)] = model._encode_with_patches(images)
    assert grid == tuple(out["grid"]) == (8, 8)  # the 4x4 token grid, twice as fine
    assert tokens.shape == (2, 64, model.groupvit.vision.width)
    assert out["soft_maps"][0].shape[-1] == 64  # the grouping assigned exactly these tokens
    # the fine tokens are what the grouping's keys read: they depend on the trunk's skip projection
    _, [aux_logits] = model.pixel_logits(images, with_aux=True)
    model.zero_grad()
    torch.nn.functional.cross_entropy(aux_logits, torch.randint(0, 10, (2, 32, 32))).backward()
    assert model.groupvit.vision.fine_tokens.proj.weight.grad.abs().sum() > 0
    # "both": one loss on the stage-1 tokens and one on the fine tokens, each at the weight
    both = SupervisedSegmenter(model.groupvit, model.class_names, maps="hard", aux_weight=0.5, aux_tokens="both")
    both.eval()
    both.class_embed.data.copy_(model.class_embed.data)  # a new model draws its own class embeddings
    out, reads = both._encode_with_patches(images)
    assert [tuple(g) for _, g in reads] == [(4, 4), (8, 8)]
    masks = torch.randint(0, 10, (2, 32, 32))
    logits, aux_list = both.pixel_logits(images, with_aux=True)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(aux_list[0], both.patch_logits(out["stage1_tokens"], (4, 4), (32, 32)))
    torch.testing.assert_close(aux_list[1], aux_logits)
    expect = ce(logits, masks) + 0.5 * (ce(aux_list[0], masks) + ce(aux_list[1], masks))
    torch.testing.assert_close(both.training_losses({"images": images, "masks": masks})["loss"], expect)
    with pytest.raises(ValueError, match="group_patch_size"):
        SupervisedSegmenter(build_model(tiny_config(tmp_path / "c", **{"model.name": "supervised"})).groupvit,
                            model.class_names, aux_weight=1.0, aux_tokens="fine")
    with pytest.raises(ValueError, match="supervised_aux_tokens must be stage1\\|fine\\|both"):
        tiny_config(tmp_path / "bad", **{"model.supervised_aux_tokens": "embed"})


def test_runs_with_deit_augmentation_are_reproducible_across_processes(tmp_path: Path) -> None:
    """Two real processes with the same seeds and ``data.augment=deit`` end with the same weights (the
    augmentation draw was seeded by Python's per-process salted ``hash`` before), for GroupViT and
    MixReorg; each process gets another ``PYTHONHASHSEED``."""
    sets = [a for s in TINY + ["data.augment=deit"] for a in ("--set", s)]
    for model in ("groupvit", "mixreorg"):
        weights = []
        for run, hashseed in enumerate(("1", "2")):
            out = tmp_path / f"{model}{run}"
            cmd = [sys.executable, "-m", "mixreorg.recipes.pretrain", "--model", model, "--steps", "3", "--out",
                   str(out), "--quiet", "--no-eval", "--threads", "1", *sets]
            if model == "mixreorg":
                cmd += ["--set", 'model.mixreorg={"group_size": 4}']
            env = dict(os.environ, PYTHONHASHSEED=hashseed, PYTHONPATH=str(ROOT))
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
            assert proc.returncode == 0, proc.stderr[-3000:]
            weights.append(load_checkpoint(CheckpointManager(out / "checkpoints").latest())["model"])
        assert weights[0].keys() == weights[1].keys()
        for k in weights[0]:
            torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=0, msg=f"{model}: {k}")


def test_prompt_keys_name_the_noun_each_prompt_was_built_from(tmp_path: Path) -> None:
    """Template words that are nouns of the caption too ("a painting of the {}.") do not fool the
    prompt keys: each key is the noun the prompt was made from, the caption for fillers."""
    from mixreorg.recipes.data import BatchBuilder
    from mixreorg.text import make_prompts

    ps, ns = make_prompts("a dog.", 3, 0, nouns=["dog"], templates=["a painting of the {}."], return_nouns=True)
    assert ps == ["a painting of the dog.", "a dog.", "a dog."] and ns == ["dog", None, None]
    cfg = tiny_config(tmp_path / "pk", **{"data.num_prompts": 2})
    builder = BatchBuilder(cfg, context_length=32)
    # "photo" is a word of most CLIP templates ("a photo of the {}."): the old substring match gave it
    raw = {"image": torch.zeros(1, 3, 32, 32), "caption": ["a photo and a dog."], "nouns": [["photo", "dog"]]}
    for step in range(20):  # many template draws: every key must be the prompt's own noun
        batch = builder(raw, step)
        rng = random.Random(f"{cfg.data.seed}/{step}/0")
        expect_prompts, expect_nouns = make_prompts(raw["caption"][0], 2, rng, nouns=raw["nouns"][0],
                                                    return_nouns=True)
        assert batch["keys"]["prompt"] == [expect_nouns]
        assert sorted(batch["keys"]["prompt"][0]) == ["dog", "photo"]


def test_patch_label_term_reads_the_first_stage_patches(tmp_path: Path) -> None:
    """``objective.patch_label_weight=w`` on the GroupViT trainer: the loss gains ``w`` times the
    prompt loss scored by each image's best stage-1 patch (the tokens the grouping assigns, through
    the image head), which trains the first stage's blocks; bad values are refused."""
    from mixreorg.recipes.data import BatchBuilder, build_stream

    cfg = tiny_config(tmp_path / "pl", **{"objective.patch_label_weight": 0.5})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = BatchBuilder(cfg, cfg.model.text["context_length"])(next(iter(build_stream(cfg, 8, 0, 1))), 0)
    out = model.training_losses(batch)
    torch.testing.assert_close(out["loss"], out["itc"] + out["ml"] + 0.5 * out["patch_ml"])
    gv = model.groupvit
    vis = gv.encode_image(batch["images"])
    assert vis["stage1_tokens"].shape[1] == gv.vision.patch_embed.grid_for(batch["images"])[0] ** 2
    model.zero_grad()
    out["patch_ml"].backward()
    assert gv.vision.stages[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert gv.vision.stages[0].downsample.assign.q.weight.grad is None  # the grouping is not in its path
    with pytest.raises(ValueError, match="patch_label_weight must be >= 0"):
        tiny_config(tmp_path / "bad", **{"objective.patch_label_weight": -1.0})


@pytest.mark.parametrize("name", ["groupvit", "mixreorg"])
def test_patch_mean_term_reads_the_first_stage_patches(tmp_path: Path, name: str) -> None:
    """``objective.patch_mean_weight=w`` on the GroupViT and MixReorg trainers: the loss gains ``w``
    times the objective of the mean stage-1 patch embedding (each contrasted branch's own), which
    trains the first stage's blocks without the grouping; bad values are refused."""
    from mixreorg.recipes.data import BatchBuilder, build_stream

    extra = {"model.mixreorg": {"group_size": 4}} if name == "mixreorg" else {}
    cfg = tiny_config(tmp_path / name, **{"model.name": name, "objective.patch_mean_weight": 0.5, **extra})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = BatchBuilder(cfg, cfg.model.text["context_length"])(next(iter(build_stream(cfg, 8, 0, 1))), 0)
    if hasattr(model, "prepare_batch"):
        batch = model.prepare_batch(batch)
    out = model.training_losses(batch)
    key = "patch_mean" if name == "groupvit" else "original/patch_mean"
    assert key in out and torch.isfinite(out[key])
    if name == "groupvit":
        torch.testing.assert_close(out["loss"], out["itc"] + out["ml"] + 0.5 * out["patch_mean"])
        enc = model.groupvit.vision
    else:
        assert "restored/patch_mean" in out
        enc = model.model.vision
    model.zero_grad()
    out[key].backward()
    assert enc.stages[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="patch_mean_weight must be >= 0"):
        tiny_config(tmp_path / "bad", **{"objective.patch_mean_weight": -1.0})
