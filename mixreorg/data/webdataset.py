"""Image-caption tar shards as img2dataset / webdataset write them, read with the standard library.

Why plain ``tarfile`` and not the ``webdataset`` package: exact resume needs the position of every
sample (shard, offset) and a shuffle that is a pure function of ``(seed, epoch, shard, block)``;
webdataset's shuffle buffer and pipeline stages keep state that cannot be saved, and its users report
host-memory growth. Here memory is bounded by one shuffle block of raw bytes per worker, and the
shard format is the same.

Format: a tar file whose members are grouped into samples by *key* = the member path up to the first
``.`` of its file name (``00000123.jpg``, ``00000123.txt``, ``00000123.json`` -> key ``00000123``);
members of one sample are consecutive. The image is the first of ``jpg|png|jpeg|webp`` present, the
caption the first of ``txt|text`` (UTF-8). Other members (``json`` metadata ...) are ignored.

Shard specs: a path, a folder (all ``*.tar`` inside), a glob, a brace pattern
(``/data/cc12m/{00000..01242}.tar``, ``{a,b}``), or a list of those; a pattern that matches no file
raises ``ValueError`` naming it.

Order and resume: see :class:`ShardStream`. Bad samples are skipped, counted (``stream.stats``) and
logged, never fatal: ``corrupt_image`` (undecodable bytes), ``missing_image``, ``missing_caption``
(absent or empty), ``corrupt_shard`` (unreadable/truncated tar: the rest of that shard).
"""

from __future__ import annotations

import glob
import io
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .stream import ResumableStream
from .transforms import train_transform

__all__ = ["braceexpand", "expand_shards", "iter_tar_samples", "ShardStream", "IMAGE_EXTS", "CAPTION_EXTS"]

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
CAPTION_EXTS = ("txt", "text")


