"""Figures of notebook 07 (documents and windows): the blocks a rank skips, the work each rank does, a window's hops.

The data first, then the pictures. :func:`ring_blocks` classifies every
(query piece, key piece) block of every ring step with
:func:`ringbook.masks.classify`, for *any* split of the tokens into per-rank
pieces (the library's layouts, ``"doc_headtail"`` among them, or a split of
your own); :func:`rank_work` and :func:`block_cells` read
it. For the layouts of :mod:`ringbook.schedule` the blocks are those of
:func:`ringbook.ring_schedule` (notebook 07 checks it).

Pure functions: plain data in, a Figure out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from .figure import legend_below, new_figure
from .palette import COLORS, rank_color

Blocks = list[list[list[tuple[torch.Tensor, torch.Tensor, str]]]]
SKIPPED = (0.96, 0.96, 0.96, 1.0)


def _tint(color, amount: float) -> tuple[float, float, float, float]:
    """``color`` mixed with white: amount 0 keeps it, 1 gives white."""
    rgb = np.asarray(color[:3], dtype=float)
    return tuple(rgb + (1.0 - rgb) * amount) + (1.0,)


def _keep(q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool, document_ids: torch.Tensor | None,
          window: int | None) -> torch.Tensor:
    """The ``(i, j)`` bool mask of a block (every pair seen when there is no mask)."""
    from ..masks import keep

    docs = {} if document_ids is None else {"q_doc": document_ids[None, q_pos], "k_doc": document_ids[None, k_pos]}
    seen = keep(q_pos, k_pos, causal=causal, window=window, **docs)
    if seen is None:
        return torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool)
    return seen.reshape(seen.shape[-2:]) if seen.dim() == 4 else seen


def ring_blocks(pieces: Sequence[Sequence[torch.Tensor]], *, causal: bool, document_ids: torch.Tensor | None = None,
                window: int | None = None) -> Blocks:
    """``blocks[t][r]``: the ``(q_pos, k_pos, kind)`` blocks of rank r at ring step t, kind from ``classify``.

    ``pieces[r]`` are rank r's pieces, each a 1-D LongTensor of token
    positions (a contiguous run, or a strided one for the striped layout). At
    step t rank r holds the K/V pieces of rank ``(r − t) mod w``; each (its
    query piece, a held key piece) pair is a block: ``"full"``, ``"causal"``,
    ``"masked"`` or ``"empty"`` (never computed). ``document_ids`` is ``(n,)``.
    """
    from ..masks import check_document_ids, check_window, classify, mask_spec

    n = sum(int(p.numel()) for rank in pieces for p in rank)
    ids = check_document_ids(document_ids, 1, n)
    spec = mask_spec(causal, ids, check_window(window))
    w = len(pieces)
    return [[[(qp, kp, classify(qp, kp, spec)) for qp in pieces[r] for kp in pieces[(r - t) % w]]
             for r in range(w)] for t in range(w)]


def rank_work(blocks: Blocks, *, causal: bool, document_ids: torch.Tensor | None = None,
              window: int | None = None) -> tuple[list[int], list[int]]:
    """Per rank over the whole ring: (scores needed, scores computed).

    Needed: the (query, key) pairs the mask keeps, of the rank's queries.
    Computed: the areas of the blocks that are not empty (a partial block is
    computed whole and masked, as :func:`ringbook.work_per_rank` counts it).
    """
    w = len(blocks)
    needed, computed = [0] * w, [0] * w
    for row in blocks:
        for r, rank_blocks in enumerate(row):
            for qp, kp, kind in rank_blocks:
                if kind != "empty":
                    computed[r] += qp.numel() * kp.numel()
                    needed[r] += int(_keep(qp, kp, causal=causal, document_ids=document_ids, window=window).sum())
    return needed, computed


def block_cells(blocks: Blocks, n: int, *, causal: bool, document_ids: torch.Tensor | None = None,
                window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per score cell: ``(owner, state)`` — ``owner[i]`` the rank holding query i; ``state[i, j]`` 0 = computed
    and seen, 1 = computed inside a block but masked away, 2 = in an empty block (never computed)."""
    owner = np.full(n, -1, dtype=int)
    state = np.full((n, n), -1, dtype=int)
    for row in blocks:
        for r, rank_blocks in enumerate(row):
            for qp, kp, kind in rank_blocks:
                owner[qp.numpy()] = r
                cells = np.ix_(qp.numpy(), kp.numpy())
                if kind == "empty":
                    state[cells] = 2
                else:
                    seen = _keep(qp, kp, causal=causal, document_ids=document_ids, window=window).numpy()
                    state[cells] = np.where(seen, 0, 1)
    if (state < 0).any() or (owner < 0).any():
        raise ValueError("the pieces do not cover every token exactly once on every rank's ring")
    return owner, state


