"""Solutions to notebook 05's exercises (checked by ringbook.exercises)."""

import statistics

from ringbook import work_per_rank
from ringbook.bench import DTYPES, TOLERANCE


def row_tflops(row):
    """F = 4·b·h·n²·d, half if causal, 3.5× for forward+backward; over the median time in seconds."""
    flops = 4 * row["batch"] * row["heads"] * row["seq_len"] ** 2 * row["head_dim"]
    flops = flops / 2 if row["causal"] else flops
    flops = flops * 3.5 if row["mode"] == "forward+backward" else flops
    return flops / (row["time_ms"] * 1e-3) / 1e12


def counts_as_result(row):
    """Status ok, error within the dtype's tolerance, median time, TFLOP/s from the shape's work."""
    return (row["status"] == "ok" and row["max_rel_err"] <= TOLERANCE[DTYPES[row["dtype"]]]
            and row["time_ms"] == statistics.median(row["times_ms"])
            and abs(row["tflops"] - row_tflops(row)) <= 1e-9 * row["tflops"])


def ideal_speedup(n, world, causal):
    """Scores of one rank alone over the scores of the busiest rank of the ring."""
    layout = "zigzag" if causal else "contiguous"
    return sum(work_per_rank(n, 1, layout=layout, causal=causal)) / max(work_per_rank(n, world, layout=layout,
                                                                                     causal=causal))
