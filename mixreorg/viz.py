"""Pictures without matplotlib: segmentation overlays with a legend, image grids, loss curves (PIL only).

* :func:`overlay`: an image blended with its colourised label map, plus a legend of the classes
  present (largest first). Images may be PIL, uint8 ``[H, W, 3]`` arrays, or normalised float
  tensors ``[3, H, W]`` (denormalised with ``mean``/``std``).
* :func:`save_segmentation_panels`: ``image | ground truth | prediction`` PNGs for a few images.
* :func:`image_grid`: tiles side by side with optional captions underneath.
* :func:`plot_curves`: line plot of one or more series (e.g. losses over steps) as a PNG.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data.segmentation import voc_palette
from .data.transforms import CLIP_MEAN, CLIP_STD

__all__ = [
    "palette",
    "to_uint8_image",
    "colorize",
    "overlay",
    "image_grid",
    "save_segmentation_panels",
    "plot_curves",
]


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def palette(n: int) -> np.ndarray:
    """``[n, 3]`` uint8 colours, distinct for neighbouring ids: the PASCAL VOC colour map shifted by
    one, so that id 0 is not black (black is kept for "ignore")."""
    return voc_palette(n + 1)[1:]


def to_uint8_image(
    image: Image.Image | np.ndarray | torch.Tensor,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """``[H, W, 3]`` uint8 from a PIL image, a uint8 HWC array, or a normalised ``[3, H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu().float()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a [3, H, W] image tensor, got {tuple(t.shape)}")
        m = torch.tensor(mean).view(3, 1, 1)
        s = torch.tensor(std).view(3, 1, 1)
        return (t * s + m).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        return arr
    raise ValueError(f"expected a uint8 [H, W, 3] array, got {arr.dtype} {arr.shape}")


def _as_mask(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a [H, W] label map, got shape {m.shape}")
    return m.astype(np.int64)


def colorize(
    mask: np.ndarray | torch.Tensor, colours: np.ndarray | None = None, ignore_index: int | None = 255
) -> Image.Image:
    """Label map ``[H, W]`` -> RGB image (ignored pixels black)."""
    m = _as_mask(mask)
    top = int(m[m != ignore_index].max()) + 1 if (m != ignore_index).any() else 1
    pal = palette(max(top, 1)) if colours is None else np.asarray(colours, dtype=np.uint8)
    if top > len(pal):
        raise ValueError(f"label {top - 1} has no colour (palette of {len(pal)})")
    out = np.zeros(m.shape + (3,), dtype=np.uint8)
    valid = (m != ignore_index) & (m >= 0)
    out[valid] = pal[m[valid]]
    return Image.fromarray(out)


def _legend(ids: Sequence[int], names: Sequence[str], pal: np.ndarray, height: int, font_size: int) -> Image.Image:
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row = font_size + 6
    width = 14 + 8 + max([_text_size(probe, names[i], font)[0] for i in ids] + [40]) + 10
    panel = Image.new("RGB", (width, max(height, row * len(ids) + 8)), (255, 255, 255))
    d = ImageDraw.Draw(panel)
    for r, i in enumerate(ids):
        y = 4 + r * row
        d.rectangle([6, y + 1, 6 + 14, y + 1 + font_size], fill=tuple(int(c) for c in pal[i]), outline=(0, 0, 0))
        d.text((28, y), names[i], fill=(0, 0, 0), font=font)
    return panel


def overlay(
    image: Image.Image | np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    *,
    alpha: float = 0.5,
    legend: bool = True,
    ignore_index: int | None = 255,
    colours: np.ndarray | None = None,
    scale: int = 1,
    max_legend: int = 20,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Image.Image:
    """The image blended with the colourised ``mask`` (resized to the image with nearest neighbour),
    with a legend of the classes present, largest area first (up to ``max_legend``)."""
    img = to_uint8_image(image, mean, std)
    m = _as_mask(mask)
    pal = palette(len(class_names)) if colours is None else np.asarray(colours, dtype=np.uint8)
    valid = (m != ignore_index) & (m >= 0)
    if valid.any() and int(m[valid].max()) >= len(class_names):
        raise ValueError(f"label {int(m[valid].max())} is outside the {len(class_names)} class names")
    if m.shape != img.shape[:2]:
        m_img = Image.fromarray(np.where(valid, m, 65535).astype(np.int32))
        m = np.asarray(m_img.resize((img.shape[1], img.shape[0]), Image.Resampling.NEAREST)).astype(np.int64)
        m[m == 65535] = -1
        valid = m >= 0
    col = img.astype(np.float32).copy()
    col[valid] = (1.0 - alpha) * col[valid] + alpha * pal[m[valid]].astype(np.float32)
    out = Image.fromarray(col.round().clip(0, 255).astype(np.uint8))
    if scale != 1:
        out = out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)
    if not legend:
        return out
    counts = np.bincount(m[valid], minlength=len(class_names))
    ids = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0][:max_legend]
    panel = _legend(ids, class_names, pal, out.height, font_size=11)
    canvas = Image.new("RGB", (out.width + panel.width, max(out.height, panel.height)), (255, 255, 255))
    canvas.paste(out, (0, 0))
    canvas.paste(panel, (out.width, 0))
    return canvas


def image_grid(
    images: Sequence[Image.Image | np.ndarray | torch.Tensor],
    ncols: int,
    *,
    pad: int = 2,
    labels: Sequence[str] | None = None,
    label_width: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    font_size: int = 11,
) -> Image.Image:
    """Tiles in rows of ``ncols`` (cells sized to the largest tile), captions wrapped underneath."""
    if not images:
        raise ValueError("image_grid: no images")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    tiles = [im if isinstance(im, Image.Image) else Image.fromarray(to_uint8_image(im)) for im in images]
    cw = max(t.width for t in tiles)
    ch = max(t.height for t in tiles)
    font = _font(font_size)
    text_h = 0
    wrapped: list[str] = []
    if labels is not None:
        if len(labels) != len(tiles):
            raise ValueError(f"{len(labels)} labels for {len(tiles)} images")
        width_chars = label_width or max(8, cw // max(1, int(font_size * 0.6)))
        wrapped = ["\n".join(textwrap.wrap(str(t), width_chars)) for t in labels]
        lines = max(w.count("\n") + 1 if w else 0 for w in wrapped)
        text_h = lines * (font_size + 3) + 4 if lines else 0
    nrows = math.ceil(len(tiles) / ncols)
    grid = Image.new("RGB", (ncols * (cw + pad) + pad, nrows * (ch + text_h + pad) + pad), background)
    d = ImageDraw.Draw(grid)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        x, y = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        grid.paste(t, (x, y))
        if wrapped and wrapped[i]:
            d.multiline_text((x + 1, y + ch + 2), wrapped[i], fill=(0, 0, 0), font=font, spacing=3)
    return grid


def save_segmentation_panels(
    out_dir: str | os.PathLike[str],
    images: Sequence[Any],
    targets: Sequence[Any],
    preds: Sequence[Any],
    class_names: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    max_images: int = 4,
    ignore_index: int | None = 255,
    alpha: float = 0.55,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> list[Path]:
    """Write ``<name>.png`` = ``image | ground truth | prediction`` (with legends) for the first
    ``max_images`` images; masks may be smaller or larger than the image. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(max_images, len(images))):
        img = to_uint8_image(images[i], mean, std)
        gt = overlay(img, targets[i], class_names, alpha=alpha, ignore_index=ignore_index)
        pr = overlay(img, preds[i], class_names, alpha=alpha, ignore_index=ignore_index)
        panel = image_grid([Image.fromarray(img), gt, pr], ncols=3, labels=["image", "ground truth", "prediction"])
        name = names[i] if names is not None else f"sample_{i:03d}"
        path = out / f"{Path(str(name)).name}.png"
        panel.save(path)
        paths.append(path)
    return paths


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:g}"


@dataclass(frozen=True)
class _PlotArea:
    """The plot rectangle (pixels: ``left, top``, size ``pw x ph``) and the data range ``[x0, x1] x
    [y0, y1]`` it shows."""

    left: int
    top: int
    pw: int
    ph: int
    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * self.pw

    def py(self, y: float) -> float:
        return self.top + self.ph - (y - self.y0) / (self.y1 - self.y0) * self.ph


def _curve_data(
    series: Mapping[str, Sequence[float] | Sequence[tuple[float, float]]], logy: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each series as ``(xs, ys)`` float64 arrays (``ys`` as ``log10`` when ``logy``, NaN where not positive)."""
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, values in series.items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim == 1:
            xs, ys = np.arange(len(arr), dtype=np.float64), arr
        elif arr.ndim == 2 and arr.shape[1] == 2:
            xs, ys = arr[:, 0], arr[:, 1]
        elif arr.size == 0:
            xs, ys = np.zeros(0), np.zeros(0)
        else:
            raise ValueError(f"series {name!r}: expected values or (x, y) pairs, got shape {arr.shape}")
        if logy:
            with np.errstate(divide="ignore", invalid="ignore"):
                ys = np.where(ys > 0, np.log10(np.where(ys > 0, ys, 1.0)), np.nan)
        data[name] = (xs, ys)
    return data


def _fit_area(left: int, top: int, pw: int, ph: int, all_x: np.ndarray, all_y: np.ndarray) -> _PlotArea:
    """The plot area showing the finite points ``all_x, all_y`` (not empty), with 5% room above and
    below so that the extremes do not sit on the frame; a constant range is widened to stay drawable."""
    x0, x1 = float(all_x.min()), float(all_x.max())
    y0, y1 = float(all_y.min()), float(all_y.max())
    if x1 == x0:
        x1 = x0 + 1.0
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad_y = 0.05 * (y1 - y0)
    return _PlotArea(left, top, pw, ph, x0, x1, y0 - pad_y, y1 + pad_y)


def _draw_ticks(d: ImageDraw.ImageDraw, area: _PlotArea, font: Any, logy: bool) -> None:
    """Tick marks, light grid lines and tick labels of both axes (y labels in data units when ``logy``)."""
    left, top, pw, ph = area.left, area.top, area.pw, area.ph
    for t in _nice_ticks(area.x0, area.x1):
        X = area.px(t)
        d.line([X, top + ph, X, top + ph + 4], fill=(0, 0, 0))
        d.line([X, top, X, top + ph], fill=(232, 232, 232))
        label = _fmt_tick(t)
        tw, _ = _text_size(d, label, font)
        d.text((X - tw / 2, top + ph + 6), label, fill=(0, 0, 0), font=font)
    for t in _nice_ticks(area.y0, area.y1):
        Y = area.py(t)
        d.line([left - 4, Y, left, Y], fill=(0, 0, 0))
        d.line([left, Y, left + pw, Y], fill=(232, 232, 232))
        label = _fmt_tick(10**t if logy else t)
        tw, th = _text_size(d, label, font)
        d.text((left - 6 - tw, Y - th / 2 - 1), label, fill=(0, 0, 0), font=font)


def _ema(ys: np.ndarray, smooth: float) -> np.ndarray:
    """Exponential moving average of ``ys`` that skips non-finite values (and stays NaN there, so
    the smoothed line breaks where the raw one does)."""
    ema = np.empty_like(ys)
    acc = np.nan
    for i, v in enumerate(ys):
        acc = v if not np.isfinite(acc) else (acc if not np.isfinite(v) else smooth * acc + (1 - smooth) * v)
        ema[i] = acc if np.isfinite(v) else np.nan
    return ema


def _draw_line(
    d: ImageDraw.ImageDraw, area: _PlotArea, xs: np.ndarray, ys: np.ndarray, fill: tuple[int, ...], width: int
) -> None:
    """A polyline broken at non-finite points. A lone finite point at the end (a one-point series)
    is drawn as a dot; lone points between breaks are not drawn."""
    seg: list[tuple[float, float]] = []
    for x, y in zip(xs, ys):
        if np.isfinite(x) and np.isfinite(y):
            seg.append((area.px(float(x)), area.py(float(y))))
        else:
            if len(seg) > 1:
                d.line(seg, fill=fill, width=width)
            seg = []
    if len(seg) > 1:
        d.line(seg, fill=fill, width=width)
    elif len(seg) == 1:
        X, Y = seg[0]
        d.ellipse([X - 2, Y - 2, X + 2, Y + 2], fill=fill)


def _draw_series(
    d: ImageDraw.ImageDraw,
    area: _PlotArea,
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    colours: np.ndarray,
    smooth: float,
) -> None:
    """Every curve in its colour; with ``smooth`` the raw curve goes underneath, faint and thin."""
    for (xs, ys), colour in zip(data.values(), colours):
        col = tuple(int(c) for c in colour)
        curves = [(ys, col, 2)]
        if smooth > 0:
            faint = tuple(int(255 - (255 - c) * 0.3) for c in col)
            curves = [(ys, faint, 1), (_ema(ys, smooth), col, 2)]
        for yv, c, width in curves:
            _draw_line(d, area, xs, yv, c, width)


def _draw_legend(
    d: ImageDraw.ImageDraw, names: Sequence[str], colours: np.ndarray, x: int, top: int, font: Any
) -> None:
    """One line per series right of the plot (starting at ``x``): a colour swatch and the name (cut to 20)."""
    for i, (name, colour) in enumerate(zip(names, colours)):
        y = top + 6 + i * 16
        d.line([x + 10, y + 6, x + 30, y + 6], fill=tuple(int(c) for c in colour), width=3)
        d.text((x + 36, y), name[:20], fill=(0, 0, 0), font=font)


def _draw_ylabel(img: Image.Image, d: ImageDraw.ImageDraw, label: str, font: Any, top: int, ph: int) -> None:
    """``label`` rotated 90 degrees at the left edge, centred on the plot's height (PIL draws no
    vertical text: it is drawn on a transparent tile that is rotated and pasted)."""
    tw, th = _text_size(d, label, font)
    txt = Image.new("RGBA", (tw + 4, th + 6), (255, 255, 255, 0))
    ImageDraw.Draw(txt).text((2, 0), label, fill=(0, 0, 0, 255), font=font)
    rot = txt.rotate(90, expand=True)
    img.paste(rot, (4, top + (ph - rot.height) // 2), rot)


def plot_curves(
    series: Mapping[str, Sequence[float] | Sequence[tuple[float, float]]],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    size: tuple[int, int] = (720, 420),
    logy: bool = False,
    smooth: float = 0.0,
) -> Image.Image:
    """Line plot of named series (values, or ``(x, y)`` pairs); saved as PNG when ``path`` is given.

    Non-finite points break the line. ``smooth`` in ``[0, 1)`` applies an exponential moving average
    (the raw curve is drawn faintly underneath). ``logy`` plots ``log10(y)`` for positive ``y``.
    """
    if not series:
        raise ValueError("plot_curves: no series")
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    data = _curve_data(series, logy)
    finite = [(x[np.isfinite(y)], y[np.isfinite(y)]) for x, y in data.values()]
    all_x = np.concatenate([x for x, _ in finite]) if finite else np.zeros(0)
    all_y = np.concatenate([y for _, y in finite]) if finite else np.zeros(0)
    w, h = size
    left, right, top, bottom = 70, 20 + 150, 34 if title else 16, 46  # the right margin holds the legend
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = _font(11)
    pw, ph = w - left - right, h - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    if title:
        tw, _ = _text_size(d, title, _font(13))
        d.text(((w - right + left - tw) // 2, 8), title, fill=(0, 0, 0), font=_font(13))
    if all_y.size == 0:
        d.text((left + 10, top + 10), "no finite values", fill=(160, 0, 0), font=font)
    else:
        area = _fit_area(left, top, pw, ph, all_x, all_y)
        _draw_ticks(d, area, font, logy)
        d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))  # again: the grid lines crossed it
        colours = palette(len(data) + 1)[1:] if len(data) > 1 else np.array([[31, 119, 180]], np.uint8)
        _draw_series(d, area, data, colours, smooth)
        _draw_legend(d, list(data), colours, w - right, top, font)
    xl_w, _ = _text_size(d, xlabel, font)
    d.text((left + (pw - xl_w) / 2, h - 18), xlabel, fill=(0, 0, 0), font=font)
    if ylabel:
        _draw_ylabel(img, d, ylabel + (" (log scale)" if logy else ""), font, top, ph)
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p)
    return img
