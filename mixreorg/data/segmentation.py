"""Zero-shot evaluation datasets in their standard on-disk layouts, and an ImageFolder reader.

Every segmentation dataset yields ``{"image": float [3, h, w] normalised (resized to the eval
scale), "mask": long [H, W] at the ORIGINAL resolution (255 = ignore), "name", "path",
"orig_size": (H, W)}``. Predictions must be resized to ``mask.shape`` before scoring (as mmseg /
GroupViT do). Class attributes: ``CLASS_NAMES`` (mask index -> name, GroupViT's prompt names),
``NUM_CLASSES``, ``IGNORE_INDEX`` (255), ``BACKGROUND_INDEX`` (the "background" class filled by
thresholding, or ``None``) and ``BG_THRESH`` (GroupViT's released thresholds).

Layouts (``root`` may be the dataset folder itself or a parent holding it, as listed):

* PASCAL VOC 2012 (21 classes, 0 = background): ``[VOCdevkit/]VOC2012/`` with ``JPEGImages/<id>.jpg``,
  ``SegmentationClass/<id>.png`` (palette PNG, 255 = border/ignore) and
  ``ImageSets/Segmentation/val.txt``. RGB-coloured masks are mapped back through the VOC palette.
* PASCAL Context (60 classes, 0 = background; mmseg's converted layout):
  ``[VOCdevkit/]VOC2010/`` with ``JPEGImages/<id>.jpg``, ``SegmentationClassContext/<id>.png``
  (values 0..59) and ``ImageSets/SegmentationContext/val.txt``.
* COCO-Object (81 classes, 0 = background; GroupViT's ``convert_coco_object.py`` output):
  ``[coco/]`` with ``images/val2017/<id>.jpg`` and ``annotations/val2017/<id>_instanceTrainIds.png``
  (values 0..80, 255 ignore); every image of ``images/val2017`` is used.
* ADE20K (150 classes, no background): ``[ADEChallengeData2016/]`` with
  ``images/validation/<id>.jpg`` and ``annotations/validation/<id>.png`` where 0 = "other"
  (ignored) and 1..150 are the classes; the reader returns ``value - 1`` and maps 0 to 255 (mmseg's
  ``reduce_zero_label``).

Bad layouts raise ``ValueError`` naming the missing folder or file; a corrupt image or mask raises
``ValueError`` naming the file (an evaluation must not silently skip images).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .synthshapes import SynthShapesEval
from .transforms import CLIP_MEAN, CLIP_STD, Compose, Normalize, ResizeKeepRatio, ToTensor, eval_transform

__all__ = [
    "VOC_CLASSES",
    "CONTEXT_CLASSES",
    "COCO_OBJECT_CLASSES",
    "ADE20K_CLASSES",
    "SegmentationDataset",
    "PascalVOC",
    "PascalContext",
    "COCOObject",
    "ADE20K",
    "ImageFolderClassification",
    "build_segmentation_dataset",
    "seg_eval_transform",
    "voc_palette",
]

# GroupViT's prompt names (segmentation/datasets/*.py of NVlabs/GroupViT).
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "table", "dog", "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor",
)  # fmt: skip

CONTEXT_CLASSES: tuple[str, ...] = (
    "background", "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "plant", "road",
    "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree",
    "truck", "monitor", "wall", "water", "window", "wood",
)  # fmt: skip

COCO_OBJECT_CLASSES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# mmseg's ADE20KDataset.CLASSES (SceneParsing 150), "bed " stripped.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".gif", ".tif", ".tiff")


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map ``[n, 3]`` uint8 (bit-interleaved label -> RGB)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out[i] = (r, g, b)
    return out


def seg_eval_transform(
    scale: tuple[int, int] | None = (2048, 448),
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Compose:
    """GroupViT's test pipeline: keep-ratio resize into ``scale`` (long, short), tensor, normalise."""
    ops: list[Callable[..., Any]] = [] if scale is None else [ResizeKeepRatio(scale)]
    return Compose(ops + [ToTensor(), Normalize(mean, std)])


