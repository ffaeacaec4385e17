"""Test set-up shared by the whole suite.

Two facts about the CPU machines this suite runs on:

* Triton kernels run on CPU only through its interpreter, and ``TRITON_INTERPRET`` must be set
  before any ``@triton.jit`` function is defined, i.e. before ``mixreorg`` is imported.
* The only torchvision that pairs with torch 2.13.0 is a CUDA build. On CPU torch its C extension
  fails to load and the import crashes ("operator torchvision::nms does not exist"), which breaks
  ``import timm``: ``mixreorg._compat.make_torchvision_importable`` mends that.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from mixreorg._compat import make_torchvision_importable  # noqa: E402

make_torchvision_importable()
