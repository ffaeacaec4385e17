"""Pre-render SynthShapes pools (train + eval) for the investigation runs, cached as .pt files."""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from mixreorg.data.synthshapes import SynthShapes, SynthShapesConfig  # noqa: E402
from mixreorg.text import tokenize  # noqa: E402

CTX = 32
HERE = os.environ.get("PROBE_DIR", "/tmp/mixreorg_probe")


def build(name: str, n_train: int, **cfg) -> str:
    path = f"{HERE}/pool_{name}.pt"
    if os.path.exists(path):
        return path
    gen = SynthShapes(SynthShapesConfig(**cfg))
    out = {}
    for split, n, seed in (("train", n_train, 0), ("eval", 512, 0)):
        imgs, masks, caps, nouns, labels = [], [], [], [], []
        for s in range(0, n, 1000):
            b = gen.generate_batch(np.arange(s, min(n, s + 1000)), split, seed)
            imgs.append(torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous())
            masks.append(torch.from_numpy(b["mask"]))
            labels.append(torch.from_numpy(b["labels"]))
            caps += b["caption"]
            nouns += b["nouns"]
        ids = tokenize(caps, context_length=77)
        assert (ids[:, CTX:] == 0).all(), "caption longer than CTX"
        out[split] = dict(
            image=torch.cat(imgs), mask=torch.cat(masks), labels=torch.cat(labels),
            caption=caps, nouns=nouns, ids=ids[:, :CTX].int(),
        )
    torch.save(out, path)
    return path


if __name__ == "__main__":
    os.makedirs(HERE, exist_ok=True)
    t = time.time()
    build("default", 60000)
    build("nocol", 60000, caption_colours=False)
    build("bgall", 60000, name_background_prob=1.0)
    print("done", time.time() - t)
