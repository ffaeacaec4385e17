"""Zero-shot semantic segmentation of a pretrained model: mIoU tables and overlay pictures.

    python -m mixreorg.recipes.evaluate runs/tiny                      # SynthShapes eval split
    python -m mixreorg.recipes.evaluate runs/tiny/checkpoints/ckpt-000001000.pt --overlays 16
    python -m mixreorg.recipes.evaluate runs/x --dataset voc --root /data/VOCdevkit --mode slide

The model is the inference model of a trainer model (``model.inference_model()``, a GroupViT-interface
module; the lead's MixReorg returns its original branch). Segmentation is GroupViT's
(:func:`mixreorg.zeroshot.segment`): composed soft assignments, argmax group per pixel, group-class
affinity, image-level top-k classes, and for datasets with a background class GroupViT's threshold.
SynthShapes names every class with a prompt (no background threshold) and is scored over its 10
classes; its chance level (:func:`mixreorg.data.synthshapes.chance_miou`) is printed alongside.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "mixreorg.recipes"  # noqa: A001

from mixreorg.metrics import ConfusionMatrix, format_iou_table  # noqa: E402
from mixreorg.text.prompts import IMAGENET_TEMPLATES, SEGMENTATION_TEMPLATES  # noqa: E402
from mixreorg.zeroshot import class_embeddings, segment  # noqa: E402

__all__ = [
    "inference_model",
    "evaluate_segmentation",
    "evaluate_classification",
    "evaluate_datasets",
    "load_inference_model",
    "vocabulary_embeddings",
    "save_overlays",
    "main",
]

#: GroupViT's image-level class restriction (top-5); used everywhere unless overridden.
DEFAULT_TOPK = 5


def inference_model(model: nn.Module) -> nn.Module:
    """The GroupViT-interface module of a trainer model (or the model itself)."""
    get = getattr(model, "inference_model", None)
    return get() if callable(get) else model


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
    k = len(names)
    scales = [float(f) for f in scales]
    if not scales or any(f <= 0 for f in scales):
        raise ValueError(f"scales must be positive factors, got {scales}")
    cm = ConfusionMatrix(len(dataset.CLASS_NAMES), ignore_index=getattr(dataset, "IGNORE_INDEX", 255))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    start = 0
    while start < n:
        chunk = list(range(start, min(n, start + batch_size)))
        getitems = getattr(dataset, "__getitems__", None)
        items = getitems(chunk) if getitems is not None else [dataset[i] for i in chunk]
        start += len(chunk)
        groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for it in items:
            groups.setdefault(tuple(it["image"].shape[-2:]), []).append(it)
        for group in groups.values():
            images = torch.stack([it["image"] for it in group]).to(device)
            restrict = topk if (topk or 0) < k else None
            per_scale = []
            for f in scales:
                x = images
                if f != 1.0:
                    size = (max(1, round(images.shape[-2] * f)), max(1, round(images.shape[-1] * f)))
                    x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
                lg = segment(net, x, text, bg_thresh=bg_thresh, topk=restrict, mode=mode)
                if tuple(lg.shape[-2:]) != tuple(images.shape[-2:]):
                    lg = F.interpolate(lg, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
                per_scale.append(lg)
            logits = per_scale[0] if len(per_scale) == 1 else torch.stack(per_scale).mean(0)
            for it, lg in zip(group, logits):
                mask = it["mask"].long()
                if tuple(lg.shape[-2:]) != tuple(mask.shape):
                    lg = F.interpolate(lg[None], size=tuple(mask.shape), mode="bilinear", align_corners=False)[0]
                pred = lg.argmax(0).cpu()
                cm.update(pred, mask)
                if len(kept) < keep:
                    kept.append((it["image"].cpu(), mask, pred))
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
    from mixreorg.metrics import topk_accuracy
    from mixreorg.zeroshot import classify

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

    from mixreorg.viz import image_grid, overlay, to_uint8_image

    if not kept:
        raise ValueError("no images to draw")
    tiles, labels = [], []
    for image, mask, pred in kept:
        img = to_uint8_image(image)
        if scale > 1:
            img = __import__("numpy").asarray(
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


def _dataset(name: str, cfg: Any, roots: dict[str, str]) -> Any:
    from mixreorg.data.segmentation import build_segmentation_dataset

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
    ``<name>_overlay.png`` and ``results.json`` there. Returns ``{name: {miou, iou, ...}}``."""
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
            from mixreorg.data.synthshapes import chance_miou

            ch = chance_miou(ds)
            res["chance"] = {"most_frequent": ch["most_frequent"], "prior_random": ch["prior_random"]}
            res["x_chance"] = res["miou"] / max(ch["prior_random"], 1e-9)
        res["seconds"] = time.perf_counter() - t0
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}_miou.md").write_text(res["table"] + "\n")
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
        results[name] = res
    if out_dir is not None:
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _load(path: str | Path, state: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    from mixreorg.checkpoint import CheckpointManager, load_checkpoint, load_model_state
    from mixreorg.recipes.config import config_from_dict
    from mixreorg.recipes.models import build_model

    p = Path(path)
    if p.is_dir():
        ckpt = CheckpointManager(p / "checkpoints").latest() if (p / "checkpoints").is_dir() else None
        if ckpt is None:
            ckpt = CheckpointManager(p).latest()
        if ckpt is None:
            raise ValueError(f"no checkpoint found under {p}")
        p = ckpt
    if state is None:
        state = load_checkpoint(p)
    if not state.get("config"):
        raise ValueError(f"checkpoint {p} carries no config; cannot rebuild the model")
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    load_model_state(model, state["model"])
    return model.eval(), cfg


def _weights_format(keys: Sequence[str]) -> str:
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith(("img_encoder.", "module.img_encoder.")) for k in keys):
        return "nvlabs"
    return "unknown"


