"""Model ids in (a Hugging Face id through ``huggingface_hub``'s cache, offline), models out
(``python -m mixreorg.recipes.export RUN --to hf|safetensors|nvlabs OUT``), each format round-tripped."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GroupViTConfig, GroupViTModel  # a test dependency: the independent oracle

from mixreorg.checkpoint import save_checkpoint
from mixreorg.nn import GroupViT
from mixreorg.nn.weights import load_nvlabs_groupvit
from mixreorg.recipes.config import apply_overrides, get_preset
from mixreorg.recipes.evaluate import main as eval_main
from mixreorg.recipes.export import NVLABS_FILE, export_model
from mixreorg.recipes.export import main as export_main
from mixreorg.recipes.loading import load_inference_model, load_model
from mixreorg.recipes.models import build_model
from mixreorg.recipes.pretrain import main as pretrain_main
from mixreorg.recipes.segment import main as segment_main
from tests.test_pretrain import TINY
from tests.test_weights import _ids

REPO = "tiny-org/groupvit-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOL = dict(atol=1e-4, rtol=1e-4)
SMALL_HF = dict(
    # our tokenizer's vocabulary (segment / evaluate tokenize class prompts); its EOT is the largest id
    text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=16, bos_token_id=49406, eos_token_id=49407,
                     pad_token_id=0),
    vision_config=dict(hidden_size=32, intermediate_size=64, depths=[1, 1, 1], num_hidden_layers=3,
                       num_group_tokens=[4, 2, 0], num_output_groups=[4, 2, 2], num_attention_heads=2,
                       image_size=32, patch_size=8),
    projection_dim=16, projection_intermediate_dim=32,
)  # fmt: skip


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight and BatchNorm statistic off its initial value (so that a dropped or
    transposed tensor shows up in the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _hf_model(seed: int = 0) -> GroupViTModel:
    torch.manual_seed(seed)
    model = GroupViTModel(GroupViTConfig(**SMALL_HF)).eval()
    _perturb(model, seed)
    return model


def _cache(cache: Path, repo: str, model: GroupViTModel) -> Path:
    """Write ``model`` where huggingface_hub's cache keeps ``repo``: models--o--n/snapshots/<commit> + refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    model.save_pretrained(snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


