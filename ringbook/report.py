"""Benchmark results → JSON file, Markdown report and PNG plots.

Everything here reads rows (as :mod:`ringbook.bench` writes them), so a
report or plot can be redrawn at any time from a committed JSON file:
``python -m ringbook report figures/bench-<device>.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
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
    ("Production_r1", "production", 1, 16_384, 22_782),
    ("Production_r4", "production", 4, 32_768, 25_968),
    ("Production_r8", "production", 8, 65_536, 21_931),
    ("Production_r16", "production", 16, 131_072, 41_468),
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
    return f"bench-{device}-{first['dtype']}"


def save_json(rows: list[dict], path: Path, meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta or {}, "rows": rows}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def load_rows(path) -> list[dict]:
    """Rows of a results file written by :func:`save_json`."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "rows" in data:
        return data["rows"]
    if isinstance(data, list):
        return data
    raise ValueError(f"{path} is not a ringbook results file (expected an object with 'rows')")


# --------------------------------------------------------------------------- formatting

def _num(x, fmt="{:,.0f}", missing="-"):
    return missing if x is None else fmt.format(x)


def _label(row: dict) -> str:
    return f"{row['impl']}" + (f"_r{row['ring_size']}" if row.get("ring_size", 1) != 1 else "")


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
        "- TFLOP/s counts 4·b·h·n²·d per forward (half for causal); every row is checked against the "
        "float64 naive reference (max_rel_err = max|out−ref| / max|ref| over the checked query rows)",
    ]
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


def write_outputs(rows: list[dict], out_dir, *, stem: str | None = None, meta: dict | None = None) -> dict:
    """Write ``<stem>.json``, ``<stem>.md``, ``<stem>-throughput.png`` and ``<stem>-memory.png``."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or default_stem(rows)
    paths = {"json": out_dir / f"{stem}.json", "report": out_dir / f"{stem}.md",
             "throughput": out_dir / f"{stem}-throughput.png", "memory": out_dir / f"{stem}-memory.png"}
    save_json(rows, paths["json"], meta)
    paths["report"].write_text(markdown_report(rows, meta))
    for key, metric in (("throughput", "tflops"), ("memory", "peak_mem_gb")):
        fig = plot_results(rows, metric)
        fig.savefig(paths[key], dpi=120)
        plt.close(fig)
    return paths
