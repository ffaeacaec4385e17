"""The four zero-shot segmentation layouts and the ImageFolder reader, on tiny trees written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixreorg.data import (
    ADE20K,
    COCOObject,
    ImageFolderClassification,
    PascalContext,
    PascalVOC,
    SynthShapesEval,
    build_segmentation_dataset,
)
from mixreorg.data.segmentation import voc_palette

H, W = 30, 40


def _jpg(path: Path, seed: int, size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def _label_map(values: list[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.asarray(values, dtype=np.uint8)[rng.integers(0, len(values), (H, W))]
    m[0, :] = values[0]
    m[-1, -1] = values[-1]
    return m


def _png(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:  # a palette PNG, as VOC ships its masks
        im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
        im.putpalette(voc_palette(256).ravel().tolist())
        assert im.mode == "P"
    else:
        im = Image.fromarray(mask)
    im.save(path)


@pytest.fixture()
def voc(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    masks = {"2007_000032": _label_map([0, 1, 15, 255], 0), "2007_000039": _label_map([0, 20, 255], 1)}
    for i, (name, m) in enumerate(masks.items()):
        _jpg(base / "JPEGImages" / f"{name}.jpg", i)
        _png(base / "SegmentationClass" / f"{name}.png", m, palette=True)
    _jpg(base / "JPEGImages" / "2007_999999.jpg", 9)  # in JPEGImages but not in the split
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(masks) + "\n")
    return tmp_path, masks


def test_voc_layout(voc) -> None:
    root, masks = voc
    for r in (root, root / "VOCdevkit", root / "VOCdevkit" / "VOC2012"):  # any level of the tree
        ds = PascalVOC(r, scale=None)
        assert len(ds) == 2
    item = ds[0]
    assert item["name"] == "2007_000032" and item["orig_size"] == (H, W)
    assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
    assert torch.equal(item["mask"], torch.from_numpy(masks["2007_000032"]).long())
    assert ds.NUM_CLASSES == 21 and ds.CLASS_NAMES[15] == "person" and ds.BACKGROUND_INDEX == 0
    assert ds.BG_THRESH == 0.95
    scaled = PascalVOC(root)[1]  # default eval scale (2048, 448): short side 448, mask untouched
    assert scaled["image"].shape == (3, 448, 597) and scaled["mask"].shape == (H, W)


def test_voc_rgb_masks_map_through_the_palette(voc) -> None:
    root, masks = voc
    name = "2007_000039"
    path = root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{name}.png"
    Image.fromarray(voc_palette(256)[masks[name]]).save(path)  # an RGB-coloured mask
    ds = PascalVOC(root, scale=None)
    assert torch.equal(ds[1]["mask"], torch.from_numpy(masks[name]).long())
    rgb = voc_palette(256)[masks[name]].copy()
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(path)
    with pytest.raises(ValueError, match="outside the VOC palette"):
        ds[1]


def test_voc_errors(voc, tmp_path: Path) -> None:
    root, _ = voc
    with pytest.raises(ValueError, match="does not exist"):
        PascalVOC(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"missing folder JPEGImages/"):
        PascalVOC(tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets")
    with pytest.raises(ValueError, match=r"missing split file .*train.txt"):
        PascalVOC(root, split="train")
    base = root / "VOCdevkit" / "VOC2012"
    (base / "SegmentationClass" / "2007_000039.png").unlink()
    with pytest.raises(ValueError, match=r"1 mask file\(s\) missing, e.g. .*2007_000039.png"):
        PascalVOC(root)
    (base / "SegmentationClass").rename(base / "Segmentation")
    with pytest.raises(ValueError, match=r"missing folder .*SegmentationClass"):
        PascalVOC(root)


def test_voc_bad_labels_and_corrupt_images(voc) -> None:
    root, masks = voc
    base = root / "VOCdevkit" / "VOC2012"
    bad = masks["2007_000032"].copy()
    bad[5, 5] = 40  # not a VOC class and not 255
    _png(base / "SegmentationClass" / "2007_000032.png", bad)
    ds = PascalVOC(root, scale=None)
    with pytest.raises(ValueError, match=r"label 40 outside \[0, 21\)"):
        ds[0]
    (base / "JPEGImages" / "2007_000039.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match=r"cannot read image .*2007_000039.jpg"):
        ds[1]


def test_context_layout(tmp_path: Path) -> None:
    base = tmp_path / "VOC2010"
    mask = _label_map([0, 29, 47, 59], 3)
    _jpg(base / "JPEGImages" / "2008_000002.jpg", 3)
    _png(base / "SegmentationClassContext" / "2008_000002.png", mask)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    ds = PascalContext(tmp_path, scale=None)
    assert len(ds) == 1 and ds.NUM_CLASSES == 60 and ds.BG_THRESH == 0.35
    assert torch.equal(ds[0]["mask"], torch.from_numpy(mask).long())
    assert ds.CLASS_NAMES[29] == "grass" and ds.CLASS_NAMES[47] == "sky"
    with pytest.raises(ValueError, match=r"missing split file .*SegmentationContext"):
        PascalContext(tmp_path, split="train")


def test_coco_object_layout(tmp_path: Path) -> None:
    base = tmp_path / "coco"
    masks = {"000000000139": _label_map([0, 1, 62, 80, 255], 4), "000000000285": _label_map([0, 23], 5)}
    for i, (name, m) in enumerate(masks.items()):
        _jpg(base / "images" / "val2017" / f"{name}.jpg", i)
        _png(base / "annotations" / "val2017" / f"{name}_instanceTrainIds.png", m)
    ds = COCOObject(tmp_path, scale=None)
    assert [ds[i]["name"] for i in range(len(ds))] == sorted(masks)
    assert ds.NUM_CLASSES == 81 and ds.CLASS_NAMES[1] == "person" and ds.CLASS_NAMES[22] == "bear"
    for i, name in enumerate(sorted(masks)):
        assert torch.equal(ds[i]["mask"], torch.from_numpy(masks[name]).long())
    (base / "annotations" / "val2017" / "000000000285_instanceTrainIds.png").unlink()
    with pytest.raises(ValueError, match="000000000285_instanceTrainIds.png"):
        COCOObject(base)
    (base / "images" / "train2017").mkdir()
    with pytest.raises(ValueError, match=r"missing folder .*annotations/train2017"):
        COCOObject(base, split="train2017")


def test_ade20k_layout_reduces_zero_label(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    raw = _label_map([0, 1, 3, 150], 6)
    _jpg(base / "images" / "validation" / "ADE_val_00000001.jpg", 6)
    _png(base / "annotations" / "validation" / "ADE_val_00000001.png", raw)
    ds = ADE20K(tmp_path, scale=None)
    mask = ds[0]["mask"].numpy()
    assert ds.NUM_CLASSES == 150 and ds.BACKGROUND_INDEX is None and ds.CLASS_NAMES[2] == "sky"
    assert (mask[raw == 0] == 255).all()  # "other" is ignored
    assert (mask[raw == 3] == 2).all() and (mask[raw == 150] == 149).all() and (mask[raw == 1] == 0).all()
    with pytest.raises(ValueError, match=r"missing folder images/"):
        ADE20K(tmp_path / "ADEChallengeData2016" / "images")


def test_registry_and_synthshapes_share_the_interface(voc) -> None:
    root, _ = voc
    assert isinstance(build_segmentation_dataset("voc", root), PascalVOC)
    synth = build_segmentation_dataset("synthshapes", size=4)
    assert isinstance(synth, SynthShapesEval)
    for ds in (PascalVOC(root), synth):
        item = ds[0]
        assert item["image"].ndim == 3 and item["mask"].dtype == torch.long
        assert len(ds.CLASS_NAMES) == ds.NUM_CLASSES and ds.IGNORE_INDEX == 255
        assert hasattr(ds, "BACKGROUND_INDEX") and hasattr(ds, "BG_THRESH")
    with pytest.raises(ValueError, match="unknown segmentation dataset"):
        build_segmentation_dataset("cityscapes", root)


def test_image_folder_classification(tmp_path: Path) -> None:
    _jpg(tmp_path / "golden_retriever" / "a.jpg", 0)
    _jpg(tmp_path / "golden_retriever" / "b.JPEG", 1, size=(60, 50))
    _jpg(tmp_path / "tabby_cat" / "c.jpg", 2)
    (tmp_path / "empty_class").mkdir()
    ds = ImageFolderClassification(tmp_path, image_size=32)
    assert ds.classes == ["empty_class", "golden_retriever", "tabby_cat"]
    assert ds.class_names == ["empty class", "golden retriever", "tabby cat"] and ds.empty_classes == ["empty_class"]
    assert [ds[i]["label"] for i in range(len(ds))] == [1, 1, 2]
    assert ds[1]["image"].shape == (3, 32, 32)
    named = ImageFolderClassification(tmp_path, class_names=["x", "dog", "cat"])
    assert named.class_names == ["x", "dog", "cat"]
    with pytest.raises(ValueError, match="3 class folders"):
        ImageFolderClassification(tmp_path, class_names=["dog"])
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderClassification(tmp_path / "empty_class")
