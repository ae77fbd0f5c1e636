"""Exercises of notebook 07 (documents and windows): a block's kind under a document mask, the hops a window
needs, the work imbalance of a layout.

The references are :func:`ringbook.masks.keep` (which pairs a mask keeps) and
:func:`ringbook.production_plan` (the launches of each ring step), so the
learner is checked against the data the notebook's pictures and the ring read.
Document ids are ``(n,)`` LongTensors, non-decreasing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..fast.plans import production_plan
from ..masks import document_ids_from_cu_seqlens, keep, mask_spec
from ..schedule import head_tail_positions, layout_positions
from ._core import _close, _run, _same_integers

BLOCK_KINDS = ("full", "partial", "empty")


def _ids(lengths: list[int]) -> torch.Tensor:
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    return document_ids_from_cu_seqlens(cu)


def _seen(q_pos: torch.Tensor, k_pos: torch.Tensor, ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """``(i, j)``: the pairs the document mask (and causal) keeps."""
    return keep(q_pos, k_pos, causal=causal, q_doc=ids[None, q_pos], k_doc=ids[None, k_pos])[0, 0]


def _kind(q_range: tuple[int, int], k_range: tuple[int, int], ids: torch.Tensor, causal: bool) -> str:
    seen = _seen(torch.arange(*q_range), torch.arange(*k_range), ids, causal)
    return "full" if bool(seen.all()) else "empty" if not bool(seen.any()) else "partial"


def check_document_block(fn: Callable) -> bool | None:
    """``fn(q_range, k_range, document_ids, causal) -> "full" | "partial" | "empty"``: a block's kind.

    ``q_range`` and ``k_range`` are ``(start, stop)`` token ranges (a block's
    queries and keys, each contiguous); ``document_ids`` the ``(n,)``
    non-decreasing document of every token. "full": every query sees every
    key; "empty": no query sees any key (never computed); "partial"
    otherwise. The cases are ring blocks of 4 ranks over several packings,
    causal and not: documents of length 1, one document spanning every shard,
    a boundary on a shard boundary.
    """
    cases, seen = [], set()
    packings = ([16], [4, 4, 4, 4], [5, 1, 7, 3], [1, 1, 1, 13], [2, 9, 1, 1, 3], [11, 5])
    for lengths in packings:
        ids = _ids(lengths)
        for causal in (False, True):
            for size in (4, 2):  # contiguous shards of 4 ranks, and the half-shards of zigzag
                edges = [(a, a + size) for a in range(0, 16, size)]
                for q_range in edges:
                    for k_range in edges:
                        key = (tuple(lengths), causal, q_range, k_range)
                        if key not in seen and (size == 4 or (q_range[0] + k_range[0]) % 3 == 0):
                            seen.add(key)
                            cases.append((f"documents of lengths {lengths}, causal={causal}, queries {q_range}, "
                                          f"keys {k_range}", (q_range, k_range, ids, causal),
                                          _kind(q_range, k_range, ids, causal)))
    cases.append(("one query, one key, the same token", ((3, 4), (3, 4), _ids([2, 2]), True), "full"))
    cases = [(label, args, want, lambda got, want: isinstance(got, str) and got == want)
             for label, args, want in cases]

    def hint(c):
        q_range, k_range, ids, causal = c["args"]
        if c["got"] not in BLOCK_KINDS:
            return 'return one of the strings "full", "partial", "empty"'
        if causal and c["want"] != _kind(q_range, k_range, ids, False):
            return ("with causal, a key after a query is not seen either: compare the earliest query with the "
                    "latest key, and the latest query with the earliest key")
        return ("the ids never decrease, so the first and last token of a range bound its documents: when can "
                "two ranges share no document? when do all their tokens share one?")
    return _run("document_block", fn, cases, hint)


def _plan_hops(n: int, world: int, window: int) -> int:
    """The K/V hops the one-process ring's plan sends for a causal window, contiguous layout (the checker's
    reference): the last step with any launch."""
    plan = production_plan(n, world, layout="contiguous", causal=True, mask=mask_spec(True, None, window))
    return max((t for t, launches in enumerate(plan) if launches), default=0)


def check_window_hops(fn: Callable) -> bool | None:
    """``fn(n, world, window) -> int``: the K/V hops a causal window of ``window`` tokens needs.

    ``n`` tokens, contiguous shards of ``c = n / world`` over ``world`` ranks;
    query i sees keys ``i − window < j ≤ i``. A hop is one pass of every K/V
    shard to the next rank; the answer is the last ring step any rank needs
    (0: every rank attends its own shard only). Checked against the steps of
    :func:`ringbook.production_plan`.
    """
    cases = []
    for n, w, windows in ((64, 4, (1, 2, 15, 16, 17, 18, 32, 33, 40, 48, 49, 64, 100)), (12, 3, (1, 4, 5, 9, 12)),
                          (8, 8, (1, 2, 3, 8, 9)), (30, 1, (1, 30)), (60, 5, (12, 13, 25, 24, 59))):
        for W in windows:
            cases.append((f"n={n}, world={w}, window={W}", (n, w, W), _plan_hops(n, w, W),
                          lambda got, want: not isinstance(got, (list, tuple)) and
                          _same_integers(got, torch.tensor([want]))))

    def hint(c):
        n, w, W = c["args"]
        c_len = n // w
        try:
            got = float(c["got"])
        except (TypeError, ValueError):
            return "return one whole number of hops"
        if got > w - 1:
            return "a ring of w ranks has only w − 1 other shards to bring: no hop is ever needed past them"
        if got == math.ceil(W / c_len):
            return ("a query sees itself and window − 1 keys before it: how far back does the earliest query of a "
                    "shard reach, and in which shard is that key?")
        return ("the first query of rank r, at r·c, is the one that reaches furthest back; count the shards "
                "between its earliest key and its own shard")
    return _run("window_hops", fn, cases, hint)


def _needed(positions: torch.Tensor, document_ids: torch.Tensor, causal: bool) -> list[int]:
    """The scores each rank needs: pairs (its query, any key) the document mask (and causal) keeps."""
    keys = torch.arange(document_ids.numel())
    return [int(_seen(row, keys, document_ids, causal).sum()) for row in positions]


def _imbalance(work: list[int]) -> float:
    return max(work) / (sum(work) / len(work))


def check_layout_imbalance(fn: Callable) -> bool | None:
    """``fn(positions, document_ids, causal) -> float``: busiest / mean of the scores each rank needs.

    ``positions`` is ``(w, c)``: the token positions rank r holds (any
    layout); a rank needs, for each of its queries, the keys of the whole
    sequence that the document mask (and causal) keeps. 1.0 is a perfect
    balance; the ring runs at the pace of the busiest rank.
    """
    cases = []
    for lengths, w in (([32], 4), ([8, 8, 8, 8], 4), ([72, 16, 8, 32], 4), ([8, 16, 40], 2), ([6, 6, 12], 3),
                       ([1, 1, 1, 5], 2), ([3, 9], 1)):
        ids, n = _ids(lengths), sum(lengths)
        layouts = {name: layout_positions(n, w, name) for name in ("contiguous", "zigzag", "striped")
                   if n % (2 * w if name == "zigzag" else w) == 0}
        if all(length % (2 * w) == 0 for length in lengths):
            layouts["doc_headtail"] = head_tail_positions(ids, w)
        for name, pos in layouts.items():
            for causal in (True, False):
                want = torch.tensor(_imbalance(_needed(pos, ids, causal)), dtype=torch.float64)
                cases.append((f"{name}, documents {lengths}, world={w}, causal={causal}", (pos, ids, causal), want,
                              lambda got, want: _close(got, want)))

    def hint(c):
        pos, ids, causal = c["args"]
        try:
            got = float(c["got"])
        except (TypeError, ValueError):
            return "return one number: the busiest rank's scores over the mean rank's"
        work = _needed(pos, ids, causal)
        if min(work) and math.isclose(got, max(work) / min(work)):
            return "divide by the mean rank's work, not the least loaded rank's"
        if causal and math.isclose(got, _imbalance(_needed(pos, torch.zeros_like(ids), causal))):
            return "a query sees only keys of its own document"
        if math.isclose(got, _imbalance(_needed(pos, ids, not causal))):
            return "with causal, a query sees only keys at or before it (and without, all keys of its document)"
        return "for each rank, count the (query, key) pairs the mask keeps over all n keys; then busiest / mean"
    return _run("layout_imbalance", fn, cases, hint)
