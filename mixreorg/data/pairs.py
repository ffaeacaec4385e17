"""Image-caption pairs from a folder or a CSV/TSV file, as an exactly resumable stream.

* :func:`ImageCaptionFolder`: every image under ``root`` (recursively; ``jpg jpeg png webp bmp``)
  with its caption in a sibling text file of the same stem (``photo.jpg`` + ``photo.txt`` or
  ``photo.text``).
* :func:`ImageCaptionCSV`: a table with a header; the image column is the first of ``image, filepath,
  file, path, filename, img`` and the caption column the first of ``caption, text, title, txt``
  present (or name them). Relative image paths are taken from the table's folder (or ``root``).
  ``.tsv`` files are tab-separated; ``sep`` overrides.

Both return an :class:`ImageCaptionPairs` stream: each epoch visits every pair once in an order
permuted by ``(seed, epoch)``; ranks and DataLoader workers take interleaved chunks of
``batch_size`` (see :mod:`mixreorg.data.stream`). An image without caption, an empty caption, a
missing image file or an undecodable image is skipped, counted in ``stats`` and logged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .stream import ResumableStream, chunked_index
from .transforms import train_transform

__all__ = ["ImageCaptionPairs", "ImageCaptionFolder", "ImageCaptionCSV", "PAIR_IMAGE_EXTS"]

logger = logging.getLogger("mixreorg.data")

PAIR_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_IMAGE_COLUMNS = ("image", "filepath", "file", "path", "filename", "img", "image_path")
_CAPTION_COLUMNS = ("caption", "text", "title", "txt")


class ImageCaptionPairs(ResumableStream):
    """A resumable stream over a fixed list of ``(image path, caption or None)`` pairs.

    Items: ``{"image": tensor, "caption": str, "key": str}``; ``transform(pil, rng)`` defaults to
    :func:`~mixreorg.data.transforms.train_transform` at ``image_size``. ``read(i)`` returns pair ``i``
    directly (and raises ``ValueError`` if it is unusable), for inspection.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str | os.PathLike[str], str | None]],
        batch_size: int | None = None,
        *,
        transform: Callable[..., torch.Tensor] | None = None,
        image_size: int = 224,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        source: str = "pairs",
    ) -> None:
        super().__init__(batch_size, rank=rank, world_size=world_size)
        if not pairs:
            raise ValueError(f"{source}: no image-caption pairs found")
        self.pairs = [(os.fspath(p), c) for p, c in pairs]
        self.seed = int(seed)
        self.shuffle = shuffle
        self.source = source
        self.transform = transform or train_transform(image_size)
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._digest: str | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def _fingerprint(self) -> dict[str, Any]:
        if self._digest is None:
            h = hashlib.sha1()
            for path, _ in self.pairs:
                h.update(path.encode("utf-8", "surrogatepass") + b"\n")
            self._digest = h.hexdigest()
        return {"num_pairs": len(self.pairs), "paths_sha1": self._digest, "seed": self.seed, "shuffle": self.shuffle}

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            n = len(self.pairs)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def _load(self, index: int, rng: np.random.Generator | None) -> tuple[Any, str]:
        path, caption = self.pairs[index]
        if caption is None or not caption.strip():
            return None, f"missing_caption: {path}"
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            return None, f"missing_image: {path}: {err.strerror or err}"
        try:
            with Image.open(io.BytesIO(data)) as im:
                img = im.convert("RGB")
            image = self.transform(img, rng)
        except Exception as err:  # noqa: BLE001 - any decoding failure is a skip
            return None, f"corrupt_image: {path}: {type(err).__name__}: {err}"
        return {"image": image, "caption": caption.strip(), "key": path}, ""

    def read(self, index: int) -> dict[str, Any]:
        """Pair ``index`` (file order, no augmentation randomness beyond a fixed generator)."""
        sample, note = self._load(index, np.random.default_rng([self.seed, 0, index]))
        if sample is None:
            raise ValueError(f"{self.source}: pair {index} is unusable ({note})")
        return sample

    def _role_items(self, role: int, num_roles: int, pointer: Any) -> Iterator[tuple[Any, Any, str]]:
        p = 0 if pointer is None else int(pointer)
        n = len(self.pairs)
        chunk = self._unit
        streak = 0
        while True:
            i = chunked_index(p, role, num_roles, self.rank, self.world_size, chunk)
            epoch, j = divmod(i, n)
            index = int(self._order(epoch)[j])
            p += 1
            sample, note = self._load(index, np.random.default_rng([self.seed, epoch, index]))
            streak = 0 if sample is not None else streak + 1
            if streak > 2 * n + 2 * chunk * num_roles * self.world_size:
                raise ValueError(f"{self.source}: no usable pair in a whole pass over the {n} pairs (all skipped)")
            yield p, sample, note


