"""The `gpl explain` figures: what each pooling keeps from an image, and where a cosine comes from.

Every map is drawn on the feature-map grid (one square per cell, not smoothed) stretched over
the image as the model saw it, with a colour bar that says what the colours mean. Like
plots.py, only matplotlib's object API is used (a `Figure` rendered by the Agg canvas).
"""

from __future__ import annotations

import os

import numpy as np

from gpl_cli.analysis.explain import ImageExplanation, PairTerm
from gpl_cli.store.sink import line_name

PANEL_INCHES = (2.4, 2.9)  # width, height of one panel with its colour bar
DPI = 100
SHARE_CMAP = "inferno"  # dark = little, bright = much; the photo shows through the dark end
SIGNED_CMAP = "RdBu_r"  # for values of both signs (CAMs), white at zero
OVERLAY_ALPHA = 0.65

# How each pooling's cosine terms are placed on the cells; the caption of the pair figure.
_PAIR_RULES = {
    "avg": "avg: every cell by its activations",
    "max": "max: each channel at the cell of its maximum",
    "gem": "gem: each channel's term spread over the cells in proportion to $x^p$",
    "lse": "lse: in proportion to $e^{rx}$",
    "rmac": "rmac: each region's channel maxima at their cells",
    "crow": "crow: by activation x spatial weight",
    "spoc": "spoc: every cell by its (prior-weighted) activations",
}


def figure_pixels(rows: int, columns: int, dpi: int = DPI) -> tuple[int, int]:
    """(width, height) in pixels of a figure with this many panels, written at `dpi`."""
    return round(columns * PANEL_INCHES[0] * dpi), round(rows * PANEL_INCHES[1] * dpi)


