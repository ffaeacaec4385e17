"""The MixReorg model: branches, restoration, eval equivalence, losses, ablations, overfitting."""

from __future__ import annotations

import pytest
import torch

from mixreorg.losses import ContrastiveObjective, MixReorgLoss, canonical_caption_index
from mixreorg.nn import GroupViT, MixReorg
from mixreorg.nn.groupvit import compose_assignments
from mixreorg.ops import MixPlan, mix_reference

TINY_VISION = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, depths=(2, 1, 1),
                   num_group_tokens=(8, 4, 0), num_output_groups=(8, 4), drop_path_rate=0.0)
TINY_TEXT = dict(context_length=12, width=32, layers=1, heads=2)


def _no_prompts() -> ContrastiveObjective:
    # these batches carry no noun prompts: the multi-label term is switched off explicitly
    return ContrastiveObjective(multi_label_weight=0.0)


def tiny(seed=0, **cfg):
    torch.manual_seed(seed)
    gv = GroupViT(vision=dict(TINY_VISION), text=dict(TINY_TEXT), proj_dim=16, proj_hidden=32)
    return MixReorg(gv, dict(dict(group_size=4), **cfg))


def batch(B=8, seed=0, distinct=True):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.randint(1, 500, (B, 12), generator=g)
    ids[:, 0], ids[:, -1] = 49406, 49407  # SOT ... EOT (argmax)
    return images, ids


def test_branches_shapes_and_plan_labels_are_the_seg_targets():
    m = tiny()
    images, ids = batch()
    plan = MixPlan.create(8, 16, 4, grid=(4, 4), seed=1)
    out = m(images, ids, plan=plan)
    assert out["plan"] is plan
    for name in ("original", "mixed", "restored"):
        assert out[name]["image_embed"].shape == (8, 16)
        assert out[name]["seg_embed"].shape == (8, 4, 16)
    assert out["mixed_assign"].shape == (8, 4, 16)
    losses = MixReorgLoss(_no_prompts())(out)
    seg = MixReorgLoss().seg(out["mixed_assign"], out["mixed"]["seg_embed"], out["text_embed"], plan, 1.0)
    assert seg["logits"].shape == (8, 16, 4)
    # L_seg targets are exactly the plan's labels: a loss computed by hand from the logits agrees
    by_hand = torch.nn.functional.cross_entropy(seg["logits"].reshape(-1, 4), plan.labels.reshape(-1))
    assert torch.allclose(seg["loss"], by_hand)
    assert set(losses) >= {"loss", "seg/loss", "seg/acc", "original/loss", "restored/loss"}


def test_patch_level_seg_loss_classifies_every_mixed_patch_token():
    """``patch_seg_weight``: L_seg over the mixed branch's patch tokens through the image head, each token
    its own segment (``assign=None`` equals identity maps, without materialising them); the total gains
    exactly that term; asked for without the patch embeddings or with a bad weight, it says so."""
    m = tiny()
    images, ids = batch()
    plan = MixPlan.create(8, 16, 4, grid=(4, 4), seed=1)
    torch.manual_seed(0)
    out = m(images, ids, plan=plan, patch_embed=True)
    pe = out["mixed_patch_embed"]
    assert pe.shape == (8, 16, 16)
    torch.testing.assert_close(pe.norm(dim=-1), torch.ones(8, 16))
    gv = m.groupvit
    expect = torch.nn.functional.normalize(gv.image_proj(gv.vision.norm(out["stage1"]["mixed"])), dim=-1)
    torch.testing.assert_close(pe, expect)
    seg = MixReorgLoss().seg
    eye = torch.eye(16).expand(8, 16, 16)
    a, b = seg(None, pe, out["text_embed"], plan, 7.0), seg(eye, pe, out["text_embed"], plan, 7.0)
    torch.testing.assert_close(a["logits"], b["logits"])
    torch.testing.assert_close(a["loss"], b["loss"])
    base = MixReorgLoss(_no_prompts())(out)
    withp = MixReorgLoss(_no_prompts(), patch_seg_weight=0.5)(out)
    by_scale = seg(None, pe, out["text_embed"], plan, m.scale())["loss"]  # the loss reads the model's scale
    torch.testing.assert_close(withp["patch_seg/loss"], by_scale)
    torch.testing.assert_close(withp["loss"], base["loss"] + 0.5 * by_scale)
    assert "patch_seg/loss" not in base
    assert "mixed_patch_embed" not in m(images, ids, plan=plan)
    with pytest.raises(ValueError, match="patch_embed=True"):
        MixReorgLoss(_no_prompts(), patch_seg_weight=1.0)(m(images, ids, plan=plan))
    with pytest.raises(ValueError, match="patch_seg_weight"):
        MixReorgLoss(patch_seg_weight=-1.0)


