"""Pure plotting functions: ``plot_x(...) -> matplotlib.figure.Figure``.

Each function takes plain data (tensors, arrays or numbers computed with
``ringbook``), draws one figure and returns it; nothing is computed here that
the library already computes, and nothing is shown or saved. Notebooks display
the returned figure, :mod:`ringbook.widgets` redraws it from a control, and a
script can ``fig.savefig(...)`` the same picture.

Figures are created through pyplot (so Jupyter's inline backend knows how to
render them) and closed at once, so pyplot keeps no reference to them: a
notebook cell shows a figure only when it displays it, and redrawing in a
widget does not pile figures up in memory.

``import ringbook`` does not import this module; matplotlib is needed only here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# One palette for every notebook, so a colour means the same thing throughout.
COLORS = {
    "score": "#4c72b0",
    "seen": "#4c72b0",
    "unseen": "#c7c7c7",
    "max": "#c44e52",
    "norm": "#55a868",
    "exact": "#222222",
    "partial": "#dd8452",
    "safe": "#55a868",
    "overflow": "#c44e52",
}
DTYPE_COLORS = {
    torch.float16: "#8172b3",
    torch.bfloat16: "#937860",
    torch.float32: "#da8bc3",
    torch.float64: "#8c8c8c",
}
BLOCK_CMAP = "tab10"
ERROR_FLOOR = 1e-18  # errors of exactly 0 are drawn here (log axes)


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize=(8.0, 4.0), **subplot_kw) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure and its axes array, not held by pyplot."""
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False, **subplot_kw)
    plt.close(fig)
    return fig, axes


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _block_edges(n: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, n)) for start in range(0, n, block_size)]


# ---------------------------------------------------------------------------
# notebook 01: the online softmax
# ---------------------------------------------------------------------------


