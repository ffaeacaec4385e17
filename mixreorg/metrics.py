"""Segmentation and classification metrics: confusion matrix, per-class IoU, mIoU, top-k, tables.

Conventions (as mmseg, which GroupViT's numbers come from):

* ``cm[t, p]`` counts pixels of true class ``t`` predicted as ``p``, accumulated over the whole
  dataset (not averaged per image). Pixels whose target is ``ignore_index`` (255) are left out.
* ``IoU_c = cm[c, c] / (sum_p cm[c, p] + sum_t cm[t, c] - cm[c, c])``; a class that is neither in the
  targets nor in the predictions has no IoU (NaN) and does not enter the mean; a class predicted but
  never present scores 0 and does enter it. ``mIoU = nanmean(IoU)``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "confusion_matrix",
    "ConfusionMatrix",
    "iou_from_confusion",
    "mean_iou",
    "pixel_accuracy",
    "topk_accuracy",
    "format_iou_table",
    "save_iou_table",
]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """``[C, C]`` int64 confusion matrix (rows: target, columns: prediction) of two label maps.

    ``pred`` and ``target`` are integer tensors of one shape. Targets equal to ``ignore_index`` are
    skipped; any other value outside ``[0, C)`` raises ``ValueError`` (a wrong class list or an
    unconverted mask is the usual cause).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("confusion_matrix expects integer label maps (take argmax of the logits first)")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel():
        t_lo, t_hi = int(target.min()), int(target.max())
        if t_lo < 0 or t_hi >= num_classes:
            raise ValueError(
                f"target labels must be in [0, {num_classes}) or {ignore_index} (ignored); found values in "
                f"[{t_lo}, {t_hi}]"
            )
        p_lo, p_hi = int(pred.min()), int(pred.max())
        if p_lo < 0 or p_hi >= num_classes:
            raise ValueError(f"predicted labels must be in [0, {num_classes}); found values in [{p_lo}, {p_hi}]")
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``[C]`` (float64) from a confusion matrix; NaN where a class has no union."""
    cm = cm.double()
    inter = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = torch.full_like(inter, float("nan"))
    has = union > 0
    iou[has] = inter[has] / union[has]
    return iou


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over classes that have a union (NaN if none)."""
    iou = iou_from_confusion(cm)
    valid = ~torch.isnan(iou)
    return float(iou[valid].mean()) if valid.any() else float("nan")


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Fraction of counted pixels predicted correctly (NaN if none counted)."""
    total = cm.sum()
    return float(cm.diagonal().sum().double() / total) if total > 0 else float("nan")


class ConfusionMatrix:
    """Accumulates a dataset-level confusion matrix; ``update`` per image or batch, then read
    ``iou``/``miou``. ``all_reduce`` sums it over ``torch.distributed`` ranks."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add label maps ``pred`` and ``target`` (same shape, e.g. ``[B, H, W]`` or ``[H, W]``)."""
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks (no-op unless ``torch.distributed`` is initialised)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            m = self.matrix.to(dev)
            torch.distributed.all_reduce(m)
            self.matrix = m.cpu()

    @property
    def iou(self) -> torch.Tensor:
        """Per-class IoU ``[C]`` (NaN: class absent from targets and predictions)."""
        return iou_from_confusion(self.matrix)

    @property
    def miou(self) -> float:
        return mean_iou(self.matrix)

    @property
    def accuracy(self) -> float:
        return pixel_accuracy(self.matrix)

    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "matrix": self.matrix.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"confusion matrix of {state['num_classes']} classes, expected {self.num_classes}")
        self.matrix = state["matrix"].clone().long()


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy of ``logits: [N, C]`` against ``labels: [N]`` for every ``k`` in ``ks``."""
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"need logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    n, c = logits.shape
    if n == 0:
        raise ValueError("topk_accuracy: no samples")
    out = {}
    top = logits.topk(min(max(ks), c), dim=1).indices  # [N, k]
    hit = top == labels.view(-1, 1)
    for k in ks:
        out[int(k)] = float(hit[:, : min(k, c)].any(dim=1).double().mean())
    return out


def _fmt(v: float) -> str:
    return "  n/a" if math.isnan(v) else f"{100.0 * v:5.1f}"


def format_iou_table(
    class_names: Sequence[str],
    iou: torch.Tensor | Sequence[float],
    *,
    title: str | None = None,
    extra: dict[str, float] | None = None,
) -> str:
    """A Markdown table of per-class IoU (percent) followed by the mIoU row (and ``extra`` rows, e.g.
    pixel accuracy). Classes without a union show ``n/a``."""
    values = [float(v) for v in (iou.tolist() if isinstance(iou, torch.Tensor) else iou)]
    if len(values) != len(class_names):
        raise ValueError(f"{len(class_names)} class names but {len(values)} IoU values")
    width = max([len("class"), len("mIoU")] + [len(n) for n in class_names] + [len(k) for k in (extra or {})])
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += [f"| {'class'.ljust(width)} | IoU (%) |", f"|{'-' * (width + 2)}|--------:|"]
    for name, v in zip(class_names, values):
        lines.append(f"| {name.ljust(width)} | {_fmt(v):>7} |")
    valid = [v for v in values if not math.isnan(v)]
    miou = sum(valid) / len(valid) if valid else float("nan")
    lines.append(f"| {'**mIoU**'.ljust(width)} | {_fmt(miou):>7} |")
    for key, v in (extra or {}).items():
        lines.append(f"| {key.ljust(width)} | {_fmt(v):>7} |")
    return "\n".join(lines)


def save_iou_table(
    path: str | os.PathLike[str],
    class_names: Sequence[str],
    iou: torch.Tensor | Sequence[float],
    *,
    title: str | None = None,
    extra: dict[str, float] | None = None,
) -> list[Path]:
    """Write ``<path>.md`` (the table), ``<path>.csv`` (class, iou) and ``<path>.json`` (all numbers).

    ``path`` is taken without its suffix. Returns the written paths.
    """
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".md", ".csv", ".json") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    values = [float(v) for v in (iou.tolist() if isinstance(iou, torch.Tensor) else iou)]
    md = base.with_name(base.name + ".md")
    md.write_text(format_iou_table(class_names, values, title=title, extra=extra) + "\n")
    csv_path = base.with_name(base.name + ".csv")
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou"])
        for name, v in zip(class_names, values):
            w.writerow([name, "" if math.isnan(v) else f"{v:.6f}"])
    valid = [v for v in values if not math.isnan(v)]
    js = base.with_name(base.name + ".json")
    js.write_text(
        json.dumps(
            {
                "title": title,
                "miou": sum(valid) / len(valid) if valid else None,
                "iou": {n: (None if math.isnan(v) else v) for n, v in zip(class_names, values)},
                **({"extra": extra} if extra else {}),
            },
            indent=2,
        )
        + "\n"
    )
    return [md, csv_path, js]
