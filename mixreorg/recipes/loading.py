"""Loading a model for inference: a run folder, one of our checkpoints or exports, imported Hugging
Face / NVlabs GroupViT weights, or a Hugging Face model id -> a GroupViT-interface module. The entry
points (``evaluate``, ``segment``, ``export``) share it instead of importing each other.

What ``spec`` may be (a path that exists always wins over an id):

* a run folder of :mod:`mixreorg.recipes.pretrain` (its newest checkpoint) or one of its checkpoints;
* a folder / ``model.safetensors`` written by ``python -m mixreorg.recipes.export --to safetensors``
  (our state dict; the GroupViT arguments in ``config.json`` or the file's metadata);
* a Hugging Face GroupViT folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) or
  one of those weight files with its ``config.json`` beside it;
* an NVlabs checkpoint (``{'model': img_encoder.* ..., 'config': ...}``; ``--to nvlabs`` writes one);
* a Hugging Face model id, ``owner/name`` or ``owner/name@revision`` (e.g. ``nvidia/groupvit-gcc-yfcc``),
  fetched with ``huggingface_hub``: downloaded when online, from the local cache otherwise; with
  ``HF_HUB_OFFLINE=1`` only the cache is read (``HF_HUB_CACHE`` names the cache folder).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixreorg.checkpoint import CheckpointManager, load_checkpoint, load_model_state
from mixreorg.nn.groupvit import GroupViT
from mixreorg.nn.weights import config_from_hf, config_from_nvlabs, load_hf_groupvit, load_nvlabs_groupvit

from .config import PretrainConfig, config_from_dict
from .models import build_model

__all__ = [
    "OURS_FORMAT",
    "LoadedModel",
    "inference_model",
    "is_hub_id",
    "load_inference_model",
    "load_model",
    "resolve_model_path",
    "run_groupvit_kwargs",
]

OURS_FORMAT = "mixreorg.GroupViT"  # the "format" field of our exports' config.json / metadata
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".ckpt")


@dataclass
class LoadedModel:
    """What :func:`load_model` found.

    ``model``: the GroupViT-interface inference module (eval mode); ``image_size``: its training size
    (None when unknown); ``config``: the run's :class:`PretrainConfig` (None for imported weights);
    ``groupvit_kwargs``: the :class:`GroupViT` arguments that rebuild ``model`` (None when it is not a
    GroupViT, e.g. a supervised run's); ``kind``: ``run`` | ``mixreorg`` | ``hf`` | ``nvlabs``;
    ``path``: the file or folder read; ``home``: the folder ``evaluate`` writes ``eval/`` under;
    ``problem``: why ``groupvit_kwargs`` is None, when known."""

    model: nn.Module
    image_size: int | None
    config: PretrainConfig | None
    groupvit_kwargs: dict | None
    kind: str
    path: Path
    home: Path
    problem: str | None = None


def inference_model(model: nn.Module) -> nn.Module:
    """The GroupViT-interface module of a trainer model (or the model itself)."""
    get = getattr(model, "inference_model", None)
    return get() if callable(get) else model


# ---------------------------------------------------------------------------------- model ids
def is_hub_id(spec: Any) -> bool:
    """Whether ``spec`` reads as a Hugging Face model id (``owner/name[@revision]``, a ``str``; Path
    objects are always paths), not as a file name."""
    if not isinstance(spec, str) or not _ID_RE.match(spec) or "--" in spec or ".." in spec:
        return False
    return not spec.partition("@")[0].lower().endswith(_FILE_SUFFIXES)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.is_offline_mode())


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _hub_snapshot(spec: str) -> Path:
    """The local snapshot folder of model id ``spec`` holding ``config.json`` and the weights."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = spec.partition("@")
    offline = _hub_offline()
    kw = dict(revision=revision or None, cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline)
    where = (
        "offline (HF_HUB_OFFLINE=1): looked in the local Hugging Face cache only"
        if offline
        else "online: looked on the Hugging Face Hub, then in the local cache"
    )
    try:
        config = Path(hf_hub_download(repo, "config.json", **kw))
    except Exception as err:  # huggingface_hub raises HTTP, validation, cache and OS errors alike
        raise ValueError(
            f"--model {spec}: no such file or folder, and no Hugging Face model {repo!r} "
            f"{'@ ' + revision + ' ' if revision else ''}could be fetched ({where}; {type(err).__name__}: "
            f"{_first_line(err)})"
        ) from err
    for name in HF_WEIGHT_FILES:
        try:
            hf_hub_download(repo, name, **kw)
            return config.parent
        except EntryNotFoundError:  # not in the repo (online) / not cached (offline): try the next name
            continue
        except Exception as err:  # as above
            raise ValueError(f"--model {spec}: fetching {name} failed ({where}; {type(err).__name__}: "
                             f"{_first_line(err)})") from err  # fmt: skip
    raise ValueError(
        f"--model {spec}: Hugging Face model {repo!r} has a config.json but neither of {', '.join(HF_WEIGHT_FILES)} "
        f"could be fetched ({where})"
    )


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """The local file or folder ``spec`` names: the path itself when it exists, else the snapshot of
    the Hugging Face model id it spells (ValueError naming the id and how it looked)."""
    p = Path(spec)
    if p.exists():
        return p
    if is_hub_id(spec):
        return _hub_snapshot(str(spec))
    raise ValueError(f"--model {p}: no such file or folder (nor a Hugging Face model id owner/name)")


# ---------------------------------------------------------------------------------- our runs
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


def run_groupvit_kwargs(cfg: PretrainConfig, model: nn.Module) -> dict | None:
    """The :class:`GroupViT` arguments that rebuild a run's inference ``model`` (None when it is not
    a GroupViT). They follow :func:`~mixreorg.recipes.builders.build_groupvit`, with the depths read
    off the model (GroupViT+ and MixReorg's inference model have one more stage-1 block); a
    ValueError when the rebuilt layout differs from the model's."""
    if not isinstance(model, GroupViT):
        return None
    m = cfg.model
    vision = {k: v for k, v in dict(m.vision).items() if k != "use_checkpoint"}
    vision.setdefault("img_size", cfg.data.image_size)
    vision["depths"] = list(model.vision.depths)
    kwargs = {
        "vision": vision,
        "text": {k: v for k, v in dict(m.text).items() if k != "use_checkpoint"},
        "proj_dim": m.proj_dim,
        "proj_hidden": m.proj_hidden,
        "proj_layers": m.proj_layers,
        "logit_scale_init": math.log(m.logit_scale_init),
        "logit_scale_max": float(model.logit_scale_max),
        "multi_label_scale": model.multi_label_logit_scale is not None,
        "image_pool": model.image_pool,
    }
    with torch.device("meta"):
        ref = GroupViT(**kwargs).state_dict()  # [shapes only]
    own = model.state_dict()
    bad = sorted(set(ref) ^ set(own)) + [k for k in ref if k in own and ref[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"the run's model.* config does not rebuild its inference model; differing keys: {bad[:8]}")
    return json.loads(json.dumps(kwargs))  # plain JSON types (tuples -> lists)


def _home(p: Path) -> Path:
    if p.is_dir():
        return p
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def _from_run(model: nn.Module, cfg: PretrainConfig, p: Path) -> LoadedModel:
    inf = inference_model(model).eval()
    try:  # only exports need the arguments: a run they cannot describe still loads for inference
        kwargs, problem = run_groupvit_kwargs(cfg, inf), None
    except ValueError as err:
        kwargs, problem = None, str(err)
    if kwargs is None and problem is None:
        problem = f"its inference model ({type(inf).__name__}) is not a GroupViT"
    return LoadedModel(inf, cfg.data.image_size, cfg, kwargs, "run", p, _home(p), problem)


# ---------------------------------------------------------------------------------- weights
def _weights_format(keys: Sequence[str]) -> str:
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith(("img_encoder.", "module.img_encoder.")) for k in keys):
        return "nvlabs"
    return "unknown"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {path}: cannot read it as JSON ({err})") from err
    return data if isinstance(data, dict) else None


def _read_weights(p: Path) -> tuple[Any, dict | None]:
    """``(state, our export config or None)`` of a weights file."""
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd: Any = {k: f.get_tensor(k) for k in f.keys()}
        else:
            meta, sd = {}, torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise several types for unreadable files
        raise ValueError(f"--model {p}: cannot read it as weights ({type(err).__name__}: {err})") from err
    ours = _read_json(p.parent / "config.json") if p.suffix == ".safetensors" else None
    if not (ours and ours.get("format") == OURS_FORMAT) and meta.get("config"):
        ours = json.loads(meta["config"])
    return sd, (ours if ours and ours.get("format") == OURS_FORMAT else None)


def _load_ours(sd: Mapping[str, torch.Tensor], export: dict, p: Path) -> LoadedModel:
    kwargs = export.get("groupvit")
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model {p}: its {OURS_FORMAT} config has no 'groupvit' arguments")
    with torch.device("meta"):
        model = GroupViT(**kwargs)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"--model {p}: weights do not fit its config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, mis-shaped {shapes[:5]}")  # fmt: skip
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True, assign=True)
    try:  # the run's config is informative here (the GroupViT arguments rebuild the model)
        run = config_from_dict(export["run_config"]) if export.get("run_config") else None
    except (TypeError, ValueError):
        run = None
    size = export.get("image_size") or model.vision.patch_embed.img_size[0]
    return LoadedModel(model.eval(), size, run, kwargs, "mixreorg", p, _home(p))


