"""Figures of notebook 08 (choosing a strategy). Pure functions: predictions and cases in, a Figure out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from .figure import new_figure

if TYPE_CHECKING:
    from ..costmodel import Timeline


def plot_strategy_times(predictions: Sequence, *, title: str = "", memory: float | None = None) -> Figure:
    """Predicted time per strategy (bars, fastest first, the winner darker) and memory per device beside it.

    ``predictions``: :class:`ringbook.costmodel.Prediction` objects; ruled-out
    ones are listed with the reason instead of a bar. ``memory``: the card's
    bytes, drawn as a line on the memory panel.
    """
    preds = list(predictions)
    if not preds:
        raise ValueError("predictions is empty")
    fig, axes = new_figure(1, 2, figsize=(11.0, 0.45 * len(preds) + 1.8), gridspec_kw={"width_ratios": [2.2, 1]})
    ax, axm = axes[0]
    ok = [p for p in preds if p.ok]
    best = min((p.total for p in ok), default=None)
    y = np.arange(len(preds))
    for i, p in enumerate(preds):
        if p.ok:
            win = p.total == best
            ax.barh(i, p.total * 1e3, color="#1f5fa8" if win else "#9bbbe0")
            ax.text(p.total * 1e3, i, f" {p.total * 1e3:,.1f} ms" + ("  ← fastest" if win else ""), va="center",
                    fontsize=8)
        else:
            ax.text(0, i, f" ruled out: {p.ruled_out[:70]}", va="center", fontsize=7, color="#a33")
        if not np.isnan(p.memory):
            axm.barh(i, p.memory / 1e9, color="#9a9a9a" if p.ok else "#e0a0a0")
    ax.set_yticks(y, [p.label for p in preds])
    ax.invert_yaxis()
    ax.set_xlabel("predicted time (ms)")
    ax.set_title(title or "predicted time per strategy", fontsize=10)
    top = max((p.total for p in ok), default=1.0) * 1e3
    ax.set_xlim(0, top * 1.35)
    axm.set_yticks(y, [])
    axm.invert_yaxis()
    if memory is not None:
        axm.axvline(memory / 1e9, color="#a33", ls="--", lw=1)
        axm.text(memory / 1e9, -0.6, " card", color="#a33", fontsize=8, va="bottom")
    axm.set_xlabel("memory per device (GB, tensors only)")
    return fig


def plot_timeline(timeline: Timeline, device: int = 0, *, title: str = "") -> Figure:
    """One device's compute and communication streams over time (a :class:`ringbook.costmodel.Timeline`)."""
    if not 0 <= device < timeline.devices:
        raise ValueError(f"device must be in 0…{timeline.devices - 1}, got {device}")
    fig, axes = new_figure(figsize=(10.0, 2.4))
    ax = axes[0, 0]
    colors = {"compute": "#1f5fa8", "comm": "#d9822b"}
    for row, stream in enumerate(("compute", "comm")):
        for iv in timeline.of(device, stream):
            ax.broken_barh([(iv.start * 1e3, (iv.end - iv.start) * 1e3)], (row - 0.35, 0.7), color=colors[stream],
                           edgecolor="white", linewidth=0.5, alpha=0.9 if "backward" not in iv.label else 0.6)
    ax.set_yticks([0, 1], ["compute", "communication"])
    ax.set_ylim(1.6, -0.6)
    ax.set_xlim(0, timeline.total * 1e3 * 1.02)
    ax.set_xlabel("time (ms)")
    ax.set_title(title or f"device {device}: total {timeline.total * 1e3:,.2f} ms", fontsize=10)
    return fig


def plot_predicted_vs_measured(cases: Sequence, *, bound: float = 0.25, title: str = "") -> Figure:
    """Predicted against measured time for every case (log axes), with the ±``bound`` band; open marks: unheld."""
    if not cases:
        raise ValueError("cases is empty")
    fig, axes = new_figure(figsize=(6.5, 6.0))
    ax = axes[0, 0]
    groups: dict[str, list] = {}
    for c in cases:
        groups.setdefault(c.what.split(" ")[0], []).append(c)
    for name, cs in groups.items():
        held = [c for c in cs if c.held]
        free = [c for c in cs if not c.held]
        pts = ax.scatter([c.measured_ms for c in held], [c.predicted_ms for c in held], s=22, label=name)
        if free:
            ax.scatter([c.measured_ms for c in free], [c.predicted_ms for c in free], s=22, facecolors="none",
                       edgecolors=pts.get_facecolor())
    lo = min(min(c.measured_ms, c.predicted_ms) for c in cases) * 0.7
    hi = max(max(c.measured_ms, c.predicted_ms) for c in cases) * 1.4
    xs = np.array([lo, hi])
    ax.plot(xs, xs, color="#222", lw=1)
    ax.fill_between(xs, xs * (1 - bound), xs * (1 + bound), color="#888", alpha=0.15, label=f"±{bound:.0%}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or "model vs every committed run, H100 and H200 rows\n(open: not held — blocks < 8K rows, "
                          "engine-bound masked rows)", fontsize=10)
    return fig


def plot_overlap_threshold(rates: Sequence[float], thresholds: Mapping[str, Sequence[float]],
                           links: Mapping[str, float], *, title: str = "") -> Figure:
    """Tokens per device a ring hop needs to hide (y) against the kernel rate (x), one line per case.

    ``thresholds[name]``: the threshold at each of ``rates`` (FLOP/s);
    ``links``: name → bandwidth, written on the lines' labels by the caller.
    """
    fig, axes = new_figure(figsize=(8.0, 4.5))
    ax = axes[0, 0]
    for name, ys in thresholds.items():
        ax.plot(np.asarray(rates) / 1e12, ys, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("kernel rate F (TFLOP/s)")
    ax.set_ylabel("tokens per device c for the hop to hide")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    if links:
        ax.text(0.99, 0.02, "; ".join(f"{k}: {v / 1e9:g} GB/s" for k, v in links.items()), transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7, color="#555")
    ax.set_title(title or "below its line a ring hop shows: the overlap condition", fontsize=10)
    return fig


def plot_time_sweep(panels: Sequence[tuple[str, Sequence[float], Mapping[str, Sequence[float]]]], *,
                    title: str = "") -> Figure:
    """Predicted time per strategy (one line each) against a workload knob, one panel per knob.

    ``panels``: ``(x label, xs, {strategy label: seconds at each x})``;
    NaN (a ruled-out strategy) leaves a gap. Log axes; the fastest line at
    each x is not marked: read it off the bottom.
    """
    if not panels:
        raise ValueError("panels is empty")
    fig, axes = new_figure(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    names = list(dict.fromkeys(name for _, _, times in panels for name in sorted(times)))  # one color each
    for ax, (xlabel, xs, times) in zip(axes[0], panels):
        for name, ys in times.items():
            i = names.index(name)
            ax.plot(xs, np.asarray(ys, dtype=float) * 1e3, ["-", "--"][i // 10 % 2], color=f"C{i % 10}", marker="o",
                    ms=3, label=name if ax is axes[0][0] or name not in panels[0][2] else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("predicted time (ms)")
        ax.grid(True, which="both", alpha=0.25)
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
