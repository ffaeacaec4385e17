"""The demo entry point runs, checks what it claims, and writes its picture."""

from __future__ import annotations

import torch
from PIL import Image

from mixreorg.recipes import mix_demo


def test_mix_demo_cli_writes_picture_and_passes_its_checks(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert mix_demo.main(["--batch", "8", "--group-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[ok]") == 4 and "FAILED" not in printed
    with Image.open(out) as im:
        assert im.size == (8 * 66 + 2, 4 * 66 + 2)


def test_demo_images_are_distinct():
    imgs = mix_demo.demo_images(8)
    assert imgs.shape == (8, 3, 64, 64)
    flat = imgs.flatten(1)
    pairwise = torch.cdist(flat, flat) + 1e9 * torch.eye(8)  # distances between different images
    assert pairwise.min() > 1
