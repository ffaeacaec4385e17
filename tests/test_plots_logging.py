"""The run's pictures and logs: the ETA within the time limit, the progress output, ``loss.png``
(matplotlib panels), the per-class IoU and comparison bar charts, and ``--log tensorboard``."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixreorg.recipes.config import get_preset
from mixreorg.recipes.logger import MetricsLog, Progress, eta_seconds, metrics_figure, plot_metrics, run_series
from mixreorg.viz import plot_bars, plot_curves
from tests.test_pretrain import tiny_config


def _png(path: Path) -> Image.Image:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _drawn(img: Image.Image) -> float:
    """The fraction of pixels that are not white."""
    return float((np.abs(np.asarray(img.convert("RGB")).astype(int) - 255).sum(-1) > 0).mean())


# ------------------------------------------------------------------------------------------------ ETA
def test_eta_follows_the_steps_without_a_time_limit() -> None:
    # 10 steps in 20 s since the start at step 0: 90 steps left at 2 s each
    assert eta_seconds(10, 100, 0, 20.0, 20.0, 0.0) == pytest.approx(180.0)
    # resumed at step 50: the pace counts the steps of this process only
    assert eta_seconds(60, 100, 50, 20.0, 500.0, 0.0) == pytest.approx(80.0)
    assert eta_seconds(100, 100, 0, 50.0, 50.0, 0.0) == 0.0
    assert eta_seconds(0, 100, 0, 0.0, 0.0, 0.0) == 0.0  # nothing measured yet


def test_eta_honours_the_time_limit() -> None:
    # the steps would take 7 minutes more, the budget ends in 3: the budget binds
    assert eta_seconds(30, 100, 0, 180.0, 180.0, 360.0) == pytest.approx(180.0)
    # the budget continues across a resume (elapsed includes the interrupted run's time)
    assert eta_seconds(60, 100, 50, 10.0, 300.0, 390.0) == pytest.approx(40.0)  # steps: 40 s, budget: 90 s
    assert eta_seconds(60, 100, 50, 10.0, 370.0, 390.0) == pytest.approx(20.0)  # budget: 20 s
    # the steps end first: the time limit does not bind; past the budget: 0
    assert eta_seconds(90, 100, 0, 90.0, 90.0, 3600.0) == pytest.approx(10.0)
    assert eta_seconds(10, 100, 0, 400.0, 400.0, 390.0) == 0.0


def test_progress_plain_lines_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    rec = {"loss": 1.25, "itc": 0.5, "seg/loss": 0.75, "acc_i2t": 0.5, "lr": 1e-3, "img_s": 42.0, "eta_s": 125.0}
    p = Progress(10, enabled=True)
    assert not p.tty  # pytest captures stderr: not a terminal
    p.update(3, rec)
    p.update(4, rec)
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "\r" not in "".join(lines)
    assert lines[0].startswith("step 3/10 | loss 1.2500 | itc 0.500 | seg 0.750 | acc 0.50")
    assert lines[0].endswith("42 img/s | eta 2m05s")
    quiet = Progress(10, enabled=False)
    quiet.update(1, rec)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    buf.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stderr", buf)
    p = Progress(10, enabled=True, start=2, mininterval=0.0)
    p.update(4, {"loss": 2.0, "lr": 1e-3, "img_s": 10.0, "eta_s": 61.0})
    p.close()
    text = buf.getvalue()
    assert "4/10" in text and "loss 2.0000" in text and "eta 1m01s" in text


# ------------------------------------------------------------------------------------------------ loss.png
def _fake_metrics(path: Path, evaluate: bool = True) -> None:
    recs = []
    for step in range(1, 21):
        recs.append({"kind": "train", "step": step, "lr": 1e-3 * min(step, 5) / 5, "img_s": 30.0 + step,
                     "time_s": step, "eta_s": 20 - step, "grad_norm": 1.0, "loss": 10.0 / step,
                     "seg/loss": 0.5 + 1 / step, "seg/acc": 0.25 + step / 100, "acc_i2t": step / 40,
                     "original/scale": 14.0})  # fmt: skip
        if evaluate and step % 10 == 0:
            recs.append({"kind": "eval", "step": step, "synthshapes/mIoU": 0.1 * step / 10})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "not json\n")


def test_loss_png_panels(tmp_path: Path) -> None:
    jsonl = tmp_path / "metrics.jsonl"
    _fake_metrics(jsonl)
    s = run_series(jsonl)
    assert set(s["losses"]) == {"loss", "seg/loss"} and set(s["accuracies"]) == {"seg/acc", "acc_i2t"}
    assert len(s["lr"]["lr"]) == 20 and len(s["img_s"]["img_s"]) == 20
    assert s["eval"] == {"synthshapes/mIoU": [(10, pytest.approx(0.1)), (20, pytest.approx(0.2))]}
    fig = metrics_figure(jsonl, chance={"seg/acc": 0.25, "absent": 0.5})
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [
        "pretraining losses", "accuracies (seg/acc: source image of each mixed patch)", "learning rate",
        "throughput", "zero-shot evaluation",
    ]  # fmt: skip
    assert axes[0].get_yscale() == "log"  # 10 ... 0.5: more than a decade
    assert any("chance seg/acc (1/4)" in t.get_text() for t in axes[1].get_legend().get_texts())
    png = plot_metrics(jsonl, tmp_path / "out" / "loss.png")
    img = _png(png)
    assert img.size == (1000, 250 * 5 + 80) and _drawn(img) > 0.02
    again = plot_metrics(jsonl, tmp_path / "again.png")
    assert again.read_bytes() == png.read_bytes()  # deterministic
    # no evaluation record: four panels; no training record: no plot
    _fake_metrics(jsonl, evaluate=False)
    assert len(metrics_figure(jsonl).axes) == 4
    jsonl.write_text(json.dumps({"kind": "eval", "step": 3, "x/mIoU": 0.1}) + "\n")
    assert plot_metrics(jsonl, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_curves_and_bars_are_matplotlib_pngs(tmp_path: Path) -> None:
    img = plot_curves({"a": [1.0, float("nan"), 0.5], "b": [(0, 2.0)]}, tmp_path / "c.png", title="t", logy=True)
    assert _png(tmp_path / "c.png").size == img.size == (720, 420) and _drawn(img) > 0.01
    bars = plot_bars(["x", "y", "z"], {"s": [0.1, float("nan"), 0.3], "t": [0.2, 0.2, 0.2]}, tmp_path / "b.png",
                     errors={"s": [0.01, 0.0, 0.05]}, hlines={"chance": 0.05}, size=(500, 300))  # fmt: skip
    assert _png(tmp_path / "b.png").size == bars.size == (500, 300) and _drawn(bars) > 0.01
    with pytest.raises(ValueError, match="2 values for 3 categories"):
        plot_bars(["x", "y", "z"], {"s": [0.1, 0.2]})


def test_iou_and_compare_charts(tmp_path: Path) -> None:
    from mixreorg.recipes.compare import save_table_chart
    from mixreorg.recipes.evaluation import save_iou_chart

    names = ["grass", "water", "sand", "sky", "circle", "square"]
    res = {"class_names": names, "iou": [0.8, 0.7, None, 0.75, 0.0, float("nan")], "miou": 0.45,
           "chance": {"prior_random": 0.054, "most_frequent": 0.02}}  # fmt: skip
    path = save_iou_chart(res, tmp_path / "eval" / "synthshapes_iou.png")
    assert _png(path).size == (720, 420) and _drawn(_png(path)) > 0.01
    table = [
        {"row": row, "miou": m, "miou_std": 0.01, "stuff": m + 0.2, "stuff_std": 0.02, "things": m / 2,
         "things_std": 0.0, "chance": 0.054}
        for row, m in (("groupvit", 0.2), ("mixreorg", 0.3))
    ]  # fmt: skip
    chart = save_table_chart(table, tmp_path / "table.png", n_seeds=3)
    assert _png(chart).size == (720, 440) and _drawn(_png(chart)) > 0.01
    with pytest.raises(ValueError, match="empty table"):
        save_table_chart([], tmp_path / "none.png")


# ------------------------------------------------------------------------------------------------ tensorboard
def test_log_option_is_validated() -> None:
    cfg = get_preset("tiny")
    cfg.train.log = "wandb"
    with pytest.raises(ValueError, match="train.log must be jsonl|tensorboard"):
        cfg.validate()
    from mixreorg.recipes.pretrain import build_parser, config_from_args

    args = build_parser().parse_args(["--log", "tensorboard"])
    assert config_from_args(args).train.log == "tensorboard"
    assert config_from_args(build_parser().parse_args([])).train.log == "jsonl"


def test_tensorboard_needs_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'mixreorg\[tensorboard\]'"):
        MetricsLog(tmp_path / "m.jsonl", enabled=True, tensorboard=tmp_path / "tb")
    MetricsLog(tmp_path / "m.jsonl", enabled=False, tensorboard=tmp_path / "tb").close()  # rank != 0: nothing


def test_tensorboard_scalars_equal_the_jsonl(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mixreorg.recipes.train import train

    out = tmp_path / "run"
    summary = train(tiny_config(out, steps=3, **{"train.log": "tensorboard"}), quiet=True)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/img_s", "eval/synthshapes/mIoU"} <= tags
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3]
    for e, r in zip(events, train_recs):
        assert e.value == pytest.approx(r["loss"], rel=1e-6)  # float32 in the event file
    (ev,) = acc.Scalars("eval/synthshapes/mIoU")
    assert ev.step == 3 and math.isclose(ev.value, summary["eval"]["synthshapes"]["miou"], rel_tol=1e-6)
    # the run's pictures: loss.png (losses, accuracy, lr, img/s, eval) and the IoU chart
    assert summary["loss_plot"] == str(out / "loss.png") and _png(out / "loss.png").width == 1000
    assert _png(out / "eval" / "synthshapes_iou.png").size == (720, 420)
    assert summary["eval"]["synthshapes"]["iou_plot"] == str(out / "eval" / "synthshapes_iou.png")


def test_tensorboard_purges_the_steps_a_resumed_run_writes_again(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "m.jsonl", enabled=True, tensorboard=tmp_path / "tb")
    for step in (1, 2, 3, 4):
        log.write({"kind": "train", "step": step, "loss": float(step), "flag": True, "note": "x"})
    log.close()
    log = MetricsLog(tmp_path / "m.jsonl", enabled=True, tensorboard=tmp_path / "tb", purge_step=3)  # resumed at 2
    for step in (3, 4):
        log.write({"kind": "train", "step": step, "loss": 10.0 * step})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Tags()["scalars"] == ["train/loss"]  # numbers only: no bool, no text
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
