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
(``/data/cc12m/{00000..01242}.tar``, ``{a,b}``; the ``braceexpand`` package), or a list of those; a
local pattern that matches no file raises ``ValueError`` naming it. Remote shards, as webdataset
writes them: ``https://host/cc12m/{00000..01242}.tar``, ``s3://bucket/...``, ``gs://bucket/...``
(any fsspec URL; ``pip install mixreorg[remote]``, ``mixreorg[s3]``, ``mixreorg[gcs]``) and
``pipe:CMD`` (``pipe:aws s3 cp s3://bucket/{00000..01242}.tar -``: a shell runs CMD, its stdout is the
shard). Remote specs are brace-expanded only (no listing, no globs). Every shard -- local, remote or
piped -- is read front to back as one stream (one HTTP GET), never copied to disk; resuming mid-shard
re-reads that shard up to the saved offset.

Order and resume: see :class:`ShardStream`. Bad samples are skipped, counted (``stream.stats``) and
logged, never fatal: ``corrupt_image`` (undecodable bytes), ``missing_image``, ``missing_caption``
(absent or empty), ``corrupt_shard`` (unreadable/truncated tar, a connection dropped mid-shard, a
failed open (404, no access), a ``pipe:`` command's non-zero exit: the rest of that shard; the run
goes on with the next shard).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import posixpath
import re
import signal
import subprocess
import tarfile
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .stream import ResumableStream
from .transforms import train_transform

__all__ = ["expand_shards", "open_shard", "shard_name", "iter_tar_samples", "ShardStream", "IMAGE_EXTS", "CAPTION_EXTS"]

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
CAPTION_EXTS = ("txt", "text")


def _brace(pattern: str) -> list[str]:
    """``{a,b}`` alternatives (nestable) and ``{000..123..step}`` ranges, via the ``braceexpand`` package
    (backslashes are left alone: they belong to paths and shell commands); ``{x}`` stays literal."""
    if "{" not in pattern:
        return [pattern]
    try:
        from braceexpand import UnbalancedBracesError, braceexpand
    except ImportError as err:
        raise ImportError(
            f"shard pattern {pattern!r}: brace patterns need the braceexpand package (pip install mixreorg[data])"
        ) from err
    try:
        return list(braceexpand(pattern, escape=False))
    except UnbalancedBracesError as err:
        raise ValueError(f"unbalanced braces in shard pattern {pattern!r}") from err


def _scheme(url: str) -> str | None:
    """The URL scheme of a remote shard (``"https"``, ``"s3"`` ...), else ``None`` (local path, ``pipe:``)."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]+)://", url)
    return m.group(1).lower() if m else None


#: scheme -> the mixreorg extra that installs its fsspec back-end
_EXTRAS = {"http": "remote", "https": "remote", "s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def _check_backend(url: str, scheme: str) -> None:
    """Fail early (not once per shard read) when the fsspec back-end of ``scheme`` is missing."""
    extra = _EXTRAS.get(scheme, "remote")
    hint = f"pip install mixreorg[{extra}]" + ("" if scheme in _EXTRAS else f" and the fsspec back-end for {scheme}://")
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except ImportError as err:
        raise ImportError(f"shard {url!r}: reading {scheme}:// shards needs {hint} ({err})") from err
    except ValueError as err:
        raise ValueError(f"shard {url!r}: fsspec knows no protocol {scheme!r} ({err})") from err


def _expand_local(path: str, spec: str) -> list[str]:
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not found:
            raise ValueError(f"shard folder {path} contains no *.tar files")
        return found
    if any(c in path for c in "*?["):
        found = sorted(glob.glob(path))
        if not found:
            raise ValueError(f"shard pattern {path} matches no file")
        return found
    if os.path.isfile(path):
        return [path]
    raise ValueError(f"shard {path} does not exist" + (f" (from pattern {spec!r})" if path != spec else ""))


def expand_shards(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Resolve a shard spec (see module docstring) to a list of shards, in order.

    Local shards must exist (folders and globs are listed); remote URLs and ``pipe:`` commands are only
    brace-expanded (nothing is listed or opened; a missing fsspec back-end raises ``ImportError`` naming
    the ``pip install mixreorg[...]`` extra).
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("no shards given")
    out: list[str] = []
    for s in specs:
        s = os.fspath(s)
        for url in _brace(s):
            if url.startswith("pipe:"):
                if not url[5:].strip():
                    raise ValueError(f"shard {url!r}: empty pipe command")
                out.append(url)
                continue
            if url.startswith("file://"):
                url = url[len("file://") :]
            scheme = _scheme(url)
            if scheme is None:
                out.extend(_expand_local(url, s))
                continue
            if "*" in url:
                raise ValueError(
                    f"shard {url!r}: remote shards are not listed; write a brace pattern ({{00000..01242}}) instead"
                )
            _check_backend(url, scheme)
            out.append(url)
    return out


def shard_name(url: str) -> str:
    """A shard's short name (in samples, messages and the resume fingerprint): the file name, without
    the query string of a URL (signed URLs change, the shard does not)."""
    if _scheme(url) is not None:
        return posixpath.basename(urllib.parse.urlsplit(url).path)
    return os.path.basename(url)


class _Tail:
    """Forward-only reader over a stream that remembers its last ``keep`` bytes, so that the end of a tar
    archive can be checked after ``tarfile`` (stream mode) has read past it."""

    def __init__(self, raw: Any, keep: int = 1 << 16) -> None:
        self.raw, self.keep, self.pos, self.tail = raw, keep, 0, bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > self.keep:
            del self.tail[: len(self.tail) - self.keep]
        return data

    def bytes_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from absolute ``offset`` (read ahead as needed; fewer at the end of data)."""
        while self.pos < offset + n and self.read(offset + n - self.pos):
            pass
        start = self.pos - len(self.tail)
        if offset < start:
            raise ValueError(f"offset {offset} is no longer buffered")
        return bytes(self.tail[offset - start : offset - start + n])


