"""The grounded terms' hard "cam" teacher labels (``teacher_labels(labels="cam")``): against a loop
reference; unlabelled positions teach nothing in the segment, patch and mixed terms; the switch
through the objective and the config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixreorg.losses import ContrastiveObjective
from mixreorg.losses.grounded import grounded_mixed_loss, grounded_patch_loss, grounded_seg_loss, teacher_labels


def _unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def _cam_reference(patch, prompts, mask, threshold):
    """Image by image, prompt by prompt: min-max over the image's patches, best prompt, threshold."""
    b, length, _ = patch.shape
    out = torch.zeros(b, length, prompts.shape[1], dtype=torch.float64)
    for i in range(b):
        named = [j for j in range(prompts.shape[1]) if mask[i, j]]
        if not named:
            continue
        maps = {}
        for j in named:
            sim = torch.stack([patch[i, p] @ prompts[i, j] for p in range(length)])
            maps[j] = (sim - sim.min()) / max(float(sim.max() - sim.min()), 1e-6)
        for p in range(length):
            best = max(named, key=lambda j: (float(maps[j][p]), -j))  # first prompt on ties, as argmax
            if float(maps[best][p]) > threshold:
                out[i, p, best] = 1.0
    return out


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), length=st.integers(1, 9), k=st.integers(1, 5), seed=st.integers(0, 10_000),
       threshold=st.sampled_from([0.0, 0.5, 0.7, 0.9]))
def test_cam_labels_match_the_loop_reference(b, length, k, seed, threshold):
    gen = torch.Generator().manual_seed(seed)
    patch, prompts = _unit(b, length, 8, gen=gen), _unit(b, k, 8, gen=gen)
    mask = torch.rand(b, k, generator=gen) < 0.7
    got = teacher_labels(patch, prompts, mask, 14.0, "cam", threshold)
    torch.testing.assert_close(got.double(), _cam_reference(patch, prompts, mask, threshold))
    # every row one-hot or empty, never on a masked prompt; each named prompt claims its strongest patch
    assert set(got.sum(-1).unique().tolist()) <= {0.0, 1.0}
    assert not (got * ~mask[:, None, :]).any()


def test_cam_labels_keep_the_background_that_the_softmax_gives_to_the_object():
    """The point of the rule: an object's prompt that every patch is a little closer to than the
    background's prompt takes the whole image under the softmax; the activation maps, normalised
    over the image, give it only the patches where it is strongest."""
    obj, bg = torch.eye(3, dtype=torch.float64)[:2]
    prompts = torch.stack([obj, bg])[None]  # [1, 2, 3]: "red circle", "grass"
    background = F.normalize(0.8 * obj + 0.6 * bg, dim=0)  # closer to the object's prompt in absolute terms
    thing = F.normalize(1.0 * obj + 0.1 * bg, dim=0)
    patch = torch.stack([background] * 6 + [thing] * 2)[None]  # [1, 8, 3]
    mask = torch.ones(1, 2, dtype=torch.bool)
    soft = teacher_labels(patch, prompts, mask, 14.0, "soft")
    assert (soft.argmax(-1) == 0).all()  # the softmax calls every patch the object
    cam = teacher_labels(patch, prompts, mask, 14.0, "cam", 0.7)
    assert cam.argmax(-1).tolist() == [[1] * 6 + [0] * 2] and (cam.sum(-1) == 1).all()
    # the rule reads no logit scale
    torch.testing.assert_close(teacher_labels(patch, prompts, mask, 1.0, "cam", 0.7), cam)


def _seg_inputs(seed, b=2, h=2, f=2, s=3, k=4, d=8):
    gen = torch.Generator().manual_seed(seed)
    patch, seg = _unit(b, h * h, d, gen=gen), _unit(b, s, d, gen=gen)
    owner = torch.randint(0, s, (b, (h * f) ** 2), generator=gen)
    assign = F.one_hot(owner, s).transpose(1, 2).double()
    prompts = _unit(b, k, d, gen=gen)
    mask = torch.ones(b, k, dtype=torch.bool)
    return patch, seg, assign, prompts, mask


