"""Exercises of notebook 03 (dilated attention): the positions a segment keeps."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..dilated import dilated_weights
from ._core import _close, _run


def check_kept_positions(fn: Callable) -> bool | None:
    """``fn(n, segment, rate, offset) -> positions``: the positions one (segment, rate) pattern keeps at ``offset``."""
    cases = []
    for n, seg, r in ((16, 8, 2), (12, 12, 3), (8, 4, 1), (24, 6, 3), (9, 9, 9)):
        for o in sorted({0, r - 1}):
            heads = r if o < r else 1
            weights = dilated_weights(n, heads, segment_lengths=[seg], dilation_rates=[r], heads="all")
            kept = torch.nonzero(weights[o].diagonal()).flatten()  # head o has offset o mod r = o
            cases.append((f"n={n}, segment {seg}, rate {r}, offset {o}", (n, seg, r, o), kept,
                          lambda got, want: _close(torch.as_tensor(got).long().flatten(), want)))
    return _run("kept_positions", fn, cases, lambda c: (
        "keep p when (p mod segment) mod rate == offset, in every segment of the sequence (the offset counts from "
        "the start of each segment)"))
