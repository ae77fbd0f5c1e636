"""Exercises of notebook 02 (ring attention): zigzag positions, which blocks a causal step skips."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..schedule import layout_positions, ring_schedule
from ._core import _close, _run


def check_zigzag_positions(fn: Callable) -> bool | None:
    """``fn(n, world, rank) -> positions``: the token positions rank ``rank`` holds in the zigzag layout, in order."""
    cases = []
    for n, w in ((8, 2), (12, 3), (16, 4), (4, 1), (2, 1)):
        ref = layout_positions(n, w, "zigzag")
        for rank in range(w):
            cases.append((f"n={n}, world={w}, rank {rank}", (n, w, rank), ref[rank].long(),
                          lambda got, want: _close(torch.as_tensor(got).long().flatten(), want)))
    return _run("zigzag_positions", fn, cases, lambda c: (
        "cut the sequence into 2·world chunks of n/(2·world); rank r holds chunk r and chunk 2·world − 1 − r, "
        "the first then the second"))


def check_causal_skip(fn: Callable) -> bool | None:
    """``fn(rank, step, world) -> bool``: whether, causal and contiguous, rank ``rank`` skips its block at ``step``.

    At step t rank r holds the K/V shard of rank (r − t) mod w. A block is
    skipped when every key comes after every query.
    """
    cases = []
    for w in (1, 2, 3, 5):
        sched = ring_schedule(8 * w, w, layout="contiguous", causal=True)
        for t in range(w):
            for r in range(w):
                cases.append((f"world={w}, step {t}, rank {r}", (r, t, w), sched[t][r].work == 0,
                              lambda got, want: isinstance(got, (bool, int)) and bool(got) == want))
    return _run("causal_skip", fn, cases, lambda c: (
        "step 0 is the diagonal (the rank's own shard, half masked): never skipped; a later step is skipped when "
        "the shard came from a later rank, (r − t) mod w > r"))