def _doc_edges(document_ids: torch.Tensor | None) -> list[int]:
    if document_ids is None:
        return []
    ids = torch.as_tensor(document_ids).flatten()
    return (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()


def _imbalance(values: Sequence[float]) -> float:
    values = np.asarray(values, float)
    return float(values.max() / values.mean()) if values.mean() > 0 else 1.0


def plot_mask_ring(pieces: Sequence[Sequence[torch.Tensor]], *, causal: bool = True,
                   document_ids: torch.Tensor | None = None, window: int | None = None,
                   title: str = "") -> Figure:
    """The score matrix under a mask, coloured by the rank that computes each cell, and the work per rank.

    Left: query i (rows) against key j (columns). A cell the mask keeps is
    drawn in the colour of the rank holding query i; a pale cell is computed
    inside a block and masked away; grey hatched cells are in empty blocks,
    which no rank computes; thin lines are document boundaries. Right: per
    rank, the scores it needs (solid) and computes (pale), with each one's
    busiest / mean. ``pieces`` as in :func:`ring_blocks`.
    """
    from matplotlib.patches import Patch

    w = len(pieces)
    n = sum(int(p.numel()) for rank in pieces for p in rank)
    blocks = ring_blocks(pieces, causal=causal, document_ids=document_ids, window=window)
    owner, state = block_cells(blocks, n, causal=causal, document_ids=document_ids, window=window)
    needed, computed = rank_work(blocks, causal=causal, document_ids=document_ids, window=window)

    img = np.ones((n, n, 4))
    for r in range(w):
        rows = (owner == r)[:, None]
        img[rows & (state == 0)] = rank_color(r)
        img[rows & (state == 1)] = _tint(rank_color(r), 0.75)
    img[state == 2] = SKIPPED

    fig, axes = new_figure(1, 2, figsize=(11.0, 5.2), gridspec_kw={"width_ratios": [1.25, 1.0]})
    ax, ax_work = axes[0]
    ax.imshow(img, extent=(-0.5, n - 0.5, n - 0.5, -0.5), interpolation="nearest")
    skipped = np.ma.masked_where(state != 2, np.ones_like(state, dtype=float))
    ax.contourf(np.arange(n), np.arange(n), skipped, levels=[0.5, 1.5], colors="none", hatches=["///"])
    for edge in _doc_edges(document_ids):
        ax.axhline(edge - 0.5, color=COLORS["exact"], lw=0.6)
        ax.axvline(edge - 0.5, color=COLORS["exact"], lw=0.6)
    ax.set_xlabel("key position $j$")
    ax.set_ylabel("query position $i$")
    empty = sum(kind == "empty" for row in blocks for rb in row for _, _, kind in rb)
    total = sum(len(rb) for row in blocks for rb in row)
    ax.set_title(f"{title}\n{empty} of {total} blocks empty (never computed)", fontsize=10)
    handles = [Patch(color=rank_color(r), label=f"rank {r}") for r in range(w)]
    handles += [Patch(color=_tint(rank_color(0), 0.75), label="computed, masked away"),
                Patch(facecolor=SKIPPED, edgecolor="#9a9a9a", hatch="///", label="empty block: skipped")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3, fontsize=8, frameon=False)

    ranks = np.arange(w)
    colors = [rank_color(r) for r in ranks]
    ax_work.bar(ranks, computed, color=[_tint(c, 0.75) for c in colors], edgecolor=colors, width=0.7,
                label="scores computed (blocks not empty)")
    ax_work.bar(ranks, needed, color=colors, width=0.7, label="scores needed (kept by the mask)")
    ax_work.axhline(np.mean(needed), color=COLORS["exact"], ls="--", lw=1, label="perfect balance of the needed")
    ax_work.set_xticks(ranks, [str(r) for r in ranks])
    ax_work.set_xlabel("rank")
    ax_work.set_ylabel("scores per rank (whole ring)")
    ax_work.set_ylim(0, max(max(computed), 1) * 1.3)
    ax_work.set_title(f"busiest / mean: needed {_imbalance(needed):.2f}, computed {_imbalance(computed):.2f}",
                      fontsize=10)
    ax_work.legend(loc="upper left", fontsize=8)
    ax_work.grid(alpha=0.3, axis="y")
    return fig


def plot_layout_work(needed: Mapping[str, Sequence[float]], computed: Mapping[str, Sequence[float]] | None = None,
                     *, title: str = "") -> Figure:
    """Work per rank for each layout, one panel each: the scores each rank needs (solid) and computes (pale).

    ``needed[layout]`` (and ``computed[layout]``, when given) hold one number
    per rank; each panel's title gives busiest / mean of the needed work, the
    imbalance that sets the ring's pace. The dashed line is a perfect balance.
    """
    layouts = list(needed)
    fig, axes = new_figure(1, len(layouts), figsize=(2.9 * len(layouts), 3.9), sharey=True)
    top = max(max(np.asarray((computed or needed)[k], float).max(), max(needed[k])) for k in layouts) * 1.2
    for ax, name in zip(axes[0], layouts):
        need = np.asarray(needed[name], float)
        ranks = np.arange(len(need))
        colors = [rank_color(r) for r in ranks]
        if computed is not None and name in computed:
            ax.bar(ranks, computed[name], color=[_tint(c, 0.75) for c in colors], edgecolor=colors, width=0.7,
                   label="computed")
        ax.bar(ranks, need, color=colors, width=0.7, label="needed")
        ax.axhline(need.mean(), color=COLORS["exact"], ls="--", lw=1, label="perfect balance")
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank")
        ax.set_ylim(0, top)
        ax.set_title(f"{name}\nbusiest / mean = {_imbalance(need):.2f}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("scores per rank (whole ring)")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_window_hops(windows: Sequence[int], hops: Mapping[str, Sequence[int]], bound: Sequence[int], *,
                     shard_len: int, ring_size: int) -> Figure:
    """The K/V hops a causal window needs against its size: counted from the plans (one line per layout)
    against ``min(w − 1, ⌈(W − 1)/c⌉)`` (dashed); grey lines where one more hop starts, ``W = kc + 2``."""
    fig, axes = new_figure(1, 1, figsize=(7.0, 3.8))
    ax = axes[0, 0]
    x = np.asarray(windows, float)
    for i, (name, values) in enumerate(hops.items()):
        ax.step(x, values, where="post", color=rank_color(i), lw=3.0 - 1.2 * i, label=name)
    ax.step(x, bound, "--", where="post", color=COLORS["exact"], lw=1, label=r"$\min(w-1, \lceil (W-1)/c \rceil)$")
    for k in range(ring_size - 1):
        ax.axvline(k * shard_len + 2, color="#bbbbbb", lw=0.6, zorder=0)
    ax.set_xlabel("window $W$ (tokens)")
    ax.set_ylabel("K/V hops sent")
    ax.set_yticks(range(ring_size))
    ax.set_title(f"causal window, w = {ring_size}, c = {shard_len} (grey: W = kc + 2, where hop k + 1 starts)",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def masked_timings(data: Mapping) -> dict[tuple[str, int, str], dict[str, float]]:
    """``{(mask, n, mode): {column: ms}}`` from a ``tools/gpu_masked.py`` file's whole-sequence rows (status ok).

    Columns: ``"ring w"`` for ringbook's production ring of size w (read from
    the row's ``path``), ``"flex"`` (the faster of the two BlockMask
    constructions), ``"varlen"`` and ``"dense_upper_bound"`` (cuDNN dense
    causal, the mask ignored: what not skipping costs).
    """
    import re

    table: dict[tuple[str, int, str], dict[str, float]] = {}
    for r in data.get("rows", []):
        if r.get("where") != "whole" or r.get("status") != "ok" or r.get("ms") is None:
            continue
        name = r["candidate"]
        if name.startswith("ringbook"):
            found = re.search(r"ring_size=(\d+)", r.get("path") or "")
            if found is None:
                continue
            name = f"ring {found.group(1)}"
        elif name in ("flex", "flex_direct"):
            name = "flex"
        slot = table.setdefault((r["mask"], int(r["nq"]), r["mode"]), {})
        slot[name] = min(slot.get(name, float("inf")), float(r["ms"]))
    return table


def plot_masked_timings(table: Mapping[tuple[str, int, str], Mapping[str, float]], *, title: str = "") -> Figure:
    """One panel per pass (fwd, fwd+bwd): for each mask, bars of ms per column of :func:`masked_timings`
    (log scale); ringbook's rings in the rank colours, the peers in grey tones."""
    modes = sorted({mode for _, _, mode in table}, key=lambda m: (len(m), m))
    labels = {"flex": "flex_attention", "varlen": "varlen_attn", "dense_upper_bound": "cuDNN dense causal"}
    peer_colors = {"flex": "#8c8c8c", "varlen": "#555555", "dense_upper_bound": "#d0d0d0"}
    order = list(labels)
    columns = sorted({c for slot in table.values() for c in slot}, key=lambda c: (
        (0, int(c.split()[1])) if c.startswith("ring ") else (1, order.index(c) if c in order else len(order))))
    fig, axes = new_figure(1, len(modes), figsize=(5.2 * len(modes), 4.0), sharey=True)
    width = 0.8 / max(len(columns), 1)
    for ax, mode in zip(axes[0], modes):
        keys = [k for k in table if k[2] == mode]
        x = np.arange(len(keys))
        for j, col in enumerate(columns):
            vals = [table[k].get(col, np.nan) for k in keys]
            color = rank_color(int(col.split()[1]).bit_length()) if col.startswith("ring ") else peer_colors.get(col)
            ax.bar(x + (j - (len(columns) - 1) / 2) * width, vals, width, color=color,
                   label=f"production, {col}" if col.startswith("ring ") else labels.get(col, col))
        ax.set_xticks(x, [f"{m}\n{n:,}" for m, n, _ in keys], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(mode, fontsize=10)
        ax.grid(alpha=0.3, axis="y", which="both")
    axes[0, 0].set_ylabel("ms (median)")
    return legend_below(fig, axes[0, 0], title=title)
