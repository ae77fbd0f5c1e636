"""Checkers for the notebooks' exercises: ``check_<name>(fn)`` runs awkward cases and says what went wrong.

Each exercise is a small function the learner writes in a stub cell of
notebooks 01–03, right after the idea it needs is derived. Its checker

* runs the function on awkward cases (length 1, fully masked rows, logits
  scaled by 100, the diagonal step, the last offset);
* prints ✓ and returns True, or prints the first failing case — its inputs,
  what was expected and what came back — with a hint about the usual mistake,
  and returns False;
* prints "not attempted yet" and returns None while the stub still raises
  ``NotImplementedError`` on the first case, so an unsolved notebook still
  runs (raised on a later case, it is a failure: a branch left unwritten);
* accepts a right answer in any common form (a list for a tuple, a numpy or
  torch bool for a bool) and never rounds a wrong one to right (positions
  2.5 are not 2);
* gives hints that point the way without printing the solution.

The references are the library's own functions (the merge, the layouts, the
schedule, the dilated weights), so an exercise checks the learner against the
code the rest of the notebooks use. Shapes are kept small and per row: a
block's scores ``s`` are ``(i, j)``, values ``v`` ``(j, d)``, a partial ``out``
``(i, d)`` and its ``lse`` ``(i,)``. The solutions are in
``notebooks/solutions/`` (plain Python; ``python tools/teacher_build.py``
writes executed notebooks with them filled in).
"""

from __future__ import annotations

from collections.abc import Callable

from . import costmodel, dilated, equivalence, masks, measuring, online_softmax, ring, strategies
from ._core import NOT_ATTEMPTED
from .dilated import check_kept_positions
from .online_softmax import check_lse_from_m_l, check_merge_partials, check_online_step
from .ring import (
    block_backward,
    check_causal_skip,
    check_classify_block,
    check_overlap_threshold,
    check_toy_ring_attention,
    check_toy_ring_backward,
    check_zigzag_positions,
)

_MODULES = (online_softmax, ring, dilated, equivalence, measuring, strategies, masks, costmodel)  # one module per notebook

CHECKERS: dict[str, Callable] = {name.removeprefix("check_"): getattr(m, name) for m in _MODULES for name in dir(m)
                                 if name.startswith("check_") and getattr(m, name).__module__ == m.__name__}

__all__ = ["CHECKERS", "NOT_ATTEMPTED", "block_backward", "check_causal_skip", "check_classify_block",
           "check_kept_positions", "check_lse_from_m_l", "check_merge_partials", "check_online_step",
           "check_overlap_threshold", "check_toy_ring_attention", "check_toy_ring_backward", "check_zigzag_positions"]
