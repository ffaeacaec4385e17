"""Export a model as Hugging Face ``transformers`` GroupViT, our own safetensors, or an NVlabs checkpoint.

    python -m mixreorg.recipes.export runs/tiny --to hf exported/tiny-hf
    python -m mixreorg.recipes.export runs/mixreorg --to safetensors exported/mixreorg
    python -m mixreorg.recipes.export nvidia/groupvit-gcc-yfcc --to nvlabs exported/gcc-yfcc-nvlabs

``RUN`` is anything :func:`mixreorg.recipes.loading.load_model` takes (a run folder or checkpoint, an
export, Hugging Face / NVlabs weights, a Hugging Face model id). What is exported is the inference
GroupViT (for MixReorg runs and ``groupvit_plus``: GroupViT+, one more stage-1 block). ``OUT`` is a
folder; it must be empty or absent unless ``--force`` (which replaces the files an export writes and
removes other exports' weight files there). Formats:

* ``hf``: ``config.json`` (:func:`~mixreorg.nn.weights.config_to_hf`) + ``model.safetensors``
  (:func:`~mixreorg.nn.weights.ours_to_hf`): ``transformers.GroupViTModel.from_pretrained(OUT)``.
* ``safetensors``: our state dict (``model.safetensors``, the config in its metadata too) +
  ``config.json`` (the :class:`GroupViT` arguments, the image size, the run's config).
* ``nvlabs``: ``checkpoint.pth`` = ``{'model': ours_to_nvlabs(...), 'config': our GroupViT arguments}``,
  loaded by ``load_nvlabs_groupvit(ckpt, config=ckpt['config'])``.

Each folder gets a ``README.md`` model card: the config, the run's measured mIoU (its
``eval/results.json``; "not evaluated" without one) and what the target format changes. Every
export loads back with ``--model OUT`` in ``segment`` / ``evaluate``. Bad input: exit status 2 and
a message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "mixreorg.recipes"  # noqa: A001

import torch  # noqa: E402

from mixreorg.checkpoint import atomic_write, export_safetensors, save_checkpoint  # noqa: E402
from mixreorg.nn.weights import config_to_hf, ours_to_hf, ours_to_nvlabs  # noqa: E402
from mixreorg.recipes.loading import OURS_FORMAT, LoadedModel, load_model  # noqa: E402

__all__ = ["FORMATS", "NVLABS_FILE", "export_model", "measured_miou", "model_card", "main"]

FORMATS = ("hf", "safetensors", "nvlabs")
NVLABS_FILE = "checkpoint.pth"
# the files some export writes: --force removes those the chosen format does not write (stale weights
# next to new ones would be loaded instead of them)
_EXPORT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", NVLABS_FILE, "README.md")


# ---------------------------------------------------------------------------------- checks
def _prepare_out(out: Path, source: str, force: bool) -> Path:
    """Check (before any loading) that ``out`` may be written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file: give a folder to write the export into")
    src = Path(source)
    if src.exists():
        s, o = src.resolve(), out.resolve()
        if s == o or o in s.parents:
            raise ValueError(f"OUT {out} holds the model being exported ({source}): write the export elsewhere")
    if out.is_dir() and any(out.iterdir()) and not force:
        entries = sorted(p.name for p in out.iterdir())
        raise ValueError(
            f"OUT {out} is not empty ({len(entries)} entries: {', '.join(entries[:5])}); "
            "pass --force to overwrite the export files there"
        )
    return out


def _exportable(loaded: LoadedModel, to: str) -> dict:
    """The GroupViT arguments of ``loaded`` (ValueError when ``to`` cannot hold the model)."""
    cfg = loaded.config
    if cfg is not None and cfg.model.name == "supervised":
        raise ValueError(
            f"{loaded.path} is a supervised-bound run (model.name=supervised): it labels pixels with class "
            f"embeddings learned for its training classes and never uses its text tower, while a GroupViT export "
            f"({to}) is segmented zero-shot through the text tower -- it would not be the model that was trained "
            "and evaluated, so it cannot be exported; segment / evaluate take the run folder itself"
        )
    if loaded.groupvit_kwargs is None:
        why = loaded.problem or f"its inference model ({type(loaded.model).__name__}) is not a GroupViT"
        raise ValueError(f"{loaded.path} cannot be exported: {why}")
    if to == "hf":
        try:
            config_to_hf(loaded.groupvit_kwargs)
        except ValueError as err:
            raise ValueError(f"{loaded.path} cannot be exported to hf: {err}") from err
    return loaded.groupvit_kwargs


