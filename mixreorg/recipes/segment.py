"""Segment your own images with any class names: a PNG overlay with a legend per image.

    python -m mixreorg.recipes.segment photo.jpg more/ --model runs/tiny --classes "circle, star, grass, sky"
    python -m mixreorg.recipes.segment cat.jpg --model groupvit/model.safetensors --classes "cat, sofa" \\
        --bg-thresh 0.9 --short-side 448
    python -m mixreorg.recipes.segment photos/ --model nvidia/groupvit-gcc-yfcc --classes "dog, sky"

``--model`` takes a run folder or checkpoint of :mod:`mixreorg.recipes.pretrain` (the inference model of
any trainer: GroupViT, GroupViT+, MixReorg), an export of :mod:`mixreorg.recipes.export`, imported
GroupViT weights: a Hugging Face ``model.safetensors`` / ``pytorch_model.bin`` (its ``config.json``
beside it is used when present) or an NVlabs state dict (:mod:`mixreorg.nn.weights`), or a Hugging
Face model id such as ``nvidia/groupvit-gcc-yfcc`` (downloaded, or read from the local cache; with
``HF_HUB_OFFLINE=1`` the cache only; a path that exists wins over an id). Images are files or
folders (jpg, jpeg, png, bmp, webp); a file that cannot be read is reported at the end (exit
status 1) after every readable image has been segmented. Each image is resized so its short side
is ``--short-side`` (default: the model's training size), segmented with GroupViT's zero-shot
inference (:func:`mixreorg.zeroshot.segment`; ``--bg-thresh`` adds a "background" class for pixels
no name claims), and written as ``OUT/<name>_seg.png`` (image | overlay with a legend of the
classes found, largest first) and ``OUT/<name>_labels.png`` (the label map: value i = the i-th
class name; 0 = background with ``--bg-thresh``). The class shares of every image are printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "mixreorg.recipes"  # noqa: A001

from mixreorg.recipes.evaluation import vocabulary_embeddings  # noqa: E402
from mixreorg.recipes.loading import load_inference_model  # noqa: E402
from mixreorg.zeroshot import check_class_names, segment  # noqa: E402

__all__ = ["IMAGE_SUFFIXES", "load_inference_model", "find_images", "parse_classes", "segment_files", "main"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_classes(text: str) -> list[str]:
    """``"cat, dog , sofa"`` -> ``["cat", "dog", "sofa"]`` (ValueError on empty or duplicated names)."""
    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise ValueError("--classes is empty: give comma-separated class names, e.g. --classes 'cat, dog'")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"--classes {text!r} has an empty name at position(s) {empty} (doubled or trailing comma?)")
    return check_class_names(names)


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (sorted, not recursively) in folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise ValueError(f"image path not found: {p}")
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {[str(p) for p in paths]}")
    return found


def _load_image(path: Path, short_side: int, multiple: int) -> tuple[np.ndarray, torch.Tensor]:
    from PIL import Image

    from mixreorg.data.transforms import normalize, to_tensor

    try:
        img = Image.open(path).convert("RGB")
    except Exception as err:  # PIL raises several types for unreadable files
        raise ValueError(f"cannot read image {path}: {err}") from err
    r = short_side / min(img.size)
    w, h = max(multiple, round(img.width * r)), max(multiple, round(img.height * r))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img), normalize(to_tensor(img))


def _save_outputs(
    rgb: np.ndarray, labels: torch.Tensor, shown: Sequence[str], out: Path, stem: str
) -> tuple[Path, Path, dict[str, float]]:
    """Write ``<stem>_seg.png`` (image | overlay + legend) and ``<stem>_labels.png`` for ``rgb
    [H, W, 3]`` and ``labels [H, W]``; returns both paths and the class shares, largest first."""
    from PIL import Image

    from mixreorg.viz import overlay

    zoom = max(1, 256 // min(rgb.shape[:2]))  # small images are drawn enlarged (nearest) to stay legible
    over = overlay(rgb, labels, list(shown), alpha=0.55, scale=zoom)
    shown_rgb = Image.fromarray(rgb).resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (shown_rgb.width + over.width, over.height), (255, 255, 255))
    canvas.paste(shown_rgb, (0, 0))
    canvas.paste(over, (shown_rgb.width, 0))
    seg_png, lab_png = out / f"{stem}_seg.png", out / f"{stem}_labels.png"
    canvas.save(seg_png)
    Image.fromarray(labels.numpy().astype(np.uint8)).save(lab_png)
    counts = torch.bincount(labels.flatten(), minlength=len(shown)).double()  # [K']
    shares = {shown[i]: float(c / counts.sum()) for i, c in enumerate(counts.tolist()) if c > 0}
    return seg_png, lab_png, dict(sorted(shares.items(), key=lambda kv: -kv[1]))


@torch.no_grad()
def segment_files(
    model: nn.Module,
    images: Sequence[Path],
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    short_side: int,
    bg_thresh: float | None = None,
    topk: int | None = None,
    mode: str = "whole",
    device: torch.device | str = "cpu",
    failed: list[tuple[Path, str]] | None = None,
) -> list[dict[str, Any]]:
    """Segment each image file; write ``<stem>_seg.png`` and ``<stem>_labels.png`` in ``out_dir``.

    Returns one dict per segmented image: ``image``, ``overlay``, ``labels`` (paths) and ``shares``
    (class name -> fraction of pixels, largest first). An unreadable image raises ``ValueError``;
    with a ``failed`` list it is appended there as ``(path, reason)`` and the others go on."""
    names = check_class_names(list(class_names))
    model = model.to(device)
    text = vocabulary_embeddings(model, names)  # [K, D]
    shown = (["background"] + names) if bg_thresh is not None else names
    if len(shown) > 255:
        raise ValueError(f"at most 255 classes fit the label PNG, got {len(shown)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patch = int(getattr(getattr(model.vision, "patch_embed", None), "patch_size", (1,))[0])
    results = []
    used: set[str] = set()
    for path in images:
        try:
            rgb, x = _load_image(path, short_side, patch)  # [H, W, 3] uint8, [3, H, W] normalised
        except ValueError as err:
            if failed is None:
                raise
            failed.append((path, str(err.__cause__ or err)))
            continue
        labels = segment(
            model, x[None].to(device), text, bg_thresh=bg_thresh, topk=topk, mode=mode, return_labels=True,
            crop_size=short_side, stride=max(1, short_side // 2),
        )[0].cpu()  # [H, W]
        stem = path.stem
        while stem in used:  # two folders may hold the same file name
            stem += "_"
        used.add(stem)
        seg_png, lab_png, shares = _save_outputs(rgb, labels, shown, out, stem)
        results.append({"image": str(path), "overlay": str(seg_png), "labels": str(lab_png), "shares": shares})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixreorg.recipes.segment", description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", help="image files or folders (unreadable files are listed at the end)")
    ap.add_argument(
        "--model", required=True,
        help="run folder, checkpoint, export, HF / NVlabs GroupViT weights, or a Hugging Face model id "
        "(owner/name[@revision], e.g. nvidia/groupvit-gcc-yfcc; HF_HUB_OFFLINE=1: local cache only)",
    )  # fmt: skip
    ap.add_argument("--classes", required=True, help="comma-separated class names, e.g. 'cat, dog, sofa'")
    ap.add_argument("--out", default="segmented", help="output folder (default ./segmented)")
    ap.add_argument("--short-side", type=int, help="resize short side to this (default: the model's training size)")
    ap.add_argument("--bg-thresh", type=float, help="add a background class below this affinity (GroupViT: 0.9)")
    ap.add_argument("--topk", type=int, default=0, help="image-level top-k class restriction (0: none)")
    ap.add_argument("--mode", choices=["whole", "slide"], default="whole")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        names = parse_classes(args.classes)
        files = find_images(args.images)
        model, size = load_inference_model(args.model)
        short = args.short_side or size or 448
        if short < 1:
            raise ValueError(f"--short-side must be >= 1, got {short}")
        if args.bg_thresh is not None and not 0.0 <= args.bg_thresh <= 1.0:
            raise ValueError(f"--bg-thresh must be in [0, 1], got {args.bg_thresh}")
        failed: list[tuple[Path, str]] = []
        results = segment_files(
            model, files, names, args.out, short_side=short, bg_thresh=args.bg_thresh,
            topk=args.topk or None, mode=args.mode, device=args.device, failed=failed,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in results:
        found = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["shares"].items())
        print(f"{r['image']}: {found} -> {r['overlay']}")
    if failed:
        print(f"error: could not read {len(failed)} of {len(files)} image(s):", file=sys.stderr)
        for path, reason in failed:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
