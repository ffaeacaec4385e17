"""SynthShapes: determinism, class/colour independence, masks, captions, stream order and resume."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mixreorg.data import (
    SynthShapes,
    SynthShapesConfig,
    SynthShapesEval,
    SynthShapesStream,
    chance_miou,
    collate_samples,
)
from mixreorg.data.synthshapes import _RADIUS_TABLE2, _SHAPES
from mixreorg.metrics import ConfusionMatrix

N = 256


@pytest.fixture(scope="module")
def gen() -> SynthShapes:
    return SynthShapes()


@pytest.fixture(scope="module")
def batch(gen: SynthShapes) -> dict:
    return gen.generate_batch(np.arange(N), "train", seed=0)


def test_class_scheme() -> None:
    assert SynthShapes.CLASS_NAMES == SynthShapes.STUFF + SynthShapes.THINGS
    assert len(SynthShapes.STUFF) == 4 and len(SynthShapes.THINGS) == 6
    assert SynthShapes.NUM_CLASSES == 10 == len(set(SynthShapes.CLASS_NAMES))


def test_deterministic_and_batch_equals_single(gen: SynthShapes, batch: dict) -> None:
    again = gen.generate_batch(np.arange(N), "train", seed=0)
    assert np.array_equal(again["image"], batch["image"]) and np.array_equal(again["mask"], batch["mask"])
    assert again["caption"] == batch["caption"]
    # a sample does not depend on which batch it is rendered in
    for i in (0, 17, 255):
        one = gen.generate(i, "train", seed=0)
        assert np.array_equal(one["image"], batch["image"][i])
        assert np.array_equal(one["mask"], batch["mask"][i])
        assert one["caption"] == batch["caption"][i] and one["nouns"] == batch["nouns"][i]
    shuffled = gen.generate_batch([200, 3, 100], "train", seed=0)
    assert np.array_equal(shuffled["image"][1], batch["image"][3])
    other_seed = gen.generate_batch(np.arange(8), "train", seed=1)
    eval_split = gen.generate_batch(np.arange(8), "eval", seed=0)
    assert not np.array_equal(other_seed["image"], batch["image"][:8])
    assert not np.array_equal(eval_split["image"], batch["image"][:8])


def test_masks_and_labels(gen: SynthShapes, batch: dict) -> None:
    s = gen.config.image_size
    assert batch["image"].shape == (N, s, s, 3) and batch["image"].dtype == np.uint8
    assert batch["mask"].shape == (N, s, s) and batch["mask"].max() < 10
    for i in range(N):
        present = np.bincount(batch["mask"][i].ravel(), minlength=10) > 0
        assert np.array_equal(present, batch["labels"][i])
        stuff = np.flatnonzero(present[:4])
        assert len(stuff) == 1 and SynthShapes.STUFF[stuff[0]] == batch["background"][i]
        objs = batch["objects"][i]
        assert gen.config.min_objects <= len(objs) <= gen.config.max_objects
        # the thing classes in the mask are exactly the classes of the objects left visible
        visible = {o["class"] for o in objs if o["visible"] > 0}
        assert {SynthShapes.CLASS_NAMES[c] for c in np.flatnonzero(present[4:]) + 4} == visible
    counts = Counter(len(o) for o in batch["objects"])
    assert set(counts) == {1, 2, 3, 4}
    # sizes vary: the pixel area of single-object images spans a wide range
    areas = [int((batch["mask"][i] >= 4).sum()) for i in range(N) if len(batch["objects"][i]) == 1]
    assert max(areas) > 3 * min(areas)


def test_shape_defines_class_not_colour(batch: dict) -> None:
    pairs = [(o["class"], o["colour"]) for objs in batch["objects"] for o in objs]
    by_class: dict[str, Counter] = {}
    for cls, colour in pairs:
        by_class.setdefault(cls, Counter())[colour] += 1
    assert set(by_class) == set(SynthShapes.THINGS)
    for cls, colours in by_class.items():
        assert len(colours) >= 6, (cls, colours)  # every class appears in many colours
        assert max(colours.values()) / sum(colours.values()) < 0.4
    textures = Counter(o["texture"] for objs in batch["objects"] for o in objs)
    assert set(textures) == set(SynthShapes.TEXTURES)


def test_shape_tables_match_the_implicit_shapes() -> None:
    # the tabulated radius must reproduce each implicit shape on a fine grid (away from the boundary)
    g = np.linspace(-1.3, 1.3, 261)
    u, v = np.meshgrid(g, g)
    rho2 = u * u + v * v
    ang = np.mod(np.arctan2(v, u), 2 * np.pi)
    bins = (ang / (2 * np.pi) * _RADIUS_TABLE2.shape[1]).astype(int) % _RADIUS_TABLE2.shape[1]
    for c, fn in enumerate(_SHAPES):
        ref = fn(u, v)
        got = rho2 <= _RADIUS_TABLE2[c][bins]
        if fn.__name__ == "_ring":
            got &= rho2 >= 0.55**2
        assert (ref != got).mean() < 0.01, fn.__name__
    # the shapes are different from each other
    masks = [fn(u, v) for fn in _SHAPES]
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            assert (masks[a] != masks[b]).mean() > 0.03


def test_captions(gen: SynthShapes, batch: dict) -> None:
    colour_words = set(SynthShapes.COLOURS)
    forms = Counter()
    bg_named = 0
    for cap, nouns, objs, bg in zip(batch["caption"], batch["nouns"], batch["objects"], batch["background"]):
        assert cap.endswith(".") and cap == cap.strip()
        words = set(re.findall(r"[a-z]+", cap))
        named = [o for o in objs if o["named"]]
        assert named, cap
        for o in named:  # every named object appears with its colour
            assert o["class"] in words and o["colour"] in words
        assert nouns == list(dict.fromkeys([o["class"] for o in named] + ([bg] if bg in words else [])))
        assert set(nouns) <= set(SynthShapes.CLASS_NAMES)
        bg_named += bg in words
        assert not (words & set(SynthShapes.STUFF) - {bg})  # never names another background
        assert words & colour_words
        forms[re.sub(r"(an? \w+ \w+)(, an? \w+ \w+)*( and an? \w+ \w+)?", "X", cap).split(" ")[0]] += 1
    assert len(forms) >= 6, forms  # varied sentence forms
    assert 0.65 < bg_named / N < 0.92  # name_background_prob = 0.8
    omitted = sum(not o["named"] for objs in batch["objects"] for o in objs if o["visible"] >= 0.3)
    assert omitted > 0  # objects are sometimes left out of the caption


def test_caption_switches() -> None:
    plain = SynthShapes(caption_colours=False, name_background_prob=0.0, omit_prob=0.0)
    out = plain.generate_batch(np.arange(64))
    for cap, objs in zip(out["caption"], out["objects"]):
        words = set(re.findall(r"[a-z]+", cap))
        assert not words & set(SynthShapes.COLOURS) and not words & set(SynthShapes.STUFF)
        for o in objs:  # with omit_prob = 0 every well-visible object is named
            if o["visible"] >= plain.config.min_visible:
                assert o["named"]
    always = SynthShapes(name_background_prob=1.0, caption_textures=True).generate_batch(np.arange(64))
    assert all(bg in cap for bg, cap in zip(always["background"], always["caption"]))
    assert any("striped" in c or "dotted" in c for c in always["caption"])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_objects"):
        SynthShapesConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="omit_prob"):
        SynthShapesConfig(omit_prob=1.5)
    with pytest.raises(ValueError, match="split"):
        SynthShapes().generate(0, split="test")
    big = SynthShapes(image_size=96, max_objects=6).generate_batch(np.arange(4))
    assert big["image"].shape == (4, 96, 96, 3)


def test_eval_split_is_fixed() -> None:
    a = SynthShapesEval(6)
    b = SynthShapesEval(6)
    s0, s1 = a[2], b[2]
    assert torch.equal(s0["image"], s1["image"]) and torch.equal(s0["mask"], s1["mask"])
    assert s0["image"].shape == (3, 64, 64) and s0["image"].dtype == torch.float32
    assert s0["mask"].dtype == torch.long and s0["labels"].shape == (10,)
    assert abs(float(s0["image"].mean())) < 3  # normalised
    items = a.__getitems__([0, 5])
    assert torch.equal(items[1]["image"], a[5]["image"]) and items[1]["name"] == a[5]["name"]
    with pytest.raises(IndexError):
        a[6]
    loader = DataLoader(a, batch_size=3, collate_fn=collate_samples)  # noun lists vary in length
    first = next(iter(loader))
    assert first["image"].shape == (3, 3, 64, 64) and len(first["caption"]) == 3
    assert a.NUM_CLASSES == 10 and a.BACKGROUND_INDEX is None


def test_chance_miou_matches_a_confusion_matrix() -> None:
    ds = SynthShapesEval(64)
    res = chance_miou(ds)
    assert 0.0 < res["most_frequent"] < res["prior_random"] < 0.15
    assert abs(sum(res["class_freq"].values()) - 1.0) < 1e-9
    # most-frequent prediction scored through the metrics module gives the same number
    cm = ConfusionMatrix(10)
    top = SynthShapes.CLASS_NAMES.index(max(res["class_freq"], key=res["class_freq"].get))
    for i in range(len(ds)):
        m = torch.from_numpy(ds.raw(i)["mask"]).long()
        cm.update(torch.full_like(m, top), m)
    assert abs(cm.miou - res["most_frequent"]) < 1e-9
    # random-by-prior prediction approaches the analytic expectation
    rng = torch.Generator().manual_seed(0)
    prior = torch.tensor([res["class_freq"][n] for n in SynthShapes.CLASS_NAMES])
    cm.reset()
    for i in range(len(ds)):
        m = torch.from_numpy(ds.raw(i)["mask"]).long()
        pred = torch.multinomial(prior, m.numel(), replacement=True, generator=rng).view_as(m)
        cm.update(pred, m)
    assert abs(cm.miou - res["prior_random"]) < 0.01


def _take(stream: SynthShapesStream, n: int, num_workers: int = 0) -> list[list[int]]:
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    out = []
    for batch, _ in zip(loader, range(n)):
        stream.observe(batch)
        out.append(batch["index"].tolist())
    return out


def test_stream_batches_and_ranks() -> None:
    s = SynthShapesStream(4, seed=5)
    b = next(iter(s))
    assert b["image"].shape == (4, 3, 64, 64) and b["mask"].shape == (4, 64, 64)
    assert len(b["caption"]) == 4 and len(b["nouns"]) == 4 and b["labels"].shape == (4, 10)
    ref = SynthShapes().generate(2, "train", seed=5)
    assert b["caption"][2] == ref["caption"] and torch.equal(b["mask"][2], torch.from_numpy(ref["mask"]).long())
    r0 = _take(SynthShapesStream(4, rank=0, world_size=2), 3)
    r1 = _take(SynthShapesStream(4, rank=1, world_size=2), 3)
    assert r0 == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]
    assert r1 == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 23]]
    single = SynthShapesStream(None)
    it = iter(single)
    first = [next(it)["index"] for _ in range(3)]
    assert first == [0, 1, 2]


def test_stream_resume_is_exact_across_worker_counts() -> None:
    full = _take(SynthShapesStream(4, seed=2), 7)
    s = SynthShapesStream(4, seed=2)
    head = _take(s, 3, num_workers=2)
    state = s.state_dict()
    resumed = SynthShapesStream(4, seed=2)
    resumed.load_state_dict(state)
    tail = _take(resumed, 4, num_workers=0)
    assert head + tail == full
    assert resumed.stats["samples"] == 28
    with pytest.raises(ValueError, match="seed"):
        SynthShapesStream(4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        SynthShapesStream(8, seed=2).load_state_dict(state)