def plot_exp_overflow(
    scores=None,
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
        lows = [-25.0] + ([] if s is None else [float(s.min())]) + ([float(s.min() - s.max())] if show_shifted and s is not None else [])
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
    scores,
    block_size: int,
    m,
    l,
    outs=None,
    exact_out=None,
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


def plot_block_weights(lse_blocks, *, labels: Sequence[str] | None = None, max_queries: int = 24) -> Figure:
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


# ---------------------------------------------------------------------------
# notebook 02: ring attention
# ---------------------------------------------------------------------------

RANK_CMAP = "tab10"  # rank r is drawn in colour r everywhere in notebook 02


def _rank_color(r: int):
    return plt.get_cmap(RANK_CMAP)(r % 10)


def _tint(color, amount: float):
    """``color`` mixed with white: amount 0 keeps it, 1 gives white."""
    rgb = np.asarray(color[:3], dtype=float)
    return tuple(rgb + (1.0 - rgb) * amount) + (1.0,)


def _runs(pos: np.ndarray) -> list[tuple[int, int]]:
    """Sorted positions cut into runs of consecutive integers, as (start, stop)."""
    pos = np.sort(np.asarray(pos))
    cuts = np.flatnonzero(np.diff(pos) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(pos, cuts)]


def ring_step_cells(n: int, world_size: int, *, layout: str, causal: bool):
    """Per score cell ``(i, j)``: the ring step that computes it and how (the data of :func:`plot_ring_step`).

    Returns ``(owner, origin, step, state)``: ``owner[i]`` the rank holding
    query i, ``origin[j]`` the rank whose K/V shard holds key j at step 0,
    ``step[i, j]`` the step at which rank ``owner[i]`` meets key j, and
    ``state[i, j]`` 0 = computed and needed, 1 = computed inside a tile but
    masked (j > i), 2 = in a block the schedule skips (never computed).
    Everything is read from :func:`ringbook.schedule.ring_schedule`.
    """
    from .schedule import layout_positions, ring_schedule

    pos = layout_positions(n, world_size, layout).numpy()
    owner, origin = np.empty(n, dtype=int), np.empty(n, dtype=int)
    for r in range(world_size):
        owner[pos[r]] = r
        origin[pos[r]] = r
    step = (owner[:, None] - origin[None, :]) % world_size
    state = np.full((n, n), -1, dtype=int)
    for row in ring_schedule(n, world_size, layout=layout, causal=causal):
        for s in row:
            for blocks, skipped in ((s.blocks, False), (s.skipped, True)):
                for blk in blocks:
                    qi = pos[s.rank][blk.q[0]:blk.q[1]]
                    kj = pos[s.kv_rank][blk.kv[0]:blk.kv[1]]
                    if skipped:
                        state[np.ix_(qi, kj)] = 2
                    else:
                        state[np.ix_(qi, kj)] = np.where(kj[None, :] > qi[:, None], 1, 0) if causal else 0
    if (state < 0).any():
        raise AssertionError("the schedule left score cells unaccounted for")
    return owner, origin, step, state


def plot_ring_step(n: int, world_size: int, step: int, *, layout: str = "zigzag", causal: bool = True) -> Figure:
    """The ``n × n`` score matrix at ring step ``step``, coloured by the rank that computes each cell.

    Left: query i (rows) against key j (columns). Cells computed at this step
    are drawn in the colour of the rank holding query i; cells of other steps
    are pale; a × marks a cell computed inside a tile but masked away (key
    after query, the waste of a masked tile); hatched cells belong to blocks
    the causal schedule skips (never computed). The strip on the left says
    which rank holds each query, the strip below which rank holds each key's
    K/V shard at this step (labelled with the shard's home rank). Right: the
    ring, each rank with the K/V shard it holds and the scores it computes at
    this step; arrows show the shards in flight to the next rank.
    """
    from matplotlib.patches import Circle, FancyArrowPatch, Patch, Rectangle

    from .schedule import layout_positions, ring_schedule

    w = world_size
    if not 0 <= step < w:
        raise ValueError(f"step must be in 0..{w - 1} for a ring of {w} ranks, got {step}")
    owner, origin, step_of, state = ring_step_cells(n, w, layout=layout, causal=causal)
    holder = (origin + step) % w  # who holds key j's K/V at this step
    sched = ring_schedule(n, w, layout=layout, causal=causal)[step]

    img = np.ones((n, n, 4))
    for r in range(w):
        rows = owner == r
        base = _rank_color(r)
        now = rows[:, None] & (step_of == step)
        img[now & (state == 0)] = base
        img[now & (state == 1)] = _tint(base, 0.55)
        img[rows[:, None] & (step_of != step) & (state != 2)] = _tint(base, 0.85)
    img[state == 2] = (0.96, 0.96, 0.96, 1.0)

    fig, axes = new_figure(1, 2, figsize=(11.0, 6.4), gridspec_kw={"width_ratios": [1.4, 1.0]})
    ax, ax_ring = axes[0]
    gap, width = 0.6, max(1.2, n / 22)
    ax.imshow(img, extent=(-0.5, n - 0.5, n - 0.5, -0.5), interpolation="nearest")
    # hatched: blocks the schedule skips
    pos = layout_positions(n, w, layout).numpy()
    for t_row in ring_schedule(n, w, layout=layout, causal=causal):
        for s in t_row:
            for blk in s.skipped:
                for qa, qb in _runs(pos[s.rank][blk.q[0]:blk.q[1]]):
                    for ka, kb in _runs(pos[s.kv_rank][blk.kv[0]:blk.kv[1]]):
                        ax.add_patch(Rectangle((ka - 0.5, qa - 0.5), kb - ka, qb - qa, fill=False, hatch="///",
                                               edgecolor="#b0b0b0", lw=0))
    # ×: computed at this step but masked
    qi, kj = np.nonzero((step_of == step) & (state == 1))
    if qi.size:
        ax.scatter(kj, qi, marker="x", s=(160 / n) ** 2 * 4, lw=0.8, color="#555555", zorder=3)
    # strips: query owner (left) and K/V holder at this step (below)
    owner_rgb = np.array([_rank_color(r) for r in owner])
    holder_rgb = np.array([_rank_color(r) for r in holder])
    ax.imshow(owner_rgb[:, None, :], extent=(-0.5 - gap - width, -0.5 - gap, n - 0.5, -0.5), interpolation="nearest")
    ax.imshow(holder_rgb[None, :, :], extent=(-0.5, n - 0.5, n - 0.5 + gap + width, n - 0.5 + gap),
              interpolation="nearest")
    if layout != "striped":  # label the K/V pieces with their home shard
        start = 0
        for j in range(1, n + 1):
            if j == n or origin[j] != origin[start]:
                ax.text((start + j - 1) / 2, n - 0.5 + gap + width / 2, f"K/V {origin[start]}", ha="center",
                        va="center", fontsize=7, color="white", fontweight="bold")
                start = j
    ax.text(-0.5 - gap - width / 2, -1.0, "Q", ha="center", va="bottom", fontsize=9)
    ax.text(-0.5 - gap - width - 0.5, n - 0.5 + gap + width / 2, f"K/V held\nat step {step}", ha="right",
            va="center", fontsize=8)
    ax.set_xlim(-0.5 - gap - width - 0.2, n - 0.5 + 0.2)
    ax.set_ylim(n - 0.5 + gap + width + 0.2, -2.5)
    ax.set_aspect("equal")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.set_xlabel("key position $j$")
    ax.set_ylabel("query position $i$")
    mode = "causal" if causal else "no mask"
    ax.set_title(f"step {step} of {w} · layout {layout} · {mode} (n = {n}, w = {w})")
    handles = [Patch(color=_rank_color(r), label=f"rank {r} computes now") for r in range(w)]
    handles += [Patch(color=_tint(_rank_color(0), 0.85), label="computed at another step")]
    if causal:
        handles += [Patch(facecolor=_tint(_rank_color(0), 0.55), edgecolor="#555555", hatch="xx", lw=0,
                          label="computed, then masked ($j > i$)"),
                    Patch(facecolor=(0.96, 0.96, 0.96), edgecolor="#b0b0b0", hatch="///", lw=0,
                          label="skipped block: never computed")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=3, fontsize=8, frameon=False)

    # the ring
    ax_ring.set_aspect("equal")
    ax_ring.axis("off")
    radius, node = 1.0, 0.27 if w <= 6 else 0.18
    angles = np.pi / 2 - 2 * np.pi * np.arange(w) / w  # rank 0 on top, clockwise
    xy = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
    for r in range(w):
        s = sched[r]
        ax_ring.add_patch(Circle(xy[r], node, color=_rank_color(r), zorder=2))
        ax_ring.text(*xy[r], f"rank {r}", ha="center", va="center", fontsize=9, color="white", fontweight="bold",
                     zorder=3)
        out = xy[r] * (1 + (node + 0.32) / radius)
        ax_ring.text(*out, f"holds K/V {s.kv_rank}\n{s.work} scores", ha="center", va="center", fontsize=8,
                     bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": _rank_color(r)})
        if step < w - 1 and w > 1:
            nxt = (r + 1) % w
            ax_ring.add_patch(FancyArrowPatch(xy[r], xy[nxt], connectionstyle="arc3,rad=0.25",
                                              arrowstyle="-|>", mutation_scale=14, color="#444444", lw=1.3,
                                              shrinkA=node * 72 * 1.6, shrinkB=node * 72 * 1.6, zorder=1))
    lim = radius + node + 0.75
    ax_ring.set_xlim(-lim, lim)
    ax_ring.set_ylim(-lim - 0.45, lim)
    sent = "arrows: K/V shards in flight to rank r+1\nwhile this step computes" if step < w - 1 \
        else "last step: nothing left to send"
    ax_ring.text(0, -lim - 0.4, sent, ha="center", va="bottom", fontsize=9)
    ax_ring.set_title(f"the ring at step {step}", fontsize=10)
    return fig


def plot_causal_work(computed: Mapping[str, Sequence[float]], needed: Mapping[str, Sequence[float]], *,
                     critical: Mapping[str, float] | None = None) -> Figure:
    """Causal work per rank for each layout: scores computed (tile areas) against scores needed (j ≤ i).

    ``computed[layout]`` and ``needed[layout]`` hold one number per rank. The
    pale part of a bar is work done inside tiles and then masked away; the
    dashed line is a perfect balance, ``Σ needed / w``. With ``critical``
    (per layout: Σ over steps of the busiest rank's scores, the length of the
    ring when a step waits for its slowest rank) a last panel compares the
    layouts' critical paths.
    """
    layouts = list(computed)
    ncols = len(layouts) + (critical is not None)
    fig, axes = new_figure(1, ncols, figsize=(3.4 * ncols, 4.2))
    top = max(max(computed[k]) for k in layouts) * 1.22
    for ax, name in zip(axes[0], layouts):
        comp, need = np.asarray(computed[name], float), np.asarray(needed[name], float)
        ranks = np.arange(len(comp))
        colors = [_rank_color(r) for r in ranks]
        ax.bar(ranks, comp, color=[_tint(c, 0.6) for c in colors], edgecolor=colors, width=0.7,
               label="scores computed")
        ax.bar(ranks, need, color=colors, width=0.7, label="scores needed ($j \\leq i$)")
        ideal = need.sum() / len(need)
        ax.axhline(ideal, color=COLORS["exact"], ls="--", lw=1, label="perfect balance")
        ax.set_ylim(0, top)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank")
        ax.set_title(f"{name}\nbusiest / mean = {comp.max() / comp.mean():.2f}\n"
                     f"needed / computed = {need.sum() / comp.sum():.0%}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("scores per rank (whole ring)")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    if critical is not None:
        ax = axes[0, -1]
        names = list(critical)
        vals = np.array([critical[k] for k in names], float)
        ax.bar(np.arange(len(names)), vals, color=COLORS["score"], width=0.6)
        ideal = np.sum(needed[names[0]]) / len(needed[names[0]])  # the same total for every layout
        ax.axhline(ideal, color=COLORS["exact"], ls="--", lw=1, label="Σ needed / w")
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v / ideal:.2f}×", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_ylim(0, vals.max() * 1.2)
        ax.set_ylabel("scores on the critical path")
        ax.set_title("ring time: Σ over steps of\nthe busiest rank's scores\n(× the ideal)", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return fig


def plot_memory_per_rank(seq_lens: Sequence[int], bytes_per_rank: Mapping[int, Sequence[float]], *,
                         reference: Sequence[float] | None = None, reference_label: str = "",
                         terms: Mapping[str, float] | None = None, terms_label: str = "") -> Figure:
    """Memory per rank against sequence length, one line per ring size ``w`` (log-log).

    ``bytes_per_rank[w]`` has one value per ``seq_lens`` entry. ``reference``
    (e.g. the n × n score matrix of naive attention on one device) is drawn
    dashed. ``terms`` (name → bytes for one configuration, ``terms_label``)
    adds a second panel with the terms of the memory model.
    """
    n = np.asarray(seq_lens, float)
    fig, axes = new_figure(1, 2 if terms else 1, figsize=(12.0 if terms else 7.0, 4.3),
                           gridspec_kw={"width_ratios": [1.2, 1.0]} if terms else None)
    ax = axes[0, 0]
    for i, (w, values) in enumerate(sorted(bytes_per_rank.items())):
        ax.plot(n, np.asarray(values, float) / 1e9, "o-", color=_rank_color(i), ms=4, label=f"w = {w}")
    if reference is not None:
        ax.plot(n, np.asarray(reference, float) / 1e9, "--", color=COLORS["exact"], label=reference_label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length $n$ (tokens)")
    ax.set_ylabel("GB per rank (1 GB = $10^9$ bytes)")
    ax.set_title("Memory per rank: O(n / w)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8)
    if terms:
        ax_t = axes[0, 1]
        names = list(terms)
        vals = np.array([terms[k] for k in names], float) / 1e9
        y = np.arange(len(names))
        ax_t.barh(y, vals, color=COLORS["score"], height=0.6)
        for yi, v in zip(y, vals):
            ax_t.annotate(f"{v:.3g} GB", xy=(v, yi), xytext=(4, 0), textcoords="offset points", va="center",
                          fontsize=8)
        ax_t.set_yticks(y, names)
        ax_t.invert_yaxis()
        ax_t.set_xscale("log")
        ax_t.set_xlim(vals.min() / 3, vals.max() * 8)
        ax_t.set_xlabel("GB")
        ax_t.set_title(f"The terms of the model, {terms_label}", fontsize=10)
        ax_t.grid(alpha=0.3, axis="x")
    return fig


# ---------------------------------------------------------------------------
# notebook 03: dilated attention
# ---------------------------------------------------------------------------

PAIR_CMAP = "Dark2"  # pair p (segment length, dilation rate) is drawn in colour p in notebook 03
KIND_COLORS = {"local": "#55a868", "exchanged": "#dd8452"}
UNCOVERED = "#c44e52"


def _pair_color(p: int):
    return plt.get_cmap(PAIR_CMAP)(p % 8)


def _pair_label(w: int, r: int) -> str:
    return f"w = {w}, r = {r}"


def _multiplicity_cmap(top: int):
    """Discrete colours for c = 0 (white), 1, …, top."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    blues = plt.get_cmap("Blues")
    colors = ["#ffffff"] + [blues(0.35 + 0.6 * k / max(top, 1)) for k in range(top)]
    return ListedColormap(colors), BoundaryNorm(np.arange(-0.5, top + 1.5), top + 1)


def _draw_coverage(ax, kept: np.ndarray, *, highlight: int | None = None, groups=None, group_labels=None) -> None:
    """Heads × positions: how many pairs keep position i in head h (``c_ii``); kept by none in red."""
    h, n = kept.shape
    top = max(int(kept.max()), 1)
    cmap, norm = _multiplicity_cmap(top)
    img = cmap(norm(kept))
    img[kept == 0] = plt.matplotlib.colors.to_rgba(UNCOVERED, 0.85)
    ax.imshow(img, extent=(-0.5, n - 0.5, h - 0.5, -0.5), interpolation="nearest", aspect="auto")
    for y in range(1, h):
        ax.axhline(y - 0.5, color="white", lw=0.6)
    if groups is not None:
        for g, heads in enumerate(groups):
            if heads.start > 0:
                ax.axhline(heads.start - 0.5, color="#222222", lw=1.6)
            if group_labels is not None:
                ax.text(n - 0.5 + n * 0.01, (heads.start + heads.stop - 1) / 2, group_labels[g], ha="left",
                        va="center", fontsize=8, color=_pair_color(g))
    if highlight is not None:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((-0.5, highlight - 0.5), n, 1, fill=False, edgecolor="#222222", lw=2.0))
    ax.set_yticks(range(h), [f"head {k}" for k in range(h)], fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.set_xlabel("position $i$")


def plot_dilated_pattern(seq_len: int, num_heads: int, *, segment_lengths: Sequence[int],
                         dilation_rates: Sequence[int], head: int = 0, heads: str = "all",
                         causal: bool = False) -> Figure:
    """Dilated attention's pattern for one head, and which positions every head keeps.

    Left: the multiplicity ``c_ij`` of equation (D) for head ``head``
    (read from :func:`ringbook.dilated_weights`): white cells are never
    scored, darker cells are keys counted by several pairs. Each pair the head
    uses outlines its segments in the pair's colour. Right: heads ×
    positions, the number of pairs that keep position i in head h
    (``c_ii``); red positions are kept by no pair, so their output is 0 and
    their lse −∞.
    """
    from matplotlib.patches import Patch, Rectangle

    from .dilated import dilated_weights, grouped_heads, pair_heads

    if not 0 <= head < num_heads:
        raise ValueError(f"head must be in 0..{num_heads - 1} for {num_heads} heads, got {head}")
    c = dilated_weights(seq_len, num_heads, segment_lengths=list(segment_lengths),
                        dilation_rates=list(dilation_rates), causal=causal, heads=heads).numpy()
    n = seq_len
    pairs = list(zip(segment_lengths, dilation_rates))
    patterns = pair_heads(num_heads, list(dilation_rates), heads)
    top = max(int(c.max()), 1)
    cmap, norm = _multiplicity_cmap(top)

    fig, axes = new_figure(1, 2, figsize=(12.0, 5.6), gridspec_kw={"width_ratios": [1.0, 1.05]})
    ax, ax_cov = axes[0]
    ax.imshow(c[head], cmap=cmap, norm=norm, extent=(-0.5, n - 0.5, n - 0.5, -0.5), interpolation="nearest")
    handles = [Patch(facecolor=cmap(norm(k)), edgecolor="#999999", label=f"$c_{{ij}} = {k}$") for k in range(top + 1)]
    for p, ((w, r), (hs, offs)) in enumerate(zip(pairs, patterns)):
        if head not in hs:
            continue
        o = offs[hs.index(head)]
        inset = 0.15 * p
        for start in range(0, n, w):
            ax.add_patch(Rectangle((start - 0.5 + inset, start - 0.5 + inset), w - 2 * inset, w - 2 * inset,
                                   fill=False, edgecolor=_pair_color(p), lw=1.4, ls=(0, (4, 2))))
        handles.append(Patch(facecolor="none", edgecolor=_pair_color(p), lw=1.4,
                             label=f"segments of {_pair_label(w, r)}, offset {o}"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.set_xlabel("key position $j$")
    ax.set_ylabel("query position $i$")
    seg = ", ".join(str(w) for w in segment_lengths)
    rates = ", ".join(str(r) for r in dilation_rates)
    ax.set_title(f"head {head}: $c_{{ij}}$ · segments [{seg}] · rates [{rates}] · heads {heads}"
                 + (" · causal" if causal else ""), fontsize=10)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=8, frameon=False)

    kept = np.diagonal(c, axis1=1, axis2=2)  # c_ii: the pairs that keep position i
    groups = grouped_heads(num_heads, len(pairs)) if heads == "grouped" else None
    labels = [_pair_label(w, r) for w, r in pairs] if groups is not None else None
    _draw_coverage(ax_cov, kept, highlight=head, groups=groups, group_labels=labels)
    uncovered = (kept == 0).mean(axis=1)
    ax_cov.set_title(f"positions kept per head (pairs keeping $i$)\n"
                     f"kept by no pair: {int((kept == 0).sum())} of {kept.size} (head, position) cells",
                     fontsize=10)
    cov_handles = [Patch(facecolor=cmap(norm(k)), edgecolor="#999999", label=f"kept by {k} pair{'s' * (k > 1)}")
                   for k in range(1, int(kept.max()) + 1)]
    cov_handles.append(Patch(facecolor=UNCOVERED, alpha=0.85, label="kept by none: out 0, lse −∞"))
    ax_cov.legend(handles=cov_handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=8,
                  frameon=False)
    ax_cov.set_xlim(-0.5, n - 0.5 + (n * 0.2 if groups is not None else 0))
    for k in range(num_heads):
        if uncovered[k] > 0 and groups is None:
            ax_cov.text(n - 0.5 + n * 0.01, k, f"{uncovered[k]:.0%} lost", ha="left", va="center", fontsize=7)
    if groups is None and uncovered.any():
        ax_cov.set_xlim(-0.5, n - 0.5 + n * 0.13)
    return fig


def plot_dilated_coverage(seq_len: int, num_heads: int, *, segment_lengths: Sequence[int],
                          dilation_rates: Sequence[int], heads: str = "grouped") -> Figure:
    """Which positions each head keeps, and the share of positions no pair keeps, per head and per group.

    Left: heads × positions as in :func:`plot_dilated_pattern` (red: kept by
    no pair, out 0 / lse −∞). Right: per head, the share of positions it
    drops (bars), and with ``heads="grouped"`` the share of positions that no
    head of the group keeps (the group's whole view of the sequence).
    """
    from matplotlib.patches import Patch

    from .dilated import dilated_weights, grouped_heads

    c = dilated_weights(seq_len, num_heads, segment_lengths=list(segment_lengths),
                        dilation_rates=list(dilation_rates), heads=heads).numpy()
    kept = np.diagonal(c, axis1=1, axis2=2)
    pairs = list(zip(segment_lengths, dilation_rates))
    groups = grouped_heads(num_heads, len(pairs)) if heads == "grouped" else None

    fig, axes = new_figure(1, 2, figsize=(12.0, 0.42 * num_heads + 2.6), gridspec_kw={"width_ratios": [1.6, 1.0]})
    ax, ax_bar = axes[0]
    _draw_coverage(ax, kept, groups=groups,
                   group_labels=[_pair_label(w, r) for w, r in pairs] if groups is not None else None)
    ax.set_xlim(-0.5, seq_len - 0.5 + (seq_len * 0.2 if groups is not None else 0))
    ax.set_title(f"positions kept per head · n = {seq_len} · segments {list(segment_lengths)} · "
                 f"rates {list(dilation_rates)} · heads {heads}", fontsize=10)
    ax.legend(handles=[Patch(facecolor=UNCOVERED, alpha=0.85, label="kept by no pair: out 0, lse −∞")],
              loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)

    dropped = (kept == 0).mean(axis=1)
    y = np.arange(num_heads)
    colors = [_pair_color(next(g for g, hs in enumerate(groups) if k in hs)) if groups is not None
              else COLORS["score"] for k in range(num_heads)]
    ax_bar.barh(y, dropped, color=colors, height=0.6)
    for yi, v in zip(y, dropped):
        ax_bar.annotate(f"{v:.0%}", xy=(v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    handles = [Patch(facecolor="#999999", label="dropped by the head")]
    if groups is not None:
        for g, hs in enumerate(groups):
            lost = (kept[list(hs)] == 0).all(axis=0).mean()
            ax_bar.plot([lost, lost], [hs.start - 0.45, hs.stop - 0.55], color="#222222", lw=2.2)
            ax_bar.text(dropped[list(hs)].max() + 0.14, (hs.start + hs.stop - 1) / 2,
                        f"group {_pair_label(*pairs[g])}:\n{lost:.0%} seen by no head", va="center", fontsize=8)
            if hs.start > 0:
                ax_bar.axhline(hs.start - 0.5, color="#222222", lw=0.8)
        handles.append(plt.matplotlib.lines.Line2D([], [], color="#222222", lw=2.2,
                                                   label="dropped by every head of the group"))
    ax_bar.set_yticks(y, [f"head {k}" for k in range(num_heads)], fontsize=8)
    ax_bar.set_ylim(num_heads - 0.5, -0.5)
    ax_bar.set_xlim(0, 1.6 if groups is not None else 1.15)
    ax_bar.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax_bar.xaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
    ax_bar.set_xlabel("share of positions kept by no pair")
    ax_bar.set_title("what each head (and group) never sees", fontsize=10)
    ax_bar.grid(alpha=0.3, axis="x")
    ax_bar.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, fontsize=8,
                  frameon=False)
    return fig


def plot_dilated_scaling(seq_lens: Sequence[int], scores: Mapping[str, Sequence[float]], *,
                         measured: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                         measured_title: str = "measured time", measured_ylabel: str = "time (ms)",
                         title: str = "Scores computed per forward call") -> Figure:
    """Work against sequence length (log-log), and optionally measured times.

    ``scores[label]`` has one value per ``seq_lens`` entry (e.g. from
    :func:`ringbook.dilated_flops` and :func:`ringbook._utils.attention_flops`
    divided by 4·d). ``measured[label] = (seq_lens, times)`` adds a second
    panel; labels starting with "dense" are drawn dashed.
    """
    n = np.asarray(seq_lens, float)
    fig, axes = new_figure(1, 2 if measured else 1, figsize=(12.5 if measured else 6.5, 4.6))
    ax = axes[0, 0]
    for i, (label, values) in enumerate(scores.items()):
        dense = label.startswith("dense")
        ax.plot(n, np.asarray(values, float), "s--" if dense else "o-", ms=4, color=_pair_color(i), label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length $n$ (tokens)")
    ax.set_ylabel("scores $q \\cdot k$ computed")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8)
    if measured:
        ax_t = axes[0, 1]
        for i, (label, (xs, ts)) in enumerate(measured.items()):
            dense = label.startswith("dense")
            ax_t.plot(np.asarray(xs, float), np.asarray(ts, float), "s--" if dense else "o-", ms=4,
                      color=_rank_color(i), label=label)
        ax_t.set_xscale("log", base=2)
        ax_t.set_yscale("log")
        ax_t.set_xlabel("sequence length $n$ (tokens)")
        ax_t.set_ylabel(measured_ylabel)
        ax_t.set_title(measured_title, fontsize=10)
        ax_t.grid(alpha=0.3, which="both")
        ax_t.legend(loc="upper left", fontsize=8)
    return fig


def plot_dilated_ring_plan(plan, *, batch: int = 1, head_dim: int = 1) -> Figure:
    """How the segments of each pair fall onto the ring's shards, and what each rank sends.

    ``plan`` is a :class:`ringbook.ring_dilated.DilatedRingPlan`. Left: one
    band per pair (w, r) along the token axis, one box per segment, green if
    it lies inside one shard (its rank computes it alone) and orange if it
    spans several (the spanned ranks exchange its dilated K/V); vertical lines
    are shard boundaries. Right: the K and V elements each rank sends over the
    whole call (:meth:`DilatedRingPlan.sent_elements`), split by pair.
    """
    from matplotlib.patches import Patch, Rectangle

    n, w_ring, c = plan.seq_len, plan.ring_size, plan.shard_len
    n_pairs = len(plan.pairs)
    fig, axes = new_figure(1, 2, figsize=(12.5, 1.0 * n_pairs + 2.8), gridspec_kw={"width_ratios": [2.0, 1.0]})
    ax, ax_bar = axes[0]
    for seg in plan.segments:
        y = seg.pair
        ax.add_patch(Rectangle((seg.start, y - 0.38), seg.stop - seg.start, 0.76, facecolor=KIND_COLORS[seg.kind],
                               edgecolor="white", lw=1.5))
        if seg.kind == "exchanged" and (seg.stop - seg.start) / n > 0.04:
            ax.text((seg.start + seg.stop) / 2, y, "ranks " + ",".join(map(str, seg.ranks)), ha="center",
                    va="center", fontsize=7, color="white", fontweight="bold")
    for k in range(w_ring + 1):
        ax.axvline(k * c, color="#222222", lw=1.0, ls="--" if 0 < k < w_ring else "-")
    for k in range(w_ring):
        ax.text((k + 0.5) * c, -0.62, f"rank {k}", ha="center", va="bottom", fontsize=8, color=_rank_color(k),
                fontweight="bold")
    ax.set_xlim(0, n)
    ax.set_ylim(n_pairs - 0.5, -0.75)
    ax.set_yticks(range(n_pairs), [_pair_label(w, r) for w, r in plan.pairs])
    ax.set_xlabel("token position")
    counts = {kind: sum(s.kind == kind for s in plan.segments) for kind in KIND_COLORS}
    ax.set_title(f"segments on a ring of {w_ring} (n = {n}, shard c = {c}"
                 f"{', causal' if plan.causal else ''}): {counts['local']} local, {counts['exchanged']} exchanged",
                 fontsize=10)
    ax.legend(handles=[Patch(color=KIND_COLORS[k], label=f"{k}: " + ("inside one shard, no communication"
                                                                      if k == "local" else
                                                                      "spans shards: dilated K/V exchanged"))
                       for k in KIND_COLORS], loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, fontsize=8,
              frameon=False)

    ranks = np.arange(w_ring)
    bottom = np.zeros(w_ring)
    for p in range(n_pairs):
        sent = np.zeros(w_ring)
        for seg in plan.segments:
            if seg.pair == p:
                for rank, rows, receivers in zip(seg.ranks, seg.send_rows, seg.receivers):
                    sent[rank] += 2 * batch * head_dim * rows * receivers
        ax_bar.bar(ranks, sent, bottom=bottom, color=_pair_color(p), width=0.7, label=_pair_label(*plan.pairs[p]))
        bottom += sent
    total = plan.sent_elements(batch, head_dim)
    for x, v in zip(ranks, total):
        ax_bar.text(x, v, f"{v:,}", ha="center", va="bottom", fontsize=7)
    ax_bar.set_xticks(ranks, [str(r) for r in ranks])
    ax_bar.set_xlabel("rank")
    ax_bar.set_ylabel(f"K, V elements sent (b = {batch}, d = {head_dim})")
    ax_bar.set_ylim(0, max(max(total), 1) * 1.18)
    ax_bar.set_title(f"communication: {sum(total):,} elements in all", fontsize=10)
    ax_bar.grid(alpha=0.3, axis="y")
    ax_bar.legend(loc="upper left", fontsize=8)
    return fig


# ---------------------------------------------------------------------------
# notebook 04: the equivalence matrix
# ---------------------------------------------------------------------------


def _annotate_cells(ax, values: np.ndarray, texts: Sequence[Sequence[str]], rgba: np.ndarray, fontsize: float) -> None:
    """Write ``texts[i][j]`` in cell (i, j), black or white by the cell colour's lightness."""
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            r, g, b = rgba[i, j, :3]
            light = 0.299 * r + 0.587 * g + 0.114 * b > 0.55
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=fontsize,
                    color="#222222" if light else "white")


def plot_error_matrix(
    errors,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    ratios=None,
    ratio_labels: Sequence[str] | None = None,
    groups: Sequence[int] = (),
    title: str = "Error against the float64 reference",
    ratio_title: str = "the 2× rule: err / (2·err_naive + atol)",
    digits: int = 1,
) -> Figure:
    """Heatmaps of an error matrix: one row per implementation, one column per case.

    Left: ``log10`` of ``errors`` (rows × columns, max abs errors against the
    float64 reference; exact zeros are drawn at ``ERROR_FLOOR``), each cell
    annotated with its error to ``digits`` significant digits. Right, if ``ratios`` (rows × m, columns
    ``ratio_labels``) is given: each cell's error over the error it is allowed
    (e.g. flash-attention's 2× rule), green up to 1 and red above, cells above
    1 outlined. ``groups`` are the row indices where a new group of rows starts;
    a line is drawn above each.
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
    return fig
