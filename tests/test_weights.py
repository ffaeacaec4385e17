"""Weight import: parity with Hugging Face ``transformers.GroupViTModel`` (our independent oracle
for the whole backbone) and the NVlabs/GroupViT checkpoint key layout.

The HF models get random weights (their init, then every parameter and BatchNorm statistic
perturbed so that no zero/one init can hide a mis-mapped tensor) and run in eval mode (arg-max
assignment); image embeddings, text embeddings and segmentation logits must match to 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import GroupViTConfig, GroupViTModel  # a test dependency: the independent oracle

from mixreorg.nn import GroupViT, load_hf_groupvit, load_nvlabs_groupvit  # noqa: E402
from mixreorg.nn.weights import (  # noqa: E402
    config_from_hf,
    config_from_nvlabs,
    config_to_hf,
    hf_to_ours,
    infer_config_from_hf_state_dict,
    infer_config_from_nvlabs_state_dict,
    nvlabs_to_ours,
    ours_to_hf,
    ours_to_nvlabs,
)

TOL = dict(atol=1e-4, rtol=1e-4)

SMALL_HF = dict(
    text_config=dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=0,
    ),
    vision_config=dict(
        hidden_size=64,
        intermediate_size=128,
        depths=[2, 1, 1],
        num_hidden_layers=4,
        num_group_tokens=[16, 4, 0],
        num_output_groups=[16, 4, 4],
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
        assign_mlp_ratio=[0.5, 2],
    ),
    projection_dim=24,
    projection_intermediate_dim=48,
    logit_scale_init_value=1.5,
)
# four stages (three grouping blocks), 3 heads, a non-square number of heads per width
DEEP_HF = dict(
    text_config=dict(
        vocab_size=300,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=3,
        max_position_embeddings=10,
        bos_token_id=298,
        eos_token_id=299,
        pad_token_id=0,
    ),
    vision_config=dict(
        hidden_size=48,
        intermediate_size=96,
        depths=[1, 1, 1, 1],
        num_hidden_layers=4,
        num_group_tokens=[12, 6, 3, 0],
        num_output_groups=[12, 6, 3, 3],
        num_attention_heads=3,
        image_size=32,
        patch_size=4,
    ),
    projection_dim=16,
    projection_intermediate_dim=32,
)
# head dims other than 64 in both towers: 8 heads at width 128, where the old ``width // 64`` guess
# gave 2 (and silently wrong embeddings)
NON64_HF = dict(
    text_config=dict(
        vocab_size=200,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=8,
        max_position_embeddings=12,
        bos_token_id=198,
        eos_token_id=199,
        pad_token_id=0,
    ),
    vision_config=dict(
        hidden_size=128,
        intermediate_size=256,
        depths=[1, 1, 1],
        num_hidden_layers=3,
        num_group_tokens=[8, 4, 0],
        num_output_groups=[8, 4, 4],
        num_attention_heads=8,
        image_size=32,
        patch_size=8,
        assign_eps=0.5,
    ),
    projection_dim=16,
    projection_intermediate_dim=32,
)


def _unrecorded(hf_config) -> dict:
    """The loader keywords for the fields an HF state dict does not record, read off its config."""
    vc, tc = hf_config.vision_config, hf_config.text_config
    return dict(
        heads=vc.num_attention_heads,
        text_heads=tc.num_attention_heads,
        assign_eps=vc.assign_eps,
        act=vc.hidden_act,
        text_act=tc.hidden_act,
        layer_norm_eps=vc.layer_norm_eps,
    )


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _hf_model(cfg: dict | None) -> GroupViTModel:
    torch.manual_seed(0)
    model = GroupViTModel(GroupViTConfig(**(cfg or {}))).eval()
    _perturb(model)
    return model


def _ids(B: int, T: int, eos: int, seed: int = 0) -> torch.Tensor:
    """Ids below ``eos`` with one ``eos`` per row (the largest id, as CLIP's EOT) and 0-padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, eos, (B, T), generator=g)
    for b in range(B):
        e = int(torch.randint(1, T, (1,), generator=g))
        ids[b, e] = eos
        ids[b, e + 1 :] = 0
    return ids


@pytest.fixture(scope="module")
def hf_default():
    return _hf_model(None)


@pytest.fixture(scope="module")
def hf_small():
    return _hf_model(SMALL_HF)


def _check_parity(hf: GroupViTModel, ours: GroupViT, B: int = 2) -> None:
    vc, tc = hf.config.vision_config, hf.config.text_config
    torch.manual_seed(1)
    images = torch.randn(B, 3, vc.image_size, vc.image_size)
    ids = _ids(B, tc.max_position_embeddings, tc.eos_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images, output_segmentation=True)
        enc = ours.encode_image(images, return_maps=True)
        img = enc["image_embed"]
        txt = ours.encode_text(ids)
        # HF multiplies the per-pixel logits by the (unclamped) scale twice
        seg = ours.segmentation_logits_from(enc, txt, images.shape[-2:]) * ours.logit_scale.exp()
    torch.testing.assert_close(img, ref.image_embeds, **TOL)
    torch.testing.assert_close(txt, ref.text_embeds, **TOL)
    assert seg.shape == ref.segmentation_logits.shape
    torch.testing.assert_close(seg, ref.segmentation_logits, **TOL)
    assert ref.segmentation_logits.abs().max() > 1e-2  # not trivially zero


# ------------------------------------------------------------------------------------- HF
def test_hf_parity_default_config(hf_default):
    ours = load_hf_groupvit(hf_default).eval()
    assert all(p.requires_grad and p.device.type == "cpu" for p in ours.parameters())
    assert ours.logit_scale.data_ptr() != hf_default.logit_scale.data_ptr()  # copied, not shared
    assert ours.vision.depths == (6, 3, 3) and ours.vision.embed_dim == 384
    _check_parity(hf_default, ours)


def test_hf_parity_small_config(hf_small):
    ours = load_hf_groupvit(hf_small).eval()
    assert ours.vision.stages[0].downsample.mlp.fc1.out_features == 128  # assign_mlp_ratio (0.5, 2)
    _check_parity(hf_small, ours)


def test_hf_parity_four_stage_config():
    hf = _hf_model(DEEP_HF)
    ours = load_hf_groupvit(hf).eval()
    assert len(ours.vision.stages) == 4
    _check_parity(hf, ours, B=3)


def test_hf_config_inferred_from_state_dict(hf_default, hf_small):
    for hf in (hf_default, hf_small):
        explicit = config_from_hf(hf.config)
        inferred = infer_config_from_hf_state_dict(hf.state_dict(), **_unrecorded(hf.config))
        for part in ("vision", "text"):
            for k, v in inferred[part].items():
                assert explicit[part][k] == pytest.approx(v) or explicit[part][k] == v, (part, k)
        for k in ("proj_dim", "proj_hidden", "proj_layers"):
            assert explicit[k] == inferred[k]
    # head counts, assign_eps, activations and LayerNorm eps are not in the tensors: never guessed
    with pytest.raises(ValueError, match=r"num_attention_heads") as err:
        infer_config_from_hf_state_dict(hf_default.state_dict())
    for field in ("vision_config.num_attention_heads", "text_config.num_attention_heads", "vision_config.assign_eps"):
        assert field in str(err.value)


def test_hf_load_from_state_dict_with_inferred_config(hf_small):
    ours = load_hf_groupvit(hf_small.state_dict(), **_unrecorded(hf_small.config)).eval()
    _check_parity(hf_small, ours)
    # the keywords may also come as vision= / text= overrides (our kwarg names)
    kw = _unrecorded(hf_small.config)
    ours = load_hf_groupvit(
        hf_small.state_dict(),
        assign_eps=kw["assign_eps"],
        act=kw["act"],
        text_act=kw["text_act"],
        layer_norm_eps=1e-5,
        vision={"num_heads": kw["heads"]},
        text={"heads": kw["text_heads"]},
    ).eval()
    _check_parity(hf_small, ours)


def test_hf_state_dict_without_head_counts_raises(hf_small, tmp_path):
    sd = hf_small.state_dict()
    with pytest.raises(ValueError, match=r"vision_config\.num_attention_heads.*text_config\.num_attention_heads"):
        load_hf_groupvit(sd)
    with pytest.raises(ValueError, match=r"heads=\.\.\., text_heads=\.\.\.") as err:
        load_hf_groupvit(sd)
    assert "config=" in str(err.value)  # says how to pass them
    # only the missing ones are named
    kw = _unrecorded(hf_small.config)
    del kw["text_heads"]
    with pytest.raises(ValueError, match=r"record text_config\.num_attention_heads\. Pass"):
        load_hf_groupvit(sd, **kw)
    kw = _unrecorded(hf_small.config)
    del kw["assign_eps"]
    with pytest.raises(ValueError, match=r"record vision_config\.assign_eps\. Pass"):
        load_hf_groupvit(sd, **kw)
    # a file without its config.json is a bare state dict too
    torch.save(dict(sd), tmp_path / "model.bin")
    with pytest.raises(ValueError, match="num_attention_heads"):
        load_hf_groupvit(tmp_path / "model.bin")


def _outputs(model: GroupViT, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images)["image_embed"], model.encode_text(ids)


def test_hf_non_64_head_dim_needs_the_config():
    """Width 128 with 8 heads (head dim 16): the explicit head count reproduces HF, the old
    ``width // 64`` guess (2 heads) does not."""
    hf = _hf_model(NON64_HF)
    sd = hf.state_dict()
    kw = _unrecorded(hf.config)
    assert (kw["heads"], kw["text_heads"]) == (8, 8)
    for ours in (
        load_hf_groupvit(sd, **kw),
        load_hf_groupvit(sd, config=hf.config.to_dict()),  # config.json as a dict
        load_hf_groupvit(hf),  # the model's own config
    ):
        assert ours.vision.stages[0].blocks[0].attn.num_heads == 8
        _check_parity(hf, ours.eval())
    # what the old guess built: same tensors, 2 heads per tower -> other embeddings
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    ids = _ids(2, 12, 199)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images)
    guessed = load_hf_groupvit(sd, **{**kw, "heads": 128 // 64, "text_heads": 128 // 64}).eval()
    img, txt = _outputs(guessed, images, ids)
    assert (img - ref.image_embeds).abs().max() > 1e-2
    assert (txt - ref.text_embeds).abs().max() > 1e-2


def test_hf_wrong_head_counts_raise(hf_small):
    sd = hf_small.state_dict()
    kw = _unrecorded(hf_small.config)  # vision width 64, text width 32
    with pytest.raises(ValueError, match=r"vision_config\.num_attention_heads \(heads=\) = 3 does not divide"):
        load_hf_groupvit(sd, **{**kw, "heads": 3})
    with pytest.raises(ValueError, match=r"text_config\.num_attention_heads \(text_heads=\) = 5 does not divide"):
        load_hf_groupvit(sd, **{**kw, "text_heads": 5})
    with pytest.raises(ValueError, match="positive integer"):
        load_hf_groupvit(sd, **{**kw, "heads": 0})
    with pytest.raises(ValueError, match="positive integer"):
        load_hf_groupvit(sd, **{**kw, "heads": 2.5})
    # a config whose head count does not divide the width
    cfg = hf_small.config.to_dict()
    cfg["vision_config"]["num_attention_heads"] = 3
    with pytest.raises(ValueError, match="does not divide"):
        load_hf_groupvit(sd, config=cfg)
    # keywords that contradict the config are refused, not ignored
    with pytest.raises(ValueError, match=r"heads=2 contradicts the config \(vision_config\.num_attention_heads = 4\)"):
        load_hf_groupvit(hf_small, heads=2)
    with pytest.raises(ValueError, match=r"assign_eps=0\.5 contradicts"):
        load_hf_groupvit(hf_small, assign_eps=0.5)
    assert load_hf_groupvit(hf_small, heads=4, text_heads=2) is not None  # agreeing keywords are fine
    # unsupported values of the unrecorded fields
    with pytest.raises(ValueError, match="only 1e-5"):
        load_hf_groupvit(sd, **{**kw, "layer_norm_eps": 1e-6})
    with pytest.raises(ValueError, match="only 'gelu' and 'quick_gelu'"):
        load_hf_groupvit(sd, **{**kw, "act": "relu"})


def test_hf_config_dict_must_be_complete(hf_small):
    cfg = hf_small.config.to_dict()
    del cfg["vision_config"]["num_attention_heads"]
    del cfg["vision_config"]["assign_eps"]
    with pytest.raises(ValueError, match=r"lacks vision_config\.num_attention_heads, vision_config\.assign_eps"):
        config_from_hf(cfg)
    with pytest.raises(ValueError, match=r"lacks vision_config\.num_attention_heads"):
        load_hf_groupvit(hf_small.state_dict(), config=cfg)
    # the legacy config.json layout (text_config_dict / vision_config_dict, non-default fields only):
    # transformers fills the rest, as it does when it loads that folder
    legacy = {k: v for k, v in SMALL_HF.items() if k not in ("text_config", "vision_config")}
    legacy.update(text_config_dict=SMALL_HF["text_config"], vision_config_dict=SMALL_HF["vision_config"])
    assert config_from_hf(legacy) == config_from_hf(hf_small.config)


def test_hf_config_export_round_trip():
    """``config_to_hf`` + ``ours_to_hf``: transformers builds the same model from our export."""
    cfg = dict(
        vision=dict(
            img_size=32, patch_size=8, embed_dim=48, num_heads=6, depths=(1, 1, 1), num_group_tokens=(8, 4, 0),
            num_output_groups=(8, 4), assign_eps=0.25, assign_mlp_ratio=(0.5, 2.0), mlp_ratio=2.0,
        ),
        text=dict(context_length=10, vocab_size=60, width=24, layers=2, heads=3),
        proj_dim=8,
        proj_hidden=16,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = GroupViT(**cfg).eval()
    _perturb(ours, 3)
    hf_cfg = config_to_hf(cfg)
    hf = GroupViTModel(GroupViTConfig(**hf_cfg)).eval()
    hf.load_state_dict(ours_to_hf(ours), strict=True)
    _check_parity(hf, ours)
    back = load_hf_groupvit(ours_to_hf(ours), config=hf_cfg)
    ref = ours.state_dict()
    assert all(torch.equal(back.state_dict()[k], ref[k]) for k in ref if k != "multi_label_logit_scale")
    with pytest.raises(ValueError, match="proj_layers=3"):
        config_to_hf({**cfg, "proj_layers": 3})
    with pytest.raises(ValueError, match="soft or Gumbel-free"):
        config_to_hf({**cfg, "vision": {**cfg["vision"], "hard_assignment": False}})


def test_hf_position_embedding_interpolation_matches(hf_small):
    """Other input sizes: our bicubic position embedding equals HF's ``interpolate_pos_encoding``."""
    ours = load_hf_groupvit(hf_small).eval()
    torch.manual_seed(0)
    for size in [(96, 96), (64, 96), (48, 80)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = hf_small.vision_model.embeddings(x, interpolate_pos_encoding=True)
            torch.testing.assert_close(ours.vision.embed(x), ref, **TOL)


def test_hf_export_round_trip(hf_small):
    ours = load_hf_groupvit(hf_small)
    exported = ours_to_hf(ours)
    ref = hf_small.state_dict()
    assert set(exported) == set(ref)
    for k, v in ref.items():
        assert torch.equal(exported[k], v), k
    fresh = GroupViTModel(hf_small.config)
    fresh.load_state_dict(exported, strict=True)  # HF itself accepts our export


def test_load_from_files(hf_small, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in hf_small.state_dict().items()}
    save_file(sd, tmp_path / "model.safetensors")
    torch.save(sd, tmp_path / "model.bin")
    ref = load_hf_groupvit(hf_small).state_dict()
    for name in ("model.safetensors", "model.bin"):
        got = load_hf_groupvit(tmp_path / name, config=hf_small.config).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
    # NVlabs-style checkpoint that pickles a non-tensor object: refused with advice, not unpickled
    torch.save({"model": ours_to_nvlabs(_small_ours()), "config": _Opaque()}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_nvlabs_groupvit(tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="not found"):
        load_nvlabs_groupvit(tmp_path / "missing.pth")


class _Opaque:
    """A non-tensor object: unpickling it needs code, which weights_only loading refuses."""


def test_hf_bad_state_dict_names_the_keys(hf_small):
    ours = load_hf_groupvit(hf_small)
    sd = dict(hf_small.state_dict())
    missing = dict(sd)
    del missing["vision_model.encoder.stages.0.downsample.assign.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing keys.*stages\.0\.downsample\.assign\.k_proj\.weight"):
        hf_to_ours(missing, ours)
    extra = {**sd, "vision_model.encoder.stages.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys.*stages\.0\.extra\.weight"):
        hf_to_ours(extra, ours)
    bad = {**sd, "text_model.final_layer_norm.weight": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"shape mismatches.*text\.norm\.weight"):
        hf_to_ours(bad, ours)
    with pytest.raises(ValueError, match="missing keys"):
        load_hf_groupvit(missing, config=hf_small.config)


@st.composite
def _our_configs(draw) -> dict:
    """Our GroupViT kwargs within what HF's GroupViT can express (any head dim, 1-4 stages)."""
    n = draw(st.integers(1, 4))
    head_dim, heads = draw(st.sampled_from([4, 8, 16, 64])), draw(st.integers(1, 8))
    t_head_dim, t_heads = draw(st.sampled_from([4, 8, 32, 64])), draw(st.integers(1, 8))
    tokens = draw(st.lists(st.integers(1, 64), min_size=n - 1, max_size=n - 1))
    side = draw(st.integers(1, 14))
    patch = draw(st.sampled_from([4, 8, 16]))
    return dict(
        vision=dict(
            img_size=side * patch,
            patch_size=patch,
            in_chans=draw(st.sampled_from([1, 3])),
            embed_dim=heads * head_dim,
            num_heads=heads,
            depths=draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)),
            num_group_tokens=[*tokens, 0],
            num_output_groups=[draw(st.integers(1, 64)) for _ in tokens],
            mlp_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])),
            assign_eps=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
            assign_mlp_ratio=draw(st.sampled_from([(0.5, 4.0), (0.25, 2.0), (1.0, 1.0)])),
            act=draw(st.sampled_from(["gelu", "quick_gelu"])),
        ),
        text=dict(
            context_length=draw(st.integers(2, 77)),
            vocab_size=draw(st.integers(3, 50000)),
            width=t_heads * t_head_dim,
            layers=draw(st.integers(1, 12)),
            heads=t_heads,
            mlp_ratio=draw(st.sampled_from([2.0, 4.0])),
            act=draw(st.sampled_from(["gelu", "quick_gelu"])),
        ),
        proj_dim=draw(st.integers(1, 512)),
        proj_hidden=draw(st.integers(1, 4096)),
        logit_scale_init=draw(st.floats(0.0, 5.0)),
    )


