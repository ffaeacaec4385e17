"""Train-step throughput of the tiny recipe's backbone options, side by side (issue 9's performance
check): today's patch stem, the hybrid convolutional trunk, and the trunk with the first grouping on the
16x16 grid, for GroupViT and MixReorg, timed ALTERNATELY (slow drifts of machine load hit all alike).

    python -m pytest benchmarks/bench_backbone.py -s

Prints images/s (best of the rounds) and each option's throughput relative to the patch stem.
"""

from __future__ import annotations

import time

import torch
from _steps import train_step

from mixreorg.losses import ContrastiveObjective, MixReorgLoss
from mixreorg.nn import GroupViT, MixReorg
from mixreorg.recipes.config import get_preset

B = 64
OPTIONS = {
    "patch stem (today)": {},
    "hybrid trunk": {"stem": "hybrid"},
    "hybrid + 16x16 grouping": {"stem": "hybrid", "group_patch_size": 4},
    "cheap hybrid, 2+2 blocks": {"stem": "hybrid", "stem_depths": [1, 2, 2], "depths": [2, 2]},
    "tiny_hybrid preset": {"stem": "hybrid", "stem_depths": [1, 2, 2], "group_patch_size": 4},
}


def _vision(extra: dict) -> dict:
    cfg = get_preset("tiny")
    return {**cfg.model.vision, "img_size": cfg.data.image_size, **extra}


def _build(kind: str, extra: dict):
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    gv = GroupViT(_vision(extra), dict(cfg.model.text), proj_dim=cfg.model.proj_dim,
                  proj_hidden=cfg.model.proj_hidden, proj_layers=cfg.model.proj_layers)
    return gv if kind == "groupvit" else MixReorg(gv, dict(group_size=8))


def test_backbone_step_throughput_interleaved(capsys):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, 64, 64, generator=g)
    ids = torch.randint(1, 1000, (B, 32), generator=g)
    objective = ContrastiveObjective(multi_label_weight=0.0)  # the batches carry no noun prompts
    mix_loss = MixReorgLoss(objective)
    nets = {(k, o): _build(k, extra) for k in ("groupvit", "mixreorg") for o, extra in OPTIONS.items()}
    opts = {key: torch.optim.AdamW(net.parameters(), lr=1e-4) for key, net in nets.items()}

    best = dict.fromkeys(nets, float("inf"))
    keys = list(nets)
    for r in range(6):
        for key in keys if r % 2 == 0 else keys[::-1]:
            t = time.perf_counter()
            train_step(nets[key], images, ids, opts[key], objective, mix_loss)
            if r > 0:  # round 0 warms up
                best[key] = min(best[key], time.perf_counter() - t)
    with capsys.disabled():
        print(f"\ntiny recipe train step, B={B}, 64 px, {torch.get_num_threads()} threads, "
              "best of 5 interleaved rounds:")
        for kind in ("groupvit", "mixreorg"):
            base = best[(kind, "patch stem (today)")]
            for opt in OPTIONS:
                t = best[(kind, opt)]
                print(f"  {kind:<9} {opt:<26} {t * 1e3:7.0f} ms  {B / t:6.1f} img/s  x{base / t:.2f} of the patch stem")
    assert all(v < float("inf") for v in best.values())
