"""Figures of notebook 01 (the online softmax): overflow, the running max and normaliser, block weights, errors.

Pure functions: plain data in, a Figure out; nothing is shown or saved here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike

from .figure import _block_edges, _dtype_name, _np, new_figure
from .palette import (
    BLOCK_CMAP,
    COLORS,
    DTYPE_COLORS,
    ERROR_FLOOR,
)


def plot_exp_overflow(
    scores: ArrayLike | None = None,
    *,
    dtypes: Sequence[torch.dtype] = (torch.float16, torch.float32),
    show_shifted: bool = False,
    x_range: tuple[float, float] | None = None,
) -> Figure:
    """``e^x`` against the largest finite number of each dtype.

    ``e^x`` overflows to inf once ``x > log(finfo(dtype).max)``; those regions
    are shaded. ``scores`` (a 1-D row of logits), if given, are marked on the
    curve: red where ``e^s`` overflows the narrowest dtype. With
    ``show_shifted`` the safe-softmax logits ``s - max(s)`` are marked too;
    all of them are ≤ 0, so every ``e^{s - m}`` lies in (0, 1].
    """
    dtypes = sorted(dtypes, key=lambda t: torch.finfo(t).max)
    limits = {t: math.log(torch.finfo(t).max) for t in dtypes}
    s = None if scores is None else _np(scores).ravel()
    if x_range is None:
        lows = [-25.0] + ([] if s is None else [float(s.min())])
        lows += [float(s.min() - s.max())] if show_shifted and s is not None else []
        highs = [max(limits.values())] + ([] if s is None else [float(s.max())])
        x_range = (min(lows) - 10.0, max(highs) + 25.0)
    lo, hi = x_range
    to_y = math.log10(math.e)

    fig, axes = new_figure(figsize=(9.0, 4.4))
    ax = axes[0, 0]
    x = np.linspace(lo, hi, 600)
    ax.plot(x, x * to_y, color=COLORS["exact"], lw=2, label=r"$\log_{10} e^{x}$")
    for t in dtypes:
        lim = limits[t]
        color = DTYPE_COLORS.get(t, "#555555")
        ax.axhline(lim * to_y, color=color, ls="--", lw=1.2)
        ax.axvspan(lim, hi, color=color, alpha=0.10, lw=0)
        ax.text(lo + 0.02 * (hi - lo), lim * to_y, f"largest {_dtype_name(t)} ≈ {torch.finfo(t).max:.3g}",
                color=color, fontsize=9, va="bottom")
        ax.text(lim, 0.02, f" {_dtype_name(t)}: $e^x$ = inf for $x$ > {lim:.2f}", color=color, fontsize=9,
                rotation=90, va="bottom", ha="left", transform=ax.get_xaxis_transform())
    if s is not None:
        narrow = limits[dtypes[0]]
        over = s > narrow
        ax.scatter(s[~over], s[~over] * to_y, s=28, color=COLORS["score"], zorder=3,
                   label=f"logits $s$ (finite in {_dtype_name(dtypes[0])})")
        if over.any():
            ax.scatter(s[over], s[over] * to_y, s=28, color=COLORS["overflow"], marker="x",
                       zorder=3, label=f"logits $s$ whose $e^s$ is inf in {_dtype_name(dtypes[0])}")
        if show_shifted:
            shifted = s - s.max()
            ax.scatter(shifted, shifted * to_y, s=28, color=COLORS["safe"], marker="D", zorder=3,
                       label=r"safe: $s - \max s \leq 0$")
            ax.axvline(0.0, color=COLORS["safe"], lw=0.8, ls=":")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("logit $x$")
    ax.set_ylabel(r"$\log_{10} e^{x}$")
    title = "Where $e^x$ overflows" + (": subtracting the max keeps every exponent ≤ 0" if show_shifted else "")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", fontsize=9, framealpha=0.95)
    return fig


def plot_online_softmax(
    scores: ArrayLike,
    block_size: int,
    m: ArrayLike,
    l: ArrayLike,
    outs: ArrayLike | None = None,
    exact_out: ArrayLike | None = None,
    *,
    blocks_seen: int | None = None,
) -> Figure:
    """The online softmax of one query row, after ``blocks_seen`` key blocks.

    Args:
        scores: the row of logits ``s_j`` (length n).
        block_size: keys per block; block k covers ``[k·block_size, (k+1)·block_size)``.
        m, l: running max and normaliser after each block (length K), e.g.
            from :func:`ringbook.online_softmax_trace`.
        outs: optional ``(K, d)`` partial outputs after each block, and
            ``exact_out`` the ``(d,)`` output over all keys. With them the
            figure gets a second row: the output components and the error.
        blocks_seen: how many blocks the query has seen (default all).

    Panels: (a) the scores and the running max m; (b) the normaliser l, and
    l·e^{m − m_K} (the same sum measured against the final max), which grows
    monotonically to the final normaliser; (c) partial vs exact output; (d)
    the error ``max_d |O_k − O|`` per block beside the softmax mass not seen
    yet, ``1 − ℓ_k e^{m_k − m_K} / ℓ_K``: the partial output is off only by
    as much as there is mass left to see.
    """
    s = _np(scores).ravel()
    m, l = _np(m).ravel(), _np(l).ravel()
    edges = _block_edges(len(s), block_size)
    n_blocks = len(edges)
    if len(m) != n_blocks or len(l) != n_blocks:
        raise ValueError(f"m and l need one value per block ({n_blocks} blocks of {block_size}), got {len(m)} and {len(l)}")
    k = n_blocks if blocks_seen is None else int(blocks_seen)
    if not 1 <= k <= n_blocks:
        raise ValueError(f"blocks_seen must be between 1 and {n_blocks}, got {blocks_seen}")
    with_out = outs is not None
    fig, axes = new_figure(2 if with_out else 1, 2, figsize=(11.0, 7.4 if with_out else 3.9))
    ax_s, ax_l = axes[0]
    blocks = np.arange(1, n_blocks + 1)
    seen = blocks <= k

    # (a) scores, shaded by block, and the running max as a step line
    seen_until = edges[k - 1][1]
    pos = np.arange(len(s))
    ax_s.axvspan(-0.5, seen_until - 0.5, color=COLORS["seen"], alpha=0.07, lw=0)
    for start, _ in edges[1:]:
        ax_s.axvline(start - 0.5, color="#999999", lw=0.6, ls=":")
    ax_s.scatter(pos[:seen_until], s[:seen_until], s=14, color=COLORS["score"], label="scores $s_j$ seen")
    ax_s.scatter(pos[seen_until:], s[seen_until:], s=14, color=COLORS["unseen"], label="not seen yet")
    step_x = [x for start, stop in edges[:k] for x in (start - 0.5, stop - 0.5)]
    step_y = [v for v in m[:k] for _ in range(2)]
    ax_s.plot(step_x, step_y, color=COLORS["max"], lw=2, label="running max $m$")
    ax_s.axhline(s.max(), color=COLORS["max"], lw=0.8, ls="--", alpha=0.6, label="final max")
    ax_s.set_xlim(-0.5, len(s) - 0.5)
    ax_s.set_xlabel("key position $j$")
    ax_s.set_ylabel("score $s_j$")
    ax_s.set_title(f"(a) scores and running max, {k}/{n_blocks} blocks seen")
    ax_s.legend(loc="lower left", fontsize=8, ncols=2)

    # (b) the normaliser
    l_final = l * np.exp(m - m[-1])
    ax_l.plot(blocks[seen], l[seen], "o-", color=COLORS["norm"], label=r"$\ell$ (relative to the running max $m$)")
    ax_l.plot(blocks[seen], l_final[seen], "s--", color=COLORS["partial"], ms=5,
              label=r"$\ell\, e^{m - m_K}$ (relative to the final max)")
    ax_l.plot(blocks[~seen], l[~seen], "o", color=COLORS["unseen"], mfc="none")
    ax_l.axhline(l[-1], color=COLORS["exact"], lw=1, ls=":", label=r"final $\ell_K = \sum_j e^{s_j - m_K}$")
    jumps = np.array([i for i in range(1, k) if m[i] > m[i - 1]], dtype=int)
    if jumps.size:
        ax_l.scatter(blocks[jumps], l[jumps], s=160, facecolors="none", edgecolors=COLORS["max"], lw=1.5, zorder=3,
                     label=r"$m$ grew: $\ell \leftarrow \ell\, e^{m - m'} + \sum e^{s_j - m'}$")
    ax_l.set_xlim(0.5, n_blocks + 0.5)
    ax_l.set_ylim(0, max(l.max(), l_final.max()) * 1.6)  # room for the legend
    ax_l.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_l.set_xlabel("key blocks seen")
    ax_l.set_ylabel(r"normaliser $\ell$")
    ax_l.set_title(r"(b) normaliser: rescaled whenever $m$ grows")
    ax_l.legend(loc="upper left", fontsize=8, framealpha=0.95)
    ax_l.grid(alpha=0.3)

    if with_out:
        if exact_out is None:
            raise ValueError("pass exact_out together with outs")
        outs, exact = _np(outs), _np(exact_out).ravel()
        if outs.shape != (n_blocks, exact.size):
            raise ValueError(f"outs must have shape (blocks, d) = {(n_blocks, exact.size)}, got {outs.shape}")
        ax_o, ax_e = axes[1]
        d = np.arange(exact.size)
        width = 0.4
        ax_o.bar(d - width / 2, exact, width, color=COLORS["exact"], alpha=0.85, label="exact $O$ (all keys)")
        ax_o.bar(d + width / 2, outs[k - 1], width, color=COLORS["partial"], label=f"partial $O$ after {k} blocks")
        ax_o.axhline(0, color="#444444", lw=0.6)
        ax_o.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_o.set_xlabel("output component (head dim $d$)")
        ax_o.set_ylabel("value")
        ax_o.set_title("(c) partial output vs the exact one")
        ax_o.legend(loc="best", fontsize=8)

        err = np.abs(outs - exact).max(axis=1)
        unseen = 1.0 - l_final / l[-1]  # softmax mass of the keys not seen yet
        ax_e.plot(blocks[seen], err[seen], "o-", color=COLORS["partial"], label=r"error $\max_d |O_k - O|$")
        ax_e.plot(blocks[seen], unseen[seen], "s--", color=COLORS["norm"], ms=5,
                  label=r"mass not seen yet $1 - \ell_k e^{m_k - m_K} / \ell_K$")
        ax_e.plot(blocks[~seen], err[~seen], "o", color=COLORS["unseen"], mfc="none")
        ax_e.plot(blocks[~seen], unseen[~seen], "s", color=COLORS["unseen"], mfc="none", ms=5)
        ax_e.axhline(0, color="#444444", lw=0.6)
        ax_e.set_xlim(0.5, n_blocks + 0.5)
        ax_e.set_ylim(-0.03 * max(err.max(), 1.0), 1.08 * max(err.max(), 1.0))
        ax_e.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_e.set_xlabel("key blocks seen")
        ax_e.set_ylabel("error / mass")
        ax_e.set_title("(d) the error vanishes with the unseen mass")
        ax_e.legend(loc="upper right", fontsize=8, framealpha=0.95)
        ax_e.grid(alpha=0.3)
    return fig


def plot_block_weights(lse_blocks: ArrayLike, *, labels: Sequence[str] | None = None, max_queries: int = 24) -> Figure:
    """Each partial's share of the merged output, per query.

    ``lse_blocks`` is ``(w, n)``: the lse of w disjoint key blocks for n
    queries. Merging them (equation (M)) weighs block J's output by
    ``e^{lse_J − lse}`` with ``lse = log Σ_J e^{lse_J}``; the weights are
    positive and sum to 1, so the merged output is a convex combination of the
    partial outputs. Drawn as stacked bars for the first ``max_queries`` queries.
    """
    lse_blocks = torch.as_tensor(_np(lse_blocks))
    if lse_blocks.dim() != 2:
        raise ValueError(f"lse_blocks must be (blocks, queries), got shape {tuple(lse_blocks.shape)}")
    lse_blocks = lse_blocks[:, :max_queries]
    w, n = lse_blocks.shape
    weights = torch.exp(lse_blocks - torch.logsumexp(lse_blocks, dim=0)).nan_to_num(0.0).numpy()
    labels = list(labels) if labels is not None else [f"block {i}" for i in range(w)]
    cmap = plt.get_cmap(BLOCK_CMAP)

    fig, axes = new_figure(figsize=(9.0, 3.8))
    ax = axes[0, 0]
    bottom = np.zeros(n)
    for i in range(w):
        ax.bar(np.arange(n), weights[i], bottom=bottom, color=cmap(i % 10), width=0.8, label=labels[i])
        bottom += weights[i]
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("query position $i$")
    ax.set_ylabel(r"weight $e^{\mathrm{lse}_J - \mathrm{lse}}$")
    ax.set_title("Merging partials: each key block's share of the output (shares sum to 1)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    return fig


def plot_error_bars(
    errors: Mapping[str, float],
    *,
    title: str = "Error against the float64 reference",
    tolerance: float | None = None,
    xlabel: str = "max abs error",
) -> Figure:
    """Horizontal bars of one error per label, on a log axis.

    Exact zeros are drawn at ``ERROR_FLOOR`` and marked "exact"; ``tolerance``,
    if given, is drawn as a vertical line (e.g. the bound a check asserts).
    """
    names = list(errors)
    vals = np.array([float(errors[k]) for k in names])
    shown = np.maximum(vals, ERROR_FLOOR)
    fig, axes = new_figure(figsize=(8.0, 0.45 * len(names) + 1.4))
    ax = axes[0, 0]
    y = np.arange(len(names))
    ax.barh(y, shown, color=COLORS["score"], height=0.6, log=True)
    for yi, v, sv in zip(y, vals, shown):
        ax.annotate("exact" if v == 0 else f"{v:.1e}", xy=(sv, yi), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.axvline(np.finfo(np.float64).eps, color="#888888", lw=0.8, ls="--", label="float64 eps")
    if tolerance is not None:
        ax.axvline(tolerance, color=COLORS["max"], lw=1.2, label=f"tolerance {tolerance:g}")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    lo = ERROR_FLOOR / 10
    hi = max(shown.max(), tolerance or 0.0, 1e-15) * 1e3
    ax.set_xlim(lo, hi)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x", which="major")
    ax.legend(loc="lower right", fontsize=8)
    return fig
