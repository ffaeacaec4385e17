"""The recipes' batch builder (captions and noun prompts -> token ids and key ids), side by side with
the optional-ftfy lookup cached (now) and repeated for every text (before: Python does not cache a
failed import, so each ``clean_text`` searched ``sys.path`` for ftfy again).

    python -m pytest benchmarks/bench_batch_builder.py --benchmark-enable

Cases: one training batch of the main job (``tiny_mixreorg``: 64 captions + 3 prompts each) and of
the supervised bound (``tiny_hybrid_supervised``: 32 captions + 3 prompts each), on real SynthShapes
batches. Baseline: ``lookup every text`` (the path as it was). Where ftfy is installed both are the
same: the module is then found in ``sys.modules`` at once.
"""

from __future__ import annotations

import pytest
import torch
from _report import record

from mixreorg.recipes.config import get_preset
from mixreorg.recipes.data import BatchBuilder, build_stream
from mixreorg.text import tokenizer

CASES = {"main job batch (tiny_mixreorg, B=64)": "tiny_mixreorg", "bound batch (tiny_hybrid_supervised, B=32)":
         "tiny_hybrid_supervised"}  # fmt: skip
IMPLS = ("lookup every text", "lookup once")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_batch_builder(benchmark, monkeypatch, case, impl):
    cfg = get_preset(CASES[case])
    raw = next(iter(build_stream(cfg, cfg.train.batch_size, 0, 1)))
    builder = BatchBuilder(cfg, cfg.model.text["context_length"], 0, with_masks=cfg.model.name == "supervised")
    expected = builder(raw, 0)
    if impl == "lookup every text":
        monkeypatch.setattr(tokenizer, "_ftfy_fix_text", tokenizer._ftfy_fix_text.__wrapped__)
    got = builder(raw, 0)
    assert torch.equal(got["text"], expected["text"]) and torch.equal(got["prompts"], expected["prompts"])
    benchmark(builder, raw, 0)
    record(benchmark, case=case, impl=impl, nbytes=0, baseline="lookup every text")
