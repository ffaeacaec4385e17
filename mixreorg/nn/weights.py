"""Import (and export) of public GroupViT weights into :class:`mixreorg.nn.GroupViT`.

Two layouts are understood:

* Hugging Face ``transformers`` (``GroupViTModel.state_dict()``; keys ``vision_model.*``,
  ``text_model.*``, ``visual_projection.*``, ``text_projection.*``, ``logit_scale``).
* The official NVlabs/GroupViT checkpoints (``{'model': state_dict, ...}``; keys ``img_encoder.*``,
  ``text_encoder.*``, ``img_projector.*``, ``text_projector.*``, ``logit_scale``,
  ``multi_label_logit_scale``).

One table per layout maps every key of our model to the key(s) of the other layout; the same table
drives import (``*_to_ours``) and export (``ours_to_*``). Fused projections are concatenated on
import and split on export (HF's separate ``q/k/v_proj`` -> our ``qkv``; NVlabs' 1x1 ``Conv1d``
heads -> our ``Linear``). Missing or unexpected keys, and shape mismatches, raise ``ValueError``
naming them.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .groupvit import GroupViT

__all__ = [
    "config_from_hf",
    "config_from_nvlabs",
    "config_to_hf",
    "infer_config_from_hf_state_dict",
    "infer_config_from_nvlabs_state_dict",
    "hf_to_ours",
    "ours_to_hf",
    "nvlabs_to_ours",
    "ours_to_nvlabs",
    "load_hf_groupvit",
    "load_nvlabs_groupvit",
]

# A rule maps an our-key regex to a function of its match giving (their keys, kind), kind being
# "copy" (same tensor), "cat" (their tensors concatenated on dim 0 / split on export) or
# "conv1x1" (their Conv1d weight [O, I, 1] <-> our Linear weight [O, I]).

# keys that may be absent from a source state dict: our freshly initialised value is kept
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_OPTIONAL_KEYS = ("multi_label_logit_scale",)
# source keys that carry no weights (buffers recomputed by the model)
_IGNORED_SOURCE = {
    "hf": (
        re.compile(r"^text_model\.embeddings\.position_ids$"),
        re.compile(r"^vision_model\.embeddings\.position_ids$"),
    ),
    "nvlabs": (),
}


def _one(key: str) -> tuple[list[str], str]:
    return [key], "copy"


# ---------------------------------------------------------------------------------- sub-tables
def _block_hf(prefix: str, rest: str) -> tuple[list[str], str] | None:
    m = re.fullmatch(r"attn\.qkv\.(weight|bias)", rest)
    if m:
        p = m.group(1)
        return [f"{prefix}self_attn.{n}_proj.{p}" for n in ("q", "k", "v")], "cat"
    table = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.proj": "self_attn.out_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    mod, _, p = rest.rpartition(".")
    if mod in table:
        return _one(f"{prefix}{table[mod]}.{p}")
    return None


def _block_nvlabs_vision(prefix: str, rest: str) -> tuple[list[str], str] | None:
    mod, _, _ = rest.rpartition(".")
    if mod in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        return _one(prefix + rest)
    return None


def _block_nvlabs_text(prefix: str, rest: str) -> tuple[list[str], str] | None:
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        return _one(f"{prefix}attn.in_proj_{rest.rsplit('.', 1)[1]}")
    table = {
        "norm1": "ln_1",
        "norm2": "ln_2",
        "attn.proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    mod, _, p = rest.rpartition(".")
    if mod in table:
        return _one(f"{prefix}{table[mod]}.{p}")
    return None


def _grouping(prefix: str, rest: str, cross_out: str) -> tuple[list[str], str] | None:
    mod, _, p = rest.rpartition(".")
    if mod == "cross_attn.attn.kv":
        return [f"{prefix}pre_assign_attn.attn.k_proj.{p}", f"{prefix}pre_assign_attn.attn.v_proj.{p}"], "cat"
    if mod == "assign.kv":
        return [f"{prefix}assign.k_proj.{p}", f"{prefix}assign.v_proj.{p}"], "cat"
    table = {
        "norm_groups": "norm_tokens",
        "group_mlp.fc1": "mlp_inter.fc1",
        "group_mlp.fc2": "mlp_inter.fc2",
        "norm_group_mlp": "norm_post_tokens",
        "norm_x": "norm_x",
        "cross_attn.attn.q": "pre_assign_attn.attn.q_proj",
        "cross_attn.attn.proj": f"pre_assign_attn.attn.{cross_out}",
        "cross_attn.norm2": "pre_assign_attn.norm2",
        "cross_attn.mlp.fc1": "pre_assign_attn.mlp.fc1",
        "cross_attn.mlp.fc2": "pre_assign_attn.mlp.fc2",
        "cross_attn.norm_post": "pre_assign_attn.norm_post",
        "assign.q": "assign.q_proj",
        "assign.proj": "assign.proj",
        "norm_out": "norm_new_x",
        "mlp.fc1": "mlp_channels.fc1",
        "mlp.fc2": "mlp_channels.fc2",
    }
    if mod in table:
        return _one(f"{prefix}{table[mod]}.{p}")
    return None


def _hf_head(name: str, rest: str) -> tuple[list[str], str] | None:
    # HF heads are nn.Sequential(Linear, BatchNorm1d, ReLU, Linear): indices 0, 1, 3
    mod, _, p = rest.rpartition(".")
    idx = {"net.fc1": 0, "net.bn1": 1, "net.out": 3}.get(mod)
    if idx is None:
        return None
    return _one(f"{name}.{idx}.{p}")


def _nvlabs_head(name: str, rest: str) -> tuple[list[str], str] | None:
    mod, _, p = rest.rpartition(".")
    m = re.fullmatch(r"net\.(fc|bn)(\d+)", mod)
    if m:
        i = int(m.group(2)) - 1
        idx = 3 * i + (0 if m.group(1) == "fc" else 1)
        kind = "conv1x1" if (m.group(1) == "fc" and p == "weight") else "copy"
        return [f"{name}.linear_hidden.{idx}.{p}"], kind
    if mod == "net.out":
        return [f"{name}.linear_out.{p}"], "conv1x1" if p == "weight" else "copy"
    return None


# ---------------------------------------------------------------------------------- key maps
def _map_key_hf(key: str) -> tuple[list[str], str] | None:
    """Our key -> (HF keys, kind), or None when the key has no HF counterpart."""
    rules: list[tuple[str, Callable[[re.Match[str]], tuple[list[str], str] | None]]] = [
        (
            r"vision\.patch_embed\.proj\.(\w+)",
            lambda m: _one(f"vision_model.embeddings.patch_embeddings.projection.{m[1]}"),
        ),
        (r"vision\.patch_embed\.norm\.(\w+)", lambda m: _one(f"vision_model.embeddings.layernorm.{m[1]}")),
        (r"vision\.pos_embed", lambda m: _one("vision_model.embeddings.position_embeddings")),
        (r"vision\.stages\.(\d+)\.group_token", lambda m: _one(f"vision_model.encoder.stages.{m[1]}.group_token")),
        (
            r"vision\.stages\.(\d+)\.group_projector\.norm\.(\w+)",
            lambda m: _one(f"vision_model.encoder.stages.{m[1]}.group_projector.0.{m[2]}"),
        ),
        (
            r"vision\.stages\.(\d+)\.group_projector\.mlp\.(fc[12])\.(\w+)",
            lambda m: _one(f"vision_model.encoder.stages.{m[1]}.group_projector.1.{m[2]}.{m[3]}"),
        ),
        (
            r"vision\.stages\.(\d+)\.blocks\.(\d+)\.(.+)",
            lambda m: _block_hf(f"vision_model.encoder.stages.{m[1]}.layers.{m[2]}.", m[3]),
        ),
        (
            r"vision\.stages\.(\d+)\.downsample\.(.+)",
            lambda m: _grouping(f"vision_model.encoder.stages.{m[1]}.downsample.", m[2], "out_proj"),
        ),
        (r"vision\.norm\.(\w+)", lambda m: _one(f"vision_model.layernorm.{m[1]}")),
        (r"text\.token_embed\.weight", lambda m: _one("text_model.embeddings.token_embedding.weight")),
        (r"text\.pos_embed", lambda m: _one("text_model.embeddings.position_embedding.weight")),
        (r"text\.blocks\.(\d+)\.(.+)", lambda m: _block_hf(f"text_model.encoder.layers.{m[1]}.", m[2])),
        (r"text\.norm\.(\w+)", lambda m: _one(f"text_model.final_layer_norm.{m[1]}")),
        (r"image_proj\.(.+)", lambda m: _hf_head("visual_projection", m[1])),
        (r"text_proj\.(.+)", lambda m: _hf_head("text_projection", m[1])),
        (r"logit_scale", lambda m: _one("logit_scale")),
    ]
    for pat, fn in rules:
        m = re.fullmatch(pat, key)
        if m:
            return fn(m)
    return None


def _map_key_nvlabs(key: str) -> tuple[list[str], str] | None:
    """Our key -> (NVlabs keys, kind), or None when the key has no NVlabs counterpart."""
    rules: list[tuple[str, Callable[[re.Match[str]], tuple[list[str], str] | None]]] = [
        (r"vision\.patch_embed\.(proj|norm)\.(\w+)", lambda m: _one(f"img_encoder.patch_embed.{m[1]}.{m[2]}")),
        (r"vision\.pos_embed", lambda m: _one("img_encoder.pos_embed")),
        (r"vision\.stages\.(\d+)\.group_token", lambda m: _one(f"img_encoder.layers.{m[1]}.group_token")),
        (
            r"vision\.stages\.(\d+)\.group_projector\.norm\.(\w+)",
            lambda m: _one(f"img_encoder.layers.{m[1]}.group_projector.0.{m[2]}"),
        ),
        (
            r"vision\.stages\.(\d+)\.group_projector\.mlp\.(fc[12])\.(\w+)",
            lambda m: _one(f"img_encoder.layers.{m[1]}.group_projector.1.{m[2]}.{m[3]}"),
        ),
        (
            r"vision\.stages\.(\d+)\.blocks\.(\d+)\.(.+)",
            lambda m: _block_nvlabs_vision(f"img_encoder.layers.{m[1]}.blocks.{m[2]}.", m[3]),
        ),
        (
            r"vision\.stages\.(\d+)\.downsample\.(.+)",
            lambda m: _grouping(f"img_encoder.layers.{m[1]}.downsample.", m[2], "proj"),
        ),
        (r"vision\.norm\.(\w+)", lambda m: _one(f"img_encoder.norm.{m[1]}")),
        (r"text\.token_embed\.weight", lambda m: _one("text_encoder.token_embedding.weight")),
        (r"text\.pos_embed", lambda m: _one("text_encoder.positional_embedding")),
        (
            r"text\.blocks\.(\d+)\.(.+)",
            lambda m: _block_nvlabs_text(f"text_encoder.transformer.resblocks.{m[1]}.", m[2]),
        ),
        (r"text\.norm\.(\w+)", lambda m: _one(f"text_encoder.ln_final.{m[1]}")),
        (r"image_proj\.(.+)", lambda m: _nvlabs_head("img_projector", m[1])),
        (r"text_proj\.(.+)", lambda m: _nvlabs_head("text_projector", m[1])),
        (r"logit_scale", lambda m: _one("logit_scale")),
        (r"multi_label_logit_scale", lambda m: _one("multi_label_logit_scale")),
    ]
    for pat, fn in rules:
        m = re.fullmatch(pat, key)
        if m:
            return fn(m)
    return None


_MAPPERS = {"hf": _map_key_hf, "nvlabs": _map_key_nvlabs}
_NAMES = {"hf": "Hugging Face", "nvlabs": "NVlabs"}


def _is_optional(key: str) -> bool:
    return key.endswith(_OPTIONAL_SUFFIXES) or key in _OPTIONAL_KEYS


def _fmt_keys(keys: list[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _to_ours(fmt: str, state_dict: Mapping[str, torch.Tensor], model: GroupViT) -> dict[str, torch.Tensor]:
    mapper = _MAPPERS[fmt]
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    unmapped: list[str] = []
    shape_errors: list[str] = []
    for key, ref in ours.items():
        rule = mapper(key)
        if rule is None:
            if _is_optional(key):
                continue
            unmapped.append(key)
            continue
        theirs, kind = rule
        absent = [t for t in theirs if t not in state_dict]
        if absent:
            if not _is_optional(key):
                missing.extend(absent)
            continue
        used.update(theirs)
        tensors = [torch.as_tensor(state_dict[t]) for t in theirs]
        if kind == "cat":
            value = torch.cat(tensors, dim=0)
        elif kind == "conv1x1":
            value = tensors[0]
            if value.ndim == 3 and value.shape[-1] == 1:
                value = value[..., 0]
        else:
            value = tensors[0]
        if tuple(value.shape) != tuple(ref.shape):
            shapes = " + ".join(str(tuple(t.shape)) for t in tensors)
            shape_errors.append(f"{key} <- {' + '.join(theirs)}: {shapes} vs ours {tuple(ref.shape)}")
            continue
        out[key] = value.detach().to(dtype=ref.dtype, copy=True)  # never share storage with the source
    ignored = _IGNORED_SOURCE[fmt]
    unexpected = [k for k in state_dict if k not in used and not any(p.fullmatch(k) for p in ignored)]
    problems = []
    if unmapped:
        problems.append(f"our keys with no {_NAMES[fmt]} counterpart: {_fmt_keys(unmapped)}")
    if missing:
        problems.append(f"missing keys in the {_NAMES[fmt]} state dict: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys in the {_NAMES[fmt]} state dict: {_fmt_keys(unexpected)}")
    if shape_errors:
        problems.append("shape mismatches (is the config right?): " + "; ".join(shape_errors[:20]))
    if problems:
        raise ValueError(f"cannot load the {_NAMES[fmt]} GroupViT weights: " + " | ".join(problems))
    return out


def _from_ours(fmt: str, model_or_state: GroupViT | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapper = _MAPPERS[fmt]
    sd = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        rule = mapper(key)
        if rule is None:
            if _is_optional(key):
                continue
            raise ValueError(f"our key {key!r} has no {_NAMES[fmt]} counterpart")
        theirs, kind = rule
        value = value.detach().clone()
        if kind == "cat":
            for t, part in zip(theirs, value.chunk(len(theirs), dim=0)):
                out[t] = part.clone()
        elif kind == "conv1x1":
            out[theirs[0]] = value[..., None]
        else:
            out[theirs[0]] = value
    return out


def hf_to_ours(state_dict: Mapping[str, torch.Tensor], model: GroupViT) -> dict[str, torch.Tensor]:
    """Translate a Hugging Face ``GroupViTModel`` state dict into ``model``'s key layout.

    Raises ``ValueError`` listing missing / unexpected keys and shape mismatches.
    """
    return _to_ours("hf", state_dict, model)


def ours_to_hf(model: GroupViT | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights in the Hugging Face ``GroupViTModel`` layout (``multi_label_logit_scale``,
    which HF lacks, is dropped)."""
    return _from_ours("hf", model)