def test_shared_mixed_group_tokens_make_an_unmixed_mixed_branch_the_original():
    """``mixed_group_tokens="shared"``: the mixed branch starts from the original's group tokens (no
    parameter of its own), so with the identity plan and no progressive mixing it IS the original
    branch; with the paper's own copy it is not; a bad value is refused."""
    images, ids = batch()
    identity = MixPlan.from_permutation(torch.arange(4).expand(2, 16, 4), grid=(4, 4))
    shared = tiny(progressive=0, mixed_group_tokens="shared").eval()
    assert shared.mixed_group_token is None and "mixed_group_token" not in shared.no_weight_decay()
    out = shared.forward_branches(images, identity)
    torch.testing.assert_close(out["mixed"]["seg_embed"], out["original"]["seg_embed"])
    own = tiny(progressive=0).eval()
    mine = own.forward_branches(images, identity)
    assert not torch.allclose(mine["mixed"]["seg_embed"], mine["original"]["seg_embed"])
    with pytest.raises(ValueError, match="mixed_group_tokens"):
        tiny(mixed_group_tokens="both")


def test_max_segment_prompt_loss_reads_each_branchs_own_segments():
    """An objective with ``multi_label_pool="max_segment"`` scores each branch's prompts by that
    branch's best segment (MixReorgLoss hands it the branch's ``seg_embed``)."""
    m = tiny()
    images, ids = batch()
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(1, 500, (8, 2, 12), generator=g)
    prompts[..., 0], prompts[..., -1] = 49406, 49407
    out = m(images, ids, prompt_ids=prompts, plan=MixPlan.create(8, 16, 4, grid=(4, 4), seed=1))
    obj = ContrastiveObjective(multi_label_pool="max_segment")
    logs = MixReorgLoss(obj)(out)
    kw = dict(prompt_embed=out["prompt_embed"], logit_scale=out["logit_scale"],
              multi_label_scale=out["multi_label_logit_scale"])
    for name in ("original", "restored"):
        ref = obj(out[name]["image_embed"], out["text_embed"], seg_embed=out[name]["seg_embed"], **kw)
        torch.testing.assert_close(logs[f"{name}/ml"], ref["ml"])
    other = obj(out["original"]["image_embed"], out["text_embed"], seg_embed=out["mixed"]["seg_embed"], **kw)
    assert not torch.allclose(logs["original/ml"], other["ml"])


def test_restored_stage1_tokens_are_in_the_original_layout():
    """With stage-1 blocks that act on each token alone (attention output zeroed) and no progressive
    mixing, the mixed branch computes the same per-token function on permuted tokens, so restoring it
    must give back the original branch's stage-1 tokens, patch for patch."""
    m = tiny(progressive=0).eval()
    for blk in m.vision.stages[0].blocks:
        torch.nn.init.zeros_(blk.attn.proj.weight)
        torch.nn.init.zeros_(blk.attn.proj.bias)
    images, _ = batch()
    out = m.forward_branches(images)
    s1 = out["stage1"]
    assert torch.allclose(s1["restored"], s1["original"], atol=1e-6)
    assert not torch.allclose(s1["mixed"], s1["original"], atol=1e-3)  # the mixed branch really was mixed
    assert torch.allclose(s1["mixed"], mix_reference(s1["original"], out["plan"]), atol=1e-6)
    # with token interaction (the real blocks) the restored branch differs: it saw mixed contexts
    m2 = tiny(progressive=0).eval()
    s2 = m2.forward_branches(images)["stage1"]
    assert not torch.allclose(s2["restored"], s2["original"], atol=1e-3)


def test_eval_runs_only_the_original_branch_and_equals_groupvit_plus():
    m = tiny(seed=3).eval()
    images, _ = batch(B=4)  # eval needs no group-divisible batch
    plus = m.to_groupvit().eval()
    assert len(plus.vision.stages[0].blocks) == len(m.vision.stages[0].blocks) + 1
    a = m.encode_image(images, return_maps=True)
    b = plus.encode_image(images, return_maps=True)
    assert torch.allclose(a["image_embed"], b["image_embed"], atol=1e-6)
    assert torch.allclose(a["seg_embed"], b["seg_embed"], atol=1e-6)
    for x, y in zip(a["soft_maps"], b["soft_maps"]):
        assert torch.allclose(x, y, atol=1e-6)
    # parameter count of the inference model = GroupViT with one more stage-1 block
    gv_plus = GroupViT(vision=dict(TINY_VISION, depths=(3, 1, 1)), text=dict(TINY_TEXT), proj_dim=16, proj_hidden=32)
    assert sum(p.numel() for p in plus.parameters()) == sum(p.numel() for p in gv_plus.parameters())
    gv_plus.load_state_dict(plus.state_dict())  # same key layout too


