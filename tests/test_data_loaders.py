"""Tar shards (img2dataset layout), folder/CSV pairs and the torchvision-free transforms."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mixreorg.data import ImageCaptionCSV, ImageCaptionFolder, ShardStream, expand_shards
from mixreorg.data import transforms as T

# ----------------------------------------------------------------------------------------- helpers


def _image_bytes(i: int, fmt: str = "JPEG", size: int = 24) -> bytes:
    arr = np.zeros((size, size + 4, 3), dtype=np.uint8)
    arr[..., 0] = (37 * i) % 256
    arr[..., 1] = np.arange(size + 4, dtype=np.uint8)[None, :] * 8
    arr[: size // 2, :, 2] = 200
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


CORRUPT_JPEG = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"not really a jpeg" * 5


def write_shards(root: Path) -> Path:
    """Two img2dataset-style shards in ``root``: 20 samples, one corrupt JPEG, one without caption."""
    s0 = []
    for i in range(10):
        files = {"jpg": _image_bytes(i), "txt": f"caption {i}".encode(), "json": b'{"url": "x"}'}
        if i == 3:
            files["jpg"] = CORRUPT_JPEG
        if i == 5:
            del files["txt"]
        s0.append((f"{i:09d}", files))
    s1 = [(f"{i:09d}", {"png": _image_bytes(i, "PNG"), "text": f"caption {i}".encode()}) for i in range(10, 20)]
    root.mkdir(parents=True, exist_ok=True)
    _write_tar(root / "shard-00000.tar", s0)
    _write_tar(root / "shard-00001.tar", s1)
    return root


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    return write_shards(tmp_path)


GOOD_KEYS = {f"{i:09d}" for i in range(20)} - {f"{3:09d}", f"{5:09d}"}


def _one_epoch(stream: ShardStream) -> list[dict]:
    """Samples of the first epoch of a per-sample, single-process stream (observed)."""
    out = []
    for sample in stream:
        stream.observe(sample)  # skips are reported with the next delivered sample: observe that one too
        if sample["_state"]["pointer"][0] > 0:
            break
        out.append(sample)
    return out


# ----------------------------------------------------------------------------------------- shards


def test_brace_patterns_and_shard_specs(shards: Path) -> None:
    # brace patterns (the braceexpand package); remote URLs and pipe: commands are expanded, not listed
    assert expand_shards("https://h/a{0..2}b.tar") == [f"https://h/a{i}b.tar" for i in range(3)]
    assert expand_shards("http://h/x{000..010..5}") == ["http://h/x000", "http://h/x005", "http://h/x010"]
    assert expand_shards("http://h/{a,b}{1..2}") == ["http://h/a1", "http://h/a2", "http://h/b1", "http://h/b2"]
    assert expand_shards("http://h/p{q{1,2},r}") == ["http://h/pq1", "http://h/pq2", "http://h/pr"]
    assert expand_shards(["pipe:cat /d/{0,1}.tar | awk '{print}'"]) == [
        "pipe:cat /d/0.tar | awk '{print}'",
        "pipe:cat /d/1.tar | awk '{print}'",
    ]
    pattern = str(shards / "shard-{00000..00001}.tar")
    assert expand_shards(pattern) == [str(shards / "shard-00000.tar"), str(shards / "shard-00001.tar")]
    assert expand_shards(shards) == expand_shards(str(shards / "*.tar")) == expand_shards(pattern)
    assert expand_shards("file://" + pattern) == expand_shards(pattern)
    with pytest.raises(ValueError, match="shard-00002.tar does not exist"):
        expand_shards(str(shards / "shard-{00000..00002}.tar"))
    with pytest.raises(ValueError, match="matches no file"):
        expand_shards(str(shards / "nope-*.tar"))
    with pytest.raises(ValueError, match="unbalanced braces"):
        expand_shards(str(shards / "shard-{00000..00001.tar"))


def test_corrupt_and_captionless_samples_are_skipped_and_counted(shards: Path, caplog) -> None:
    stream = ShardStream(str(shards / "shard-{00000..00001}.tar"), image_size=32, shuffle_block=4, seed=1)
    with caplog.at_level(logging.WARNING, logger="mixreorg.data"):
        samples = _one_epoch(stream)
    keys = [s["key"] for s in samples]
    assert sorted(keys) == sorted(GOOD_KEYS)  # every good sample exactly once per epoch
    assert keys != sorted(keys)  # block shuffle changed the order
    for s in samples:
        assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
        assert s["caption"] == f"caption {int(s['key'])}"
    stats = stream.stats
    assert stats["samples"] == 18 + 1 and stats["corrupt_image"] == 1 and stats["missing_caption"] == 1
    assert stats["corrupt_shard"] == 0 and stats["missing_image"] == 0
    assert {r for r, _ in stream.skipped_examples} == {"corrupt_image", "missing_caption"}
    assert "000000003" in caplog.text and "000000005" in caplog.text
    assert "skipped 1 corrupt image, 1 missing caption" in stream.stats_report()


def _batches(stream: ShardStream, n: int, workers: int) -> list[tuple[list[str], torch.Tensor]]:
    out = []
    for batch, _ in zip(DataLoader(stream, batch_size=None, num_workers=workers), range(n)):
        stream.observe(batch)
        out.append((batch["key"], batch["image"]))
    return out


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(ia, ib) for (ka, ia), (kb, ib) in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_resume_equals_uninterrupted(shards: Path, workers: int) -> None:
    def make() -> ShardStream:
        return ShardStream(shards, batch_size=3, image_size=16, shuffle_block=4, seed=7)

    full = _batches(make(), 9, workers)  # crosses epochs and the corrupt samples
    first = make()
    head = _batches(first, 4, workers)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = _batches(resumed, 5, workers)
    assert _same(head + tail, full)
    assert resumed.stats["samples"] == 27
    if workers:
        wrong = ShardStream(shards, batch_size=3, image_size=16, shuffle_block=4, seed=7)
        wrong.load_state_dict(state)
        with pytest.raises(ValueError, match="num_workers"):
            next(iter(wrong))  # the position was saved with 2 workers


def test_fewer_shards_than_workers_splits_samples(shards: Path) -> None:
    one = shards / "shard-00001.tar"
    keys = []
    for rank in range(2):
        stream = ShardStream(one, image_size=16, shuffle_block=0, rank=rank, world_size=2)
        keys.append([s["key"] for s in _one_epoch(stream)])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"{i:09d}" for i in range(10, 20)]
    assert keys[0] == sorted(keys[0])  # shuffle_block=0: file order


def test_truncated_shard_is_counted_not_fatal(shards: Path) -> None:
    data = (shards / "shard-00001.tar").read_bytes()
    (shards / "cut.tar").write_bytes(data[: len(data) // 2])
    stream = ShardStream([shards / "cut.tar", shards / "shard-00000.tar"], image_size=16, shuffle_shards=False)
    samples = _one_epoch(stream)
    assert stream.stats["corrupt_shard"] == 1
    assert any(k in ("000000010", "000000011") for k in (s["key"] for s in samples))  # read up to the cut
    assert {f"{i:09d}" for i in range(10) if i not in (3, 5)} <= {s["key"] for s in samples}


def test_all_bad_shards_raise_a_clear_error(tmp_path: Path) -> None:
    _write_tar(tmp_path / "bad.tar", [(f"{i}", {"jpg": CORRUPT_JPEG, "txt": b"x"}) for i in range(3)])
    with pytest.raises(ValueError, match="no usable sample"):
        list(ShardStream(tmp_path / "bad.tar", image_size=16))


# ----------------------------------------------------------------------------------------- pairs


@pytest.fixture()
def pair_folder(tmp_path: Path) -> Path:
    root = tmp_path / "pairs"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / f"img{i}.jpg").write_bytes(_image_bytes(i))
        (root / f"img{i}.txt").write_text(f"a photo number {i}\n")
    (root / "sub" / "deep.png").write_bytes(_image_bytes(9, "PNG"))
    (root / "sub" / "deep.text").write_text("deep caption")
    (root / "nocap.jpg").write_bytes(_image_bytes(7))  # no caption file
    (root / "broken.jpg").write_bytes(CORRUPT_JPEG)
    (root / "broken.txt").write_text("broken")
    return root


def _epoch_of_pairs(stream) -> list[dict]:
    """The delivered samples of the first epoch (the pointer counts raw pairs, skipped ones included)."""
    n = stream.num_pairs
    out = []
    for sample in stream:
        stream.observe(sample)  # skips are reported with the next delivered sample: observe that one too
        if sample["_state"]["pointer"] > n:
            break
        out.append(sample)
    return out


def test_folder_pairs(pair_folder: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mixreorg.data"):
        stream = ImageCaptionFolder(pair_folder, image_size=20)
    assert "1 of 9 images have no caption file" in caplog.text
    assert stream.num_pairs == 9
    got = _epoch_of_pairs(stream)  # 9 pairs: 7 good, 1 without caption, 1 corrupt
    names = sorted(Path(s["key"]).name for s in got)
    assert names == sorted([f"img{i}.jpg" for i in range(6)] + ["deep.png"])
    assert {s["caption"] for s in got} >= {"deep caption", "a photo number 0"}
    assert got[0]["image"].shape == (3, 20, 20)
    assert stream.stats["missing_caption"] == 1 and stream.stats["corrupt_image"] == 1
    idx = [p for p, _ in stream.pairs].index(str(pair_folder / "broken.jpg"))
    with pytest.raises(ValueError, match="corrupt_image"):
        stream.read(idx)
    with pytest.raises(ValueError, match="does not exist"):
        ImageCaptionFolder(pair_folder / "missing")


def test_csv_pairs(tmp_path: Path, pair_folder: Path) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text(
        "filepath,title,extra\n"
        f"{pair_folder / 'img0.jpg'},first caption,1\n"
        'pairs/img1.jpg,"second, with comma",2\n'
        "pairs/gone.jpg,missing file,3\n"
        "pairs/img2.jpg,,4\n"
    )
    stream = ImageCaptionCSV(table, image_size=16, shuffle=False)
    got = _epoch_of_pairs(stream)
    assert [s["caption"] for s in got] == ["first caption", "second, with comma"]
    assert stream.stats["missing_image"] == 1 and stream.stats["missing_caption"] == 1
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("image\tcaption\npairs/img3.jpg\tfrom a tsv\n")
    assert ImageCaptionCSV(tsv, image_size=16).read(0)["caption"] == "from a tsv"
    custom = tmp_path / "custom.csv"
    custom.write_text("pic;words\npairs/img4.jpg;custom columns\n")
    with pytest.raises(ValueError, match=r"no image column .*columns: \['pic', 'words'\]"):
        ImageCaptionCSV(custom, sep=";")
    assert ImageCaptionCSV(custom, sep=";", image_column="pic", caption_column="words").read(0)["caption"] == (
        "custom columns"
    )


def test_pairs_resume_with_workers(pair_folder: Path) -> None:
    def make():
        return ImageCaptionFolder(pair_folder, batch_size=2, image_size=12, seed=3)

    def run(stream, n):
        out = []
        for batch, _ in zip(DataLoader(stream, batch_size=None, num_workers=2), range(n)):
            stream.observe(batch)
            out.append((batch["key"], batch["image"]))
        return out

    full = run(make(), 8)
    s = make()
    head = run(s, 3)
    resumed = make()
    resumed.load_state_dict(s.state_dict())
    assert _same(head + run(resumed, 5), full)
    other = ImageCaptionFolder(pair_folder, batch_size=2, image_size=12, seed=4)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(s.state_dict())


# ----------------------------------------------------------------------------------------- transforms


def _gradient(w: int = 50, h: int = 40) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


def test_random_resized_crop() -> None:
    crop = T.RandomResizedCrop(24, scale=(0.2, 1.0))
    img = _gradient()
    for seed in range(50):
        top, left, h, w = crop.params(img.width, img.height, np.random.default_rng(seed))
        assert 0 <= top and 0 <= left and top + h <= img.height and left + w <= img.width
        assert 0.2 * 2000 * 0.7 <= h * w <= 2000
    a = crop(img, np.random.default_rng(3))
    b = crop(img, np.random.default_rng(3))
    assert a.size == (24, 24) and np.array_equal(np.asarray(a), np.asarray(b))
    # a tall image that admits no crop of the ratio range falls back to a centre crop
    top, left, h, w = T.RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0)).params(
        10, 100, np.random.default_rng(0)
    )
    assert (h, w) == (10, 10) and top == 45
    with pytest.raises(ValueError, match="scale"):
        T.RandomResizedCrop(8, scale=(0.5, 0.1))


def test_flip_jitter_erasing_normalize() -> None:
    img = _gradient()
    flipped = T.RandomHorizontalFlip(1.0)(img, np.random.default_rng(0))
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    t = T.to_tensor(img)
    assert t.shape == (3, 40, 50) and 0 <= float(t.min()) and float(t.max()) <= 1
    assert torch.equal(T.RandomHorizontalFlip(1.0)(t), t.flip(-1))
    assert torch.allclose(T.ColorJitter(0, 0, 0)(t, np.random.default_rng(0)), t)
    jit = T.ColorJitter(0.4, 0.4, 0.4)(t, np.random.default_rng(1))
    assert jit.shape == t.shape and float(jit.min()) >= 0 and float(jit.max()) <= 1 and not torch.equal(jit, t)
    n = T.normalize(t)
    assert torch.allclose(T.denormalize(n), t, atol=1e-6)
    erased = T.RandomErasing(1.0)(n, np.random.default_rng(2))
    changed = (erased != n).any(0)
    assert 0 < int(changed.sum()) < changed.numel()
    rows, cols = changed.nonzero(as_tuple=True)  # one rectangle
    assert int(changed.sum()) == (int(rows.max()) - int(rows.min()) + 1) * (int(cols.max()) - int(cols.min()) + 1)


def test_pipelines_and_resizes() -> None:
    img = _gradient(500, 375)
    out = T.train_transform(64)(img, np.random.default_rng(0))
    assert out.shape == (3, 64, 64)
    again = T.train_transform(64)(img, np.random.default_rng(0))
    assert torch.equal(out, again)
    ev = T.eval_transform(224)(img)
    assert ev.shape == (3, 224, 224)
    assert T.ResizeKeepRatio((2048, 448)).output_size(500, 375) == (597, 448)
    assert T.ResizeKeepRatio((2048, 448)).output_size(4000, 1000) == (1792, 448)
    assert T.ResizeKeepRatio((2048, 448)).output_size(10000, 1000) == (2048, 205)
    assert T.Resize(32)(img).size == (43, 32)
    assert T.CenterCrop(20)(_gradient(30, 30)).size == (20, 20)
    with pytest.raises(ValueError, match="interpolation"):
        T.Resize(8, interpolation="cubic-ish")


def test_data_package_does_not_import_torchvision() -> None:
    code = (
        "import sys, mixreorg.data, mixreorg.metrics, mixreorg.checkpoint, mixreorg.viz; "
        "print('torchvision' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