def nvlabs_to_ours(state_dict: Mapping[str, torch.Tensor], model: GroupViT) -> dict[str, torch.Tensor]:
    """Translate an NVlabs ``MultiLabelContrastive`` state dict into ``model``'s key layout."""
    return _to_ours("nvlabs", _unwrap_nvlabs(state_dict), model)


def ours_to_nvlabs(model: GroupViT | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights in the NVlabs ``MultiLabelContrastive`` layout (1x1 Conv1d projection heads)."""
    return _from_ours("nvlabs", model)


# ---------------------------------------------------------------------------------- configs
# What the tensors of a state dict cannot tell is never guessed: it comes from a config, from the
# loaders' keywords, or the loader raises naming the missing fields. Each row: (keyword of the
# loaders, our part, our key, the source's config field); part None: checked, not a kwarg of ours.
_Row = tuple[str, "str | None", "str | None", str]
_HF_UNRECORDED: tuple[_Row, ...] = (
    ("heads", "vision", "num_heads", "vision_config.num_attention_heads"),
    ("text_heads", "text", "heads", "text_config.num_attention_heads"),
    ("assign_eps", "vision", "assign_eps", "vision_config.assign_eps"),
    ("act", "vision", "act", "vision_config.hidden_act"),
    ("text_act", "text", "act", "text_config.hidden_act"),
    ("layer_norm_eps", None, None, "vision_config.layer_norm_eps and text_config.layer_norm_eps"),
)
# NVlabs' YAML sets these per run; everything else not in the shapes is fixed by their code
# (assign_eps 1, GELU / QuickGELU, cross-attention MLP ratio 4, text heads width // 64).
_NV_UNRECORDED: tuple[_Row, ...] = (
    ("heads", "vision", "num_heads", "img_encoder.num_heads"),
    ("hard_assignment", "vision", "hard_assignment", "img_encoder.hard_assignment"),
)
_NV_TEXT_HEADS: _Row = ("text_heads", "text", "heads", "the text heads (NVlabs' TextTransformer: width // 64)")
_HEAD_FIELDS = {
    "hf": {
        "vision": "vision_config.num_attention_heads (heads=)",
        "text": "text_config.num_attention_heads (text_heads=)",
    },
    "nvlabs": {"vision": "img_encoder.num_heads (heads=)", "text": "the text head count (text_heads=)"},
}
_HOW = {
    "hf": "config= (a transformers GroupViTConfig, or the dict of the config.json saved with the weights)",
    "nvlabs": "config= (the model: section of the NVlabs YAML; their checkpoints keep it under 'config')",
}
_HINT = {  # informative only, never applied
    "hf": " (transformers' GroupViTConfig defaults: heads=6, text_heads=4, assign_eps=1.0, act='gelu', "
    "text_act='quick_gelu', layer_norm_eps=1e-05)",
    "nvlabs": " (NVlabs' defaults: heads=6, hard_assignment=True)",
}
_ACTS = ("gelu", "quick_gelu")
_MISSING = object()


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _single_size(v: Any, what: str) -> int | tuple[int, int]:
    if isinstance(v, int):
        return v
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"{what} must be an int or a pair, got {v!r}")
    return t if t[0] != t[1] else t[0]


def _check_act(act: Any, field: str) -> str:
    if act not in _ACTS:
        raise ValueError(f"unsupported {field} {act!r}: only 'gelu' and 'quick_gelu' are implemented")
    return act


def _check_ln_eps(eps: Any, field: str) -> float:
    eps = float(eps)
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"unsupported {field} {eps}: only 1e-5 is implemented")
    return eps


def _check_heads(cfg: dict, fmt: str) -> dict:
    """Both towers' head counts are positive integers dividing their widths (``ValueError`` naming the field)."""
    for part, width_key, heads_key in (("vision", "embed_dim", "num_heads"), ("text", "width", "heads")):
        sub = cfg.get(part)
        if not isinstance(sub, Mapping) or heads_key not in sub or width_key not in sub:
            continue
        heads, width, field = sub[heads_key], int(sub[width_key]), _HEAD_FIELDS[fmt][part]
        if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads <= 0:
            raise ValueError(f"{field} must be a positive integer, got {heads!r}")
        if width % int(heads):
            raise ValueError(
                f"{field} = {heads} does not divide the {part} width {width}: the head count is wrong "
                "(heads * head_dim must equal the width)"
            )
        sub[heads_key] = int(heads)
    return cfg


def _resolve(rows: tuple[_Row, ...], given: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``rows`` from the keywords (or the ``vision=`` / ``text=`` overrides); raises
    ``ValueError`` naming every field that neither holds."""
    values: dict[str, Any] = {}
    missing: list[_Row] = []
    for row in rows:
        kw, part, key, _ = row
        v = given.get(kw)
        if v is None and part is not None:
            sub = overrides.get(part)
            if isinstance(sub, Mapping) and sub.get(key) is not None:
                v = sub[key]
        if v is None:
            missing.append(row)
        else:
            values[kw] = v
    if missing:
        fmt = "hf" if rows is _HF_UNRECORDED else "nvlabs"
        fields = ", ".join(r[3] for r in missing)
        kws = ", ".join(f"{r[0]}=..." for r in missing)
        raise ValueError(
            f"cannot build a GroupViT for these {_NAMES[fmt]} weights without a config: their tensors do not "
            f"record {fields}. Pass {_HOW[fmt]}, or give the value(s) explicitly: {kws}{_HINT[fmt]}"
        )
    return values


def _apply(cfg: dict, rows: tuple[_Row, ...], values: Mapping[str, Any]) -> dict:
    for kw, part, key, field in rows:
        if kw not in values:
            continue
        v = values[kw]
        if part is None:
            _check_ln_eps(v, field)
            continue
        if key == "act":
            v = _check_act(v, field)
        elif key == "assign_eps":
            v = float(v)
        elif key == "hard_assignment":
            v = bool(v)
            cfg["vision"]["gumbel"] = v  # GroupViT: Gumbel noise exactly with hard assignment
        cfg[part][key] = v
    return cfg


def _check_agrees(cfg: dict, rows: tuple[_Row, ...], given: Mapping[str, Any]) -> None:
    """Keywords given alongside a config must agree with it (never silently ignored)."""
    for kw, part, key, field in rows:
        v = given.get(kw)
        if v is None:
            continue
        if part is None:
            _check_ln_eps(v, f"{kw}=")
            continue
        ours = cfg.setdefault(part, {}).get(key, _MISSING)
        if ours is _MISSING:  # a config of our kwargs without this key: the keyword fills it
            _apply(cfg, ((kw, part, key, field),), {kw: v})
            continue
        same = (
            math.isclose(float(v), float(ours))
            if isinstance(v, (int, float)) and isinstance(ours, (int, float))
            else v == ours
        )
        if not same:
            raise ValueError(
                f"{kw}={v!r} contradicts the config ({field} = {ours!r}): drop the keyword or fix the config"
            )


def _hf_complete(hf_config: Any) -> Any:
    """A config.json in the legacy ``text_config_dict`` / ``vision_config_dict`` layout holds only
    non-default fields: let transformers fill them, as it does when loading that folder."""
    if isinstance(hf_config, Mapping) and ("text_config_dict" in hf_config or "vision_config_dict" in hf_config):
        try:
            from transformers import GroupViTConfig
        except ImportError as err:
            raise ValueError(
                "this GroupViT config uses the legacy text_config_dict / vision_config_dict layout, whose absent "
                "fields only transformers can fill: install transformers or pass "
                "transformers.GroupViTConfig.from_pretrained(folder)"
            ) from err
        return GroupViTConfig(**hf_config)
    return hf_config


# the HF config fields that shape the model's function: config_from_hf refuses a config without them
_HF_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "depths", "num_group_tokens", "num_output_groups",
    "num_attention_heads", "image_size", "patch_size", "num_channels", "assign_eps", "assign_mlp_ratio",
    "hidden_act", "layer_norm_eps",
)  # fmt: skip
_HF_TEXT_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "vocab_size", "hidden_act", "layer_norm_eps",
)  # fmt: skip
_HF_TOP_FIELDS = ("projection_dim", "projection_intermediate_dim")


def _hf_required_fields(hf_config: Any, v: Any, t: Any) -> tuple[dict, dict, dict]:
    """The required fields of the vision config ``v``, the text config ``t`` and the top level.

    Collects every absent one before raising, so that a hand-written config is fixed in one go.
    """
    missing: list[str] = []

    def need(obj: Any, name: str, where: str) -> Any:
        val = _get(obj, name, _MISSING)
        if val is _MISSING or val is None:
            missing.append(f"{where}{name}")
            return None
        return val

    vf = {n: need(v, n, "vision_config.") for n in _HF_VISION_FIELDS}
    tf = {n: need(t, n, "text_config.") for n in _HF_TEXT_FIELDS}
    top = {n: need(hf_config, n, "") for n in _HF_TOP_FIELDS}
    if missing:
        raise ValueError(
            f"the Hugging Face GroupViT config lacks {', '.join(missing)}: pass the complete config "
            "(transformers.GroupViTConfig.from_pretrained(folder), or the config.json that save_pretrained writes)"
        )
    return vf, tf, top


def _hf_vision_kwargs(vf: dict, v: Any) -> dict:
    """Our :class:`GroupViTVisionEncoder` kwargs from the required vision fields ``vf`` (and the
    optional dropouts of the vision config ``v``)."""
    depths = list(vf["depths"])
    hidden = int(vf["hidden_size"])
    return {
        "img_size": _single_size(vf["image_size"], "image_size"),
        "patch_size": int(_single_size(vf["patch_size"], "patch_size")),  # type: ignore[arg-type]
        "in_chans": int(vf["num_channels"]),
        "embed_dim": hidden,
        "num_heads": vf["num_attention_heads"],
        "depths": depths,
        "num_group_tokens": list(vf["num_group_tokens"]),
        "num_output_groups": list(vf["num_output_groups"])[: len(depths) - 1],
        "mlp_ratio": int(vf["intermediate_size"]) / hidden,
        "cross_attn_mlp_ratio": int(vf["intermediate_size"]) / hidden,  # HF: the same intermediate_size
        "assign_eps": float(vf["assign_eps"]),
        "assign_mlp_ratio": tuple(float(x) for x in vf["assign_mlp_ratio"]),
        "act": _check_act(vf["hidden_act"], "vision_config.hidden_act"),
        # fixed by HF's code: straight-through hard assignment with Gumbel noise (tau 1) in training
        "hard_assignment": True,
        "gumbel": True,
        "gumbel_tau": 1.0,
        "drop_rate": float(_get(v, "dropout", 0.0) or 0.0),
        "attn_drop_rate": float(_get(v, "attention_dropout", 0.0) or 0.0),
    }


def _hf_text_kwargs(tf: dict) -> dict:
    """Our text-encoder kwargs from the required text fields ``tf``."""
    t_hidden = int(tf["hidden_size"])
    return {
        "context_length": int(tf["max_position_embeddings"]),
        "vocab_size": int(tf["vocab_size"]),
        "width": t_hidden,
        "layers": int(tf["num_hidden_layers"]),
        "heads": tf["num_attention_heads"],
        "mlp_ratio": int(tf["intermediate_size"]) / t_hidden,
        "act": _check_act(tf["hidden_act"], "text_config.hidden_act"),
    }


def config_from_hf(hf_config: Any, **overrides: Any) -> dict:
    """Our :class:`GroupViT` kwargs from a ``transformers.GroupViTConfig`` (or its ``to_dict()`` /
    ``config.json``).

    Every field that shapes the model's function must be present (a ``ValueError`` names those
    that are not); only dropout rates, which change training alone, default to 0. Training-only
    options HF does not store (drop-path) keep our defaults; ``overrides`` update the result's top
    level (``vision=`` / ``text=`` dicts are merged).
    """
    hf_config = _hf_complete(hf_config)
    v = _get(hf_config, "vision_config")
    t = _get(hf_config, "text_config")
    if v is None or t is None:
        raise ValueError("expected a GroupViTConfig with vision_config and text_config")
    vf, tf, top = _hf_required_fields(hf_config, v, t)
    _check_ln_eps(vf["layer_norm_eps"], "vision_config.layer_norm_eps")
    _check_ln_eps(tf["layer_norm_eps"], "text_config.layer_norm_eps")
    cfg = {
        "vision": _hf_vision_kwargs(vf, v),
        "text": _hf_text_kwargs(tf),
        "proj_dim": int(top["projection_dim"]),
        "proj_hidden": int(top["projection_intermediate_dim"]),
        "proj_layers": 2,
        # initialises only our multi-label scale, which HF does not have
        "logit_scale_init": float(_get(hf_config, "logit_scale_init_value", math.log(1 / 0.07))),
    }
    return _check_heads(_merge(cfg, overrides), "hf")


def config_from_nvlabs(model_cfg: Mapping[str, Any], **overrides: Any) -> dict:
    """Our :class:`GroupViT` kwargs from an NVlabs model config (the ``model:`` section of their
    YAML: ``img_encoder``, ``text_encoder``, ``output_dim``, ``contrast_temperature``,
    ``proj_num_layers``, ``multi_label``).

    A key absent from the YAML takes the default of NVlabs' own classes, as their builder does. The
    text tower has ``width // 64`` heads: NVlabs' ``TextTransformer`` fixes that rule (a modified
    tower: ``text={"heads": ...}``)."""
    img = model_cfg.get("img_encoder", {}) or {}
    txt = model_cfg.get("text_encoder", {}) or {}
    heads = img.get("num_heads", [6, 6, 6])
    heads = list(heads) if not isinstance(heads, int) else [heads]
    if len(set(heads)) != 1:
        raise ValueError(f"per-stage head counts {heads} are not supported: one value for all stages")
    factors = list(img.get("embed_factors", [1] * len(img.get("depths", [6, 3, 3]))))
    if any(f != 1 for f in factors):
        raise ValueError(f"embed_factors {factors} are not supported: the width must stay constant")
    if img.get("qk_scale") is not None:
        raise ValueError(f"img_encoder.qk_scale {img['qk_scale']} is not supported: only head_dim ** -0.5")
    if not img.get("patch_norm", True):
        raise ValueError("img_encoder.patch_norm False is not supported: the patch embedding is normalised")
    vision = {
        "img_size": img.get("img_size", 224),
        "patch_size": img.get("patch_size", 16),
        "in_chans": img.get("in_chans", 3),
        "embed_dim": img.get("embed_dim", 384),
        "num_heads": heads[0],
        "depths": list(img.get("depths", [6, 3, 3])),
        "num_group_tokens": list(img.get("num_group_tokens", [64, 8, 0])),
        "num_output_groups": list(img.get("num_output_groups", [64, 8])),
        "mlp_ratio": img.get("mlp_ratio", 4.0),
        "qkv_bias": img.get("qkv_bias", True),
        "drop_rate": img.get("drop_rate", 0.0),
        "attn_drop_rate": img.get("attn_drop_rate", 0.0),
        "drop_path_rate": img.get("drop_path_rate", 0.1),
        "hard_assignment": img.get("hard_assignment", True),
        "gumbel": img.get("hard_assignment", True),
        **_NV_VISION_FIXED,
    }
    width = txt.get("width", 256)
    text_override = overrides.get("text")
    if width // 64 < 1 and not (isinstance(text_override, Mapping) and text_override.get("heads")):
        raise ValueError(
            f"NVlabs' TextTransformer has width // 64 heads, none at text width {width}: pass text={{'heads': ...}}"
        )
    text = {
        "context_length": txt.get("context_length", 77),
        "vocab_size": txt.get("vocab_size", 49408),
        "width": width,
        "layers": txt.get("layers", 12),
        "heads": width // 64,
        **_NV_TEXT_FIXED,
    }
    cfg = {
        "vision": vision,
        "text": text,
        "proj_dim": model_cfg.get("output_dim", 256),
        "proj_hidden": 4096,
        "proj_layers": model_cfg.get("proj_num_layers", 2),
        "logit_scale_init": math.log(1 / model_cfg.get("contrast_temperature", 0.07)),
        "multi_label_scale": bool(model_cfg.get("multi_label", 0)) and not model_cfg.get("share_temperature", False),
    }
    return _check_heads(_merge(cfg, overrides), "nvlabs")


# fixed by NVlabs' code (GroupingBlock, Mlp, CrossAttnBlock, ResidualAttentionBlock), not by their YAML
_NV_VISION_FIXED = {
    "assign_eps": 1.0,
    "assign_mlp_ratio": (0.5, 4.0),
    "cross_attn_mlp_ratio": 4.0,
    "gumbel_tau": 1.0,
    "act": "gelu",
}
_NV_TEXT_FIXED = {"mlp_ratio": 4.0, "act": "quick_gelu"}


def _merge(cfg: dict, overrides: Mapping[str, Any]) -> dict:
    for k, v in overrides.items():
        if k in ("vision", "text") and isinstance(v, Mapping):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def _count(keys: list[str], pattern: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def _infer_shapes(sd: Mapping[str, torch.Tensor], names: dict[str, str], img_size: Any = None) -> dict:
    """What the tensor shapes tell (widths, depths, token counts, MLP ratios, image and patch size);
    ``names`` gives the layout's key templates. Head counts and the like are left out."""
    keys = list(sd)

    def req(name: str, **fmt: Any) -> torch.Tensor:
        k = names[name].format(**fmt)
        if k not in sd:
            raise ValueError(f"cannot infer the config: key {k!r} is missing from the state dict")
        return sd[k]

    pos = req("pos_embed")
    proj_w = req("patch_proj")
    C = pos.shape[-1]
    patch = proj_w.shape[-1]
    n_pos = pos.shape[-2]
    if img_size is None:
        side = math.isqrt(n_pos)
        if side * side != n_pos:
            raise ValueError(
                f"{n_pos} position embeddings are not a square grid: pass the image size, "
                "e.g. vision={'img_size': (H, W)}"
            )
        img_size = side * patch  # a square grid of patches (the tensors cannot tell 8x8 from 4x16)
    n_stages = _count(keys, names["stage_re"])
    depths = [_count(keys, names["block_re"].format(i=i)) for i in range(n_stages)]
    group_tokens = [
        sd[names["group_token"].format(i=i)].shape[1] if names["group_token"].format(i=i) in sd else 0
        for i in range(n_stages)
    ]
    out_groups = [req("group_mlp_fc2", i=i).shape[0] for i in range(n_stages - 1)]
    mlp_hidden = req("block_fc1", i=0, j=0).shape[0]
    tok_hidden = req("group_mlp_fc1", i=0).shape[0] if n_stages > 1 else C // 2
    ch_hidden = req("channels_fc1", i=0).shape[0] if n_stages > 1 else 4 * C
    cross_hidden = req("cross_fc1", i=0).shape[0] if n_stages > 1 else None
    tw = req("text_tok").shape
    t_pos = req("text_pos")
    t_layers = _count(keys, names["text_block_re"])
    t_hidden = req("text_fc1", k=0).shape[0]
    img_proj_out = req("img_proj_out")
    proj_hidden = req("img_proj_fc1")
    vision = {
        "img_size": img_size,
        "patch_size": patch,
        "in_chans": proj_w.shape[1],
        "embed_dim": C,
        "depths": depths,
        "num_group_tokens": group_tokens,
        "num_output_groups": out_groups,
        "mlp_ratio": mlp_hidden / C,
        "assign_mlp_ratio": (tok_hidden / C, ch_hidden / C),
        "cross_attn_mlp_ratio": None if cross_hidden is None else cross_hidden / C,
    }
    text = {
        "context_length": t_pos.shape[0],
        "vocab_size": tw[0],
        "width": tw[1],
        "layers": t_layers,
        "mlp_ratio": t_hidden / tw[1],
    }
    return {
        "vision": vision,
        "text": text,
        "proj_dim": img_proj_out.shape[0],
        "proj_hidden": proj_hidden.shape[0],
        "proj_layers": 2,
    }


