"""MixedPatchMixer (nn.Module), image-level mixing, and the timm VisionTransformer integration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixreorg.nn import MixedPatchMixer, images_to_patches, mix_images, patches_to_images, restore_images
from mixreorg.nn.timm_vit import forward_mixed
from mixreorg.ops import MixPlan, mix_reference


@settings(max_examples=40, deadline=None)
@given(
    G=st.integers(1, 4),
    groups=st.integers(1, 3),
    pre=st.integers(0, 2),
    suf=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    impl=st.sampled_from(["torch", "triton", "auto"]),
    seed=st.integers(0, 1000),
)
def test_mixer_roundtrip_and_untouched_extra_tokens(G, groups, pre, suf, dtype, impl, seed):
    B, L, C = G * groups, 9, 5
    mixer = MixedPatchMixer(G, num_prefix_tokens=pre, num_suffix_tokens=suf, impl=impl)
    x = torch.randn(B, pre + L + suf, C).to(dtype)
    mixed, plan = mixer(x, seed=seed)
    assert plan.labels.shape == (B, L) and plan.grid == (3, 3)
    assert torch.equal(mixed[:, :pre], x[:, :pre]) and torch.equal(mixed[:, pre + L :], x[:, pre + L :])
    assert torch.equal(mixer.restore(mixed, plan), x)
    again, _ = mixer(x, plan)  # a plan is reusable
    assert torch.equal(again, mixed)
    y = torch.randn_like(x)
    assert torch.equal(mixer.mix_add(y, x, plan), y + mixed)


def test_mixer_switches_backend_on_the_same_instance():
    mixer = MixedPatchMixer(2, num_prefix_tokens=1, impl="torch")
    x = torch.randn(4, 5, 3)
    a, plan = mixer(x, seed=0)
    mixer.impl = "triton"
    b, _ = mixer(x, plan)
    assert torch.equal(a, b)
    assert "impl='triton'" in repr(mixer)


def test_mixer_gradients_flow_to_the_source_tokens():
    mixer = MixedPatchMixer(4, num_prefix_tokens=1)
    x = torch.randn(8, 17, 6, requires_grad=True)
    mixed, plan = mixer(x, seed=3)
    weight = torch.randn_like(mixed)
    (mixed * weight).sum().backward()
    assert torch.equal(x.grad, mixer.restore(weight, plan))


def test_mixer_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        MixedPatchMixer(0)
    with pytest.warns(UserWarning, match="identity"):
        MixedPatchMixer(1)
    mixer = MixedPatchMixer(4, num_prefix_tokens=2, num_suffix_tokens=2)
    with pytest.raises(ValueError, match="no patch tokens"):
        mixer(torch.randn(4, 4, 3))
    with pytest.raises(ValueError, match="not divisible"):
        mixer(torch.randn(6, 9, 3))
    with pytest.raises(ValueError, match=r"\[B, L, C\]"):
        mixer(torch.randn(4, 9))
    with pytest.raises(ValueError, match="group size"):
        mixer(torch.randn(4, 9, 3), MixPlan.create(4, 5, 2, seed=0))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_mix_images_matches_token_mixing_and_restores(impl):
    B, P = 4, 8
    images = torch.rand(B, 3, 16, 24)
    plan = MixPlan.create(B, 6, 2, grid=(2, 3), seed=1)
    mixed = mix_images(images, plan, P, impl=impl)
    # each 8x8 tile of mixed image b comes from image src[b, p] at the same place
    for b in range(B):
        for p in range(6):
            i, j = divmod(p, 3)
            tile = (slice(None), slice(i * P, (i + 1) * P), slice(j * P, (j + 1) * P))
            assert torch.equal(mixed[b][tile], images[plan.src[b, p]][tile])
    assert torch.equal(restore_images(mixed, plan, P, impl=impl), images)
    assert torch.equal(patches_to_images(images_to_patches(images, P), P, (2, 3)), images)
    assert plan.pixel_labels(P).shape == (B, 16, 24)
    with pytest.raises(ValueError, match="not divisible"):
        images_to_patches(torch.rand(1, 3, 10, 16), 8)
    with pytest.raises(ValueError, match="grid"):
        mix_images(torch.rand(B, 3, 16, 16), plan, P)


# ------------------------------------------------------------------------------- timm integration
def _tiny_vit(**kw):
    import timm  # tests/conftest.py makes timm importable next to a CUDA-only torchvision build

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=3,
        num_heads=3, num_classes=5, **kw,
    )


def test_timm_vit_with_mixing_trains_a_step():
    torch.manual_seed(0)
    vit = _tiny_vit()
    mixer = MixedPatchMixer(group_size=4, num_prefix_tokens=vit.num_prefix_tokens)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in vit.parameters()]
    out = forward_mixed(vit, images, mixer, after_block=1, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (8, 5) and out.plan.labels.shape == (8, 16)
    # a per-patch task on the mixed tokens: which image of the group did this patch come from?
    patch_logits = out.mixed_tokens[:, 1:, :4]  # [B, L, G] (a toy head: first G channels)
    loss = F.cross_entropy(out.logits, targets) + F.cross_entropy(patch_logits.flatten(0, 1),
                                                                   out.plan.labels.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vit.parameters() if p.requires_grad)
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, vit.parameters()))


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_timm_vit_identity_cases_equal_the_plain_forward(reg_tokens):
    vit = _tiny_vit(reg_tokens=reg_tokens).eval()
    images = torch.randn(4, 3, 32, 32)
    plain = vit(images)
    # group size 1: mixing is the identity anywhere
    out = forward_mixed(vit, images, _identity_mixer(vit), after_block=1)
    assert torch.equal(out.logits, plain)
    # mixing after the last block and restoring before the head: exactly the plain forward
    mixer = MixedPatchMixer(2, num_prefix_tokens=vit.num_prefix_tokens)
    out = forward_mixed(vit, images, mixer, after_block=len(vit.blocks))
    assert torch.equal(out.logits, plain)
    assert torch.equal(out.mixed_tokens, mix_reference(out.restored_tokens, out.plan,
                                                       num_prefix_tokens=vit.num_prefix_tokens))
    # mixing earlier really changes what the later blocks see
    out = forward_mixed(vit, images, mixer, after_block=1, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out.logits, plain)
    with pytest.raises(ValueError, match="prefix tokens"):
        wrong = MixedPatchMixer(2, num_prefix_tokens=vit.num_prefix_tokens + 1)
        forward_mixed(vit, images, wrong, after_block=1)
    with pytest.raises(ValueError, match="after_block"):
        forward_mixed(vit, images, mixer, after_block=7)


def _identity_mixer(vit):
    with pytest.warns(UserWarning, match="identity"):
        return MixedPatchMixer(1, num_prefix_tokens=vit.num_prefix_tokens)
