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

Tiles (:func:`tile_counts`). A fused kernel does not compute pairs but
``t × t`` tiles (``t = 128``): it skips a tile no query of it sees and
computes any other whole. So a masked piece costs the tiles its visible pairs
touch: a causal document of ``L`` tokens ``R(R + 1)/2`` tiles, ``R = ⌈L/t⌉``
(``≈ L²/2 + t·L/2`` pairs: twice its visible pairs at ``L = t``), a causal
window of ``W`` about ``⌈(W − 1)/t⌉ + 1`` tiles per tile row. Per tile row the
columns touched are one run whose ends are clamped lines of the row index,
so the counts are sums of arithmetic series between a few kinks, per
document piece (:func:`_piece_tiles`).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
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


# --------------------------------------------------------------------------- the tiles a fused kernel computes

TILE = 128  # rows and columns of the tiles FlashAttention-2 (d ≤ 128) and flex_attention's BlockMask compute
_NONE = 1 << 62  # "no bound" for a band edge


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The ``t × t`` tiles a fused masked kernel computes for a block (see :func:`tile_counts`).

    ``tiles``: tiles with a visible pair (each is computed whole); ``partial``:
    those of them with a pair the mask hides (the kernel evaluates the mask
    element by element there); ``rows``: tile rows (one work item each: a
    thread block loads its queries once and writes their out and lse once);
    ``banded``: the *full* tiles of pieces whose band FlashAttention-2 calls
    local (a window, or a causal edge not on the piece's bottom-right
    diagonal), which it masks too in its forward.
    """

    tiles: int
    partial: int
    rows: int
    banded: int

    @property
    def pairs(self) -> int:
        """Pairs of the tiles computed (per head), ``tiles · t²`` at ``t = TILE``."""
        return self.tiles * TILE * TILE


def _bounds(causal: bool, window: int | None) -> tuple[int, int]:
    """``(lo, hi)``: a query ``i`` sees key ``j`` of its document iff ``lo ≤ j − i ≤ hi`` (±``_NONE``: no bound)."""
    if causal:
        return (-_NONE if window is None else 1 - window), 0
    return (-_NONE, _NONE) if window is None else (1 - window, window - 1)


def _trim(qa: int, qb: int, ka: int, kb: int, lo: int, hi: int) -> tuple[int, int, int, int] | None:
    """The piece without its queries that see none of its keys and its keys no query sees (None: empty).

    Query ``i`` sees a key of ``[ka, kb)`` iff ``ka − hi ≤ i ≤ kb − 1 − lo``; the
    queries left see keys in ``[qa + lo, qb − 1 + hi]``. After trimming every
    query sees a key and every key is seen (``lo ≤ hi``).
    """
    qa, qb = max(qa, ka - hi), min(qb, kb - lo)
    if qb <= qa:
        return None
    ka, kb = max(ka, qa + lo), min(kb, qb + hi)
    return (qa, qb, ka, kb) if ka < kb else None


def _positive_sum(ga: int, gb: int, count: int) -> int:
    """``Σ max(0, g)`` over ``count`` consecutive integers where ``g`` is linear with slope −1, 0 or 1."""
    if ga >= 0 and gb >= 0:
        return count * (ga + gb) // 2
    if ga <= 0 and gb <= 0:
        return 0
    return gb * (gb + 1) // 2 if ga < 0 else ga * (ga + 1) // 2


def _piece_tiles(qa: int, qb: int, ka: int, kb: int, lo: int, hi: int, oq: int, ok: int,
                 t: int) -> tuple[int, int, tuple[int, int, int], tuple[int, int, int]]:
    """``(tiles, full, first, last)`` of a trimmed piece on the grid of ``t × t`` tiles whose corner is ``(oq, ok)``.

    Tile row ``r`` holds queries ``[i0, i1]`` (``oq + t·r …`` clipped to the
    piece); they see keys ``[max(ka, i0 + lo), min(kb − 1, i1 + hi)]``, one run
    (each query sees a run and the next query's run starts at most one key
    later), so its tiles are the columns ``c0 … c1`` of that run's ends. A
    tile is *full* when every query of a whole tile row sees every key of it:
    its keys lie in ``[max(ka, i1 + lo), min(kb − 1, i0 + hi)]``. Inside the
    piece (``i0 = oq + t·r``, ``i1 = i0 + t − 1``) each of these ends is
    ``min``/``max`` of a constant and ``r`` plus a constant in tile units
    (``⌊(t·r + x)/t⌋ = r + ⌊x/t⌋``), so the counts are linear in ``r`` between
    the four kinks and are summed per run of rows as arithmetic series (the
    full count clamped at 0, its slope is −1, 0 or 1). The first and last
    tile rows are counted alone. ``first``/``last``: ``(r, c0, c1)`` of the
    first and last tile rows.
    """
    def row(r: int) -> tuple[int, int | None, int, int]:
        top = oq + t * r
        i0, i1 = max(qa, top), min(qb, top + t) - 1
        c0, c1 = (max(ka, i0 + lo) - ok) // t, (min(kb - 1, i1 + hi) - ok) // t
        g = None
        if i0 == top and i1 == top + t - 1:  # full tiles: ⌊(b − ok + 1)/t⌋ − ⌈(a − ok)/t⌉
            a, b = max(ka, i1 + lo), min(kb - 1, i0 + hi)
            g = (b - ok + 1) // t + (ok - a) // t
        return c1 - c0 + 1, g, c0, c1

    r0, r1 = (qa - oq) // t, (qb - 1 - oq) // t
    tiles = full = 0
    ends = []
    for r in sorted({r0, r1}):
        n_t, g, c0, c1 = row(r)
        tiles, full = tiles + n_t, full + max(g or 0, 0)
        ends.append((r, c0, c1))
    a, b = r0 + 1, r1 - 1
    if a <= b:
        kinks = ((ka - ok) // t - (oq + lo - ok) // t,  # c0 = max(⌊(ka − ok)/t⌋, r + ⌊(oq + lo − ok)/t⌋)
                 (kb - 1 - ok) // t - (oq + t - 1 + hi - ok) // t,  # c1
                 (ok - oq - t + 1 - lo) // t - (ok - ka) // t,  # ⌈(a − ok)/t⌉
                 (kb - ok) // t - (oq + hi - ok + 1) // t)  # ⌊(b − ok + 1)/t⌋
        cuts = sorted({a, b + 1} | {x for k in kinks for x in (k, k + 1) if a < x <= b})
        for s, e in zip(cuts, cuts[1:]):
            (ts, gs, *_), (te, ge, *_) = row(s), row(e - 1)
            tiles += (e - s) * (ts + te) // 2
            full += _positive_sum(gs, ge, e - s)
    return tiles, full, ends[0], ends[-1]


def tile_counts(q: tuple[int, int], kv: tuple[int, int], *, causal: bool, window: int | None = None,
                starts: Sequence[int] | None = None, n: int | None = None, tile: int = TILE,
                aligned: str = "piece") -> Tiles:
    """The ``tile × tile`` tiles a fused masked kernel computes for query tokens ``q`` against key tokens ``kv``.

    The mask is that of :func:`visible_pairs`. Each document's part of the
    block (its *piece*) is first trimmed of the queries that see none of its
    keys and the keys no query sees; then

    * ``aligned="piece"``: each piece is tiled from its own first query and
      key, as a variable-length kernel sees it (FlashAttention's ``varlen``:
      one sequence per piece, ``ringbook.fast.varlen``);
    * ``aligned="block"``: the block is tiled from its corner and the pieces
      share its tiles, as flex_attention's BlockMask does: a tile two pieces
      touch is counted once. Only consecutive pieces can share one (in the
      last tile row of the first and the first of the second, where their
      column runs overlap), so the union is the sum less those overlaps.

    Counted in closed form per piece (:func:`_piece_tiles`): a few dozen
    integer operations per piece whatever its length.
    """
    if aligned not in ("piece", "block"):
        raise ValueError(f"aligned must be 'piece' or 'block', got {aligned!r}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    if starts is not None and n is None:
        raise ValueError("tile_counts: n (the sequence length) is needed with starts")
    return _tile_counts(tuple(q), tuple(kv), bool(causal), window, None if starts is None else tuple(starts), n,
                        tile, aligned)


@functools.lru_cache(maxsize=1 << 16)
def _tile_counts(q: tuple[int, int], kv: tuple[int, int], causal: bool, window: int | None,
                 starts: tuple[int, ...] | None, n: int | None, t: int, aligned: str) -> Tiles:
    (qa, qb), (ka, kb) = q, kv
    lo, hi = _bounds(causal, window)
    if starts is None:
        docs = [(qa, qb, ka, kb)]
    else:
        # as in visible_pairs: the documents that end after max(qa, ka) and start before min(qb, kb)
        docs = []
        for d in range(max(bisect.bisect_right(starts, max(qa, ka)) - 1, 0), len(starts)):
            s = starts[d]
            if s >= min(qb, kb):
                break
            e = starts[d + 1] if d + 1 < len(starts) else n
            docs.append((max(qa, s), min(qb, e), max(ka, s), min(kb, e)))
    tiles = full = rows = banded = 0
    prev = None
    for piece in docs:
        if piece[1] <= piece[0] or piece[3] <= piece[2]:
            continue
        cut = _trim(*piece, lo, hi)
        if cut is None:
            continue
        pa, pb, ra, rb = cut
        oq, ok = (pa, ra) if aligned == "piece" else (qa, ka)
        n_t, n_f, head, tail = _piece_tiles(pa, pb, ra, rb, lo, hi, oq, ok, t)
        tiles, full, rows = tiles + n_t, full + n_f, rows + tail[0] - head[0] + 1
        lo_bites, hi_bites = ra - (pb - 1) < lo, rb - 1 - pa > hi
        if lo_bites or (hi_bites and hi != rb - pb):  # not FlashAttention's causal (bottom-right) band
            banded += n_f
        if aligned == "block" and prev is not None and prev[0] == head[0]:  # a tile row the pieces share
            rows -= 1
            tiles -= max(0, min(prev[2], head[2]) - max(prev[1], head[1]) + 1)
        prev = tail
    return Tiles(tiles, tiles - full, rows, banded)
