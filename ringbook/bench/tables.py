"""Benchmark rows as series and summaries: pure data, read by the report (:mod:`ringbook.bench.report`) and the
plots (:mod:`ringbook.viz.results`), so neither imports the other's module for it."""

from __future__ import annotations

from .rules import DTYPES, TOLERANCE

__all__ = ["row_label", "row_tolerance", "series_by_label", "summary_rows"]


def row_label(row: dict) -> str:
    """``impl_r<ring>`` (plus `` fwd+bwd``): how a row's series is named in tables and legends."""
    return (f"{row['impl']}" + (f"_r{row['ring_size']}" if row.get("ring_size", 1) != 1 else "")
            + (" fwd+bwd" if row.get("mode") == "forward+backward" else ""))


def series_by_label(rows: list[dict]) -> dict:
    """Rows grouped by (label, ring size, causal), in order of appearance."""
    out = {}
    for r in rows:
        out.setdefault((row_label(r), r["ring_size"], r["causal"]), []).append(r)
    return out


def row_tolerance(row: dict) -> float:
    """The largest max_rel_err an ok row of this dtype may have (:data:`ringbook.bench.rules.TOLERANCE`)."""
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


