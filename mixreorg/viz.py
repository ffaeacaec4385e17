"""Pictures: segmentation overlays with a legend and image grids (PIL); curves and bar charts (matplotlib).

* :func:`overlay`: an image blended with its colourised label map, plus a legend of the classes
  present (largest first). Images may be PIL, uint8 ``[H, W, 3]`` arrays, or normalised float
  tensors ``[3, H, W]`` (denormalised with ``mean``/``std``).
* :func:`save_segmentation_panels`: ``image | ground truth | prediction`` PNGs for a few images.
* :func:`image_grid`: tiles side by side with optional captions underneath.
* :func:`plot_curves`: line plot of one or more series (e.g. losses over steps) as a PNG;
  :func:`draw_curves` draws the same onto a matplotlib ``Axes`` (one panel of a larger figure).
* :func:`plot_bars`: grouped bar chart with optional error bars and reference lines (per-class IoU,
  the comparison table); :func:`draw_bars` onto an ``Axes``.
* :func:`new_figure` / :func:`render` / :func:`save_figure`: matplotlib figures without pyplot (the
  Agg canvas, no global state), rendered to a PIL image of exactly the figure's pixel size.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
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
    "draw_curves",
    "plot_bars",
    "draw_bars",
    "new_figure",
    "render",
    "save_figure",
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


# ----------------------------------------------------------------------------------- matplotlib figures
Series = Mapping[str, Sequence[float] | Sequence[tuple[float, float]]]


def new_figure(size: tuple[int, int] = (720, 420), dpi: int = 100) -> Any:
    """A matplotlib ``Figure`` of ``size`` pixels on its own Agg canvas (no pyplot, no global state;
    nothing to close: it is freed with its last reference), with the constrained layout: tick labels,
    axis labels and legends outside the axes all fit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def render(fig: Any) -> Image.Image:
    """The figure drawn by its Agg canvas as an RGB PIL image (exactly its pixel size)."""
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Image.Image:
    """Render ``fig`` and write it as a PNG (parent folders created; the bytes depend only on the
    figure: PIL writes no time stamp). Returns the image."""
    img = render(fig)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    img.save(p)
    return img


def _curve_data(series: Series) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each series as ``(xs, ys)`` float64 arrays (plain values get x = 0, 1, ...)."""
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
        data[name] = (xs, ys)
    return data


def _ema(ys: np.ndarray, smooth: float) -> np.ndarray:
    """Exponential moving average of ``ys`` that skips non-finite values (and stays NaN there, so
    the smoothed line breaks where the raw one does)."""
    ema = np.empty_like(ys)
    acc = np.nan
    for i, v in enumerate(ys):
        acc = v if not np.isfinite(acc) else (acc if not np.isfinite(v) else smooth * acc + (1 - smooth) * v)
        ema[i] = acc if np.isfinite(v) else np.nan
    return ema


def draw_curves(
    ax: Any,
    series: Series,
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
    smooth: float = 0.0,
    hlines: Mapping[str, float] | None = None,
    markers: bool = False,
) -> None:
    """Named series (values, or ``(x, y)`` pairs) as lines on ``ax``. Non-finite points break the
    line; ``logy``: log y axis (values <= 0 left out); ``smooth`` in ``[0, 1)``: an exponential moving
    average drawn over the faint raw curve; ``hlines``: labelled dashed reference lines (e.g. chance);
    a series with a single finite point (or ``markers``) is drawn with markers."""
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    data = _curve_data(series)
    cmap = _colours(len(data))
    drawn = 0
    for (name, (xs, ys)), colour in zip(data.items(), cmap):
        if logy:
            ys = np.where(ys > 0, ys, np.nan)
        n_finite = int(np.isfinite(ys).sum())
        drawn += n_finite
        mark = "o" if markers or n_finite == 1 else None
        if smooth > 0 and n_finite > 1:
            ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
            ys = _ema(ys, smooth)
        ax.plot(xs, ys, color=colour, linewidth=1.4, marker=mark, markersize=3, label=name[:28])
    _hlines(ax, hlines)
    if logy and drawn:
        _log_axis(ax, data)
    if not drawn:
        ax.text(0.02, 0.9, "no finite values", transform=ax.transAxes, color="#a00000")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (log scale)" if logy and drawn else ""))
    ax.grid(True, color="0.9", linewidth=0.6)
    if data or hlines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False, borderaxespad=0.0)


def _log_axis(ax: Any, data: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """A log y axis labelled in plain numbers (``2``, ``0.5``; not ``2 x 10^0``), at 1-2-5 steps
    over up to three decades (every digit under half a decade; only powers of ten beyond)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ys = np.concatenate([y[np.isfinite(y) & (y > 0)] for _, y in data.values()])
    span = math.log10(ys.max() / ys.min())
    subs = np.arange(1.0, 10.0) if span < 0.5 else (1.0, 2.0, 5.0) if span <= 3 else (1.0,)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=subs, numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _hlines(ax: Any, hlines: Mapping[str, float] | None) -> None:
    """Labelled horizontal reference lines, grey, each in its own dash pattern."""
    for (name, value), style in zip((hlines or {}).items(), ["--", ":", "-."] * 10):
        ax.axhline(value, color="0.35", linestyle=style, linewidth=0.9, label=name)


