"""The hybrid GroupViT backbone: a convolutional trunk under the GroupViT stages (``stem="hybrid"``) and
the first grouping on a finer grid than the transformer's (``group_patch_size``)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixreorg.losses import ContrastiveObjective, MixReorgLoss
from mixreorg.nn import GroupViT, MixReorg
from mixreorg.nn.stem import ConvTrunk, FineTokens
from mixreorg.nn.vision import GroupViTVisionEncoder
from mixreorg.zeroshot import segment

VISION = dict(
    img_size=32, patch_size=8, embed_dim=32, num_heads=2, depths=[1, 1], num_group_tokens=[4, 0],
    num_output_groups=[4], stem="hybrid", stem_widths=[8, 16, 32], stem_depths=[1, 2, 1], drop_path_rate=0.0,
)
TEXT = dict(context_length=8, width=32, layers=1, heads=2, vocab_size=100)


def tiny_groupvit(**vision) -> GroupViT:
    torch.manual_seed(0)
    return GroupViT({**VISION, **vision}, TEXT, proj_dim=16, proj_hidden=32, proj_layers=1)


def test_trunk_levels_and_strides():
    trunk = ConvTrunk(3, 24, widths=(8, 16, 32), depths=(1, 2, 2))
    x = torch.randn(2, 3, 32, 48)
    out, level = trunk(x, return_stride=4)
    assert trunk.stride == 8 and out.shape == (2, 24, 4, 6) and level.shape == (2, 16, 8, 12)
    torch.testing.assert_close(trunk(x), out, rtol=0, atol=0)
    assert trunk.level_channels(2) == 8
    with pytest.raises(ValueError, match="strides \\[2, 4, 8\\], not 16"):
        trunk(x, return_stride=16)
    with pytest.raises(ValueError, match="one value per level"):
        ConvTrunk(3, 24, widths=(8, 16), depths=(1,))


def test_residual_blocks_start_as_identity():
    # the last BatchNorm of every residual block starts at zero: extra depth changes nothing at init
    torch.manual_seed(0)
    a = ConvTrunk(3, 8, widths=(8, 8), depths=(1, 1)).eval()
    torch.manual_seed(0)
    b = ConvTrunk(3, 8, widths=(8, 8), depths=(1, 1)).eval()
    deep = ConvTrunk(3, 8, widths=(8, 8), depths=(3, 3)).eval()
    deep.levels[0][0].load_state_dict(a.levels[0][0].state_dict())
    deep.levels[1][0].load_state_dict(a.levels[1][0].state_dict())
    deep.proj.load_state_dict(a.proj.state_dict())
    x = torch.randn(2, 3, 16, 16).abs()  # ReLU of the identity block sees non-negative inputs
    torch.testing.assert_close(deep(x), b(x))


def test_full_strength_residual_init_changes_only_the_last_batchnorm():
    # stem_zero_init=False: the same random draws, every residual block's last BatchNorm at one
    # instead of zero, so the blocks are no longer the identity at initialisation
    torch.manual_seed(0)
    zero = GroupViTVisionEncoder(**VISION).eval()
    torch.manual_seed(0)
    full = GroupViTVisionEncoder(**{**VISION, "stem_zero_init": False}).eval()
    zs, fs = zero.state_dict(), full.state_dict()
    assert zs.keys() == fs.keys()
    bn2 = {k for k in zs if ".bn2.weight" in k}
    assert bn2, "the test's trunk has residual blocks"
    for k in zs:
        if k in bn2:
            assert torch.all(zs[k] == 0) and torch.all(fs[k] == 1), k
        else:
            torch.testing.assert_close(zs[k], fs[k], rtol=0, atol=0, msg=k)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(zero.patch_embed(x)[0], full.patch_embed(x)[0])
    # and it trains end to end: gradients reach the first convolution
    full.train()
    full(x)["tokens"].sum().backward()
    assert full.patch_embed.proj.levels[0][0][0].weight.grad.abs().sum() > 0


@settings(max_examples=36, deadline=None)
@given(h=st.integers(1, 3), w=st.integers(1, 3), f=st.sampled_from([2, 4]), c=st.sampled_from([4, 8]))
def test_fine_tokens_layout(h, w, f, c):
    """Fine token (y, x) of the fine grid = LN(proj(level))[y, x] + the coarse token of its patch."""
    torch.manual_seed(h * 100 + w * 10 + f)
    ft = FineTokens(in_ch=3, dim=c, factor=f)
    level = torch.randn(2, 3, h * f, w * f)
    x = torch.randn(2, h * w, c)
    out = ft(x, ft.skip(level), (h, w))  # [B, (h f)(w f), C]
    direct = ft.norm(ft.proj(level).permute(0, 2, 3, 1))  # [B, h f, w f, C]
    coarse = x.reshape(2, h, w, c).repeat_interleave(f, 1).repeat_interleave(f, 2)
    torch.testing.assert_close(out, (direct + coarse).reshape(2, -1, c), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit the grid"):
        ft(x, ft.skip(level), (h + 1, w))


def test_fine_grouping_encoder_shapes_and_gradients():
    enc = GroupViTVisionEncoder(**{**VISION, "group_patch_size": 4})
    x = torch.randn(3, 3, 32, 32)
    out = enc(x, return_maps=True)
    assert out["grid"] == (8, 8) and enc.fine_factor == 2
    assert [tuple(m.shape) for m in out["soft_maps"]] == [(3, 4, 64)]
    # every patch is owned by exactly one group; the soft map is a distribution over groups
    torch.testing.assert_close(out["hard_maps"][0].sum(1), torch.ones(3, 64))
    torch.testing.assert_close(out["soft_maps"][0].sum(1), torch.ones(3, 64))
    (out["pooled"].square().sum() + out["soft_maps"][0].square().sum()).backward()
    for name, p in enc.named_parameters():
        if name.startswith(("patch_embed.proj.levels.0", "fine_tokens", "stages.0.blocks")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # without the skip the fine grouping cannot run: the error names what is missing
    xe = enc.embed(x)
    g = enc.stages[0].init_group_tokens(3)
    with pytest.raises(ValueError, match="skip="):
        enc.forward_from_stage1_output(xe, g, grid=(4, 4))
    with pytest.raises(ValueError, match="groups a finer grid"):
        enc.forward_stage(0, xe)


def test_plain_encoder_unchanged_by_the_option():
    # group_patch_size == patch_size is the plain encoder: no extra module, maps on the token grid
    enc = GroupViTVisionEncoder(**{**VISION, "group_patch_size": 8})
    assert enc.fine_tokens is None and enc.fine_factor == 1
    assert enc(torch.randn(2, 3, 32, 32), return_maps=True)["soft_maps"][0].shape == (2, 4, 16)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(stem="patch", stem_widths=None, stem_depths=None, group_patch_size=4), "needs stem='hybrid'"),
        (dict(group_patch_size=3), "must divide patch_size"),
        (dict(group_patch_size=16), "must divide patch_size"),
        (dict(stem="conv", stem_depths=None), "configure stem='hybrid' only"),
        (dict(stem="patch", stem_widths=None, stem_depths=None, stem_zero_init=False), "configure stem='hybrid' only"),
        (dict(stem_widths=[8, 16]), "needs 3 stem_widths"),
        (dict(img_size=36, patch_size=6), "power-of-2 patch size"),
    ],
)
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        GroupViTVisionEncoder(**{**VISION, **kw})


@pytest.mark.parametrize("group_patch_size", [8, 4])
def test_zero_shot_path_and_checkpoint_round_trip(group_patch_size):
    gv = tiny_groupvit(group_patch_size=group_patch_size)
    # a few training-mode passes move the BatchNorm running statistics away from their init
    for _ in range(2):
        gv.encode_image(torch.randn(4, 3, 32, 32))
    gv.eval()
    images = torch.randn(2, 3, 32, 32)
    text = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    labels = segment(gv, images, text, topk=None, return_labels=True)
    logits = segment(gv, images, text, topk=None)
    assert labels.shape == (2, 32, 32) and logits.shape == (2, 5, 32, 32)
    torch.testing.assert_close(labels, logits.argmax(1))
    buf = io.BytesIO()
    torch.save(gv.state_dict(), buf)
    buf.seek(0)
    other = tiny_groupvit(group_patch_size=group_patch_size)
    other.load_state_dict(torch.load(buf))
    other.eval()
    torch.testing.assert_close(segment(other, images, text, topk=None), logits, rtol=0, atol=0)
    assert any(k.endswith("running_mean") for k in gv.state_dict())


def test_mixreorg_on_fine_grouping():
    gv = tiny_groupvit(group_patch_size=4)
    model = MixReorg(gv, dict(group_size=4))
    images = torch.randn(8, 3, 32, 32)
    ids = torch.randint(1, 100, (8, 8))
    out = model(images, ids, generator=torch.Generator().manual_seed(0))
    assert out["mixed_assign"].shape == (8, 4, 64)
    # the labels of the fine tokens are the plan's pixel labels sampled at the fine grid
    torch.testing.assert_close(out["mixed_labels"], out["plan"].pixel_labels(8)[:, ::4, ::4].reshape(8, 64))
    logs = MixReorgLoss(ContrastiveObjective(multi_label_weight=0.0))(out)
    logs["loss"].backward()
    assert model.vision.fine_tokens.proj.weight.grad.abs().sum() > 0
    # inference: the original branch is a GroupViT with one more block, grouping the fine grid
    model.eval()
    gvp = model.to_groupvit().eval()
    a, b = model.encode_image(images, return_maps=True), gvp.encode_image(images, return_maps=True)
    torch.testing.assert_close(a["soft_maps"][0], b["soft_maps"][0])
    assert a["grid"] == (8, 8)


def _flat(d, pre=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
    return out


def test_tiny_hybrid_presets_are_the_tiny_ones_on_the_hybrid_backbone():
    """``tiny_hybrid`` / ``tiny_hybrid_mixreorg`` differ from ``tiny`` / ``tiny_mixreorg`` only in the
    backbone and the supervised bound's switches, and every trainer model builds on them and groups
    the 16x16 grid of a 64-pixel image."""
    from mixreorg.recipes.config import get_preset
    from mixreorg.recipes.models import build_model

    for new, old in (("tiny_hybrid", "tiny"), ("tiny_hybrid_mixreorg", "tiny_mixreorg")):
        a, b = _flat(get_preset(new).to_dict()), _flat(get_preset(old).to_dict())
        changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        assert changed == {"preset", "train.out_dir", "model.vision.stem", "model.vision.stem_depths",
                           "model.vision.stem_zero_init", "model.vision.group_patch_size",
                           "model.supervised_maps", "model.supervised_aux"}, changed
    a, b = _flat(get_preset("tiny_hybrid_supervised").to_dict()), _flat(get_preset("tiny_hybrid").to_dict())
    assert {k for k in a if a[k] != b[k]} == {"preset", "train.out_dir", "model.name", "train.batch_size",
                                               "optim.base_batch", "optim.warmup_steps", "train.steps",
                                               "train.time_limit"}
    images = torch.rand(2, 3, 64, 64)
    for name in ("groupvit", "mixreorg", "supervised"):
        cfg = get_preset("tiny_hybrid")
        cfg.model.name = name
        if name == "mixreorg":
            cfg.model.mixreorg = dict(group_size=2)
        torch.manual_seed(0)
        model = build_model(cfg.validate())
        enc = model.inference_model().vision if hasattr(model, "inference_model") else model.groupvit.vision
        assert enc.fine_tokens is not None and enc.patch_embed.proj.__class__.__name__ == "ConvTrunk"
        out = enc.eval()(images, return_maps=True)
        assert out["grid"] == (16, 16) and out["soft_maps"][0].shape == (2, 8, 256)


def test_tiny_grounded_presets_change_only_the_objective_and_the_schedule():
    """The grounded presets are ``tiny_hybrid``'s backbone with six group tokens, the grounded objective
    and the main job's schedule: fixed steps with a warmup near a sixth of them, a time limit for slow
    machines."""
    from mixreorg.recipes.config import get_preset

    for new, old in (("tiny_grounded", "tiny_hybrid"), ("tiny_grounded_mixreorg", "tiny_hybrid_mixreorg")):
        a, b = _flat(get_preset(new).to_dict()), _flat(get_preset(old).to_dict())
        changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        mixed = {"model.mixreorg.mixed_grounded_weight"} if new.endswith("mixreorg") else set()
        assert changed == {"preset", "train.out_dir", "data.prompt_phrases", "data.num_prompts",
                           "objective.patch_label_weight", "objective.prompt_uniformity_weight",
                           "objective.grounded_seg_weight", "objective.grounded_seg_scope", "train.steps",
                           "optim.warmup_steps", "train.time_limit", "model.vision.num_group_tokens",
                           "model.vision.num_output_groups"} | mixed, changed
        cfg = get_preset(new).validate()
        assert 0.15 <= cfg.optim.warmup_steps / cfg.train.steps <= 0.2, cfg.optim
        assert cfg.train.schedule_by_time and cfg.train.time_limit <= 480
        assert cfg.model.vision["num_group_tokens"] == [6, 0] and cfg.model.vision["num_output_groups"] == [6]