_HF_NAMES = {
    "pos_embed": "vision_model.embeddings.position_embeddings",
    "patch_proj": "vision_model.embeddings.patch_embeddings.projection.weight",
    "stage_re": r"vision_model\.encoder\.stages\.(\d+)\.",
    "block_re": r"vision_model\.encoder\.stages\.{i}\.layers\.(\d+)\.",
    "group_token": "vision_model.encoder.stages.{i}.group_token",
    "group_mlp_fc1": "vision_model.encoder.stages.{i}.downsample.mlp_inter.fc1.weight",
    "group_mlp_fc2": "vision_model.encoder.stages.{i}.downsample.mlp_inter.fc2.weight",
    "channels_fc1": "vision_model.encoder.stages.{i}.downsample.mlp_channels.fc1.weight",
    "cross_fc1": "vision_model.encoder.stages.{i}.downsample.pre_assign_attn.mlp.fc1.weight",
    "block_fc1": "vision_model.encoder.stages.{i}.layers.{j}.mlp.fc1.weight",
    "text_tok": "text_model.embeddings.token_embedding.weight",
    "text_pos": "text_model.embeddings.position_embedding.weight",
    "text_block_re": r"text_model\.encoder\.layers\.(\d+)\.",
    "text_fc1": "text_model.encoder.layers.{k}.mlp.fc1.weight",
    "img_proj_out": "visual_projection.3.weight",
    "img_proj_fc1": "visual_projection.0.weight",
}
_NV_NAMES = {
    "pos_embed": "img_encoder.pos_embed",
    "patch_proj": "img_encoder.patch_embed.proj.weight",
    "stage_re": r"img_encoder\.layers\.(\d+)\.",
    "block_re": r"img_encoder\.layers\.{i}\.blocks\.(\d+)\.",
    "group_token": "img_encoder.layers.{i}.group_token",
    "group_mlp_fc1": "img_encoder.layers.{i}.downsample.mlp_inter.fc1.weight",
    "group_mlp_fc2": "img_encoder.layers.{i}.downsample.mlp_inter.fc2.weight",
    "channels_fc1": "img_encoder.layers.{i}.downsample.mlp_channels.fc1.weight",
    "cross_fc1": "img_encoder.layers.{i}.downsample.pre_assign_attn.mlp.fc1.weight",
    "block_fc1": "img_encoder.layers.{i}.blocks.{j}.mlp.fc1.weight",
    "text_tok": "text_encoder.token_embedding.weight",
    "text_pos": "text_encoder.positional_embedding",
    "text_block_re": r"text_encoder\.transformer\.resblocks\.(\d+)\.",
    "text_fc1": "text_encoder.transformer.resblocks.{k}.mlp.c_fc.weight",
    "img_proj_out": "img_projector.linear_out.weight",
    "img_proj_fc1": "img_projector.linear_hidden.0.weight",
}