def _compare_with_hf(hf: GroupViTModel, ours: GroupViT, image_pool_mean: bool = False) -> None:
    """Image / text embeddings and HF's segmentation logits (our logits times the scale once more)."""
    vc, tc = hf.config.vision_config, hf.config.text_config
    torch.manual_seed(1)
    images = torch.randn(2, 3, vc.image_size, vc.image_size)  # [B, 3, H, W]
    ids = _ids(2, tc.max_position_embeddings, tc.eos_token_id)  # [B, T]
    if image_pool_mean:
        ours.image_pool = "mean"  # HF pools by mean (what the model card says)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images, output_segmentation=True)
        enc = ours.encode_image(images, return_maps=True)
        txt = ours.encode_text(ids)  # [B, D]
        seg = ours.segmentation_logits_from(enc, txt, images.shape[-2:]) * ours.logit_scale.exp()  # [B, B, H, W]
    torch.testing.assert_close(enc["image_embed"], ref.image_embeds, **TOL)
    torch.testing.assert_close(txt, ref.text_embeds, **TOL)
    torch.testing.assert_close(seg, ref.segmentation_logits, **TOL)
    assert ref.segmentation_logits.abs().max() > 1e-2  # not trivially zero


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, GroupViTModel]:
    """An offline hub cache under tmp_path holding REPO; the env points huggingface_hub at it."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    cache = tmp_path / "cache"
    hf = _hf_model()
    snap = _cache(cache, REPO, hf)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub itself resolves the layout
    assert Path(try_to_load_from_cache(REPO, "config.json", cache_dir=cache)) == snap / "config.json"
    assert Path(snapshot_download(REPO, cache_dir=cache, local_files_only=True)) == snap
    return cache, hf


# ---------------------------------------------------------------------------------- ids in
def test_model_id_loads_from_the_offline_cache(hub: tuple[Path, GroupViTModel]) -> None:
    _, hf = hub
    loaded = load_model(REPO)
    assert loaded.kind == "hf" and loaded.config is None and loaded.image_size == 32
    assert isinstance(loaded.model, GroupViT) and not loaded.model.training
    _compare_with_hf(hf, loaded.model)
    pinned, _ = load_inference_model(f"{REPO}@{COMMIT}")  # a revision pins the snapshot
    assert all(torch.equal(a, b) for a, b in zip(pinned.state_dict().values(), loaded.model.state_dict().values()))


def test_segment_and_evaluate_take_a_model_id(hub: tuple[Path, GroupViTModel], tmp_path: Path) -> None:
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(img)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "mixreorg.recipes.segment", str(img), "--model", REPO, "--classes", "cat, dog",
           "--out", str(tmp_path / "seg")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "seg" / "img_seg.png").is_file() and "img_seg.png" in done.stdout
    assert np.asarray(Image.open(tmp_path / "seg" / "img_labels.png")).shape == (32, 45)  # short side 32
    assert eval_main([REPO, "--size", "4", "--overlays", "2", "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "results.json").is_file()


def test_an_existing_path_wins_over_an_id(hub: tuple[Path, GroupViTModel], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    other = _hf_model(seed=5)
    monkeypatch.chdir(tmp_path)
    other.save_pretrained(tmp_path / REPO)  # ./tiny-org/groupvit-tiny: a local folder of that name
    loaded, _ = load_inference_model(REPO)
    _compare_with_hf(other, loaded)


def test_unknown_id_offline_is_a_clear_error(hub: tuple[Path, GroupViTModel], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    with pytest.raises(ValueError, match=r"nobody/nothing.*offline \(HF_HUB_OFFLINE=1\).*local Hugging Face cache"):
        load_inference_model("nobody/nothing")
    with pytest.raises(ValueError, match="no such file or folder") as err:
        load_inference_model("runs/missing/ckpt-000000001.pt")  # a file name, never an id
    assert "could be fetched" not in str(err.value)  # no hub look-up
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert segment_main([str(tmp_path / "x.png"), "--model", "nobody/nothing", "--classes", "a"]) == 2
    assert "error: --model nobody/nothing: no such file or folder, and no Hugging Face model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- models out
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny trained runs (HF needs 2-layer heads): GroupViT evaluated, MixReorg (GroupViT+) not."""
    root = tmp_path_factory.mktemp("runs")
    sets = [a for s in [*TINY, "model.proj_layers=2", "model.image_pool=assigned"] for a in ("--set", s)]
    assert pretrain_main(["--steps", "2", "--out", str(root / "groupvit"), "--quiet", *sets]) == 0
    assert pretrain_main(["--steps", "2", "--out", str(root / "mixreorg"), "--quiet", "--no-eval",
                          "--model", "mixreorg", *sets]) == 0  # fmt: skip
    return {"groupvit": root / "groupvit", "mixreorg": root / "mixreorg"}


def _built_run(folder: Path, *overrides: str) -> Path:
    """A run folder holding one checkpoint of an untrained model (cheaper than training)."""
    cfg = apply_overrides(get_preset("tiny"), [*TINY, *overrides])
    save_checkpoint({"model": build_model(cfg).state_dict(), "config": cfg.to_dict()}, folder / "ckpt-000000001.pt")
    return folder


@pytest.mark.parametrize("name", ["groupvit", "mixreorg"])
def test_export_hf_matches_transformers(runs: dict[str, Path], tmp_path: Path, name: str) -> None:
    out = tmp_path / "hf"
    assert export_main([str(runs[name]), "--to", "hf", str(out)]) == 0
    hf, info = GroupViTModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours, _ = load_inference_model(runs[name])
    if name == "mixreorg":  # the GroupViT+ inference model: the contextual block is a 2nd stage-1 block
        assert hf.config.vision_config.depths[0] == ours.vision.depths[0] == 2
    _compare_with_hf(hf.eval(), ours, image_pool_mean=True)
    card = (out / "README.md").read_text()
    assert '"image_pool": "assigned"' in card and "pools by mean" in card
    if name == "groupvit":
        miou = json.loads((runs[name] / "eval" / "results.json").read_text())["synthshapes"]["miou"]
        assert f"| synthshapes | {100 * miou:.1f} |" in card
    else:
        assert "not evaluated" in card and "`mixreorg`" in card


