"""Confusion-matrix mIoU, per-class IoU, top-k, tables, and the PIL-only pictures (overlays, curves)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mixreorg.metrics import (
    ConfusionMatrix,
    confusion_matrix,
    format_iou_table,
    iou_from_confusion,
    mean_iou,
    pixel_accuracy,
    save_iou_table,
    topk_accuracy,
)
from mixreorg.viz import colorize, image_grid, overlay, palette, plot_curves, save_segmentation_panels


@settings(deadline=None)
@given(
    c=st.integers(1, 6),
    n=st.integers(0, 60),
    seed=st.integers(0, 2**31 - 1),
)
def test_confusion_matrix_matches_a_loop(c: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    ignore = torch.rand(n, generator=g) < 0.2
    target[ignore] = 255
    pred = torch.randint(0, c, (n,), generator=g)
    cm = confusion_matrix(pred, target, c)
    ref = torch.zeros(c, c, dtype=torch.int64)
    for p, t in zip(pred.tolist(), target.tolist()):
        if t != 255:
            ref[t, p] += 1
    assert torch.equal(cm, ref)
    iou = iou_from_confusion(cm)
    for k in range(c):
        inter = int(((pred == k) & (target == k)).sum())
        union = int((((pred == k) & (target != 255)) | (target == k)).sum())
        if union == 0:
            assert math.isnan(float(iou[k]))
        else:
            assert abs(float(iou[k]) - inter / union) < 1e-12


def test_known_example_and_conventions() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    acc = ConfusionMatrix(5)
    acc.update(pred, target)
    iou = acc.iou
    # class 0: inter 1, union 3; class 1: 2/3; class 2: 1/2; class 3: only in ignored pixels -> nan;
    # class 4: absent everywhere -> nan
    assert torch.allclose(iou[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    assert math.isnan(iou[3]) and math.isnan(iou[4])
    assert abs(acc.miou - (1 / 3 + 2 / 3 + 1 / 2) / 3) < 1e-12
    assert abs(acc.accuracy - 4 / 6) < 1e-12
    # a class predicted but never present scores 0 and counts
    acc.update(torch.tensor([4]), torch.tensor([0]))
    assert float(acc.iou[4]) == 0.0
    perfect = ConfusionMatrix(3)
    perfect.update(target.clamp(max=2), target.clamp(max=2))
    assert perfect.miou == 1.0 and mean_iou(perfect.matrix) == 1.0 and pixel_accuracy(perfect.matrix) == 1.0
    state = acc.state_dict()
    again = ConfusionMatrix(5)
    again.load_state_dict(state)
    assert torch.equal(again.matrix, acc.matrix)
    acc.reset()
    assert acc.matrix.sum() == 0 and math.isnan(acc.miou)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 3\) or 255"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match=r"predicted labels must be in \[0, 3\)"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="integer label maps"):
        confusion_matrix(torch.zeros(4), torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="2 class names but 3"):
        format_iou_table(["a", "b"], [0.1, 0.2, 0.3])


def test_topk_accuracy() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = torch.tensor([1, 2, 2, 1])
    res = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert res == {1: 0.5, 2: 1.0, 5: 1.0}
    with pytest.raises(ValueError):
        topk_accuracy(logits, labels[:3])


def test_tables_printed_and_saved(tmp_path) -> None:
    names = ["background", "cat", "dining table"]
    iou = torch.tensor([0.5, 0.25, float("nan")], dtype=torch.float64)
    table = format_iou_table(names, iou, title="VOC", extra={"pixel acc": 0.9})
    lines = table.splitlines()
    assert lines[0] == "### VOC"
    assert any("cat" in ln and "25.0" in ln for ln in lines)
    assert any("dining table" in ln and "n/a" in ln for ln in lines)
    assert any("mIoU" in ln and "37.5" in ln for ln in lines)
    assert any("pixel acc" in ln and "90.0" in ln for ln in lines)
    paths = save_iou_table(tmp_path / "out" / "voc.md", names, iou, title="VOC")
    assert [p.name for p in paths] == ["voc.md", "voc.csv", "voc.json"]
    data = json.loads(paths[2].read_text())
    assert data["miou"] == pytest.approx(0.375) and data["iou"]["dining table"] is None
    assert paths[1].read_text().splitlines()[1:] == ["background,0.500000", "cat,0.250000", "dining table,"]


# ----------------------------------------------------------------------------------------- pictures


def test_overlay_with_legend_and_grid(tmp_path) -> None:
    img = np.full((20, 30, 3), 100, dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=np.int64)
    mask[:, 20:] = 2
    mask[0, 0] = 255
    names = ["sky", "dog", "grass"]
    out = overlay(img, mask, names, alpha=1.0)
    assert out.height >= 20 and out.width > 30  # legend panel on the right (may be taller)
    arr = np.asarray(out)
    pal = palette(3)
    assert tuple(arr[5, 5]) == tuple(pal[0]) and tuple(arr[5, 25]) == tuple(pal[2])
    assert tuple(arr[0, 0]) == (100, 100, 100)  # ignored pixel keeps the image
    plain = overlay(torch.zeros(3, 20, 30), mask, names, legend=False, scale=2)
    assert plain.size == (60, 40)
    small = overlay(img, mask[::2, ::2], names, legend=False)  # a smaller mask is resized
    assert small.size == (30, 20)
    with pytest.raises(ValueError, match="outside the 2 class names"):
        overlay(img, mask, names[:2])
    assert colorize(mask).size == (30, 20)
    grid = image_grid([out, plain, Image.new("RGB", (10, 10))], ncols=2, labels=["a", "b", "a long caption " * 3])
    assert grid.width >= 2 * plain.width and grid.height > out.height + plain.height
    paths = save_segmentation_panels(tmp_path / "vis", [img, img], [mask, mask], [mask, np.ones_like(mask)], names)
    assert [p.name for p in paths] == ["sample_000.png", "sample_001.png"]
    assert Image.open(paths[1]).width > 3 * 30


def test_loss_curve_png(tmp_path) -> None:
    steps = np.arange(200)
    loss = np.exp(-steps / 60) + 0.1
    loss[50] = np.nan  # non-finite points break the line
    path = tmp_path / "curves" / "loss.png"
    img = plot_curves({"train": loss, "eval": [(0, 1.0), (100, 0.5), (199, 0.3)]}, path, title="loss", smooth=0.8)
    assert path.is_file() and Image.open(path).size == img.size == (720, 420)
    arr = np.asarray(img).astype(int)
    assert (np.abs(arr - 255).sum(-1) > 0).mean() > 0.01  # something was drawn
    log = plot_curves({"x": [1.0, 10.0, 100.0]}, logy=True, ylabel="loss")
    assert log.size == (720, 420)
    empty = plot_curves({"nothing": [float("nan")]})
    assert empty.size == (720, 420)
    with pytest.raises(ValueError, match="no series"):
        plot_curves({})
