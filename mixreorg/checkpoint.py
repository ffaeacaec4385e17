"""Checkpoints that never lose work: atomic writes, keep-last-k, exact resume, safetensors export.

* :func:`atomic_write` / :func:`save_checkpoint`: the file is written under a temporary name in the
  same folder, flushed and fsync'ed, then ``os.replace``d over the target: a crash or a failing
  serialiser leaves the previous checkpoint intact (and no half-written file under the real name).
* :class:`CheckpointManager`: ``ckpt-<step>.pt`` files in one folder, the newest ``keep_last`` kept
  (older ones removed only after a newer one is safely on disk); ``load_latest`` falls back to the
  next older file if the newest cannot be read.
* :func:`training_state` / :func:`restore_training_state`: model, optimizer, scheduler, AMP scaler,
  step, config, the data stream's position and the RNG states of ``random``, ``numpy`` and ``torch``
  (CPU and CUDA): restoring them makes an interrupted-and-resumed run equal an uninterrupted one.
  The saved config is compared with the current one first; any difference raises
  :class:`CheckpointConfigMismatch` listing every differing key.
* :func:`export_safetensors` / :func:`load_safetensors`: weights only, as ``.safetensors``.

Everything saved is plain tensors / numbers / strings, so checkpoints load with
``torch.load(weights_only=True)`` (the default; no pickled code is ever executed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "CheckpointConfigMismatch",
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointManager",
    "capture_rng_state",
    "restore_rng_state",
    "config_to_dict",
    "flatten_config",
    "config_differences",
    "check_config",
    "training_state",
    "restore_training_state",
    "load_model_state",
    "export_safetensors",
    "load_safetensors",
]

logger = logging.getLogger("mixreorg.checkpoint")

PathLike = str | os.PathLike


class CheckpointConfigMismatch(ValueError):
    """The checkpoint was written by another configuration; ``.differences`` lists the keys."""

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


# --------------------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then atomically rename it to ``path``.

    If ``write`` raises, the temporary file is removed, ``path`` is untouched and the error propagates.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def save_checkpoint(
    state: Mapping[str, Any],
    path: PathLike,
    *,
    serializer: Callable[[Any, IO[bytes]], None] | None = None,
) -> Path:
    """Atomically save ``state`` (``torch.save`` unless ``serializer(obj, file)`` is given)."""
    ser = serializer or (lambda obj, f: torch.save(obj, f))
    return atomic_write(path, lambda f: ser(dict(state), f))


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a clear error for a missing file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint not found: {p}")
    return torch.load(p, map_location=map_location, weights_only=True)


_STEP_RE = re.compile(r"^(?P<prefix>.+)-(?P<step>\d+)\.pt$")


class CheckpointManager:
    """Numbered checkpoints ``<prefix>-<step>.pt`` in ``directory``; keeps the newest ``keep_last``.

    ``keep_every`` (optional) additionally keeps every checkpoint whose step is a multiple of it.
    """

    def __init__(
        self, directory: PathLike, keep_last: int = 3, *, prefix: str = "ckpt", keep_every: int | None = None
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if not prefix or "/" in prefix:
            raise ValueError(f"bad checkpoint prefix {prefix!r}")
        self.directory = Path(directory)
        self.keep_last = int(keep_last)
        self.prefix = prefix
        self.keep_every = keep_every

    def path_for(self, step: int) -> Path:
        return self.directory / f"{self.prefix}-{int(step):09d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every checkpoint in the folder, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _STEP_RE.match(p.name)
            if m and m.group("prefix") == self.prefix and p.is_file():
                found.append((int(m.group("step")), p))
        return sorted(found)

    def latest(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1][1] if ckpts else None

    def save(
        self, state: Mapping[str, Any], step: int, *, serializer: Callable[[Any, IO[bytes]], None] | None = None
    ) -> Path:
        """Atomically write the checkpoint of ``step``, then prune beyond ``keep_last``."""
        path = save_checkpoint(state, self.path_for(step), serializer=serializer)
        self._prune()
        return path

    def _prune(self) -> None:
        ckpts = self.checkpoints()
        for step, path in ckpts[: -self.keep_last]:
            if self.keep_every and step % self.keep_every == 0:
                continue
            path.unlink(missing_ok=True)

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """``(state, path)`` of the newest readable checkpoint, or ``None`` when there is none.

        An unreadable newest file (e.g. a disk error) is reported with a warning and the next older one
        is tried.
        """
        for _, path in reversed(self.checkpoints()):
            try:
                return load_checkpoint(path, map_location), path
            except Exception as err:  # noqa: BLE001 - any unreadable file: fall back to an older one
                logger.warning("checkpoint %s is unreadable (%s); trying an older one", path, err)
        return None


# --------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """RNG states of ``random``, ``numpy`` (legacy global), ``torch`` CPU and every CUDA device."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002 - the global state is what we save
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored when CUDA is present)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(  # noqa: NPY002 - the global state is what we restore
        (nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            logger.warning(
                "checkpoint has RNG states of %d CUDA devices, this machine has %d: restoring the common ones",
                len(cuda_states),
                torch.cuda.device_count(),
            )
        for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


# --------------------------------------------------------------------------------------- configs
def config_to_dict(config: Any) -> Any:
    """A config (dataclass, mapping, object with ``to_dict``/``__dict__``) as nested plain values."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, (str, int, float, bool)) or config is None:
        return config
    if isinstance(config, os.PathLike):
        return os.fspath(config)
    if hasattr(config, "to_dict"):
        return config_to_dict(config.to_dict())
    if hasattr(config, "__dict__"):
        return {k: config_to_dict(v) for k, v in vars(config).items() if not k.startswith("_")}
    return repr(config)


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"a.b.c": value}`` (lists stay values)."""
    plain = config_to_dict(config)
    if not isinstance(plain, dict):
        return {prefix or "config": plain}
    out: dict[str, Any] = {}
    for key, value in plain.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, name))
        else:
            out[name] = value
    return out


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    return any(key == pat or key.startswith(pat + ".") for pat in ignore)


