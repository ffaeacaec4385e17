"""Do image-level noun-presence labels teach the shapes at this scale? (issue 9, session 7)

The text-supervised runs never recognise the shapes at image level (docs/investigation/LOG.md,
session 6: shape AUC ~0.64 whatever the objective). This probe removes the text tower: an image
encoder is trained with a per-class binary cross-entropy on the nouns its CAPTION names (the
information the captions carry, nothing more: omitted and occluded objects are negatives), on the
recipe's SynthShapesStream (seed 0), and scored by the per-class ROC AUC of "the class is in the
image" (from the masks) on the first 512 eval images, as ``noun_auc.py`` scores the zero-shot runs.

    python docs/investigation/presence_probe.py --encoder groupvit --steps 300 --threads 1
    python docs/investigation/presence_probe.py --encoder cnn --steps 300 --threads 1
    python docs/investigation/presence_probe.py --encoder trunk --steps 1000 --threads 1

``groupvit``: the tiny preset's GroupViT vision tower with ``stem=hybrid`` through its image head
(the image embedding the contrastive loss sees; ``--pool``: ``assigned`` as the preset, or the
``mean`` of the stage-1 patch tokens); ``cnn``: the yardsticks' U-Net encoder with a 1x1 class head,
global ``mean`` pooled before the head or ``max`` pooled after it (multiple-instance).
Research code, not part of the library; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from mixreorg.data.synthshapes import SynthShapes, SynthShapesEval, SynthShapesStream
from mixreorg.nn.stem import ConvTrunk
from mixreorg.recipes.builders import build_groupvit
from mixreorg.recipes.config import apply_overrides, get_preset

NAMES = list(SynthShapes.CLASS_NAMES)


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    pos, neg = score[label], score[~label]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean()
    return gt.item()


class CNNEncoder(nn.Module):
    def __init__(self, pool: str, widths=(32, 64, 128, 128)) -> None:
        super().__init__()
        self.pool = pool

        def cbr(i: int, o: int, s: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        layers, prev = [cbr(3, widths[0], 2)], widths[0]
        for i, w in enumerate(widths):
            layers += [cbr(prev, w, 1 if i == 0 else 2), cbr(w, w)]
            prev = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(prev, len(NAMES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "max":  # a class is present if some location shows it (multiple-instance)
            return self.head(self.body(x)).amax((2, 3))
        return self.head(self.body(x).mean((2, 3), keepdim=True)).flatten(1)


class TrunkEncoder(nn.Module):
    """The hybrid stem's ConvTrunk alone (widths 32/64/128, 2 convolutions per level, stride 8),
    mean pooled: what the GroupViT tower adds on top of it is then the difference between the rows."""

    def __init__(self, widths: list[int], zero_init: bool = True) -> None:
        super().__init__()
        self.body = ConvTrunk(3, 128, widths, [2] * len(widths), zero_init_residual=zero_init)
        self.head = nn.Linear(128, len(NAMES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


class GroupViTEncoder(nn.Module):
    def __init__(self, pool: str, overrides: list[str]) -> None:
        super().__init__()
        cfg = apply_overrides(get_preset("tiny"), ["model.vision.stem=hybrid", *overrides])
        self.model, self.pool = build_groupvit(cfg), pool
        self.head = nn.Linear(cfg.model.proj_dim, len(NAMES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.encode_image(x)
        if self.pool == "mean":
            emb = self.model.project_patches(out["stage1_tokens"]).mean(1)
        else:
            emb = out["image_embed"]
        return self.head(emb * 10.0)  # unit vectors: a fixed scale so that the logits can grow


def evaluate(model: nn.Module, size: int = 512) -> list[float]:
    ds = SynthShapesEval()
    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for s in range(0, size, 128):
            items = ds.__getitems__(list(range(s, min(s + 128, size))))
            x = torch.stack([torch.as_tensor(it["image"]) for it in items])
            m = torch.stack([torch.as_tensor(it["mask"]) for it in items]).long()
            labels.append(torch.stack([(m == c).flatten(1).any(1) for c in range(len(NAMES))], 1))
            scores.append(model(x).float())
    model.train()
    s, lab = torch.cat(scores), torch.cat(labels)
    return [auc(s[:, c], lab[:, c]) for c in range(len(NAMES))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--encoder", choices=["groupvit", "cnn", "trunk"], required=True)
    p.add_argument("--pool", choices=["assigned", "mean", "max"], default=None,
                   help="groupvit: assigned (default) | mean; cnn: mean (default) | max")
    p.add_argument("--trunk-widths", type=int, nargs="+", default=[32, 64, 128],
                   help="trunk: channels per stride-2 level (the hybrid stem's: 32 64 128)")
    p.add_argument("--cnn-widths", type=int, nargs="+", default=[32, 64, 128, 128],
                   help="cnn: channels per level after the stride-2 stem (the yardstick's: 32 64 128 128, stride 16)")
    p.add_argument("--trunk-full-init", action="store_true",
                   help="trunk: residual blocks' last BatchNorm at 1 instead of 0 (identity) at init")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="tiny-preset override for the GroupViT")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    a.pool = a.pool or ("mean" if a.encoder == "cnn" else "assigned")
    if a.encoder == "cnn":
        model = CNNEncoder(a.pool, a.cnn_widths)
    elif a.encoder == "trunk":
        model = TrunkEncoder(a.trunk_widths, zero_init=not a.trunk_full_init)
    else:
        model = GroupViTEncoder(a.pool, a.set)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / a.steps, 1.0))))
    it = iter(SynthShapesStream(64, seed=0))
    t0, curve = time.perf_counter(), {}
    for step in range(1, a.steps + 1):
        batch = next(it)
        target = torch.tensor([[float(n in nouns) for n in NAMES] for nouns in batch["nouns"]])
        loss = F.binary_cross_entropy_with_logits(model(batch["image"]), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 and step < a.steps:
            curve[step] = round(sum(evaluate(model)[4:]) / 6, 3)
            print(f"step {step} loss {loss.item():.4f} auc_things {curve[step]}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    aucs = evaluate(model)
    print(json.dumps({"encoder": a.encoder, "pool": a.pool, "steps": a.steps, "train_s": round(wall, 1),
                      "auc_things": round(sum(aucs[4:]) / 6, 3), "auc_stuff": round(sum(aucs[:4]) / 4, 3),
                      "curve_things": curve, "auc": dict(zip(NAMES, [round(v, 3) for v in aucs]))}))


if __name__ == "__main__":
    main()