def test_cam_segment_term_is_the_hard_label_term_over_the_labelled_positions_only():
    patch, seg, assign, prompts, mask = _seg_inputs(3)
    labels = teacher_labels(patch, prompts, mask, 10.0, "cam", 0.5)  # [B, L, K]
    got = grounded_seg_loss(patch, seg, assign, prompts, mask, 10.0, labels="cam", cam_threshold=0.5)
    # reference: per image, the mean over the labelled grouped positions of -log p(teacher's prompt)
    big, h = 4, 2
    total, count = 0.0, 0
    for i in range(2):
        acc, n = 0.0, 0
        for pos in range(big * big):
            r, c = divmod(pos, big)
            p = (r // 2) * h + c // 2
            if labels[i, p].sum() == 0:
                continue
            s = int(assign[i, :, pos].argmax())
            logp = torch.log_softmax(10.0 * prompts[i] @ seg[i, s], 0)
            acc += -logp[int(labels[i, p].argmax())]
            n += 1
        if n:
            total, count = total + acc / n, count + 1
    torch.testing.assert_close(got.double(), torch.as_tensor(total / count, dtype=torch.float64))


def test_unlabelled_positions_teach_nothing():
    """With every patch below the threshold (a constant map), no term has a gradient."""
    b, k, d = 2, 3, 8
    gen = torch.Generator().manual_seed(1)
    prompts = _unit(b, k, d, gen=gen)
    patch = _unit(b, 1, d, gen=gen).expand(b, 4, d).clone().requires_grad_(True)  # one embedding: flat maps
    mask = torch.ones(b, k, dtype=torch.bool)
    ids = torch.arange(b * k).view(b, k)
    assert teacher_labels(patch, prompts, mask, 10.0, "cam", 0.0).sum() == 0
    loss = grounded_patch_loss(patch, prompts, mask, 10.0, scope="noun", prompt_ids=ids,
                               teacher=(patch.detach(), prompts), labels="cam", cam_threshold=0.0)
    assert float(loss.detach()) == 0.0
    seg = _unit(b, 2, d, gen=gen).requires_grad_(True)
    assign = F.one_hot(torch.zeros(b, 4, dtype=torch.long), 2).transpose(1, 2).double()
    loss = grounded_seg_loss(patch, seg, assign, prompts, mask, 10.0, labels="cam", cam_threshold=0.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not seg.grad.abs().any()
    src = torch.arange(b)[:, None].expand(b, 4).contiguous()
    loss = grounded_mixed_loss(patch, seg, assign, src, prompts, mask, 10.0, scope="noun", prompt_ids=ids,
                               labels="cam", cam_threshold=0.0)
    assert float(loss.detach()) == 0.0


def test_cam_mixed_term_counts_only_labelled_sources():
    """The mixed term with cam labels equals the same term with the unlabelled source patches' mixed
    positions dropped: moving an unlabelled position's segment changes nothing."""
    patch, seg, assign, prompts, mask = _seg_inputs(5, h=3, f=1, k=2)
    ids = torch.tensor([[0, 1], [1, 2]])
    src = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1, 0]])
    labels = teacher_labels(patch, prompts, mask, 10.0, "cam", 0.8)
    moved = labels[src, torch.arange(9)]  # [B, L, K]
    unlabelled = moved.sum(-1) == 0  # [B, L]
    assert unlabelled.any() and (~unlabelled).any(), "the seed must give both kinds of position"
    seg = seg.clone().requires_grad_(True)
    loss = grounded_mixed_loss(patch, seg, assign, src, prompts, mask, 10.0, scope="noun", prompt_ids=ids,
                               labels="cam", cam_threshold=0.8)
    loss.backward()
    owners = assign.argmax(1)  # [B, N] the segment of each position
    used = torch.zeros(2, seg.shape[1], dtype=torch.bool)
    for i in range(2):
        for n in range(9):
            if not unlabelled[i, n]:
                used[i, owners[i, n]] = True
    assert not seg.grad[~used].abs().any()  # segments owning only unlabelled positions get no gradient
    assert seg.grad[used].abs().sum() > 0


def test_soft_labels_are_the_softmax_over_the_image_prompts():
    gen = torch.Generator().manual_seed(2)
    patch, prompts = _unit(2, 5, 8, gen=gen), _unit(2, 3, 8, gen=gen)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    got = teacher_labels(patch, prompts, mask, 7.0)
    logits = (7.0 * torch.einsum("bld,bkd->blk", patch, prompts)).masked_fill(~mask[:, None, :], float("-inf"))
    torch.testing.assert_close(got.double(), logits.softmax(-1))


