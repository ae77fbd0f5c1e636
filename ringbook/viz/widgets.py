"""Thin ipywidgets front ends: each wires a control to a :mod:`ringbook.viz` plotting function.

The widgets compute nothing: the notebook computes the data with ``ringbook``
and passes it in; moving a control only redraws the figure. ipywidgets and
IPython are imported when a widget is built, so this module can be imported
(and its plots used) without Jupyter.

Each builder returns the :class:`ipywidgets.interactive` box; display it with
``_ = display(widget)``. After each redraw ``widget.result`` is the Figure
just drawn, so a notebook can assert on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import dilated as dilated_plots
from . import equivalence as equivalence_plots
from . import online_softmax as online_softmax_plots
from . import ring as ring_plots

if TYPE_CHECKING:  # type names only: ipywidgets is imported when a widget is built
    from collections.abc import Mapping

    import ipywidgets
    from numpy.typing import ArrayLike


def _interactive(draw, **controls):
    from IPython.display import display
    from ipywidgets import interactive

    def redraw(**values):
        fig = draw(**values)
        display(fig)
        return fig

    return interactive(redraw, **controls)


def online_softmax_explorer(scores: ArrayLike, block_size: int, m: ArrayLike, l: ArrayLike, outs: ArrayLike | None,
                            exact_out: ArrayLike | None, *, blocks_seen: int = 1) -> ipywidgets.interactive:
    """A slider over the key blocks seen so far, redrawing :func:`ringbook.viz.plot_online_softmax`.

    Arguments are those of :func:`ringbook.viz.plot_online_softmax`;
    ``blocks_seen`` is the slider's start value.
    """
    from ipywidgets import IntSlider, Layout

    n_blocks = len(m)
    slider = IntSlider(
        value=blocks_seen, min=1, max=n_blocks, step=1, description="blocks seen",
        continuous_update=False, style={"description_width": "initial"}, layout=Layout(width="420px"),
    )

    def draw(blocks_seen):
        return online_softmax_plots.plot_online_softmax(scores, block_size, m, l, outs, exact_out, blocks_seen=blocks_seen)

    return _interactive(draw, blocks_seen=slider)


def ring_step_explorer(n: int, ring_size: int, *, step: int = 0, layout: str = "zigzag",
                       causal: bool = True) -> ipywidgets.interactive:
    """A step slider, a layout dropdown and a causal checkbox, redrawing :func:`ringbook.viz.plot_ring_step`.

    ``n`` must suit every layout (a multiple of ``2 · ring_size``); the
    keyword arguments are the controls' start values.
    """
    from ipywidgets import Checkbox, Dropdown, IntSlider, Layout

    from ..schedule import LAYOUTS

    slider = IntSlider(
        value=step, min=0, max=ring_size - 1, step=1, description="ring step",
        continuous_update=False, style={"description_width": "initial"}, layout=Layout(width="420px"),
    )
    dropdown = Dropdown(options=list(LAYOUTS), value=layout, description="layout")
    checkbox = Checkbox(value=causal, description="causal")

    def draw(step, layout, causal):
        return ring_plots.plot_ring_step(n, ring_size, step, layout=layout, causal=causal)

    return _interactive(draw, step=slider, layout=dropdown, causal=checkbox)


def dilated_pattern_explorer(seq_len: int = 64, num_heads: int = 8, *, segment_length: int = 8,
                             dilation_rate: int = 1, num_pairs: int = 3, head: int = 0, heads: str = "grouped",
                             causal: bool = False) -> ipywidgets.interactive:
    """Sliders for a LongNet configuration, redrawing :func:`ringbook.viz.plot_dilated_pattern`.

    The pairs are geometric, as in LongNet: ``(s, r), (2s, 2r), (4s, 4r), …``
    for ``num_pairs`` pairs, with ``w`` and ``r`` on the sliders. Segment
    lengths are powers of two with ``w · 2^(num_pairs−1)`` dividing
    ``seq_len`` (checked by :func:`ringbook.dilated_weights` when drawn).
    The keyword arguments are the controls' start values.
    """
    from ipywidgets import Checkbox, Dropdown, IntSlider, Layout, SelectionSlider

    from ..dilated import HEAD_MODES

    wide = {"continuous_update": False, "style": {"description_width": "initial"}, "layout": Layout(width="420px")}
    segs = [2**p for p in range(1, seq_len.bit_length()) if seq_len % 2**p == 0 and 2**p <= seq_len // 4]
    seg_slider = SelectionSlider(options=segs, value=segment_length, description="segment length s", **wide)
    rate_slider = SelectionSlider(options=[1, 2, 4, 8], value=dilation_rate, description="dilation rate r", **wide)
    pairs_slider = IntSlider(value=num_pairs, min=1, max=3, description="pairs (s, r)·2^k", **wide)
    head_slider = IntSlider(value=head, min=0, max=num_heads - 1, description="head", **wide)
    mode = Dropdown(options=list(HEAD_MODES), value=heads, description="heads")
    checkbox = Checkbox(value=causal, description="causal")

    def draw(segment_length, dilation_rate, num_pairs, head, heads, causal):
        rate = min(dilation_rate, segment_length)  # r must divide w
        return dilated_plots.plot_dilated_pattern(
            seq_len, num_heads, segment_lengths=[segment_length * 2**k for k in range(num_pairs)],
            dilation_rates=[rate * 2**k for k in range(num_pairs)], head=head, heads=heads, causal=causal)

    return _interactive(draw, segment_length=seg_slider, dilation_rate=rate_slider, num_pairs=pairs_slider,
                        head=head_slider, heads=mode, causal=checkbox)


def bench_row_explorer(run: Callable[..., dict], *, seq_lens: Sequence[int], ring_sizes: Sequence[int],
                       impls: Sequence[str], dtypes: Sequence[str], seq_len: int | None = None, ring_size: int = 1,
                       impl: str | None = None, dtype: str | None = None, causal: bool = False) -> ipywidgets.interactive:
    """Controls for one benchmark row and a "run" button; each click measures a row and redraws
    :func:`ringbook.viz.results.plot_live_rows` over the rows measured so far.

    ``run(impl=..., seq_len=..., ring_size=..., dtype=..., causal=...)`` measures the row (the notebook
    passes a wrapper of :func:`ringbook.bench.run_row`, sized to its device). The first row is measured
    when the widget is built. ``widget.rows`` lists every row measured, newest last.
    """
    from IPython.display import Markdown, display
    from ipywidgets import Checkbox, Dropdown, SelectionSlider, interactive

    from ..bench.report import live_rows_markdown
    from .results import plot_live_rows

    wide = {"style": {"description_width": "initial"}}
    controls = {
        "seq_len": SelectionSlider(options=list(seq_lens), value=seq_len or seq_lens[0], description="sequence length",
                                   continuous_update=False, **wide),
        "ring_size": Dropdown(options=list(ring_sizes), value=ring_size, description="ring size", **wide),
        "impl": Dropdown(options=list(impls), value=impl or impls[0], description="implementation", **wide),
        "dtype": Dropdown(options=list(dtypes), value=dtype or dtypes[0], description="dtype", **wide),
        "causal": Checkbox(value=causal, description="causal"),
    }
    rows: list[dict] = []

    def measure(**values):
        rows.append(run(**values))
        display(Markdown(live_rows_markdown(rows[-8:])))
        fig = plot_live_rows(rows[-8:])
        display(fig)
        return fig

    widget = interactive(measure, {"manual": True, "manual_name": "run"}, **controls)
    widget.rows = rows
    widget.update()
    return widget


def bug_hunt_explorer(right: Mapping[str, ArrayLike], suspects: Mapping[str, ArrayLike], col_labels: Sequence[str], *,
                      suspect: str | None = None, note: str | None = None) -> ipywidgets.interactive:
    """A dropdown over ``suspects`` (label -> one row of rule ratios), redrawing
    :func:`ringbook.viz.equivalence.plot_rule_ratios` with the ``right`` rows above the chosen suspect's row."""
    import numpy as np
    from ipywidgets import Dropdown

    names = list(suspects)
    dropdown = Dropdown(options=names, value=suspect or names[0], description="suspect")

    def draw(suspect):
        rows = [*right.values(), suspects[suspect]]
        return equivalence_plots.plot_rule_ratios(np.array(rows, dtype=float), [*right, suspect], col_labels,
                                                  groups=[len(right)], note=note,
                                                  title=f"{suspect}: which cells does the 2× rule catch?")

    return _interactive(draw, suspect=dropdown)


def overlap_explorer(shard_len: int = 4096, tflops: float = 500.0, gb_per_s: float = 450.0) -> ipywidgets.interactive:
    """Sliders for the block length ``c``, the kernel's rate and the link's bandwidth, redrawing
    :func:`ringbook.viz.ring.plot_ring_overlap` (notebook 02, when a hop hides behind its block)."""
    from ipywidgets import FloatSlider, IntSlider

    from .ring import plot_ring_overlap

    return _interactive(plot_ring_overlap,
                        shard_len=IntSlider(shard_len, 512, 65536, 512, description="c (tokens)"),
                        tflops=FloatSlider(round(tflops), min=10, max=2000, step=10, description="TFLOP/s"),
                        gb_per_s=FloatSlider(gb_per_s, min=5, max=900, step=5, description="GB/s"))