def _load_imported(sd: Any, p: Path) -> LoadedModel:
    """HF or NVlabs GroupViT weights (``sd``: the file's content)."""
    keys = list(sd.get("model", sd).keys()) if isinstance(sd, dict) else []
    fmt = _weights_format(keys)
    if fmt == "hf":
        cfg_file = p.parent / "config.json"
        hf_cfg = _read_json(cfg_file)
        if hf_cfg is None:
            raise ValueError(
                f"--model {p}: Hugging Face GroupViT weights need the config.json saved with them (their tensors "
                f"do not record the head counts, assign_eps or activations); put it at {cfg_file}"
            )
        kwargs: dict | None = config_from_hf(hf_cfg)
        model = load_hf_groupvit(sd, config=hf_cfg)
    elif fmt == "nvlabs":
        conf = sd.get("config")
        ours = isinstance(conf, Mapping) and ("vision" in conf or "text" in conf)  # what --to nvlabs writes
        nv = conf.get("model") if isinstance(conf, Mapping) else None
        kwargs = dict(conf) if ours else (config_from_nvlabs(nv) if isinstance(nv, Mapping) else None)
        try:
            model = load_nvlabs_groupvit(sd, config=kwargs) if ours else load_nvlabs_groupvit(sd)
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
    return LoadedModel(model.eval(), size, None, kwargs, fmt, p, _home(p))


