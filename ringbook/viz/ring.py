"""Figures of notebook 02 (ring attention): one ring step over the score matrix, causal work, memory per rank.

Pure functions: plain data in, a Figure out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .figure import new_figure
from .palette import (
    COLORS,
    rank_color,
)


def _tint(color, amount: float):
    """``color`` mixed with white: amount 0 keeps it, 1 gives white."""
    rgb = np.asarray(color[:3], dtype=float)
    return tuple(rgb + (1.0 - rgb) * amount) + (1.0,)


def _runs(pos: np.ndarray) -> list[tuple[int, int]]:
    """Sorted positions cut into runs of consecutive integers, as (start, stop)."""
    pos = np.sort(np.asarray(pos))
    cuts = np.flatnonzero(np.diff(pos) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(pos, cuts)]


def ring_step_cells(n: int, ring_size: int, *, layout: str,
                    causal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per score cell ``(i, j)``: the ring step that computes it and how (the data of :func:`plot_ring_step`).

    Returns ``(owner, origin, step, state)``: ``owner[i]`` the rank holding
    query i, ``origin[j]`` the rank whose K/V shard holds key j at step 0,
    ``step[i, j]`` the step at which rank ``owner[i]`` meets key j, and
    ``state[i, j]`` 0 = computed and needed, 1 = computed inside a tile but
    masked (j > i), 2 = in a block the schedule skips (never computed).
    Everything is read from :func:`ringbook.schedule.ring_schedule`.
    """
    from ..schedule import layout_positions, ring_schedule

    pos = layout_positions(n, ring_size, layout).numpy()
    owner, origin = np.empty(n, dtype=int), np.empty(n, dtype=int)
    for r in range(ring_size):
        owner[pos[r]] = r
        origin[pos[r]] = r
    step = (owner[:, None] - origin[None, :]) % ring_size
    state = np.full((n, n), -1, dtype=int)
    for row in ring_schedule(n, ring_size, layout=layout, causal=causal):
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


