"""SynthShapes: the embedded, procedural image-caption benchmark with ground-truth masks.

Every image is a function of ``(seed, split, index)`` only, so the training stream is infinite and
exactly resumable, and the evaluation split is fixed by its seed. Rendering is vectorised numpy over
a whole batch, each object evaluated on a window around it (``python -m mixreorg.data --bench``
measures it: 2,100-2,500 images per CPU-second at 64x64, batch 64, on the 2-core dev machine).

Classes (``SynthShapes.CLASS_NAMES``, the index used in masks)::

    0 grass   1 water   2 sand   3 sky          <- "stuff": the background, one per image
    4 circle  5 square  6 triangle  7 star  8 cross  9 ring   <- "things": 1-4 objects per image

* A thing's class is its *shape* only. Colour (9 named colours, jittered) and texture (solid,
  striped, dotted) are drawn independently of the class, so colour alone never tells the class.
* Backgrounds differ by texture, not only by colour: grass = vertical blade streaks + grain,
  water = wavy horizontal ripples with highlights, sand = fine grain + diagonal ripples,
  sky = smooth vertical gradient + soft clouds (water and sky are both blue).
* Objects: size, position, rotation vary; later objects occlude earlier ones (rings show the
  background through their hole). The mask has no ignore pixels.
* Captions come in varied sentence forms ("a red circle and a blue star on grass.",
  "there is a square.", "two shapes over water: a green triangle and a yellow ring."); each object
  is left out with probability ``omit_prob`` (objects less than ``min_visible`` visible are never
  named, at least one object is always named); the background is named with probability
  ``name_background_prob``; colour words are included when ``caption_colours``.
* ``nouns``: the class names the caption mentions (things, then the background if named), for the
  multi-label prompt loss. ``labels``: multi-hot ``[10]`` of the classes visible in the mask.

Chance level on the default eval split (512 images, 64x64, default config; computed by
:func:`chance_miou`, reproduce with ``python -m mixreorg.data --chance``): see
:data:`CHANCE_NOTE`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .stream import ResumableStream, chunked_index, role_share
from .transforms import CLIP_MEAN, CLIP_STD

__all__ = [
    "SynthShapesConfig",
    "SynthShapes",
    "SynthShapesEval",
    "SynthShapesStream",
    "chance_miou",
    "CHANCE_NOTE",
]

#: Measured with ``python -m mixreorg.data --chance`` (default config, eval split of 512).
CHANCE_NOTE = "most-frequent-class mIoU 0.022, prior-random mIoU 0.054 (10 classes)"

_TWO_PI = 2.0 * math.pi

# name, RGB, second tone for textures (darker for bright colours, lighter for dark ones)
_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (215, 40, 40)),
    ("orange", (245, 140, 30)),
    ("yellow", (240, 220, 45)),
    ("green", (45, 175, 60)),
    ("blue", (40, 80, 220)),
    ("purple", (140, 60, 190)),
    ("pink", (245, 125, 185)),
    ("white", (240, 240, 240)),
    ("black", (25, 25, 25)),
)
_TEXTURES = ("solid", "striped", "dotted")
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

_BG_PREPS = {
    "grass": ("on grass", "on the grass", "lying on grass"),
    "water": ("on water", "on the water", "over water", "floating on water"),
    "sand": ("on sand", "on the sand", "lying on sand"),
    "sky": ("in the sky", "against the sky", "up in the sky"),
}


@dataclass(frozen=True)
class SynthShapesConfig:
    """What SynthShapes draws and how it captions it (all fields plain values)."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.12  # object radius as a fraction of the image side
    max_size: float = 0.28
    omit_prob: float = 0.1  # each object is left out of the caption with this probability
    name_background_prob: float = 0.8
    caption_colours: bool = True
    caption_textures: bool = False
    min_visible: float = 0.3  # objects less visible than this (occlusion) are never named

    def __post_init__(self) -> None:
        problems = []
        if self.image_size < 16:
            problems.append(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 6:
            problems.append(f"need 1 <= min_objects <= max_objects <= 6, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_size <= self.max_size <= 0.5:
            problems.append(f"need 0 < min_size <= max_size <= 0.5, got {self.min_size}, {self.max_size}")
        for name in ("omit_prob", "name_background_prob", "min_visible"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if problems:
            raise ValueError("SynthShapesConfig: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- shapes
# Each takes object-frame coordinates (u, v) (the object's radius is 1) and returns a bool mask.


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.82


_TRI_N = [(math.cos(a), math.sin(a)) for a in (math.pi / 2 + k * _TWO_PI / 3 for k in range(3))]


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # regular triangle, circumradius 1.2 (inradius 0.6)
    out = u * _TRI_N[0][0] + v * _TRI_N[0][1] <= 0.6
    for nx, ny in _TRI_N[1:]:
        out &= u * nx + v * ny <= 0.6
    return out


_STAR_R_OUT, _STAR_R_IN = 1.2, 0.5
_STAR_SECTOR = _TWO_PI / 5
# folded-sector frame: valley V at angle 0 radius r_in, tip T at angle pi/5 radius r_out
_STAR_V = (_STAR_R_IN, 0.0)
_STAR_T = (_STAR_R_OUT * math.cos(_STAR_SECTOR / 2), _STAR_R_OUT * math.sin(_STAR_SECTOR / 2))


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho = np.sqrt(u * u + v * v)
    ang = np.mod(np.arctan2(v, u), _STAR_SECTOR)
    ang = np.abs(ang - _STAR_SECTOR / 2)  # 0 at a valley, pi/5 at a tip
    px, py = rho * np.cos(ang), rho * np.sin(ang)
    # inside iff on the origin's side of the edge V -> T
    ex, ey = _STAR_T[0] - _STAR_V[0], _STAR_T[1] - _STAR_V[1]
    cross = ex * (py - _STAR_V[1]) - ey * (px - _STAR_V[0])
    origin_side = ex * (0.0 - _STAR_V[1]) - ey * (0.0 - _STAR_V[0])
    return (cross * origin_side >= 0) & (rho <= _STAR_R_OUT)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55 * 0.55)


_SHAPES = (_circle, _square, _triangle, _star, _cross, _ring)
_EXTENT = 1.25  # every shape lies within this radius (in object units)


def _radius_table(n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared outer radius of every shape per angle bin ``[6, n_bins]`` and squared hole radius ``[6]``.

    Every shape is star-shaped about its centre (the ring up to its hole), so ``hole <= rho <=
    R(angle)`` describes it exactly; the table is measured from the implicit shape functions.
    """
    ang = (np.arange(n_bins) + 0.5) * (_TWO_PI / n_bins)
    rho = np.linspace(0.0, _EXTENT, 1001)
    u = rho[None, :] * np.cos(ang)[:, None]  # [n_bins, n_rho]
    v = rho[None, :] * np.sin(ang)[:, None]
    table = np.zeros((len(_SHAPES), n_bins), dtype=np.float32)
    for c, fn in enumerate(_SHAPES):
        inside = fn(u, v)
        if fn is _ring:  # the ring's hole is handled separately
            inside |= rho[None, :] < 0.6
        first_out = np.argmin(inside, axis=1)  # first radius outside (inside is a prefix)
        first_out[inside.all(axis=1)] = len(rho) - 1
        table[c] = rho[np.maximum(first_out - 1, 0)] ** 2
    hole = np.zeros(len(_SHAPES), dtype=np.float32)
    hole[_SHAPES.index(_ring)] = 0.55**2
    return table, hole


_N_BINS = 2048
_RADIUS_TABLE2, _HOLE2 = _radius_table(_N_BINS)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------- hashing
# Counter-based randomness: every random number of a sample is splitmix64(key(seed, split, index), slot).
# This makes a sample a pure function of its identity and lets a whole batch be drawn with array ops.
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _to_unit(z: np.ndarray) -> np.ndarray:
    """uint64 -> float64 uniform in [0, 1)."""
    return (z >> _U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _to_unit32(z: np.ndarray) -> np.ndarray:
    """uint64 -> float32 uniform in [0, 1) (24 bits)."""
    return (z >> _U64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)


# layout of the per-sample parameter vector U[:, j] (uniforms in [0, 1))
_P_BG, _P_BG_JIT, _P_BG_TEX, _P_NOBJ, _P_NAME_BG, _P_FORM, _P_PREP, _P_NOISE = 0, 1, 4, 10, 11, 12, 13, 14
_P_SLOT0, _P_SLOT = 20, 20  # slot k uses U[:, 20 + 20k : 40 + 20k]
(_S_CLS, _S_COLOUR, _S_TEX, _S_RADIUS, _S_THETA, _S_TEXANG, _S_TONE, _S_OMIT, _S_CAND) = (0, 1, 2, 3, 4, 5, 6, 9, 10)
_N_CAND = 4  # candidate positions per object (the least crowded one is kept)
_MAX_OBJECTS = 6
_N_PARAMS = _P_SLOT0 + _P_SLOT * _MAX_OBJECTS
_SPLIT_ID = {"train": 0, "eval": 1}


class _Scene(NamedTuple):
    """The drawn content of a batch of ``B`` samples with ``K = max_objects`` object slots (slots at
    or past a sample's ``n_obj`` are drawn too but never rendered)."""

    U: np.ndarray  # [B, P] float64 uniforms, layout _P_*
    P: np.ndarray  # [B, K, 20] the object slots' uniforms, layout _S_*
    bg: np.ndarray  # [B] background (stuff) class
    n_obj: np.ndarray  # [B]
    active: np.ndarray  # [B, K] bool
    cls: np.ndarray  # [B, K] thing index (class - 4)
    colour: np.ndarray  # [B, K]
    texture: np.ndarray  # [B, K]
    radius: np.ndarray  # [B, K] float64, pixels
    theta: np.ndarray  # [B, K] rotation
    cx: np.ndarray  # [B, K] float64 centre, pixels
    cy: np.ndarray  # [B, K]


class SynthShapes:
    """The SynthShapes generator: ``generate(index, split, seed)`` / ``generate_batch(indices, ...)``.

    ``seed`` selects the training stream; the eval split uses its own seed (see
    :class:`SynthShapesEval`) so that every run is scored on the same images.
    """

    STUFF: tuple[str, ...] = ("grass", "water", "sand", "sky")
    THINGS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
    CLASS_NAMES: tuple[str, ...] = STUFF + THINGS
    NUM_CLASSES: int = len(CLASS_NAMES)
    COLOURS: tuple[str, ...] = tuple(name for name, _ in _COLOURS)
    TEXTURES: tuple[str, ...] = _TEXTURES
    IGNORE_INDEX: int = 255  # never present in SynthShapes masks; listed for evaluators
    BACKGROUND_INDEX: int | None = None  # every class is named by a prompt (no "background" class)

    def __init__(self, config: SynthShapesConfig | None = None, **overrides: Any) -> None:
        base = config or SynthShapesConfig()
        self.config = dataclasses.replace(base, **overrides) if overrides else base
        s = self.config.image_size
        coords = np.arange(s, dtype=np.float32) + 0.5  # pixel centres
        self._x = coords[None, None, :]  # [1, 1, S]
        self._y = coords[None, :, None]  # [1, S, 1]
        self._rgb = np.array([c for _, c in _COLOURS], dtype=np.float32)  # [K, 3]
        bright = self._rgb.mean(axis=1, keepdims=True) > 90
        self._rgb2 = np.where(bright, self._rgb * 0.55, np.minimum(self._rgb + 100.0, 255.0))
        # noise textures: fixed random tiles; every image reads a crop at its own random offset
        tile = max(256, 2 * s)
        noise_rng = np.random.default_rng(0x5EED5)
        self._tile = tile
        self._grain = noise_rng.random((tile, tile), dtype=np.float32).ravel()
        self._streaks = np.repeat(noise_rng.random((tile // 4, tile), dtype=np.float32), 4, axis=0).ravel()
        self._crop = (np.arange(s)[:, None] * tile + np.arange(s)[None, :]).astype(np.intp)  # [S, S]

    # ------------------------------------------------------------------ randomness
    @staticmethod
    def keys(indices: np.ndarray | Sequence[int], split: str, seed: int) -> np.ndarray:
        """uint64 key of each sample: a pure function of ``(seed, split, index)``."""
        if split not in _SPLIT_ID:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if seed < 0 or (idx.size and idx.min() < 0):
            raise ValueError(f"seed and indices must be >= 0, got seed={seed}, min index={idx.min()}")
        base = _splitmix(np.array([int(seed) * 2 + _SPLIT_ID[split]], dtype=np.uint64))
        return _splitmix(base ^ _splitmix(idx.astype(np.uint64)))

    @staticmethod
    def _params(keys: np.ndarray) -> np.ndarray:
        slots = np.arange(_N_PARAMS, dtype=np.uint64) * _U64(0xD1B54A32D192ED03)
        return _to_unit(_splitmix(keys[:, None] ^ slots[None, :]))  # [B, P] float64

    def _noise(self, tile: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Crops ``[b, S, S]`` of a noise tile at offsets given by uniforms ``u: [b, 2]``."""
        room = self._tile - self.config.image_size
        off = (u * room).astype(np.intp)  # [b, 2]
        return tile[(off[:, 0] * self._tile + off[:, 1])[:, None, None] + self._crop]

    # ------------------------------------------------------------------ backgrounds
    def _backgrounds(self, bg: np.ndarray, U: np.ndarray) -> np.ndarray:
        s = self.config.image_size
        x, y = self._x, self._y
        img = np.empty((len(bg), s, s, 3), dtype=np.float32)
        jitter = (0.88 + 0.24 * U[:, _P_BG_JIT : _P_BG_JIT + 3]).astype(np.float32)  # [B, 3]
        tex = U[:, _P_BG_TEX : _P_BG_TEX + 6].astype(np.float32)  # [B, 6]
        for kind in range(4):
            sel = np.flatnonzero(bg == kind)
            if sel.size == 0:
                continue
            j, t = jitter[sel][:, None, None, :], tex[sel][:, :, None, None]  # t: [b, 6, 1, 1]
            grain = self._noise(self._grain, U[sel, _P_NOISE : _P_NOISE + 2]) if kind < 3 else None  # [b, S, S]
            if kind == 0:  # grass: vertical blade streaks + grain
                streak = self._noise(self._streaks, U[sel, _P_NOISE + 2 : _P_NOISE + 4])
                lum = 0.72 + 0.4 * streak + 0.18 * grain
                img[sel] = lum[..., None] * (np.array([70.0, 150.0, 55.0], np.float32) * j)
            elif kind == 1:  # water: wavy horizontal ripples with bright crests
                period = 5.0 + 4.0 * t[:, 0]
                wobble = 0.45 * np.sin(_TWO_PI * x / (16.0 + 16.0 * t[:, 1]) + _TWO_PI * t[:, 2])
                waves = np.sin(_TWO_PI * (y / period + wobble) + _TWO_PI * t[:, 3])  # [b, S, S]
                lum = 0.85 + 0.2 * waves + 0.06 * grain
                crest = np.clip((waves - 0.8) * 5.0, 0.0, 1.0)
                img[sel] = lum[..., None] * (np.array([40.0, 95.0, 175.0], np.float32) * j) + 70.0 * crest[..., None]
            elif kind == 2:  # sand: fine grain + gentle diagonal ripples
                a = np.float32(math.pi) * t[:, 0]
                ripple = np.sin(_TWO_PI * (x * np.cos(a) + y * np.sin(a)) / (6.0 + 6.0 * t[:, 1]))
                lum = 0.9 + 0.2 * grain + 0.06 * ripple
                img[sel] = lum[..., None] * (np.array([214.0, 188.0, 140.0], np.float32) * j)
            else:  # sky: smooth vertical gradient + soft clouds
                top = np.array([100.0, 160.0, 230.0], np.float32) * j  # [b, 1, 1, 3]
                bottom = np.array([185.0, 215.0, 245.0], np.float32) * j
                g = (y / s)[..., None]  # [1, S, 1, 1]
                grad = top * (1.0 - g) + bottom * g  # [b, S, 1, 3]
                f = (0.06 + 0.10 * t[:, :3]) * (64.0 / s)  # [b, 3, 1, 1]
                p = _TWO_PI * t[:, 3:6]
                c = np.sin(x * f[:, 0] + p[:, 0]) * np.sin(y * f[:, 1] + p[:, 1]) + 0.5 * np.sin(
                    x * f[:, 2] + y * f[:, 0] + p[:, 2]
                )
                cloud = np.clip((c - 0.55) * 1.6, 0.0, 0.85)[..., None]  # [b, S, S, 1]
                img[sel] = grad * (1.0 - cloud) + 245.0 * cloud
        return img

    # ------------------------------------------------------------------ batches
    def generate_batch(
        self, indices: np.ndarray | Sequence[int], split: str = "train", seed: int = 0
    ) -> dict[str, Any]:
        """Render samples ``indices`` of ``split`` at once (identical to :meth:`generate` one by one).

        Returns ``image`` uint8 ``[B, S, S, 3]``, ``mask`` uint8 ``[B, S, S]`` (class indices),
        ``labels`` bool ``[B, 10]`` (classes visible in the mask), and per sample lists ``caption``,
        ``nouns`` (class names the caption mentions), ``background`` and ``objects`` (class, colour,
        texture, visible fraction, named).
        """
        scene = self._scene(self._params(self.keys(indices, split, seed)))
        owner, area = self._rasterise(scene)  # [B, S, S] int8, [B, K]
        img = self._backgrounds(scene.bg, scene.U)  # [B, S, S, 3] float32
        owned, own = self._owned_pixels(owner)
        self._paint_objects(img, scene, owned, own)
        mask, labels, counts = self._ground_truth(scene, owned, own)
        captions, nouns, objects = self._describe(scene, counts, area)
        return {
            "image": np.clip(img, 0.0, 255.0).astype(np.uint8),
            "mask": mask,
            "labels": labels,
            "caption": captions,
            "nouns": nouns,
            "background": [self.STUFF[int(b)] for b in scene.bg],
            "objects": objects,
        }

    def _scene(self, U: np.ndarray) -> _Scene:
        """Background, objects and their placement of every sample, from its uniforms ``U [B, P]``."""
        cfg = self.config
        s, K, B = cfg.image_size, cfg.max_objects, len(U)
        span = cfg.max_objects - cfg.min_objects + 1
        n_obj = cfg.min_objects + (U[:, _P_NOBJ] * span).astype(np.int64)  # [B]
        P = U[:, _P_SLOT0 : _P_SLOT0 + _P_SLOT * K].reshape(B, K, _P_SLOT)  # [B, K, 20]
        active = np.arange(K)[None, :] < n_obj[:, None]  # [B, K]
        radius = (cfg.min_size + (cfg.max_size - cfg.min_size) * P[:, :, _S_RADIUS]) * s  # [B, K]
        cx, cy = self._place(P, active, radius)
        return _Scene(
            U=U,
            P=P,
            bg=(U[:, _P_BG] * len(self.STUFF)).astype(np.int64),
            n_obj=n_obj,
            active=active,
            cls=(P[:, :, _S_CLS] * len(self.THINGS)).astype(np.int64),
            colour=(P[:, :, _S_COLOUR] * len(_COLOURS)).astype(np.int64),
            texture=(P[:, :, _S_TEX] * len(_TEXTURES)).astype(np.int64),
            radius=radius,
            theta=_TWO_PI * P[:, :, _S_THETA],
            cx=cx,
            cy=cy,
        )

    def _place(self, P: np.ndarray, active: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Object centres ``cx, cy [B, K]`` (float64 pixels) from the slots' candidate positions.

        Per object the first of 4 candidates far enough from the earlier objects, else the least
        crowded candidate: keeps occlusion moderate (objects still overlap at times).
        """
        s = self.config.image_size
        B, K = active.shape
        lo, hi = 0.12 * s, 0.88 * s
        cand = lo + (hi - lo) * P[:, :, _S_CAND : _S_CAND + 2 * _N_CAND].reshape(B, K, _N_CAND, 2)  # [B, K, 4, 2]
        cx = np.zeros((B, K))
        cy = np.zeros((B, K))
        rows = np.arange(B)
        for k in range(K):
            margin = np.full((B, _N_CAND), np.inf)  # [B, 4] distance to the nearest earlier object / radii
            for j in range(k):
                d = np.hypot(cand[:, k, :, 0] - cx[:, j, None], cand[:, k, :, 1] - cy[:, j, None])
                margin = np.minimum(
                    margin, np.where(active[:, j, None], d / (radius[:, k] + radius[:, j])[:, None], np.inf)
                )
            score = np.where(margin >= 0.75, 10.0 - np.arange(_N_CAND), np.minimum(margin, 5.0))
            pick = np.argmax(score, axis=1)
            cx[:, k], cy[:, k] = cand[rows, k, pick, 0], cand[rows, k, pick, 1]
        return cx, cy

    def _rasterise(self, sc: _Scene) -> tuple[np.ndarray, np.ndarray]:
        """``owner [B, S, S]`` int8 (the object painted last on a pixel, -1 for the background) and
        ``area [B, K]`` (each object's pixels before occlusion, for its visible fraction).

        Each shape is evaluated on a window around its object rather than the whole image: every
        shape fits in it, and the window is what makes batch rendering fast.
        """
        cfg = self.config
        s = cfg.image_size
        B, K = sc.active.shape
        owner = np.full(B * s * s, -1, dtype=np.int8)  # flat [B, S, S]
        area = np.zeros((B, K), dtype=np.int64)
        win = min(s, int(math.ceil(2 * _EXTENT * cfg.max_size * s)) + 2)
        ar = np.arange(win)
        for k in range(K):
            act = np.flatnonzero(sc.active[:, k])
            if act.size == 0:
                break
            x0 = np.clip(np.round(sc.cx[act, k] - win / 2), 0, s - win).astype(np.intp)  # [b]
            y0 = np.clip(np.round(sc.cy[act, k] - win / 2), 0, s - win).astype(np.intp)
            inside = self._window_inside(sc, act, k, x0, y0, ar)  # [b, win, win]
            area[act, k] = np.count_nonzero(inside, axis=(1, 2))
            target = (act * (s * s) + y0 * s + x0)[:, None, None] + (ar[:, None] * s + ar[None, :])  # [b, win, win]
            owner[target[inside]] = k  # later objects are painted over earlier ones
        return owner.reshape(B, s, s), area

    @staticmethod
    def _window_inside(
        sc: _Scene, act: np.ndarray, k: int, x0: np.ndarray, y0: np.ndarray, ar: np.ndarray
    ) -> np.ndarray:
        """Whether each pixel of the windows ``[b, win, win]`` (top-left ``x0, y0 [b]``) lies in object
        ``k`` of samples ``act``: inside iff ``hole <= rho <= R_cls(angle - theta)``, R tabulated."""
        r = sc.radius[act, k].astype(np.float32)[:, None, None]  # [b, 1, 1]
        cx = sc.cx[act, k].astype(np.float32)[:, None, None]
        cy = sc.cy[act, k].astype(np.float32)[:, None, None]
        dx = ((x0[:, None] + ar).astype(np.float32)[:, None, :] + 0.5 - cx) / r  # [b, 1, win]
        dy = ((y0[:, None] + ar).astype(np.float32)[:, :, None] + 0.5 - cy) / r  # [b, win, 1]
        rho2 = dx * dx + dy * dy  # [b, win, win]
        # angle relative to the object's rotation, as a bin index (angle + 3 pi > 0 always)
        turn = (np.float32(3.0 * math.pi) - sc.theta[act, k].astype(np.float32))[:, None, None]
        bins = ((np.arctan2(dy, dx) + turn) * np.float32(_N_BINS / _TWO_PI)).astype(np.intp) & (_N_BINS - 1)
        bins += (sc.cls[act, k] * _N_BINS)[:, None, None]
        return (rho2 <= _RADIUS_TABLE2.ravel()[bins]) & (rho2 >= _HOLE2[sc.cls[act, k]][:, None, None])

    def _owned_pixels(self, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The object pixels as flat arrays (the colouring and the mask touch only these):
        ``owned`` indexes ``[B * S * S]``, ``own`` the owning object in ``[B * K]``."""
        s, K = self.config.image_size, self.config.max_objects
        owned = np.flatnonzero(owner >= 0)
        own = owner.ravel()[owned].astype(np.intp) + (owned // (s * s)) * K
        return owned, own

    def _paint_objects(self, img: np.ndarray, sc: _Scene, owned: np.ndarray, own: np.ndarray) -> None:
        """Colour the owned pixels of ``img [B, S, S, 3]`` (in place) from their object's colour,
        texture and tone jitter."""
        s = self.config.image_size
        B, K = sc.active.shape
        px = (owned % s).astype(np.float32) + 0.5
        py = ((owned // s) % s).astype(np.float32) + 0.5
        ro = sc.radius.astype(np.float32).ravel()[own]
        gx = (px - sc.cx.astype(np.float32).ravel()[own]) / ro  # object-frame coordinates, [n_owned]
        gy = (py - sc.cy.astype(np.float32).ravel()[own]) / ro
        tex_ang = (math.pi * sc.P[:, :, _S_TEXANG]).astype(np.float32)  # [B, K]
        t = gx * np.cos(tex_ang).ravel()[own] + gy * np.sin(tex_ang).ravel()[own]
        tex = sc.texture.ravel()[own]
        stripes = (t * 2.5 - np.floor(t * 2.5)) < 0.5
        dots = (np.sin(gx * 7.0) * np.sin(gy * 7.0)) > 0.25
        second = np.where(tex == 1, ~stripes, (tex == 2) & ~dots)  # second tone of the texture
        shade = 1.0 + 0.12 * t * (tex == 0)  # solid objects: soft shading gradient
        jit = (sc.P[:, :, _S_TONE : _S_TONE + 3] * 36.0 - 18.0).astype(np.float32)  # [B, K, 3]
        tones = np.stack([self._rgb[sc.colour] + jit, self._rgb2[sc.colour] + jit], axis=2).reshape(B * K * 2, 3)
        img.reshape(-1, 3)[owned] = tones[own * 2 + second] * shade[:, None]

    def _ground_truth(
        self, sc: _Scene, owned: np.ndarray, own: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``mask [B, S, S]`` uint8, ``labels [B, 10]`` bool (classes visible in the mask) and
        ``counts [B, K]`` (visible pixels per object)."""
        s = self.config.image_size
        B, K = sc.active.shape
        mask = np.repeat(sc.bg.astype(np.uint8), s * s)  # flat [B * S * S]
        mask[owned] = (sc.cls + len(self.STUFF)).astype(np.uint8).ravel()[own]
        counts = np.bincount(own, minlength=B * K).reshape(B, K)
        labels = np.zeros((B, self.NUM_CLASSES), dtype=bool)
        labels[np.arange(B), sc.bg] = True
        vis_b, vis_k = np.nonzero(counts)
        labels[vis_b, len(self.STUFF) + sc.cls[vis_b, vis_k]] = True
        return mask.reshape(B, s, s), labels, counts

    def _describe(
        self, sc: _Scene, counts: np.ndarray, area: np.ndarray
    ) -> tuple[list[str], list[list[str]], list[list[dict[str, Any]]]]:
        """Per sample: the caption, its nouns and the object records of :meth:`generate_batch`."""
        omit = sc.P[:, :, _S_OMIT] < self.config.omit_prob  # [B, K]
        captions, nouns, objects = [], [], []
        for b in range(len(sc.bg)):
            objs = [
                {
                    "cls": int(sc.cls[b, k]),
                    "colour": int(sc.colour[b, k]),
                    "texture": int(sc.texture[b, k]),
                    "visible": float(counts[b, k]) / max(int(area[b, k]), 1),
                    "omit": bool(omit[b, k]),
                }
                for k in range(int(sc.n_obj[b]))
            ]
            caption, noun_list, named = self._caption(objs, int(sc.bg[b]), sc.U[b])
            captions.append(caption)
            nouns.append(noun_list)
            objects.append(
                [
                    {
                        "class": self.THINGS[o["cls"]],
                        "colour": _COLOURS[o["colour"]][0],
                        "texture": _TEXTURES[o["texture"]],
                        "visible": o["visible"],
                        "named": bool(nm),
                    }
                    for o, nm in zip(objs, named)
                ]
            )
        return captions, nouns, objects

    def generate(self, index: int, split: str = "train", seed: int = 0) -> dict[str, Any]:
        """Render sample ``index`` of ``split``: as :meth:`generate_batch` for one sample, unbatched
        (``image`` uint8 ``[S, S, 3]``, ``mask`` uint8 ``[S, S]``, ``labels`` bool ``[10]``, ...)."""
        out = self.generate_batch([index], split, seed)
        return {key: value[0] for key, value in out.items()}

    def _caption(self, objects: list[dict[str, Any]], bg: int, u: np.ndarray) -> tuple[str, list[str], list[bool]]:
        cfg = self.config
        n = len(objects)
        named = [o["visible"] >= cfg.min_visible and not o["omit"] for o in objects]
        if not any(named):  # always name something: the most visible object
            named[int(np.argmax([o["visible"] for o in objects]))] = True
        phrases = []
        for o, nm in zip(objects, named):
            if not nm:
                continue
            words = []
            if cfg.caption_textures and o["texture"] > 0:
                words.append(_TEXTURES[o["texture"]])
            if cfg.caption_colours:
                words.append(_COLOURS[o["colour"]][0])
            words.append(self.THINGS[o["cls"]])
            phrases.append(_article(words[0]) + " " + " ".join(words))
        things = _join(phrases)
        k = len(phrases)
        complete = k == n and k >= 2  # a count word only when it counts every object
        there = "there are" if k > 1 else "there is"
        bg_name = self.STUFF[bg]
        name_bg = bool(u[_P_NAME_BG] < cfg.name_background_prob)
        if name_bg:
            form = int(u[_P_FORM] * 6)
            preps = _BG_PREPS[bg_name]
            prep = preps[int(u[_P_PREP] * len(preps))]
            if form == 4 and not complete:
                form = 0
            caption = (
                f"{things} {prep}.",
                f"a photo of {things} {prep}.",
                f"{there} {things} {prep}.",
                f"{bg_name} with {things}.",
                f"{_COUNT_WORDS.get(k, str(k))} shapes {prep}: {things}.",
                f"{things}, with {bg_name} in the background.",
            )[form]
        else:
            form = int(u[_P_FORM] * 5)
            if form == 4 and not complete:
                form = 0
            caption = (
                f"{things}.",
                f"a photo of {things}.",
                f"{there} {things}.",
                f"an image showing {things}.",
                f"{_COUNT_WORDS.get(k, str(k))} shapes: {things}.",
            )[form]
        nouns: list[str] = []
        for o, nm in zip(objects, named):
            name = self.THINGS[o["cls"]]
            if nm and name not in nouns:
                nouns.append(name)
        if name_bg:
            nouns.append(bg_name)
        return caption, nouns, named

    def to_tensors(
        self,
        batch: dict[str, Any],
        indices: Sequence[int],
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> dict[str, Any]:
        """A :meth:`generate_batch` result as model inputs: ``image`` float ``[B, 3, S, S]``
        normalised, ``mask`` long ``[B, S, S]``, ``labels`` float ``[B, 10]``, ``caption``, ``nouns``,
        ``index`` long ``[B]``."""
        image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float().div_(255.0)
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        return {
            "image": image.sub_(m).div_(sd).contiguous(),
            "mask": torch.from_numpy(batch["mask"]).long(),
            "labels": torch.from_numpy(batch["labels"]).float(),
            "caption": list(batch["caption"]),
            "nouns": list(batch["nouns"]),
            "index": torch.as_tensor(list(indices), dtype=torch.long),
        }

    def sample(
        self,
        index: int,
        split: str = "train",
        seed: int = 0,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> dict[str, Any]:
        """One sample as tensors: ``image`` float ``[3, S, S]`` normalised, ``mask`` long ``[S, S]``,
        ``labels`` float ``[10]``, ``caption``, ``nouns``, ``index`` (int)."""
        t = self.to_tensors(self.generate_batch([index], split, seed), [index], mean, std)
        return {
            "image": t["image"][0],
            "mask": t["mask"][0],
            "labels": t["labels"][0],
            "caption": t["caption"][0],
            "nouns": t["nouns"][0],
            "index": int(index),
        }


class SynthShapesEval(Dataset):
    """The fixed SynthShapes evaluation split: ``size`` images drawn from ``seed`` (default 0 for
    every run, independent of the training seed). Items as :meth:`SynthShapes.sample` plus ``name``.

    Has the segmentation-dataset interface of :mod:`mixreorg.data.segmentation`: ``CLASS_NAMES``,
    ``NUM_CLASSES``, ``IGNORE_INDEX``, ``BACKGROUND_INDEX`` (None: every class has a prompt),
    ``BG_THRESH``. ``__getitems__`` renders a whole DataLoader batch at once. Use
    ``DataLoader(..., collate_fn=mixreorg.data.collate_samples)``: noun lists differ in length.
    """

    CLASS_NAMES = SynthShapes.CLASS_NAMES
    NUM_CLASSES = SynthShapes.NUM_CLASSES
    IGNORE_INDEX = SynthShapes.IGNORE_INDEX
    BACKGROUND_INDEX = SynthShapes.BACKGROUND_INDEX
    BG_THRESH: float | None = None
    name = "synthshapes"

    def __init__(
        self,
        size: int = 512,
        *,
        seed: int = 0,
        config: SynthShapesConfig | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        **overrides: Any,
    ) -> None:
        if size < 1:
            raise ValueError(f"SynthShapesEval: size must be >= 1, got {size}")
        self.size = int(size)
        self.seed = int(seed)
        self.generator = SynthShapes(config, **overrides)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.CLASS_NAMES

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> int:
        if not -self.size <= index < self.size:
            raise IndexError(f"SynthShapesEval index {index} out of range for size {self.size}")
        return int(index) % self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        idx = [self._check(i) for i in indices]
        t = self.generator.to_tensors(self.generator.generate_batch(idx, "eval", self.seed), idx, self.mean, self.std)
        return [
            {
                "image": t["image"][j],
                "mask": t["mask"][j],
                "labels": t["labels"][j],
                "caption": t["caption"][j],
                "nouns": t["nouns"][j],
                "index": i,
                "name": f"synthshapes_{self.seed}_{i:06d}",
            }
            for j, i in enumerate(idx)
        ]

    def raw(self, index: int) -> dict[str, Any]:
        """The numpy form of item ``index`` (uint8 image, mask, objects ...), for visualisation."""
        return self.generator.generate(self._check(index), "eval", self.seed)


class SynthShapesStream(ResumableStream):
    """Infinite SynthShapes training stream: batches (or single samples) of :meth:`SynthShapes.sample`.

    Batch items: ``image`` ``[B, 3, S, S]`` (normalised), ``mask`` ``[B, S, S]``, ``labels``
    ``[B, 10]``, ``caption`` and ``nouns`` (lists), ``index`` ``[B]`` (global sample indices).
    Sample ``i`` of the global sequence is ``generate(i, "train", seed)``. The sequence is cut into
    chunks of ``batch_size``; chunk ``c`` goes to rank ``c % world_size`` and a rank's chunks go
    round-robin to its DataLoader workers, so batch ``b`` of a rank is the same whatever the number of
    workers, and the stream resumes exactly even with a different worker count (see
    :mod:`mixreorg.data.stream` for the observe/state_dict contract).
    """

    def __init__(
        self,
        batch_size: int | None = 64,
        *,
        seed: int = 0,
        config: SynthShapesConfig | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        **overrides: Any,
    ) -> None:
        super().__init__(batch_size, rank=rank, world_size=world_size)
        if seed < 0:
            raise ValueError(f"SynthShapesStream: seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.generator = SynthShapes(config, **overrides)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def config(self) -> SynthShapesConfig:
        return self.generator.config

    def _fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "config": dataclasses.asdict(self.config)}

    def _translate_pointers(self, consumed: int, old_roles: int, new_roles: int) -> list[Any]:
        # no skips: each role's pointer follows from the number of consumed chunks
        return [role_share(consumed, r, new_roles) * self._unit for r in range(new_roles)]

    def index_at(self, position: int) -> int:
        """Global sample index of the ``position``-th sample this rank receives."""
        return chunked_index(position, 0, 1, self.rank, self.world_size, self._unit)

    def _role_items(self, role: int, num_roles: int, pointer: Any) -> Iterator[tuple[Any, Any, str]]:
        p = 0 if pointer is None else int(pointer)
        chunk = self._unit
        while True:
            idx = chunked_index(p, role, num_roles, self.rank, self.world_size, chunk)
            p += 1
            yield p, self.generator.sample(idx, "train", self.seed, self.mean, self.std), ""

    def _role_batches(self, role: int, num_roles: int, pointer: Any) -> Iterator[tuple[Any, dict[str, Any]]] | None:
        bs = self._unit
        p = 0 if pointer is None else int(pointer)
        if p % bs:
            return None

        def batches() -> Iterator[tuple[Any, dict[str, Any]]]:
            q = p
            while True:
                start = chunked_index(q, role, num_roles, self.rank, self.world_size, bs)
                idx = np.arange(start, start + bs)
                q += bs
                yield (
                    q,
                    self.generator.to_tensors(
                        self.generator.generate_batch(idx, "train", self.seed), idx, self.mean, self.std
                    ),
                )

        return batches()


def chance_miou(
    split: SynthShapesEval | None = None,
    *,
    size: int = 512,
    seed: int = 0,
    config: SynthShapesConfig | None = None,
) -> dict[str, Any]:
    """Chance-level mIoU on a SynthShapes eval split.

    * ``most_frequent``: every pixel predicted as the split's most frequent class (exact).
    * ``prior_random``: every pixel drawn independently from the class prior; the expected confusion
      matrix is ``E[cm[t, p]] = n_t * prior_p``, so class ``c`` scores ``p_c / (2 - p_c)``.

    Both average over the classes present in the split (as mIoU does). Returns both, the per-class
    pixel frequencies, the class names and the number of images.
    """
    ds = split if split is not None else SynthShapesEval(size, seed=seed, config=config)
    gen = ds.generator
    counts = np.zeros(gen.NUM_CLASSES, dtype=np.int64)
    for start in range(0, len(ds), 256):
        idx = np.arange(start, min(start + 256, len(ds)))
        counts += np.bincount(gen.generate_batch(idx, "eval", ds.seed)["mask"].ravel(), minlength=gen.NUM_CLASSES)
    freq = counts / counts.sum()
    present = counts > 0
    most = np.zeros_like(freq)  # most frequent: IoU = n_k / N for that class, 0 for the others
    most[int(np.argmax(counts))] = freq.max()
    prior = freq / (2.0 - freq)
    return {
        "most_frequent": float(most[present].mean()),
        "prior_random": float(prior[present].mean()),
        "class_freq": {name: float(f) for name, f in zip(gen.CLASS_NAMES, freq)},
        "class_names": list(gen.CLASS_NAMES),
        "num_images": len(ds),
    }
