"""``segment`` over many files: every readable image is segmented, the unreadable ones are listed
with their reason at the end, and the exit status says whether any failed (1) or none (0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixreorg.recipes.segment import main, segment_files
from tests.test_segment_cli import _save_hf, _tiny_groupvit


def _folder(root: Path, corrupt: bool) -> Path:
    """Two good images (and with ``corrupt`` a ``.png`` that is not an image) in ``root/imgs``."""
    folder = root / "imgs"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (40, 60), "c.jpg": (36, 36)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    if corrupt:
        (folder / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image needs")
    return folder


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    _save_hf(_tiny_groupvit().eval(), tmp_path / "model.safetensors")
    return tmp_path


def test_unreadable_file_is_listed_and_the_rest_segmented(model_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    folder = _folder(tmp_path / "bad", corrupt=True)
    out = tmp_path / "out"
    rc = main([str(folder), "--model", str(model_dir), "--classes", "cat, dog", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    for stem in ("a", "c"):  # the good images before and after the broken one
        assert (out / f"{stem}_seg.png").is_file() and (out / f"{stem}_labels.png").is_file()
    assert not (out / "b_broken_seg.png").exists()
    assert captured.out.count("_seg.png") == 2
    assert "could not read 1 of 3 image(s)" in captured.err
    assert str(folder / "b_broken.png") in captured.err and "cannot identify image file" in captured.err


def test_all_readable_exits_zero(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "good", corrupt=False)
    assert main([str(folder), "--model", str(model_dir), "--classes", "cat, dog", "--out", str(tmp_path / "o")]) == 0
    assert "could not read" not in capsys.readouterr().err


def test_segment_files_raises_without_a_failure_list(model_dir: Path, tmp_path: Path) -> None:
    from mixreorg.recipes.loading import load_inference_model

    model, _ = load_inference_model(model_dir)
    folder = _folder(tmp_path / "bad", corrupt=True)
    files = sorted(folder.iterdir())
    with pytest.raises(ValueError, match="cannot read image .*b_broken.png"):
        segment_files(model, files, ["cat"], tmp_path / "o", short_side=32)
    failed: list = []
    done = segment_files(model, files, ["cat"], tmp_path / "o2", short_side=32, failed=failed)
    assert [Path(r["image"]).name for r in done] == ["a.png", "c.jpg"]
    assert [p.name for p, _ in failed] == ["b_broken.png"]
