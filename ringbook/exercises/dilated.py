"""Exercises of notebook 03 (dilated attention): the kept positions, the scores of a pair, the rows a rank sends."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..dilated import dilated_weights
from ..ring_dilated import dilated_ring_plan
from ._core import _run, _same_integers


def _integers(got) -> torch.Tensor | None:
    """``got`` as a flat int64 tensor if it holds integers (a list, a range, an int tensor or array); else None.

    No silent rounding: a float answer (3.0 or 3.5) is not a position.
    """
    try:
        t = torch.as_tensor(got)
    except (TypeError, ValueError, RuntimeError):
        try:
            t = torch.as_tensor(list(got))
        except (TypeError, ValueError, RuntimeError):
            return None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        return None
    return t.flatten().long()


def check_kept_positions(fn: Callable) -> bool | None:
    """``fn(n, segment, rate, offset) -> positions``: the positions one (segment, rate) pattern keeps at ``offset``."""
    cases = []
    for n, seg, r in ((16, 8, 2), (12, 12, 3), (8, 4, 1), (24, 6, 3), (9, 9, 9)):
        for o in sorted({0, r - 1}):
            weights = dilated_weights(n, r, segment_lengths=[seg], dilation_rates=[r], heads="all")
            kept = torch.nonzero(weights[o].diagonal()).flatten()  # head o has offset o mod r = o
            cases.append((f"n={n}, segment {seg}, rate {r}, offset {o}", (n, seg, r, o), kept, _same_integers))
    return _run("kept_positions", fn, cases, lambda c: (
        "positions are integers, in increasing order" if _integers(c["got"]) is None else
        "keep p when (p mod segment) mod rate == offset, in every segment of the sequence (the offset counts from "
        "the start of each segment)"))


def check_pair_scores(fn: Callable) -> bool | None:
    """``fn(n, segment, rate, causal) -> int``: the scores one head computes for one pair (κ summed over i, j)."""
    cases = []
    for n, seg, r in ((16, 8, 2), (48, 12, 3), (64, 64, 1), (30, 10, 5), (8, 8, 8)):
        for causal in (False, True):
            weights = dilated_weights(n, 1, segment_lengths=[seg], dilation_rates=[r], heads="all", causal=causal)
            cases.append((f"n={n}, segment {seg}, rate {r}, causal={causal}", (n, seg, r, causal),
                           int(weights.sum()), lambda got, want: type(got) is not bool and got == want))
    return _run("pair_scores", fn, cases, lambda c: (
        "an integer count" if not isinstance(c["got"], int | float | torch.Tensor) else
        "n/s segments, each with m = s/r kept tokens that all score each other: m² per segment; with the mask a "
        "kept query scores only the kept keys up to itself, itself included: m(m+1)/2, not m²/2"))


def _reference_rows_sent(n: int, ring_size: int, segment: int, rate: int, offset: int, causal: bool) -> list[int]:
    """The reference of :func:`check_rows_sent`, read from :func:`ringbook.dilated_ring_plan`."""
    plan = dilated_ring_plan(n, ring_size, [segment], [rate], num_heads=1, heads="all", causal=causal)
    sent = [0] * ring_size
    for seg in plan.segments:
        for rank, receivers in zip(seg.ranks, seg.receivers):
            a, b = seg.piece(rank, plan.shard_len)
            sent[rank] += len(range(a + (offset - (a - seg.start)) % rate, b, rate)) * receivers
    return sent


def check_rows_sent(fn: Callable) -> bool | None:
    """``fn(n, ring_size, segment, rate, offset, causal) -> list``: per rank, the dilated K rows of one head (offset
    ``offset``) that it sends over the whole call, each receiver counted (V sends as many)."""
    cases = []
    for n, w, seg, r in ((16, 4, 8, 2), (48, 3, 24, 4), (24, 4, 12, 3), (16, 2, 4, 2), (12, 12, 12, 1), (32, 4, 32, 8)):
        for o in sorted({0, r - 1}):
            for causal in (False, True):
                cases.append((f"n={n}, ring {w}, segment {seg}, rate {r}, offset {o}, causal={causal}",
                              (n, w, seg, r, o, causal), torch.tensor(_reference_rows_sent(n, w, seg, r, o, causal)),
                              _same_integers))
    return _run("rows_sent", fn, cases, lambda c: (
        "one integer per rank" if _integers(c["got"]) is None else
        "only a segment that spans several shards is exchanged; each spanned rank sends the kept rows of its piece "
        "(index in the segment ≡ offset mod rate) to every other spanned rank, or with the mask only to the later "
        "ones"))