@given(cfg=_our_configs(), wrong=st.integers(1, 24))
def test_hf_config_round_trip_property(cfg, wrong):
    """``config_from_hf(config_to_hf(cfg))`` gives back every field (head counts included, whatever
    the head dim), transformers reads the dict the same way, and a head count that does not
    divide the width is refused by name."""
    hf = config_to_hf(cfg)
    back = config_from_hf(hf)
    for part in ("vision", "text"):
        for k, v in cfg[part].items():
            got = back[part][k]
            assert (list(got) if isinstance(got, tuple) else got) == pytest.approx(
                list(v) if isinstance(v, tuple) else v
            ), (part, k)
    for k in ("proj_dim", "proj_hidden", "logit_scale_init"):
        assert back[k] == pytest.approx(cfg[k])
    assert config_from_hf(GroupViTConfig(**hf)) == back
    width = cfg["vision"]["embed_dim"]
    hf["vision_config"]["num_attention_heads"] = wrong
    if width % wrong:
        with pytest.raises(ValueError, match=r"vision_config\.num_attention_heads \(heads=\) = \d+ does not divide"):
            config_from_hf(hf)
    else:
        assert config_from_hf(hf)["vision"]["num_heads"] == wrong


# ------------------------------------------------------------------------------------- NVlabs
# Key layout of NVlabs/GroupViT's MultiLabelContrastive for its released config
# (configs/group_vit_gcc_yfcc_30e.yml), read off models/group_vit.py, models/transformer.py,
# models/utils.py and models/multi_label_contrastive.py. Identity modules (CrossAttnBlock's norm_q /
# norm_k with post_norm, GroupingBlock.reduction at constant width, the classification head) and
# the text attention mask (a plain attribute) hold no keys.
_W, _WB = ("weight",), ("weight", "bias")
NV_BLOCK = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in _WB]
NV_GROUPING = [
    f"{m}.{p}"
    for m in (
        "norm_tokens",
        "mlp_inter.fc1",
        "mlp_inter.fc2",
        "norm_post_tokens",
        "norm_x",
        "pre_assign_attn.norm_post",
        "pre_assign_attn.attn.q_proj",
        "pre_assign_attn.attn.k_proj",
        "pre_assign_attn.attn.v_proj",
        "pre_assign_attn.attn.proj",
        "pre_assign_attn.norm2",
        "pre_assign_attn.mlp.fc1",
        "pre_assign_attn.mlp.fc2",
        "assign.q_proj",
        "assign.k_proj",
        "assign.v_proj",
        "assign.proj",
        "norm_new_x",
        "mlp_channels.fc1",
        "mlp_channels.fc2",
    )
    for p in _WB
]
NV_RESBLOCK = ["attn.in_proj_weight", "attn.in_proj_bias"] + [
    f"{m}.{p}" for m in ("attn.out_proj", "ln_1", "mlp.c_fc", "mlp.c_proj", "ln_2") for p in _WB
]
NV_PROJECTOR = (
    ["linear_hidden.0.weight", "linear_hidden.0.bias"]
    + [f"linear_hidden.1.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    + ["linear_out.weight", "linear_out.bias"]
)


def nvlabs_default_keys() -> set[str]:
    keys = {"logit_scale", "multi_label_logit_scale", "img_encoder.pos_embed"}
    keys |= {f"img_encoder.patch_embed.{m}.{p}" for m in ("proj", "norm") for p in _WB}
    keys |= {f"img_encoder.norm.{p}" for p in _WB}
    for i, depth in enumerate([6, 3, 3]):
        keys |= {f"img_encoder.layers.{i}.blocks.{j}.{k}" for j in range(depth) for k in NV_BLOCK}
    for i in (0, 1):  # stages with group tokens and a grouping block
        keys.add(f"img_encoder.layers.{i}.group_token")
        keys |= {f"img_encoder.layers.{i}.downsample.{k}" for k in NV_GROUPING}
    keys |= {f"img_encoder.layers.1.group_projector.0.{p}" for p in _WB}
    keys |= {f"img_encoder.layers.1.group_projector.1.fc{n}.{p}" for n in (1, 2) for p in _WB}
    keys |= {"text_encoder.token_embedding.weight", "text_encoder.positional_embedding"}
    keys |= {f"text_encoder.ln_final.{p}" for p in _WB}
    keys |= {f"text_encoder.transformer.resblocks.{k}.{n}" for k in range(12) for n in NV_RESBLOCK}
    keys |= {f"{h}.{k}" for h in ("img_projector", "text_projector") for k in NV_PROJECTOR}
    return keys


NV_RELEASED_MODEL_CFG = {  # the ``model:`` section of configs/group_vit_gcc_yfcc_30e.yml
    "type": "MultiLabelContrastive",
    "img_encoder": {
        "type": "GroupViT",
        "embed_dim": 384,
        "num_heads": [6, 6, 6],
        "depths": [6, 3, 3],
        "num_group_tokens": [64, 8, 0],
        "num_output_groups": [64, 8],
        "drop_rate": 0.0,
        "drop_path_rate": 0.1,
    },
    "text_encoder": {"type": "TextTransformer", "context_length": 77, "width": 256, "layers": 12, "vocab_size": 49408},
    "contrast_temperature": 0.07,
    "proj_num_layers": 2,
    "output_dim": 256,
    "multi_label": 3,
}


def test_nvlabs_key_layout_matches_their_source():
    with torch.device("meta"):
        ours = GroupViT(**config_from_nvlabs(NV_RELEASED_MODEL_CFG))
    exported = ours_to_nvlabs(ours)
    expected = nvlabs_default_keys()
    assert set(exported) == expected, (sorted(set(exported) - expected), sorted(expected - set(exported)))
    # 1x1 Conv1d heads and the fused in_proj of torch's MultiheadAttention
    assert exported["img_projector.linear_hidden.0.weight"].shape == (4096, 384, 1)
    assert exported["text_projector.linear_out.weight"].shape == (256, 4096, 1)
    assert exported["text_encoder.transformer.resblocks.0.attn.in_proj_weight"].shape == (768, 256)
    assert exported["img_encoder.layers.1.group_projector.1.fc1.weight"].shape == (192, 64)


def _small_ours(seed: int = 0, **kw) -> GroupViT:
    torch.manual_seed(seed)
    model = GroupViT(
        vision=dict(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            num_heads=2,
            depths=(2, 1, 1),
            num_group_tokens=(8, 4, 0),
            num_output_groups=(8, 4),
        ),
        text=dict(context_length=8, vocab_size=40, width=16, layers=2, heads=2),
        proj_dim=8,
        proj_hidden=16,
        **kw,
    ).eval()
    _perturb(model, seed)
    return model


def test_nvlabs_config_inferred_from_released_layout():
    with torch.device("meta"):
        nv = ours_to_nvlabs(GroupViT(**config_from_nvlabs(NV_RELEASED_MODEL_CFG)))
    with pytest.raises(ValueError, match=r"record img_encoder\.num_heads, img_encoder\.hard_assignment\. Pass"):
        infer_config_from_nvlabs_state_dict({"model": nv})
    cfg = infer_config_from_nvlabs_state_dict({"model": nv}, heads=6, hard_assignment=True)
    v, t = cfg["vision"], cfg["text"]
    assert (v["img_size"], v["patch_size"], v["embed_dim"], v["num_heads"]) == (224, 16, 384, 6)
    assert v["depths"] == [6, 3, 3] and v["num_group_tokens"] == [64, 8, 0] and v["num_output_groups"] == [64, 8]
    assert v["mlp_ratio"] == 4.0 and v["assign_mlp_ratio"] == (0.5, 4.0)
    assert (t["context_length"], t["vocab_size"], t["width"], t["layers"], t["heads"]) == (77, 49408, 256, 12, 4)
    assert (cfg["proj_dim"], cfg["proj_hidden"], cfg["proj_layers"], cfg["multi_label_scale"]) == (256, 4096, 2, True)


def test_nvlabs_round_trip_and_checkpoint_wrapper():
    ours = _small_ours()
    nv = ours_to_nvlabs(ours)
    # a checkpoint as NVlabs saves it ({'model': ..., 'epoch': ...}), with a DDP prefix for good measure
    ckpt = {"model": {f"module.{k}": v for k, v in nv.items()}, "epoch": 29}
    back = load_nvlabs_groupvit(ckpt, heads=2, text_heads=2, hard_assignment=True).eval()
    ref_sd, got_sd = ours.state_dict(), back.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    x, ids = torch.randn(2, 3, 32, 32), _ids(2, 8, 39)
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(x)["image_embed"], ours.encode_image(x)["image_embed"])
        torch.testing.assert_close(back.encode_text(ids), ours.encode_text(ids))
    # three-layer heads survive too
    deep = _small_ours(proj_layers=3)
    again = load_nvlabs_groupvit(ours_to_nvlabs(deep), heads=2, text_heads=2, hard_assignment=True)
    assert again.image_proj.num_layers == 3
    assert all(torch.equal(a, b) for a, b in zip(deep.state_dict().values(), again.state_dict().values()))