def _new_figure(rows: int, columns: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(columns * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    return fig, fig.subplots(rows, columns, squeeze=False)


def _colour_bar(fig, ax, norm, cmap: str, label: str) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.ticker import MaxNLocator

    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=ax, orientation="horizontal", fraction=0.05, pad=0.03,
                       aspect=18)
    bar.set_label(label, fontsize=8)
    bar.ax.xaxis.set_major_locator(MaxNLocator(4))
    bar.ax.tick_params(labelsize=7)


def _norm(values: np.ndarray):
    """Sequential from 0 for non-negative values, diverging around 0 otherwise."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    low, high = float(np.min(values)), float(np.max(values))
    if low >= 0:
        return Normalize(0.0, high if high > 0 else 1.0), SHARE_CMAP
    return TwoSlopeNorm(0.0, low, high if high > 0 else -low), SIGNED_CMAP


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _grey(image: np.ndarray) -> np.ndarray:
    """The image in grey (ITU-R 601 luma) at half resolution: context for a map of 7 x 7 cells, and
    a figure a third smaller than with every photo pixel."""
    luma = image @ np.array([0.299, 0.587, 0.114])
    h, w = (luma.shape[0] // 2) * 2, (luma.shape[1] // 2) * 2
    return luma[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) if h and w else luma


def _overlay(fig, ax, image: np.ndarray, values: np.ndarray, label: str, norm=None, cmap: str | None = None) -> None:
    """`values` (one per cell) over the image, with a colour bar labelled `label`."""
    if norm is None:
        norm, cmap = _norm(values)
    h, w = image.shape[:2]
    ax.imshow(_grey(image), cmap="gray", vmin=0, vmax=255, extent=(0, w, h, 0))  # grey: every colour is the map's
    ax.imshow(values, extent=(0, w, h, 0), cmap=cmap, norm=norm, alpha=OVERLAY_ALPHA, interpolation="nearest")
    _bare(ax)
    if label:
        _colour_bar(fig, ax, norm, cmap, label)


def _image_panel(ax, im: ImageExplanation, label: str = "") -> None:
    h, w = im.pixels.shape[:2]
    ax.imshow(im.pixels)
    _bare(ax)
    lines = [f"{label}{line_name(os.path.basename(im.path))}", f"as the model saw it: {w}×{h},",
             f"{im.fmap_shape[2]}×{im.fmap_shape[1]} cells of {im.fmap_shape[0]} channels"]
    ax.set_title("\n".join(lines), fontsize=8, parse_math=False)  # a name is text: $...$ in it is no formula


def _rmac_outline(ax, im: ImageExplanation, key: str) -> None:
    """The heaviest region below the largest scale outlined (the whole map, when it is a region, is
    usually heaviest and would say nothing), its weight in the title."""
    from matplotlib.patches import Rectangle

    m = im.maps[key]
    h, w = im.pixels.shape[:2]
    ch, cw = h / m.values.shape[0], w / m.values.shape[1]
    whole = max(r.side for r in m.regions)
    top = max([r for r in m.regions if r.side < whole] or m.regions, key=lambda r: r.weight)
    ax.add_patch(Rectangle((top.left * cw + 1.5, top.top * ch + 1.5), top.side * cw - 3, top.side * ch - 3,
                           fill=False, linewidth=2, edgecolor="white", linestyle="--"))
    ax.set_title(f"{key}: {len(m.regions)} regions\ndashed: heaviest small one ({top.weight:.3f})", fontsize=9)


def _classes_panel(ax, im: ImageExplanation) -> None:
    ax.set_axis_off()
    lines = ["the head on the avg vector:"] + [f"{p:.2f}  {name} ({index})" for index, name, p in im.top]
    lines += ["", "CAM = w_class · f(cell),", "bias left out: the mean", "over the cells is the logit", "minus the bias"]
    ax.text(0.0, 0.95, "\n".join(lines), fontsize=8, va="top", ha="left", transform=ax.transAxes)


def draw_images(images: list[ImageExplanation], backbone: str):
    """Per image: the input and one panel per pooling (what it keeps); below, when the backbone has a
    trained head, its top classes and their class activation maps."""
    keys = list(images[0].maps)
    cams = max(len(im.top) if im.cams is not None else 0 for im in images)
    block = 2 if cams else 1
    fig, axes = _new_figure(block * len(images), 1 + max(len(keys), cams))
    for n, im in enumerate(images):
        row = axes[block * n]
        _image_panel(row[0], im)
        for ax, key in zip(row[1:], keys):
            m = im.maps[key]
            _overlay(fig, ax, im.pixels, m.values, m.meaning)
            if m.regions:
                _rmac_outline(ax, im, key)
            else:
                ax.set_title(key, fontsize=9)
        for ax in row[1 + len(keys):]:
            ax.set_axis_off()
        if not cams:
            continue
        below = axes[block * n + 1]
        _classes_panel(below[0], im)
        for rank, ax in enumerate(below[1:]):
            if im.cams is None or rank >= len(im.top):
                ax.set_axis_off()
                continue
            index, name, prob = im.top[rank]
            _overlay(fig, ax, im.pixels, im.cams[rank], "w·f(cell)")
            ax.set_title(f"CAM {rank + 1}: {name}\n(class {index}, p {prob:.2f})", fontsize=9)
    fig.suptitle(f"gpl explain: what each pooling keeps ({backbone}; each square is one feature-map cell)",
                 fontsize=10)
    return fig


def draw_pair(a: ImageExplanation, b: ImageExplanation, terms: list[PairTerm], backbone: str):
    """Two rows (A, B): the input, then per pooling the cosine split over that image's cells."""
    fig, axes = _new_figure(2, 1 + len(terms))
    for row, im, label in ((axes[0], a, "A: "), (axes[1], b, "B: ")):
        _image_panel(row[0], im, label)
        if im.top:
            row[0].set_title(row[0].get_title() + f"\nhead: {im.top[0][1]} ({im.top[0][2]:.2f})", fontsize=8,
                             parse_math=False)
    for column, t in enumerate(terms, start=1):
        norm, cmap = _norm(np.concatenate([t.map_a.ravel(), t.map_b.ravel()]))  # one scale for A and B
        _overlay(fig, axes[0][column], a.pixels, t.map_a, "", norm, cmap)
        _overlay(fig, axes[1][column], b.pixels, t.map_b, "cell's part of the cosine", norm, cmap)
        axes[0][column].set_title(f"{t.key}: cos {t.cosine:.3f}\nsplit over A's cells", fontsize=9)
        axes[1][column].set_title("split over B's cells", fontsize=9)
    ops = [_PAIR_RULES.get(t.key.partition(":")[0]) for t in terms]
    rules = "; ".join(dict.fromkeys(r for r in ops if r))
    fig.suptitle(f"gpl explain: where the cosine similarity of A and B comes from ({backbone})", fontsize=10)
    fig.supxlabel(f"Each image's cells sum exactly to the cosine. Terms placed: {rules}.", fontsize=8, wrap=True)
    return fig
