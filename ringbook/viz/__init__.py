"""Pictures: pure plotting functions ``plot_x(...) -> Figure``, grouped by the notebook that uses them.

==================  =========================================================
module              figures
==================  =========================================================
``palette``         the one palette: a colour means the same thing everywhere
``figure``          the shared figure helper (:func:`new_figure`)
``online_softmax``  notebook 01: overflow, the online softmax, block weights, errors
``ring``            notebook 02: a ring step, causal work, memory per rank
``dilated``         notebook 03: patterns, coverage, work, the ring plan
``equivalence``     notebook 04: the error matrix
``results``         notebook 05 and the report: results against sequence length,
                    scaling, ratios, rows measured live
``widgets``         ipywidgets front ends that only wire controls to these
==================  =========================================================

Each function takes plain data, draws one figure and returns it; nothing is
shown or saved here. Figures are made through pyplot (so Jupyter's inline
backend renders them) and closed at once, so redrawing in a widget piles
nothing up. ``import ringbook`` does not import this package; matplotlib is
needed only here.
"""

from .dilated import plot_dilated_coverage, plot_dilated_pattern, plot_dilated_ring_plan, plot_dilated_scaling
from .equivalence import plot_error_matrix, plot_rule_ratios
from .figure import new_figure
from .online_softmax import plot_block_weights, plot_error_bars, plot_exp_overflow, plot_online_softmax
from .palette import COLORS, IMPL_COLORS
from .results import plot_dilated_ring_sizes, plot_gpu_bars, plot_live_rows, plot_ratios, plot_results, plot_scaling, plot_sweep
from .ring import plot_causal_work, plot_memory_per_rank, plot_ring_step, plot_ring_timeline, ring_step_cells

__all__ = [
    "plot_dilated_coverage", "plot_dilated_pattern", "plot_dilated_ring_plan", "plot_dilated_scaling",
    "plot_error_matrix", "plot_rule_ratios", "new_figure", "plot_block_weights", "plot_error_bars", "plot_exp_overflow",
    "plot_online_softmax", "COLORS", "IMPL_COLORS", "plot_dilated_ring_sizes", "plot_gpu_bars", "plot_live_rows",
    "plot_ratios", "plot_results", "plot_scaling", "plot_sweep", "plot_causal_work", "plot_memory_per_rank",
    "plot_ring_step", "plot_ring_timeline", "ring_step_cells",
]
