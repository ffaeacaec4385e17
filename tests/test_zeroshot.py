"""Zero-shot inference: class embeddings, GroupViT's segmentation recipe, slide mode, classification.

The recipe itself is checked against a per-image, per-pixel loop transcription of GroupViT's
released ``encode_decode``; the model-level functions run a real (tiny, randomly initialised)
``mixreorg.nn.GroupViT`` and are checked against its own assignment-composition helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixreorg.nn import GroupViT, compose_assignments
from mixreorg.nn.groupvit import assignment_to_image
from mixreorg.text import IMAGENET_TEMPLATES_7, tokenize
from mixreorg.zeroshot import (
    check_class_names,
    class_embeddings,
    classify,
    segment,
    segment_from_features,
)

CLASSES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def model() -> GroupViT:
    torch.manual_seed(0)
    m = GroupViT(
        vision=dict(
            img_size=32, patch_size=8, embed_dim=32, num_heads=2, depths=(1, 1, 1),
            num_group_tokens=(8, 4, 0), num_output_groups=(8, 4), drop_path_rate=0.0,
        ),
        text=dict(width=32, layers=1, heads=2),
        proj_dim=16,
        proj_hidden=32,
    )  # fmt: skip
    # a few training steps' worth of BatchNorm statistics, so eval differs from train mode
    with torch.no_grad():
        m.train()
        for _ in range(3):
            m.encode_image(torch.randn(4, 3, 32, 32))
            m.encode_text(tokenize(["a red circle", "a blue square", "two stars", "a triangle"]))
    return m.train()


@pytest.fixture(scope="module")
def text(model) -> torch.Tensor:
    return class_embeddings(model, CLASSES)


def _images(b=2, h=48, w=40, seed=1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ class names / embeddings


def test_class_names_validation():
    assert check_class_names(("a", "b")) == ["a", "b"]
    with pytest.raises(ValueError, match="empty"):
        check_class_names([])
    with pytest.raises(ValueError, match=r"duplicated class names: \['cat'\]"):
        check_class_names(["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="duplicated.*'Dog'/'dog '"):
        check_class_names(["Dog", "cat", "dog "])
    with pytest.raises(ValueError, match="sequence of str"):
        check_class_names("cat")
    with pytest.raises(ValueError, match=r"class_names\[1\]"):
        check_class_names(["cat", ""])


def test_class_embeddings_match_manual_average(model):
    templates = IMAGENET_TEMPLATES_7[:3]
    got = class_embeddings(model, CLASSES, templates, batch_size=5)  # batches cut across classes
    assert got.shape == (4, 16) and torch.allclose(got.norm(dim=-1), torch.ones(4))
    assert model.training and model.text_proj.training  # modes restored
    model.eval()
    with torch.no_grad():
        for i, name in enumerate(CLASSES):
            emb = model.encode_text(tokenize([t.format(name) for t in templates]))
            torch.testing.assert_close(got[i], F.normalize(emb.mean(0), dim=0), rtol=1e-5, atol=1e-5)
    model.train()
    with pytest.raises(ValueError, match="duplicated"):
        class_embeddings(model, ["cat", "cat"])
    with pytest.raises(ValueError, match="empty"):
        class_embeddings(model, [])
    with pytest.raises(ValueError, match="placeholder"):
        class_embeddings(model, ["cat"], ["a photo"])


def test_long_class_name_is_truncated_not_refused(model):
    long = "very " * 100 + "long name"
    emb = class_embeddings(model, [long, "cat"])
    model.eval()
    with torch.no_grad():
        ids = tokenize("a photo of a " + long + ".")  # truncated, EOT kept
        want = model.encode_text(ids)[0]
    model.train()
    torch.testing.assert_close(emb[0], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the recipe


def _groupvit_reference(seg, img, maps, text, scale, bg_thresh, topk):
    """Loop transcription of GroupViT's encode_decode (one image, one-hot maps)."""
    out = []
    k = text.shape[0]
    for b in range(seg.shape[0]):
        group = seg[b] @ text.t() * scale  # [S, K]
        pre = group.softmax(-1)
        avg = (img[b] @ text.t() * scale).softmax(-1)
        mask = torch.zeros(k, dtype=torch.bool)
        mask[avg.topk(min(topk, k)).indices] = True
        aff = group.masked_fill(~mask, float("-inf")).softmax(-1) * pre
        onehot = F.one_hot(maps[b].argmax(0), maps.shape[1]).to(aff.dtype)  # [H, W, S]
        fg = (onehot @ aff).permute(2, 0, 1)  # [K, H, W]
        if bg_thresh is None:
            out.append(fg)
            continue
        logits = torch.zeros(k + 1, *fg.shape[1:])
        logits[1:] = fg
        thr = min(bg_thresh, aff.max().item())
        logits[0, fg.max(0).values < thr] = 1
        out.append(logits)
    return torch.stack(out)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    s=st.integers(1, 5),
    k=st.integers(1, 6),
    topk=st.integers(1, 7),
    bg=st.sampled_from([None, 0.0, 0.3, 0.95, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_recipe_matches_groupvit_loops(b, s, k, topk, bg, seed):
    g = torch.Generator().manual_seed(seed)
    d, h, w = 6, 5, 7
    seg = F.normalize(torch.randn(b, s, d, generator=g), dim=-1)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    maps = torch.rand(b, s, h, w, generator=g)
    scale = math.exp(float(torch.rand((), generator=g)) * 4)
    got = segment_from_features(seg, img, maps, text, scale, bg_thresh=bg, topk=topk)
    want = _groupvit_reference(seg, img, maps, text, scale, bg, topk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    onehot = F.one_hot(maps.argmax(1), s).permute(0, 3, 1, 2).float()
    soft_on_onehot = segment_from_features(seg, img, onehot, text, scale, bg_thresh=bg, topk=topk, hard=False)
    torch.testing.assert_close(soft_on_onehot, want, rtol=1e-5, atol=1e-6)


def test_recipe_on_a_known_layout():
    # two groups that ARE two of the classes; group 0 covers the left half, group 1 the right half
    text = torch.eye(4)  # 4 classes, orthogonal
    seg = text[[2, 0]].unsqueeze(0)  # [1, 2, 4]: group 0 = class 2, group 1 = class 0
    img = F.normalize(text[0] + text[2], dim=0).unsqueeze(0)  # image-level top-2: classes 0 and 2
    maps = torch.zeros(1, 2, 4, 6)
    maps[0, 0, :, :3] = 1
    maps[0, 1, :, 3:] = 1
    labels = segment_from_features(seg, img, maps, text, 100.0, topk=2).argmax(1)[0]
    assert (labels[:, :3] == 2).all() and (labels[:, 3:] == 0).all()
    # top-1 restriction keeps one class only (the image's best: 0 or 2, tied -> one of them)
    logits = segment_from_features(seg, img, maps, text, 100.0, topk=1)
    assert (logits.amax(dim=(2, 3)) > 0).sum() == 1
    # background: a threshold above every affinity turns nothing into background...
    with_bg = segment_from_features(seg, img, maps, text, 100.0, topk=2, bg_thresh=1.0)
    assert with_bg.shape == (1, 5, 4, 6) and with_bg[:, 0].sum() == 0
    # ...while a weak group (its affinity below the other one's) does become background
    seg_weak = torch.stack([text[2], F.normalize(text[0] + 0.6 * text[1], dim=0)]).unsqueeze(0)
    weak = segment_from_features(seg_weak, img, maps, text, 5.0, topk=4, bg_thresh=0.95).argmax(1)[0]
    assert (weak[:, 3:] == 0).all() and (weak[:, :3] == 3).all()  # class 2 is channel 3


def test_recipe_bad_input():
    seg, img, text, maps = torch.randn(1, 2, 3), torch.randn(1, 3), torch.randn(4, 3), torch.rand(1, 2, 4, 4)
    with pytest.raises(ValueError, match="topk"):
        segment_from_features(seg, img, maps, text, 1.0, topk=0)
    with pytest.raises(ValueError, match="bg_thresh"):
        segment_from_features(seg, img, maps, text, 1.0, bg_thresh=1.5)
    with pytest.raises(ValueError, match="maps"):
        segment_from_features(seg, img, maps[:, :1], text, 1.0)
    with pytest.raises(ValueError, match="dim"):
        segment_from_features(seg, img, maps, torch.randn(4, 5), 1.0)
    with pytest.raises(ValueError, match=r"\[K>0, D\]"):
        segment_from_features(seg, img, maps, torch.randn(0, 3), 1.0)


# ------------------------------------------------------------------ with a real GroupViT


def test_segment_whole_matches_model_helpers(model, text):
    x = _images()
    got = segment(model, x, text, bg_thresh=0.9, topk=3)
    assert got.shape == (2, 5, 48, 40) and not got.requires_grad
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        out = model.encode_image(x, return_maps=True)
        maps = assignment_to_image(compose_assignments(out["soft_maps"]), out["grid"], (48, 40))
        torch.testing.assert_close(maps, F.interpolate(
            (out["soft_maps"][1] @ out["soft_maps"][0]).reshape(2, 4, 6, 5), size=(48, 40), mode="bilinear"
        ))  # fmt: skip
        scale = model.logit_scale.exp().clamp(max=100)
        want = segment_from_features(out["seg_embed"], out["image_embed"], maps, text, scale, bg_thresh=0.9, topk=3)
    model.train()
    torch.testing.assert_close(got, want)
    # each image uses at most top-k classes; background is 0/1
    assert ((got[:, 1:].amax(dim=(2, 3)) > 0).sum(1) <= 3).all()
    assert set(got[:, 0].unique().tolist()) <= {0.0, 1.0}
    labels = segment(model, x, text, bg_thresh=0.9, topk=3, return_labels=True)
    assert labels.dtype == torch.long and torch.equal(labels, got.argmax(1))


def test_segment_is_per_image(model, text):
    x = _images(3, 32, 32, seed=2)
    batch = segment(model, x, text, topk=2)
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], segment(model, x[i : i + 1], text, topk=2))


def test_slide_mode(model, text):
    x = _images(2, 32, 48, seed=3)
    # one window covering the image: identical to whole mode
    torch.testing.assert_close(segment(model, x, text, mode="slide", crop_size=64, stride=32), segment(model, x, text))
    # windows at columns 0, 16 (stride 16, crop 32 on width 48): overlap averaged
    got = segment(model, x, text, mode="slide", crop_size=32, stride=16, bg_thresh=0.5, crop_batch=2)
    left = segment(model, x[..., :32], text, bg_thresh=0.5)
    right = segment(model, x[..., 16:], text, bg_thresh=0.5)
    want = torch.zeros_like(got)
    want[..., :16] = left[..., :16]
    want[..., 16:32] = (left[..., 16:] + right[..., :16]) / 2
    want[..., 32:] = right[..., 16:]
    torch.testing.assert_close(got, want)


def test_odd_sizes_and_short_side(model, text):
    x = _images(1, 45, 37, seed=4)
    got = segment(model, x, text)
    # padded bottom/right with zeros to 48x40 inside, and cropped back: the padded image's logits
    padded = segment(model, F.pad(x, (0, 3, 0, 3)), text)
    torch.testing.assert_close(got, padded[:, :, :45, :37])
    assert segment(model, x, text, mode="slide", crop_size=24, stride=16).shape == (1, 4, 45, 37)
    small = _images(1, 32, 40, seed=5)
    y = segment(model, small, text, short_side=64, bg_thresh=0.5)
    # short_side: segment the image resized to 64x80, then the logits resized back to 32x40
    big = F.interpolate(small, size=(64, 80), mode="bilinear", align_corners=False)
    want = F.interpolate(segment(model, big, text, bg_thresh=0.5), size=(32, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, want)


def test_classify(model, text):
    x = _images(3, 32, 32, seed=6)
    got = classify(model, x, text)
    assert got.shape == (3, 4)
    model.eval()
    with torch.no_grad():
        want = model.encode_image(x)["image_embed"] @ text.t() * model.logit_scale.exp().clamp(max=100)
    model.train()
    torch.testing.assert_close(got, want)


def test_segment_bad_input(model, text):
    x = _images(1, 32, 32)
    with pytest.raises(ValueError, match="mode"):
        segment(model, x, text, mode="tiles")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        segment(model, x[0], text)
    with pytest.raises(ValueError, match="dim"):
        segment(model, x, torch.randn(4, 7))
    with pytest.raises(ValueError, match="crop_size"):
        segment(model, x, text, mode="slide", crop_size=0)
    with pytest.raises(ValueError, match="short_side"):
        segment(model, x, text, short_side=-3)