def test_nvlabs_text_block_semantics_with_torch_multihead_attention():
    """NVlabs' text block is CLIP's ResidualAttentionBlock on torch's nn.MultiheadAttention (fused
    in_proj [q; k; v]); load our exported weights into one and compare with our block."""
    ours = _small_ours()
    nv = ours_to_nvlabs(ours)
    p = "text_encoder.transformer.resblocks.0."
    mha = torch.nn.MultiheadAttention(16, 2)
    mha.load_state_dict({k[len(p) + 5 :]: v for k, v in nv.items() if k.startswith(p + "attn.")})
    ln1, ln2 = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
    ln1.load_state_dict({"weight": nv[p + "ln_1.weight"], "bias": nv[p + "ln_1.bias"]})
    ln2.load_state_dict({"weight": nv[p + "ln_2.weight"], "bias": nv[p + "ln_2.bias"]})
    fc, proj = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    fc.load_state_dict({"weight": nv[p + "mlp.c_fc.weight"], "bias": nv[p + "mlp.c_fc.bias"]})
    proj.load_state_dict({"weight": nv[p + "mlp.c_proj.weight"], "bias": nv[p + "mlp.c_proj.bias"]})
    x = torch.randn(8, 2, 16)  # [L, B, C] as NVlabs runs it
    mask = torch.full((8, 8), float("-inf")).triu(1)
    with torch.no_grad():
        h = ln1(x)
        y = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
        z = ln2(y)
        z = fc(z)
        y = y + proj(z * torch.sigmoid(1.702 * z))
        torch.testing.assert_close(ours.text.blocks[0](x.transpose(0, 1)), y.transpose(0, 1), atol=1e-5, rtol=1e-5)
    # 1x1 Conv1d head == our Linear head
    conv = torch.nn.Conv1d(16, 16, 1)
    conv.load_state_dict(
        {"weight": nv["text_projector.linear_hidden.0.weight"], "bias": nv["text_projector.linear_hidden.0.bias"]}
    )
    t = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(conv(t[:, :, None])[..., 0], ours.text_proj.net.fc1(t), atol=1e-6, rtol=1e-5)


