"""Figures of notebook 06 (beyond the ring): who sends what at each step, and bytes per rank against ring size.

Pure functions: plain data in (the :func:`ringbook.strategy_schedule` of a
strategy, or byte counts read from it), a Figure out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .figure import legend_below, new_figure
from .palette import MESSAGE_COLORS, STRATEGY_COLORS, rank_color


def plot_strategy_schedule(schedule: Sequence, ring_size: int, *, title: str = "",
                           phase: str = "forward") -> Figure:
    """Who sends what to whom at each step of ``schedule`` (a list of :class:`ringbook.strategies.CommStep`).

    Top: one column per step of ``phase``; the ranks are dots on a vertical
    line, each arrow a message from its sender (left) to its receiver
    (right), coloured by what it carries, its width growing with its bytes.
    The step's collective is written above it, and a dot is ringed when its
    rank computes during that step. Bottom: the bytes each rank sends at
    each step, stacked by what they carry.
    """
    from matplotlib.patches import FancyArrowPatch, Patch

    steps = [s for s in schedule if s.phase == phase]
    if not steps:
        raise ValueError(f"the schedule has no {phase!r} steps")
    w = ring_size
    fig, axes = new_figure(2, 1, figsize=(max(8.0, 1.9 * len(steps) + 1.5), 3.0 + 0.45 * w + 2.4),
                           gridspec_kw={"height_ratios": [0.9 + 0.45 * w, 2.4]})
    ax, ax_bytes = axes[0, 0], axes[1, 0]
    biggest = max((m.nbytes for s in steps for m in s.messages), default=1)
    kinds: list[str] = []
    for x, st in enumerate(steps):
        left, right = x, x + 0.62
        busy = {wk.rank for wk in st.work if wk.scores}
        for r in range(w):
            for side in (left, right):
                ax.scatter(side, r, s=46, color=rank_color(r), zorder=3,
                           edgecolor="#222222" if (side == left and r in busy) else "none", linewidth=1.6)
        here = list(dict.fromkeys(m.what for m in st.messages))  # the kinds of this step, side by side
        for m in st.messages:
            kinds += [m.what] if m.what not in kinds else []
            lw = 0.6 + 2.6 * m.nbytes / biggest
            dy = 0.14 * (here.index(m.what) - (len(here) - 1) / 2)
            ax.add_patch(FancyArrowPatch((left, m.src + dy), (right, m.dst + dy), arrowstyle="-|>", mutation_scale=9,
                                         color=MESSAGE_COLORS.get(m.what, "#444444"), lw=lw, alpha=0.75,
                                         shrinkA=4, shrinkB=4, zorder=2))
        label = st.collective or "compute"
        ax.text((left + right) / 2, -0.9, f"step {st.step}\n{label}", ha="center", va="bottom", fontsize=8)
    ax.set_xlim(-0.4, len(steps) - 0.2)
    ax.set_ylim(w - 0.4, -1.7)
    ax.set_yticks(range(w), [f"rank {r}" for r in range(w)])
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    handles = [Patch(color=MESSAGE_COLORS.get(k, "#444444"), label=k) for k in kinds]
    handles += [Patch(facecolor="white", edgecolor="#222222", label="ringed: computes in this step")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or f"{phase}: who sends what at each step (w = {w})", fontsize=10)

    # bytes each rank sends per step, stacked by kind
    width = 0.8 / w
    for x, st in enumerate(steps):
        for r in range(w):
            bottom = 0.0
            for k in kinds:
                nb = sum(m.nbytes for m in st.messages if m.src == r and m.what == k)
                if nb:
                    ax_bytes.bar(x + (r - (w - 1) / 2) * width, nb, width=width * 0.9, bottom=bottom,
                                 color=MESSAGE_COLORS.get(k, "#444444"), edgecolor=rank_color(r), linewidth=1.2)
                    bottom += nb
    ax_bytes.set_xticks(range(len(steps)), [f"step {s.step}" for s in steps])
    ax_bytes.set_xlim(-0.5, len(steps) - 0.5)
    ax_bytes.set_ylabel("bytes sent per rank\n(bars: ranks 0 … w−1)")
    ax_bytes.grid(alpha=0.3, axis="y")
    total = sum(m.nbytes for s in steps for m in s.messages)
    ax_bytes.set_title(f"{total / w:,.0f} bytes per rank in the {phase}", fontsize=9)
    return fig


def plot_bytes_per_rank(ring_sizes: Sequence[int], bytes_per_rank: Mapping[str, Sequence[float]], *,
                        title: str = "", compute_per_rank: Mapping[str, Sequence[float]] | None = None) -> Figure:
    """Bytes one rank sends against the ring size, one line per strategy (``bytes_per_rank[name]``, one per size).

    Strategies named as in :data:`ringbook.strategies.STRATEGIES` take their
    colour from the palette (a ``"usp …"`` label takes USP's); equal values stay
    visible (earlier lines are drawn wider). Ring size on a log axis.
    With ``compute_per_rank`` (scores per rank, same keys), a second panel
    shows bytes per score: the higher, the harder the transfer is to hide.
    """
    sizes = np.asarray(ring_sizes, dtype=float)
    ncols = 1 + (compute_per_rank is not None)
    fig, axes = new_figure(1, ncols, figsize=(5.6 * ncols, 4.0))
    markers = "osD^vP*X"

    def colour(name: str):
        return STRATEGY_COLORS.get(name.split()[0], "#444444")

    ax = axes[0, 0]
    seen: dict[tuple, str] = {}
    for i, (name, values) in enumerate(bytes_per_rank.items()):
        vals = np.asarray(values, dtype=float)
        keep = vals > 0
        same = seen.setdefault(tuple(vals), name)  # a line hidden under an equal one says so in the legend
        label = name if same == name else f"{name} (= {same})"
        ax.plot(sizes[keep], vals[keep] / 1e6, marker=markers[i % len(markers)], color=colour(name), label=label,
                ls="-" if name in STRATEGY_COLORS else "--", ms=11 - 2 * i, lw=2.6 - 0.4 * i, alpha=0.85)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xticks(sizes, [str(int(s)) for s in sizes])
    ax.set_xlabel("ring size $w$ (ranks)")
    ax.set_ylabel("MB sent per rank, forward (1 MB = $10^6$ bytes)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or "communication per rank", fontsize=10)
    if compute_per_rank is not None:
        ax2 = axes[0, 1]
        for i, (name, values) in enumerate(bytes_per_rank.items()):
            vals, work = np.asarray(values, dtype=float), np.asarray(compute_per_rank[name], dtype=float)
            keep = (vals > 0) & (work > 0)
            ax2.plot(sizes[keep], vals[keep] / work[keep], marker=markers[i % len(markers)], color=colour(name),
                     label=name, ls="-" if name in STRATEGY_COLORS else "--", ms=11 - 2 * i, lw=2.6 - 0.4 * i,
                     alpha=0.85)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xticks(sizes, [str(int(s)) for s in sizes])
        ax2.set_xlabel("ring size $w$ (ranks)")
        ax2.set_ylabel("bytes sent per score computed")
        ax2.grid(alpha=0.3, which="both")
        ax2.set_title("bytes per unit of work (lower hides more easily)", fontsize=10)
    return fig


def plot_strategy_engine_cost(rows: Sequence[Mapping], *, title: str = "") -> Figure:
    """Each strategy's time on one GPU as a fraction of one cuDNN call on the whole sequence (the engine's cost
    with no network: 1.0 is free), from ``tools/gpu_strategies.py`` rows; one panel per sequence length, bars per
    (ring size, causal), the issue's 0.95 line dashed."""
    lengths = sorted({r["seq_len"] for r in rows})
    fig, axes = new_figure(1, len(lengths), figsize=(5.0 * len(lengths), 3.8), sharey=True)
    strategies = [s for s in STRATEGY_COLORS if any(s in r["ratio_vs_cudnn"] for r in rows)]
    width = 0.8 / max(len(strategies), 1)
    for ax, n in zip(axes[0], lengths):
        group = [r for r in rows if r["seq_len"] == n]
        x = np.arange(len(group))
        for j, s in enumerate(strategies):
            vals = [r["ratio_vs_cudnn"].get(s, np.nan) for r in group]
            ax.bar(x + (j - (len(strategies) - 1) / 2) * width, vals, width, color=STRATEGY_COLORS[s], label=s)
        ax.axhline(0.95, color="#222222", ls="--", lw=1)
        ax.set_xticks(x, [f"{r['ring_size']} ranks\n{'causal' if r['causal'] else 'full'}" for r in group],
                      fontsize=8)
        ax.set_title(f"{n:,} tokens", fontsize=10)
        ax.set_ylim(0, 1.1)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("cuDNN time / strategy time")
    return legend_below(fig, axes[0, 0], title=title)