def test_gradients_reach_every_parameter_that_should_learn():
    m = tiny(progressive_mode="concat")
    m.train()
    images, ids = batch()
    prompts = ids[:, None, :].repeat(1, 3, 1)
    out = m(images, ids, prompt_ids=prompts, generator=torch.Generator().manual_seed(0))
    MixReorgLoss()(out)["loss"].backward()  # with prompts: the multi-label term is on
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    # ... and the list above covers every part named in the design
    learned = {n for n, p in m.named_parameters() if p.grad is not None}
    for prefix in ("context_block.", "mixed_group_token", "groupvit.logit_scale", "groupvit.multi_label_logit_scale",
                   "groupvit.vision.stages.0.group_token", "groupvit.vision.stages.1.group_token",
                   "groupvit.vision.stages.0.downsample.", "groupvit.vision.stages.1.downsample.",
                   "groupvit.text.", "groupvit.image_proj.", "groupvit.text_proj.", "fuse.0.", "fuse.1."):
        assert any(n.startswith(prefix) for n in learned), prefix


def test_ablation_switches_change_what_they_should_and_nothing_else():
    base = tiny()
    names = {n for n, _ in base.named_parameters()}
    no_cm = tiny(contextual=False)
    assert {n for n, _ in no_cm.named_parameters()} == {n for n in names if not n.startswith("context_block.")}
    concat = tiny(progressive_mode="concat")
    extra = {n for n, _ in concat.named_parameters()} - names
    assert extra == {f"fuse.{k}.{w}" for k in range(2) for w in ("weight", "bias")}
    assert len(tiny(progressive=1).fuse or []) == 0 and tiny(progressive=1).num_progressive == 1
    # P changes only the mixed and restored branches: the original branch is identical
    images, ids = batch()
    plan = MixPlan.create(8, 16, 4, grid=(4, 4), seed=0)
    outs = {}
    for P in (0, 2):
        m = tiny(seed=5, progressive=P).eval()
        outs[P] = m.forward_branches(images, plan)
    assert torch.equal(outs[0]["original"]["image_embed"], outs[2]["original"]["image_embed"])
    assert not torch.allclose(outs[0]["mixed"]["image_embed"], outs[2]["mixed"]["image_embed"])
    # loss switches: a zero weight removes exactly that term
    out = tiny()(images, ids, plan=plan)
    full = MixReorgLoss(_no_prompts())(out)
    no_seg = MixReorgLoss(_no_prompts(), seg_weight=0)(out)
    no_rest = MixReorgLoss(_no_prompts(), restored_weight=0)(out)
    assert torch.allclose(full["loss"] - no_seg["loss"], full["seg/loss"])
    assert torch.allclose(full["loss"] - no_rest["loss"], full["restored/loss"])
    assert "restored/loss" not in no_rest


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="progressive"):
        tiny(progressive=3)
    with pytest.raises(ValueError, match="seg_maps"):
        tiny(seg_maps="argmax")
    with pytest.raises(ValueError, match="progressive_mode"):
        tiny(progressive_mode="mul")
    with pytest.warns(UserWarning, match="identity"):
        tiny(group_size=1)
    m = tiny()
    images, ids = batch(B=6)
    with pytest.raises(ValueError, match="not divisible"):
        m(images, ids)


def test_duplicate_captions_in_a_group_are_merged_into_one_class():
    keys = torch.tensor([5, 7, 5, 9, 1, 1, 1, 2])
    assert canonical_caption_index(keys, 4).tolist() == [0, 1, 0, 3, 0, 0, 0, 3]
    m = tiny()
    images, ids = batch()
    ids[2] = ids[0]  # image 2 has image 0's caption
    out = m(images, ids)
    keys = torch.tensor([hash(tuple(r.tolist())) % (2**61) for r in ids])
    seg = MixReorgLoss().seg(out["mixed_assign"], out["mixed"]["seg_embed"], out["text_embed"], out["plan"],
                                   10.0, keys)
    assert torch.isfinite(seg["loss"])
    # the duplicate column is never predicted and never a target
    assert (seg["logits"][:4, :, 2] == float("-inf")).all()


