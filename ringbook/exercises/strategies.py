"""Exercises of notebook 06 (beyond the ring): the bytes of each step, Ulysses' head split, the hybrid's groups.

The references are :func:`ringbook.strategy_schedule` and the layouts of
:mod:`ringbook.strategies`, so the learner is checked against the data the
notebook's pictures and the distributed forms read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..strategies import bytes_sent, head_split, hybrid_groups, strategy_schedule
from ._core import _pair, _run, _same_integers

ON_WIRE = ("q", "K/V", "out")  # what the exercise counts (the lse is left out)


def _step_bytes(strategy: str, n: int, w: int, h: int, g: int, d: int, e: int) -> list[int]:
    sched = strategy_schedule(strategy, n, w, heads=h, kv_heads=g, head_dim=d, dtype_bytes=e)
    per_step = [bytes_sent([st], w, what=ON_WIRE)[0] for st in sched]
    return [b for b in per_step if b]


def check_step_bytes(fn: Callable) -> bool | None:
    """``fn(strategy, n, world, heads, kv_heads, head_dim, elem_bytes) -> [bytes, …]``: what rank 0 sends per step.

    One entry per forward step in which the rank sends anything, in order,
    counting q, K/V and out (not the lse), batch 1. ``strategy`` is
    ``"ring"``, ``"allgather"`` or ``"ulysses"``.
    """
    cases = []
    for strategy, n, w, h, g, d, e in (("ring", 64, 4, 8, 8, 16, 2), ("ring", 64, 1, 8, 8, 16, 2),
                                       ("allgather", 64, 4, 8, 8, 16, 2), ("ring", 96, 3, 8, 2, 16, 4),
                                       ("allgather", 96, 3, 8, 2, 16, 4), ("ulysses", 64, 4, 8, 8, 16, 2),
                                       ("ulysses", 64, 2, 8, 2, 16, 2), ("ulysses", 64, 8, 8, 2, 16, 2),
                                       ("ulysses", 64, 4, 4, 1, 32, 4)):
        label = f"{strategy}, n={n}, world={w}, heads={h}, kv_heads={g}, head_dim={d}, elem_bytes={e}"
        want = torch.tensor(_step_bytes(strategy, n, w, h, g, d, e), dtype=torch.long)
        cases.append((label, (strategy, n, w, h, g, d, e), want, _same_integers))

    def hint(c):
        strategy, n, w, h, g, d, e = c["args"]
        try:
            got = [float(x) for x in c["got"]]
        except (TypeError, ValueError):
            return "return a list with one number of bytes per step that sends"
        want = c["want"].tolist()
        if len(got) != len(want):
            return ("count the steps that send: the ring sends after every step but the last, all-gather is one "
                    "collective, Ulysses has two all-to-alls")
        if want and sum(got) == sum(want) * w / max(w - 1, 1):
            return "a rank keeps its own part: of the w parts of a collective, it sends w − 1"
        if strategy == "ulysses" and g < w:
            return ("with fewer kv heads than ranks, each rank still needs a kv head of its own: how many heads does "
                    "K/V have on the wire then?")
        return "K and V both travel, each with kv_heads heads (not heads), in elem_bytes per element"
    return _run("step_bytes", fn, cases, hint)


class _Refusal(str):
    """A ValueError the learner's function raised, kept as its answer (a refusal can be the right answer)."""


def _refusing(fn: Callable) -> Callable:
    """``fn`` with a ValueError turned into a :class:`_Refusal` answer (anything else still raises)."""
    if not callable(fn):
        return fn  # _run says what it takes

    def call(*args):
        try:
            return fn(*args)
        except ValueError as exc:
            return _Refusal(f"ValueError: {exc}")
    return call


def _refused(got, want) -> bool:
    return isinstance(got, _Refusal)


def check_ulysses_heads(fn: Callable) -> bool | None:
    """``fn(heads, kv_heads, world, rank) -> (q_heads, kv_heads)``: the heads Ulysses rank ``rank`` attends.

    ``q_heads``: the query heads it receives; ``kv_heads``: the kv heads it
    receives, in the original numbering, one entry per head received (a
    replicated head appears as its original). Raise ValueError when the
    split cannot work. Cases have ``kv_heads`` and ``world`` dividing one another.
    """
    cases = []
    for h, g, w in ((8, 8, 4), (8, 2, 2), (8, 2, 4), (8, 1, 8), (4, 4, 1), (16, 8, 4)):
        for r, (qh, kh) in enumerate(head_split(h, g, w)):
            cases.append((f"heads={h}, kv_heads={g}, world={w}, rank {r}", (h, g, w, r), (qh, kh),
                          lambda got, want: _pair(got) is not None and _same_integers(_pair(got)[0],
                          torch.tensor(want[0])) and _same_integers(_pair(got)[1], torch.tensor(want[1]))))
    for h, g, w in ((6, 6, 4), (8, 2, 3)):
        cases.append((f"heads={h}, kv_heads={g}, world={w} (cannot split)", (h, g, w, 0), "ValueError", _refused))

    def hint(c):
        h, g, w, _ = c["args"]
        if c["want"] == "ValueError":
            return "every rank must get whole heads, the same number each: when is that impossible? raise ValueError"
        if isinstance(c["got"], _Refusal):
            return "this split works: every rank gets heads/world whole query heads"
        if _pair(c["got"]) is None:
            return "return two lists: the query heads, then the kv heads"
        if g < w:
            return ("fewer kv heads than ranks: each rank still receives one kv head, a copy of the one its query "
                    "heads read (query head i reads kv head i // (heads / kv_heads))")
        return "rank r receives a contiguous run of heads/world query heads, and the kv heads those queries read"
    return _run("ulysses_heads", _refusing(fn), cases, hint)


def check_usp_groups(fn: Callable) -> bool | None:
    """``fn(world, ulysses_size, rank) -> (ulysses_group, ring_group)``: the ranks of each of ``rank``'s groups.

    Ulysses groups are ``ulysses_size`` consecutive ranks; the ring joins the
    ranks at the same place in every Ulysses group. Lists of ranks, ascending.
    """
    cases = []
    for w, u in ((4, 2), (8, 2), (8, 4), (4, 1), (4, 4), (6, 3), (6, 2)):
        ulysses, ring = hybrid_groups(w, u)
        for r in range(w):
            want = (next(grp for grp in ulysses if r in grp), next(grp for grp in ring if r in grp))
            cases.append((f"world={w}, ulysses_size={u}, rank {r}", (w, u, r), want,
                          lambda got, want: _pair(got) is not None and all(
                              _same_integers(a, torch.tensor(b)) for a, b in zip(_pair(got), want))))

    def hint(c):
        if _pair(c["got"]) is None:
            return "return two lists of ranks: the Ulysses group, then the ring group"
        return ("the Ulysses group is the rank's run of ulysses_size consecutive ranks (fast links in a node); the "
                "ring visits one rank per Ulysses group, always the same member of it")
    return _run("usp_groups", fn, cases, hint)
