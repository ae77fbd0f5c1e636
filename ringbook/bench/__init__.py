"""Measurement: how ringbook times, checks and reports attention.

==============  ==============================================================
module          what it holds
==============  ==============================================================
``measure``     the only timer (CUDA events / ``perf_counter``), peak memory,
                the environment record, the checks: every entry of a call's
                results, and the float64 reference (out, lse, gradients)
``rules``       the tolerance table, flash-attention's 2× rule, a row's verdict
``registry``    the implementations the benchmark measures, by name
``sweep``       one row per configuration; the sweep ``python -m ringbook bench`` runs
``dist_sweep``  the same over ``torchrun`` processes (``python -m ringbook.bench.dist_sweep``)
``results``     results files: JSON written atomically, read with checks
``report``      the Markdown report and the tables read from rows
``published``   the seed report's rows and the speed targets (data)
``cli``         ``python -m ringbook bench`` / ``report``
==============  ==============================================================

matplotlib is imported only where a plot is drawn (:mod:`ringbook.viz`).
"""

from .measure import (
    Reference,
    WrongResult,
    check_against_reference,
    check_whole,
    compare,
    environment,
    gradient_error,
    peak_memory_gb,
    reference_check,
    reference_error,
    relative_error,
    time_call,
    time_once,
)
from .registry import IMPLS, Impl, bench_dilated_config, register
from .rules import DTYPES, TOLERANCE, rounding_atol, verdict, within_2x_rule
from .sweep import BACKWARD_FLOPS_FACTOR, SweepConfig, default_config, new_row, planned_rows, run_row, run_sweep

__all__ = [
    "Reference", "WrongResult", "check_against_reference", "check_whole", "compare", "environment", "gradient_error",
    "peak_memory_gb", "reference_check", "reference_error",
    "relative_error", "time_call", "time_once", "IMPLS", "Impl", "register", "bench_dilated_config", "DTYPES",
    "TOLERANCE", "rounding_atol", "verdict", "within_2x_rule", "BACKWARD_FLOPS_FACTOR", "SweepConfig",
    "default_config", "new_row", "planned_rows", "run_row", "run_sweep",
]