def _clear(out: Path, keep: Sequence[str]) -> None:
    for name in _EXPORT_FILES:
        p = out / name
        if name not in keep and p.is_file():
            p.unlink()


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------------------------- writers
def _write_hf(loaded: LoadedModel, kwargs: dict, out: Path) -> list[Path]:
    cfg = {"architectures": ["GroupViTModel"], **config_to_hf(kwargs)}
    sd = ours_to_hf(loaded.model)  # HF keys; multi_label_logit_scale dropped
    return [
        _write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n"),
        export_safetensors(sd, out / "model.safetensors", metadata={"format": "pt"}),
    ]


def _ours_config(loaded: LoadedModel, kwargs: dict) -> dict:
    return {
        "format": OURS_FORMAT,
        "groupvit": kwargs,
        "image_size": loaded.image_size,
        "run_config": loaded.config.to_dict() if loaded.config is not None else None,
        "source": str(loaded.path),
    }


def _write_safetensors(loaded: LoadedModel, kwargs: dict, out: Path) -> list[Path]:
    cfg = _ours_config(loaded, kwargs)
    return [
        _write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n"),
        export_safetensors(loaded.model, out / "model.safetensors", config=cfg),
    ]


def _write_nvlabs(loaded: LoadedModel, kwargs: dict, out: Path) -> list[Path]:
    sd = {k: v.contiguous() for k, v in ours_to_nvlabs(loaded.model).items()}  # img_encoder.* ...
    return [save_checkpoint({"model": sd, "config": kwargs}, out / NVLABS_FILE)]


_WRITERS: dict[str, tuple[Callable[[LoadedModel, dict, Path], list[Path]], tuple[str, ...]]] = {
    "hf": (_write_hf, ("config.json", "model.safetensors", "README.md")),
    "safetensors": (_write_safetensors, ("config.json", "model.safetensors", "README.md")),
    "nvlabs": (_write_nvlabs, (NVLABS_FILE, "README.md")),
}


# ---------------------------------------------------------------------------------- model card
def measured_miou(loaded: LoadedModel) -> tuple[dict[str, float], Path] | None:
    """``({dataset: mIoU in [0, 1]}, results file)`` from ``<home>/eval/results.json``, or None."""
    path = loaded.home / "eval" / "results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    found = {
        k: float(v["miou"])
        for k, v in data.items()
        if isinstance(v, dict) and isinstance(v.get("miou"), (int, float)) and not isinstance(v["miou"], bool)
    }
    return (found, path) if found else None


def _notes(loaded: LoadedModel, kwargs: dict, to: str) -> list[str]:
    notes = []
    cfg = loaded.config
    if cfg is not None and cfg.model.name != "groupvit":
        notes.append(
            f"The trained model is `{cfg.model.name}`; exported is its inference GroupViT (vision depths "
            f"{kwargs['vision'].get('depths')}; MixReorg and GroupViT+: one more stage-1 block than the recipe)."
        )
    if to == "hf":
        if kwargs.get("image_pool") == "assigned":
            notes.append(
                "This model was trained with `image_pool=\"assigned\"` (the image vector weights the segment tokens "
                "by the patches they own). Hugging Face's GroupViTModel pools by mean, so its image embeddings "
                "differ from the trained model's; the per-pixel segmentation logits are unchanged, what reads the "
                "image embedding (image-level top-k class restriction, retrieval) is not. The `safetensors` "
                "export keeps the pooling."
            )
        if kwargs.get("multi_label_scale", True):
            notes.append("The separate multi-label logit scale (training only) has no place in HF and is dropped.")
        scale, cap = loaded.model.logit_scale.detach().exp().item(), float(kwargs.get("logit_scale_max", 100.0))
        if scale > cap:
            notes.append(f"exp(logit_scale) = {scale:.1f} exceeds our clamp {cap:g}; HF does not clamp it.")
        notes.append(
            "HF's `segmentation_logits` multiply the per-pixel logits by exp(logit_scale) twice: "
            "mixreorg's `segmentation_logits(...) * model.logit_scale.exp()` equals them."
        )
    return notes


