"""Notebook 05's readers of committed results: summary tables, scaling pairs, and the figures drawn from rows."""

from __future__ import annotations

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from ringbook.bench import (  # noqa: E402
    IMPLS,
    report,  # noqa: E402
    run_row,
)
from ringbook.viz import results as viz_results  # noqa: E402


def _row(impl, n, *, ring=1, causal=False, status="ok", time_ms=None, mem=None, error=None, **extra):
    time_ms = time_ms if time_ms is not None or status != "ok" else n / 1000
    return {"device": "TestGPU", "device_type": "cuda", "torch_version": "x", "dtype": "bfloat16", "batch": 1,
            "heads": 8, "head_dim": 64, "impl": impl, "seq_len": n, "ring_size": ring, "causal": causal,
            "status": status, "error": error, "time_ms": time_ms,
            "tflops": None if time_ms is None else 4 * 8 * n * n * 64 / (time_ms * 1e-3) / 1e12,
            "tokens_per_s": None if time_ms is None else n / (time_ms * 1e-3),
            "peak_mem_gb": mem if mem is not None else (None if status != "ok" else n / 1e4),
            "max_rel_err": None if status != "ok" else 1e-3, **extra}


ROWS = [
    _row("ring", 1024, ring=4), _row("ring", 2048, ring=4),
    _row("ring", 4096, ring=4, status="skipped", error="not run: a call is predicted to take 9 s "
                                                     "(> max_row_seconds=4), from 2 s at seq_len 2,048"),
    _row("naive", 1024), _row("naive", 2048, status="oom", error="OutOfMemoryError: CUDA out of memory"),
    _row("naive", 4096, status="oom", error="not run: seq_len 2,048 already ran out of memory"),
    _row("sdpa_cudnn", 1024), _row("sdpa_cudnn", 4096),
    _row("sdpa_cudnn", 1024, causal=True), _row("sdpa_cudnn", 4096, causal=True),
    _row("blockwise", 1024, status="error", error="RuntimeError: boom"),
]


def test_summary_rows_pick_the_longest_ok_row_and_say_why_the_series_stops():
    summary = {(s["impl"], s["ring_size"]): s for s in report.summary_rows(ROWS, causal=False)}
    assert summary[("ring", 4)]["best"]["seq_len"] == 2048
    assert "time limit" in summary[("ring", 4)]["stopped"]
    assert summary[("naive", 1)]["best"]["seq_len"] == 1024
    assert summary[("naive", 1)]["stopped"] == "out of memory at 2,048"
    assert summary[("sdpa_cudnn", 1)]["stopped"] == "end of the sweep"
    assert summary[("blockwise", 1)]["best"] is None and "boom" in summary[("blockwise", 1)]["stopped"]
    # causal=True keeps only causal rows; causal=None both
    assert [s["impl"] for s in report.summary_rows(ROWS, causal=True)] == ["sdpa_cudnn"]
    assert len(report.summary_rows(ROWS, causal=None)) == len(summary)


def test_summary_markdown_has_the_seed_columns_and_the_numbers_of_the_rows():
    text = report.summary_markdown(ROWS, impls=["ring", "sdpa_cudnn", "blockwise"], labels={"ring": "our ring"})
    lines = text.splitlines()
    assert lines[0].startswith("| Model | Ring Size | Max Seq Length | Memory at Max | Throughput at Max |")
    assert len(lines) == 2 + 3
    best = ROWS[1]
    assert f"| our ring | 4 | 2,048 | {best['peak_mem_gb']:.2f} GB | {best['tokens_per_s']:,.0f} tok/s |" in lines[2]
    assert "none ok" in lines[4]


def test_scaling_rows_pair_by_length_and_mask():
    one = [_row("ring", 1024, time_ms=10.0, mem=4.0), _row("ring", 1024, causal=True, time_ms=8.0, mem=2.0),
           _row("ring", 2048, time_ms=40.0, mem=8.0)]
    multi = [_row("ring_dist", 1024, ring=2, time_ms=5.0, mem=2.1, per_rank_peak_mem_gb=[2.0, 2.1]),
             _row("ring_dist", 1024, ring=2, causal=True, time_ms=3.2, mem=1.0),
             _row("ring_dist", 4096, ring=2, time_ms=9.0)]  # no one-GPU row at 4096: left out
    pairs = report.scaling_rows(one, multi)
    assert [(p["seq_len"], p["causal"]) for p in pairs] == [(1024, False), (1024, True)]
    assert pairs[0]["speedup"] == 2.0 and pairs[0]["mem_per_rank_gb"] == 2.1 and pairs[0]["world"] == 2
    assert pairs[1]["speedup"] == 2.5 and pairs[1]["mem_per_rank_gb"] == 1.0
    fig = viz_results.plot_scaling(pairs, target=1.9)
    speed_ax = fig.axes[0]
    assert [round(p.get_height(), 6) for p in speed_ax.patches] == [2.0, 2.5]
    assert {line.get_ydata()[0] for line in speed_ax.get_lines()} == {2, 1.9}  # ideal and target
    with pytest.raises(ValueError, match="no pairs"):
        viz_results.plot_scaling([])


