"""Zero-shot semantic segmentation of a pretrained model: mIoU tables and overlay pictures.

    python -m mixreorg.recipes.evaluate runs/tiny                      # SynthShapes eval split
    python -m mixreorg.recipes.evaluate runs/tiny/checkpoints/ckpt-000001000.pt --overlays 16
    python -m mixreorg.recipes.evaluate runs/x --dataset voc --root /data/VOCdevkit --mode slide
    python -m mixreorg.recipes.evaluate nvidia/groupvit-gcc-yfcc --out eval/gcc-yfcc   # a Hugging Face model id

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
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "mixreorg.recipes"  # noqa: A001

from mixreorg.data.segmentation import ImageFolderClassification  # noqa: E402
from mixreorg.recipes.config import PretrainConfig  # noqa: E402
from mixreorg.recipes.evaluation import DEFAULT_TOPK, evaluate_classification, evaluate_datasets  # noqa: E402
from mixreorg.recipes.loading import load_inference_model  # noqa: E402

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixreorg.recipes.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument(
        "run",
        help="a run folder (newest checkpoint), a checkpoint file, an export, Hugging Face / NVlabs GroupViT weights, "
        "or a Hugging Face model id (owner/name[@revision], e.g. nvidia/groupvit-gcc-yfcc: downloaded or read from "
        "the local cache; HF_HUB_OFFLINE=1: the cache only; a path that exists wins over an id)",
    )
    ap.add_argument("--dataset", action="append", help="synthshapes | voc | context | coco_object | ade20k")
    ap.add_argument("--root", action="append", default=[], metavar="NAME=PATH", help="dataset root, e.g. voc=/data/VOC")
    ap.add_argument("--size", type=int, help="SynthShapes eval images (default: the run's eval.size)")
    ap.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="image-level top-k classes (0: all)")
    ap.add_argument("--mode", choices=["whole", "slide"], help="inference mode (default whole for SynthShapes)")
    ap.add_argument("--overlays", type=int, help="images drawn in the overlay PNG")
    ap.add_argument("--out", help="output folder (default <run>/eval; for a model id owner/name: ./owner/eval)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale factors, e.g. 0.75 1 1.25")
    ap.add_argument("--classify", metavar="ROOT", help="also zero-shot classification of an ImageFolder root/<class>/")
    ap.add_argument("--image-size", type=int, help="classification input size (default: the model's)")
    args = ap.parse_args(argv)
    try:
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