def infer_config_from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    heads: int | None = None,
    text_heads: int | None = None,
    *,
    assign_eps: float | None = None,
    act: str | None = None,
    text_act: str | None = None,
    layer_norm_eps: float | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> dict:
    """Our :class:`GroupViT` kwargs from an HF state dict: the shapes give the widths, depths, token
    counts, MLP ratios, patch size and (a square grid unless ``img_size`` is given) the image size.

    The tensors do not record ``vision_config.num_attention_heads`` (``heads``),
    ``text_config.num_attention_heads`` (``text_heads``), ``vision_config.assign_eps``,
    ``vision_config.hidden_act`` (``act``), ``text_config.hidden_act`` (``text_act``) nor the
    ``layer_norm_eps`` (only 1e-5 is implemented): all must be given, else ``ValueError`` names the
    missing ones. A head count that does not divide its width raises too.
    """
    given = dict(
        heads=heads, text_heads=text_heads, assign_eps=assign_eps, act=act, text_act=text_act,
        layer_norm_eps=layer_norm_eps,
    )  # fmt: skip
    cfg = _infer_shapes(state_dict, _HF_NAMES, img_size)
    _apply(cfg, _HF_UNRECORDED, _resolve(_HF_UNRECORDED, given, {}))
    cfg["vision"].update(hard_assignment=True, gumbel=True, gumbel_tau=1.0)  # fixed by HF's code
    return _check_heads(cfg, "hf")