def test_export_safetensors_round_trip(runs: dict[str, Path], tmp_path: Path) -> None:
    ref, size, cfg = load_inference_model(runs["mixreorg"], with_config=True)
    out = tmp_path / "st"
    files = export_model(str(runs["mixreorg"]), "safetensors", out)
    assert sorted(f.name for f in files) == ["README.md", "config.json", "model.safetensors"]
    back, back_size, back_cfg = load_inference_model(out, with_config=True)
    assert back_size == size and back_cfg == cfg and back.image_pool == "assigned"
    assert ref.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in back.state_dict().items())
    # the file alone carries its config (safetensors metadata)
    shutil.copy(out / "model.safetensors", tmp_path / "alone.safetensors")
    alone, _ = load_inference_model(tmp_path / "alone.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(alone.encode_image(x)["image_embed"], ref.encode_image(x)["image_embed"])


def test_export_nvlabs_round_trip(runs: dict[str, Path], tmp_path: Path) -> None:
    ref, _ = load_inference_model(runs["groupvit"])
    out = tmp_path / "nv"
    assert export_main([str(runs["groupvit"]), "--to", "nvlabs", str(out)]) == 0
    ckpt = torch.load(out / NVLABS_FILE, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "config"} and any(k.startswith("img_encoder.") for k in ckpt["model"])
    for back in (load_nvlabs_groupvit(ckpt, config=ckpt["config"]), load_inference_model(out / NVLABS_FILE)[0]):
        assert ref.state_dict().keys() == back.state_dict().keys()
        assert all(torch.equal(ref.state_dict()[k], v) for k, v in back.state_dict().items())
    assert "not evaluated" not in (out / "README.md").read_text()  # the run's eval/results.json is quoted


def test_export_from_a_model_id_to_hf(hub: tuple[Path, GroupViTModel], tmp_path: Path) -> None:
    _, hf = hub
    assert export_main([REPO, "--to", "hf", str(tmp_path / "again")]) == 0
    again = GroupViTModel.from_pretrained(tmp_path / "again").eval()
    ref = hf.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in again.state_dict().items())
    assert "not evaluated" in (tmp_path / "again" / "README.md").read_text()


def test_export_refuses_bad_input(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = runs["groupvit"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / NVLABS_FILE).write_bytes(b"stale")
    assert export_main([str(run), "--to", "safetensors", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / NVLABS_FILE).read_bytes() == b"stale"
    assert export_main([str(run), "--to", "safetensors", str(out), "--force"]) == 0
    assert not (out / NVLABS_FILE).exists() and (out / "notes.txt").read_text() == "keep me"  # stale weights go
    assert load_inference_model(out)[0] is not None
    cases = {
        "no such file or folder": [str(tmp_path / "missing"), "--to", "hf", str(tmp_path / "o1")],
        "holds the model": [str(run / "checkpoints"), "--to", "hf", str(run), "--force"],
        "is a file": [str(run), "--to", "hf", str(out / "notes.txt")],
        "supervised-bound run": [str(_built_run(tmp_path / "sup", "model.name=supervised")), "--to", "hf",
                                 str(tmp_path / "o2")],
        "cannot be exported to hf: .*proj_layers=1": [str(_built_run(tmp_path / "p1", "model.proj_layers=1")),
                                                      "--to", "hf", str(tmp_path / "o3")],
    }  # fmt: skip
    for message, argv in cases.items():
        assert export_main(argv) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(message, err), (message, err)
    assert not (tmp_path / "o2").exists()  # nothing written on refusal
    with pytest.raises(SystemExit) as exc:
        export_main([str(run), "--to", "onnx", str(tmp_path / "o4")])
    assert exc.value.code == 2
