"""Distributed contrastive losses == single-process losses, on 2 real gloo processes (CPU).

One fixed global batch of 8 is encoded by a small shared Linear; rank r holds rows [4r, 4r+4).
Each rank computes its loss and backpropagates. Claims checked against one process on all 8 rows:
  * mean over ranks of the rank losses == the single-process loss;
  * mean over ranks of the Linear / logit-scale gradients (what DDP computes) == single-process grads;
  * each rank's gradient w.r.t. its input rows == world_size * the single-process gradient rows
    (all-gather backward sums over ranks; see mixreorg.distributed).
for both losses, with and without multi-positive ids (ids shared across the rank boundary),
plus a clear ValueError when local batch sizes differ.
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mixreorg.losses import ImageTextContrastiveLoss, MultiLabelContrastiveLoss

WORLD = 2
N, DIN, D, K = 8, 12, 16, 3
CASES = ("itc", "itc_labels", "mlc", "mlc_labels")


def _global_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return dict(
        x_img=torch.randn(N, DIN, generator=g, dtype=torch.float64),
        x_txt=torch.randn(N, DIN, generator=g, dtype=torch.float64),
        x_prm=torch.randn(N, K, DIN, generator=g, dtype=torch.float64),
        w_img=torch.randn(D, DIN, generator=g, dtype=torch.float64) * 0.5,
        w_txt=torch.randn(D, DIN, generator=g, dtype=torch.float64) * 0.5,
        # ids repeat within and across the two halves (rows 0-3 | 4-7)
        labels=torch.tensor([0, 1, 2, 0, 1, 3, 3, 4]),
        prompt_labels=torch.tensor(
            [[0, 1, 2], [0, 3, 3], [4, 5, 6], [1, 1, 1], [2, 7, 8], [9, 9, 9], [0, 5, 10], [11, 12, 13]]
        ),
    )


def _compute(case: str, rows: slice) -> dict[str, torch.Tensor]:
    data = _global_data()
    w_img = data["w_img"].clone().requires_grad_(True)
    w_txt = data["w_txt"].clone().requires_grad_(True)
    logit_scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    x_img = data["x_img"][rows].clone().requires_grad_(True)
    image = F.normalize(x_img @ w_img.t(), dim=-1)  # [B, D]
    if case.startswith("itc"):
        x_txt = data["x_txt"][rows].clone().requires_grad_(True)
        text = F.normalize(x_txt @ w_txt.t(), dim=-1)  # [B, D]
        labels = data["labels"][rows] if case == "itc_labels" else None
        loss = ImageTextContrastiveLoss()(image, text, logit_scale, labels)
    else:
        x_txt = data["x_prm"][rows].clone().requires_grad_(True)
        text = F.normalize(x_txt @ w_txt.t(), dim=-1)  # [B, K, D]
        labels = data["prompt_labels"][rows] if case == "mlc_labels" else None
        loss = MultiLabelContrastiveLoss()(image, text, logit_scale, labels)
    loss.backward()
    return dict(
        loss=loss.detach(),
        w_img=w_img.grad,
        w_txt=w_txt.grad,
        logit_scale=logit_scale.grad,
        x_img=x_img.grad,
        x_txt=x_txt.grad,
    )


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        half = N // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        results: dict[str, object] = {case: _compute(case, rows) for case in CASES}
        # unequal local batches (4 vs 3 rows) must be refused clearly on every rank
        emb = F.normalize(torch.randn(4 - rank, D, dtype=torch.float64), dim=-1)
        try:
            ImageTextContrastiveLoss()(emb, emb, 0.0)
            results["unequal"] = "no error"
        except ValueError as err:
            results["unequal"] = str(err)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_losses_match_single_process(tmp_path):
    assert not dist.is_initialized()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for case in CASES:
        single = _compute(case, slice(0, N))
        per_rank = [r[case] for r in ranks]
        loss = torch.stack([r["loss"] for r in per_rank]).mean()
        torch.testing.assert_close(loss, single["loss"], rtol=1e-12, atol=1e-12, msg=case)
        for name in ("w_img", "w_txt", "logit_scale"):
            ddp_grad = torch.stack([r[name] for r in per_rank]).mean(0)  # DDP averages over ranks
            torch.testing.assert_close(ddp_grad, single[name], rtol=1e-10, atol=1e-12, msg=f"{case} {name}")
        for name in ("x_img", "x_txt"):
            local = torch.cat([r[name] for r in per_rank]) / WORLD
            torch.testing.assert_close(local, single[name], rtol=1e-10, atol=1e-12, msg=f"{case} {name}")
        # not vacuous: gradients are non-zero, and the multi-positive ids change the loss
        assert single["w_img"].abs().sum() > 0 and single["x_txt"].abs().sum() > 0
    assert not torch.allclose(ranks[0]["itc"]["loss"], ranks[0]["itc_labels"]["loss"])
    assert not torch.allclose(ranks[0]["mlc"]["loss"], ranks[0]["mlc_labels"]["loss"])
    for r in ranks:
        assert "batch sizes differ" in r["unequal"] and "[4, 3]" in r["unequal"]