def infer_config_from_nvlabs_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    heads: int | None = None,
    text_heads: int | None = None,
    *,
    hard_assignment: bool | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> dict:
    """Our :class:`GroupViT` kwargs read off the shapes of an NVlabs state dict (as
    :func:`infer_config_from_hf_state_dict`).

    Not recorded and set per run in NVlabs' YAML: ``img_encoder.num_heads`` (``heads``) and
    ``img_encoder.hard_assignment``: both must be given, else ``ValueError``. The text heads follow
    NVlabs' fixed rule ``width // 64`` unless ``text_heads`` is given (a modified tower).
    """
    sd = _unwrap_nvlabs(state_dict)
    cfg = _infer_shapes(sd, _NV_NAMES, img_size)
    values = _resolve(_NV_UNRECORDED, {"heads": heads, "hard_assignment": hard_assignment}, {})
    # fixed by NVlabs' code and invisible in the shapes (the MLP ratios above are read off the tensors)
    cfg["vision"].update({k: _NV_VISION_FIXED[k] for k in ("assign_eps", "gumbel_tau", "act")})
    cfg["text"]["act"] = _NV_TEXT_FIXED["act"]
    _apply(cfg, _NV_UNRECORDED, values)
    if text_heads is None:
        width = cfg["text"]["width"]
        if width // 64 < 1:
            raise ValueError(
                f"NVlabs' TextTransformer has width // 64 heads, none at text width {width}: these weights come "
                "from a modified tower, pass text_heads=..."
            )
        text_heads = width // 64
    cfg["text"]["heads"] = text_heads
    n_hidden = _count(list(sd), r"img_projector\.linear_hidden\.(\d+)\.")
    # linear_hidden holds (Conv1d, BatchNorm1d, ReLU) triples; ReLU has no keys
    cfg["proj_layers"] = (n_hidden - 1) // 3 + 2 if n_hidden else 1
    cfg["multi_label_scale"] = "multi_label_logit_scale" in sd
    return _check_heads(cfg, "nvlabs")


