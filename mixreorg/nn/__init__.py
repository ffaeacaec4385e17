"""Modules: the patch mixer, the GroupViT backbone and the MixReorg encoder."""

from .attention import Attention, Block, CrossAttention, CrossAttnBlock, DropPath, Mlp, QuickGELU
from .grouping import AssignAttention, GroupingBlock, TokenMlp
from .groupvit import GroupViT, ProjectionHead, assignment_to_image, compose_assignments
from .mixer import MixedPatchMixer, images_to_patches, mix_images, patches_to_images, restore_images
from .mixreorg import MixReorg, MixReorgConfig
from .stem import ConvTrunk, FineTokens
from .text import TextEncoder
from .vision import GroupViTStage, GroupViTVisionEncoder, PatchEmbed, interpolate_pos_embed
from .weights import load_hf_groupvit, load_nvlabs_groupvit

__all__ = [
    "MixedPatchMixer",
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
    "compose_assignments",
    "assignment_to_image",
    "load_hf_groupvit",
    "load_nvlabs_groupvit",
]
