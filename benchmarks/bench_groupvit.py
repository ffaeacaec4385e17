"""GroupViT (default config: 224 px, width 384, depths 6/3/3, text 256 x 12) training step.

    python -m pytest benchmarks/bench_groupvit.py --benchmark-enable

Cases:
- ``train_step``: forward (Gumbel assignment, drop-path), CLIP InfoNCE, backward, AdamW step at
  batch 32 (the issue's CPU number); ``train_step_checkpoint``: the same with activation
  checkpointing (trades compute for memory; expect it slower).
- ``encode_image_eval``: inference of the image tower at batch 32.
On CUDA the same cases run on the GPU (bf16 autocast for the step).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixreorg.nn import GroupViT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 32


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _inputs(batch: int):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=g)
    ids = torch.randint(1, 49407, (batch, 77), generator=g)
    ids[:, 20] = 49407  # EOT
    ids[:, 21:] = 0
    return images.to(DEVICE), ids.to(DEVICE)


def _clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale.exp().clamp(max=100) * img.float() @ txt.float().t()
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["train_step", "train_step_checkpoint"])
def test_groupvit_train_step(benchmark, checkpointing):
    torch.manual_seed(0)
    model = GroupViT().to(DEVICE).train()
    model.use_checkpoint = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    images, ids = _inputs(BATCH)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            out = model(images, ids)
            loss = _clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        return loss

    loss = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info.update(batch=BATCH, img_per_s=BATCH / stats.stats.mean, device=DEVICE)


def test_groupvit_encode_image_eval(benchmark):
    torch.manual_seed(0)
    model = GroupViT().to(DEVICE).eval()
    images, _ = _inputs(BATCH)

    @torch.no_grad()
    def run():
        out = model.encode_image(images, return_maps=True)
        _sync()
        return out

    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert out["image_embed"].shape == (BATCH, 256)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info.update(batch=BATCH, img_per_s=BATCH / stats.stats.mean, device=DEVICE)
