"""Figures of notebook 04 (the equivalence matrix): errors against the float64 reference as heatmaps.

Pure functions: plain data in, a Figure out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from .figure import _np, new_figure
from .palette import (
    ERROR_FLOOR,
)


def _annotate_cells(ax, values: np.ndarray, texts: Sequence[Sequence[str]], rgba: np.ndarray, fontsize: float) -> None:
    """Write ``texts[i][j]`` in cell (i, j), black or white by the cell colour's lightness."""
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            r, g, b = rgba[i, j, :3]
            light = 0.299 * r + 0.587 * g + 0.114 * b > 0.55
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=fontsize,
                    color="#222222" if light else "white")


def plot_error_matrix(
    errors: ArrayLike,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    ratios: ArrayLike | None = None,
    ratio_labels: Sequence[str] | None = None,
    groups: Sequence[int] = (),
    title: str = "Error against the float64 reference",
    ratio_title: str = "the 2× rule: err / (2·err_naive + atol)",
    digits: int = 1,
    note: str | None = None,
) -> Figure:
    """Heatmaps of an error matrix: one row per implementation, one column per case.

    Left: ``log10`` of ``errors`` (rows × columns, max abs errors against the
    float64 reference; exact zeros are drawn at ``ERROR_FLOOR``), each cell
    annotated with its error to ``digits`` significant digits. Right, if ``ratios`` (rows × m, columns
    ``ratio_labels``) is given: each cell's error over the error it is allowed
    (e.g. flash-attention's 2× rule), green up to 1 and red above, cells above
    1 outlined. ``groups`` are the row indices where a new group of rows starts;
    a line is drawn above each. ``note``: a line of text under the heatmaps.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    err = _np(errors)
    rows, cols = err.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"errors is {rows} × {cols} but got {len(row_labels)} row and {len(col_labels)} "
                         "column labels")
    rat = None if ratios is None else _np(ratios)
    if rat is not None:
        if rat.shape[0] != rows or ratio_labels is None or len(ratio_labels) != rat.shape[1]:
            raise ValueError(f"ratios needs {rows} rows and one label per column, got shape {rat.shape} "
                             f"and {None if ratio_labels is None else len(ratio_labels)} labels")
    n_right = 0 if rat is None else rat.shape[1]
    cell_w, cell_h = 0.62, 0.24
    fig, axes = new_figure(1, 2 if rat is not None else 1,
                           figsize=(3.4 + cell_w * (cols + n_right) + (1.4 if rat is not None else 0.7),
                                    cell_h * rows + 2.0),
                           gridspec_kw={"width_ratios": [cols, n_right]} if rat is not None else None)
    fontsize = 6.5 if rows > 20 else 8

    ax = axes[0, 0]
    log_err = np.log10(np.maximum(err, ERROR_FLOOR))
    lo, hi = math.floor(log_err.min()), math.ceil(log_err.max())
    image = ax.imshow(log_err, cmap="viridis", vmin=lo, vmax=max(hi, lo + 1), aspect="auto", interpolation="nearest")
    texts = [["0" if e == 0 else f"{e:.{digits - 1}e}".replace("e-0", "e-") for e in row] for row in err]
    _annotate_cells(ax, err, texts, image.to_rgba(log_err), fontsize)
    fig.colorbar(image, ax=ax, label="log10 max |error|", fraction=0.05, pad=0.02, aspect=40)
    ax.set_title(title, fontsize=10)

    panels = [(ax, col_labels)]
    if rat is not None:
        ax_r = axes[0, 1]
        norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(np.nanmax(rat))))
        image_r = ax_r.imshow(rat, cmap="RdYlGn_r", norm=norm, aspect="auto", interpolation="nearest")
        _annotate_cells(ax_r, rat, [[f"{x:.2f}" for x in row] for row in rat], image_r.to_rgba(rat), fontsize)
        for i, j in zip(*np.nonzero(rat > 1)):
            ax_r.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#b00000", lw=2.0))
        fig.colorbar(image_r, ax=ax_r, label="ratio (≤ 1 passes)", fraction=0.12, pad=0.04, aspect=40)
        ax_r.set_title(ratio_title, fontsize=10)
        panels.append((ax_r, ratio_labels))

    for k, (a, labels) in enumerate(panels):
        a.set_xticks(range(len(labels)), labels, fontsize=8)
        a.xaxis.tick_top()
        a.tick_params(axis="x", length=0)
        a.set_yticks(range(rows), row_labels if k == 0 else [""] * rows, fontsize=fontsize + 1)
        for g in groups:
            if 0 < g < rows:
                a.axhline(g - 0.5, color="white", lw=2.5)
    if note:
        fig.supxlabel(note, fontsize=8, color="#444444")
    return fig


def plot_rule_ratios(
    ratios: ArrayLike,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str = "the 2× rule: err / (2·err_naive + atol)",
    groups: Sequence[int] = (),
    note: str | None = None,
) -> Figure:
    """One heatmap of rule ratios (rows × columns): green up to 1 (passes), red above (fails, outlined).

    A ratio of ``inf`` (a NaN, or ±inf where the reference is finite) is drawn as the reddest cell and
    written "∞". ``groups``: row indices where a new group starts (a white line above each);
    ``note``: a line of text under the heatmap.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    rat = _np(ratios).astype(float)
    rows, cols = rat.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"ratios is {rows} × {cols} but got {len(row_labels)} row and {len(col_labels)} "
                         "column labels")
    top = 4.0
    shown = np.minimum(rat, top)
    fig, axes = new_figure(1, 1, figsize=(3.4 + 0.9 * cols, 0.36 * rows + 2.2))
    ax = axes[0, 0]
    image = ax.imshow(shown, cmap="RdYlGn_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top), aspect="auto",
                      interpolation="nearest")
    texts = [["∞" if not np.isfinite(x) else f"{x:.0f}" if x >= 100 else f"{x:.2f}" for x in row] for row in rat]
    _annotate_cells(ax, rat, texts, image.to_rgba(shown), 8)
    for i, j in zip(*np.nonzero(rat > 1)):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#b00000", lw=2.0))
    fig.colorbar(image, ax=ax, label=f"ratio (≤ 1 passes; ≥ {top:g} drawn as {top:g})", fraction=0.05, pad=0.02)
    ax.set_xticks(range(cols), col_labels, fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(axis="x", length=0)
    ax.set_yticks(range(rows), row_labels, fontsize=9)
    for g in groups:
        if 0 < g < rows:
            ax.axhline(g - 0.5, color="white", lw=3)
    ax.set_title(title, fontsize=10)
    if note:
        fig.supxlabel(note, fontsize=8, color="#444444")
    return fig
