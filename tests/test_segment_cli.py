"""``python -m mixreorg.recipes.segment``: a user's images, any class names, overlays with legends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixreorg.nn import GroupViT
from mixreorg.nn.weights import ours_to_hf
from mixreorg.recipes.pretrain import main as pretrain_main
from mixreorg.recipes.segment import find_images, load_inference_model, main, parse_classes
from tests.test_pretrain import TINY


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in {"wide.png": (40, 70), "tall.jpg": (50, 33)}.items():
        p = folder / name
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    (folder / "notes.txt").write_text("not an image")
    return paths


TINY_GROUPVIT = dict(
    vision=dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, depths=(1, 1), num_group_tokens=(4, 0),
                num_output_groups=(4,)),
    text=dict(context_length=16, width=32, layers=1, heads=2),
    proj_dim=16, proj_hidden=32,
)  # fmt: skip


def _tiny_groupvit() -> GroupViT:
    torch.manual_seed(0)
    return GroupViT(**TINY_GROUPVIT)


def _save_hf(model: GroupViT, path: Path, with_config: bool = True) -> None:
    """Hugging Face layout: the weights and (``with_config``) the config.json beside them."""
    from safetensors.torch import save_file

    from mixreorg.nn.weights import config_to_hf

    save_file({k: v.contiguous() for k, v in ours_to_hf(model).items()}, str(path))
    if with_config:
        (path.parent / "config.json").write_text(json.dumps(config_to_hf(TINY_GROUPVIT)))


def _check_outputs(out: Path, n_classes: int, stems: list[str]) -> None:
    for stem in stems:
        seg = Image.open(out / f"{stem}_seg.png")
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert seg.width > labels.shape[1]  # image | overlay + legend
        assert labels.max() < n_classes


def test_segment_run_folder_with_any_class_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert pretrain_main(["--steps", "2", "--out", str(run), "--quiet", "--no-eval"]
                         + [a for s in TINY for a in ("--set", s)]) == 0
    _images(tmp_path / "imgs")
    out = tmp_path / "out"
    args = [str(tmp_path / "imgs"), "--model", str(run), "--classes", "red balloon, dog,sofa", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("_seg.png") == 2 and "%" in printed
    _check_outputs(out, 3, ["wide", "tall"])
    # a background class: label 0 is "background"
    assert main(args + ["--bg-thresh", "0.95", "--out", str(tmp_path / "bg")]) == 0
    _check_outputs(tmp_path / "bg", 4, ["wide", "tall"])
    # a checkpoint file of the run loads as well as its folder
    from mixreorg.checkpoint import CheckpointManager

    ckpt = CheckpointManager(run / "checkpoints").latest()
    _, size, cfg = load_inference_model(ckpt, with_config=True)
    assert size == 32 and cfg.model.name == "groupvit"
    # the label map has the image's size after resizing its short side to the training size (32)
    assert np.asarray(Image.open(out / "wide_labels.png")).shape == (32, 56)


def test_segment_imported_hf_weights(tmp_path: Path) -> None:
    model = _tiny_groupvit().eval()
    _save_hf(model, tmp_path / "model.safetensors", with_config=False)
    # the head counts are not in the tensors: without the config.json saved beside them, a clear error
    with pytest.raises(ValueError, match="config.json"):
        load_inference_model(tmp_path)
    _save_hf(model, tmp_path / "model.safetensors")
    loaded, size = load_inference_model(tmp_path)
    assert size == 32 and isinstance(loaded, GroupViT)
    assert loaded.vision.stages[0].blocks[0].attn.num_heads == 2  # from the config, not guessed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x)["image_embed"], model.encode_image(x)["image_embed"])
    paths = _images(tmp_path / "imgs")
    assert main([str(paths[0]), "--model", str(tmp_path), "--classes", "cat, dog", "--out", str(tmp_path / "o"),
                 "--short-side", "24"]) == 0  # fmt: skip
    assert np.asarray(Image.open(tmp_path / "o" / "wide_labels.png")).shape == (24, 42)
    # the evaluate CLI takes imported weights too (SynthShapes at the model's size here)
    from mixreorg.recipes.evaluate import main as eval_main

    assert eval_main([str(tmp_path / "model.safetensors"), "--size", "4", "--overlays", "2"]) == 0
    assert (tmp_path / "eval" / "synthshapes_overlay.png").is_file()


def test_segment_bad_input_names_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="empty name"):
        parse_classes("cat,,dog")
    with pytest.raises(ValueError, match="duplicated"):
        parse_classes("cat, Cat")
    with pytest.raises(ValueError, match="not found"):
        find_images([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="no images"):
        find_images([tmp_path])
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="neither Hugging Face"):
        load_inference_model(tmp_path / "junk.pt")
    (tmp_path / "broken.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_inference_model(tmp_path / "broken.bin")
    assert main([str(tmp_path / "x.png"), "--model", str(tmp_path / "junk.pt"), "--classes", "a"]) == 2
    assert "image path not found" in capsys.readouterr().err


def test_evaluate_multiscale_and_imagefolder_classification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixreorg.data.segmentation import ImageFolderClassification, build_segmentation_dataset
    from mixreorg.recipes.evaluate import main as eval_main
    from mixreorg.recipes.evaluation import evaluate_classification, evaluate_segmentation

    model = _tiny_groupvit().eval()
    ds = build_segmentation_dataset("synthshapes", size=4, image_size=32)
    one = evaluate_segmentation(model, ds, batch_size=4)
    same = evaluate_segmentation(model, ds, batch_size=4, scales=(1.0, 1.0))  # averaging equal logits
    np.testing.assert_array_equal(one["iou"], same["iou"])  # NaN (absent class) == NaN here
    multi = evaluate_segmentation(model, ds, batch_size=4, scales=(0.5, 1.0, 1.5))
    assert multi["scales"] == [0.5, 1.0, 1.5]
    with pytest.raises(ValueError, match="positive"):
        evaluate_segmentation(model, ds, scales=(0.0,))
    # ImageFolder: root/<class>/<image>
    rng = np.random.default_rng(0)
    for cls in ("red_square", "blue_circle"):
        (tmp_path / "cls" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "cls" / cls / f"{i}.png")
    folder = ImageFolderClassification(tmp_path / "cls", image_size=32)
    res = evaluate_classification(model, folder, batch_size=4)
    assert res["num_images"] == 6 and res["class_names"] == ["blue circle", "red square"]
    assert res["top5"] == 1.0 and set(res["per_class"]) == set(res["class_names"])
    assert res["top1"] == pytest.approx(sum(res["per_class"].values()) / 2)  # 3 images per class
    _save_hf(model, tmp_path / "model.safetensors")
    assert eval_main([str(tmp_path / "model.safetensors"), "--size", "4", "--scales", "0.75", "1",
                      "--classify", str(tmp_path / "cls")]) == 0  # fmt: skip
    assert "zero-shot classification" in capsys.readouterr().out
    saved = json.loads((tmp_path / "eval" / "classification.json").read_text())
    assert saved["num_images"] == 6