def _defaults(cls: type) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}


def config_to_hf(cfg: Mapping[str, Any]) -> dict:
    """The Hugging Face ``GroupViTConfig`` dict (the layout of its ``config.json``) for our
    :class:`GroupViT` kwargs ``cfg`` (absent keys: our defaults), to save next to
    :func:`ours_to_hf` weights; ``config_from_hf(config_to_hf(cfg))`` rebuilds the same model.

    The text config's ``eos_token_id`` is the largest id, where our text tower pools. Raises
    ``ValueError`` naming the options HF's GroupViT cannot express.
    """
    from .text import TextEncoder
    from .vision import GroupViTVisionEncoder

    if not all(isinstance(cfg.get(p) or {}, Mapping) for p in ("vision", "text")):
        raise ValueError("config_to_hf takes our GroupViT kwargs with vision= / text= dicts, not modules")
    v = {**_defaults(GroupViTVisionEncoder), **dict(cfg.get("vision") or {})}
    t = {**_defaults(TextEncoder), **dict(cfg.get("text") or {})}
    top = {**_defaults(GroupViT), **{k: x for k, x in cfg.items() if k not in ("vision", "text")}}
    C, tw = int(v["embed_dim"]), int(t["width"])
    patch = v["patch_size"] if isinstance(v["patch_size"], int) else _single_size(v["patch_size"], "patch_size")
    problems = []
    if v["stem"] != "patch":
        problems.append(f"stem={v['stem']!r} (HF: a linear patch embedding)")
    if v["group_patch_size"] not in (None, patch):
        problems.append(f"group_patch_size={v['group_patch_size']}")
    if not (v["hard_assignment"] and v["gumbel"]) or float(v["gumbel_tau"]) != 1.0:
        problems.append("soft or Gumbel-free assignment, or gumbel_tau != 1 (HF: hard, Gumbel, tau 1)")
    if v["cross_attn_mlp_ratio"] is not None and float(v["cross_attn_mlp_ratio"]) != float(v["mlp_ratio"]):
        problems.append(f"cross_attn_mlp_ratio={v['cross_attn_mlp_ratio']} != mlp_ratio (HF ties them)")
    if not v["qkv_bias"]:
        problems.append("qkv_bias=False")
    if top["proj_layers"] != 2:
        problems.append(f"proj_layers={top['proj_layers']} (HF: 2)")
    for what, ratio, width in (("vision", v["mlp_ratio"], C), ("text", t["mlp_ratio"], tw)):
        if float(ratio) * width != int(float(ratio) * width):
            problems.append(f"{what} mlp_ratio {ratio} * width {width} is not an integer")
    if problems:
        raise ValueError("Hugging Face's GroupViT cannot express: " + "; ".join(problems))
    img = _single_size(v["img_size"], "img_size")
    out_groups = list(v["num_output_groups"])
    vocab = int(t["vocab_size"])
    return {
        "model_type": "groupvit",
        "projection_dim": int(top["proj_dim"]),
        "projection_intermediate_dim": int(top["proj_hidden"]),
        "logit_scale_init_value": float(top["logit_scale_init"]),
        "vision_config": {
            "hidden_size": C,
            "intermediate_size": int(float(v["mlp_ratio"]) * C),
            "depths": list(v["depths"]),
            "num_hidden_layers": sum(v["depths"]),
            "num_group_tokens": list(v["num_group_tokens"]),
            "num_output_groups": out_groups + out_groups[-1:],  # HF: one per stage, the last unused
            "num_attention_heads": int(v["num_heads"]),
            "image_size": img if isinstance(img, int) else list(img),
            "patch_size": patch,
            "num_channels": int(v["in_chans"]),
            "hidden_act": _check_act(v["act"], "vision act"),
            "layer_norm_eps": 1e-5,
            "dropout": float(v["drop_rate"]),
            "attention_dropout": float(v["attn_drop_rate"]),
            "assign_eps": float(v["assign_eps"]),
            "assign_mlp_ratio": [float(x) for x in v["assign_mlp_ratio"]],
        },
        "text_config": {
            "vocab_size": vocab,
            "hidden_size": tw,
            "intermediate_size": int(float(t["mlp_ratio"]) * tw),
            "num_hidden_layers": int(t["layers"]),
            "num_attention_heads": int(t["heads"]),
            "max_position_embeddings": int(t["context_length"]),
            "hidden_act": _check_act(t["act"], "text act"),
            "layer_norm_eps": 1e-5,
            "bos_token_id": max(vocab - 2, 0),
            "eos_token_id": vocab - 1,
            "pad_token_id": 0,
        },
    }


