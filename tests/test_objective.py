"""ContrastiveObjective: its forms, key-based positives, the standalone terms it shares, autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixreorg.losses import (
    ContrastiveObjective,
    ImageTextContrastiveLoss,
    MixReorgLoss,
    MultiLabelContrastiveLoss,
    keys_to_ids,
    label_key_ids,
    similarity_logits,
)


def _embeds(b: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1))


def test_softmax_objective_equals_infonce_without_keys() -> None:
    img, txt = _embeds()
    scale = torch.tensor(math.log(10.0))
    obj = ContrastiveObjective("softmax", multi_positive=False, multi_label_weight=0.0)
    out = obj(img, txt, logit_scale=scale)
    ref = ImageTextContrastiveLoss()(img, txt, scale)
    torch.testing.assert_close(out["loss"], ref)


def test_sigmoid_objective_matches_formula_and_multi_positive() -> None:
    img, txt = _embeds()
    obj = ContrastiveObjective("sigmoid", multi_positive=True, multi_label_weight=0.0, bias_init=-3.0)
    keys = ["a", "b", "a", "c", "d", "b"]
    out = obj(img, txt, logit_scale=torch.tensor(math.log(5.0)), text_keys=keys)
    pos = torch.tensor([[ki == kj for kj in keys] for ki in keys])
    logits = 5.0 * img @ txt.t() - 3.0
    ref = -F.logsigmoid(torch.where(pos, logits, -logits)).sum() / 6
    torch.testing.assert_close(out["loss"], ref)
    # without keys only the diagonal is positive
    out1 = obj(img, txt, logit_scale=torch.tensor(math.log(5.0)))
    ref1 = -F.logsigmoid(torch.where(torch.eye(6, dtype=torch.bool), logits, -logits)).sum() / 6
    torch.testing.assert_close(out1["loss"], ref1)


def test_prompt_positives_follow_label_keys() -> None:
    img, _ = _embeds(3, 8)
    txt = img.clone()
    prompts = F.normalize(torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    pkeys = [["circle", "grass"], ["square", "cap1"], ["circle", "sky"]]
    labels = [["circle", "grass"], ["square", "cap1"], ["circle", "sky", "square"]]
    obj = ContrastiveObjective("sigmoid", multi_positive=False, multi_label_weight=1.0, bias_init=0.0)
    out = obj(img, txt, logit_scale=torch.tensor(0.0), prompt_embed=prompts, prompt_keys=pkeys, label_keys=labels)
    flat_keys = [k for p in pkeys for k in p]
    pos = torch.tensor([[k in set(lab) for k in flat_keys] for lab in labels])
    logits = img @ prompts.reshape(6, 8).t()
    ref = -F.logsigmoid(torch.where(pos, logits, -logits)).sum() / 3
    torch.testing.assert_close(out["ml"], ref)
    with pytest.raises(ValueError, match="prompt_embed"):
        obj(img, txt, logit_scale=torch.tensor(0.0))
    # the same keys as id tensors (what BatchBuilder hands in), label ids padded wider with -1
    ids = obj(img, txt, logit_scale=torch.tensor(0.0), prompt_embed=prompts,
              prompt_keys=keys_to_ids(flat_keys).view(3, 2), label_keys=label_key_ids(labels, width=8))
    torch.testing.assert_close(ids["ml"], ref)
    assert all(isinstance(ids[k], torch.Tensor) and ids[k].ndim == 0 for k in ("acc_i2t", "acc_t2i", "scale", "bias"))
    with pytest.raises(ValueError, match=r"label_keys must be integer ids \[B=3, M\]"):
        obj(img, txt, logit_scale=torch.tensor(0.0), prompt_embed=prompts, prompt_keys=pkeys,
            label_keys=torch.zeros(3, dtype=torch.long))


def test_objective_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="loss must be"):
        ContrastiveObjective("hinge")
    img, txt = _embeds()
    with pytest.raises(ValueError, match="same shape"):
        ContrastiveObjective()(img, txt[:3], logit_scale=0.0)


def test_softmax_objective_terms_are_the_standalone_losses_with_keys() -> None:
    img, txt = _embeds(6, 8)
    prompts = F.normalize(torch.randn(6, 2, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    keys = ["a", "b", "a", "c", "d", "b"]
    pkeys = [["circle", "x"], ["square", "y"], ["circle", "z"], ["ring", "x"], ["star", "w"], ["cross", "v"]]
    log_scale, ml_scale = torch.tensor(math.log(7.0)), torch.tensor(math.log(3.0))
    obj = ContrastiveObjective("softmax", multi_positive=True, multi_label_weight=0.5)
    out = obj(img, txt, logit_scale=log_scale, multi_label_scale=ml_scale, prompt_embed=prompts,
              text_keys=keys, prompt_keys=pkeys)
    itc = ImageTextContrastiveLoss()(img, txt, log_scale, labels=keys_to_ids(keys))
    ml = MultiLabelContrastiveLoss()(img, prompts, ml_scale, keys_to_ids([k for p in pkeys for k in p]).view(6, 2))
    torch.testing.assert_close(out["itc"], itc)
    torch.testing.assert_close(out["ml"], ml)
    torch.testing.assert_close(out["loss"], itc + 0.5 * ml)
    # the keys matter: without them the targets are one-hot and the losses differ
    plain = obj(img, txt, logit_scale=log_scale, multi_label_scale=ml_scale, prompt_embed=prompts)
    assert abs(float(plain["itc"]) - float(itc)) > 1e-3 and abs(float(plain["ml"]) - float(ml)) > 1e-3
    # integer id tensors are accepted in place of the keys
    ids = obj(img, txt, logit_scale=log_scale, multi_label_scale=ml_scale, prompt_embed=prompts,
              text_keys=keys_to_ids(keys), prompt_keys=keys_to_ids([k for p in pkeys for k in p]).view(6, 2))
    torch.testing.assert_close(ids["loss"], out["loss"])


def test_defaults_are_groupvits() -> None:
    obj = ContrastiveObjective()
    assert (obj.loss_form, obj.multi_positive, obj.multi_label_weight, obj.multi_label_pool) == (
        "softmax", False, 1.0, "image")
    assert obj.bias is None and obj.max_logit_scale == 100.0
    assert isinstance(MixReorgLoss().contrastive, ContrastiveObjective)


@pytest.mark.parametrize("form", ["softmax", "sigmoid"])
def test_logits_stay_fp32_under_bf16_autocast(form: str) -> None:
    img, txt = _embeds(16, 32, seed=3)
    prompts = F.normalize(torch.randn(16, 3, 32, generator=torch.Generator().manual_seed(4)), dim=-1)
    obj = ContrastiveObjective(form, multi_label_weight=1.0, bias_init=-2.0)
    kw = dict(logit_scale=torch.tensor(math.log(100.0)), prompt_embed=prompts)
    ref = obj(img, txt, **kw)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert similarity_logits(torch.tensor(100.0), img, txt).dtype == torch.float32
        got = obj(img, txt, **kw)
    assert got["loss"].dtype == torch.float32
    torch.testing.assert_close(got["loss"], ref, rtol=1e-6, atol=1e-6)
    # what a bf16 similarity would have given: visibly different, so the check above can fail
    bf = (100.0 * (img.bfloat16() @ txt.bfloat16().t())).float()
    assert (bf - 100.0 * img @ txt.t()).abs().max() > 1e-2


def test_rows_without_a_positive_are_left_out() -> None:
    from mixreorg.losses import soft_cross_entropy

    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    want = torch.stack([soft_cross_entropy(logits[0:1], pos[0:1]), soft_cross_entropy(logits[2:3], pos[2:3])]).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, pos), want)
    assert float(soft_cross_entropy(logits, torch.zeros_like(pos))) == 0.0


# ------------------------------------------------------------------ patch-level prompt term [R]
def _prompts(b: int = 6, k: int = 2, d: int = 8, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, k, d, generator=g), dim=-1)


def test_patch_label_term_scores_each_prompt_by_the_best_patch() -> None:
    """``patch_ml`` is the prompt loss with every image scored by its best patch, by hand; one patch
    equal to the image embedding gives back the pooled prompt loss exactly."""
    img, txt = _embeds()
    prompts = _prompts()
    g = torch.Generator().manual_seed(9)
    patches = F.normalize(torch.randn(6, 5, 8, generator=g), dim=-1)
    scale = torch.tensor(math.log(10.0))
    obj = ContrastiveObjective(multi_label_weight=1.0, patch_label_weight=0.5)
    out = obj(img, txt, logit_scale=scale, prompt_embed=prompts, patch_embed=patches)
    flat = prompts.reshape(-1, 8)
    logits = 10.0 * torch.einsum("bld,nd->bln", patches, flat).amax(1)  # [B, B*K]
    logits_t = 10.0 * torch.einsum("nd,bld->nbl", flat, patches).amax(2)  # [B*K, B]
    pos = torch.eye(6, dtype=torch.bool).repeat_interleave(2, dim=1)
    ref = 0.5 * (-(F.log_softmax(logits, -1) * pos / 2).sum(-1).mean()
                 - F.log_softmax(logits_t, -1)[pos.t()].mean())
    torch.testing.assert_close(out["patch_ml"], ref)
    torch.testing.assert_close(out["loss"], out["itc"] + out["ml"] + 0.5 * out["patch_ml"])
    same = obj(img, txt, logit_scale=scale, prompt_embed=prompts, patch_embed=img[:, None])
    torch.testing.assert_close(same["patch_ml"], same["ml"])


def test_patch_label_term_trains_the_patches_and_needs_them() -> None:
    img, txt = _embeds()
    patches = F.normalize(torch.randn(6, 4, 8), dim=-1).requires_grad_()
    obj = ContrastiveObjective(multi_label_weight=0.0, patch_label_weight=1.0)
    out = obj(img, txt, logit_scale=torch.tensor(2.0), prompt_embed=_prompts(), patch_embed=patches)
    out["loss"].backward()
    assert patches.grad is not None and patches.grad.abs().sum() > 0
    assert "ml" not in out  # the pooled prompt term is off; only the patch one runs
    with pytest.raises(ValueError, match="patch_label_weight > 0 needs patch_embed"):
        obj(img, txt, logit_scale=torch.tensor(2.0), prompt_embed=_prompts())
    with pytest.raises(ValueError, match="patch_embed"):
        obj(img, txt, logit_scale=torch.tensor(2.0), prompt_embed=_prompts(), patch_embed=patches[:3])
    with pytest.raises(ValueError, match="patch_label_weight must be >= 0"):
        ContrastiveObjective(patch_label_weight=-1.0)


def test_patch_mean_term_is_the_objective_of_the_mean_patch_embedding() -> None:
    """``patch_mean``: the caption + prompt losses of the normalised mean patch embedding, equal to a
    second objective run on that vector as the image embedding; it trains the patches and needs them."""
    img, txt = _embeds()
    prompts = _prompts()
    g = torch.Generator().manual_seed(11)
    patches = F.normalize(torch.randn(6, 5, 8, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(math.log(10.0))
    obj = ContrastiveObjective(multi_label_weight=0.7, patch_mean_weight=0.5)
    assert obj.reads_patches and not ContrastiveObjective().reads_patches
    out = obj(img, txt, logit_scale=scale, prompt_embed=prompts, patch_embed=patches)
    mean = F.normalize(patches.mean(1), dim=-1)
    ref = ContrastiveObjective(multi_label_weight=0.7)(mean, txt, logit_scale=scale, prompt_embed=prompts)
    torch.testing.assert_close(out["patch_mean"], ref["loss"])
    torch.testing.assert_close(out["loss"], out["itc"] + 0.7 * out["ml"] + 0.5 * out["patch_mean"])
    out["patch_mean"].backward()
    assert patches.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="patch_mean_weight > 0 needs patch_embed"):
        obj(img, txt, logit_scale=scale, prompt_embed=prompts)
    with pytest.raises(ValueError, match="patch_mean_weight must be >= 0"):
        ContrastiveObjective(patch_mean_weight=-0.1)


def test_prompt_uniformity_keeps_distinct_nouns_apart() -> None:
    """``prompt_uniformity_weight``: ``log mean exp(-2 |p_a - p_b|^2)`` over prompt pairs with
    different keys, by hand; prompts of one noun (one text) are not pushed apart; it needs the keys."""
    img, txt = _embeds(b=3)
    prompts = _prompts(b=3, k=2)
    keys = [["circle", "grass"], ["circle", "sky"], ["star", "grass"]]
    obj = ContrastiveObjective(multi_label_weight=0.0, prompt_uniformity_weight=0.25)
    out = obj(img, txt, logit_scale=torch.tensor(2.0), prompt_embed=prompts, prompt_keys=keys)
    flat, names = prompts.reshape(6, -1), [k for row in keys for k in row]
    terms = [torch.exp(-2 * (flat[a] - flat[b]).pow(2).sum()) for a in range(6) for b in range(6)
             if names[a] != names[b]]
    torch.testing.assert_close(out["uniformity"], torch.stack(terms).mean().log())
    torch.testing.assert_close(out["loss"], out["itc"] + 0.25 * out["uniformity"])
    one_key = prompts.clone().requires_grad_()
    same = obj(img, txt, logit_scale=torch.tensor(2.0), prompt_embed=one_key, prompt_keys=[["a", "a"]] * 3)
    torch.testing.assert_close(same["uniformity"], torch.zeros(()))  # no pair with different keys
    same["uniformity"].backward()
    assert torch.equal(one_key.grad, torch.zeros_like(one_key))  # finite and zero, not NaN
    with pytest.raises(ValueError, match="needs prompt_keys"):
        obj(img, txt, logit_scale=torch.tensor(2.0), prompt_embed=prompts)
    with pytest.raises(ValueError, match="prompt_uniformity_weight must be >= 0"):
        ContrastiveObjective(prompt_uniformity_weight=-0.1)
