"""grounded_seg_loss and grounded_patch_loss: the caption-grounded terms, against a loop reference;
their gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixreorg.losses import ContrastiveObjective
from mixreorg.losses.grounded import grounded_mixed_loss, grounded_patch_loss, grounded_seg_loss


def _unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def _inputs(b, h, f, s, k, d, seed, min_nouns=0):
    gen = torch.Generator().manual_seed(seed)
    patch = _unit(b, h * h, d, gen=gen)
    seg = _unit(b, s, d, gen=gen)
    owner = torch.randint(0, s, (b, (h * f) ** 2), generator=gen)
    assign = F.one_hot(owner, s).transpose(1, 2).double()  # [B, S, N]
    prompts = _unit(b, k, d, gen=gen)
    mask = torch.rand(b, k, generator=gen) < 0.7
    mask[:, :min_nouns] = True
    return patch, seg, assign, prompts, mask


def _reference(patch, seg, assign, prompts, mask, scale, ids=None):
    """One image, one position at a time, in float64 (``ids``: the batch scope)."""
    b, hh, _ = patch.shape
    h, n = round(hh**0.5), assign.shape[2]
    big = round(n**0.5)
    f = big // h
    total, count = 0.0, 0
    for i in range(b):
        nouns = [j for j in range(prompts.shape[1]) if mask[i, j]]
        if len(nouns) < 2:
            continue
        acc = 0.0
        for pos in range(n):
            r, c = divmod(pos, big)
            p = (r // f) * h + c // f  # the patch covering this grouped position
            target = torch.softmax(torch.stack([scale * patch[i, p] @ prompts[i, j] for j in nouns]), 0)
            s = int(assign[i, :, pos].argmax())
            if ids is None:
                logp = torch.log_softmax(torch.stack([scale * seg[i, s] @ prompts[i, j] for j in nouns]), 0)
                acc += -(target * logp).sum()
                continue
            every = [(a, j) for a in range(b) for j in range(prompts.shape[1]) if mask[a, j]]
            logp = torch.log_softmax(torch.stack([scale * seg[i, s] @ prompts[a, j] for a, j in every]), 0)
            for t, j in zip(target, nouns):  # own prompt j's mass, shared by the prompts with its id
                same = [m for m, (a, jj) in enumerate(every) if ids[a, jj] == ids[i, j]]
                acc += -(t * logp[same]).sum() / len(same)
        total += acc / n
        count += 1
    return torch.as_tensor(total / max(count, 1), dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), f=st.sampled_from([1, 2]), s=st.integers(1, 4),
    k=st.integers(1, 5), seed=st.integers(0, 10_000), scale=st.sampled_from([1.0, 14.0]),
)
def test_matches_the_loop_reference(b, h, f, s, k, seed, scale):
    inputs = _inputs(b, h, f, s, k, 8, seed)
    got = grounded_seg_loss(*inputs, scale)
    torch.testing.assert_close(got.double(), _reference(*inputs, scale), rtol=1e-5, atol=1e-6)
    ids = torch.randint(0, 3, (b, k), generator=torch.Generator().manual_seed(seed))  # shared keys too
    for scope in ("batch", "noun"):  # "noun": the same sharing, by head-noun ids
        got = grounded_seg_loss(*inputs, scale, scope=scope, prompt_ids=ids)
        torch.testing.assert_close(got.double(), _reference(*inputs, scale, ids=ids), rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), k=st.integers(1, 5), seed=st.integers(0, 10_000),
       scope=st.sampled_from(["batch", "noun"]))
def test_patch_term_is_the_segment_term_with_every_patch_its_own_segment(b, h, k, seed, scope):
    patch, _, _, prompts, mask = _inputs(b, h, 1, 1, k, 8, seed)
    ids = torch.randint(0, 3, (b, k), generator=torch.Generator().manual_seed(seed))
    own = torch.eye(h * h, dtype=torch.float64).expand(b, -1, -1)  # segment l = patch l
    want = grounded_seg_loss(patch, patch, own, prompts, mask, 7.0, scope=scope, prompt_ids=ids)
    got = grounded_patch_loss(patch, prompts, mask, 7.0, scope=scope, prompt_ids=ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_patch_term_teaches_the_patches_and_prompts_and_refuses_the_image_scope():
    patch, _, _, prompts, mask = _inputs(3, 2, 1, 1, 5, 16, seed=4, min_nouns=2)
    ids = torch.tensor([[0, 1, 2, 3, 4], [0, 2, 5, 6, 7], [1, 2, 8, 9, 3]])
    patch.requires_grad_(True)
    prompts.requires_grad_(True)
    grounded_patch_loss(patch, prompts, mask, 10.0, scope="noun", prompt_ids=ids).backward()
    assert patch.grad.abs().sum() > 0 and prompts.grad.abs().sum() > 0
    assert not prompts.grad[~mask].any()
    with pytest.raises(ValueError, match="own teacher"):
        grounded_patch_loss(patch, prompts, mask, 10.0, scope="image")
    with pytest.raises(ValueError, match="needs prompt_ids"):
        grounded_patch_loss(patch, prompts, mask, 10.0, scope="noun")
    with pytest.raises(ValueError, match="prompt_mask"):
        grounded_patch_loss(patch, prompts, mask[:, :2], 10.0, scope="noun", prompt_ids=ids)
    with pytest.raises(ValueError, match="own teacher"):
        ContrastiveObjective(grounded_patch_weight=1.0)  # the default scope is "image"
    with pytest.raises(ValueError, match="grounded_patch_weight must be"):
        ContrastiveObjective(grounded_patch_weight=-1.0, grounded_seg_scope="noun")


def _mixed_reference(patch, seg, assign, src, prompts, mask, scale, ids):
    """Every mixed position alone: its source's teacher label at the same patch, shared by id."""
    b, hh, _ = patch.shape
    h, n = round(hh**0.5), assign.shape[2]
    f = round(n**0.5) // h
    every = [(a, j) for a in range(b) for j in range(prompts.shape[1]) if mask[a, j]]
    total, count = 0.0, 0
    for m in range(b):
        for pos in range(n):
            r, c = divmod(pos, h * f)
            p = (r // f) * h + c // f
            i = int(src[m, p])
            nouns = [j for j in range(prompts.shape[1]) if mask[i, j]]
            if len(nouns) < 2:
                continue
            target = torch.softmax(torch.stack([scale * patch[i, p] @ prompts[i, j] for j in nouns]), 0)
            s = int(assign[m, :, pos].argmax())
            logp = torch.log_softmax(torch.stack([scale * seg[m, s] @ prompts[a, j] for a, j in every]), 0)
            for t, j in zip(target, nouns):
                same = [q for q, (a, jj) in enumerate(every) if ids[a, jj] == ids[i, j]]
                total = total - (t * logp[same]).sum() / len(same)
            count += 1
    return torch.as_tensor(total / max(count, 1), dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), f=st.sampled_from([1, 2]), s=st.integers(1, 4),
       k=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_mixed_term_matches_the_loop_reference_and_is_the_segment_term_unmixed(b, h, f, s, k, seed):
    patch, seg, assign, prompts, mask = _inputs(b, h, f, s, k, 8, seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (b, k), generator=gen)
    src = torch.randint(0, b, (b, h * h), generator=gen)
    got = grounded_mixed_loss(patch, seg, assign, src, prompts, mask, 9.0, scope="noun", prompt_ids=ids)
    want = _mixed_reference(patch, seg, assign, src, prompts, mask, 9.0, ids)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    unmixed = torch.arange(b)[:, None].expand(b, h * h)
    torch.testing.assert_close(
        grounded_mixed_loss(patch, seg, assign, unmixed, prompts, mask, 9.0, scope="batch", prompt_ids=ids),
        grounded_seg_loss(patch, seg, assign, prompts, mask, 9.0, scope="batch", prompt_ids=ids),
        rtol=1e-6, atol=1e-6)  # both compute in float32, in another order


def test_mixed_term_bad_input_names_the_problem():
    patch, seg, assign, prompts, mask = _inputs(2, 2, 2, 3, 3, 8, seed=5)
    ids = torch.zeros(2, 3, dtype=torch.long)
    src = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no prompts of its own"):
        grounded_mixed_loss(patch, seg, assign, src, prompts, mask, 1.0, scope="image")
    with pytest.raises(ValueError, match="src must be int64"):
        grounded_mixed_loss(patch, seg, assign, src[:, :3], prompts, mask, 1.0, prompt_ids=ids)
    with pytest.raises(ValueError, match="src must be int64"):
        grounded_mixed_loss(patch, seg, assign, src.float(), prompts, mask, 1.0, prompt_ids=ids)


def test_confident_patch_term_teaches_only_confident_patches_on_the_allowed_prompts():
    """``teach_on`` / ``threshold``: a patch is taught, hard, only where its teacher's top prompt is
    allowed and above the threshold; the mean is over the patches taught (checked patch by patch)."""
    patch, _, _, prompts, mask = _inputs(3, 3, 1, 1, 4, 8, seed=6, min_nouns=3)
    ids = torch.tensor([[0, 1, 2, 3], [1, 0, 4, 5], [2, 3, 0, 1]])
    allowed = torch.tensor([[True, False, True, False], [False, True, True, True], [True, True, False, False]])
    scale, thr = 12.0, 0.4
    got = grounded_patch_loss(patch, prompts, mask, scale, scope="noun", prompt_ids=ids, teach_on=allowed,
                              threshold=thr)
    b, k = mask.shape
    every = [(a, j) for a in range(b) for j in range(k) if mask[a, j]]
    total, count = 0.0, 0
    for i in range(b):
        for p in range(patch.shape[1]):
            logits = (scale * prompts[i] @ patch[i, p]).masked_fill(~mask[i], -1e4)
            prob, best = logits.softmax(0).max(0)
            if not (prob > thr and allowed[i, best] and mask[i].sum() >= 2):
                continue
            logp = torch.log_softmax(torch.stack([scale * patch[i, p] @ prompts[a, j] for a, j in every]), 0)
            same = [q for q, (a, j) in enumerate(every) if ids[a, j] == ids[i, best]]
            total, count = total - logp[same].sum() / len(same), count + 1
    assert count > 0
    torch.testing.assert_close(got.double(), torch.as_tensor(total / count, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    nothing = torch.zeros_like(allowed)
    patch.requires_grad_(True)
    none = grounded_patch_loss(patch, prompts, mask, scale, scope="noun", prompt_ids=ids, teach_on=nothing)
    none.backward()
    assert none.item() == 0.0 and not patch.grad.any()
    with pytest.raises(ValueError, match="threshold must be"):
        grounded_patch_loss(patch, prompts, mask, scale, scope="noun", prompt_ids=ids, threshold=1.0)
    with pytest.raises(ValueError, match="teach_on must be"):
        grounded_patch_loss(patch, prompts, mask, scale, scope="noun", prompt_ids=ids, teach_on=allowed.long())


def test_gradients_reach_segments_map_and_prompts_not_the_teacher():
    patch, seg, assign, prompts, mask = _inputs(3, 2, 2, 4, 5, 16, seed=1, min_nouns=2)
    for t in (patch, seg, assign, prompts):
        t.requires_grad_(True)
    grounded_seg_loss(patch, seg, assign, prompts, mask, 10.0).backward()
    assert patch.grad is None or not patch.grad.any()  # the teacher's labels are constants
    for t in (seg, assign, prompts):
        assert t.grad is not None and t.grad.abs().sum() > 0
    # masked (caption filler) prompts neither teach nor learn
    assert not prompts.grad[~mask].any()


def test_splitting_what_the_teacher_tells_apart_lowers_the_loss():
    # two nouns, the left half of the patches shows the first, the right half the second
    d = 4
    nouns = torch.eye(d, dtype=torch.float64)[:2][None]  # [1, 2, D]
    patch = torch.zeros(1, 4, d, dtype=torch.float64)
    patch[0, [0, 2], 0] = 1.0
    patch[0, [1, 3], 1] = 1.0
    seg = torch.eye(d, dtype=torch.float64)[:2][None]  # segment 0 ~ noun 0, segment 1 ~ noun 1
    split = torch.tensor([[[1.0, 0, 1, 0], [0, 1, 0, 1]]], dtype=torch.float64)
    collapsed = torch.tensor([[[1.0, 1, 1, 1], [0, 0, 0, 0]]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert grounded_seg_loss(patch, seg, split, nouns, mask, 10.0) < grounded_seg_loss(
        patch, seg, collapsed, nouns, mask, 10.0) - 1.0


def test_images_naming_fewer_than_two_things_count_zero():
    patch, seg, assign, prompts, mask = _inputs(2, 2, 1, 3, 3, 8, seed=2)
    mask[:] = False
    mask[0, 0] = True
    seg.requires_grad_(True)
    loss = grounded_seg_loss(patch, seg, assign, prompts, mask, 10.0)
    loss.backward()
    assert loss.item() == 0.0 and not seg.grad.any()


def test_bad_input_names_the_problem():
    patch, seg, assign, prompts, mask = _inputs(2, 2, 2, 3, 3, 8, seed=3)
    with pytest.raises(ValueError, match="assign must be"):
        grounded_seg_loss(patch, seg, assign[:, :2], prompts, mask, 1.0)
    with pytest.raises(ValueError, match="prompt_mask"):
        grounded_seg_loss(patch, seg, assign, prompts, mask.long(), 1.0)
    with pytest.raises(ValueError, match="not a square"):
        grounded_seg_loss(patch[:, :3], seg, assign, prompts, mask, 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        grounded_seg_loss(patch, seg, assign[:, :, :9], prompts, mask, 1.0)
    with pytest.raises(ValueError, match="scope must be"):
        grounded_seg_loss(patch, seg, assign, prompts, mask, 1.0, scope="vocabulary")
    with pytest.raises(ValueError, match="needs prompt_ids"):
        grounded_seg_loss(patch, seg, assign, prompts, mask, 1.0, scope="batch")
    with pytest.raises(ValueError, match="sizes differ"):
        grounded_seg_loss(patch[:1], seg, assign, prompts, mask, 1.0)
    objective = ContrastiveObjective(grounded_seg_weight=1.0)
    img, txt = F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1)
    with pytest.raises(ValueError, match="missing: prompt_mask, seg_embed, assign"):
        objective(img, txt, logit_scale=torch.tensor(2.0), prompt_embed=prompts.float(), patch_embed=patch.float())
    with pytest.raises(ValueError, match="grounded_seg_weight must be"):
        ContrastiveObjective(grounded_seg_weight=-1.0)


@pytest.mark.parametrize("name", ["groupvit", "mixreorg"])
def test_the_grounded_term_trains_the_grouping_of_both_models(name):
    """One real batch (SynthShapes, the batch builder) through each trainer on ``tiny_grounded``: the
    term is logged, and alone it sends gradient into the grouping's assignment and the text tower."""
    from mixreorg.data.synthshapes import SynthShapesStream
    from mixreorg.recipes.config import apply_overrides, get_preset
    from mixreorg.recipes.data import BatchBuilder
    from mixreorg.recipes.models import build_model

    cfg = get_preset("tiny_grounded" if name == "groupvit" else "tiny_grounded_mixreorg")
    apply_overrides(cfg, ["train.cpu_bf16=off", "train.batch_size=8", "objective.grounded_patch_weight=1",
                          "objective.grounded_patch_on=phrases"])
    if name == "mixreorg":
        cfg.model.mixreorg = dict(group_size=4, mixed_grounded_weight=1.0)
    torch.manual_seed(0)
    model = build_model(cfg.validate())
    raw = next(iter(SynthShapesStream(8, seed=0, image_size=64)))
    batch = BatchBuilder(cfg, context_length=cfg.model.text["context_length"])(raw, step=0)
    assert batch["prompt_mask"].any(1).all() and not torch.equal(batch["prompt_heads"], batch["prompt_keys"])
    out = model.training_losses(batch)
    key = "grounded" if name == "groupvit" else "original/grounded"
    assert torch.isfinite(out["loss"]) and out[key] > 0 and out[key + "_patch"] > 0
    if name == "mixreorg":  # the mixed images named by their sources' nouns, into the grouping too
        assert out["mixed/grounded"] > 0
        out["mixed/grounded"].backward(retain_graph=True)
        assign = [p for n, p in model.named_parameters() if n.endswith("assign.q.weight")]
        assert assign and all(p.grad is not None and p.grad.abs().sum() > 0 for p in assign)
        model.zero_grad(set_to_none=True)
    out[key].backward()
    named = dict(model.named_parameters())
    assign = [p for n, p in named.items() if n.endswith("assign.q.weight")]
    text = [p for n, p in named.items() if ".text." in n and n.endswith("weight")]
    assert assign and all(p.grad is not None and p.grad.abs().sum() > 0 for p in assign)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in text)


def test_config_rejects_grounded_patch_settings_that_would_teach_nothing():
    from mixreorg.recipes.config import apply_overrides, get_preset

    def problems(*sets):
        with pytest.raises(ValueError) as info:
            apply_overrides(get_preset("tiny_grounded"), list(sets)).validate()
        return str(info.value)

    assert "own teacher" in problems("objective.grounded_patch_weight=1", "objective.grounded_seg_scope=image")
    assert "needs data.prompt_phrases" in problems("objective.grounded_patch_weight=1", "data.prompt_phrases=false",
                                                   "objective.grounded_patch_on=phrases")
    assert "must be all|phrases" in problems("objective.grounded_patch_on=nouns")
    assert "must be in [0, 1)" in problems("objective.grounded_patch_threshold=1.5")
    apply_overrides(get_preset("tiny_grounded"), ["objective.grounded_patch_weight=1",
                                                  "objective.grounded_patch_on=phrases"]).validate()