def _split_top(body: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def braceexpand(pattern: str) -> list[str]:
    """Expand ``{a,b,c}`` alternatives (nestable) and ``{000..123}`` numeric ranges (zero-padded as
    written, optional ``..step``), in order, like the shell / the ``braceexpand`` package."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += pattern[end] == "{"
        depth -= pattern[end] == "}"
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced braces in {pattern!r}")
    prefix, body, rests = pattern[:start], pattern[start + 1 : end], braceexpand(pattern[end + 1 :])
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?", body)
    if rng:
        lo_s, hi_s, step_s = rng.groups()
        lo, hi, step = int(lo_s), int(hi_s), int(step_s or 1)
        if step < 1:
            raise ValueError(f"brace range step must be >= 1 in {pattern!r}")
        width = len(lo_s) if lo_s.lstrip("-").startswith("0") and len(lo_s) > 1 else 0
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        alts = [str(v).zfill(width) if width else str(v) for v in values]
    else:
        parts = _split_top(body)
        if len(parts) == 1:  # "{x}" is literal text
            return [prefix + "{" + b + "}" + r for b in braceexpand(body) for r in rests]
        alts = [e for part in parts for e in braceexpand(part)]
    return [prefix + a + r for a in alts for r in rests]


def expand_shards(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Resolve a shard spec (see module docstring) to a list of existing tar files, in order."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("no shards given")
    out: list[str] = []
    for s in specs:
        s = os.fspath(s)
        if s.startswith(("pipe:", "http://", "https://", "s3://", "gs://")):
            raise ValueError(f"shard {s!r}: only local files are supported (copy the shards to a local disk)")
        for path in braceexpand(s):
            path = os.path.expanduser(path)
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(path, "*.tar")))
                if not found:
                    raise ValueError(f"shard folder {path} contains no *.tar files")
                out.extend(found)
            elif any(c in path for c in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise ValueError(f"shard pattern {path} matches no file")
                out.extend(found)
            elif os.path.isfile(path):
                out.append(path)
            else:
                raise ValueError(f"shard {path} does not exist" + (f" (from pattern {s!r})" if path != s else ""))
    return out


def _split_name(name: str) -> tuple[str, str] | None:
    base = posixpath.basename(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    folder = posixpath.dirname(name)
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def iter_tar_samples(path: str, read_from: int = 0) -> Iterator[tuple[int, str, dict[str, bytes] | None, str]]:
    """Yield ``(k, key, files, error)`` for the ``k``-th sample of a tar shard, streaming.

    ``files`` maps extension -> bytes; for ``k < read_from`` the bytes are not kept (``files`` is
    ``None``) to make skipping cheap. A read error ends the shard with one final item whose ``files``
    is ``None`` and ``error`` describes the problem.
    """
    k = 0
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                parts = _split_name(member.name)
                if parts is None:
                    continue
                mkey, ext = parts
                if mkey != key:
                    if key is not None:
                        yield k, key, (files if k >= read_from else None), ""
                        k += 1
                    key, files = mkey, {}
                if k >= read_from:
                    f = tf.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} truncated ({len(data)} of {member.size} bytes)")
                    files[ext] = data
            # tarfile ends quietly at a missing or partial header; a complete uncompressed archive ends
            # with two zero blocks right after its last member, so check them (the last sample of a
            # truncated archive may be incomplete: it goes with the error)
            if getattr(tf.fileobj, "comptype", "tar") == "tar":
                fh.seek(tf.offset)
                tail = fh.read(2 * tarfile.BLOCKSIZE)
                if len(tail) < 2 * tarfile.BLOCKSIZE or any(tail):
                    raise tarfile.ReadError("archive truncated (no end-of-archive marker after the last member)")
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        # the sample being read when the error hit is incomplete: it goes with the rest of the shard
        yield k, key or "", None, f"{type(err).__name__}: {err}"
        return
    if key is not None:
        yield k, key, (files if k >= read_from else None), ""


class ShardStream(ResumableStream):
    """Infinite, exactly resumable stream of ``{"image", "caption", "key", "shard"}`` from tar shards.

    Order (all of it a function of ``seed``): each epoch the shard list is permuted
    (``shuffle_shards``) and dealt round-robin to the ``world_size * num_workers`` roles; with fewer
    shards than roles every role reads every shard and keeps every ``roles``-th sample. Within a shard
    the samples are shuffled in blocks of ``shuffle_block`` (0 or 1: file order). Each role moves to its
    next epoch when its shards are done (epochs are per role). A role's position is
    ``[epoch, shard slot, offset]``; resuming re-reads at most one shard's bytes, decoding nothing before
    the offset. Augmentation draws from a generator seeded by ``(seed, epoch, shard, offset)``.

    ``transform(pil_image, rng) -> tensor`` defaults to :func:`~mixreorg.data.transforms.train_transform`
    at ``image_size``.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        batch_size: int | None = None,
        *,
        transform: Callable[..., torch.Tensor] | None = None,
        image_size: int = 224,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_block: int = 1000,
        image_exts: Sequence[str] = IMAGE_EXTS,
        caption_exts: Sequence[str] = CAPTION_EXTS,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, rank=rank, world_size=world_size)
        self.shards = expand_shards(shards)
        if shuffle_block < 0:
            raise ValueError(f"shuffle_block must be >= 0, got {shuffle_block}")
        self.seed = int(seed)
        self.shuffle_shards = shuffle_shards
        self.shuffle_block = int(shuffle_block)
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.caption_exts = tuple(e.lower().lstrip(".") for e in caption_exts)
        self.transform = transform or train_transform(image_size)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "shards": [os.path.basename(s) for s in self.shards],
            "seed": self.seed,
            "shuffle_shards": self.shuffle_shards,
            "shuffle_block": self.shuffle_block,
        }

    def _assignment(self, epoch: int, g: int, total: int) -> tuple[list[int], bool]:
        n = len(self.shards)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle_shards else np.arange(n)
        ).tolist()
        if n >= total:
            return order[g::total], False
        return order, True

    def _decode(self, shard: int, key: str, files: dict[str, bytes], rng: np.random.Generator) -> tuple[Any, str]:
        where = f"{os.path.basename(self.shards[shard])}:{key}"
        img_bytes = next((files[e] for e in self.image_exts if e in files), None)
        if img_bytes is None:
            return None, f"missing_image: {where} (members: {', '.join(sorted(files)) or 'none'})"
        cap_bytes = next((files[e] for e in self.caption_exts if e in files), None)
        if cap_bytes is None:
            return None, f"missing_caption: {where} (members: {', '.join(sorted(files))})"
        caption = cap_bytes.decode("utf-8", errors="replace").strip()
        if not caption:
            return None, f"missing_caption: {where} (empty caption)"
        try:
            with Image.open(io.BytesIO(img_bytes)) as im:
                img = im.convert("RGB")
            image = self.transform(img, rng)
        except Exception as err:  # noqa: BLE001 - any decoding failure of untrusted bytes is a skip
            return None, f"corrupt_image: {where}: {type(err).__name__}: {err}"
        return {"image": image, "caption": caption, "key": key, "shard": os.path.basename(self.shards[shard])}, ""

    def _shard_items(
        self, shard: int, epoch: int, start: int, keep: tuple[int, int] | None
    ) -> Iterator[tuple[int, Any, str]]:
        """``(offset_after, sample | None, note)`` of one shard from kept-offset ``start``."""
        sb = max(1, self.shuffle_block)
        first_block = (start // sb) * sb
        # raw index below which nothing is needed (the bytes are then not even kept)
        read_from = first_block if keep is None else first_block * keep[1] + keep[0]
        block: list[tuple[str, dict[str, bytes]]] = []
        block_start = 0
        pos = 0  # offset among the samples this role keeps from the shard

        def emit(items: list[tuple[str, dict[str, bytes]]], b0: int) -> Iterator[tuple[int, Any, str]]:
            perm = (
                np.random.default_rng([self.seed, epoch, shard, b0]).permutation(len(items))
                if self.shuffle_block > 1
                else range(len(items))
            )
            for j, pi in enumerate(perm):
                off = b0 + j
                if off < start:
                    continue
                key, files = items[pi]
                sample, note = self._decode(shard, key, files, np.random.default_rng([self.seed, epoch, shard, off]))
                yield off + 1, sample, note

        for k, key, files, error in iter_tar_samples(self.shards[shard], read_from):
            if error:
                if block:
                    yield from emit(block, block_start)
                    block = []
                yield max(pos, start), None, f"corrupt_shard: {self.shards[shard]} after {k} samples: {error}"
                return
            if keep is not None and k % keep[1] != keep[0]:
                continue
            if pos < first_block:
                pos += 1
                continue
            if not block:
                block_start = pos
            block.append((key, files or {}))
            pos += 1
            if len(block) == sb:
                yield from emit(block, block_start)
                block = []
        if block:
            yield from emit(block, block_start)

    def _role_items(self, role: int, num_roles: int, pointer: Any) -> Iterator[tuple[Any, Any, str]]:
        total = self.world_size * num_roles
        g = self.rank * num_roles + role
        epoch, slot, offset = (0, 0, 0) if pointer is None else (int(v) for v in pointer)
        empty_epochs = 0
        while True:
            shards, split = self._assignment(epoch, g, total)
            from_start = slot == 0 and offset == 0
            delivered = 0
            while slot < len(shards):
                keep = (g, total) if split else None
                for off, sample, note in self._shard_items(shards[slot], epoch, offset, keep):
                    delivered += sample is not None
                    yield [epoch, slot, off], sample, note
                slot, offset = slot + 1, 0
            if from_start and delivered == 0:
                empty_epochs += 1
                if empty_epochs >= 2:
                    raise ValueError(
                        f"ShardStream: rank {self.rank} worker {role} found no usable sample in a whole pass over "
                        f"its shards ({len(shards)} of {len(self.shards)}); every sample was skipped or there "
                        f"are fewer samples than ranks x workers ({total})"
                    )
            else:
                empty_epochs = 0
            epoch, slot, offset = epoch + 1, 0, 0
