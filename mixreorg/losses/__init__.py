"""mixreorg.losses"""

from mixreorg.losses.contrastive import (
    ImageTextContrastiveLoss,
    MultiLabelContrastiveLoss,
    soft_cross_entropy,
    text_ids,
)
from mixreorg.losses.mixreorg import (
    GroupViTContrastive,
    MixedSegmentationLoss,
    MixReorgLoss,
    canonical_caption_index,
)

__all__ = [
    "ImageTextContrastiveLoss",
    "MultiLabelContrastiveLoss",
    "soft_cross_entropy",
    "text_ids",
    "MixedSegmentationLoss",
    "GroupViTContrastive",
    "MixReorgLoss",
    "canonical_caption_index",
]
