"""The EMA teacher of the grounded terms: :class:`mixreorg.nn.ModelEma`, the ``teacher=`` argument
of the grounded losses, and the GroupViT trainer's ``objective.grounded_teacher=ema``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from mixreorg.losses import ContrastiveObjective
from mixreorg.losses.grounded import grounded_mixed_loss, grounded_patch_loss, grounded_seg_loss, teacher_labels
from mixreorg.nn import ModelEma


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@settings(max_examples=20, deadline=None)
@given(momentum=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_ema_follows_the_formula_and_copies_buffers(momentum, seed):
    student = _net(seed)
    ema = ModelEma(student, momentum)
    assert not any(p.requires_grad for p in ema.parameters())
    before = {n: p.clone() for n, p in ema.module.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.add_(1.0)
    ema.update(student)
    for n, p in student.named_parameters():
        want = before[n] if momentum == 1.0 else momentum * before[n] + (1 - momentum) * p.detach()
        torch.testing.assert_close(dict(ema.module.named_parameters())[n], want, rtol=1e-6, atol=1e-6)
    if momentum < 1.0:
        assert torch.equal(ema.module[1].running_mean, student[1].running_mean)
    ema.copy_from(student)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), student.state_dict().values()))


def test_ema_refuses_another_architecture_and_a_bad_momentum():
    ema = ModelEma(_net(0))
    with pytest.raises(ValueError, match="architecture"):
        ema.update(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="momentum must be in"):
        ModelEma(_net(0), 1.5)


def _batch(seed, b=3, h=2, k=4, d=8, s=3):
    gen = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)  # noqa: E731
    patch, seg, prompts = unit(b, h * h, d), unit(b, s, d), unit(b, k, d)
    assign = F.one_hot(torch.randint(0, s, (b, h * h), generator=gen), s).transpose(1, 2).double()
    mask = torch.ones(b, k, dtype=torch.bool)
    ids = torch.randint(0, 3, (b, k), generator=gen)
    src = torch.stack([torch.randperm(b, generator=gen) for _ in range(h * h)], 1)  # [B, L] a valid mix
    return patch, seg, assign, prompts, mask, ids, src, unit(b, h * h, d), unit(b, k, d)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
@example(seed=258)  # the loss moved by 1e-5 only: the old allclose check failed there
def test_a_teacher_equal_to_the_student_changes_nothing_and_another_changes_the_labels(seed):
    patch, seg, assign, prompts, mask, ids, src, t_patch, t_prompts = _batch(seed)
    terms = {
        "seg": lambda **kw: grounded_seg_loss(patch, seg, assign, prompts, mask, 3.0, scope="noun", prompt_ids=ids,
                                              **kw),
        "patch": lambda **kw: grounded_patch_loss(patch, prompts, mask, 3.0, scope="noun", prompt_ids=ids, **kw),
        "mixed": lambda **kw: grounded_mixed_loss(patch, seg, assign, src, prompts, mask, 3.0, scope="noun",
                                                  prompt_ids=ids, **kw),
    }
    labels = teacher_labels(t_patch, t_prompts, mask, 3.0)  # [B, L, K] the other teacher's labels
    for name, term in terms.items():
        assert torch.equal(term(), term(teacher=(patch.clone(), prompts.clone()))), name
        other = term(teacher=(t_patch, t_prompts))
        # another teacher's embeddings act through its labels alone, and they are not the student's
        # (how far the loss moves depends on the draw: with soft labels at scale 3 it can be 1e-5)
        torch.testing.assert_close(other, term(teacher=labels), rtol=1e-12, atol=1e-12, msg=name)
        assert not torch.equal(term(), other), name


def test_the_teacher_gets_no_gradient_and_frees_the_image_scope():
    patch, _, _, prompts, mask, ids, _, t_patch, t_prompts = _batch(0)
    patch.requires_grad_(True)
    t_patch.requires_grad_(True)
    with pytest.raises(ValueError, match="own teacher"):
        grounded_patch_loss(patch, prompts, mask, 3.0, scope="image")
    loss = grounded_patch_loss(patch, prompts, mask, 3.0, scope="image", teacher=(t_patch, t_prompts))
    loss.backward()
    assert patch.grad.abs().sum() > 0 and t_patch.grad is None
    with pytest.raises(ValueError, match="shaped as the student"):
        grounded_patch_loss(patch, prompts, mask, 3.0, scope="noun", prompt_ids=ids,
                            teacher=(t_patch[:, :1], t_prompts))


def test_objective_waits_for_the_teacher_and_refuses_one_it_does_not_expect():
    patch, seg, assign, prompts, mask, ids, _, t_patch, t_prompts = _batch(1)
    img, txt = (F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1) for _ in range(2))
    kw = dict(logit_scale=torch.tensor(2.0), prompt_embed=prompts, patch_embed=patch, seg_embed=seg, assign=assign,
              prompt_mask=mask, prompt_keys=ids, prompt_heads=ids)
    ema = ContrastiveObjective(grounded_seg_weight=1.0, grounded_patch_weight=1.0, grounded_seg_scope="noun",
                               grounded_teacher="ema")
    waiting = ema(img, txt, **kw)
    assert "grounded_patch" not in waiting and "grounded" in waiting
    taught = ema(img, txt, teacher_patch_embed=t_patch, teacher_prompt_embed=t_prompts, **kw)
    assert "grounded_patch" in taught and not torch.allclose(taught["grounded"], waiting["grounded"])
    selfish = ContrastiveObjective(grounded_seg_weight=1.0, grounded_seg_scope="noun")
    with pytest.raises(ValueError, match="grounded_teacher='self'"):
        selfish(img, txt, teacher_patch_embed=t_patch, teacher_prompt_embed=t_prompts, **kw)
    with pytest.raises(ValueError, match="go together"):
        ema(img, txt, teacher_patch_embed=t_patch, **kw)
    with pytest.raises(ValueError, match="grounded_teacher must be one of"):
        ContrastiveObjective(grounded_teacher="mean")


def _trainer(*sets):
    from mixreorg.recipes.config import apply_overrides, get_preset
    from mixreorg.recipes.models import build_model

    cfg = apply_overrides(get_preset("tiny_grounded"), ["train.cpu_bf16=off", "train.batch_size=8",
                                                        "objective.grounded_patch_weight=1",
                                                        "objective.grounded_teacher=ema", *sets])
    torch.manual_seed(0)
    return cfg, build_model(cfg.validate())


def test_trainer_copies_the_teacher_at_its_start_step_then_follows_the_student():
    """Real batches of the stream: no patch term before ``grounded_teacher_start``; at it the copy
    equals the student; with momentum 1 it stays frozen while the student trains; the teacher and
    the step count are in the state dict, so a checkpoint restores them."""
    from mixreorg.data.synthshapes import SynthShapesStream
    from mixreorg.recipes.data import BatchBuilder

    cfg, model = _trainer("objective.grounded_teacher_start=1", "objective.grounded_teacher_momentum=1.0")
    builder = BatchBuilder(cfg, context_length=cfg.model.text["context_length"])
    stream = iter(SynthShapesStream(8, seed=0, image_size=64))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    logs, snapshots = [], []
    for step in range(3):
        out = model.training_losses(builder(next(stream), step))
        logs.append(out)
        snapshots.append({n: p.detach().clone() for n, p in model.teacher.module.named_parameters()})
        if step == 1:
            student = dict(model.groupvit.named_parameters())
            assert all(torch.equal(p, student[n]) for n, p in snapshots[1].items())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert "grounded_patch" not in logs[0] and logs[1]["grounded_patch"] > 0 and logs[2]["grounded_patch"] > 0
    assert all(torch.equal(p, snapshots[1][n]) for n, p in snapshots[2].items())  # frozen
    assert not all(torch.equal(p, dict(model.groupvit.named_parameters())[n]) for n, p in snapshots[2].items())
    state = model.state_dict()
    assert int(state["steps"]) == 3 and any(k.startswith("teacher.module.") for k in state)
    _, fresh = _trainer("objective.grounded_teacher_start=1", "objective.grounded_teacher_momentum=1.0")
    fresh.load_state_dict(state)
    assert int(fresh.steps) == 3 and torch.equal(fresh.teacher.module.logit_scale, model.teacher.module.logit_scale)


def test_trainer_without_the_teacher_keeps_its_state_dict():
    from mixreorg.recipes.config import get_preset
    from mixreorg.recipes.models import build_model

    model = build_model(get_preset("tiny_grounded").validate())
    assert model.teacher is None and not any(k.startswith("teacher") or k == "steps" for k in model.state_dict())


def test_config_names_bad_teacher_settings():
    from mixreorg.recipes.config import apply_overrides, get_preset

    def problems(*sets):
        with pytest.raises(ValueError) as info:
            apply_overrides(get_preset("tiny_grounded"), list(sets)).validate()
        return str(info.value)

    assert "must be self|ema|oracle" in problems("objective.grounded_teacher=mean")
    assert "groupvit|groupvit_plus only" in problems("objective.grounded_teacher=ema", "model.name=mixreorg")
    assert "grounded_teacher_start must be" in problems("objective.grounded_teacher_start=-1")
    assert "grounded_teacher_momentum must be" in problems("objective.grounded_teacher_momentum=1.5")


def _vocab_reference(patch, prompts, mask, vocab, ids, scale):
    """The patch term with a restricted student vocabulary, one patch at a time in float64."""
    b, length, _ = patch.shape
    total, count = 0.0, 0
    for i in range(b):
        own = [j for j in range(prompts.shape[1]) if mask[i, j]]
        if len(own) < 2:
            continue
        every = [(a, j) for a in range(b) for j in range(prompts.shape[1]) if mask[a, j] and vocab[a, j]]
        acc = 0.0
        if not every:  # no student prompt: nothing is taught, the image still counts (zero)
            total, count = total, count + 1
            continue
        for p in range(length):
            target = torch.softmax(torch.stack([scale * patch[i, p] @ prompts[i, j] for j in own]), 0)
            logp = torch.log_softmax(torch.stack([scale * patch[i, p] @ prompts[a, j] for a, j in every]), 0)
            for t, j in zip(target, own):
                same = [m for m, (a, jj) in enumerate(every) if ids[a, jj] == ids[i, j]]
                if same:
                    acc += -(t * logp[same]).sum() / len(same)
        total += acc / length
        count += 1
    return torch.as_tensor(total / max(count, 1), dtype=torch.float64)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), k=st.integers(2, 5))
def test_a_restricted_vocabulary_matches_the_loop_reference(seed, b, k):
    patch, _, _, prompts, mask, ids, _, _, _ = _batch(seed, b=b, k=k)
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(b, k, generator=gen) < 0.8
    vocab = torch.rand(b, k, generator=gen) < 0.5
    got = grounded_patch_loss(patch, prompts, mask, 2.5, scope="noun", prompt_ids=ids, vocab_mask=vocab)
    # the students' logits are float32 (also for float64 inputs)
    torch.testing.assert_close(got.double(), _vocab_reference(patch, prompts, mask, vocab, ids, 2.5),
                               rtol=1e-5, atol=1e-5)
    every = torch.ones_like(mask)
    assert torch.equal(grounded_patch_loss(patch, prompts, mask, 2.5, scope="noun", prompt_ids=ids, vocab_mask=every),
                       grounded_patch_loss(patch, prompts, mask, 2.5, scope="noun", prompt_ids=ids))


def test_vocabulary_of_bare_nouns_from_the_objective_and_its_errors():
    patch, seg, assign, prompts, mask, ids, _, _, _ = _batch(2)
    with pytest.raises(ValueError, match="vocab_mask needs scope"):
        grounded_seg_loss(patch, seg, assign, prompts, mask, 3.0, vocab_mask=mask)
    with pytest.raises(ValueError, match="vocab_mask must be a bool"):
        grounded_seg_loss(patch, seg, assign, prompts, mask, 3.0, scope="noun", prompt_ids=ids, vocab_mask=mask[:, :1])
    with pytest.raises(ValueError, match="needs grounded_seg_scope='noun'"):
        ContrastiveObjective(grounded_seg_weight=1.0, grounded_seg_scope="batch", grounded_vocab="nouns")
    objective = ContrastiveObjective(grounded_seg_weight=1.0, grounded_seg_scope="noun", grounded_vocab="nouns")
    keys = torch.tensor([[5, 7, 9], [7, 8, 5]])
    heads = torch.tensor([[5, 5, 9], [7, 9, 5]])  # (0, 1) and (1, 1) are phrases of nouns 5 and 9
    full = torch.ones(2, 3, dtype=torch.bool)
    assert objective.grounded_vocab_mask(keys, heads, full).tolist() == [[True, False, True], [True, False, True]]
    assert ContrastiveObjective().grounded_vocab_mask(keys, heads, full) is None


def test_oracle_labels_name_each_patch_by_the_prompts_of_its_majority_class():
    """The diagnostic teacher on a real batch: a patch's label sits on the prompts whose head noun
    is the class covering most of it, and it is zero where the caption does not name that class."""
    from mixreorg.data.synthshapes import SynthShapes, SynthShapesStream
    from mixreorg.recipes.data import BatchBuilder

    cfg, model = _trainer("objective.grounded_teacher=oracle")
    assert model.needs_masks and model.teacher is None
    raw = next(iter(SynthShapesStream(8, seed=0, image_size=64)))
    batch = BatchBuilder(cfg, context_length=cfg.model.text["context_length"], with_masks=True)(raw, step=0)
    labels = model.oracle_labels(batch, 8)  # [B, 64, K]
    names = list(SynthShapes.CLASS_NAMES)
    heads = batch["keys"]["prompt_head"]
    for i in range(8):
        for patch in range(64):
            r, c = divmod(patch, 8)
            block = raw["mask"][i, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].flatten()
            major = names[int(torch.bincount(block, minlength=len(names)).argmax())]
            named = [k for k, h in enumerate(heads[i]) if h == major and batch["prompt_mask"][i, k]]
            want = torch.zeros(len(heads[i]))
            want[named] = 1.0 / max(len(named), 1)
            torch.testing.assert_close(labels[i, patch], want)
    assert labels.sum() > 0
    out = model.training_losses(batch)
    assert out["grounded_patch"] > 0 and out["grounded"] > 0
    with pytest.raises(ValueError, match="needs the batch's masks"):
        model.oracle_labels({k: v for k, v in batch.items() if k != "masks"}, 8)


def test_the_mixreorg_trainer_refuses_a_teacher_it_would_not_read():
    from mixreorg.nn.mixreorg import MixReorg
    from mixreorg.recipes.builders import build_groupvit
    from mixreorg.recipes.config import get_preset
    from mixreorg.recipes.mixreorg_trainer import MixReorgPretrainer

    cfg = get_preset("tiny")
    objective = ContrastiveObjective(grounded_seg_weight=1.0, grounded_seg_scope="noun", grounded_teacher="ema")
    with pytest.raises(ValueError, match="GroupViT trainer only"):
        MixReorgPretrainer(MixReorg(build_groupvit(cfg), {"group_size": 8}), objective)
