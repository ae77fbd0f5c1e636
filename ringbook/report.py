"""Benchmark results → JSON file, Markdown report and PNG plots.

Everything here reads rows (as :mod:`ringbook.bench` writes them), so a
report or plot can be redrawn at any time from a committed JSON file:
``python -m ringbook report figures/bench-<device>.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from pathlib import Path

# The seed report's rows (../shared/seed/benchmark-report.md), kept until
# ringbook measures the same configurations correctly. Each entry: the seed's
# claim, and why that claim does not measure ring attention.
SEED_ROWS = [
    # name, impl, ring_size, seed's max seq, seed's throughput at max (tok/s)
    ("RingDilatedV2_r1", "ring_dilated", 1, 16_384, 36_731),
    ("RingDilatedV2_r4", "ring_dilated", 4, 32_768, 17_172),
    ("RingDilatedV2_r8", "ring_dilated", 8, 65_536, 16_276),
    ("Production_r1", "production_dilated", 1, 16_384, 22_782),
    ("Production_r4", "production_dilated", 4, 32_768, 25_968),
    ("Production_r8", "production_dilated", 8, 65_536, 21_931),
    ("Production_r16", "production_dilated", 16, 131_072, 41_468),
]
SEED_FLAWS = (
    "each chunk attended only to itself (no K/V moved, nothing merged); head groups whose segment "
    "did not fit the chunk were skipped and left at zero; queries were never dilated; memory was "
    "read after the run, not at its peak (seed/NOTES.md)"
)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_stem(rows: list[dict]) -> str:
    """``bench-<device>-<dtype>``, e.g. ``bench-nvidia-h100-80gb-hbm3-bfloat16``."""
    first = rows[0]
    device = "cpu" if first.get("device_type") == "cpu" else slug(first["device"])
    return f"bench-{device}-{first['dtype']}" + ("-fwd-bwd" if first.get("mode") == "forward+backward" else "")


def save_json(rows: list[dict], path: Path, meta: dict | None = None) -> Path:
    """Write ``{"meta": …, "rows": …}`` atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta or {}, "rows": rows}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


class ResultsFileError(ValueError):
    """A results file that cannot be read as benchmark rows; the message names the file and the problem."""


STATUSES = ("ok", "oom", "error")
# key: (types, description) of what every benchmark row carries (the report reads these)
ROW_FIELDS = {
    "impl": ((str,), "an implementation name"),
    "seq_len": ((int,), "a positive int"),
    "ring_size": ((int,), "a positive int"),
    "causal": ((bool,), "true or false"),
    "status": ((str,), f"one of {list(STATUSES)}"),
    "dtype": ((str,), "a dtype name"),
    "device": ((str,), "a device name"),
    "torch_version": ((str,), "a version string"),
    "batch": ((int,), "a positive int"),
    "heads": ((int,), "a positive int"),
    "head_dim": ((int,), "a positive int"),
}
OK_NUMBERS = ("time_ms", "tflops", "tokens_per_s", "max_rel_err")


