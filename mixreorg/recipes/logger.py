"""What a run writes while it trains: the progress line, ``metrics.jsonl`` and the loss plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLog", "Progress", "fmt_time", "metric_series", "plot_metrics", "scalar_value", "truncate_jsonl"]


def fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One progress line: step, loss, parts, lr, images/s, ETA (redrawn in place on a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total}", f"loss {rec['loss']:.4f}"]
        for k in ("itc", "ml", "seg"):
            if k in rec:
                parts.append(f"{k} {rec[k]:.3f}")
        if "acc_i2t" in rec:
            parts.append(f"acc {rec['acc_i2t']:.2f}")
        parts += [f"lr {rec['lr']:.2e}", f"{rec['img_s']:.0f} img/s", f"eta {fmt_time(rec['eta_s'])}"]
        line = " | ".join(parts)
        if self.tty:
            sys.stderr.write("\r" + line[:200].ljust(120))
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


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


#: logged numbers that are neither a loss term nor an accuracy (not drawn in the loss plot)
_NOT_PLOTTED = ("step", "lr", "img_s", "time_s", "eta_s", "grad_norm", "epoch")


def _is_accuracy(key: str) -> bool:
    return key.split("/")[-1].startswith(("acc", "pixel_acc"))


def metric_series(jsonl: Path) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[tuple[float, float]]]]:
    """``(losses, accuracies)`` of the training records of ``metrics.jsonl``: ``{key: [(step, value)]}``
    for every logged loss term and every accuracy (keys ending in ``acc*``)."""
    losses: dict[str, list[tuple[float, float]]] = {}
    accs: dict[str, list[tuple[float, float]]] = {}
    if not jsonl.is_file():
        return losses, accs
    for line in jsonl.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind", "train") != "train":
            continue
        for key, value in rec.items():
            if key in _NOT_PLOTTED or key == "kind" or key.split("/")[-1] == "scale":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                (accs if _is_accuracy(key) else losses).setdefault(key, []).append((rec["step"], value))
    return losses, accs


def plot_metrics(jsonl: Path, png: Path) -> Path | None:
    """Every logged loss term (total, contrast of each branch, multi-label, L_seg, ...) over the steps,
    and below it every accuracy (the mixed-patch accuracy ``seg/acc`` among them), as one PNG; None if
    ``jsonl`` has no training record."""
    from PIL import Image

    from mixreorg.viz import plot_curves

    losses, accs = metric_series(jsonl)
    if not losses:
        return None
    panels = [plot_curves(losses, title="pretraining losses", xlabel="step", ylabel="loss", smooth=0.6)]
    if accs:
        title = "accuracies" + (" (seg/acc: source image of each mixed patch, chance 1/G)" if "seg/acc" in accs else "")
        panels.append(plot_curves(accs, title=title, xlabel="step", ylabel="accuracy", smooth=0.6))
    canvas = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for panel in panels:
        canvas.paste(panel, (0, y))
        y += panel.height
    png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png)
    return png


class MetricsLog:
    """``metrics.jsonl`` of a run: one JSON record per line, flushed at once (a killed run keeps every
    finished record); a no-op on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self._f = open(path, "a") if enabled else None  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