_LOADING = {
    "hf": "```python\nfrom transformers import GroupViTModel\nmodel = GroupViTModel.from_pretrained(\"{out}\")\n```",
    "safetensors": "```python\nfrom mixreorg.recipes.loading import load_inference_model\n"
    "model, image_size = load_inference_model(\"{out}\")\n```",
    "nvlabs": "```python\nimport torch\nfrom mixreorg.nn.weights import load_nvlabs_groupvit\n"
    "ckpt = torch.load(\"{out}/" + NVLABS_FILE + "\", map_location=\"cpu\", weights_only=True)\n"
    "model = load_nvlabs_groupvit(ckpt, config=ckpt[\"config\"])\n```",
}


def _compact_json(d: dict) -> str:
    """``d`` as JSON, one top-level key per line."""
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items()) + "\n}"


def model_card(loaded: LoadedModel, to: str, kwargs: dict, out: Path, source: str | None = None) -> str:
    """The README.md of an export: source, config, measured mIoU, format notes, how to load it."""
    cfg = loaded.config
    source = source or str(loaded.path)
    v, t = kwargs["vision"], kwargs["text"]
    n_params = sum(p.numel() for p in loaded.model.parameters())
    lines = ["---", f"library_name: {'transformers' if to == 'hf' else 'mixreorg'}",
             "tags: [groupvit, mixreorg, zero-shot-image-segmentation]", "---", "",
             f"# GroupViT exported from `{source}`", "",
             f"Written by `python -m mixreorg.recipes.export {source} --to {to} {out}` "
             f"(read as: {loaded.kind}, `{loaded.path}`).", "", "## Model", ""]  # fmt: skip
    if cfg is not None:
        lines.append(f"- run: model `{cfg.model.name}`, preset `{cfg.preset}`, data `{cfg.data.source}`, "
                     f"train.steps {cfg.train.steps}, batch {cfg.train.batch_size}")  # fmt: skip
    lines += [
        f"- image size {loaded.image_size}, patch {v.get('patch_size')}, width {v.get('embed_dim')}, "
        f"{v.get('num_heads')} heads, depths {v.get('depths')}, group tokens {v.get('num_group_tokens')}, "
        f"output groups {v.get('num_output_groups')}, image pooling `{kwargs.get('image_pool', 'mean')}`",
        f"- text: width {t.get('width')}, {t.get('layers')} layers, {t.get('heads')} heads, context "
        f"{t.get('context_length')}; joint embedding {kwargs.get('proj_dim')}",
        f"- {n_params / 1e6:.2f} M parameters",
        "", "## Measured zero-shot segmentation", "",
    ]  # fmt: skip
    found = measured_miou(loaded)
    if found is None:
        lines.append("not evaluated")
    else:
        miou, path = found
        lines += ["| dataset | mIoU |", "|---|---|", *(f"| {k} | {100 * x:.1f} |" for k, x in miou.items()),
                  "", f"(from `{path}`)"]  # fmt: skip
    notes = _notes(loaded, kwargs, to)
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    lines += ["", "## Loading", "", _LOADING[to].format(out=out), "", "## Config (mixreorg GroupViT arguments)",
              "", "```json", _compact_json(kwargs), "```", ""]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- entry points
def export_model(source: str | Path, to: str, out: str | Path, *, force: bool = False) -> list[Path]:
    """Export what ``source`` names to ``out`` in format ``to`` (one of :data:`FORMATS`); returns
    the files written. ValueError naming the problem for bad input."""
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: expected one of {', '.join(FORMATS)}")
    out = _prepare_out(Path(out), str(source), force)
    loaded = load_model(source)
    kwargs = _exportable(loaded, to)
    write, names = _WRITERS[to]
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, names)
    with torch.no_grad():
        files = write(loaded, kwargs, out)
    files.append(_write_text(out / "README.md", model_card(loaded, to, kwargs, out, str(source))))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixreorg.recipes.export", description=__doc__.split("\n")[0])
    ap.add_argument("run", metavar="RUN", help="run folder, checkpoint, export, HF / NVlabs weights, or HF model id")
    ap.add_argument("out", metavar="OUT", help="output folder (must be empty or absent unless --force)")
    ap.add_argument("--to", required=True, choices=FORMATS, help="hf | safetensors | nvlabs")
    ap.add_argument("--force", action="store_true", help="write into a non-empty OUT (replacing export files)")
    args = ap.parse_args(argv)
    try:
        files = export_model(args.run, args.to, args.out, force=args.force)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run} as {args.to}:")
    for f in files:
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