def check_row(row, where: str) -> None:
    """Raise :class:`ResultsFileError` unless ``row`` is a benchmark row the report can draw.

    An ``ok`` row must have finite ``time_ms``, ``tflops``, ``tokens_per_s`` and
    ``max_rel_err`` (and a finite or missing ``peak_mem_gb``): a number that is
    not finite cannot be an ok result.
    """
    if not isinstance(row, dict):
        raise ResultsFileError(f"{where} must be an object, got {type(row).__name__}")
    for key, (types, what) in ROW_FIELDS.items():
        if key not in row:
            raise ResultsFileError(f"{where} has no {key!r} (expected {what})")
        value = row[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise ResultsFileError(f"{where} has {key}={value!r}; expected {what}")
        if types == (int,) and value <= 0:
            raise ResultsFileError(f"{where} has {key}={value!r}; expected {what}")
    if row["status"] not in STATUSES:
        raise ResultsFileError(f"{where} has status={row['status']!r}; expected one of {list(STATUSES)}")
    if row["status"] == "ok":
        for key in OK_NUMBERS + (("peak_mem_gb",) if row.get("peak_mem_gb") is not None else ()):
            x = row.get(key)
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
                raise ResultsFileError(f"{where} has status 'ok' but {key}={x!r}; an ok row needs a finite number")


def load_results(path, *, validate: bool = True) -> tuple[list[dict], dict]:
    """``(rows, meta)`` of a results file written by :func:`save_json` (or a bare list of rows).

    Raises :class:`ResultsFileError` naming the file for a missing, unreadable,
    empty, binary or corrupt file, or (with ``validate``) a row the report
    cannot draw (:func:`check_row`).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ResultsFileError(f"{path} is a directory; expected a results .json file") from None
    except OSError as exc:
        raise ResultsFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ResultsFileError(f"{path} is not a text file; expected a results .json file") from None
    if not text.strip():
        raise ResultsFileError(f"{path} is empty; expected a results .json file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsFileError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if isinstance(data, list):
        rows, meta = data, {}
    elif isinstance(data, dict) and "rows" in data:
        rows, meta = data["rows"], data.get("meta") or {}
    else:
        raise ResultsFileError(f"{path} is not a ringbook results file (expected an object with 'rows' or a list "
                               f"of rows, got {type(data).__name__}{' with keys ' + str(sorted(data)[:5]) if isinstance(data, dict) else ''})")
    if not isinstance(rows, list):
        raise ResultsFileError(f"{path}: 'rows' must be a list of rows, got {type(rows).__name__}")
    if not isinstance(meta, dict):
        raise ResultsFileError(f"{path}: 'meta' must be an object, got {type(meta).__name__}")
    if validate:
        if not rows:
            raise ResultsFileError(f"{path} has no rows: nothing to report")
        for i, row in enumerate(rows):
            check_row(row, f"{path}: row {i}")
    return rows, meta


def load_rows(path) -> list[dict]:
    """Rows of a results file written by :func:`save_json` (any row shape; see :func:`load_results`)."""
    return load_results(path, validate=False)[0]


# --------------------------------------------------------------------------- formatting

def _num(x, fmt="{:,.0f}", missing="-"):
    return missing if x is None else fmt.format(x)


def _label(row: dict) -> str:
    return (f"{row['impl']}" + (f"_r{row['ring_size']}" if row.get("ring_size", 1) != 1 else "")
            + (" fwd+bwd" if row.get("mode") == "forward+backward" else ""))


def _series(rows):
    out = {}
    for r in rows:
        out.setdefault((_label(r), r["ring_size"], r["causal"]), []).append(r)
    return out


def markdown_report(rows: list[dict], meta: dict | None = None) -> str:
    """A report in the layout of the seed's, with what the seed left out."""
    if not rows:
        raise ValueError("rows is empty: nothing to report")
    meta = meta or {}
    first = rows[0]
    seqs = sorted({r["seq_len"] for r in rows})
    lines = [
        "# Ring Attention Benchmark (ringbook)", "",
        f"Generated: {meta.get('generated', _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'))}", "",
        "## Configuration", "",
        f"- Device: {first['device']}",
        f"- PyTorch: {first['torch_version']}" + (f", CUDA {first['cuda_version']}" if first.get("cuda_version") else ""),
        f"- ringbook: {first.get('ringbook_version', '?')}",
        f"- dtype: {first['dtype']}",
        f"- Batch size: {first['batch']}, heads: {first['heads']}, head dim: {first['head_dim']}",
        f"- Sequence lengths tested: {seqs}",
        f"- Timing: {first.get('timer', '?')}; {meta.get('warmup', '?')} warm-up call(s), then the median of "
        f"up to {meta.get('repeats', '?')} timed calls",
        f"- Peak memory: {first.get('peak_mem_kind', '?')}",
        "- TFLOP/s counts 4·b·h·n²·d per forward (half for causal; the dilated rows count their dilated "
        "work); every row is checked against the float64 reference (max_rel_err = max|out−ref| / max|ref| "
        "over the checked query rows)",
    ]
    if any(r.get("mode") == "forward+backward" for r in rows):
        lines.append("- Rows marked fwd+bwd time the forward and `out.backward(dout)`, counted as 3.5 × the "
                     "forward's flops; their check is on the forward output")
    if any(r.get("per_rank_peak_mem_gb") for r in rows):
        lines.append("- Multi-process rows: time is the median over repeats of the slowest rank; memory is the "
                     "largest per-rank peak (every rank's peak is in the JSON, `per_rank_peak_mem_gb`)")
    lines += [
        "",
        "## Results", "", "### Summary Table", "",
        "| Model | Ring Size | Causal | Max Seq Length | Time at Max | Memory at Max | TFLOP/s at Max | Throughput at Max |",
        "|-------|-----------|--------|----------------|-------------|---------------|----------------|-------------------|",
    ]
    for (label, ring, causal), series in _series(rows).items():
        ok = [r for r in series if r["status"] == "ok"]
        if not ok:
            lines.append(f"| {label} | {ring} | {causal} | none ok | - | - | - | - |")
            continue
        best = max(ok, key=lambda r: r["seq_len"])
        lines.append(
            f"| {label} | {ring} | {causal} | {best['seq_len']:,} | {best['time_ms']:,.2f} ms | "
            f"{best['peak_mem_gb']:.2f} GB | {best['tflops']:.3g} | {best['tokens_per_s']:,.0f} tok/s |"
        )
    lines += ["", "### Detailed Results by Sequence Length", ""]
    for n in seqs:
        lines += [
            f"#### Sequence Length: {n:,} tokens", "",
            "| Model | Ring | Causal | Status | Time (ms) | TFLOP/s | Memory (GB) | Throughput (tok/s) | max_rel_err |",
            "|-------|------|--------|--------|-----------|---------|-------------|--------------------|-------------|",
        ]
        for r in (r for r in rows if r["seq_len"] == n):
            status = {"ok": "✓ ok", "oom": "✗ oom", "error": "✗ error"}.get(r["status"], r["status"])
            lines.append(
                f"| {_label(r)} | {r['ring_size']} | {r['causal']} | {status} | {_num(r['time_ms'], '{:,.2f}')} | "
                f"{_num(r['tflops'], '{:.3g}')} | {_num(r['peak_mem_gb'], '{:.2f}')} | "
                f"{_num(r['tokens_per_s'])} | {_num(r['max_rel_err'], '{:.1e}')} |"
            )
        lines.append("")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["### Rows that did not succeed", "",
                  "| Model | Seq | Causal | Status | Reason |", "|---|---|---|---|---|"]
        for r in failed:
            reason = str(r.get("error") or "").replace("|", "/").replace("\n", " ")
            lines.append(f"| {_label(r)} | {r['seq_len']:,} | {r['causal']} | {r['status']} | {reason} |")
        lines.append("")
    lines += seed_section(rows)
    return "\n".join(lines) + "\n"


def seed_section(rows: list[dict]) -> list[str]:
    """The seed's rows beside what ringbook measured for the same configuration."""
    lines = [
        "## The seed's rows", "",
        f"The seed report's numbers do not measure ring attention: {SEED_FLAWS}. Its rows stay here "
        "until ringbook measures the same configuration computing the exact function.", "",
        "| Seed row | Seed: max seq | Seed: tok/s at max | ringbook: max seq (ok) | ringbook: tok/s at max | Status |",
        "|---|---|---|---|---|---|",
    ]
    for name, impl, ring, seed_n, seed_tps in SEED_ROWS:
        ours = [r for r in rows if r["impl"] == impl and r["ring_size"] == ring and r["status"] == "ok"]
        if ours:
            best = max(ours, key=lambda r: r["seq_len"])
            lines.append(f"| {name} | {seed_n:,} | {seed_tps:,} | {best['seq_len']:,} | "
                         f"{best['tokens_per_s']:,.0f} | measured (exact) |")
        else:
            from .bench import IMPLS

            why = (f"`{impl}` is not in this sweep" if impl in IMPLS
                   else f"`{impl}` is not implemented yet, so nothing is claimed")
            lines.append(f"| {name} | {seed_n:,} | {seed_tps:,} | - | - | not measured: {why} |")
    return lines + [""]


# --------------------------------------------------------------------------- plots

def plot_results(rows: list[dict], metric: str = "tflops"):
    """Throughput (``tflops`` or ``tokens_per_s``) or ``peak_mem_gb`` against seq_len. -> Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = {"tflops": "TFLOP/s (forward)", "tokens_per_s": "tokens / s", "peak_mem_gb": "peak memory (GB)"}
    if metric not in labels:
        raise ValueError(f"metric must be one of {sorted(labels)}, got {metric!r}")
    series_all = _series(rows)
    names = sorted({label for label, _, _ in series_all}, key=lambda x: list(dict.fromkeys(
        label for label, _, _ in series_all)).index(x))
    colors = {name: plt.cm.tab20(i % 20) for i, name in enumerate(names)}
    styles = ["-", "--", "-.", ":"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, causal in zip(axes, (False, True)):
        for (label, _ring, c), series in series_all.items():
            if c != causal:
                continue
            ok = sorted((r for r in series if r["status"] == "ok"), key=lambda r: r["seq_len"])
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


FORMATS = ("json", "md", "png")


def write_outputs(rows: list[dict], out_dir, *, stem: str | None = None, meta: dict | None = None,
                  formats=FORMATS) -> dict:
    """Write ``<stem>.json``, ``<stem>.md``, ``<stem>-throughput.png`` and ``<stem>-memory.png``.

    ``formats``: which of ``json``, ``md`` (the report) and ``png`` (both plots) to write.
    Returns the written paths by kind (``json``, ``report``, ``throughput``, ``memory``).
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats must be among {FORMATS}, got {sorted(unknown)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or default_stem(rows)
    paths = {}
    if "json" in formats:
        paths["json"] = save_json(rows, out_dir / f"{stem}.json", meta)
    if "md" in formats:
        paths["report"] = out_dir / f"{stem}.md"
        paths["report"].write_text(markdown_report(rows, meta))
    if "png" in formats:
        import matplotlib.pyplot as plt

        for key, metric in (("throughput", "tflops"), ("memory", "peak_mem_gb")):
            paths[key] = out_dir / f"{stem}-{key}.png"
            fig = plot_results(rows, metric)
            fig.savefig(paths[key], dpi=120)
            plt.close(fig)
    return paths


# --------------------------------------------------------------------------- notebook 05: reading committed results

RING_STYLES = {1: ("-", "o"), 2: ("-", "P"), 4: ("--", "s"), 8: ("-.", "^"), 16: (":", "D")}
IMPL_COLORS = {  # one colour per implementation in notebook 05's figures
    "ring": "#4c72b0", "ring_dist": "#4c72b0", "ring_dilated": "#55a868", "production": "#c44e52",
    "blockwise": "#8172b3", "naive": "#937860", "sdpa": "#8c8c8c", "sdpa_cudnn": "#222222",
    "sdpa_flash": "#dd8452", "sdpa_efficient": "#da8bc3", "production_dilated": "#17becf",
    "production_dist": "#c44e52", "context_parallel": "#8172b3",
}


def _tolerance(row: dict) -> float:
    from .bench import DTYPES, TOLERANCE

    return TOLERANCE[DTYPES[row["dtype"]]]


def _why_stopped(series: list[dict], best: dict | None) -> str:
    """Why a series has no longer ok row: the first row after its longest ok one, or the sweep's end."""
    after = sorted((r for r in series if best is None or r["seq_len"] > best["seq_len"]), key=lambda r: r["seq_len"])
    if not after:
        return "end of the sweep"
    r = after[0]
    error = str(r.get("error") or "")
    if r["status"] == "oom":
        return f"out of memory at {r['seq_len']:,}" + (" (by estimate)" if error.startswith("not run") else "")
    if "max_row_seconds" in error:
        return f"time limit: {r['seq_len']:,} not run (> max_row_seconds)"
    return f"{r['status']} at {r['seq_len']:,}: {error[:60]}"


def summary_rows(rows: list[dict], *, impls: list[str] | None = None, causal: bool | None = False) -> list[dict]:
    """One entry per (impl, ring size): its longest ok row (``best``, None if none) and why the series stops.

    ``impls`` fixes the order (default: order of appearance); ``causal=None`` takes both settings.
    """
    order = impls or list(dict.fromkeys(r["impl"] for r in rows))
    out = []
    for impl in order:
        for ring in sorted({r["ring_size"] for r in rows if r["impl"] == impl}):
            series = [r for r in rows if r["impl"] == impl and r["ring_size"] == ring
                      and (causal is None or r["causal"] == causal)]
            if not series:
                continue
            ok = [r for r in series if r["status"] == "ok"]
            best = max(ok, key=lambda r: r["seq_len"]) if ok else None
            out.append({"impl": impl, "ring_size": ring, "best": best, "stopped": _why_stopped(series, best)})
    return out


def summary_markdown(rows: list[dict], *, impls: list[str] | None = None, causal: bool = False,
                     labels: dict | None = None) -> str:
    """The seed report's summary table (Model | Ring Size | Max Seq Length | Memory at Max | Throughput at
    Max), with TFLOP/s and why each series stops. Memory is the ``peak_mem_gb`` of the row."""
    labels = labels or {}
    lines = [
        "| Model | Ring Size | Max Seq Length | Memory at Max | Throughput at Max | TFLOP/s at Max | Stops because |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary_rows(rows, impls=impls, causal=causal):
        name = labels.get(s["impl"], s["impl"])
        best = s["best"]
        if best is None:
            lines.append(f"| {name} | {s['ring_size']} | none ok | - | - | - | {s['stopped']} |")
            continue
        lines.append(f"| {name} | {s['ring_size']} | {best['seq_len']:,} | {best['peak_mem_gb']:.2f} GB | "
                     f"{best['tokens_per_s']:,.0f} tok/s | {best['tflops']:.3g} | {s['stopped']} |")
    return "\n".join(lines)


def live_rows_markdown(rows: list[dict]) -> str:
    """Rows measured live (e.g. by the widget of notebook 05) as a Markdown table."""
    lines = ["| impl | n | ring | causal | dtype | time (ms) | TFLOP/s | max_rel_err (tolerance) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f": {str(r.get('error'))[:80]}" if r["status"] != "ok" and r.get("error") else "")
        lines.append(f"| {r['impl']} | {r['seq_len']:,} | {r['ring_size']} | {r['causal']} | {r['dtype']} | "
                     f"{_num(r['time_ms'], '{:,.2f}')} | {_num(r['tflops'], '{:.3g}')} | "
                     f"{_num(r['max_rel_err'], '{:.1e}')} ({_tolerance(r):g}) | {status} |")
    return "\n".join(lines)


def plot_live_rows(rows: list[dict]):
    """Bars for rows measured live: TFLOP/s (labelled with the median time) and max_rel_err against the
    dtype's tolerance (red ticks). Rows that are not ok are drawn grey and labelled with their status. -> Figure"""
    import numpy as np

    from .plots import COLORS, new_figure

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
    tol = np.array([_tolerance(r) for r in rows])
    ax_e.vlines(tol, y - 0.4, y + 0.4, color=COLORS["max"], lw=2)
    ax_e.set_yticks(y, [""] * len(rows))
    ax_e.invert_yaxis()
    ax_e.set_xlim(min(err.min(), 1e-12) / 10, tol.max() * 30)
    ax_e.set_xlabel("max_rel_err against the float64 reference")
    ax_e.set_title("error; red: the dtype's tolerance (above it, status error)", fontsize=9)
    ax_e.grid(alpha=0.3, axis="x")
    return fig


def plot_sweep(rows: list[dict], *, impls: list[str] | None = None, title: str | None = None):
    """TFLOP/s (top) and peak memory (bottom) against sequence length, non-causal (left) and causal (right).

    Colour = implementation, line style and marker = ring size; only ok rows are drawn, an × marks the
    length at which a series ran out of memory. -> Figure
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    from .plots import new_figure

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
                ax.plot([r["seq_len"] for r in ok], [r[metric] for r in ok], ls=ls, marker=marker,
                        ms=4 if len(ok) > 1 else 8,
                        color=color, lw=1.3)
                if oom:
                    ax.plot([oom[0]["seq_len"]], [ok[-1][metric]], marker="x", ms=9, mew=2, color=color, ls="")
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


def scaling_rows(one: list[dict], multi: list[dict]) -> list[dict]:
    """Pair each ok multi-GPU row with the ok one-GPU row of the same (seq_len, causal).

    Returns plain dicts: seq_len, causal, world, time_one_ms, time_multi_ms, speedup (one / multi),
    mem_one_gb and mem_per_rank_gb (the largest per-rank peak of the multi-GPU row).
    """
    base = {(r["seq_len"], r["causal"]): r for r in one if r["status"] == "ok"}
    out = []
    for r in sorted((r for r in multi if r["status"] == "ok"), key=lambda r: (r["causal"], r["seq_len"])):
        b = base.get((r["seq_len"], r["causal"]))
        if b is None:
            continue
        per_rank = r.get("per_rank_peak_mem_gb") or [r["peak_mem_gb"]]
        out.append({"seq_len": r["seq_len"], "causal": r["causal"], "world": r["ring_size"],
                    "time_one_ms": b["time_ms"], "time_multi_ms": r["time_ms"],
                    "speedup": b["time_ms"] / r["time_ms"], "mem_one_gb": b["peak_mem_gb"],
                    "mem_per_rank_gb": max(per_rank)})
    return out


def plot_scaling(pairs: list[dict], *, target: float | None = None, target_label: str = "target",
                 one_label: str = "one GPU", multi_label: str = "per GPU of the ring", axes=None):
    """From :func:`scaling_rows`: speed-up against sequence length (ideal = world size, dashed; ``target``
    dotted) and peak memory per GPU, one GPU against each GPU of the ring. ``axes``: two existing axes
    (speed-up, memory) to draw into instead of a new figure. -> Figure"""
    import numpy as np

    from .plots import COLORS, new_figure

    if not pairs:
        raise ValueError("no pairs: the one-GPU and multi-GPU rows share no (seq_len, causal)")
    if axes is None:
        fig, axes = new_figure(1, 2, figsize=(12.0, 4.3))
        ax_s, ax_m = axes[0]
    else:
        ax_s, ax_m = axes
        fig = ax_s.figure
    world = pairs[0]["world"]
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
        ax_s.bar_label(bars, fmt="%.2f×", fontsize=8, padding=2,
                       bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none"})
        ax_m.plot([seqs.index(n) for n in ps], [p["mem_one_gb"] for p in ps.values()], "o-", color=color,
                  label=f"{one_label}, {'causal' if causal else 'non-causal'}")
        ax_m.plot([seqs.index(n) for n in ps], [p["mem_per_rank_gb"] for p in ps.values()], "s--", color=color,
                  label=f"{multi_label}, {'causal' if causal else 'non-causal'}")
    ax_s.axhline(world, color=COLORS["exact"], ls="--", lw=1, label=f"ideal: {world}×")
    if target is not None:
        ax_s.axhline(target, color=COLORS["max"], ls=":", lw=1.5, label=f"{target_label}: {target:g}×")
    ax_s.set_xticks(x, [f"{n // 1024}K" for n in seqs])
    ax_s.set_xlabel("sequence length n (tokens)")
    ax_s.set_ylabel("time on one GPU / time on the ring")
    ax_s.set_ylim(0, max(max(p["speedup"] for p in pairs), world) * 1.25)
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


def plot_ratios(rows: list[dict], targets: dict[str, float]):
    """Horizontal bars of ``ratio_vs_sdpa`` (production time vs the fastest SDPA backend, >1 = faster), one
    per row of a GPU check, coloured by ``section``; each bar's target (``targets[section]``) is a red tick,
    1× a dashed line. -> Figure"""
    import numpy as np
    from matplotlib.patches import Patch

    from .plots import COLORS, new_figure

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
    tgt = [targets.get(r["section"]) for r in rows]
    ty = [yi for yi, t in zip(y, tgt) if t is not None]
    ax.vlines([t for t in tgt if t is not None], np.array(ty) - 0.42, np.array(ty) + 0.42, color=COLORS["max"],
              lw=2.2, label="target")
    ax.axvline(1.0, color=COLORS["exact"], ls="--", lw=1, label="as fast as the fastest SDPA")
    ax.set_yticks(y, [f"{r['section']}: {r['name']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(ratio.max(), 1.0) * 1.18)
    ax.set_xlabel("fastest SDPA time / production time (> 1: production is faster)")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=color, label=s) for s, color in zip(sections, palette)]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    return fig
