"""Visible (query, key) pairs of a block under documents and a window, in closed form.

A block is query tokens ``[qa, qb)`` against key tokens ``[ka, kb)`` (the
contiguous and zigzag layouts deal contiguous pieces). A query ``i`` sees key
``j`` when both lie in one document and

* causal: ``0 ≤ i − j < W`` (``W = ∞`` without a window),
* not causal: ``|i − j| < W`` (every pair of the document without a window).

Both are differences of one count: ``f(t) = #{(i, j) in the block: i − j ≥ t}``,

    causal      f(0) − f(W)          not causal   f(1 − W) − f(W)

and ``f`` is a sum of a clamped line. For query ``i`` the keys with
``j ≤ i − t`` number ``clamp(i − t + 1 − ka, 0, L)`` (``L = kb − ka``); with
``x = i − t + 1 − ka`` running over ``[x0, x1)``,

    f(t) = S(x1) − S(x0),   S(X) = Σ_{0 ≤ x < X} min(x, L)
         = X(X − 1)/2 for X ≤ L + 1, else L(L + 1)/2 + (X − L − 1)·L.

Documents split the block: the count is the sum over the documents that
overlap both its query and its key tokens, each clipped to the document. The
cost is a few integer operations per block and document, at any length.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def _s(x: int, length: int) -> int:
    """``Σ_{0 ≤ x' < x} min(x', length)`` (0 for ``x ≤ 0``)."""
    if x <= 0:
        return 0
    if x <= length + 1:
        return x * (x - 1) // 2
    return length * (length + 1) // 2 + (x - length - 1) * length


def pairs_at_least(qa: int, qb: int, ka: int, kb: int, t: int) -> int:
    """``f(t)``: pairs ``(i, j)`` of ``[qa, qb) × [ka, kb)`` with ``i − j ≥ t``."""
    if qb <= qa or kb <= ka:
        return 0
    length = kb - ka
    return _s(qb - t + 1 - ka, length) - _s(qa - t + 1 - ka, length)


def _band(qa: int, qb: int, ka: int, kb: int, causal: bool, window: int | None) -> int:
    """Pairs of one document's block that the causal mask and the window leave."""
    if qb <= qa or kb <= ka:
        return 0
    if window is None:
        return pairs_at_least(qa, qb, ka, kb, 0) if causal else (qb - qa) * (kb - ka)
    low = 0 if causal else 1 - window
    return pairs_at_least(qa, qb, ka, kb, low) - pairs_at_least(qa, qb, ka, kb, window)


def visible_pairs(q: tuple[int, int], kv: tuple[int, int], *, causal: bool, window: int | None = None,
                  starts: Sequence[int] | None = None, n: int | None = None) -> int:
    """Pairs of query tokens ``q = (qa, qb)`` and key tokens ``kv`` that the mask leaves (module docstring).

    ``starts``: the documents' first tokens (increasing, ``starts[0] == 0``),
    the last document ending at ``n``; None: one document.
    """
    (qa, qb), (ka, kb) = q, kv
    if starts is None:
        return _band(qa, qb, ka, kb, causal, window)
    if n is None:
        raise ValueError("visible_pairs: n (the sequence length) is needed with starts")
    # a document with pairs in the block ends after max(qa, ka) and starts before min(qb, kb)
    lo, hi = max(qa, ka), min(qb, kb)
    total = 0
    first = bisect.bisect_right(starts, lo) - 1
    for d in range(max(first, 0), len(starts)):
        s = starts[d]
        if s >= hi:
            break
        e = starts[d + 1] if d + 1 < len(starts) else n
        total += _band(max(qa, s), min(qb, e), max(ka, s), min(kb, e), causal, window)
    return total