def config_differences(saved: Any, current: Any, ignore: Iterable[str] = ()) -> list[str]:
    """Human-readable lines, one per differing key (keys under an ``ignore`` prefix are skipped)."""
    ignore = list(ignore)
    a, b = flatten_config(saved), flatten_config(current)
    lines = []
    for key in sorted(set(a) | set(b)):
        if _ignored(key, ignore):
            continue
        if key not in b:
            lines.append(f"{key}: checkpoint {a[key]!r}, absent from the current config")
        elif key not in a:
            lines.append(f"{key}: absent from the checkpoint, now {b[key]!r}")
        elif a[key] != b[key]:
            lines.append(f"{key}: checkpoint {a[key]!r}, now {b[key]!r}")
    return lines


def check_config(saved: Any, current: Any, ignore: Iterable[str] = (), source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointConfigMismatch` listing every differing key, if any."""
    diffs = config_differences(saved, current, ignore)
    if diffs:
        raise CheckpointConfigMismatch(
            f"{source} was written by a different configuration ({len(diffs)} mismatched key"
            f"{'s' if len(diffs) > 1 else ''}):\n  "
            + "\n  ".join(diffs)
            + "\nResume with the same configuration, list keys that may change in ignore_config_keys, "
            "or start a new run directory.",
            diffs,
        )


# --------------------------------------------------------------------------------------- model states
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / FSDP-like ``.module`` wrappers and ``torch.compile``."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def load_model_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """``model.load_state_dict`` with a ``ValueError`` that lists missing, unexpected and mis-shaped keys."""
    model = _unwrap(model)
    own = model.state_dict()
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd) and not any(k.startswith("module.") for k in own):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if shapes:
        problems.append(
            "shape mismatches:\n    " + "\n    ".join(shapes[:20]) + ("\n    ..." if len(shapes) > 20 else "")
        )
    if strict and missing:
        problems.append(f"missing from the checkpoint ({len(missing)}): " + ", ".join(missing[:20]))
    if strict and unexpected:
        problems.append(f"not in the model ({len(unexpected)}): " + ", ".join(unexpected[:20]))
    if problems:
        raise ValueError("model weights do not fit the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(sd, strict=strict)


def training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    step: int,
    config: Any = None,
    data_state: Mapping[str, Any] | None = None,
    scaler: Any | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to resume exactly, as a dict for :func:`save_checkpoint` / the manager.

    Capture it at a step boundary (after ``optimizer.step()`` and the data stream's ``observe``).
    """
    state: dict[str, Any] = {
        "format": "mixreorg.checkpoint/1",
        "step": int(step),
        "model": _unwrap(model).state_dict(),
        "config": config_to_dict(config) if config is not None else None,
        "rng": capture_rng_state(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if data_state is not None:
        state["data"] = dict(data_state)
    if extra is not None:
        state["extra"] = dict(extra)
    return state


def restore_training_state(
    state: Mapping[str, Any] | PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    config: Any = None,
    scaler: Any | None = None,
    ignore_config_keys: Iterable[str] = (),
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore a :func:`training_state` (or the checkpoint file holding one) into live objects.

    The saved config is checked against ``config`` first (when both exist): any difference outside
    ``ignore_config_keys`` raises :class:`CheckpointConfigMismatch` before anything is modified.
    Returns ``{"step", "data", "extra", "config"}`` (the data position is for the data stream's
    ``load_state_dict``).
    """
    source = "checkpoint"
    if not isinstance(state, Mapping):
        source = f"checkpoint {os.fspath(state)}"
        state = load_checkpoint(state, map_location)
    for key in ("model", "step"):
        if key not in state:
            raise ValueError(f"{source} is not a training state: no {key!r} entry (keys: {sorted(state)})")
    if config is not None and state.get("config") is not None:
        check_config(state["config"], config, ignore_config_keys, source)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and name not in state:
            raise ValueError(f"{source} has no {name} state to restore")
    load_model_state(model, state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and "rng" in state:
        restore_rng_state(state["rng"])
    return {
        "step": int(state["step"]),
        "data": state.get("data"),
        "extra": state.get("extra"),
        "config": state.get("config"),
    }


# --------------------------------------------------------------------------------------- safetensors
def export_safetensors(
    model_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    config: Any = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the weights as ``.safetensors`` (atomically). ``config`` is stored as JSON under the
    ``"config"`` metadata key. Tied/shared tensors are saved as separate copies."""
    from safetensors.torch import save

    sd = _unwrap(model_or_state).state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if config is not None:
        meta["config"] = json.dumps(config_to_dict(config), sort_keys=True)
    meta.setdefault("format", "pt")
    data = save(tensors, metadata=meta)
    return atomic_write(path, lambda f: f.write(data))


def load_safetensors(
    path: PathLike, model: torch.nn.Module | None = None, *, strict: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a ``.safetensors`` file; loaded into ``model`` when given."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"safetensors file not found: {p}")
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if model is not None:
        load_model_state(model, sd, strict=strict)
    return sd, meta
