"""Figures of benchmark results (the report's plots and notebook 05's): pure functions of result rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator

from ..bench.tables import row_tolerance, series_by_label, summary_rows
from .figure import new_figure
from .palette import COLORS, IMPL_COLORS, RING_STYLES


def plot_results(rows: list[dict], metric: str = "tflops") -> Figure:
    """Throughput (``tflops`` or ``tokens_per_s``) or ``peak_mem_gb`` against seq_len. -> Figure."""
    labels = {"tflops": "TFLOP/s (forward)", "tokens_per_s": "tokens / s", "peak_mem_gb": "peak memory (GB)"}
    if metric not in labels:
        raise ValueError(f"metric must be one of {sorted(labels)}, got {metric!r}")
    series_all = series_by_label(rows)
    names = sorted({label for label, _, _ in series_all}, key=lambda x: list(dict.fromkeys(
        label for label, _, _ in series_all)).index(x))
    colors = {name: plt.cm.tab20(i % 20) for i, name in enumerate(names)}
    styles = ["-", "--", "-.", ":"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, causal in zip(axes, (False, True)):
        for (label, _ring, c), series in series_all.items():
            if c != causal:
                continue
            ok = sorted((r for r in series if r["status"] == "ok" and r.get(metric) is not None),
                        key=lambda r: r["seq_len"])  # an ok row may lack a peak (a CPU where it cannot be reset)
            if not ok:
                continue
            (line,) = ax.plot([r["seq_len"] for r in ok], [r[metric] for r in ok], marker="o", ms=4,
                              color=colors[label], ls=styles[names.index(label) // 20 % 4], label=label)
            oom = [r for r in series if r["status"] == "oom" and not str(r.get("error")).startswith("not run")]
            for r in oom[:1]:  # where the series ran out of memory
                ax.plot([r["seq_len"]], [ok[-1][metric]], marker="x", ms=9, mew=2, color=colors[label], ls="")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title("causal" if causal else "non-causal")
        ax.grid(alpha=0.3, which="both")
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines() if not h.get_label().startswith("_")}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(0.86, 0.5), fontsize=8,
                   title="× = out of memory", title_fontsize=8)
    axes[0].set_ylabel(labels[metric])
    first = rows[0]
    fig.suptitle(f"{labels[metric]} — {first['device']}, {first['dtype']}, b={first['batch']} "
                 f"h={first['heads']} d={first['head_dim']}, torch {first['torch_version']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    return fig


def plot_live_rows(rows: list[dict]) -> Figure:
    """Bars for rows measured live: TFLOP/s (labelled with the median time) and max_rel_err against the
    dtype's tolerance (red ticks). Rows that are not ok are drawn grey and labelled with their status. -> Figure"""
    if not rows:
        raise ValueError("rows is empty: run at least one configuration")
    names = [f"{r['impl']} n={r['seq_len']} w={r['ring_size']}{' causal' if r['causal'] else ''} {r['dtype']}"
             for r in rows]
    ok = [r["status"] == "ok" for r in rows]
    y = np.arange(len(rows))
    fig, axes = new_figure(1, 2, figsize=(11.0, 0.42 * len(rows) + 1.6))
    ax_t, ax_e = axes[0]
    tf = np.array([r["tflops"] or 0.0 for r in rows])
    ax_t.barh(y, tf, color=[COLORS["score"] if g else COLORS["unseen"] for g in ok], height=0.6)
    for yi, r, g, v in zip(y, rows, ok, tf):
        text = f"{r['time_ms']:,.2f} ms" if r["time_ms"] is not None else r["status"]
        ax_t.annotate(text if g else f"{text} ({r['status']})", xy=(v, yi), xytext=(4, 0),
                      textcoords="offset points", va="center", fontsize=8)
    ax_t.set_yticks(y, names, fontsize=8)
    ax_t.invert_yaxis()
    ax_t.set_xlim(0, max(tf.max(), 1e-9) * 1.45)
    ax_t.set_xlabel("TFLOP/s (forward, 4·b·h·n²·d, half if causal)")
    ax_t.set_title(f"measured live on {rows[-1]['device']}", fontsize=9)
    ax_t.grid(alpha=0.3, axis="x")
    err = np.array([max(r["max_rel_err"] or 0.0, 1e-18) for r in rows])
    ax_e.barh(y, err, color=[COLORS["norm"] if g else COLORS["unseen"] for g in ok], height=0.6, log=True)
    tol = np.array([row_tolerance(r) for r in rows])
    ax_e.vlines(tol, y - 0.4, y + 0.4, color=COLORS["max"], lw=2)
    ax_e.set_yticks(y, [""] * len(rows))
    ax_e.invert_yaxis()
    ax_e.set_xlim(min(err.min(), 1e-12) / 10, tol.max() * 30)
    ax_e.set_xlabel("max_rel_err against the float64 reference")
    ax_e.set_title("error; red: the dtype's tolerance (above it, status error)", fontsize=9)
    ax_e.grid(alpha=0.3, axis="x")
    return fig