def load_inference_model(path: str | Path, with_config: bool = False) -> tuple:
    """A GroupViT-interface model from a run folder / our checkpoint / HF or NVlabs weights, and the
    image size it was trained at (None when unknown); ``with_config`` adds the run's
    :class:`PretrainConfig` (None for imported weights)."""
    from mixreorg.nn.weights import load_hf_groupvit, load_nvlabs_groupvit

    p = Path(path)
    if not p.exists():
        raise ValueError(f"--model {p}: no such file or folder")
    if p.is_dir() and ((p / "checkpoints").is_dir() or any(p.glob("ckpt-*.pt"))):
        model, cfg = _load(p)
        res = (inference_model(model).eval(), cfg.data.image_size)
        return (*res, cfg) if with_config else res
    if p.is_dir():  # a Hugging Face model folder
        files = [p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()]
        if not files:
            raise ValueError(f"--model {p}: no checkpoints/, model.safetensors or pytorch_model.bin inside")
        p = files[0]
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise several types for unreadable files
        raise ValueError(f"--model {p}: cannot read it as weights ({type(err).__name__}: {err})") from err
    if isinstance(sd, dict) and sd.get("config") and "model" in sd:  # one of our checkpoints
        model, cfg = _load(p, state=sd)
        res = (inference_model(model).eval(), cfg.data.image_size)
        return (*res, cfg) if with_config else res
    keys = list(sd.get("model", sd).keys()) if isinstance(sd, dict) else []
    fmt = _weights_format(keys)
    if fmt == "hf":
        cfg_file = p.parent / "config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
        model = load_hf_groupvit(sd, config=config)
    elif fmt == "nvlabs":
        model = load_nvlabs_groupvit(sd)
    else:
        raise ValueError(
            f"--model {p}: not a mixreorg checkpoint and neither Hugging Face (vision_model.*) nor NVlabs "
            f"(img_encoder.*) GroupViT weights; first keys: {keys[:5]}"
        )
    size = model.vision.patch_embed.img_size[0]
    return (model.eval(), size, None) if with_config else (model.eval(), size)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixreorg.recipes.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument(
        "run", help="a run folder (newest checkpoint), a checkpoint file, or Hugging Face / NVlabs GroupViT weights"
    )
    ap.add_argument("--dataset", action="append", help="synthshapes | voc | context | coco_object | ade20k")
    ap.add_argument("--root", action="append", default=[], metavar="NAME=PATH", help="dataset root, e.g. voc=/data/VOC")
    ap.add_argument("--size", type=int, help="SynthShapes eval images (default: the run's eval.size)")
    ap.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="image-level top-k classes (0: all)")
    ap.add_argument("--mode", choices=["whole", "slide"], help="inference mode (default whole for SynthShapes)")
    ap.add_argument("--overlays", type=int, help="images drawn in the overlay PNG")
    ap.add_argument("--out", help="output folder (default <run>/eval)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale factors, e.g. 0.75 1 1.25")
    ap.add_argument("--classify", metavar="ROOT", help="also zero-shot classification of an ImageFolder root/<class>/")
    ap.add_argument("--image-size", type=int, help="classification input size (default: the model's)")
    args = ap.parse_args(argv)
    try:
        from mixreorg.recipes.config import PretrainConfig

        model, size, cfg = load_inference_model(args.run, with_config=True)
        if cfg is None:  # imported weights: the default eval settings, SynthShapes at the model's size
            cfg = PretrainConfig()
            cfg.data.image_size = size or cfg.data.image_size
        if args.dataset:
            cfg.eval.datasets = args.dataset
        for r in args.root:
            if "=" not in r:
                raise ValueError(f"--root {r!r}: expected NAME=PATH")
            k, v = r.split("=", 1)
            cfg.eval.roots[k] = v
        if args.size:
            cfg.eval.size = args.size
        if args.overlays is not None:
            cfg.eval.overlays = args.overlays
        run = Path(args.run)
        if args.out:
            out = Path(args.out)
        elif run.is_dir():
            out = run / "eval"
        else:  # runs/x/checkpoints/ckpt.pt -> runs/x/eval; imported weights -> beside the file
            out = (run.parent.parent if run.parent.name == "checkpoints" else run.parent) / "eval"
        evaluate_datasets(model, cfg, out_dir=out, topk=args.topk or None, mode=args.mode, scales=args.scales)
        if args.classify:
            from mixreorg.data.segmentation import ImageFolderClassification

            ds = ImageFolderClassification(args.classify, image_size=args.image_size or size or 224)
            res = evaluate_classification(model, ds, batch_size=cfg.eval.batch_size)
            print(
                f"\nzero-shot classification, {args.classify} ({res['num_images']} images, "
                f"{len(res['class_names'])} classes): top-1 {100 * res['top1']:.1f}%, top-5 {100 * res['top5']:.1f}%"
            )
            out.mkdir(parents=True, exist_ok=True)
            (out / "classification.json").write_text(json.dumps(res, indent=2) + "\n")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
