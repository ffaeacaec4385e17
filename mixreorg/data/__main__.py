"""``python -m mixreorg.data``: SynthShapes chance level (``--chance``), speed (``--bench``), example sheet."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..viz import image_grid, overlay
from .synthshapes import SynthShapes, SynthShapesConfig, SynthShapesEval, chance_miou


def _bench(n: int, image_size: int, batch: int = 64) -> tuple[float, float]:
    """Images per second of ``generate_batch`` (CPU time of this process, and wall time)."""
    gen = SynthShapes(image_size=image_size)
    gen.generate_batch(np.arange(batch))
    steps = max(1, n // batch)
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(steps):
        gen.generate_batch(np.arange(i * batch, (i + 1) * batch))
    done = steps * batch
    return done / (time.process_time() - c0), done / (time.perf_counter() - w0)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mixreorg.data", description="SynthShapes: chance level, speed, example sheet"
    )
    parser.add_argument("--chance", action="store_true", help="print chance-level mIoU of the eval split")
    parser.add_argument("--bench", action="store_true", help="measure generation speed (one core)")
    parser.add_argument("--examples", metavar="PNG", help="save a sheet of eval images with captions")
    parser.add_argument("--n", type=int, default=4000, help="images for --bench")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.chance:
        res = chance_miou(config=SynthShapesConfig(image_size=args.image_size))
        print(f"chance mIoU on {res['num_images']} eval images ({len(res['class_names'])} classes):")
        print(f"  most frequent class: {res['most_frequent']:.4f}")
        print(f"  prior-random       : {res['prior_random']:.4f}")
        print("  class pixel frequency: " + ", ".join(f"{k} {v:.3f}" for k, v in res["class_freq"].items()))
    if args.bench:
        torch.set_num_threads(1)
        cpu, wall = _bench(args.n, args.image_size)
        print(
            f"SynthShapes generate_batch(64): {cpu:.0f} images/s per CPU-second, {wall:.0f} images/s wall "
            f"at {args.image_size}x{args.image_size} (one thread)"
        )
    if args.examples:
        ds = SynthShapesEval(16, config=SynthShapesConfig(image_size=args.image_size))
        tiles = []
        for i in range(len(ds)):
            raw = ds.raw(i)
            tiles.append(overlay(raw["image"], raw["mask"], ds.CLASS_NAMES, alpha=0.0, legend=False, scale=3))
            tiles.append(overlay(raw["image"], raw["mask"], ds.CLASS_NAMES, alpha=0.6, legend=False, scale=3))
        captions = [t for i in range(len(ds)) for t in (ds.raw(i)["caption"], "")]
        image_grid(tiles, ncols=8, labels=captions, label_width=26).save(args.examples)
        print(f"wrote {args.examples}")
    if not (args.chance or args.bench or args.examples):
        parser.print_help()


if __name__ == "__main__":
    _main()
