"""Zero-shot evaluation of a GroupViT-interface model: segmentation mIoU (with overlays) and
classification accuracy, over the datasets a config names. Used by the ``evaluate`` entry point and
by the training loop's periodic evaluation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixreorg.data.segmentation import build_segmentation_dataset
from mixreorg.data.synthshapes import chance_miou
from mixreorg.metrics import ConfusionMatrix, format_iou_table, topk_accuracy
from mixreorg.text.prompts import IMAGENET_TEMPLATES, SEGMENTATION_TEMPLATES
from mixreorg.viz import image_grid, overlay, to_uint8_image
from mixreorg.zeroshot import class_embeddings, classify, segment

from .loading import inference_model

__all__ = [
    "DEFAULT_TOPK",
    "evaluate_segmentation",
    "evaluate_classification",
    "evaluate_datasets",
    "vocabulary_embeddings",
    "save_overlays",
    "save_iou_chart",
]

#: GroupViT's image-level class restriction (top-5); used everywhere unless overridden.
DEFAULT_TOPK = 5


def _prompt_names(dataset: Any) -> tuple[list[str], int | None]:
    """Class names that get a prompt, and the background index filled by thresholding (or None)."""
    names = list(dataset.CLASS_NAMES)
    bg = getattr(dataset, "BACKGROUND_INDEX", None)
    if bg is None:
        return names, None
    if bg != 0:
        raise ValueError(f"{type(dataset).__name__}: only background index 0 is supported, got {bg}")
    return names[1:], 0


def vocabulary_embeddings(
    net: nn.Module, names: Sequence[str], templates: Sequence[str] = SEGMENTATION_TEMPLATES
) -> torch.Tensor:
    """``[K, D]`` class embeddings: prompted text for open-vocabulary models, the learned class
    embeddings of a ``closed_vocabulary`` model (the supervised upper bound)."""
    if getattr(net, "closed_vocabulary", False):
        return net.classifier_embeddings(names).detach().float()
    return class_embeddings(net, names, templates)


def _same_size_groups(dataset: Any, n: int, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """The first ``n`` items, read ``batch_size`` at a time (through ``__getitems__`` when the dataset
    renders batches at once), each read split into groups of equal image size that can be stacked."""
    getitems = getattr(dataset, "__getitems__", None)
    start = 0
    while start < n:
        chunk = list(range(start, min(n, start + batch_size)))
        items = getitems(chunk) if getitems is not None else [dataset[i] for i in chunk]
        start += len(chunk)
        groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for it in items:
            groups.setdefault(tuple(it["image"].shape[-2:]), []).append(it)
        yield from groups.values()


def _multiscale_logits(
    net: nn.Module,
    images: torch.Tensor,
    text: torch.Tensor,
    scales: Sequence[float],
    *,
    bg_thresh: float | None,
    topk: int | None,
    mode: str,
) -> torch.Tensor:
    """Segmentation logits ``[B, K, H, W]`` of ``images [B, 3, H, W]``: the mean over ``scales`` of
    the logits of the resized images, each resized back to ``H x W``."""
    per_scale = []
    for f in scales:
        x = images
        if f != 1.0:
            size = (max(1, round(images.shape[-2] * f)), max(1, round(images.shape[-1] * f)))
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        lg = segment(net, x, text, bg_thresh=bg_thresh, topk=topk, mode=mode)
        if tuple(lg.shape[-2:]) != tuple(images.shape[-2:]):
            lg = F.interpolate(lg, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        per_scale.append(lg)
    # single-scale (the usual case): no stacked copy of the logits
    return per_scale[0] if len(per_scale) == 1 else torch.stack(per_scale).mean(0)


def _score_group(
    group: list[dict[str, Any]],
    logits: torch.Tensor,
    cm: ConfusionMatrix,
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    keep: int,
) -> None:
    """Add the predictions of ``group`` (``logits [B, K, H, W]``) to ``cm``, at each mask's own size
    (masks may differ from the image size); append ``(image, mask, pred)`` to ``kept`` while it has
    fewer than ``keep``."""
    for it, lg in zip(group, logits):
        mask = it["mask"].long()  # [H_m, W_m]
        if tuple(lg.shape[-2:]) != tuple(mask.shape):
            lg = F.interpolate(lg[None], size=tuple(mask.shape), mode="bilinear", align_corners=False)[0]
        pred = lg.argmax(0).cpu()  # [H_m, W_m]
        cm.update(pred, mask)
        if len(kept) < keep:
            kept.append((it["image"].cpu(), mask, pred))


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 64,
    topk: int | None = DEFAULT_TOPK,
    bg_thresh: float | None = None,
    mode: str = "whole",
    templates: Sequence[str] = SEGMENTATION_TEMPLATES,
    device: torch.device | str | None = None,
    limit: int | None = None,
    keep: int = 0,
    scales: Sequence[float] = (1.0,),
) -> dict[str, Any]:
    """Zero-shot segmentation of ``dataset`` -> ``dict(miou, iou, accuracy, class_names, table, kept)``.

    ``scales``: multi-scale inference -- the images are resized by each factor, segmented, and the
    logits (resized back) averaged; ``(1.0,)`` is single-scale.

    ``dataset`` has the segmentation-dataset interface of :mod:`mixreorg.data.segmentation`
    (items ``image [3, H, W]`` normalised, ``mask [H, W]``; ``CLASS_NAMES``, ``IGNORE_INDEX``,
    ``BACKGROUND_INDEX``, ``BG_THRESH``). Images of equal size are batched; ``bg_thresh`` defaults to
    the dataset's ``BG_THRESH``. ``keep`` returns the first images with their target and prediction
    (for overlays).
    """
    net = inference_model(model)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    names, bg = _prompt_names(dataset)
    if bg_thresh is None:
        bg_thresh = getattr(dataset, "BG_THRESH", None) if bg is not None else None
    if bg is not None and bg_thresh is None:
        raise ValueError(f"{type(dataset).__name__} has a background class: give bg_thresh")
    text = vocabulary_embeddings(net, names, templates)
    if getattr(net, "closed_vocabulary", False):
        topk = None  # nothing trains a closed-vocabulary model's image vector: no image-level top-k
    scales = [float(f) for f in scales]
    if not scales or any(f <= 0 for f in scales):
        raise ValueError(f"scales must be positive factors, got {scales}")
    restrict = topk if (topk or 0) < len(names) else None  # a top-k of at least every class restricts nothing
    cm = ConfusionMatrix(len(dataset.CLASS_NAMES), ignore_index=getattr(dataset, "IGNORE_INDEX", 255))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for group in _same_size_groups(dataset, n, batch_size):
        images = torch.stack([it["image"] for it in group]).to(device)  # [B, 3, H, W]
        logits = _multiscale_logits(net, images, text, scales, bg_thresh=bg_thresh, topk=restrict, mode=mode)
        _score_group(group, logits, cm, kept, keep)
    iou = cm.iou
    return {
        "miou": cm.miou,
        "accuracy": cm.accuracy,
        "iou": [float(v) for v in iou.tolist()],
        "class_names": list(dataset.CLASS_NAMES),
        "table": format_iou_table(dataset.CLASS_NAMES, iou, extra={"pixel accuracy": cm.accuracy}),
        "num_images": n,
        "topk": topk,
        "bg_thresh": bg_thresh,
        "scales": scales,
        "closed_vocabulary": bool(getattr(net, "closed_vocabulary", False)),
        "kept": kept,
    }


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 64,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    device: torch.device | str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Zero-shot classification of an ImageFolder-style ``dataset`` (items ``image``, ``label``;
    ``class_names``) -> ``dict(top1, top5, per_class, num_images, class_names)``; the class embeddings
    average ``templates`` (default: CLIP's 80 ImageNet prompts)."""

    net = inference_model(model)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    names = list(dataset.class_names)
    text = vocabulary_embeddings(net, names, templates)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    correct1, correct5, seen = 0.0, 0.0, 0
    per_class = torch.zeros(len(names), 2)  # [correct, total]
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([it["image"] for it in items]).to(device)
        labels = torch.tensor([int(it["label"]) for it in items])
        logits = classify(net, images, text).cpu()
        acc = topk_accuracy(logits, labels, ks=(1, min(5, len(names))))
        correct1 += acc[1] * len(items)
        correct5 += acc[min(5, len(names))] * len(items)
        seen += len(items)
        hit = logits.argmax(-1) == labels
        per_class.index_put_((labels, torch.zeros_like(labels)), hit.float(), accumulate=True)
        per_class.index_put_((labels, torch.ones_like(labels)), torch.ones(len(items)), accumulate=True)
    if seen == 0:
        raise ValueError("the classification dataset is empty")
    return {
        "top1": correct1 / seen,
        "top5": correct5 / seen,
        "per_class": {nm: (float(c / t) if t else None) for nm, (c, t) in zip(names, per_class.tolist())},
        "num_images": seen,
        "class_names": names,
    }