def plot_ring_step(n: int, ring_size: int, step: int, *, layout: str = "zigzag", causal: bool = True) -> Figure:
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

    from ..schedule import layout_positions, ring_schedule

    w = ring_size
    if not 0 <= step < w:
        raise ValueError(f"step must be in 0..{w - 1} for a ring of {w} ranks, got {step}")
    owner, origin, step_of, state = ring_step_cells(n, w, layout=layout, causal=causal)
    holder = (origin + step) % w  # who holds key j's K/V at this step
    sched = ring_schedule(n, w, layout=layout, causal=causal)[step]

    img = np.ones((n, n, 4))
    for r in range(w):
        rows = owner == r
        base = rank_color(r)
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
    owner_rgb = np.array([rank_color(r) for r in owner])
    holder_rgb = np.array([rank_color(r) for r in holder])
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
    handles = [Patch(color=rank_color(r), label=f"rank {r} computes now") for r in range(w)]
    handles += [Patch(color=_tint(rank_color(0), 0.85), label="computed at another step")]
    if causal:
        handles += [Patch(facecolor=_tint(rank_color(0), 0.55), edgecolor="#555555", hatch="xx", lw=0,
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
        ax_ring.add_patch(Circle(xy[r], node, color=rank_color(r), zorder=2))
        ax_ring.text(*xy[r], f"rank {r}", ha="center", va="center", fontsize=9, color="white", fontweight="bold",
                     zorder=3)
        out = xy[r] * (1 + (node + 0.32) / radius)
        ax_ring.text(*out, f"holds K/V {s.kv_rank}\n{s.work} scores", ha="center", va="center", fontsize=8,
                     bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": rank_color(r)})
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
        colors = [rank_color(r) for r in ranks]
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
        ax.plot(n, np.asarray(values, float) / 1e9, "o-", color=rank_color(i), ms=4, label=f"w = {w}")
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


def plot_ring_timeline(world: int, cases: Mapping[str, tuple[float, float]], *, unit: str = "ms") -> Figure:
    """One rank's ring over ``world`` steps on two streams, one panel per case: compute, and the next K/V in flight.

    ``cases[label] = (compute, transfer)``: one step's block compute time
    and the K/V transfer time (same unit). Step ``t + 1`` starts when both
    its block's inputs have arrived and step ``t`` is done (double
    buffering); the transfer is hidden when it is shorter than the compute,
    else the compute stream waits (hatched). -> Figure
    """
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if not cases:
        raise ValueError("cases must name at least one (compute, transfer) pair")
    for label, pair in cases.items():
        ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf") for x in pair)
        if not ok:
            raise ValueError(f"cases[{label!r}] must be (compute, transfer), two positive finite times, got {pair!r}")
    fig, axes = new_figure(len(cases), 1, figsize=(9.0, 1.7 * len(cases) + 0.6))
    for ax, (label, (compute, transfer)) in zip(axes[:, 0], cases.items()):
        start = 0.0
        for t in range(world):
            ax.broken_barh([(start, compute)], (1.1, 0.8), color=rank_color(t % 10), alpha=0.85)
            ax.text(start + compute / 2, 1.5, f"step {t}", ha="center", va="center", fontsize=7, color="white")
            if t < world - 1:
                ax.broken_barh([(start, transfer)], (0.1, 0.8), color=COLORS["partial"], alpha=0.7)
                end = start + max(compute, transfer)
                if transfer > compute:  # the compute stream waits for the next shard
                    ax.broken_barh([(start + compute, transfer - compute)], (1.1, 0.8), facecolor="none",
                                   edgecolor=COLORS["max"], hatch="///", lw=0.8)
                start = end
            else:
                start += compute
        ax.set_yticks([0.5, 1.5], ["K/V transfer", "compute"])
        ax.set_xlim(0, start * 1.02)
        ax.set_title(f"{label}: {world} steps in {start:.3g} {unit} (compute alone {world * compute:.3g} {unit})",
                     fontsize=9)
        ax.set_xlabel(unit)
        ax.grid(alpha=0.3, axis="x")
    return fig


OVERLAP_MODES = (("forward", False, False), ("forward, causal zigzag", True, False),
                 ("backward", False, True), ("backward, causal zigzag", True, True))


def plot_ring_overlap(shard_len: int = 4096, tflops: float = 400.0, gb_per_s: float = 450.0, *, batch: int = 1,
                      heads: int = 8, head_dim: int = 64) -> Figure:
    """Does the next shard arrive before the block is done? One ring step in four modes, at one FLOP rate and link.

    Left: one step's compute and transfer time at ``shard_len`` tokens a rank
    (bf16 inputs, float32 dK/dV in the backward), from
    :func:`ringbook.demo.ring_step_seconds`, for the forward and backward,
    without a mask and causal (zigzag). Right: both times against the shard
    length; compute grows as c², transfer as c, and they cross at each mode's
    threshold (dotted). -> Figure
    """
    import torch

    from ..demo import ring_step_seconds

    flops, bw = tflops * 1e12, gb_per_s * 1e9
    kw = {"flops_per_s": flops, "bytes_per_s": bw, "batch": batch, "heads": heads, "head_dim": head_dim,
          "dtype": torch.bfloat16}
    fig, axes = new_figure(1, 2, figsize=(11.0, 3.8))
    ax, ax_c = axes[0]
    steps = {label: ring_step_seconds(int(shard_len), causal=causal, backward=bwd, **kw)
             for label, causal, bwd in OVERLAP_MODES}
    y = np.arange(len(steps))
    compute = np.array([t["compute"] for t in steps.values()]) * 1e3
    transfer = np.array([t["transfer"] for t in steps.values()]) * 1e3
    ax.barh(y + 0.2, compute, height=0.38, color=rank_color(0), label="compute of one block")
    ax.barh(y - 0.2, transfer, height=0.38, color=COLORS["partial"], label="transfer of the next shard")
    for i, t in enumerate(steps.values()):
        hidden = t["transfer"] <= t["compute"]
        ax.text(max(compute[i], transfer[i]) * 1.02, y[i], "hidden" if hidden else "waits",
                va="center", fontsize=8, color="black" if hidden else COLORS["max"])
    ax.set_yticks(y, list(steps))
    ax.invert_yaxis()
    ax.set_xlim(0, max(compute.max(), transfer.max()) * 1.25)
    ax.set_xlabel("ms per step")
    n_hidden = sum(t["transfer"] <= t["compute"] for t in steps.values())
    ax.set_title(f"c = {int(shard_len):,} tokens, {tflops:.0f} TFLOP/s, {gb_per_s:.0f} GB/s: "
                 f"{n_hidden} of 4 hide the transfer", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")

    cs = np.geomspace(256, 131072, 60)
    for i, (label, causal, bwd) in enumerate(OVERLAP_MODES):
        t1 = ring_step_seconds(1, causal=causal, backward=bwd, **kw)
        color = rank_color(i)
        ax_c.loglog(cs, t1["compute"] * cs**2 * 1e3, color=color, lw=1.5, label=f"{label}: compute")
        ax_c.loglog(cs, t1["transfer"] * cs * 1e3, color=color, lw=1.0, ls="--")
        ax_c.axvline(t1["threshold"], color=color, lw=0.8, ls=":")
    ax_c.axvline(shard_len, color="black", lw=1.2)
    ax_c.set_xlabel("c, tokens a rank (log)")
    ax_c.set_ylabel("ms per step (log)")
    ax_c.set_title("compute (solid) against transfer (dashed); they cross at the threshold (dotted)", fontsize=9)
    ax_c.legend(fontsize=7, loc="upper left")
    ax_c.grid(alpha=0.3, which="both")
    return fig
