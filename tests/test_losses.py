"""Single-process properties of the contrastive losses (the distributed ones: test_distributed_losses)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixreorg.losses import ImageTextContrastiveLoss, MultiLabelContrastiveLoss, soft_cross_entropy, text_ids


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _naive_itc(img, txt, log_scale, labels=None):
    """Row-by-row CLIP loss with explicit targets (uniform over equal labels)."""
    s = min(math.exp(log_scale), 100.0)
    b = img.shape[0]
    total = 0.0
    for a, c in ((img, txt), (txt, img)):
        for i in range(b):
            logits = [s * float(a[i] @ c[j]) for j in range(b)]
            lse = math.log(sum(math.exp(v) for v in logits))
            pos = [j for j in range(b) if (j == i if labels is None else labels[j] == labels[i])]
            total += sum(-(logits[j] - lse) / len(pos) for j in pos) / b
    return total / 2


def _naive_mlc(img, prm, log_scale, labels=None):
    """GroupViT's multi-label loss written with loops."""
    s = min(math.exp(log_scale), 100.0)
    b, k, _ = prm.shape
    flat = [(j, c) for j in range(b) for c in range(k)]

    def is_pos(i, j, c):  # prompt (j, c) is a positive of image i
        return j == i if labels is None else labels[j][c] in labels[i]

    loss_img = 0.0
    for i in range(b):
        logits = [s * float(img[i] @ prm[j, c]) for j, c in flat]
        lse = math.log(sum(math.exp(v) for v in logits))
        pos = [n for n, (j, c) in enumerate(flat) if is_pos(i, j, c)]
        loss_img += sum(-(logits[n] - lse) / len(pos) for n in pos) / b
    loss_prm = 0.0
    for j, c in flat:
        logits = [s * float(prm[j, c] @ img[i]) for i in range(b)]
        lse = math.log(sum(math.exp(v) for v in logits))
        pos = [i for i in range(b) if is_pos(i, j, c)]
        loss_prm += sum(-(logits[i] - lse) / len(pos) for i in pos) / (b * k)
    return (loss_img + loss_prm) / 2


@settings(deadline=None)
@given(
    b=st.integers(1, 6),
    d=st.integers(2, 8),
    log_scale=st.floats(-1.0, 5.0),
    seed=st.integers(0, 1000),
    with_labels=st.booleans(),
)
def test_itc_matches_naive(b, d, log_scale, seed, with_labels):
    img, txt = _unit(b, d, seed=seed), _unit(b, d, seed=seed + 1)
    labels = torch.randint(0, 3, (b,), generator=torch.Generator().manual_seed(seed)) if with_labels else None
    got = ImageTextContrastiveLoss()(img, txt, torch.tensor(log_scale, dtype=torch.float64), labels)
    want = _naive_itc(img, txt, log_scale, None if labels is None else labels.tolist())
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


@settings(deadline=None)
@given(
    b=st.integers(1, 5),
    k=st.integers(1, 4),
    d=st.integers(2, 8),
    log_scale=st.floats(-1.0, 5.0),
    seed=st.integers(0, 1000),
    with_labels=st.booleans(),
)
def test_mlc_matches_naive(b, k, d, log_scale, seed, with_labels):
    img, prm = _unit(b, d, seed=seed), _unit(b, k, d, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (b, k), generator=g) if with_labels else None
    got = MultiLabelContrastiveLoss()(img, prm, log_scale, labels)
    want = _naive_mlc(img, prm, log_scale, None if labels is None else labels.tolist())
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_distinct_ids_equal_one_hot_targets():
    img, txt, prm = _unit(5, 6, seed=0), _unit(5, 6, seed=1), _unit(5, 3, 6, seed=2)
    itc, mlc = ImageTextContrastiveLoss(), MultiLabelContrastiveLoss()
    torch.testing.assert_close(itc(img, txt, 1.0, torch.arange(5) * 7), itc(img, txt, 1.0))
    torch.testing.assert_close(mlc(img, prm, 1.0, torch.arange(15).view(5, 3)), mlc(img, prm, 1.0))