def save_overlays(
    kept: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    class_names: Sequence[str],
    path: str | Path,
    *,
    scale: int = 3,
) -> Path:
    """One PNG: a row per image -- image | ground truth | zero-shot prediction (with legends)."""
    from PIL import Image


    if not kept:
        raise ValueError("no images to draw")
    tiles, labels = [], []
    for image, mask, pred in kept:
        img = to_uint8_image(image)
        if scale > 1:
            img = np.asarray(
                Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
            )
        tiles += [
            Image.fromarray(img),
            overlay(img, mask, class_names, alpha=0.6),
            overlay(img, pred, class_names, alpha=0.6),
        ]
        labels += ["image", "ground truth", "zero-shot prediction"]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    image_grid(tiles, ncols=3, labels=labels).save(p)
    return p


def save_iou_chart(res: dict[str, Any], path: str | Path, *, title: str = "") -> Path:
    """The per-class IoU of a :func:`evaluate_segmentation` result as a bar chart (PNG), with its
    mIoU and, when known, the chance mIoU (prior-random) as dashed lines; a NaN IoU reads ``n/a``."""
    from mixreorg.viz import plot_bars

    names = list(res["class_names"])
    lines = {f"mIoU {res['miou']:.3f}": float(res["miou"])}
    if "chance" in res:
        lines[f"chance {res['chance']['prior_random']:.3f}"] = float(res["chance"]["prior_random"])
    width = max(720, 40 * len(names) + 160)
    plot_bars(names, {"IoU": [float("nan") if v is None else float(v) for v in res["iou"]]}, path,
              title=title or "per-class IoU", ylabel="IoU", hlines=lines, size=(min(width, 4000), 420),
              ylim=(0.0, 1.05))  # fmt: skip
    return Path(path)


