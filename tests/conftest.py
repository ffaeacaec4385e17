"""Test set-up shared by the whole suite.

Two facts about the CPU machines this suite runs on:

* Triton kernels run on CPU only through its interpreter, and ``TRITON_INTERPRET`` must be set
  before any ``@triton.jit`` function is defined, i.e. before ``mixreorg`` is imported.
* The only torchvision that pairs with torch 2.13.0 is a CUDA build. On CPU torch its C extension
  fails to load and the import crashes ("operator torchvision::nms does not exist"), which breaks
  ``import timm``: ``mixreorg._compat.make_torchvision_importable`` mends that.

Hypothesis profiles (registered here, before any test module builds its ``@settings``):

* ``ci`` (the default, so ``bash scripts/test.sh`` / ``.ci/run`` get it): 100 examples for every
  property test without its own ``max_examples``, no deadline (shared CPU runners), failing
  examples printed with their reproduction blob.
* ``dev``: 20 examples, for quick local runs: ``HYPOTHESIS_PROFILE=dev python -m pytest``.

``HYPOTHESIS_PROFILE`` picks one (``--hypothesis-profile`` on the command line wins over both); a
test's own ``@settings(max_examples=...)`` (the slow ones: Triton interpreter, model forwards)
keeps its count under any profile.
"""

from __future__ import annotations

import os

import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=100, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=20, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from mixreorg._compat import make_torchvision_importable  # noqa: E402

make_torchvision_importable()
