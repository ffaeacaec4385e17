"""Unknown keys in the config's dict fields (model.vision, model.text, model.mixreorg, data.synth,
eval.roots) raise, listing the valid ones, instead of being silently ignored."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixreorg.nn.mixreorg import MixReorgConfig
from mixreorg.nn.text import TextEncoder
from mixreorg.nn.vision import GroupViTVisionEncoder
from mixreorg.recipes.config import PRESETS, PretrainConfig, apply_overrides, get_preset
from mixreorg.recipes.pretrain import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name: str, tmp_path: Path) -> None:
    cfg = get_preset(name)
    assert cfg.validate() is cfg
    PretrainConfig.load(cfg.save(tmp_path / "config.json")).validate()  # and after the JSON round trip


def _message(cfg: PretrainConfig) -> str:
    with pytest.raises(ValueError) as info:
        cfg.validate()
    return str(info.value)


def test_unknown_vision_key_lists_the_valid_ones() -> None:
    cfg = apply_overrides(get_preset("tiny"), ["model.vision.num_head=4"])
    msg = _message(cfg)
    valid = sorted(n for n in inspect.signature(GroupViTVisionEncoder.__init__).parameters if n != "self")
    assert f"unknown key(s) in model.vision: ['num_head']; valid: {valid}" in msg
    assert "img_size" in valid and "use_checkpoint" in valid  # set by the builder, accepted


def test_every_dict_field_is_checked() -> None:
    cfg = apply_overrides(
        get_preset("tiny_mixreorg"),
        [
            "model.text.widht=64",
            "model.mixreorg.group_sise=4",
            "data.synth.caption_colors=false",
            "eval.roots.vocc=/data/VOC",
        ],
    )
    msg = _message(cfg)
    text_valid = sorted(n for n in inspect.signature(TextEncoder.__init__).parameters if n != "self")
    weights = ["seg_weight", "restored_weight", "patch_seg_weight", "mixed_grounded_weight"]
    mix_valid = sorted([f.name for f in dataclasses.fields(MixReorgConfig)] + weights)
    assert f"unknown key(s) in model.text: ['widht']; valid: {text_valid}" in msg
    assert f"unknown key(s) in model.mixreorg: ['group_sise']; valid: {mix_valid}" in msg
    assert "unknown key(s) in data.synth: ['caption_colors']; valid: ['caption_colours'," in msg
    assert "unknown key(s) in eval.roots: ['vocc']; valid: ['ade20k', 'coco_object', 'context', 'voc']" in msg


def test_valid_keys_pass() -> None:
    cfg = apply_overrides(
        get_preset("tiny_mixreorg"),
        [
            "model.vision.img_size=64",
            "model.text.width=64",
            "model.mixreorg.seg_weight=0.5",
            "model.mixreorg.restored_weight=0",
            "model.mixreorg.contextual=false",
            "data.synth.caption_colours=false",
            "eval.roots.voc=/data/VOC",
            "eval.roots.coco-object=/data/coco",  # the dataset names are matched as the loader does
        ],
    )
    cfg.validate()


def test_saved_config_with_unknown_key_is_rejected(tmp_path: Path) -> None:
    cfg = get_preset("tiny")
    cfg.model.vision["num_head"] = 4
    loaded = PretrainConfig.load(cfg.save(tmp_path / "config.json"))
    assert "unknown key(s) in model.vision: ['num_head']" in _message(loaded)


def test_cli_set_unknown_key_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--set", "model.vision.num_head=4", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) in model.vision: ['num_head']; valid: [" in err and "'num_heads'" in err


def test_cli_subprocess_exit_code() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mixreorg.recipes.pretrain", "--set", "model.vision.num_head=4", "--print-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr
    assert "unknown key(s) in model.vision: ['num_head']; valid: [" in proc.stderr