# ---------------------------------------------------------------------------------- loaders
def _load_file(path: str | os.PathLike) -> Mapping[str, Any]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled configs (NVlabs saves its OmegaConf config) are refused
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}): it pickles "
            "non-tensor objects. If you trust the file, load it yourself with "
            "torch.load(path, map_location='cpu', weights_only=False) and pass the dict."
        ) from err


def _unwrap_nvlabs(sd: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _build_loaded(cfg: dict, convert: Callable[[GroupViT], dict[str, torch.Tensor]]) -> GroupViT:
    """Build the model on the meta device (no wasted init), then assign the converted tensors.

    Optional keys absent from the source get their fresh-init values (``num_batches_tracked = 0``,
    ``multi_label_logit_scale = logit_scale_init``).
    """
    with torch.device("meta"):
        model = GroupViT(**cfg)
    sd = convert(model)
    for key, ref in model.state_dict().items():
        if key in sd:
            continue
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.zeros((), dtype=ref.dtype)
        elif key == "multi_label_logit_scale":
            sd[key] = torch.tensor(float(cfg.get("logit_scale_init", math.log(1 / 0.07))), dtype=ref.dtype)
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True, assign=True)
    return model


def load_hf_groupvit(
    source: Any,
    config: Any = None,
    heads: int | None = None,
    text_heads: int | None = None,
    *,
    assign_eps: float | None = None,
    act: str | None = None,
    text_act: str | None = None,
    layer_norm_eps: float | None = None,
    **overrides: Any,
) -> GroupViT:
    """Build a :class:`GroupViT` holding Hugging Face GroupViT weights.

    Args:
        source: a ``transformers.GroupViTModel``, its state dict, or a path to a ``.bin`` /
            ``.safetensors`` file.
        config: a ``GroupViTConfig`` (or its dict / ``config.json``); defaults to the model's own
            config. Without one (a bare state dict or file), the shapes give the sizes and the fields
            the tensors do not record must be passed: ``heads`` and ``text_heads`` (the
            ``num_attention_heads`` of both towers), ``assign_eps``, ``act`` / ``text_act``
            (``hidden_act``) and ``layer_norm_eps``; a ``ValueError`` names any that is missing.
            Given with a config, they must agree with it.
        overrides: kwargs for :class:`GroupViT` that replace the converted ones
            (e.g. ``vision={"drop_path_rate": 0.0}``).
    """
    if isinstance(source, (str, os.PathLike)):
        source = _load_file(source)
    if isinstance(source, torch.nn.Module):
        if config is None:
            config = getattr(source, "config", None)
        state_dict = source.state_dict()
    elif isinstance(source, Mapping):
        state_dict = source
    else:
        raise ValueError(f"source must be a GroupViTModel, a state dict or a path, got {type(source).__name__}")
    given = dict(
        heads=heads, text_heads=text_heads, assign_eps=assign_eps, act=act, text_act=text_act,
        layer_norm_eps=layer_norm_eps,
    )  # fmt: skip
    if config is not None:
        cfg = config_from_hf(config, **overrides)
        _check_agrees(cfg, _HF_UNRECORDED, given)
    else:
        values = _resolve(_HF_UNRECORDED, given, overrides)
        img_size = (overrides.get("vision") or {}).get("img_size")
        cfg = _merge(infer_config_from_hf_state_dict(state_dict, **values, img_size=img_size), overrides)
    _check_heads(cfg, "hf")
    return _build_loaded(cfg, lambda model: hf_to_ours(state_dict, model))