def load_model(spec: str | os.PathLike) -> LoadedModel:
    """Load what ``spec`` names (see the module docstring) as a :class:`LoadedModel`; ValueError
    naming the problem otherwise."""
    p = resolve_model_path(spec)
    if p.is_dir() and ((p / "checkpoints").is_dir() or any(p.glob("ckpt-*.pt"))):
        return _from_run(*_load(p), p)
    folder = p if p.is_dir() else None
    if folder is not None:  # a Hugging Face model folder or one of our exports
        files = [folder / n for n in HF_WEIGHT_FILES if (folder / n).is_file()]
        if not files:
            raise ValueError(f"--model {p}: no checkpoints/, {' or '.join(HF_WEIGHT_FILES)} inside")
        p = files[0]
    sd, export = _read_weights(p)
    if export is not None:
        loaded = _load_ours(sd, export, p)
    else:
        inner = sd.get("model") if isinstance(sd, dict) else None
        if isinstance(inner, Mapping) and _weights_format(list(inner)) == "unknown":  # one of our checkpoints
            loaded = _from_run(*_load(p, state=sd), p)
        else:
            loaded = _load_imported(sd, p)
    if folder is not None:
        loaded.path, loaded.home = folder, folder
    return loaded


def load_inference_model(path: str | os.PathLike, with_config: bool = False) -> tuple:
    """A GroupViT-interface model from anything :func:`load_model` takes (run folder, checkpoint,
    export, HF / NVlabs weights, HF model id) and the image size it was trained at (None when
    unknown); ``with_config`` adds the run's :class:`PretrainConfig` (None for imported weights)."""
    loaded = load_model(path)
    res = (loaded.model, loaded.image_size)
    return (*res, loaded.config) if with_config else res