def test_nvlabs_bad_state_dict_names_the_keys():
    with torch.device("meta"):
        ours = GroupViT(**config_from_nvlabs(NV_RELEASED_MODEL_CFG))
    nv = ours_to_nvlabs(ours)
    missing = {k: v for k, v in nv.items() if k != "img_encoder.layers.1.downsample.norm_new_x.bias"}
    with pytest.raises(
        ValueError, match=r"missing keys in the NVlabs state dict: img_encoder\.layers\.1\.downsample\.norm_new_x\.bias"
    ):
        nvlabs_to_ours(missing, ours)
    extra = {**nv, "img_encoder.head.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys in the NVlabs state dict: img_encoder\.head\.weight"):
        nvlabs_to_ours(extra, ours)
    # an optional key (a checkpoint trained without multi-label prompts) is not an error
    no_ml = {k: v for k, v in nv.items() if k != "multi_label_logit_scale"}
    assert "multi_label_logit_scale" not in nvlabs_to_ours(no_ml, ours)


def test_nvlabs_config_conversion():
    cfg = config_from_nvlabs(NV_RELEASED_MODEL_CFG)
    assert cfg["vision"]["num_heads"] == 6 and cfg["text"]["heads"] == 4
    assert math.isclose(cfg["logit_scale_init"], math.log(1 / 0.07))
    assert cfg["multi_label_scale"] is True
    with pytest.raises(ValueError, match="embed_factors"):
        config_from_nvlabs({**NV_RELEASED_MODEL_CFG, "img_encoder": {"embed_factors": [1, 2, 2]}})
    with pytest.raises(ValueError, match="per-stage head counts"):
        config_from_nvlabs({**NV_RELEASED_MODEL_CFG, "img_encoder": {"num_heads": [6, 12, 12]}})