def _dataset(name: str, cfg: Any, roots: dict[str, str]) -> Any:

    if name == "synthshapes":
        size = cfg.eval.size if cfg is not None else 512
        synth = dict(cfg.data.synth) if cfg is not None else {}
        image_size = cfg.data.image_size if cfg is not None else 64
        synth.setdefault("image_size", image_size)
        return build_segmentation_dataset("synthshapes", size=size, **synth)
    if name not in roots:
        raise ValueError(f"dataset {name!r} needs a root folder (eval.roots / --root)")
    return build_segmentation_dataset(name, roots[name])


def evaluate_datasets(
    model: nn.Module,
    cfg: Any,
    *,
    out_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    verbose: bool = True,
    topk: int | None = DEFAULT_TOPK,
    mode: str | None = None,
    scales: Sequence[float] = (1.0,),
) -> dict[str, Any]:
    """Evaluate on every dataset of ``cfg.eval.datasets`` (``scales``: multi-scale factors); with
    ``out_dir``: write ``<name>_miou.md``,
    ``<name>_overlay.png``, the per-class IoU chart ``<name>_iou.png`` and ``results.json``
    there. Returns ``{name: {miou, iou, ...}}``."""
    results: dict[str, Any] = {}
    names = list(cfg.eval.datasets) if cfg is not None else ["synthshapes"]
    roots = dict(cfg.eval.roots) if cfg is not None else {}
    for name in names:
        t0 = time.perf_counter()
        ds = _dataset(name, cfg, roots)
        m = mode or ("whole" if name == "synthshapes" else "slide")
        keep = cfg.eval.overlays if (cfg is not None and out_dir is not None) else 0
        bs = cfg.eval.batch_size if cfg is not None else 64
        res = evaluate_segmentation(
            model, ds, batch_size=bs if m == "whole" else 1, topk=topk, mode=m, device=device, keep=keep,
            scales=scales,
        )
        kept = res.pop("kept")
        if name == "synthshapes":

            ch = chance_miou(ds)
            res["chance"] = {"most_frequent": ch["most_frequent"], "prior_random": ch["prior_random"]}
            res["x_chance"] = res["miou"] / max(ch["prior_random"], 1e-9)
        res["seconds"] = time.perf_counter() - t0
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}_miou.md").write_text(res["table"] + "\n")
            res["iou_plot"] = str(save_iou_chart(res, out / f"{name}_iou.png", title=f"{name}: per-class IoU"))
            if kept:
                res["overlay"] = str(save_overlays(kept, res["class_names"], out / f"{name}_overlay.png"))
        if verbose:
            restrict = f"top-{res['topk']} classes" if res["topk"] else "all classes"
            what = "segmentation with learned classes" if res.get("closed_vocabulary") else "zero-shot segmentation"
            print(f"\n{what}, {name} ({res['num_images']} images, {restrict}):")
            print(res["table"])
            if "chance" in res:
                print(
                    f"mIoU {100 * res['miou']:.1f}  vs chance {100 * res['chance']['prior_random']:.1f} "
                    f"(prior-random; most-frequent-class {100 * res['chance']['most_frequent']:.1f}): "
                    f"{res['x_chance']:.1f}x chance"
                )
            if res.get("overlay"):
                print(f"overlay: {res['overlay']}")
            if res.get("iou_plot"):
                print(f"IoU chart: {res['iou_plot']}")
        results[name] = res
    if out_dir is not None:
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
