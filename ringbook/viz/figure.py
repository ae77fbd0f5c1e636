"""The figure helpers every plotting module shares."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (8.0, 4.0),
               **subplot_kw: Any) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure and its axes array, not held by pyplot."""
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False, **subplot_kw)
    plt.close(fig)
    return fig, axes


def legend_below(fig: Figure, ax: Any, *, title: str = "") -> Figure:
    """One legend for every panel, under them (from ``ax``'s labelled artists), and the figure's title."""
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=max(len(names), 1), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _block_edges(n: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, n)) for start in range(0, n, block_size)]
