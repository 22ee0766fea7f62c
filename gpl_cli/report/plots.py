"""The `gpl compare --plot` figure: cosine distributions per pooling and mAP with its interval.

matplotlib is imported here only, and only its object API is used (a `Figure` rendered by the
Agg canvas): no pyplot, no GUI backend, nothing global touched.
"""

from __future__ import annotations

import numpy as np

from gpl_cli.analysis.metrics import HIST_BINS
from gpl_cli.errors import GplError


def _density(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / (total * np.diff(HIST_BINS)) if total else counts.astype(float)


def _occupied_range(counts: np.ndarray) -> tuple[float, float]:
    """The cosine range the histogram actually covers, one bin of margin each side."""
    used = np.flatnonzero(counts)
    if not len(used):
        return -1.0, 1.0
    return float(HIST_BINS[max(0, used[0] - 1)]), float(HIST_BINS[min(len(HIST_BINS) - 1, used[-1] + 2)])


def plot_report(report, output) -> None:
    """Draw `report` (a compare.Report) into `output` (a FIGURE Output: .png, .pdf or .svg), written whole
    or not at all; its location was checked before the comparison ran."""
    save_figure(draw_report(report), output, dpi=100)


def draw_report(report):
    """The cosine distributions per pooling and, with labels, the mAP bars, as a matplotlib Figure."""
    from matplotlib.figure import Figure

    poolings = report.poolings
    panels = len(poolings) + (1 if report.labelled else 0)
    fig = Figure(figsize=(3.6 * panels, 3.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    centres = (HIST_BINS[:-1] + HIST_BINS[1:]) / 2
    for ax, p in zip(axes, poolings):
        ax.set_xlim(*_occupied_range(p.hist_other + (0 if p.hist_same is None else p.hist_same)))
        if p.hist_same is not None:
            ax.plot(centres, _density(p.hist_same), label="same class")
            ax.plot(centres, _density(p.hist_other), label="different class")
            ax.legend(fontsize="small")
        else:
            ax.plot(centres, _density(p.hist_other), label="all pairs")
        ax.set_title(p.key)
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
    if report.labelled:
        ax = axes[-1]
        values = np.array([100 * p.map for p in poolings])
        low = np.array([100 * p.map_ci[0] for p in poolings])
        high = np.array([100 * p.map_ci[1] for p in poolings])
        ax.bar([p.key for p in poolings], values, yerr=[values - low, high - values], capsize=4, color="tab:blue")
        ax.axhline(100 * report.chance_map, color="grey", linestyle="--", label="chance")
        ax.set_ylabel("mAP % (95 % CI)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize="small")
        ax.set_title("retrieval mAP")
    fig.suptitle(f"gpl compare: {report.images} images, {report.source}", fontsize="medium")
    return fig


def save_figure(fig, output, dpi: int) -> None:
    """A matplotlib figure into `output` (a FIGURE Output), in the format its extension names."""
    try:
        with output.open("wb") as f:
            fig.savefig(f, dpi=dpi, format=output.format)
    except ValueError as exc:
        raise GplError(f"cannot write figure {output.path}: {exc}") from None
