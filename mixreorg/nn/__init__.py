"""Modules: the patch mixer, the GroupViT backbone, the MixReorg encoder, the supervised bound and
the registry of named models (Table 6 rows)."""

from .attention import Attention, Block, CrossAttention, CrossAttnBlock, DropPath, Mlp, QuickGELU
from .ema import ModelEma
from .grouping import AssignAttention, GroupingBlock, TokenMlp
from .groupvit import (
    IMAGE_POOLS,
    GroupViT,
    ProjectionHead,
    assigned_pool,
    assignment_to_image,
    compose_assignments,
    token_grid,
)
from .mixer import MixedPatchMixer, images_to_patches, mix_images, patches_to_images, restore_images
from .mixreorg import MixReorg, MixReorgConfig
from .presets import TABLE6, TABLE6_ROWS, Preset, build_preset
from .stem import ConvTrunk, FineTokens
from .supervised import SupervisedInference, SupervisedSegmenter
from .text import TextEncoder
from .vision import GroupViTStage, GroupViTVisionEncoder, PatchEmbed, interpolate_pos_embed
from .weights import load_hf_groupvit, load_nvlabs_groupvit

__all__ = [
    "MixedPatchMixer",
    "ModelEma",
    "MixReorg",
    "MixReorgConfig",
    "mix_images",
    "restore_images",
    "images_to_patches",
    "patches_to_images",
    "Attention",
    "CrossAttention",
    "Block",
    "CrossAttnBlock",
    "DropPath",
    "Mlp",
    "QuickGELU",
    "AssignAttention",
    "GroupingBlock",
    "TokenMlp",
    "PatchEmbed",
    "ConvTrunk",
    "FineTokens",
    "GroupViTStage",
    "GroupViTVisionEncoder",
    "interpolate_pos_embed",
    "TextEncoder",
    "ProjectionHead",
    "GroupViT",
    "IMAGE_POOLS",
    "assigned_pool",
    "compose_assignments",
    "assignment_to_image",
    "token_grid",
    "SupervisedSegmenter",
    "SupervisedInference",
    "Preset",
    "TABLE6",
    "TABLE6_ROWS",
    "build_preset",
    "load_hf_groupvit",
    "load_nvlabs_groupvit",
]
