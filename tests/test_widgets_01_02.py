"""The widgets of notebooks 01 and 02 redraw when a control moves (driven here, not in a hidden notebook cell)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")


def test_online_softmax_explorer_redraws_when_the_slider_moves():
    from ringbook import online_softmax_trace
    from ringbook.viz.widgets import online_softmax_explorer

    gen = torch.Generator().manual_seed(0)
    s = torch.randn(12, generator=gen, dtype=torch.float64)
    v = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    trace = online_softmax_trace(s, 4)
    m = torch.tensor([a for a, _ in trace], dtype=torch.float64)
    l = torch.tensor([b for _, b in trace], dtype=torch.float64)
    outs = torch.stack([torch.softmax(s[: 4 * (k + 1)], 0) @ v[: 4 * (k + 1)] for k in range(len(trace))])
    widget = online_softmax_explorer(s, 4, m, l, outs, outs[-1], blocks_seen=len(trace))
    assert len(widget.result.axes) == 4
    widget.children[0].value = 2
    assert widget.result.axes[0].get_title() == f"(a) scores and running max, 2/{len(trace)} blocks seen"
    assert math.isclose(l[-1].item(), torch.exp(s - m[-1]).sum().item())


def test_overlap_explorer_redraws_when_a_slider_moves():
    from ipywidgets import interactive

    from ringbook.viz.ring import plot_ring_overlap

    widget = interactive(plot_ring_overlap, shard_len=(512, 65536, 512), tflops=(10.0, 2000.0), gb_per_s=(5.0, 900.0))
    widget.update()
    first = widget.result.axes[0].get_title()
    widget.children[2].value = 10.0  # a slow link: the transfer no longer hides
    assert widget.result.axes[0].get_title() != first