def plot_sweep(rows: list[dict], *, impls: list[str] | None = None, title: str | None = None) -> Figure:
    """TFLOP/s (top) and peak memory (bottom) against sequence length, non-causal (left) and causal (right).

    Colour = implementation, line style and marker = ring size; only ok rows are drawn, an × marks the
    length at which a series ran out of memory. -> Figure
    """
    order = impls or list(dict.fromkeys(r["impl"] for r in rows))
    rows = [r for r in rows if r["impl"] in order]
    if not rows:
        raise ValueError(f"no rows for implementations {order}")
    fig, axes = new_figure(2, 2, figsize=(13.0, 8.4), sharex=True)
    rings = sorted({r["ring_size"] for r in rows})
    for col, causal in enumerate((False, True)):
        for s in summary_rows(rows, impls=order, causal=causal):
            series = sorted((r for r in rows if r["impl"] == s["impl"] and r["ring_size"] == s["ring_size"]
                             and r["causal"] == causal), key=lambda r: r["seq_len"])
            ok = [r for r in series if r["status"] == "ok"]
            if not ok:
                continue
            ls, marker = RING_STYLES.get(s["ring_size"], ("-", "o"))
            color = IMPL_COLORS.get(s["impl"], "#999999")
            oom = [r for r in series if r["status"] == "oom" and r["seq_len"] > ok[-1]["seq_len"]]
            for row, metric in ((0, "tflops"), (1, "peak_mem_gb")):
                ax = axes[row, col]
                drawn = [r for r in ok if r.get(metric) is not None]
                if not drawn:
                    continue
                ax.plot([r["seq_len"] for r in drawn], [r[metric] for r in drawn], ls=ls, marker=marker,
                        ms=4 if len(ok) > 1 else 8,
                        color=color, lw=1.3)
                if oom:
                    ax.plot([oom[0]["seq_len"]], [drawn[-1][metric]], marker="x", ms=9, mew=2, color=color, ls="")
        for row in (0, 1):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
        axes[0, col].set_title("causal" if causal else "non-causal")
        axes[1, col].set_xlabel("sequence length n (tokens)")
    axes[0, 0].set_ylabel("TFLOP/s (forward)")
    axes[1, 0].set_ylabel("peak memory of one call (GB)")
    seqs = sorted({r["seq_len"] for r in rows})
    for ax in axes[1]:
        ax.set_xticks(seqs, [f"{n // 1024}K" if n < 2**20 else f"{n // 2**20}M" for n in seqs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.tick_params(axis="x", labelrotation=45)
    impl_handles = [Line2D([], [], color=IMPL_COLORS.get(i, "#999999"), lw=2, label=i) for i in order
                    if any(r["impl"] == i for r in rows)]
    ring_handles = [Line2D([], [], color="#444444", ls=RING_STYLES.get(w, ("-", "o"))[0],
                           marker=RING_STYLES.get(w, ("-", "o"))[1], ms=4, label=f"ring size {w}") for w in rings]
    oom_handle = [Line2D([], [], color="#444444", marker="x", ms=8, mew=2, ls="", label="out of memory")]
    fig.legend(handles=impl_handles + ring_handles + oom_handle, loc="outside right center", fontsize=8)
    first = rows[0]
    fig.suptitle(title or f"{first['device']}, {first['dtype']}, b={first['batch']} h={first['heads']} "
                          f"d={first['head_dim']}, torch {first['torch_version']}", fontsize=10)
    return fig


def plot_scaling(pairs: list[dict], *, target: float | None = None, target_label: str = "target",
                 one_label: str = "one GPU", multi_label: str = "per GPU of the ring",
                 axes: Sequence[Axes] | None = None, ideal: Mapping[bool, float] | None = None) -> Figure:
    """From :func:`scaling_rows`: speed-up against sequence length and peak memory per GPU, one GPU against
    each GPU of the ring. ``ideal[causal]``: the speed-up the work allows, drawn dashed over that mask's bars
    (default: the world size for both; a causal one-GPU baseline that computes masked scores allows more,
    notebook 05). ``target`` dotted. ``axes``: two existing axes (speed-up, memory) to draw into instead of a
    new figure. -> Figure"""
    if not pairs:
        raise ValueError("no pairs: the one-GPU and multi-GPU rows share no (seq_len, causal)")
    if axes is None:
        fig, axes = new_figure(1, 2, figsize=(12.0, 4.3))
        ax_s, ax_m = axes[0]
    else:
        ax_s, ax_m = axes
        fig = ax_s.figure
    world = pairs[0]["world"]
    ideal = {False: world, True: world} if ideal is None else dict(ideal)
    seqs = sorted({p["seq_len"] for p in pairs})
    x = np.arange(len(seqs))
    for k, causal in enumerate((False, True)):
        ps = {p["seq_len"]: p for p in pairs if p["causal"] == causal}
        if not ps:
            continue
        color = COLORS["score"] if not causal else COLORS["partial"]
        xs = np.array([x[seqs.index(n)] for n in ps]) + (k - 0.5) * 0.38
        bars = ax_s.bar(xs, [p["speedup"] for p in ps.values()], width=0.36, color=color,
                        label="causal" if causal else "non-causal")
        ax_s.bar_label(bars, fmt="%.2f×", fontsize=8, padding=2, label_type="center", color="white")
        for i, xi in enumerate(xs):  # the ideal over each bar of this mask
            ax_s.plot([xi - 0.18, xi + 0.18], [ideal[causal]] * 2, color=COLORS["max"] if causal else COLORS["exact"],
                      ls=":" if causal else "--", lw=1.6, label=None if i else
                      f"ideal, {'causal' if causal else 'non-causal'}: {ideal[causal]:g}× (the work allows)")
        ax_m.plot([seqs.index(n) for n in ps], [p["mem_one_gb"] for p in ps.values()], "o-", color=color,
                  label=f"{one_label}, {'causal' if causal else 'non-causal'}")
        ax_m.plot([seqs.index(n) for n in ps], [p["mem_per_rank_gb"] for p in ps.values()], "s--", color=color,
                  label=f"{multi_label}, {'causal' if causal else 'non-causal'}")
    if target is not None:
        ax_s.axhline(target, color=COLORS["max"], ls=":", lw=1.5, label=f"{target_label}: {target:g}×")
    ax_s.set_xticks(x, [f"{n // 1024}K" for n in seqs])
    ax_s.set_xlabel("sequence length n (tokens)")
    ax_s.set_ylabel("time on one GPU / time on the ring")
    ax_s.set_ylim(0, max(max(p["speedup"] for p in pairs), *ideal.values()) * 1.3)
    ax_s.set_title(f"speed-up, one GPU → {world} GPUs", fontsize=10)
    ax_s.legend(loc="upper left", fontsize=8)
    ax_s.grid(alpha=0.3, axis="y")
    ax_m.set_xticks(x, [f"{n // 1024}K" for n in seqs])
    ax_m.set_yscale("log")
    ax_m.set_xlabel("sequence length n (tokens)")
    ax_m.set_ylabel("peak memory (GB)")
    ax_m.set_title("peak memory: one GPU vs each GPU of the ring", fontsize=10)
    ax_m.legend(loc="upper left", fontsize=8)
    ax_m.grid(alpha=0.3, which="both")
    return fig


def plot_ratios(rows: list[dict], targets: dict[str, float] | None = None, *, peer: str = "the fastest SDPA",
                ours: str = "production") -> Figure:
    """Horizontal bars of ``ratio_vs_sdpa`` (the peer's time / ours, >1 = ours is faster; the peer is the
    fastest SDPA backend unless ``peer`` names another), one per row of a GPU check, coloured by
    ``section``; 1× is a dashed line, and a bar's target (``targets[section]``, when given) a red tick. -> Figure"""
    rows = [r for r in rows if r.get("ratio_vs_sdpa") is not None]
    if not rows:
        raise ValueError("no rows with ratio_vs_sdpa")
    palette = [COLORS["score"], COLORS["partial"], COLORS["norm"], COLORS["unseen"]]
    sections = list(dict.fromkeys(r["section"] for r in rows))
    y = np.arange(len(rows))
    ratio = np.array([r["ratio_vs_sdpa"] for r in rows])
    fig, axes = new_figure(figsize=(9.0, 0.36 * len(rows) + 1.5))
    ax = axes[0, 0]
    bars = ax.barh(y, ratio, height=0.62, color=[palette[sections.index(r["section"]) % 4] for r in rows])
    ax.bar_label(bars, fmt="%.3f×", fontsize=8, padding=3)
    tgt = [(targets or {}).get(r["section"]) for r in rows]
    ty = [yi for yi, t in zip(y, tgt) if t is not None]
    if ty:
        ax.vlines([t for t in tgt if t is not None], np.array(ty) - 0.42, np.array(ty) + 0.42, color=COLORS["max"],
                  lw=2.2, label="target")
    ax.axvline(1.0, color=COLORS["exact"], ls="--", lw=1, label=f"as fast as {peer}")
    ax.set_yticks(y, [f"{r['section']}: {r['name']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(ratio.max(), 1.0) * 1.45)  # room on the right for the labels and the legend
    ax.set_xlabel(f"{peer} time / {ours} time (> 1: {ours} is faster)")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=color, label=s) for s, color in zip(sections, palette)]
    # above the bars, outside the axes (constrained layout makes room): it never covers a bar or its label
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="x")
    return fig


def plot_gpu_bars(picks: Mapping[bool, Sequence[tuple[str, dict]]], *, ideal: Mapping[bool, float],
                  axes: Sequence[Axes] | None = None, title: str = "") -> Figure:
    """Grouped bars per mask: speed-up over the first pick of that mask (its one-GPU baseline) and the peak memory
    of the largest GPU. ``picks[causal]``: ``(label, row)`` with ``time_ms``, ``gpus``, ``impl`` and
    ``per_rank_peak_mem_gb`` or ``peak_mem_gb``; two-GPU bars are hatched. ``ideal[causal]``: the speed-up the
    work allows, dashed over that mask's bars. -> Figure"""
    if axes is None:
        fig, grid = new_figure(1, 2, figsize=(12.0, 4.3))
        ax_t, ax_m = grid[0]
    else:
        ax_t, ax_m = axes
        fig = ax_t.figure
    n = max(len(v) for v in picks.values())
    width = 0.8 / n
    for k, causal in enumerate(sorted(picks)):
        base = picks[causal][0][1]["time_ms"]
        for i, (label, r) in enumerate(picks[causal]):
            x = k + (i - (n - 1) / 2) * width
            key = r["impl"] if r["impl"] != "context_parallel" else f"context_parallel {r.get('sdpa_backend')}"
            color = IMPL_COLORS.get(r["impl"], "#999999") if "flash" not in key else IMPL_COLORS["sdpa_flash"]
            style = {"color": color, "hatch": "//" if r["gpus"] == 2 else None, "edgecolor": "white"}
            bar = ax_t.bar([x], [base / r["time_ms"]], width=width * 0.92, label=label if k == 0 else None, **style)
            ax_t.bar_label(bar, fmt="%.2f×", fontsize=7, padding=2)
            mem = max(r.get("per_rank_peak_mem_gb") or [r["peak_mem_gb"]])
            bar = ax_m.bar([x], [mem], width=width * 0.92, label=label if k == 0 else None, **style)
            ax_m.bar_label(bar, fmt="%.2f", fontsize=7, padding=2)
        ax_t.hlines([ideal[causal]], k - 0.42, k + 0.42, color=COLORS["exact"], ls="--", lw=1.2,
                    label=f"ideal: {ideal[causal]:g}× (the work allows)" if k == 0 else None)
    labels = ["causal (zigzag)" if c else "non-causal" for c in sorted(picks)]
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(picks)), labels)
        ax.grid(alpha=0.3, axis="y")
    ax_t.set_ylim(0, 1.45 * max(max(ideal.values()), 1.0))
    ax_t.set_ylabel("one-GPU time / time")
    ax_t.set_title(f"speed-up over one GPU{title}", fontsize=10)
    ax_t.legend(fontsize=7, loc="upper right", ncol=2)
    mems = [max(r.get("per_rank_peak_mem_gb") or [r["peak_mem_gb"]]) for v in picks.values() for _, r in v]
    ax_m.set_ylim(0, 1.3 * max(mems))
    ax_m.set_ylabel("peak memory (GB), the largest of the GPUs")
    ax_m.set_title(f"peak memory per GPU{title}", fontsize=10)
    ax_m.legend(fontsize=7, loc="upper left", ncol=2)
    return fig