@contextlib.contextmanager
def _open_pipe(cmd: str) -> Iterator[Any]:
    """stdout of ``cmd`` run by a shell. A non-zero exit status raises ``OSError`` (with the end of the
    command's stderr); a reader that stops early (the stream moved on) kills the command."""
    with tempfile.TemporaryFile() as err:
        # its own process group, so that stopping early kills the whole pipeline, not only the shell
        proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=err, start_new_session=True)

        def failure(rc: int | None) -> OSError | None:
            if not rc:
                return None
            err.seek(0)
            text = err.read()[-2000:].decode("utf-8", errors="replace").strip()
            return OSError(f"pipe command {cmd!r} exited with status {rc}" + (f": {text}" if text else ""))

        try:
            try:
                yield proc.stdout
            except Exception as exc:  # noqa: BLE001 - report the command's own failure if it had one
                try:
                    rc = proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    rc = None
                bad = failure(rc)
                if bad is not None:
                    raise bad from exc
                raise
            left = 1 << 20  # read the archive's end padding and let the command finish ...
            while left > 0 and (chunk := proc.stdout.read(min(left, 1 << 16))):
                left -= len(chunk)
            if left > 0:  # ... unless it writes on past the archive: then the finally stops it
                bad = failure(proc.wait())
                if bad is not None:
                    raise bad
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[Any]:
    """A forward-only binary stream of a shard: a local file, the stdout of ``pipe:CMD``, or an fsspec URL
    (``http(s)://`` streamed by one GET, ``s3://``, ``gs://`` ...). Nothing is written to disk."""
    if url.startswith("pipe:"):
        with _open_pipe(url[5:]) as fh:
            yield fh
        return
    scheme = _scheme(url)
    if scheme is None:
        with open(url, "rb") as fh:
            yield fh
        return
    import fsspec

    kwargs = {"block_size": 0} if scheme in ("http", "https") else {}  # 0: a streaming response
    with fsspec.open(url, "rb", **kwargs) as fh:
        yield fh


def _split_name(name: str) -> tuple[str, str] | None:
    base = posixpath.basename(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    folder = posixpath.dirname(name)
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def iter_tar_samples(path: str, read_from: int = 0) -> Iterator[tuple[int, str, dict[str, bytes] | None, str]]:
    """Yield ``(k, key, files, error)`` for the ``k``-th sample of a tar shard, streaming.

    ``path`` is anything :func:`open_shard` opens (local file, ``pipe:CMD``, remote URL); the archive is
    read front to back once (``tarfile`` stream mode), never seeked. ``files`` maps extension -> bytes;
    for ``k < read_from`` the bytes are not kept (``files`` is ``None``) to make skipping cheap. A read
    error (truncated or corrupt archive, a dropped connection, a pipe command's non-zero exit) ends the
    shard with one final item whose ``files`` is ``None`` and ``error`` describes the problem; the
    sample being read when it hit goes with it (even when complete: its end was not seen).
    """
    k = 0
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with open_shard(path) as raw:
            fh = _Tail(raw)
            with tarfile.open(fileobj=fh, mode="r|*") as tf:
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
                            raise tarfile.ReadError(
                                f"member {member.name} truncated ({len(data)} of {member.size} bytes)"
                            )
                        files[ext] = data
                # tarfile ends quietly at a missing or partial header; a complete uncompressed archive
                # ends with two zero blocks right after its last member, so check them (the last sample
                # of a truncated archive may be incomplete: it goes with the error)
                if getattr(tf.fileobj, "comptype", "tar") == "tar":
                    tail = fh.bytes_at(tf.offset, 2 * tarfile.BLOCKSIZE)
                    if len(tail) < 2 * tarfile.BLOCKSIZE or any(tail):
                        raise tarfile.ReadError("archive truncated (no end-of-archive marker after the last member)")
    except Exception as err:  # noqa: BLE001 - tarfile, OS, HTTP (aiohttp), cloud errors: all end the shard
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

    ``shards``: local files, remote URLs or ``pipe:`` commands (module docstring); all are read as
    streams, a remote one exactly like a local one (same samples, skips and resume).

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
            "shards": [shard_name(s) for s in self.shards],
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
        where = f"{shard_name(self.shards[shard])}:{key}"
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
        return {"image": image, "caption": caption, "key": key, "shard": shard_name(self.shards[shard])}, ""

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
                where = self.shards[shard].split("?", 1)[0] if _scheme(self.shards[shard]) else self.shards[shard]
                yield max(pos, start), None, f"corrupt_shard: {where} after {k} samples: {error}"
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
