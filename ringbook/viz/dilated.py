"""Figures of notebook 03 (dilated attention): a pattern, coverage across heads, work, the ring plan.

Pure functions: plain data in, a Figure out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .figure import new_figure
from .palette import (
    COLORS,
    KIND_COLORS,
    UNCOVERED,
    pair_color,
    rank_color,
)

if TYPE_CHECKING:
    from ..ring_dilated import DilatedRingPlan


def _pair_label(seg: int, r: int) -> str:
    return f"s = {seg}, r = {r}"


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
                        va="center", fontsize=8, color=pair_color(g))
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

    Left: the multiplicity ``κ_ij`` of equation (D) for head ``head``
    (read from :func:`ringbook.dilated_weights`): white cells are never
    scored, darker cells are keys counted by several pairs. Each pair the head
    uses outlines its segments in the pair's colour. Right: heads ×
    positions, the number of pairs that keep position i in head h
    (``c_ii``); red positions are kept by no pair, so their output is 0 and
    their lse −∞.
    """
    from matplotlib.patches import Patch, Rectangle

    from ..dilated import dilated_weights, grouped_heads, pair_heads

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
    handles = [Patch(facecolor=cmap(norm(k)), edgecolor="#999999", label=f"$\\kappa_{{ij}} = {k}$") for k in range(top + 1)]
    for p, ((seg, r), (hs, offs)) in enumerate(zip(pairs, patterns)):
        if head not in hs:
            continue
        o = offs[hs.index(head)]
        inset = 0.15 * p
        for start in range(0, n, seg):
            ax.add_patch(Rectangle((start - 0.5 + inset, start - 0.5 + inset), seg - 2 * inset, seg - 2 * inset,
                                   fill=False, edgecolor=pair_color(p), lw=1.4, ls=(0, (4, 2))))
        handles.append(Patch(facecolor="none", edgecolor=pair_color(p), lw=1.4,
                             label=f"segments of {_pair_label(seg, r)}, offset {o}"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.set_xlabel("key position $j$")
    ax.set_ylabel("query position $i$")
    seg = ", ".join(str(seg) for seg in segment_lengths)
    rates = ", ".join(str(r) for r in dilation_rates)
    ax.set_title(f"head {head}: $\\kappa_{{ij}}$ · segments [{seg}] · rates [{rates}] · heads {heads}"
                 + (" · causal" if causal else ""), fontsize=10)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=8, frameon=False)

    kept = np.diagonal(c, axis1=1, axis2=2)  # c_ii: the pairs that keep position i
    groups = grouped_heads(num_heads, len(pairs)) if heads == "grouped" else None
    labels = [_pair_label(seg, r) for seg, r in pairs] if groups is not None else None
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

    from ..dilated import dilated_weights, grouped_heads

    c = dilated_weights(seq_len, num_heads, segment_lengths=list(segment_lengths),
                        dilation_rates=list(dilation_rates), heads=heads).numpy()
    kept = np.diagonal(c, axis1=1, axis2=2)
    pairs = list(zip(segment_lengths, dilation_rates))
    groups = grouped_heads(num_heads, len(pairs)) if heads == "grouped" else None

    fig, axes = new_figure(1, 2, figsize=(12.0, 0.42 * num_heads + 2.6), gridspec_kw={"width_ratios": [1.6, 1.0]})
    ax, ax_bar = axes[0]
    _draw_coverage(ax, kept, groups=groups,
                   group_labels=[_pair_label(seg, r) for seg, r in pairs] if groups is not None else None)
    ax.set_xlim(-0.5, seq_len - 0.5 + (seq_len * 0.2 if groups is not None else 0))
    ax.set_title(f"positions kept per head · n = {seq_len} · segments {list(segment_lengths)} · "
                 f"rates {list(dilation_rates)} · heads {heads}", fontsize=10)
    ax.legend(handles=[Patch(facecolor=UNCOVERED, alpha=0.85, label="kept by no pair: out 0, lse −∞")],
              loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)

    dropped = (kept == 0).mean(axis=1)
    y = np.arange(num_heads)
    colors = [pair_color(next(g for g, hs in enumerate(groups) if k in hs)) if groups is not None
              else COLORS["score"] for k in range(num_heads)]
    ax_bar.barh(y, dropped, color=colors, height=0.6)
    for yi, v in zip(y, dropped):
        ax_bar.annotate(f"{v:.0%}", xy=(v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    if groups is not None:  # one legend entry per bar colour: the head's group
        handles = [Patch(facecolor=pair_color(g), label=f"dropped by a head of {_pair_label(*pairs[g])}")
                   for g in range(len(groups))]
    else:
        handles = [Patch(facecolor=COLORS["score"], label="dropped by the head")]
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
        ax.plot(n, np.asarray(values, float), "s--" if dense else "o-", ms=4, color=pair_color(i), label=label)
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
                      color=rank_color(i), label=label)
        ax_t.set_xscale("log", base=2)
        ax_t.set_yscale("log")
        ax_t.set_xlabel("sequence length $n$ (tokens)")
        ax_t.set_ylabel(measured_ylabel)
        ax_t.set_title(measured_title, fontsize=10)
        ax_t.grid(alpha=0.3, which="both")
        ax_t.legend(loc="upper left", fontsize=8)
    return fig


def plot_dilated_ring_plan(plan: DilatedRingPlan, *, batch: int = 1, head_dim: int = 1) -> Figure:
    """How the segments of each pair fall onto the ring's shards, and what each rank sends.

    ``plan`` is a :class:`ringbook.ring_dilated.DilatedRingPlan`. Left: one
    band per pair (s, r) along the token axis, one box per segment, green if
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
        ax.text((k + 0.5) * c, -0.62, f"rank {k}", ha="center", va="bottom", fontsize=8, color=rank_color(k),
                fontweight="bold")
    ax.set_xlim(0, n)
    ax.set_ylim(n_pairs - 0.5, -0.75)
    ax.set_yticks(range(n_pairs), [_pair_label(seg, r) for seg, r in plan.pairs])
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
        ax_bar.bar(ranks, sent, bottom=bottom, color=pair_color(p), width=0.7, label=_pair_label(*plan.pairs[p]))
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