def plot_dilated_ring_sizes(rows: Sequence[dict], *, title: str = "") -> Figure:
    """What the ring size changes for dilated ring attention, and what it does not.

    ``rows``: one per (ring size, causal) with ``ring_size``, ``causal``, ``time_ms`` (measured in one process),
    ``sent_mb`` (the most any rank would send over a real ring, from the plan) and ``imbalance`` (the busiest
    rank's scores over the mean, from the plan). Three panels against the ring size: the one-process time, the
    bytes a rank sends, the imbalance. -> Figure"""
    fig, axes = new_figure(1, 3, figsize=(13.0, 3.9))
    sizes = sorted({r["ring_size"] for r in rows})
    x = np.arange(len(sizes))
    panels = (("time_ms", "time of one call (ms)", "one process: the same calls, timed per ring size"),
              ("sent_mb", "MB sent by the busiest rank", "a real ring: bytes a rank sends (plan)"),
              ("imbalance", "busiest rank's scores / mean", "a real ring: work imbalance (plan)"))
    for ax, (key, ylabel, head) in zip(axes[0], panels):
        for k, causal in enumerate((False, True)):
            got = {r["ring_size"]: r[key] for r in rows if r["causal"] == causal}
            if not got:
                continue
            bars = ax.bar(x + (k - 0.5) * 0.38, [got.get(w, np.nan) for w in sizes], width=0.36,
                          color=COLORS["partial"] if causal else COLORS["score"],
                          label="causal" if causal else "non-causal")
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_xticks(x, [str(w) for w in sizes])
        ax.set_xlabel("ring size w")
        ax.set_ylabel(ylabel)
        ax.set_title(head, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.2)
    axes[0, 2].axhline(1.0, color=COLORS["exact"], ls="--", lw=1)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
