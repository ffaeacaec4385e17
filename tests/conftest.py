"""Test set-up shared by the whole suite.

Two facts about the CPU machines this suite runs on:

* Triton kernels run on CPU only through its interpreter, and ``TRITON_INTERPRET`` must be set
  before any ``@triton.jit`` function is defined, i.e. before ``mixreorg`` is imported.
* The only torchvision that pairs with torch 2.13.0 is a CUDA build. On CPU torch its C extension
  fails to load, and ``torchvision._meta_registrations`` then crashes the import ("operator
  torchvision::nms does not exist") -- which breaks ``import timm``. Those registrations only add
  fake kernels for the C operators, which do not exist here anyway, so we let torchvision import
  without them. Nothing of torchvision's C operators is used by the tests.
"""

from __future__ import annotations

import os
import sys
import types

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _make_torchvision_importable() -> None:
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return  # not installed: tests that need timm install it via the [test] extra
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchvision._meta_registrations")
        stub.__doc__ = "skipped: torchvision's C operators are absent on this CPU torch"
        sys.modules["torchvision._meta_registrations"] = stub
        import torchvision  # noqa: F401


_make_torchvision_importable()
