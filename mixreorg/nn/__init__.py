"""Modules: the patch mixer, the GroupViT backbone and the MixReorg encoder."""

from .mixer import MixedPatchMixer, images_to_patches, mix_images, patches_to_images, restore_images

__all__ = [
    "MixedPatchMixer",
    "mix_images",
    "restore_images",
    "images_to_patches",
    "patches_to_images",
]
