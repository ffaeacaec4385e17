"""GroupViT backbone: blocks, grouping, encoders, model, checkpointing, bad input.

Numerical parity with Hugging Face's independent GroupViT lives in ``test_weights.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixreorg.nn import (
    AssignAttention,
    Attention,
    CrossAttention,
    DropPath,
    GroupingBlock,
    GroupViT,
    GroupViTVisionEncoder,
    ProjectionHead,
    TextEncoder,
    compose_assignments,
)
from mixreorg.nn.grouping import unnormalise_assignment

SMALL_VISION = dict(
    img_size=32,
    patch_size=8,
    embed_dim=32,
    num_heads=2,
    depths=(1, 1, 1),
    num_group_tokens=(8, 4, 0),
    num_output_groups=(8, 4),
    drop_path_rate=0.0,
)
SMALL_TEXT = dict(context_length=12, vocab_size=50, width=16, layers=2, heads=2)


def small_model(**vision) -> GroupViT:
    return GroupViT(vision={**SMALL_VISION, **vision}, text=SMALL_TEXT, proj_dim=8, proj_hidden=16)


def token_ids(B: int, T: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Random ids below the EOT id (vocab - 1), one EOT per row, zero padding after it."""
    ids = torch.randint(1, vocab - 1, (B, T), generator=gen)
    for b in range(B):
        e = int(torch.randint(1, T, (1,), generator=gen))
        ids[b, e] = vocab - 1
        ids[b, e + 1 :] = 0
    return ids


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# ------------------------------------------------------------------------------------- blocks
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 9), heads=st.sampled_from([1, 2, 4]), causal=st.booleans())
def test_attention_matches_explicit_softmax(B, N, heads, causal):
    torch.manual_seed(N)
    C = 8
    attn = Attention(C, heads, causal=causal).eval()
    x = torch.randn(B, N, C)
    q, k, v = attn.qkv(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / math.sqrt(C // heads)
    if causal:
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    m = CrossAttention(8, 2).eval()
    q_in, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    q = m.q(q_in).reshape(2, 3, 2, 4).transpose(1, 2)
    k, v = m.kv(ctx).reshape(2, 5, 2, 2, 4).permute(2, 0, 3, 1, 4)
    ref = m.proj(((q @ k.transpose(-1, -2) / 2.0).softmax(-1) @ v).transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(m(q_in, ctx), ref, atol=1e-5, rtol=1e-5)


def test_attention_backends():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    sdpa = Attention(8, 2, backend="sdpa").eval()
    auto = Attention(8, 2, backend="auto").eval()
    auto.load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(auto(x), sdpa(x))  # auto falls back to SDPA off CUDA
    xf = Attention(8, 2, backend="xformers").eval()
    with pytest.raises(RuntimeError, match="xformers"):
        xf(x)
    with pytest.raises(ValueError, match="backend"):
        Attention(8, 2, backend="flash")
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_xformers_matches_sdpa_on_cuda(causal):
    pytest.importorskip("xformers")
    torch.manual_seed(0)
    x = torch.randn(2, 77, 64, device="cuda", dtype=torch.float16)
    sdpa = Attention(64, 4, causal=causal).cuda().half().eval()
    xf = Attention(64, 4, causal=causal, backend="xformers").cuda().half().eval()
    xf.load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(xf(x), sdpa(x), atol=2e-3, rtol=2e-3)


def test_drop_path():
    x = torch.randn(64, 3, 4) + 5
    dp = DropPath(0.5)
    assert torch.equal(dp.eval()(x), x)
    torch.manual_seed(0)
    y = dp.train()(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert bool((kept | dropped).all()) and 0 < int(dropped.sum()) < 64  # whole samples only
    torch.testing.assert_close(y[kept], x[kept] * 2)
    with pytest.raises(ValueError):
        DropPath(1.0)


# ------------------------------------------------------------------------------------- grouping
@settings(deadline=None)
@given(B=st.integers(1, 2), S=st.integers(1, 5), N=st.integers(1, 12), seed=st.integers(0, 100))
def test_assign_attention_eval_is_group_mean(B, S, N, seed):
    """Eval: each token goes to its arg-max group; a group outputs proj(sum of its values /
    (count + 1)); an empty group outputs proj(0)."""
    torch.manual_seed(seed)
    C = 8
    m = AssignAttention(C).eval()
    q, x = torch.randn(B, S, C), torch.randn(B, N, C)
    out, hard, soft = m(q, x)
    logits = m.q(q) @ m.kv(x)[..., :C].transpose(1, 2) / math.sqrt(C)
    torch.testing.assert_close(soft, logits.softmax(dim=1), atol=1e-6, rtol=1e-5)
    onehot = F.one_hot(logits.argmax(dim=1), S).transpose(1, 2).float()  # [B, S, N]
    torch.testing.assert_close(hard, onehot, atol=1e-5, rtol=0)
    v = m.kv(x)[..., C:]
    ref = m.proj(onehot @ v / (onehot.sum(-1, keepdim=True) + 1.0))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@settings(deadline=None)
@given(S=st.integers(1, 6), N=st.integers(1, 30), eps=st.sampled_from([1.0, 0.5, 3.0]), hard=st.booleans())
def test_unnormalise_assignment_inverts_value_and_gradient(S, N, eps, hard):
    """The hard map is recovered from gumbel_assign's normalised output exactly, gradient included."""
    torch.manual_seed(S * 31 + N)
    logits = torch.randn(2, S, N, requires_grad=True)
    noise = -torch.log(-torch.log(torch.rand(2, S, N).clamp(1e-9, 1 - 1e-7)))
    y = (logits + noise).softmax(dim=1)
    if hard:
        a_ref = F.one_hot(y.argmax(1), S).transpose(1, 2).float() - y.detach() + y
    else:
        a_ref = y
    w = torch.randn(2, S, N)
    (g_ref,) = torch.autograd.grad((a_ref * w).sum(), logits, retain_graph=True)
    attn = a_ref / (a_ref.sum(-1, keepdim=True) + eps)
    a = unnormalise_assignment(attn, eps)
    (g,) = torch.autograd.grad((a * w).sum(), logits)
    torch.testing.assert_close(a, a_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_assign_attention_training_uses_gumbel_and_straight_through():
    torch.manual_seed(0)
    m = AssignAttention(8).train()
    q, x = torch.randn(2, 4, 8), torch.randn(2, 16, 8, requires_grad=True)
    zeros = torch.zeros(2, 4, 16)
    big = torch.full((2, 4, 16), -1e4)
    big[:, 3] = 0.0  # noise that forces every token into group 3
    _, hard, _ = m(q, x, noise=big)
    assert torch.allclose(hard[:, 3], torch.ones(2, 16), atol=1e-5)
    out, hard0, soft = m(q, x, noise=zeros)
    m.eval()
    out_eval, hard_eval, _ = m(q, x)
    torch.testing.assert_close(out, out_eval)  # zero noise == eval
    (hard0 * torch.randn_like(hard0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # straight-through reaches the logits


def test_assignment_stays_float32_under_autocast():
    torch.manual_seed(0)
    m = GroupViTVisionEncoder(**SMALL_VISION).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, return_maps=True)
    assert out["tokens"].dtype == torch.bfloat16
    for hard, soft in zip(out["hard_maps"], out["soft_maps"]):
        assert hard.dtype == soft.dtype == torch.float32
        assert torch.allclose(hard.sum(1), torch.ones(()), atol=1e-5)  # one group per token
        assert torch.equal(hard.round(), hard.round().clamp(0, 1)) and torch.allclose(hard, hard.round(), atol=1e-5)


def test_grouping_block_shapes_and_group_count_check():
    torch.manual_seed(0)
    blk = GroupingBlock(16, 2, num_group_tokens=6, num_output_groups=3).eval()
    out, hard, soft = blk(torch.randn(2, 10, 16), torch.randn(2, 6, 16))
    assert out.shape == (2, 3, 16) and hard.shape == (2, 3, 10) and soft.shape == (2, 3, 10)
    torch.testing.assert_close(soft.sum(1), torch.ones(2, 10))
    torch.testing.assert_close(hard.sum(1), torch.ones(2, 10), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="6 group tokens"):
        blk(torch.randn(2, 10, 16), torch.randn(2, 5, 16))


# ------------------------------------------------------------------------------------- vision
def test_default_config_is_groupvit():
    with torch.device("meta"):
        m = GroupViT()
    v, t = m.vision, m.text
    assert v.patch_embed.num_patches == 196 and v.pos_embed.shape == (1, 196, 384)
    assert [len(s.blocks) for s in v.stages] == [6, 3, 3]
    assert v.stages[0].group_token.shape == (1, 64, 384) and v.stages[1].group_token.shape == (1, 8, 384)
    assert v.stages[2].group_token is None and v.stages[2].downsample is None
    assert v.stages[0].group_projector is None
    assert v.stages[1].group_projector.mlp.fc1.weight.shape == (192, 64)  # 64 -> 192 -> 8
    assert v.stages[1].group_projector.mlp.fc2.weight.shape == (8, 192)
    assert v.stages[0].downsample.group_mlp.fc2.weight.shape == (64, 192)
    assert v.stages[1].downsample.group_mlp.fc2.weight.shape == (8, 192)
    assert v.stages[0].blocks[0].attn.num_heads == 6
    assert v.stages[0].downsample.mlp.fc1.weight.shape == (1536, 384)
    dps = [b.drop_path.p for s in v.stages for b in s.blocks]
    assert dps[0] == 0.0 and math.isclose(dps[-1], 0.1) and dps == sorted(dps)
    assert (t.width, len(t.blocks), t.blocks[0].attn.num_heads, t.context_length) == (256, 12, 4, 77)
    assert isinstance(t.blocks[0].mlp.act, torch.nn.Module) and type(t.blocks[0].mlp.act).__name__ == "QuickGELU"
    assert m.image_proj.net.fc1.weight.shape == (4096, 384) and m.image_proj.net.out.weight.shape == (256, 4096)
    assert m.text_proj.net.fc1.weight.shape == (4096, 256)


def test_logit_scale_init_and_clamp():
    m = small_model()
    assert math.isclose(m.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(m.scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m.scale().item() == 100.0
    assert m.multi_label_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)  # its own parameter


def test_vision_forward_shapes_and_maps():
    torch.manual_seed(0)
    enc = GroupViTVisionEncoder(**SMALL_VISION).eval()
    out = enc(torch.randn(2, 3, 32, 32), return_maps=True)
    assert out["tokens"].shape == (2, 4, 32) and out["pooled"].shape == (2, 32) and out["grid"] == (4, 4)
    assert [m.shape for m in out["hard_maps"]] == [(2, 8, 16), (2, 4, 8)]
    assert [m.shape for m in out["soft_maps"]] == [(2, 8, 16), (2, 4, 8)]
    torch.testing.assert_close(out["pooled"], out["tokens"].mean(1))
    comp = compose_assignments(out["soft_maps"])  # [B, 4, 16]
    torch.testing.assert_close(comp.sum(1), torch.ones(2, 16))  # each patch distributes mass 1
    assert enc(torch.randn(2, 3, 32, 32))["hard_maps"] == []


def test_other_input_sizes_interpolate_position_embedding():
    torch.manual_seed(0)
    enc = GroupViTVisionEncoder(**SMALL_VISION).eval()
    out = enc(torch.randn(1, 3, 48, 64), return_maps=True)
    assert out["grid"] == (6, 8) and out["soft_maps"][0].shape == (1, 8, 48)
    pe = enc.pos_embed_for((6, 8))
    assert pe.shape == (1, 48, 32)
    assert enc.pos_embed_for((4, 4)) is enc.pos_embed  # the trained size is untouched
    corner = F.interpolate(enc.pos_embed.reshape(1, 4, 4, 32).permute(0, 3, 1, 2), size=(6, 8), mode="bicubic")
    torch.testing.assert_close(pe, corner.permute(0, 2, 3, 1).reshape(1, 48, 32))


def test_bad_image_size_and_config_raise():
    enc = GroupViTVisionEncoder(**SMALL_VISION)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        enc(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="channels"):
        enc(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        enc(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        GroupViTVisionEncoder(**{**SMALL_VISION, "img_size": 36})
    with pytest.raises(ValueError, match="num_output_groups"):
        GroupViTVisionEncoder(**{**SMALL_VISION, "num_output_groups": (8, 4, 4)})
    with pytest.raises(ValueError, match="last stage"):
        GroupViTVisionEncoder(**{**SMALL_VISION, "num_group_tokens": (8, 4, 2)})
    with pytest.raises(ValueError, match="num_group_tokens"):
        GroupViTVisionEncoder(**{**SMALL_VISION, "num_group_tokens": (8, 0)})


def test_forward_from_stage1_output_matches_forward():
    torch.manual_seed(0)
    enc = GroupViTVisionEncoder(**SMALL_VISION).eval()
    images = torch.randn(2, 3, 32, 32)
    ref = enc(images, return_maps=True)
    x = enc.embed(images)
    g = enc.stages[0].init_group_tokens(2)
    h = torch.cat([x, g], dim=1)
    for blk in enc.stages[0].blocks:  # what an outside encoder (MixReorg) runs itself
        h = blk(h)
    out = enc.forward_from_stage1_output(h[:, :16], h[:, 16:], return_maps=True)
    torch.testing.assert_close(out["tokens"], ref["tokens"])
    for a, b in zip(out["hard_maps"] + out["soft_maps"], ref["hard_maps"] + ref["soft_maps"]):
        torch.testing.assert_close(a, b)
    # stage by stage
    x1, g1, hard1, _ = enc.forward_stage(0, enc.embed(images))
    torch.testing.assert_close(hard1, ref["hard_maps"][0])


def test_text_encoder_pools_eot_causally():
    torch.manual_seed(0)
    enc = TextEncoder(**SMALL_TEXT).eval()
    gen = torch.Generator().manual_seed(0)
    ids = token_ids(3, 12, 50, gen)
    out = enc(ids)
    assert out.shape == (3, 16)
    ids2 = ids.clone()
    for b in range(3):  # tokens after the EOT cannot change the EOT feature (causal mask)
        e = int(ids[b].argmax())
        ids2[b, e + 1 :] = torch.randint(1, 49, (12 - e - 1,), generator=gen)
    torch.testing.assert_close(enc(ids2), out)
    short = ids[:, : int(ids.argmax(-1).max()) + 1]  # a shorter context gives the same features
    torch.testing.assert_close(enc(short), out)
    with pytest.raises(ValueError, match="context length"):
        enc(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        enc(torch.zeros(1, 5))


def test_projection_head_flattens_tokens():
    torch.manual_seed(0)
    head = ProjectionHead(8, 16, 4).eval()
    with torch.no_grad():
        head.net.bn1.running_mean.normal_()
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(head(x), head(x.reshape(6, 8)).reshape(2, 3, 4))
    assert ProjectionHead(8, 16, 4, num_layers=3).net.fc2.weight.shape == (16, 16)
    assert list(dict(ProjectionHead(8, 16, 4, num_layers=1).named_children())["net"]._modules) == ["out"]
    with pytest.raises(ValueError, match="in_dim == out_dim"):
        ProjectionHead(8, 16, 4, num_layers=0)


def test_model_encoders_and_segmentation_logits():
    torch.manual_seed(0)
    m = small_model().eval()
    gen = torch.Generator().manual_seed(1)
    images, ids = torch.randn(2, 3, 32, 32), token_ids(2, 12, 50, gen)
    enc = m.encode_image(images, return_maps=True)
    assert enc["image_embed"].shape == (2, 8) and enc["seg_embed"].shape == (2, 4, 8)
    torch.testing.assert_close(enc["image_embed"].norm(dim=-1), torch.ones(2))
    assert m.encode_image(images)["seg_embed"] is None
    txt = m.encode_text(ids)
    many = m.encode_text(torch.stack([ids, ids.flip(0)], dim=1))  # [B, K=2, T]
    torch.testing.assert_close(many[:, 0], txt)
    torch.testing.assert_close(many[:, 1], txt.flip(0))
    out = m(images, ids)
    assert out["logit_scale"] is m.logit_scale and out["multi_label_logit_scale"] is m.multi_label_logit_scale
    seg = m.segmentation_logits(images, txt)
    assert seg.shape == (2, 2, 32, 32)
    # at patch resolution the logits are scale * sum_s soft(s, p) <seg_s, t>
    seg_lo = m.segmentation_logits(images, txt, output_size=(4, 4)).flatten(2)  # [B, K, 16]
    comp = compose_assignments(enc["soft_maps"])  # [B, S, 16]
    ref = m.scale() * torch.einsum("bsd,kd,bsp->bkp", enc["seg_embed"], txt, comp)
    torch.testing.assert_close(seg_lo, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- training
def _grads(model: GroupViT, images, ids, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(images, ids)
    enc = model.encode_image(images, return_maps=True)
    seg = compose_assignments(enc["hard_maps"]).sum()  # gradient through the hard maps too
    (clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"]) + 1e-3 * seg).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = small_model(drop_path_rate=0.3).train()  # drop-path and Gumbel noise both draw from the RNG
    gen = torch.Generator().manual_seed(0)
    images, ids = torch.randn(4, 3, 32, 32), token_ids(4, 12, 50, gen)
    ref = _grads(m, images, ids, seed=123)
    m.use_checkpoint = True
    assert m.vision.stages[0].use_checkpoint and m.text.use_checkpoint
    got = _grads(m, images, ids, seed=123)
    assert ref.keys() == got.keys() and len(ref) > 50
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_default_model_trains_one_step_on_cpu():
    torch.manual_seed(0)
    m = GroupViT().train()
    gen = torch.Generator().manual_seed(0)
    images, ids = torch.randn(2, 3, 224, 224), token_ids(2, 77, 49408, gen)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    out = m(images, ids)
    loss = clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"])
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = {n for n, p in m.named_parameters() if p.grad is None}
    assert no_grad == {"multi_label_logit_scale"}, no_grad  # unused by this loss only
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
    # the straight-through assignment passes gradient to the assignment logits
    assert m.vision.stages[0].downsample.assign.q.weight.grad.abs().sum() > 0
    before = m.vision.stages[0].downsample.assign.q.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, m.vision.stages[0].downsample.assign.q.weight)


def test_conv_stem_tokens_see_their_patch_and_a_margin_only() -> None:
    """``stem="conv"``: same token layout as the patch stem; a token's receptive field is its patch
    plus a margin of < p pixels (2p - 1 wide), and non-power-of-2 patches are refused."""
    from mixreorg.nn.vision import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(32, 8, 3, 16, stem="conv").eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    tokens, grid = pe(x)
    assert tokens.shape == (1, 16, 16) and grid == (4, 4)
    (tokens[0, 5] * torch.randn(16)).sum().backward()  # token (1, 1): pixels 8..15 in both axes
    seen = x.grad[0].abs().sum(0) > 0  # [32, 32]
    rows = seen.any(1).nonzero().flatten()
    assert rows.min() >= 8 - 8 and rows.max() <= 15 + 8 and rows.max() - rows.min() + 1 <= 2 * 8 - 1
    assert seen[8:16, 8:16].all()
    with pytest.raises(ValueError, match="power-of-2"):
        PatchEmbed(36, 6, 3, 16, stem="conv")
    with pytest.raises(ValueError, match="stem must be"):
        PatchEmbed(32, 8, 3, 16, stem="resnet")
    enc = GroupViTVisionEncoder(
        img_size=32, patch_size=8, embed_dim=16, num_heads=2, depths=[1, 1], num_group_tokens=[4, 0],
        num_output_groups=[2], stem="conv",
    )
    out = enc(torch.randn(2, 3, 32, 32), return_maps=True)
    assert out["tokens"].shape == (2, 2, 16) and out["soft_maps"][0].shape == (2, 2, 16)
