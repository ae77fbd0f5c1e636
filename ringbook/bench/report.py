"""Benchmark results → the Markdown report and the tables read from rows (summaries, scaling, live rows).

Everything here reads rows (as the sweeps write them), so a report can be
redrawn at any time from a committed file: ``python -m ringbook report
figures/bench-<device>.json``. :func:`write_outputs` writes a run's JSON
(:mod:`~ringbook.bench.results`), its report and its plots
(:mod:`ringbook.viz.results`).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Collection
from pathlib import Path

from .published import SEED_FLAWS, SEED_ROWS
from .results import default_stem, save_json
from .tables import row_label, row_tolerance, series_by_label, summary_rows

# --------------------------------------------------------------------------- formatting

def _num(x, fmt="{:,.0f}", missing="-"):
    return missing if x is None else fmt.format(x)


def _checked(row: dict) -> str:
    """How many query rows were compared with float64 (and, for fwd+bwd, the gradients' rows)."""
    text = _num(row.get("checked_rows"), "{:,}")
    if row.get("mode") == "forward+backward" and row.get("status") == "ok":
        text += f", grads {row['grad_checked_rows']:,}" if row.get("grad_checked_rows") else ", grads finite only"
    return text


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
        "work); a row is ok only if every entry of its output and lse (and gradients) is finite on the checked "
        "call and on the last timed call (the lse −inf exactly where a row sees no key), and its output and lse "
        "are within tolerance of the float64 reference on the compared query rows (max_rel_err = max|out−ref| / "
        "max|ref|); each row's `check` in the JSON says what was done",
    ]
    if any(r.get("mode") == "forward+backward" for r in rows):
        lines.append("- Rows marked fwd+bwd time the forward and `out.backward(dout)`, counted as 3.5 × the "
                     "forward's flops; their dq, dk, dv are checked finite too and compared with the float64 "
                     "reference's on every row where that reference fits in memory (\"grads n\" in the last "
                     "column; \"grads finite only\" where it does not)")
    if any(r.get("per_rank_peak_mem_gb") for r in rows):
        lines.append("- Multi-process rows: time is the median over repeats of the slowest rank; memory is the "
                     "largest per-rank peak (every rank's peak is in the JSON, `per_rank_peak_mem_gb`)")
    lines += [
        "",
        "## Results", "", "### Summary Table", "",
        "| Model | Ring Size | Causal | Max Seq Length | Time at Max | Memory at Max | TFLOP/s at Max | Throughput at Max |",
        "|-------|-----------|--------|----------------|-------------|---------------|----------------|-------------------|",
    ]
    for (label, ring, causal), series in series_by_label(rows).items():
        ok = [r for r in series if r["status"] == "ok"]
        if not ok:
            lines.append(f"| {label} | {ring} | {causal} | none ok | - | - | - | - |")
            continue
        best = max(ok, key=lambda r: r["seq_len"])
        lines.append(
            f"| {label} | {ring} | {causal} | {best['seq_len']:,} | {best['time_ms']:,.2f} ms | "
            f"{_num(best.get('peak_mem_gb'), '{:.2f} GB', 'not measured')} | {best['tflops']:.3g} | "
            f"{best['tokens_per_s']:,.0f} tok/s |"
        )
    lines += ["", "### Detailed Results by Sequence Length", ""]
    for n in seqs:
        lines += [
            f"#### Sequence Length: {n:,} tokens", "",
            "| Model | Ring | Causal | Status | Time (ms) | TFLOP/s | Memory (GB) | Throughput (tok/s) | max_rel_err "
            "| Rows compared |",
            "|-------|------|--------|--------|-----------|---------|-------------|--------------------|-------------"
            "|---------------|",
        ]
        for r in (r for r in rows if r["seq_len"] == n):
            status = {"ok": "✓ ok", "oom": "✗ oom", "error": "✗ error", "skipped": "– skipped"}.get(r["status"],
                                                                                                  r["status"])
            lines.append(
                f"| {row_label(r)} | {r['ring_size']} | {r['causal']} | {status} | {_num(r.get('time_ms'), '{:,.2f}')} | "
                f"{_num(r.get('tflops'), '{:.3g}')} | {_num(r.get('peak_mem_gb'), '{:.2f}')} | "
                f"{_num(r.get('tokens_per_s'))} | {_num(r.get('max_rel_err'), '{:.1e}')} | {_checked(r)} |"
            )
        lines.append("")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["### Rows that did not succeed", "",
                  "| Model | Seq | Causal | Status | Reason |", "|---|---|---|---|---|"]
        for r in failed:
            reason = str(r.get("error") or "").replace("|", "/").replace("\n", " ")
            lines.append(f"| {row_label(r)} | {r['seq_len']:,} | {r['causal']} | {r['status']} | {reason} |")
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
            from .registry import IMPLS

            why = (f"`{impl}` is not in this sweep" if impl in IMPLS
                   else f"`{impl}` is not implemented yet, so nothing is claimed")
            lines.append(f"| {name} | {seed_n:,} | {seed_tps:,} | - | - | not measured: {why} |")
    return lines + [""]


