"""Exercises of notebook 05 (measuring): recompute a row's TFLOP/s, spot a row that is not a result, the ideal speed-up."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np
import torch

from .._utils import attention_flops
from ..bench import DTYPES, TOLERANCE
from ..schedule import work_per_rank
from ._core import _run


def _number(got) -> float | None:
    """A plain or numpy/torch scalar as a float; None for anything else (a list, a string, a bool)."""
    if isinstance(got, bool) or got is None:
        return None
    if isinstance(got, torch.Tensor):
        return float(got) if got.numel() == 1 and got.is_floating_point() else None
    try:
        return float(got)
    except (TypeError, ValueError):
        return None


def _as_bool(got) -> bool | None:
    """True/False for a Python, numpy or one-element torch bool; None for anything else (1, "yes", [True])."""
    if isinstance(got, bool):
        return got
    if isinstance(got, torch.Tensor):
        return bool(got) if got.dtype == torch.bool and got.numel() == 1 else None
    if isinstance(got, np.bool_):
        return bool(got)
    return None


def _rel_close(got, want: float, rtol: float = 1e-9) -> bool:
    x = _number(got)
    return x is not None and abs(x - want) <= rtol * abs(want)


def _row(seq_len=8192, *, batch=1, heads=8, head_dim=64, causal=False, mode="forward", times=(2.0, 2.5, 2.2),
         dtype="bfloat16", err=3e-3, status="ok") -> dict:
    """A benchmark row as ``ringbook.bench.run_row`` writes it (the fields the exercises read)."""
    flops = attention_flops(batch, heads, seq_len, seq_len, head_dim, causal) * (3.5 if mode == "forward+backward"
                                                                                 else 1)
    t = statistics.median(times)
    return {"impl": "production", "seq_len": seq_len, "ring_size": 4, "causal": causal, "dtype": dtype,
            "batch": batch, "heads": heads, "head_dim": head_dim, "mode": mode, "flops": flops, "time_ms": t,
            "times_ms": list(times), "tflops": flops / (t * 1e-3) / 1e12, "tokens_per_s": batch * seq_len / (t * 1e-3),
            "max_rel_err": err, "status": status, "error": None if status == "ok" else "ran out of memory"}


def check_row_tflops(fn: Callable) -> bool | None:
    """``fn(row) -> TFLOP/s``: from the row's shape, mask, mode and median time, not from its ``flops`` field."""
    cases = []
    for label, kw in (("8K, forward, no mask", {}), ("8K, causal", {"causal": True}),
                      ("odd shape b=3 h=5 d=24, n=1000", {"seq_len": 1000, "batch": 3, "heads": 5, "head_dim": 24}),
                      ("64K, forward+backward, causal", {"seq_len": 65536, "causal": True, "mode": "forward+backward"}),
                      ("16K, forward+backward", {"seq_len": 16384, "mode": "forward+backward", "times": (9.0,)})):
        row = _row(**kw)
        want = row["tflops"]
        row = dict(row, flops=None, tflops=None)  # the answer must come from the shape and the time
        cases.append((label, (row,), want, _rel_close))

    def hint(c):
        x = _number(c["got"])
        if x is not None and c["want"]:
            r = x / c["want"]
            for factor, why in ((1000, "time_ms is in milliseconds: divide the FLOPs by time_ms · 1e-3 seconds"),
                                (2, "a causal row counts half the work: F/2"),
                                (1 / 3.5, "a forward+backward row counts 3.5 F (the backward does 2.5× the forward)")):
                if any(abs(r - f) < 1e-6 * f for f in (factor, 1 / factor)):
                    return why
        return "F = 4·b·h·n²·d (half if causal, 3.5× if forward+backward), TFLOP/s = F / (t · 10¹²) with t in seconds"
    return _run("row_tflops", fn, cases, hint)


def check_counts_as_result(fn: Callable) -> bool | None:
    """``fn(row) -> bool``: whether a benchmark row may be quoted as a result (section 1's rules)."""
    tol = TOLERANCE[DTYPES["bfloat16"]]
    good = _row()
    cases = [("a good row", good, True),
             ("status oom", _row(status="oom"), False),
             (f"error 2× the bf16 tolerance {tol:g}", _row(err=2 * tol), False),
             ("error exactly at the tolerance", _row(err=tol), True),
             ("a NaN error", _row(err=float("nan")), False),
             ("time_ms is the fastest repeat, not the median", dict(_row(), time_ms=2.0), False),
             ("TFLOP/s credited dense work to a causal row", dict(_row(causal=True), tflops=good["tflops"]), False),
             ("a float32 row within its (tighter) tolerance",
              _row(dtype="float32", err=TOLERANCE[DTYPES["float32"]] / 2), True),
             ("a float32 row at the bf16 tolerance", _row(dtype="float32", err=tol), False),
             ("a good causal forward+backward row", _row(causal=True, mode="forward+backward"), True)]
    return _run("counts_as_result", fn, [(label, (row,), want, lambda got, want: _as_bool(got) is want)
                                          for label, row, want in cases], lambda c: (
        "a bool (True/False), not " + type(c["got"]).__name__ if _as_bool(c["got"]) is None else
        "all four rules: status ok; max_rel_err ≤ TOLERANCE[DTYPES[row['dtype']]] (a NaN is never ≤); time_ms is the "
        "median of times_ms; tflops agrees with the work of the row's shape, mask and mode over time_ms"))


def check_ideal_speedup(fn: Callable) -> bool | None:
    """``fn(n, world, causal) -> float``: the speed-up the work allows, one rank (ring size 1) → ``world`` ranks."""
    cases = []
    for n, w in ((64, 2), (64, 4), (96, 3), (128, 8), (32, 1)):
        for causal in (False, True):
            layout = "zigzag" if causal else "contiguous"
            want = sum(work_per_rank(n, 1, layout=layout, causal=causal)) / max(
                work_per_rank(n, w, layout=layout, causal=causal))
            cases.append((f"n={n}, world={w}, {'causal (zigzag)' if causal else 'no mask (contiguous)'}",
                          (n, w, causal), want, lambda got, want: _rel_close(got, want, 1e-9)))
    return _run("ideal_speedup", fn, cases, lambda c: (
        "the slowest rank sets the time: divide the scores one rank computes alone by the largest count of any rank "
        "of the ring (ringbook.work_per_rank gives both; the one rank still computes its masked diagonal blocks)"))