def test_composed_hard_assignment_sends_every_patch_to_one_segment():
    m = tiny().train()
    images, ids = batch()
    out = m(images, ids, generator=torch.Generator().manual_seed(0))
    a = compose_assignments([h.detach() for h in out["mixed"]["hard_maps"]])
    assert torch.allclose(a.sum(1), torch.ones(8, 16), atol=1e-5)
    assert torch.equal(out["mixed_assign"], compose_assignments(out["mixed"]["hard_maps"]))
    soft = tiny(seg_maps="soft").train()(images, ids)
    assert torch.equal(soft["mixed_assign"], compose_assignments(soft["mixed"]["soft_maps"]))
    assert ((soft["mixed_assign"] > 0) & (soft["mixed_assign"] < 1)).all()  # really soft


def test_tiny_mixreorg_overfits_a_fixed_batch():
    """16 synthetic image-caption pairs (each image its own colour + noise, random captions): the
    total loss falls by >= 50% and the mixed-patch accuracy rises far above chance (1/G = 0.25).

    Soft assignment: with the hard straight-through Gumbel assignment the same run learns L_seg
    too, but slower (measured: mixed-patch accuracy ~0.5 after 80 steps against ~0.85 after 50
    soft), and this test must stay short.
    """
    torch.manual_seed(0)
    vision = dict(TINY_VISION, embed_dim=48, num_heads=3, hard_assignment=False, gumbel=False)
    gv = GroupViT(vision=vision, text=dict(TINY_TEXT, width=48, heads=3), proj_dim=32, proj_hidden=64)
    m = MixReorg(gv, dict(group_size=4))
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(16, 3, 1, 1, generator=g) * 2 - 1
    images = colours + 0.3 * torch.randn(16, 3, 32, 32, generator=g)
    ids = torch.randint(1, 500, (16, 12), generator=g)
    ids[:, 0], ids[:, -1] = 49406, 49407
    plan_gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    loss_fn = MixReorgLoss(_no_prompts())
    history = []
    for _ in range(60):
        logs = loss_fn(m(images, ids, generator=plan_gen))  # a fresh plan every step
        opt.zero_grad()
        logs["loss"].backward()
        opt.step()
        history.append((float(logs["loss"].detach()), float(logs["seg/acc"])))
    first = history[0][0]
    last_loss = sum(h[0] for h in history[-5:]) / 5
    last_acc = sum(h[1] for h in history[-5:]) / 5
    assert last_loss <= 0.5 * first, (first, last_loss)
    assert last_acc >= 0.6, last_acc  # chance is 1/G = 0.25


def test_patch_label_term_reads_each_branchs_own_stage1_patches():
    """``patch_label_weight > 0``: each branch's prompts are also scored by that branch's best stage-1
    patch (``MixReorg.forward(branch_patches=True)``), and the term asks for them by name."""
    m = tiny()
    images, ids = batch()
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(1, 500, (8, 2, 12), generator=g)
    prompts[..., 0], prompts[..., -1] = 49406, 49407
    plan = MixPlan.create(8, 16, 4, grid=(4, 4), seed=1)
    out = m(images, ids, prompt_ids=prompts, plan=plan, branch_patches="stage1")
    obj = ContrastiveObjective(patch_label_weight=1.0)
    logs = MixReorgLoss(obj)(out)
    kw = dict(prompt_embed=out["prompt_embed"], logit_scale=out["logit_scale"],
              multi_label_scale=out["multi_label_logit_scale"])
    for name in ("original", "restored"):
        assert out[name]["patch_embed"].shape == (8, 16, out["text_embed"].shape[1])
        ref = obj(out[name]["image_embed"], out["text_embed"], patch_embed=out[name]["patch_embed"], **kw)
        torch.testing.assert_close(logs[f"{name}/patch_ml"], ref["patch_ml"])
    assert not torch.allclose(logs["original/patch_ml"], logs["restored/patch_ml"])
    with pytest.raises(ValueError, match="branch_patches="):
        MixReorgLoss(obj)(m(images, ids, prompt_ids=prompts, plan=plan))
    # the embedded patches before any block: the restored branch's are the original's
    emb = m(images, ids, prompt_ids=prompts, plan=plan, branch_patches="embed")
    torch.testing.assert_close(emb["original"]["patch_embed"], m.groupvit.project_patches(emb["embed_tokens"]))
    assert emb["restored"]["patch_embed"] is emb["original"]["patch_embed"]
    torch.testing.assert_close(emb["embed_tokens"], m.vision.embed_with_skip(images)[0])
    with pytest.raises(ValueError, match="branch_patches must be"):
        m(images, ids, prompt_ids=prompts, plan=plan, branch_patches="blocks")
