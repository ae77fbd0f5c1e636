"""Thin ipywidgets front ends: each wires a control to a :mod:`ringbook.plots` function.

The widgets compute nothing: the notebook computes the data with ``ringbook``
and passes it in; moving a control only redraws the figure. ipywidgets and
IPython are imported when a widget is built, so this module can be imported
(and its plots used) without Jupyter.

Each builder returns the :class:`ipywidgets.interactive` box; display it with
``_ = display(widget)``. After each redraw ``widget.result`` is the Figure
just drawn, so a notebook can assert on it.
"""

from __future__ import annotations

from . import plots


def _interactive(draw, **controls):
    from IPython.display import display
    from ipywidgets import interactive

    def redraw(**values):
        fig = draw(**values)
        display(fig)
        return fig

    return interactive(redraw, **controls)


def online_softmax_explorer(scores, block_size: int, m, l, outs, exact_out, *, blocks_seen: int = 1):
    """A slider over the key blocks seen so far, redrawing :func:`plots.plot_online_softmax`.

    Arguments are those of :func:`ringbook.plots.plot_online_softmax`;
    ``blocks_seen`` is the slider's start value.
    """
    from ipywidgets import IntSlider, Layout

    n_blocks = len(m)
    slider = IntSlider(
        value=blocks_seen, min=1, max=n_blocks, step=1, description="blocks seen",
        continuous_update=False, style={"description_width": "initial"}, layout=Layout(width="420px"),
    )

    def draw(blocks_seen):
        return plots.plot_online_softmax(scores, block_size, m, l, outs, exact_out, blocks_seen=blocks_seen)

    return _interactive(draw, blocks_seen=slider)


def ring_step_explorer(n: int, world_size: int, *, step: int = 0, layout: str = "zigzag", causal: bool = True):
    """A step slider, a layout dropdown and a causal checkbox, redrawing :func:`plots.plot_ring_step`.

    ``n`` must suit every layout (a multiple of ``2 · world_size``); the
    keyword arguments are the controls' start values.
    """
    from ipywidgets import Checkbox, Dropdown, IntSlider, Layout

    from .schedule import LAYOUTS

    slider = IntSlider(
        value=step, min=0, max=world_size - 1, step=1, description="ring step",
        continuous_update=False, style={"description_width": "initial"}, layout=Layout(width="420px"),
    )
    dropdown = Dropdown(options=list(LAYOUTS), value=layout, description="layout")
    checkbox = Checkbox(value=causal, description="causal")

    def draw(step, layout, causal):
        return plots.plot_ring_step(n, world_size, step, layout=layout, causal=causal)

    return _interactive(draw, step=slider, layout=dropdown, causal=checkbox)