def _embedded_nvlabs_config(source: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``model:`` section that NVlabs' checkpoints store under ``'config'``, if present."""
    conf = source.get("config")
    model_cfg = conf.get("model") if isinstance(conf, Mapping) else None
    if isinstance(model_cfg, Mapping) and ("img_encoder" in model_cfg or "text_encoder" in model_cfg):
        return model_cfg
    return None


def load_nvlabs_groupvit(
    source: Any,
    config: Mapping[str, Any] | None = None,
    heads: int | None = None,
    text_heads: int | None = None,
    *,
    hard_assignment: bool | None = None,
    **overrides: Any,
) -> GroupViT:
    """Build a :class:`GroupViT` holding NVlabs/GroupViT weights.

    Args:
        source: an NVlabs checkpoint dict (``{'model': state_dict, 'config': ..., ...}``), a bare
            state dict, or a path (read with ``weights_only=True``; NVlabs' own ``.pth`` files pickle
            their config and must be loaded by the caller, see the error message).
        config: our :class:`GroupViT` kwargs (a dict with ``vision`` / ``text`` keys) or NVlabs'
            ``model:`` config (with ``img_encoder`` / ``text_encoder``); None: the checkpoint's own
            ``config['model']`` if it has one, else the shapes give the sizes and ``heads``
            (``img_encoder.num_heads``) and ``hard_assignment`` must be passed (``ValueError`` names
            the missing ones); the text heads follow NVlabs' ``width // 64`` unless ``text_heads``
            is given. Keywords given with a config must agree with it.
    """
    if isinstance(source, (str, os.PathLike)):
        source = _load_file(source)
    if not isinstance(source, Mapping):
        raise ValueError(f"source must be a checkpoint dict, a state dict or a path, got {type(source).__name__}")
    if config is None:
        config = _embedded_nvlabs_config(source)
    state_dict = _unwrap_nvlabs(source)
    given = {"heads": heads, "hard_assignment": hard_assignment, "text_heads": text_heads}
    if config is None:
        values = _resolve(_NV_UNRECORDED, given, overrides)
        text_sub = overrides.get("text")
        if text_heads is None and isinstance(text_sub, Mapping):
            text_heads = text_sub.get("heads")
        img_size = (overrides.get("vision") or {}).get("img_size")
        cfg = infer_config_from_nvlabs_state_dict(state_dict, **values, text_heads=text_heads, img_size=img_size)
        cfg = _merge(cfg, overrides)
    else:
        if "img_encoder" in config or "text_encoder" in config:
            cfg = config_from_nvlabs(config, **overrides)
        else:
            cfg = _merge({k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}, overrides)
        _check_agrees(cfg, (*_NV_UNRECORDED, _NV_TEXT_HEADS), given)
    _check_heads(cfg, "nvlabs")
    return _build_loaded(cfg, lambda model: nvlabs_to_ours(state_dict, model))