NV_SMALL_MODEL_CFG = {  # a small NVlabs ``model:`` section: text width 128 -> NVlabs' 2 heads
    "type": "MultiLabelContrastive",
    "img_encoder": {
        "type": "GroupViT",
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "num_heads": [4, 4, 4],
        "depths": [2, 1, 1],
        "num_group_tokens": [8, 4, 0],
        "num_output_groups": [8, 4],
        "hard_assignment": False,
    },
    "text_encoder": {"type": "TextTransformer", "context_length": 8, "width": 128, "layers": 1, "vocab_size": 40},
    "output_dim": 8,
    "multi_label": 0,
}


def test_nvlabs_heads_and_assignment_come_from_a_config():
    torch.manual_seed(0)
    ours = GroupViT(**config_from_nvlabs(NV_SMALL_MODEL_CFG)).eval()
    _perturb(ours)
    assert ours.vision.stages[0].blocks[0].attn.num_heads == 4 and ours.text.blocks[0].attn.num_heads == 2
    nv = ours_to_nvlabs(ours)
    # a bare state dict does not say how many image heads nor whether the assignment is hard
    with pytest.raises(ValueError, match=r"img_encoder\.num_heads, img_encoder\.hard_assignment.*heads=\.\.\."):
        load_nvlabs_groupvit({"model": nv})
    # a checkpoint as NVlabs saves it keeps its config: nothing to pass
    ckpt = {"model": nv, "config": {"model": NV_SMALL_MODEL_CFG}, "epoch": 3}
    x, ids = torch.randn(2, 3, 32, 32), _ids(2, 8, 39)
    for back in (
        load_nvlabs_groupvit(ckpt),
        load_nvlabs_groupvit(nv, config=NV_SMALL_MODEL_CFG),
        load_nvlabs_groupvit(nv, heads=4, hard_assignment=False),  # text: NVlabs' width // 64 = 2
    ):
        assert back.text.blocks[0].attn.num_heads == 2
        for a, b in zip(_outputs(back.eval(), x, ids), _outputs(ours, x, ids)):
            torch.testing.assert_close(a, b)
    # the wrong assignment mode gives other embeddings: it was worth asking for
    hard = load_nvlabs_groupvit(nv, heads=4, hard_assignment=True).eval()
    assert (_outputs(hard, x, ids)[0] - _outputs(ours, x, ids)[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"hard_assignment=True contradicts the config"):
        load_nvlabs_groupvit(ckpt, hard_assignment=True)
    with pytest.raises(ValueError, match=r"img_encoder\.num_heads \(heads=\) = 5 does not divide"):
        load_nvlabs_groupvit(nv, heads=5, hard_assignment=False)
    # a text tower narrower than 64 cannot come from NVlabs' rule: its head count must be given
    small = ours_to_nvlabs(_small_ours())
    with pytest.raises(ValueError, match="text_heads"):
        load_nvlabs_groupvit(small, heads=2, hard_assignment=True)
    with pytest.raises(ValueError, match="qk_scale"):
        config_from_nvlabs(
            {**NV_SMALL_MODEL_CFG, "img_encoder": {**NV_SMALL_MODEL_CFG["img_encoder"], "qk_scale": 0.1}}
        )
