"""The CLIP BPE tokenizer, offline.

Two backends give the same ids (the OpenAI / open_clip CLIP vocabulary, 49408 tokens):

* ``"instant"`` (primary): the ``instant-clip-tokenizer`` package, which carries the vocabulary inside
  its wheel (Rust, fast).
* ``"bpe"`` (fallback): a BPE model of the ``tokenizers`` library built from a CLIP merges file
  (``bpe_simple_vocab_16e6.txt.gz``): the one given as ``bpe_path``, or the one shipped inside the
  ``open_clip_torch`` wheel, found with ``importlib.util.find_spec`` without importing open_clip.

Both backends see the same cleaned text (:func:`clean_text`: ``ftfy`` when installed, HTML unescape,
NFC, whitespace collapsed, lower case), as open_clip's tokenizer does.

Sequences are ``[SOT] + ids + [EOT]`` padded with 0 to ``context_length`` (77). A longer sequence is
truncated to ``context_length`` with EOT kept as its last token (open_clip / GroupViT behaviour), or
refused with ``ValueError`` when ``truncate=False``.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "SOT_TOKEN_ID",
    "EOT_TOKEN_ID",
    "VOCAB_SIZE",
    "CONTEXT_LENGTH",
    "ClipTokenizer",
    "clean_text",
    "find_open_clip_bpe",
    "get_tokenizer",
    "tokenize",
]

SOT_TOKEN_ID = 49406  # <start_of_text>
EOT_TOKEN_ID = 49407  # <end_of_text>
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

# open_clip keeps merges[1 : 49152 - 256 - 2 + 1] of the file: 48894 merges -> 49408 ids in all.
_NUM_MERGES = 49152 - 256 - 2
# CLIP's pre-tokenisation pattern (contractions, letter runs, single digits, other non-space runs).
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_WHITESPACE = re.compile(r"\s+")


@functools.cache
def _ftfy_fix_text():
    """``ftfy.fix_text`` if ftfy is installed (optional, as in open_clip), else None. Looked up once: a
    failed import is not cached by Python, and searching ``sys.path`` for it on every text made the
    recipes' batch builder 2.4x slower (``benchmarks/bench_batch_builder.py``)."""
    try:
        import ftfy  # type: ignore[import-not-found]
    except ImportError:
        return None
    return ftfy.fix_text


