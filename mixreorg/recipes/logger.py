"""What a run writes while it trains: the progress bar, ``metrics.jsonl`` (the record; with
``train.log=tensorboard`` the same scalars also go to ``tb/``) and the ``loss.png`` panels."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MetricsLog",
    "Progress",
    "eta_seconds",
    "fmt_time",
    "metric_series",
    "metrics_figure",
    "plot_metrics",
    "run_series",
    "scalar_value",
    "truncate_jsonl",
]


def fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def eta_seconds(step: int, total: int, start: int, train_time: float, elapsed: float, time_limit: float) -> float:
    """Seconds of training left at ``step`` of ``total``: the remaining steps at this process's pace
    (``train_time`` seconds for the ``step - start`` steps since it started or resumed), or, when a
    ``time_limit`` is set (> 0), the budget left (``time_limit - elapsed``, ``elapsed`` counting the
    training time before a resume too) if that ends the run sooner."""
    eta = max(total - step, 0) * (train_time / max(step - start, 1))
    if time_limit > 0:
        eta = min(eta, max(time_limit - elapsed, 0.0))
    return eta


def _progress_text(rec: Mapping[str, Any]) -> list[str]:
    """The loss, its parts, the retrieval accuracy, lr, images/s and ETA of a training record."""
    parts = [f"loss {rec['loss']:.4f}"]
    for k in ("itc", "ml"):
        if k in rec:
            parts.append(f"{k} {rec[k]:.3f}")
    seg = rec.get("seg", rec.get("seg/loss"))
    if seg is not None:
        parts.append(f"seg {seg:.3f}")
    if "acc_i2t" in rec:
        parts.append(f"acc {rec['acc_i2t']:.2f}")
    return parts + [f"lr {rec['lr']:.2e}", f"{rec['img_s']:.0f} img/s", f"eta {fmt_time(rec['eta_s'])}"]


class Progress:
    """The progress of a run on stderr: a tqdm bar on a terminal (redrawn at most every
    ``mininterval`` seconds, the loss, its parts and the ETA of :func:`eta_seconds` as its postfix);
    otherwise (a log file) one plain line per logged step, never a carriage-return redraw."""

    def __init__(self, total: int, enabled: bool, *, start: int = 0, mininterval: float = 0.5) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=start, file=sys.stderr, mininterval=mininterval, dynamic_ncols=True,
                bar_format="{n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]", leave=True,
            )  # fmt: skip

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = _progress_text(rec)
        if self._bar is not None:
            self._bar.set_postfix_str(" | ".join(parts), refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            print(" | ".join([f"step {step}/{self.total}"] + parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def scalar_value(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item()) if v.numel() == 1 else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records past ``last_step`` (left by an interrupted run that is now resumed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


#: logged numbers that are neither a loss term nor an accuracy (drawn in their own panels, or not at all)
_NOT_PLOTTED = ("step", "lr", "img_s", "time_s", "eta_s", "grad_norm", "epoch")

Points = list[tuple[float, float]]


def _is_accuracy(key: str) -> bool:
    return key.split("/")[-1].startswith(("acc", "pixel_acc"))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_series(jsonl: Path) -> dict[str, dict[str, Points]]:
    """The curves of ``metrics.jsonl``: ``{"losses", "accuracies", "lr", "img_s", "eval"}``, each
    ``{key: [(step, value)]}``: every logged loss term and every accuracy (keys ending in ``acc*``)
    of the training records, the learning rate, the images/s, and every number of the evaluation
    records (``kind == "eval"``: the mIoU of each dataset evaluated during or after training)."""
    out: dict[str, dict[str, Points]] = {k: {} for k in ("losses", "accuracies", "lr", "img_s", "eval")}
    if not jsonl.is_file():
        return out
    for line in jsonl.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind, step = rec.get("kind", "train"), rec.get("step")
        if kind not in ("train", "eval") or not _number(step):
            continue
        for key, value in rec.items():
            if key in ("kind", "step") or not _number(value):
                continue
            if kind == "eval":
                group = "eval"
            elif key in ("lr", "img_s"):
                group = key
            elif key in _NOT_PLOTTED or key.split("/")[-1] == "scale":
                continue
            else:
                group = "accuracies" if _is_accuracy(key) else "losses"
            out[group].setdefault(key, []).append((step, value))
    return out


def metric_series(jsonl: Path) -> tuple[dict[str, Points], dict[str, Points]]:
    """``(losses, accuracies)`` of the training records of ``metrics.jsonl`` (:func:`run_series`)."""
    series = run_series(jsonl)
    return series["losses"], series["accuracies"]


def _log_scale(series: Mapping[str, Points]) -> bool:
    """Log scale when every value is positive and they span more than a decade."""
    values = [v for pts in series.values() for _, v in pts]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def metrics_figure(jsonl: Path, chance: Mapping[str, float] | None = None) -> Any:
    """The ``loss.png`` figure of a run (a matplotlib ``Figure``, one axes per panel): every loss
    term (log scale when they span more than a decade), every accuracy (``chance``: a dashed line per
    ``{key: value}``, e.g. ``{"seg/acc": 1 / G}`` for the mixed-patch accuracy), the learning rate,
    the images/s and, when the run was evaluated, the eval mIoU. None without a training record."""
    from matplotlib.ticker import MaxNLocator

    from mixreorg.viz import draw_curves, new_figure

    s = run_series(jsonl)
    if not s["losses"]:
        return None
    chance = {k: v for k, v in (chance or {}).items() if k in s["accuracies"]}
    acc_title = "accuracies" + (" (seg/acc: source image of each mixed patch)" if "seg/acc" in s["accuracies"] else "")
    smooth = 0.6 if max(len(v) for v in s["losses"].values()) > 50 else 0.0  # a short run: the raw values
    panels: list[tuple[str, dict[str, Points], dict[str, Any]]] = [
        ("pretraining losses", s["losses"], dict(ylabel="loss", logy=_log_scale(s["losses"]), smooth=smooth)),
    ]
    if s["accuracies"]:
        lines = {f"chance {k} (1/{round(1 / v)})" if v > 0 else f"chance {k}": v for k, v in chance.items()}
        panels.append((acc_title, s["accuracies"], dict(ylabel="accuracy", smooth=smooth, hlines=lines)))
    if s["lr"]:
        panels.append(("learning rate", s["lr"], dict(ylabel="lr", sci=True)))
    if s["img_s"]:
        panels.append(("throughput", s["img_s"], dict(ylabel="images / s")))
    if s["eval"]:
        panels.append(("zero-shot evaluation", s["eval"], dict(ylabel="mIoU", markers=True)))
    fig = new_figure((1000, 250 * len(panels) + 80))
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for i, (ax, (title, series, kw)) in enumerate(zip(axes, panels)):
        sci = kw.pop("sci", False)
        draw_curves(ax, series, title=title, xlabel="step" if i == len(panels) - 1 else "", **kw)
        if sci:  # 1e-4-sized numbers: "x 1e-4" over the axis, short tick labels
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_metrics(jsonl: Path, png: Path, chance: Mapping[str, float] | None = None) -> Path | None:
    """:func:`metrics_figure` written to ``png``; None (and nothing written) without a training record."""
    from mixreorg.viz import save_figure

    fig = metrics_figure(jsonl, chance)
    if fig is None:
        return None
    save_figure(fig, png)
    return png


def _summary_writer(directory: Path, purge_step: int | None) -> Any:
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it and says so less clearly
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "train.log=tensorboard needs the tensorboard package: pip install 'mixreorg[tensorboard]' "
            "(or pip install tensorboard); train.log=jsonl writes metrics.jsonl only"
        ) from err
    return SummaryWriter(log_dir=str(directory), purge_step=purge_step)


class MetricsLog:
    """``metrics.jsonl`` of a run: one JSON record per line, flushed at once (a killed run keeps every
    finished record); a no-op on ranks other than 0. With ``tensorboard`` (a folder, e.g.
    ``<out_dir>/tb``) every number of every record also becomes a TensorBoard scalar
    ``<kind>/<key>`` at the record's step, flushed with it; ``purge_step`` (a resumed run: the
    checkpoint's step + 1) drops the events an interrupted run wrote from that step on, as
    :func:`truncate_jsonl` does for the JSONL."""

    def __init__(self, path: Path, enabled: bool, *, tensorboard: Path | None = None,
                 purge_step: int | None = None) -> None:  # fmt: skip
        self.path = path
        self._tb = _summary_writer(tensorboard, purge_step) if enabled and tensorboard is not None else None
        self._f = open(path, "a") if enabled else None  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        if self._tb is not None and _number(record.get("step")):
            kind = record.get("kind", "train")
            for key, value in record.items():
                if key not in ("kind", "step") and _number(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, global_step=int(record["step"]))
            self._tb.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
