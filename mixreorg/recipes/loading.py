"""Loading a model for inference: a run folder, one of our checkpoints, or imported Hugging Face /
NVlabs GroupViT weights -> a GroupViT-interface module. The entry points (``evaluate``, ``segment``)
share it instead of importing each other."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixreorg.checkpoint import CheckpointManager, load_checkpoint, load_model_state
from mixreorg.nn.weights import load_hf_groupvit, load_nvlabs_groupvit

from .config import config_from_dict
from .models import build_model

__all__ = ["inference_model", "load_inference_model"]


def inference_model(model: nn.Module) -> nn.Module:
    """The GroupViT-interface module of a trainer model (or the model itself)."""
    get = getattr(model, "inference_model", None)
    return get() if callable(get) else model


def _load(path: str | Path, state: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    p = Path(path)
    if p.is_dir():
        ckpt = CheckpointManager(p / "checkpoints").latest() if (p / "checkpoints").is_dir() else None
        if ckpt is None:
            ckpt = CheckpointManager(p).latest()
        if ckpt is None:
            raise ValueError(f"no checkpoint found under {p}")
        p = ckpt
    if state is None:
        state = load_checkpoint(p)
    if not state.get("config"):
        raise ValueError(f"checkpoint {p} carries no config; cannot rebuild the model")
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    load_model_state(model, state["model"])
    return model.eval(), cfg


def _weights_format(keys: Sequence[str]) -> str:
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith(("img_encoder.", "module.img_encoder.")) for k in keys):
        return "nvlabs"
    return "unknown"


def load_inference_model(path: str | Path, with_config: bool = False) -> tuple:
    """A GroupViT-interface model from a run folder / our checkpoint / HF or NVlabs weights, and the
    image size it was trained at (None when unknown); ``with_config`` adds the run's
    :class:`PretrainConfig` (None for imported weights)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--model {p}: no such file or folder")
    if p.is_dir() and ((p / "checkpoints").is_dir() or any(p.glob("ckpt-*.pt"))):
        model, cfg = _load(p)
        res = (inference_model(model).eval(), cfg.data.image_size)
        return (*res, cfg) if with_config else res
    if p.is_dir():  # a Hugging Face model folder
        files = [p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()]
        if not files:
            raise ValueError(f"--model {p}: no checkpoints/, model.safetensors or pytorch_model.bin inside")
        p = files[0]
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise several types for unreadable files
        raise ValueError(f"--model {p}: cannot read it as weights ({type(err).__name__}: {err})") from err
    if isinstance(sd, dict) and sd.get("config") and "model" in sd:  # one of our checkpoints
        model, cfg = _load(p, state=sd)
        res = (inference_model(model).eval(), cfg.data.image_size)
        return (*res, cfg) if with_config else res
    keys = list(sd.get("model", sd).keys()) if isinstance(sd, dict) else []
    fmt = _weights_format(keys)
    if fmt == "hf":
        cfg_file = p.parent / "config.json"
        if not cfg_file.is_file():
            raise ValueError(
                f"--model {p}: Hugging Face GroupViT weights need the config.json saved with them (their tensors "
                f"do not record the head counts, assign_eps or activations); put it at {cfg_file}"
            )
        model = load_hf_groupvit(sd, config=json.loads(cfg_file.read_text()))
    elif fmt == "nvlabs":
        try:
            model = load_nvlabs_groupvit(sd)
        except ValueError as err:
            raise ValueError(
                f"--model {p}: {err}. From the command line, load a checkpoint that carries its config "
                f"(NVlabs' own checkpoints keep it under 'config')"
            ) from err
    else:
        raise ValueError(
            f"--model {p}: not a mixreorg checkpoint and neither Hugging Face (vision_model.*) nor NVlabs "
            f"(img_encoder.*) GroupViT weights; first keys: {keys[:5]}"
        )
    size = model.vision.patch_embed.img_size[0]
    return (model.eval(), size, None) if with_config else (model.eval(), size)
