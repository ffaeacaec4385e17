"""mixreorg.losses: GroupViT's contrastive objective and MixReorg's losses.

:class:`ContrastiveObjective` is what every recipe trains with; :class:`ImageTextContrastiveLoss` and
:class:`MultiLabelContrastiveLoss` are its two terms as standalone losses (the same functions,
:func:`caption_loss` and :func:`prompt_loss`).
"""

from mixreorg.losses.contrastive import (
    LOSS_FORMS,
    MAX_LOGIT_SCALE,
    ImageTextContrastiveLoss,
    MultiLabelContrastiveLoss,
    caption_loss,
    keys_to_ids,
    logit_scale_value,
    prompt_loss,
    similarity_logits,
    soft_cross_entropy,
    text_ids,
)
from mixreorg.losses.mixreorg import MixedSegmentationLoss, MixReorgLoss, canonical_caption_index
from mixreorg.losses.objective import (
    GROUNDED_TEACHERS,
    GROUNDED_VOCABS,
    MULTI_LABEL_POOLS,
    ContrastiveObjective,
    label_key_ids,
)

__all__ = [
    "ContrastiveObjective",
    "ImageTextContrastiveLoss",
    "MultiLabelContrastiveLoss",
    "MixedSegmentationLoss",
    "MixReorgLoss",
    "LOSS_FORMS",
    "MAX_LOGIT_SCALE",
    "MULTI_LABEL_POOLS",
    "GROUNDED_TEACHERS",
    "GROUNDED_VOCABS",
    "caption_loss",
    "prompt_loss",
    "canonical_caption_index",
    "keys_to_ids",
    "label_key_ids",
    "logit_scale_value",
    "similarity_logits",
    "soft_cross_entropy",
    "text_ids",
]
