"""The notebooks' widgets redraw when their controls move (the checks that used to sit in hidden notebook cells)."""

from __future__ import annotations

import numpy as np
import torch

from ringbook.bench import DTYPES


def test_notebook_05_live_widget_runs_rows_through_its_button():
    from ringbook.bench import IMPLS, run_row
    from ringbook.viz.widgets import bench_row_explorer

    def run(impl, seq_len, ring_size, dtype, causal):
        return run_row(IMPLS[impl], seq_len=seq_len, ring_size=ring_size if IMPLS[impl].ring else 1, causal=causal,
                       dtype=DTYPES[dtype], device=torch.device("cpu"), warmup=0, repeats=1, batch=1, heads=4,
                       head_dim=16)

    explorer = bench_row_explorer(run, seq_lens=[64, 128], ring_sizes=[1, 2], impls=["ring", "production",
                                  "ring_dilated"], dtypes=["float32", "bfloat16"], seq_len=64, ring_size=2, impl="ring")
    controls = {w.description: w for w in explorer.kwargs_widgets}
    for impl, dtype in (("production", "bfloat16"), ("ring_dilated", "float32")):
        controls["implementation"].value, controls["dtype"].value, controls["causal"].value = impl, dtype, True
        explorer.manual_button.click()
    assert [r["impl"] for r in explorer.rows] == ["ring", "production", "ring_dilated"]
    assert all(r["status"] == "ok" for r in explorer.rows)
    assert len(explorer.result.axes[0].patches) == 3


def test_notebook_03_pattern_explorer_redraws():
    from ringbook.viz.widgets import dilated_pattern_explorer

    explorer = dilated_pattern_explorer(64, 8, segment_length=8, dilation_rate=1, num_pairs=3, head=6, heads="grouped")
    assert len(explorer.result.axes) == 2
    explorer.children[4].value = "all"
    explorer.children[1].value = 2
    assert explorer.result.axes[0].get_title() == (
        "head 6: $\\kappa_{ij}$ · segments [8, 16, 32] · rates [2, 4, 8] · heads all")


def test_notebook_04_bug_hunt_redraws_the_chosen_suspect():
    from ringbook.viz.widgets import bug_hunt_explorer

    right = {"right": [0.1, 0.2]}
    suspects = {"suspect A": [0.1, np.inf], "suspect B": [3.0, 0.2]}
    hunt = bug_hunt_explorer(right, suspects, ["full", "causal"], note="a note")
    assert hunt.result.axes[0].get_title().startswith("suspect A")
    hunt.children[0].value = "suspect B"
    ax = hunt.result.axes[0]
    assert ax.get_title().startswith("suspect B")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["right", "suspect B"]
    assert sum(p.get_edgecolor()[0] > 0.6 for p in ax.patches) == 1  # one failing cell outlined