def test_plot_sweep_draws_one_line_per_ok_series_and_marks_oom():
    fig = viz_results.plot_sweep(ROWS, impls=["ring", "naive", "sdpa_cudnn"])
    (tf_nc, tf_c), (mem_nc, _) = fig.axes[0:2], fig.axes[2:4]
    drawn = [line for line in tf_nc.get_lines() if line.get_linestyle() != "None"]
    assert len(drawn) == 3  # ring w=4, naive, sdpa_cudnn (non-causal)
    ring_line = next(line for line in drawn if list(line.get_xdata()) == [1024, 2048])
    assert list(ring_line.get_ydata()) == [ROWS[0]["tflops"], ROWS[1]["tflops"]]
    oom = [line for line in tf_nc.get_lines() if line.get_marker() == "x"]
    assert [list(line.get_xdata()) for line in oom] == [[2048]]  # where naive ran out of memory
    assert len(tf_c.get_lines()) == 1 and tf_nc.get_title() == "non-causal"
    assert mem_nc.get_ylabel().startswith("peak memory")
    with pytest.raises(ValueError, match="no rows"):
        viz_results.plot_sweep(ROWS, impls=["production"])


def test_plot_ratios_draws_each_ratio_and_its_target():
    rows = [{"section": "fwd", "name": "a", "ratio_vs_sdpa": 1.04},
            {"section": "fwd", "name": "b", "ratio_vs_sdpa": 0.9},
            {"section": "fwd+bwd", "name": "c", "ratio_vs_sdpa": 0.6}, {"section": "correct", "name": "d"}]
    fig = viz_results.plot_ratios(rows, {"fwd": 0.95, "fwd+bwd": 0.85})
    ax = fig.axes[0]
    assert [round(p.get_width(), 6) for p in ax.patches] == [1.04, 0.9, 0.6]  # the row without a ratio is left out
    ticks = ax.collections[0].get_segments()
    assert [seg[0][0] for seg in ticks] == [0.95, 0.95, 0.85]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fwd: a", "fwd: b", "fwd+bwd: c"]


def test_live_rows_from_run_row_render_as_table_and_bars():
    rows = [run_row(IMPLS[name], seq_len=64, ring_size=2, causal=causal, dtype=torch.float32, batch=1, heads=2,
                    head_dim=8, device=torch.device("cpu"), warmup=1, repeats=3)
            for name, causal in (("ring", False), ("production", True))]
    rows.append({**rows[0], "status": "error", "error": "wrong result: too far", "time_ms": None, "tflops": None,
                 "max_rel_err": 1.0})
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    text = report.live_rows_markdown(rows)
    assert text.count("\n") == 1 + len(rows) and "(0.0001)" in text and "error: wrong result" in text
    fig = viz_results.plot_live_rows(rows)
    tf_ax, err_ax = fig.axes
    assert [round(p.get_width(), 12) for p in tf_ax.patches] == [round(rows[0]["tflops"], 12),
                                                                round(rows[1]["tflops"], 12), 0.0]
    assert [p.get_width() for p in err_ax.patches] == [r["max_rel_err"] for r in rows]
    assert [seg[0][0] for seg in err_ax.collections[0].get_segments()] == [1e-4] * 3  # float32 tolerance
    with pytest.raises(ValueError, match="empty"):
        viz_results.plot_live_rows([])


def test_bench_row_explorer_measures_on_build_and_on_click():
    pytest.importorskip("ipywidgets")
    from ringbook.viz.widgets import bench_row_explorer

    calls = []

    def run(**values):
        calls.append(values)
        return run_row(IMPLS[values["impl"]], seq_len=values["seq_len"], ring_size=values["ring_size"],
                       causal=values["causal"], dtype=torch.float32, batch=1, heads=2, head_dim=8,
                       device=torch.device("cpu"), warmup=1, repeats=3)

    w = bench_row_explorer(run, seq_lens=[32, 64], ring_sizes=[1, 2], impls=["ring", "blockwise"],
                           dtypes=["float32"], seq_len=64, ring_size=2)
    assert calls == [{"seq_len": 64, "ring_size": 2, "impl": "ring", "dtype": "float32", "causal": False}]
    controls = {c.description: c for c in w.kwargs_widgets}
    controls["implementation"].value = "blockwise"
    assert len(calls) == 1  # changing a control does not measure; the button does
    w.manual_button.click()
    assert calls[-1]["impl"] == "blockwise" and [r["impl"] for r in w.rows] == ["ring", "blockwise"]
    assert len(w.result.axes[0].patches) == 2
