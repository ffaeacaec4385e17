"""Yardsticks for the SynthShapes backbone investigation (issue 9): a small U-Net CNN and a plain ViT
trained with per-pixel cross-entropy on the recipe's own SynthShapesStream (seed 0) and scored on the
fixed 512-image eval split with the library's metric -- the same harness as the recipe's
``--model supervised`` bound, so their rows are comparable with it.

    python docs/investigation/yardsticks.py --model cnn --steps 700 --threads 2
    python docs/investigation/yardsticks.py --model vit --steps 700 --threads 2

Research code (not part of the library or the test suite); prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from mixreorg.data.synthshapes import SynthShapes, SynthShapesEval, SynthShapesStream
from mixreorg.metrics import confusion_matrix, iou_from_confusion


def cbr(i: int, o: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Stride-2 stem, 4-level encoder-decoder (32, 64, 128, 128), logits at 1/2 resolution."""

    def __init__(self, k: int = 10, widths=(32, 64, 128, 128)) -> None:
        super().__init__()
        self.stem = cbr(3, widths[0], 2)
        self.down = nn.ModuleList()
        prev = widths[0]
        for i, w in enumerate(widths):
            self.down.append(nn.Sequential(cbr(prev, w, 1 if i == 0 else 2), cbr(w, w)))
            prev = w
        self.up = nn.ModuleList(
            nn.Sequential(cbr(widths[i + 1] + widths[i], widths[i]), cbr(widths[i], widths[i]))
            for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for d in self.down:
            x = d(x)
            skips.append(x)
        for u, s in zip(self.up, reversed(skips[:-1])):
            x = u(torch.cat([F.interpolate(x, size=s.shape[-2:], mode="nearest"), s], 1))
        return self.head(x)


class PlainViT(nn.Module):
    """Patch 8, width 128, 6 pre-LN layers, learned position embedding, a 4x4 sub-grid head per patch."""

    def __init__(self, k: int = 10, size: int = 64, patch: int = 8, width: int = 128, depth: int = 6) -> None:
        super().__init__()
        self.patch, self.k, self.g = patch, k, size // patch
        self.embed = nn.Conv2d(3, width, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, self.g * self.g, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, k * 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # [B, L, C]
        t = self.head(self.norm(self.blocks(t)))  # [B, L, K*16]
        t = t.view(B, self.g, self.g, self.k, 4, 4).permute(0, 3, 1, 4, 2, 5)
        return t.reshape(B, self.k, self.g * 4, self.g * 4)  # logits at 1/2 resolution


def evaluate(model: nn.Module, size: int = 512) -> dict:
    ds = SynthShapesEval()
    model.eval()
    cm = torch.zeros(10, 10, dtype=torch.long)
    with torch.no_grad():
        for s in range(0, size, 128):
            items = ds.__getitems__(list(range(s, min(s + 128, size))))
            x = torch.stack([torch.as_tensor(it["image"]) for it in items])
            m = torch.stack([torch.as_tensor(it["mask"]) for it in items]).long()
            logits = F.interpolate(model(x), size=m.shape[-2:], mode="bilinear", align_corners=False)
            cm += confusion_matrix(logits.argmax(1), m, 10)
    model.train()
    iou = iou_from_confusion(cm)
    return {"mIoU": float(iou.mean()), "stuff": float(iou[:4].mean()), "things": float(iou[4:].mean()),
            "per_class": dict(zip(SynthShapes.CLASS_NAMES, [round(float(v), 3) for v in iou]))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["cnn", "vit"], required=True)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = UNet() if a.model == "cnn" else PlainViT()
    lr, warm = (2e-3, 0) if a.model == "cnn" else (1e-3, 100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warm, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / a.steps, 1.0))))
    it = iter(SynthShapesStream(64, seed=0))
    t0 = time.perf_counter()
    for step in range(a.steps):
        batch = next(it)
        logits = model(batch["image"])
        target = batch["mask"].long()
        loss = F.cross_entropy(F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False),
                               target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    wall = time.perf_counter() - t0
    print(json.dumps({"model": a.model, "steps": a.steps, "train_s": round(wall, 1), **evaluate(model)}))


if __name__ == "__main__":
    main()
