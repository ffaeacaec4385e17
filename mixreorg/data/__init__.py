"""mixreorg.data: training streams, evaluation datasets and transforms (no torchvision).

Training sources (infinite, deterministic, exactly resumable; see :mod:`mixreorg.data.stream`):
:class:`SynthShapesStream` (the embedded benchmark), :class:`ShardStream` (img2dataset tar shards),
:func:`ImageCaptionFolder` / :func:`ImageCaptionCSV` (local pairs).
Evaluation: :class:`SynthShapesEval`, :class:`PascalVOC`, :class:`PascalContext`,
:class:`COCOObject`, :class:`ADE20K`, :class:`ImageFolderClassification`.
"""

from .pairs import ImageCaptionCSV, ImageCaptionFolder, ImageCaptionPairs
from .segmentation import (
    ADE20K,
    ADE20K_CLASSES,
    COCO_OBJECT_CLASSES,
    CONTEXT_CLASSES,
    VOC_CLASSES,
    COCOObject,
    ImageFolderClassification,
    PascalContext,
    PascalVOC,
    SegmentationDataset,
    build_segmentation_dataset,
    seg_eval_transform,
)
from .stream import SKIP_REASONS, ResumableStream, collate_samples
from .synthshapes import CHANCE_NOTE, SynthShapes, SynthShapesConfig, SynthShapesEval, SynthShapesStream, chance_miou
from .transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from .webdataset import ShardStream, expand_shards

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "CHANCE_NOTE",
    "CLIP_MEAN",
    "CLIP_STD",
    "COCOObject",
    "COCO_OBJECT_CLASSES",
    "CONTEXT_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageCaptionCSV",
    "ImageCaptionFolder",
    "ImageCaptionPairs",
    "ImageFolderClassification",
    "PascalContext",
    "PascalVOC",
    "ResumableStream",
    "SKIP_REASONS",
    "SegmentationDataset",
    "ShardStream",
    "SynthShapes",
    "SynthShapesConfig",
    "SynthShapesEval",
    "SynthShapesStream",
    "VOC_CLASSES",
    "build_segmentation_dataset",
    "chance_miou",
    "collate_samples",
    "eval_transform",
    "expand_shards",
    "seg_eval_transform",
    "train_transform",
]