def test_identical_captions_share_the_target():
    # rows 0 and 2 carry the same caption id: which of the two texts goes with which image no longer
    # matters for the multi-positive loss, but it does for the one-hot loss.
    img, txt = _unit(4, 6, seed=3), _unit(4, 6, seed=13)
    swapped = txt[[2, 1, 0, 3]]
    labels = torch.tensor([5, 1, 5, 2])
    itc = ImageTextContrastiveLoss()
    torch.testing.assert_close(itc(img, txt, 2.0, labels), itc(img, swapped, 2.0, labels))
    assert itc(img, txt, 2.0).item() != pytest.approx(itc(img, swapped, 2.0).item())
    prm = _unit(4, 3, 6, seed=14)
    plabels = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3], [7, 8, 9]])
    mlc = MultiLabelContrastiveLoss()
    torch.testing.assert_close(mlc(img, prm, 2.0, plabels), mlc(img, prm[[2, 1, 0, 3]], 2.0, plabels))
    assert mlc(img, prm, 2.0).item() != pytest.approx(mlc(img, prm[[2, 1, 0, 3]], 2.0).item())


def test_logit_scale_is_log_space_and_clamped_at_100():
    img, txt = _unit(4, 5, seed=4), _unit(4, 5, seed=5)
    loss = ImageTextContrastiveLoss()
    at_100 = loss(img, txt, math.log(100.0))
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)  # exp(10) >> 100
    clamped = loss(img, txt, s)
    clamped.backward()
    torch.testing.assert_close(clamped, at_100)
    assert s.grad.item() == 0.0
    assert ImageTextContrastiveLoss(max_logit_scale=200.0)(img, txt, 10.0) != pytest.approx(at_100.item())


def test_normalize_option():
    g = torch.Generator().manual_seed(6)
    img, txt = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    prm = torch.randn(4, 2, 5, generator=g)
    torch.testing.assert_close(
        ImageTextContrastiveLoss(normalize=True)(img, txt, 2.0),
        ImageTextContrastiveLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), 2.0),
    )
    torch.testing.assert_close(
        MultiLabelContrastiveLoss(normalize=True)(img, prm, 2.0),
        MultiLabelContrastiveLoss()(F.normalize(img, dim=-1), F.normalize(prm, dim=-1), 2.0),
    )


def test_gradcheck():
    img = _unit(3, 4, seed=7).requires_grad_(True)
    prm = _unit(3, 2, 4, seed=8).requires_grad_(True)
    txt = _unit(3, 4, seed=9).requires_grad_(True)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: ImageTextContrastiveLoss()(a, b, s), (img, txt, scale))
    assert torch.autograd.gradcheck(lambda a, b, s: MultiLabelContrastiveLoss()(a, b, s), (img, prm, scale))


def test_soft_cross_entropy_one_hot_is_cross_entropy():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(10))
    target = torch.tensor([0, 3, 6, 2, 2])
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(target, 7).bool()), F.cross_entropy(logits, target))


def test_text_ids_stable_and_equal_for_equal_strings():
    ids = text_ids(["a photo of a cat.", "a dog", "a photo of a cat."])
    assert ids.dtype == torch.long and ids[0] == ids[2] and ids[0] != ids[1] and (ids >= 0).all()
    # blake2b is the same in every process (Python's hash() is not): pin one value
    assert text_ids(["a dog"]).item() == ids[1].item() == 7182415866560184703
    with pytest.raises(ValueError, match="strings"):
        text_ids(["a", 3])  # type: ignore[list-item]


def test_bad_input_errors():
    img, txt = _unit(4, 5, seed=11), _unit(4, 5, seed=12)
    itc, mlc = ImageTextContrastiveLoss(), MultiLabelContrastiveLoss()
    with pytest.raises(ValueError, match="same shape"):
        itc(img, txt[:3], 1.0)
    with pytest.raises(ValueError, match="labels"):
        itc(img, txt, 1.0, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        itc(img, txt, 1.0, torch.zeros(4))
    with pytest.raises(ValueError, match="scalar"):
        itc(img, txt, torch.ones(2))
    with pytest.raises(ValueError, match="empty"):
        itc(img[:0], txt[:0], 1.0)
    with pytest.raises(ValueError, match=r"\[B, K, D\]"):
        mlc(img, txt, 1.0)
    with pytest.raises(ValueError, match="prompt_embed"):
        mlc(img, _unit(3, 2, 5, seed=0), 1.0)
    with pytest.raises(ValueError, match="prompt_labels"):
        mlc(img, _unit(4, 2, 5, seed=0), 1.0, torch.zeros(4, 3, dtype=torch.long))