def _caption_file(image: Path) -> Path | None:
    for ext in (".txt", ".text"):
        cand = image.with_suffix(ext)
        if cand.is_file():
            return cand
    return None


def ImageCaptionFolder(  # noqa: N802 - a constructor function
    root: str | os.PathLike[str], batch_size: int | None = None, **kwargs: Any
) -> ImageCaptionPairs:
    """Pairs from ``root/**/<stem>.<jpg|jpeg|png|webp|bmp>`` + ``<stem>.txt`` (see module docstring)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ValueError(f"image-caption folder {base} does not exist or is not a folder")
    images = sorted(p for p in base.rglob("*") if p.suffix.lower() in PAIR_IMAGE_EXTS and p.is_file())
    if not images:
        raise ValueError(f"image-caption folder {base} contains no images ({', '.join(PAIR_IMAGE_EXTS)})")
    pairs: list[tuple[str, str | None]] = []
    no_caption = 0
    for img in images:
        cap = _caption_file(img)
        if cap is None:
            no_caption += 1
            pairs.append((str(img), None))
        else:
            pairs.append((str(img), cap.read_text(encoding="utf-8", errors="replace")))
    if no_caption:
        logger.warning(
            "%s: %d of %d images have no caption file (<stem>.txt); they are skipped and counted as missing_caption",
            base,
            no_caption,
            len(images),
        )
    return ImageCaptionPairs(pairs, batch_size, source=f"folder {base}", **kwargs)


def ImageCaptionCSV(  # noqa: N802 - a constructor function
    path: str | os.PathLike[str],
    batch_size: int | None = None,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    root: str | os.PathLike[str] | None = None,
    sep: str | None = None,
    **kwargs: Any,
) -> ImageCaptionPairs:
    """Pairs from a CSV/TSV table with a header row (see module docstring)."""
    table = Path(path).expanduser()
    if not table.is_file():
        raise ValueError(f"caption table {table} does not exist")
    delim = sep or ("\t" if table.suffix.lower() in (".tsv", ".tab") else ",")
    base = Path(root).expanduser() if root is not None else table.parent
    with table.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f, delimiter=delim)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if not columns:
            raise ValueError(f"caption table {table} has no header row")
        lower = {c.lower(): c for c in columns}

        def pick(given: str | None, options: Sequence[str], what: str) -> str:
            if given is not None:
                if given not in columns:
                    raise ValueError(f"caption table {table}: no column {given!r} for the {what}; columns: {columns}")
                return given
            for opt in options:
                if opt in lower:
                    return lower[opt]
            raise ValueError(
                f"caption table {table}: no {what} column (looked for {', '.join(options)}); columns: {columns}; "
                f"name it with {'image_column' if what == 'image' else 'caption_column'}="
            )

        img_col = pick(image_column, _IMAGE_COLUMNS, "image")
        cap_col = pick(caption_column, _CAPTION_COLUMNS, "caption")
        pairs: list[tuple[str, str | None]] = []
        for row in reader:
            row = {(k or "").strip(): v for k, v in row.items()}
            rel = (row.get(img_col) or "").strip()
            cap = row.get(cap_col)
            if not rel:
                rel = f"<row {reader.line_num}: empty image path>"
            p = Path(rel).expanduser()
            pairs.append((str(p if p.is_absolute() else base / p), cap if cap and cap.strip() else None))
    empty = sum(c is None for _, c in pairs)
    if empty:
        logger.warning(
            "%s: %d of %d rows have an empty caption; skipped and counted as missing_caption", table, empty, len(pairs)
        )
    return ImageCaptionPairs(pairs, batch_size, source=f"table {table}", **kwargs)
