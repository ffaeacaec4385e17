"""BatchBuilder: what the trainer models read from one raw stream batch."""

from __future__ import annotations

import torch

from mixreorg.data.synthshapes import SynthShapes, SynthShapesStream
from mixreorg.losses import keys_to_ids
from mixreorg.recipes.config import apply_overrides, get_preset
from mixreorg.recipes.data import BatchBuilder
from mixreorg.text import noun_phrases, tokenize


def _cfg(*overrides: str):
    cfg = get_preset("tiny")
    apply_overrides(cfg, ["data.image_size=32", "data.num_prompts=3", *overrides])
    return cfg.validate()


def _raw(n: int = 6):
    return next(iter(SynthShapesStream(n, seed=0, image_size=32)))


def test_tokens_prompts_and_keys() -> None:
    raw = _raw()
    batch = BatchBuilder(_cfg(), context_length=32)(raw, step=0)
    b = len(raw["caption"])
    full = tokenize(list(raw["caption"]), context_length=32)  # [B, 32]
    t = batch["text"].shape[1]
    # trimmed to the longest caption: only padding is dropped, every EOT stays
    assert t < 32 and torch.equal(batch["text"], full[:, :t]) and (full[:, t:] == 0).all()
    assert batch["prompts"].shape[:2] == (b, 3) and batch["prompts"].shape[2] <= 32
    # tiny preset: caption keys are the set of nouns, so captions naming the same shapes share a key
    keys = batch["keys"]
    for cap, nouns, key in zip(raw["caption"], raw["nouns"], keys["text"]):
        assert key == (("nouns",) + tuple(sorted(set(nouns))) if nouns else ("caption", cap))
    for cap, nouns, pkeys, labels in zip(raw["caption"], raw["nouns"], keys["prompt"], keys["label"]):
        assert len(pkeys) == 3 and set(pkeys) <= set(nouns) | {cap}
        assert labels == list(dict.fromkeys(list(nouns) + [cap]))
    # what the objective reads: the same keys as int64 ids, label ids -1 padded to LABEL_WIDTH
    assert torch.equal(batch["text_keys"], keys_to_ids(keys["text"]))
    assert torch.equal(batch["prompt_keys"], keys_to_ids([k for p in keys["prompt"] for k in p]).view(b, 3))
    assert batch["label_keys"].shape == (b, BatchBuilder.LABEL_WIDTH)
    for row, labels in zip(batch["label_keys"], keys["label"]):
        assert torch.equal(row[: len(labels)], keys_to_ids(labels)) and (row[len(labels):] == -1).all()
    # identical token rows (and only they) share a caption key
    same_key = batch["caption_keys"][:, None] == batch["caption_keys"][None, :]
    assert torch.equal(same_key, (batch["text"][:, None] == batch["text"][None, :]).all(-1))
    assert "masks" not in batch and torch.equal(batch["images"], raw["image"])  # no augmentation here


def test_draws_depend_on_seed_step_and_rank_only() -> None:
    raw = _raw()
    a, b = BatchBuilder(_cfg(), 32, rank=0), BatchBuilder(_cfg(), 32, rank=0)
    assert torch.equal(a(raw, 7)["prompts"], b(raw, 7)["prompts"])  # a fresh builder: the same draw
    draws = {tuple(a(raw, s)["prompts"].flatten().tolist()) for s in range(6)}
    assert len(draws) > 1  # other steps, other prompts
    other_rank = BatchBuilder(_cfg(), 32, rank=1)(raw, 7)["prompts"]
    assert not torch.equal(other_rank, a(raw, 7)["prompts"])


def test_deit_augmentation_is_a_function_of_seed_step_rank() -> None:
    raw = _raw()
    cfg = _cfg("data.augment=deit")
    one, two = BatchBuilder(cfg, 32), BatchBuilder(cfg, 32)
    x = one(raw, 3)["images"]
    assert x.shape == raw["image"].shape and not torch.equal(x, raw["image"])
    assert torch.equal(x, two(raw, 3)["images"])
    assert not torch.equal(x, one(raw, 4)["images"])
    assert not torch.equal(x, BatchBuilder(cfg, 32, rank=1)(raw, 3)["images"])
    assert not torch.equal(x, BatchBuilder(_cfg("data.augment=deit", "data.seed=1"), 32)(raw, 3)["images"])


def test_masks_only_for_models_that_need_them_and_no_prompts_without_the_loss() -> None:
    raw = _raw()
    batch = BatchBuilder(_cfg("objective.multi_label_weight=0"), 32, with_masks=True)(raw, 0)
    assert torch.equal(batch["masks"], raw["mask"])
    assert not {"prompts", "prompt_keys", "label_keys"} & set(batch)


def test_prompt_phrases_add_the_modified_nouns_as_their_own_keys() -> None:
    raw = _raw(16)
    plain = BatchBuilder(_cfg("data.num_prompts=6"), 32)(raw, step=3)
    batch = BatchBuilder(_cfg("data.num_prompts=6", "data.prompt_phrases=true"), 32)(raw, step=3)
    seen_phrase = False
    keys = batch["keys"]
    rows = zip(raw["caption"], raw["nouns"], keys["prompt"], keys["label"], keys["prompt_head"])
    for cap, nouns, pkeys, labels, heads in rows:
        phrases = noun_phrases(cap, nouns)
        # SynthShapes names every shape with its colour: each named shape has a phrase, only they do
        assert {p.split()[-1] for p in phrases} == {n for n in nouns if n in SynthShapes.THINGS}
        assert labels == list(dict.fromkeys([*nouns, *phrases, cap]))
        assert set(pkeys) <= set(nouns) | set(phrases) | {cap}
        seen_phrase |= bool(set(pkeys) & set(phrases))
        # a phrase's head is the noun it modifies; a noun is its own head
        for key, head in zip(pkeys, heads):
            assert head == (key.split()[-1] if key in phrases else key)
    assert seen_phrase
    flat = [h for row in batch["keys"]["prompt_head"] for h in row]
    assert torch.equal(batch["prompt_heads"], keys_to_ids(flat).view_as(batch["prompt_keys"]))
    assert torch.equal(plain["prompt_heads"], plain["prompt_keys"])  # no phrases: every prompt is its own head
    # the caption keys stay the bare nouns: same colours or not, captions naming the same shapes agree
    assert batch["keys"]["text"] == plain["keys"]["text"]
    assert torch.equal(batch["text_keys"], plain["text_keys"])