def _colours(n: int) -> list[Any]:
    """``n`` distinct matplotlib colours (tab10, then tab20, then a continuous map)."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / max(n - 1, 1)) for i in range(n)]


def plot_curves(
    series: Series,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    size: tuple[int, int] = (720, 420),
    logy: bool = False,
    smooth: float = 0.0,
    hlines: Mapping[str, float] | None = None,
) -> Image.Image:
    """Line plot of named series (:func:`draw_curves`) as a ``size`` PIL image; saved as PNG when
    ``path`` is given."""
    if not series:
        raise ValueError("plot_curves: no series")
    fig = new_figure(size)
    ax = fig.subplots()
    draw_curves(ax, series, title=title, xlabel=xlabel, ylabel=ylabel, logy=logy, smooth=smooth, hlines=hlines)
    return save_figure(fig, path) if path is not None else render(fig)


def draw_bars(
    ax: Any,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    errors: Mapping[str, Sequence[float]] | None = None,
    title: str = "",
    ylabel: str = "",
    hlines: Mapping[str, float] | None = None,
    fmt: str | None = "%.2f",
    ylim: tuple[float, float] | None = None,
) -> None:
    """Grouped bars on ``ax``: one group per category, one bar per series (``errors``: symmetric error
    bars of the same shape); NaN bars are left out and marked ``n/a``; ``fmt`` (None: none) writes
    each bar's height above it; ``hlines``: labelled dashed reference lines; the legend (several
    series or reference lines) goes right of the axes."""
    if not categories or not series:
        raise ValueError("draw_bars: no categories or no series")
    x = np.arange(len(categories), dtype=np.float64)
    width = 0.8 / len(series)
    for k, ((name, vals), colour) in enumerate(zip(series.items(), _colours(len(series)))):
        v = np.asarray(vals, dtype=np.float64)
        if v.shape != (len(categories),):
            raise ValueError(f"series {name!r}: {v.shape[0] if v.ndim else 0} values for {len(categories)} categories")
        err = None if errors is None or name not in errors else np.asarray(errors[name], dtype=np.float64)
        pos = x - 0.4 + width * (k + 0.5)
        ok = np.isfinite(v)
        bars = ax.bar(pos[ok], v[ok], width * 0.92, color=colour, label=name,
                      yerr=None if err is None else np.nan_to_num(err[ok]), capsize=3 if err is not None else 0)
        if fmt:
            ax.bar_label(bars, fmt=fmt, fontsize=6, padding=2)
        for p in pos[~ok]:
            ax.text(p, 0, "n/a", ha="center", va="bottom", fontsize=6, color="0.4")
    _hlines(ax, hlines)
    ax.set_xticks(x, [str(c) for c in categories], rotation=30 if len(categories) > 6 else 0, ha="right"
                  if len(categories) > 6 else "center", fontsize=8)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    if len(series) > 1 or hlines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False, borderaxespad=0.0)


def plot_bars(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str] | None = None,
    *,
    errors: Mapping[str, Sequence[float]] | None = None,
    title: str = "",
    ylabel: str = "",
    hlines: Mapping[str, float] | None = None,
    size: tuple[int, int] = (720, 420),
    ylim: tuple[float, float] | None = None,
    fmt: str | None = "%.2f",
) -> Image.Image:
    """Grouped bar chart (:func:`draw_bars`) as a ``size`` PIL image; saved as PNG when ``path`` is given."""
    fig = new_figure(size)
    ax = fig.subplots()
    draw_bars(ax, categories, series, errors=errors, title=title, ylabel=ylabel, hlines=hlines, fmt=fmt, ylim=ylim)
    return save_figure(fig, path) if path is not None else render(fig)
