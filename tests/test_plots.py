"""The plots and widgets of notebook 02 draw what the schedule says (matplotlib Agg, no display)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from ringbook import LAYOUTS, layout_positions, ring_schedule, work_per_rank  # noqa: E402
from ringbook.demo import ring_memory_bytes  # noqa: E402
from ringbook.viz import (  # noqa: E402
    plot_causal_work,
    plot_memory_per_rank,
    plot_ring_step,
    ring_step_cells,
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, w", [(8, 1), (16, 2), (24, 3), (32, 4)])
def test_ring_step_cells_follow_the_schedule(layout, causal, n, w):
    owner, origin, step, state = ring_step_cells(n, w, layout=layout, causal=causal)
    pos = layout_positions(n, w, layout)
    for r in range(w):
        assert (owner[pos[r].numpy()] == r).all() and (origin[pos[r].numpy()] == r).all()
    i, j = np.indices((n, n))
    if causal:
        assert ((state == 0) == ((j <= i) & (state != 2))).all()  # needed: exactly the visible cells
        assert (state[j <= i] == 0).all()  # no visible cell is skipped or masked
    else:
        assert (state == 0).all()
    # cells computed at step t by rank r are that step's tile areas
    sched = ring_schedule(n, w, layout=layout, causal=causal)
    for t in range(w):
        for r in range(w):
            cells = ((owner[:, None] == r) & (step == t) & (state != 2)).sum()
            assert cells == sched[t][r].work
    computed = [((owner[:, None] == r) & (state != 2)).sum() for r in range(w)]
    assert computed == work_per_rank(n, w, layout=layout, causal=causal)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plot_ring_step_draws_every_step(layout):
    for t in range(4):
        fig = plot_ring_step(32, 4, t, layout=layout, causal=True)
        ax, ring = fig.axes
        assert ax.get_title() == f"step {t} of 4 · layout {layout} · causal (n = 32, w = 4)"
        assert ring.get_title() == f"the ring at step {t}"
        labels = [text.get_text() for text in ring.texts]
        for r, s in enumerate(ring_schedule(32, 4, layout=layout, causal=True)[t]):
            assert f"holds K/V {s.kv_rank}\n{s.work} scores" in labels
    with pytest.raises(ValueError, match="step must be in 0..3"):
        plot_ring_step(32, 4, 4, layout=layout)


def test_plot_causal_work_and_memory():
    n, w = 64, 4
    computed = {k: work_per_rank(n, w, layout=k) for k in LAYOUTS}
    needed = {k: (layout_positions(n, w, k) + 1).sum(1).tolist() for k in LAYOUTS}
    critical = {k: sum(max(s.work for s in row) for row in ring_schedule(n, w, layout=k, causal=True))
                for k in LAYOUTS}
    fig = plot_causal_work(computed, needed, critical=critical)
    assert len(fig.axes) == 4
    assert fig.axes[0].get_title().startswith("contiguous\nbusiest / mean = 1.60\n")
    assert plot_causal_work(computed, needed).axes[-1].get_title().startswith("striped")

    seq = [2**p for p in range(10, 14)]
    per_rank = {w: [sum(ring_memory_bytes(s, w).values()) for s in seq] for w in (1, 2)}
    fig = plot_memory_per_rank(seq, per_rank, terms=ring_memory_bytes(4096, 2), terms_label="x")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2


def test_ring_memory_bytes_is_linear_in_the_shard():
    kw = {"batch": 1, "heads": 8, "head_dim": 64, "dtype": torch.bfloat16}
    a = ring_memory_bytes(2**16, 2, **kw)
    assert a == ring_memory_bytes(2**17, 4, **kw)  # depends on n / w only
    assert {k: 2 * v for k, v in a.items()} == ring_memory_bytes(2**17, 2, **kw)  # c >= KEY_CHUNK: linear
    c = 2**15
    assert a["q, k, v shards"] == 3 * c * 8 * 64 * 2
    assert a["score tiles"] == 8 * c * 2048 * (3 * 4 + 1)
    assert ring_memory_bytes(2**16, 2, causal=False, **kw)["score tiles"] == 8 * c * 2048 * 12
    with pytest.raises(ValueError, match="does not divide"):
        ring_memory_bytes(10, 3)


def test_ring_step_explorer_redraws():
    pytest.importorskip("ipywidgets")
    from ringbook.viz.widgets import ring_step_explorer

    widget = ring_step_explorer(16, 2, step=0, layout="zigzag", causal=True)
    widget.children[2].value = False
    widget.children[0].value = 1
    assert widget.result.axes[0].get_title() == "step 1 of 2 · layout zigzag · no mask (n = 16, w = 2)"


SEED64 = {"segment_lengths": [8, 16, 32], "dilation_rates": [1, 2, 4]}


def test_plot_dilated_pattern_draws_the_weights():
    from ringbook import dilated_weights
    from ringbook.viz import plot_dilated_pattern

    fig = plot_dilated_pattern(64, 8, head=6, heads="grouped", **SEED64)
    ax, cov = fig.axes
    assert ax.get_title() == "head 6: $\\kappa_{ij}$ · segments [8, 16, 32] · rates [1, 2, 4] · heads grouped"
    c = dilated_weights(64, 8, heads="grouped", **SEED64)
    assert np.array_equal(ax.images[0].get_array(), c[6].numpy())  # the image is κ_ij of the head
    assert "240 of 512" in cov.get_title()  # (head, position) cells kept by no pair: 2·0 + 3·32 + 3·48
    fig = plot_dilated_pattern(64, 8, head=1, heads="all", causal=True, **SEED64)
    assert fig.axes[0].get_title().endswith("heads all · causal")
    with pytest.raises(ValueError, match="head must be in 0..7"):
        plot_dilated_pattern(64, 8, head=8, **SEED64)


def test_plot_dilated_coverage_and_scaling():
    from ringbook.viz import plot_dilated_coverage, plot_dilated_scaling

    fig = plot_dilated_coverage(64, 8, heads="grouped", **SEED64)
    bars = [p.get_width() for p in fig.axes[1].patches]
    assert bars == [0, 0, 0.5, 0.5, 0.5, 0.75, 0.75, 0.75]
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert "group s = 32, r = 4:\n25% seen by no head" in texts
    fig = plot_dilated_scaling([8, 16], {"dense": [64, 256], "dilated": [8, 16]}, measured={"x": ([8, 16], [1, 2])})
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2 and len(fig.axes[1].lines) == 1
    assert len(plot_dilated_scaling([8, 16], {"dense": [64, 256]}).axes) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_plot_dilated_ring_plan_follows_the_plan(causal):
    from ringbook import dilated_ring_plan
    from ringbook.viz import plot_dilated_ring_plan
    from ringbook.viz.palette import KIND_COLORS

    plan = dilated_ring_plan(48, 3, [6, 12, 24], [1, 2, 4], num_heads=8, heads="grouped", causal=causal)
    fig = plot_dilated_ring_plan(plan, batch=2, head_dim=4)
    ax, bars = fig.axes
    boxes = ax.patches
    assert len(boxes) == len(plan.segments)
    for box, seg in zip(boxes, plan.segments):
        assert box.get_x() == seg.start and box.get_width() == seg.stop - seg.start
        assert matplotlib.colors.same_color(box.get_facecolor(), KIND_COLORS[seg.kind])
    heights = np.array([p.get_height() for p in bars.patches]).reshape(len(plan.pairs), plan.ring_size).sum(0)
    assert heights.tolist() == plan.sent_elements(2, 4)
    assert ax.get_title().endswith("8 local, 6 exchanged")


def test_dilated_pattern_explorer_redraws():
    pytest.importorskip("ipywidgets")
    from ringbook.viz.widgets import dilated_pattern_explorer

    widget = dilated_pattern_explorer(64, 8, segment_length=8, dilation_rate=1, num_pairs=3, head=0)
    widget.children[2].value = 1  # one pair
    widget.children[1].value = 4
    widget.children[0].value = 16
    assert widget.result.axes[0].get_title() == "head 0: $\\kappa_{ij}$ · segments [16] · rates [4] · heads grouped"
    widget.children[0].value = 2  # the rate is clipped to the segment length
    assert widget.result.axes[0].get_title() == "head 0: $\\kappa_{ij}$ · segments [2] · rates [2] · heads grouped"


def test_plot_error_matrix_draws_every_cell_and_outlines_failures():
    from ringbook.viz import plot_error_matrix

    errors = np.array([[1e-15, 0.0, 2e-3], [3e-16, 1e-6, 4e-2]])
    ratios = np.array([[0.3], [1.5]])
    fig = plot_error_matrix(errors, ["a", "b"], ["x", "y", "z"], ratios=ratios, ratio_labels=["z"], groups=[1])
    ax, ax_r = fig.axes[:2]  # two heatmaps, then their colour bars
    assert len(fig.axes) == 4
    assert [t.get_text() for t in ax.texts] == ["1e-15", "0", "2e-3", "3e-16", "1e-6", "4e-2"]
    assert [t.get_text() for t in ax_r.texts] == ["0.30", "1.50"]
    assert len(ax_r.patches) == 1  # the one cell above 1 is outlined
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    fig = plot_error_matrix(errors, ["a", "b"], ["x", "y", "z"], digits=2)
    assert len(fig.axes) == 2  # no ratios: one panel, one colour bar
    assert fig.axes[0].texts[0].get_text() == "1.0e-15"
    with pytest.raises(ValueError, match="2 × 3 but got 1 row"):
        plot_error_matrix(errors, ["a"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="ratios needs 2 rows"):
        plot_error_matrix(errors, ["a", "b"], ["x", "y", "z"], ratios=ratios)


def test_ring_step_seconds_hides_the_transfer_exactly_above_the_threshold():
    from ringbook.demo import ring_step_seconds

    f, b = 400e12, 100e9
    t = ring_step_seconds(1024, flops_per_s=f, bytes_per_s=b)
    assert t["threshold"] == pytest.approx(2 * f / (2 * b))  # bf16: c ≥ F / B
    assert t["compute"] == pytest.approx(4 * 8 * 1024**2 * 64 / f) and t["step"] == max(t["compute"], t["transfer"])
    below = ring_step_seconds(int(t["threshold"]) - 1, flops_per_s=f, bytes_per_s=b)
    above = ring_step_seconds(int(t["threshold"]) + 1, flops_per_s=f, bytes_per_s=b)
    assert below["transfer"] > below["compute"] and above["transfer"] < above["compute"]
    with pytest.raises(ValueError, match="bytes_per_s must be a positive number"):
        ring_step_seconds(1024, flops_per_s=f, bytes_per_s=0)
    with pytest.raises(ValueError, match="shard_len must be a positive int"):
        ring_step_seconds(0, flops_per_s=f, bytes_per_s=b)


def test_plot_ring_timeline_waits_only_when_the_transfer_is_longer():
    from ringbook.viz import plot_ring_timeline

    fig = plot_ring_timeline(4, {"hidden": (2.0, 1.0), "bound": (1.0, 3.0)})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("hidden: 4 steps in 8 ms") and titles[1].startswith("bound: 4 steps in 10 ms")
    with pytest.raises(ValueError, match="world must be a positive int"):
        plot_ring_timeline(0, {"x": (1.0, 1.0)})
    with pytest.raises(ValueError, match=r"cases\['x'\] must be \(compute, transfer\), two positive finite times"):
        plot_ring_timeline(2, {"x": (1.0, -1.0)})


def test_masked_timings_table_and_bars():
    from ringbook.viz.masks import masked_timings, plot_masked_timings

    def row(cand, ms, mode="fwd", **kw):
        return {"where": "whole", "status": "ok", "candidate": cand, "ms": ms, "mask": "docs16", "nq": 1024,
                "mode": mode, **kw}
    data = {"rows": [row("ringbook_production", 9.0, path="production_ring_attention(ring_size=8, layout=zigzag)"),
                     row("ringbook_ring1", 5.0, path="production_ring_attention(ring_size=1, layout=zigzag)"),
                     row("flex", 3.0), row("flex_direct", 2.5), row("varlen", 4.0), row("varlen", 8.0, "fwd+bwd"),
                     {**row("varlen", 1.0), "status": "error"}, {**row("flex", 1.0), "where": "block"}]}
    table = masked_timings(data)
    assert table == {("docs16", 1024, "fwd"): {"ring 8": 9.0, "ring 1": 5.0, "flex": 2.5, "varlen": 4.0},
                     ("docs16", 1024, "fwd+bwd"): {"varlen": 8.0}}
    fig = plot_masked_timings(table, title="t")
    assert [ax.get_title() for ax in fig.axes] == ["fwd", "fwd+bwd"]
    assert [len(ax.patches) for ax in fig.axes[:2]] == [4, 4]  # every column in every panel (absent: no height)


def test_strategy_engine_cost_bars():
    from ringbook.viz.strategies import plot_strategy_engine_cost

    rows = [{"seq_len": 1024, "ring_size": 8, "causal": c, "ratio_vs_cudnn": {"ring": 0.9, "allgather": 0.8}}
            for c in (False, True)] + [{"seq_len": 4096, "ring_size": 8, "causal": True,
                                        "ratio_vs_cudnn": {"ring": 0.95, "allgather": 0.97, "ulysses": 1.0}}]
    fig = plot_strategy_engine_cost(rows)
    assert [ax.get_title() for ax in fig.axes] == ["1,024 tokens", "4,096 tokens"]
    assert [len(ax.patches) for ax in fig.axes] == [2 * 3, 1 * 3]  # (rows) × (ring, allgather, ulysses)
