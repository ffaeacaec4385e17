"""Compatibility shims for the CPU machines this project is developed on."""

from __future__ import annotations

import sys
import types

__all__ = ["make_torchvision_importable"]


def make_torchvision_importable() -> bool:
    """Let ``import timm`` work next to a torchvision build whose C operators cannot load.

    The only torchvision that pairs with torch 2.13.0 is a CUDA build. On CPU torch its C
    extension fails to load, and ``torchvision._meta_registrations`` then crashes the whole import
    ("operator torchvision::nms does not exist"), which breaks ``import timm`` (and transformers'
    vision models). Those registrations only add fake (meta) kernels for the C operators, which do
    not exist here anyway, so we import torchvision without them. torchvision's C operators
    (nms, roi_align, ...) stay unavailable; its Python parts work.

    Returns True if torchvision is importable afterwards. Does nothing when torchvision imports
    cleanly or is not installed.
    """
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return False
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchvision._meta_registrations")
        stub.__doc__ = "skipped by mixreorg: torchvision's C operators are absent on this torch build"
        sys.modules["torchvision._meta_registrations"] = stub
        import torchvision  # noqa: F401
    return True