def test_bad_label_settings_name_the_problem():
    gen = torch.Generator().manual_seed(0)
    patch, prompts = _unit(1, 4, 8, gen=gen), _unit(1, 2, 8, gen=gen)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="labels must be one of"):
        teacher_labels(patch, prompts, mask, 1.0, "hard")
    with pytest.raises(ValueError, match="cam_threshold"):
        teacher_labels(patch, prompts, mask, 1.0, "cam", 1.0)
    with pytest.raises(ValueError, match="grounded_labels"):
        ContrastiveObjective("softmax", grounded_labels="argmax")
    with pytest.raises(ValueError, match="grounded_cam_threshold"):
        ContrastiveObjective("softmax", grounded_labels="cam", grounded_cam_threshold=-0.1)
    objective = ContrastiveObjective("softmax", grounded_seg_weight=1.0, grounded_labels="cam",
                                     grounded_cam_threshold=0.6)
    assert objective.grounded_label_kwargs == {"labels": "cam", "cam_threshold": 0.6}
    assert "grounded_labels='cam', grounded_cam_threshold=0.6" in repr(objective)


def test_config_validates_the_label_settings():
    from mixreorg.recipes.builders import build_objective
    from mixreorg.recipes.config import apply_overrides, get_preset

    def problems(*sets):
        with pytest.raises(ValueError) as info:
            apply_overrides(get_preset("tiny_grounded"), list(sets)).validate()
        return str(info.value)

    assert "grounded_labels must be soft|cam" in problems("objective.grounded_labels=hard")
    assert "grounded_cam_threshold must be in [0, 1)" in problems("objective.grounded_cam_threshold=1.5")
    cfg = apply_overrides(get_preset("tiny_grounded"), ["objective.grounded_labels=cam"]).validate()
    assert build_objective(cfg).grounded_label_kwargs == {"labels": "cam", "cam_threshold": 0.7}


def test_with_an_ema_teacher_the_rule_labels_the_teacher_and_the_student_keeps_soft_labels_before():
    """Before the EMA copy exists the segment term reads the student's own SOFT labels (hard labels
    from untrained patches taught the grouping noise); once it is passed, the cam rule labels it."""
    from mixreorg.losses.grounded import grounded_seg_loss as seg_loss

    gen = torch.Generator().manual_seed(4)
    b, k, d = 3, 3, 8
    patch, seg, t_patch = _unit(b, 4, d, gen=gen), _unit(b, 2, d, gen=gen), _unit(b, 4, d, gen=gen)
    assign = F.one_hot(torch.randint(0, 2, (b, 4), generator=gen), 2).transpose(1, 2).double()
    prompts, t_prompts = _unit(b, k, d, gen=gen), _unit(b, k, d, gen=gen)
    mask = torch.ones(b, k, dtype=torch.bool)
    ids = torch.arange(b * k).view(b, k) % 4
    img, txt = (F.normalize(torch.randn(b, d, dtype=torch.float64, generator=gen), dim=-1) for _ in range(2))
    kw = dict(logit_scale=torch.tensor(2.0), prompt_embed=prompts, patch_embed=patch, seg_embed=seg, assign=assign,
              prompt_mask=mask, prompt_keys=ids, prompt_heads=ids)
    ema = ContrastiveObjective(grounded_seg_weight=1.0, grounded_seg_scope="noun", grounded_teacher="ema",
                               grounded_labels="cam", grounded_cam_threshold=0.5)
    scale = float(torch.tensor(2.0).exp())
    common = dict(scope="noun", prompt_ids=ids)
    waiting = ema(img, txt, **kw)["grounded"]
    torch.testing.assert_close(waiting, seg_loss(patch, seg, assign, prompts, mask, scale, **common))
    taught = ema(img, txt, teacher_patch_embed=t_patch, teacher_prompt_embed=t_prompts, **kw)["grounded"]
    want = seg_loss(patch, seg, assign, prompts, mask, scale, teacher=(t_patch, t_prompts), labels="cam",
                    cam_threshold=0.5, **common)
    torch.testing.assert_close(taught, want)
    selfish = ContrastiveObjective(grounded_seg_weight=1.0, grounded_seg_scope="noun", grounded_labels="cam",
                                   grounded_cam_threshold=0.5)
    torch.testing.assert_close(selfish(img, txt, **kw)["grounded"],
                               seg_loss(patch, seg, assign, prompts, mask, scale, labels="cam", cam_threshold=0.5,
                                        **common))