def _resolve_root(
    root: str | os.PathLike[str], candidates: Sequence[str], marker: str, dataset: str, layout: str
) -> Path:
    base = Path(root).expanduser()
    if not base.exists():
        raise ValueError(f"{dataset}: dataset root {base} does not exist (expected layout: {layout})")
    if not base.is_dir() or not os.access(base, os.R_OK | os.X_OK):
        raise ValueError(f"{dataset}: dataset root {base} is not a readable folder")
    for cand in candidates:
        folder = base / cand if cand else base
        if (folder / marker).is_dir():
            return folder
    tried = ", ".join(str((base / c) / marker if c else base / marker) for c in candidates)
    raise ValueError(
        f"{dataset}: missing folder {marker}/ under {base} (looked for {tried}); expected layout: {layout}"
    )


def _need_dir(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_dir():
        raise ValueError(f"{dataset}: missing folder {path} (expected layout: {layout})")
    return path


def _read_split(path: Path, dataset: str, layout: str) -> list[str]:
    if not path.is_file():
        raise ValueError(f"{dataset}: missing split file {path} (expected layout: {layout})")
    ids = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{dataset}: split file {path} lists no images")
    return ids


def _open_image(path: Path, dataset: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any decoding failure names the file
        raise ValueError(f"{dataset}: cannot read image {path}: {err}") from err


class SegmentationDataset(Dataset):
    """Base class: a list of ``(name, image path, mask path)`` read lazily.

    ``transform(pil_image, rng)`` makes the image tensor (default: :func:`seg_eval_transform`,
    ``scale=(2048, 448)``); the mask is never resized.
    """

    NAME = "segmentation"
    CLASS_NAMES: tuple[str, ...] = ()
    NUM_CLASSES = 0
    IGNORE_INDEX = 255
    BACKGROUND_INDEX: int | None = None
    BG_THRESH: float | None = None
    LAYOUT = ""

    def __init__(
        self,
        items: Sequence[tuple[str, Path, Path]],
        *,
        transform: Callable[..., torch.Tensor] | None = None,
        scale: tuple[int, int] | None = (2048, 448),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        limit: int | None = None,
    ) -> None:
        missing = [str(m) for _, _, m in items if not m.is_file()]
        if missing:
            raise ValueError(
                f"{self.NAME}: {len(missing)} mask file(s) missing, e.g. {', '.join(missing[:3])} "
                f"(expected layout: {self.LAYOUT})"
            )
        missing = [str(i) for _, i, _ in items if not i.is_file()]
        if missing:
            raise ValueError(
                f"{self.NAME}: {len(missing)} image file(s) missing, e.g. {', '.join(missing[:3])} "
                f"(expected layout: {self.LAYOUT})"
            )
        self.items = list(items)[:limit] if limit is not None else list(items)
        if not self.items:
            raise ValueError(f"{self.NAME}: no images found (expected layout: {self.LAYOUT})")
        self.transform = transform or seg_eval_transform(scale, mean, std)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.CLASS_NAMES

    def __len__(self) -> int:
        return len(self.items)

    def _convert_mask(self, arr: np.ndarray, path: Path) -> np.ndarray:
        return arr

    def read_mask(self, index: int) -> np.ndarray:
        """The label map of item ``index`` as int64 ``[H, W]`` (255 = ignore)."""
        _, _, path = self.items[index]
        try:
            with Image.open(path) as im:
                mode = im.mode
                arr = np.array(im)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{self.NAME}: cannot read mask {path}: {err}") from err
        if mode in ("RGB", "RGBA"):
            arr = self._rgb_mask(arr[..., :3], path)
        elif arr.ndim != 2:
            raise ValueError(f"{self.NAME}: mask {path} has mode {mode} / shape {arr.shape}; expected a label PNG")
        mask = self._convert_mask(arr.astype(np.int64), path)
        bad = (mask != self.IGNORE_INDEX) & ((mask < 0) | (mask >= self.NUM_CLASSES))
        if bad.any():
            raise ValueError(
                f"{self.NAME}: mask {path} has label {int(mask[bad].max())} outside [0, {self.NUM_CLASSES}) "
                f"and != {self.IGNORE_INDEX}; is this the {self.NAME} layout ({self.LAYOUT})?"
            )
        return mask

    def _rgb_mask(self, arr: np.ndarray, path: Path) -> np.ndarray:
        raise ValueError(f"{self.NAME}: mask {path} is an RGB image; expected single-channel label values")

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, img_path, _ = self.items[index]
        img = _open_image(img_path, self.NAME)
        mask = self.read_mask(index)
        if mask.shape != (img.height, img.width):
            raise ValueError(
                f"{self.NAME}: mask {self.items[index][2]} is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{img_path} is {img.width}x{img.height}"
            )
        return {
            "image": self.transform(img, None),
            "mask": torch.from_numpy(mask),
            "name": name,
            "path": str(img_path),
            "orig_size": (img.height, img.width),
        }


class PascalVOC(SegmentationDataset):
    """PASCAL VOC 2012 segmentation (``split``: ``val`` | ``train`` | ``trainval``)."""

    NAME = "PASCAL VOC 2012"
    CLASS_NAMES = VOC_CLASSES
    NUM_CLASSES = len(VOC_CLASSES)
    BACKGROUND_INDEX = 0
    BG_THRESH = 0.95
    LAYOUT = "VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/<split>.txt}"

    def __init__(self, root: str | os.PathLike[str], split: str = "val", **kwargs: Any) -> None:
        base = _resolve_root(root, ["", "VOC2012", "VOCdevkit/VOC2012"], "JPEGImages", self.NAME, self.LAYOUT)
        ann = _need_dir(base / "SegmentationClass", self.NAME, self.LAYOUT)
        ids = _read_split(base / "ImageSets" / "Segmentation" / f"{split}.txt", self.NAME, self.LAYOUT)
        self.root = base
        super().__init__([(i, base / "JPEGImages" / f"{i}.jpg", ann / f"{i}.png") for i in ids], **kwargs)

    def _rgb_mask(self, arr: np.ndarray, path: Path) -> np.ndarray:
        pal = voc_palette(256)
        lut = {tuple(int(v) for v in pal[i]): i for i in list(range(len(self.CLASS_NAMES))) + [255]}
        flat = arr.reshape(-1, 3).astype(np.int64)
        code = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
        out = np.full(code.shape, -1, dtype=np.int64)
        for rgb, label in lut.items():
            out[code == ((rgb[0] << 16) | (rgb[1] << 8) | rgb[2])] = label
        if (out < 0).any():
            raise ValueError(f"{self.NAME}: RGB mask {path} has colours outside the VOC palette")
        return out.reshape(arr.shape[:2])


class PascalContext(SegmentationDataset):
    """PASCAL Context, 60 classes incl. background (mmseg's converted layout)."""

    NAME = "PASCAL Context"
    CLASS_NAMES = CONTEXT_CLASSES
    NUM_CLASSES = len(CONTEXT_CLASSES)
    BACKGROUND_INDEX = 0
    BG_THRESH = 0.35
    LAYOUT = "VOC2010/{JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/<split>.txt}"

    def __init__(self, root: str | os.PathLike[str], split: str = "val", **kwargs: Any) -> None:
        base = _resolve_root(root, ["", "VOC2010", "VOCdevkit/VOC2010"], "JPEGImages", self.NAME, self.LAYOUT)
        ann = _need_dir(base / "SegmentationClassContext", self.NAME, self.LAYOUT)
        ids = _read_split(base / "ImageSets" / "SegmentationContext" / f"{split}.txt", self.NAME, self.LAYOUT)
        self.root = base
        super().__init__([(i, base / "JPEGImages" / f"{i}.jpg", ann / f"{i}.png") for i in ids], **kwargs)


class COCOObject(SegmentationDataset):
    """COCO-Object val2017: 80 thing classes + background, GroupViT's converted masks."""

    NAME = "COCO-Object"
    CLASS_NAMES = COCO_OBJECT_CLASSES
    NUM_CLASSES = len(COCO_OBJECT_CLASSES)
    BACKGROUND_INDEX = 0
    BG_THRESH = 0.95
    LAYOUT = "coco/{images/<split>/<id>.jpg, annotations/<split>/<id>_instanceTrainIds.png}"

    def __init__(self, root: str | os.PathLike[str], split: str = "val2017", **kwargs: Any) -> None:
        base = _resolve_root(root, ["", "coco"], "images", self.NAME, self.LAYOUT)
        img_dir = _need_dir(base / "images" / split, self.NAME, self.LAYOUT)
        ann = _need_dir(base / "annotations" / split, self.NAME, self.LAYOUT)
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".jpg")
        self.root = base
        super().__init__([(p.stem, p, ann / f"{p.stem}_instanceTrainIds.png") for p in images], **kwargs)


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing validation, 150 classes (0 = "other" is ignored)."""

    NAME = "ADE20K"
    CLASS_NAMES = ADE20K_CLASSES
    NUM_CLASSES = len(ADE20K_CLASSES)
    BACKGROUND_INDEX = None
    BG_THRESH = None
    LAYOUT = "ADEChallengeData2016/{images/<split>/<id>.jpg, annotations/<split>/<id>.png}"

    def __init__(self, root: str | os.PathLike[str], split: str = "validation", **kwargs: Any) -> None:
        base = _resolve_root(root, ["", "ADEChallengeData2016"], "images", self.NAME, self.LAYOUT)
        img_dir = _need_dir(base / "images" / split, self.NAME, self.LAYOUT)
        ann = _need_dir(base / "annotations" / split, self.NAME, self.LAYOUT)
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".jpg")
        self.root = base
        super().__init__([(p.stem, p, ann / f"{p.stem}.png") for p in images], **kwargs)

    def _convert_mask(self, arr: np.ndarray, path: Path) -> np.ndarray:
        out = arr - 1  # reduce_zero_label: 0 ("other") -> ignore, 1..150 -> 0..149
        out[arr == 0] = self.IGNORE_INDEX
        out[arr == 255] = self.IGNORE_INDEX
        return out


_DATASETS: dict[str, type[SegmentationDataset]] = {
    "voc": PascalVOC,
    "context": PascalContext,
    "coco_object": COCOObject,
    "ade20k": ADE20K,
}


def build_segmentation_dataset(name: str, root: str | os.PathLike[str] | None = None, **kwargs: Any) -> Dataset:
    """``"voc" | "context" | "coco_object" | "ade20k"`` (with ``root``) or ``"synthshapes"``
    (``kwargs`` go to :class:`~mixreorg.data.synthshapes.SynthShapesEval`)."""
    key = name.lower().replace("-", "_")
    if key == "synthshapes":
        return SynthShapesEval(**kwargs)
    if key not in _DATASETS:
        raise ValueError(f"unknown segmentation dataset {name!r}; choose one of {sorted(_DATASETS) + ['synthshapes']}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder")
    return _DATASETS[key](root, **kwargs)


class ImageFolderClassification(Dataset):
    """``root/<class>/<image>`` (ImageNet-val style) for zero-shot classification.

    Classes are the sub-folders in sorted order; ``class_names`` are their names with ``_`` as spaces
    unless ``class_names`` is given (one per folder, same order, e.g. readable ImageNet names for
    WordNet-id folders). Items: ``{"image", "label", "path"}``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        transform: Callable[..., torch.Tensor] | None = None,
        class_names: Sequence[str] | None = None,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        base = Path(root).expanduser()
        if not base.is_dir():
            raise ValueError(f"ImageFolder: root {base} is not a folder (expected root/<class>/<image>)")
        folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"ImageFolder: {base} has no class sub-folders (expected root/<class>/<image>)")
        self.classes = [p.name for p in folders]
        if class_names is not None and len(class_names) != len(folders):
            raise ValueError(f"ImageFolder: {len(class_names)} class names for {len(folders)} class folders")
        self.class_names = list(class_names) if class_names is not None else [c.replace("_", " ") for c in self.classes]
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for label, folder in enumerate(folders):
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXTS and p.is_file())
            if not files:
                empty.append(folder.name)
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise ValueError(f"ImageFolder: no images ({', '.join(_IMAGE_EXTS)}) under {base}")
        self.empty_classes = empty
        self.transform = transform or eval_transform(image_size, mean=mean, std=std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        return {"image": self.transform(_open_image(path, "ImageFolder"), None), "label": label, "path": str(path)}