def clean_text(text: str) -> str:
    """Normalise a text the way open_clip's tokenizer does before BPE.

    ``ftfy.fix_text`` when ftfy is installed, HTML entities unescaped (twice), Unicode NFC,
    whitespace runs collapsed to one space, stripped, lower-cased.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a str, got {type(text).__name__}")
    fix_text = _ftfy_fix_text()
    if fix_text is not None:
        text = fix_text(text)
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip().lower()


def find_open_clip_bpe() -> Path | None:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside an installed ``open_clip_torch``, or None.

    Uses ``importlib.util.find_spec`` only: open_clip is not imported (its import needs torchvision).
    """
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2 reversible byte -> printable unicode character table (256 entries, CLIP order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _read_merges(bpe_path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    path = Path(bpe_path)
    if not path.is_file():
        raise ValueError(f"CLIP BPE merges file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    # Line 0 is the "#version" header; open_clip keeps the next 48894 merges.
    merges = []
    for line in lines[1 : _NUM_MERGES + 1]:
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"malformed merge line {line!r} in {path}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"no merges in {path}")
    return merges


class _InstantBackend:
    name = "instant"

    def __init__(self) -> None:
        from instant_clip_tokenizer import Tokenizer

        self._tok = Tokenizer()
        self.sot_id = int(self._tok.start_of_text())
        self.eot_id = int(self._tok.end_of_text())
        self.vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


class _BPEBackend:
    name = "bpe"

    def __init__(self, bpe_path: str | os.PathLike[str]) -> None:
        from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        merges = _read_merges(bpe_path)
        byte_chars = list(_bytes_to_unicode().values())
        vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab_list += ["<start_of_text>", "<end_of_text>"]
        vocab = {tok: i for i, tok in enumerate(vocab_list)}
        if len(vocab) != len(vocab_list):
            raise ValueError(f"duplicate tokens in the vocabulary built from {bpe_path}")
        self.sot_id = vocab["<start_of_text>"]
        self.eot_id = vocab["<end_of_text>"]
        self.vocab_size = len(vocab)
        model = BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
        )
        tok = Tokenizer(model)
        # Text arrives cleaned (clean_text): split with CLIP's pattern, then map bytes to characters.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self._id_to_token = vocab_list

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        text = "".join(self._id_to_token[i] for i in ids if i not in (self.sot_id, self.eot_id))
        words = [
            bytearray(byte_decoder[c] for c in piece).decode("utf-8", errors="replace") for piece in text.split("</w>")
        ]
        return " ".join(w for w in words if w)


class ClipTokenizer:
    """CLIP BPE tokenizer returning ``LongTensor [N, context_length]`` (SOT, ids, EOT, 0-padding).

    Args:
        backend: ``"auto"`` (instant-clip-tokenizer if installed, else the ``"bpe"`` backend),
            ``"instant"`` or ``"bpe"``.
        bpe_path: a CLIP merges file (``.txt`` or ``.txt.gz``) for the ``"bpe"`` backend; default:
            the one inside an installed ``open_clip_torch`` wheel.
    """

    def __init__(self, backend: str = "auto", bpe_path: str | os.PathLike[str] | None = None) -> None:
        if backend not in ("auto", "instant", "bpe"):
            raise ValueError(f"backend must be 'auto', 'instant' or 'bpe', got {backend!r}")
        if backend == "auto":
            if bpe_path is None and importlib.util.find_spec("instant_clip_tokenizer") is not None:
                backend = "instant"
            else:
                backend = "bpe"
        if backend == "instant":
            try:
                self._backend: _InstantBackend | _BPEBackend = _InstantBackend()
            except ImportError as err:
                raise ImportError(
                    "backend 'instant' needs the instant-clip-tokenizer package (pip install 'mixreorg[data]')"
                ) from err
        else:
            path = bpe_path if bpe_path is not None else find_open_clip_bpe()
            if path is None:
                raise ImportError(
                    "no CLIP vocabulary found: install instant-clip-tokenizer (pip install "
                    "'mixreorg[data]'), or open_clip_torch, or pass bpe_path= a bpe_simple_vocab_16e6.txt.gz"
                )
            self._backend = _BPEBackend(path)

    @property
    def backend(self) -> str:
        """Name of the backend in use: ``"instant"`` or ``"bpe"``."""
        return self._backend.name

    @property
    def sot_id(self) -> int:
        return self._backend.sot_id

    @property
    def eot_id(self) -> int:
        return self._backend.eot_id

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``clean_text(text)``, without SOT/EOT."""
        return self._backend.encode(clean_text(text))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Approximate inverse of :meth:`encode` (for debugging); SOT, EOT and padding are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids if int(i) not in (0, self.sot_id, self.eot_id)]
        return self._backend.decode(ids).strip()

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int = CONTEXT_LENGTH,
        *,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Tokenize one text or a list of texts -> ``LongTensor [N, context_length]``.

        A text whose ``SOT + ids + EOT`` exceeds ``context_length`` is cut to ``context_length``
        tokens with EOT as the last one (``truncate=True``), or raises ``ValueError``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence):
            raise ValueError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
        out = torch.zeros(len(texts), context_length, dtype=torch.long)  # [N, L]
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{row}] is a {type(text).__name__}, expected str")
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"text {row} has {len(ids)} tokens with SOT/EOT, more than context_length="
                        f"{context_length}: {text[:60]!r}... (pass truncate=True to cut it)"
                    )
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.lru_cache(maxsize=4)
def get_tokenizer(backend: str = "auto", bpe_path: str | None = None) -> ClipTokenizer:
    """A cached :class:`ClipTokenizer` (building one reads the vocabulary)."""
    return ClipTokenizer(backend=backend, bpe_path=bpe_path)


def tokenize(
    texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, *, truncate: bool = True
) -> torch.Tensor:
    """Tokenize with the default CLIP tokenizer -> ``LongTensor [N, context_length]``.

    ``tokenize("a photo of a cat.")[0, :8]`` is ``[49406, 320, 1125, 539, 320, 2368, 269, 49407]``.
    Too-long texts are truncated with EOT kept last (``truncate=False``: ``ValueError``).
    """
    return get_tokenizer()(texts, context_length, truncate=truncate)