FORMATS = ("json", "md", "png")


def write_outputs(rows: list[dict], out_dir: str | Path, *, stem: str | None = None, meta: dict | None = None,
                  formats: Collection[str] = FORMATS) -> dict:
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
        import matplotlib

        matplotlib.use("Agg", force=False)  # files only: no display needed
        import matplotlib.pyplot as plt

        from ..viz.results import plot_results

        for key, metric in (("throughput", "tflops"), ("memory", "peak_mem_gb")):
            paths[key] = out_dir / f"{stem}-{key}.png"
            fig = plot_results(rows, metric)
            fig.savefig(paths[key], dpi=120)
            plt.close(fig)
    return paths


# --------------------------------------------------------------------------- notebook 05: reading committed results

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
        lines.append(f"| {name} | {s['ring_size']} | {best['seq_len']:,} | "
                     f"{_num(best.get('peak_mem_gb'), '{:.2f} GB', 'not measured')} | "
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
                     f"{_num(r['max_rel_err'], '{:.1e}')} ({row_tolerance(r):g}) | {status} |")
    return "\n".join(lines)


RING_DIST_IMPLS = ("ring_dist", "production_dist", "ring_dilated_dist", "production_dilated_dist")


def scaling_summary(rows: list[dict]) -> list[dict]:
    """Per (causal, seq_len): the ring row against the fastest ok one-GPU row and the fastest ok CP row.

    ``speedup_vs_one_gpu`` = one-GPU time / ring time (``parallel_efficiency``
    = that / the number of GPUs); the one-process ring at the same ring size
    (``peer_of="stacked"``) is reported beside it, not as a baseline; ``cp_time_over_ours`` =
    context_parallel time / ring time (above 1: the ring is faster). A value
    is None where a row is missing or did not succeed.
    """
    def fastest(candidates):
        ok = [r for r in candidates if r["status"] == "ok"]
        return min(ok, key=lambda r: r["time_ms"]) if ok else None

    summary = []
    for causal, n in sorted({(r["causal"], r["seq_len"]) for r in rows}):
        same = [r for r in rows if r["causal"] == causal and r["seq_len"] == n]
        ours = next((r for r in same if r["impl"] in RING_DIST_IMPLS), None)
        one = fastest(r for r in same if r.get("peer_of") == "dist")
        stacked = fastest(r for r in same if r.get("peer_of") == "stacked")
        cp = fastest(r for r in same if r["impl"] == "context_parallel")
        t = ours["time_ms"] if ours is not None and ours["status"] == "ok" else None
        speedup = one["time_ms"] / t if one and t else None
        summary.append({
            "causal": causal, "seq_len": n,
            "impl": ours and ours["impl"], "kernel": ours and ours.get("kernel"), "gpus": ours and ours["ring_size"],
            "status": ours and ours["status"], "time_ms": t,
            "peak_mem_gb": ours and ours.get("peak_mem_gb"),
            "per_rank_peak_mem_gb": ours and ours.get("per_rank_peak_mem_gb"),
            "one_gpu_impl": one and one["impl"], "one_gpu_time_ms": one and one["time_ms"],
            "one_gpu_peak_mem_gb": one and one.get("peak_mem_gb"),
            "speedup_vs_one_gpu": speedup,
            "parallel_efficiency": speedup / ours["ring_size"] if speedup else None,
            "bytes_sent_per_gpu": ours and ours.get("bytes_sent_per_gpu"),
            "stacked_time_ms": stacked and stacked["time_ms"],
            "cp_sdpa_backend": cp and cp["sdpa_backend"], "cp_time_ms": cp and cp["time_ms"],
            "cp_per_rank_peak_mem_gb": cp and cp.get("per_rank_peak_mem_gb"),
            "cp_time_over_ours": cp["time_ms"] / t if cp and t else None,
        })
    return summary


def scaling_rows(one: list[dict], multi: list[dict]) -> list[dict]:
    """Pair each ok multi-GPU row with the fastest ok one-GPU row of the same (seq_len, causal), from two files.

    The same pairing as :func:`scaling_summary` (which reads one multi-process
    run with its peers), for rows of separate runs. Returns plain dicts:
    seq_len, causal, world, time_one_ms, time_multi_ms, speedup (one / multi),
    mem_one_gb and mem_per_rank_gb (the largest per-rank peak of the multi-GPU row).
    """
    tagged = [{**r, "peer_of": "dist"} for r in one] + list(multi)
    return [{"seq_len": s["seq_len"], "causal": s["causal"], "world": s["gpus"], "time_one_ms": s["one_gpu_time_ms"],
             "time_multi_ms": s["time_ms"], "speedup": s["speedup_vs_one_gpu"], "mem_one_gb": s["one_gpu_peak_mem_gb"],
             "mem_per_rank_gb": max(s["per_rank_peak_mem_gb"] or [s["peak_mem_gb"]])}
            for s in scaling_summary(tagged) if s["speedup_vs_one_gpu"] is not None]
