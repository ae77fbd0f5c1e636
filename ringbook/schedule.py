"""Who holds which tokens, and which blocks each rank computes at each ring step.

This module is pure data: no attention math and no communication. The
one-process ring (:mod:`ringbook.ring`), the multi-process ring
(:mod:`ringbook.distributed`), the notebooks' figures and the tests all read
the same schedule.

Layouts (how the ``n`` tokens are dealt to ``w`` ranks, ``c = n / w`` each):

* ``"contiguous"`` — rank r holds the r-th of w chunks.
* ``"zigzag"`` — the sequence is cut into 2w chunks; rank r holds chunks r
  and 2w−1−r, so every rank has one early and one late chunk and causal work
  is balanced.
* ``"striped"`` — rank r holds tokens r, r+w, r+2w, … (Brandon et al., 2023).
* ``"doc_headtail"`` — zigzag inside every packed document (PyTorch's
  ``_PerDocumentHeadTailLoadBalancer``): each document is cut into 2w chunks
  and rank r holds chunks r and 2w−1−r of every one, so the causal work of
  each document, and so of all, is balanced. It is dealt from the
  ``document_ids`` (:func:`head_tail_positions`), so only the functions that
  take them accept it: :func:`layout_positions`, :func:`ring_schedule`,
  :func:`work_per_rank`, :func:`ringbook.ring_attention` and
  :func:`ringbook.distributed.shard`/``unshard``.

:func:`layout_report` counts every layout's work per rank for a mask and
:func:`best_layout` picks the one whose busiest rank computes least.

The ring: at step t, rank r holds the key/value shard that started on rank
(r − t) mod w; after each step every shard moves one rank along (r → r+1).
A rank's shard is made of contiguous *pieces* (one for contiguous, two for
zigzag; striped is treated as one piece whose positions interleave). Each
(query piece, key piece) pair of a step is a *block*: ``"full"`` (every key
visible to every query), ``"causal"`` (needs the position mask) or skipped
(no key visible — never computed).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ._utils import check_positive_int
from .masks import MaskSpec, check_document_ids, check_window, classify, mask_spec, visible_keys

LAYOUTS = ("contiguous", "zigzag", "striped")
DOC_HEADTAIL = "doc_headtail"  # dealt from the document ids: not in LAYOUTS, which every engine takes


def _document_lengths(document_ids: torch.Tensor, n: int) -> list[int]:
    """The lengths of the packed documents, the same in every batch row (one deal serves every row)."""
    ids = check_document_ids(document_ids, 1 if document_ids.dim() == 1 else document_ids.shape[0], n)
    different = (ids != ids[:1]).any(dim=1)
    if bool(different.any()):
        raise ValueError(f"layout={DOC_HEADTAIL!r} deals tokens by documents, one deal for every batch row, but batch "
                         f"row {int(torch.nonzero(different)[0])} packs different documents from row 0; give every row "
                         "the same documents (or run the rows separately)")
    return torch.unique_consecutive(ids[0], return_counts=True)[1].tolist()


def head_tail_positions(document_ids: torch.Tensor, ring_size: int) -> torch.Tensor:
    """``(w, c)`` LongTensor: the tokens each rank holds in the per-document head-tail layout ``"doc_headtail"``.

    Each document (``document_ids``: ``(n,)``, or ``(b, n)`` with the same
    documents in every row) is cut into ``2w`` equal chunks; rank r holds
    chunks r and ``2w − 1 − r`` of every document, in sequence order (PyTorch's
    ``_PerDocumentHeadTailLoadBalancer``). Every document length must be a
    multiple of ``2w``; the ValueError says which ring sizes fit.
    """
    ring_size = check_positive_int(ring_size, "ring_size")
    if not isinstance(document_ids, torch.Tensor):
        raise TypeError(f"layout={DOC_HEADTAIL!r} is dealt from document_ids (an integer tensor), got "
                        f"{type(document_ids).__name__}")
    return torch.stack([torch.cat([torch.arange(a, b) for a, b in p])
                        for p in _head_tail_pieces(document_ids, ring_size)])


def _head_tail_pieces(document_ids: torch.Tensor, ring_size: int) -> list[list[tuple[int, int]]]:
    w, n = ring_size, document_ids.shape[-1]
    lengths = _document_lengths(document_ids, n)
    bad = [d for d, length in enumerate(lengths) if length % (2 * w)]
    if bad:
        g = math.gcd(*lengths)
        sizes = [x for x in range(1, min(g // 2, 64) + 1) if g % (2 * x) == 0]
        fits = f"ring sizes that fit these documents: {sizes}" if sizes else "no ring size fits (a length is odd)"
        shown = ", ".join(f"{d} (length {lengths[d]})" for d in bad[:5]) + (", …" if len(bad) > 5 else "")
        which = f"document {shown} is not a multiple" if len(bad) == 1 else f"documents {shown} are not multiples"
        raise ValueError(f"layout={DOC_HEADTAIL!r} cuts every document into 2·ring_size = {2 * w} equal chunks, but "
                         f"{which} of {2 * w}; {fits}, or pad every document to a "
                         f"multiple of {2 * w} (or use layout='zigzag', which needs only n divisible by {2 * w})")
    pieces, start = [[] for _ in range(w)], 0
    for length in lengths:
        m = length // (2 * w)
        for r in range(w):
            pieces[r] += [(start + r * m, start + (r + 1) * m), (start + (2 * w - 1 - r) * m, start + (2 * w - r) * m)]
        start += length
    return pieces


def check_layout(n: int, ring_size: int, layout: str, document_ids: torch.Tensor | None = None) -> None:
    """Raise ValueError unless ``layout`` can deal ``n`` tokens evenly to ``ring_size`` ranks (``"doc_headtail"``:
    the documents of ``document_ids``)."""
    check_positive_int(ring_size, "ring_size")
    if layout == DOC_HEADTAIL and document_ids is not None:
        _head_tail_pieces(check_document_ids(document_ids, 1 if document_ids.dim() == 1 else document_ids.shape[0],
                                             n), ring_size)
        return
    if layout not in LAYOUTS:
        also = (f" ({DOC_HEADTAIL!r} is dealt from document_ids: pass them, to a function that takes it: "
                "ringbook.ring_attention, ringbook.schedule, ringbook.distributed.shard/unshard)"
                if layout == DOC_HEADTAIL else "")
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}{also}")
    parts = 2 * ring_size if layout == "zigzag" else ring_size
    if n % parts:
        divisors = [d for d in range(1, min(n, 64) + 1) if n % (2 * d if layout == "zigzag" else d) == 0]
        need = f"2·ring_size = {parts}" if layout == "zigzag" else f"ring_size = {parts}"
        raise ValueError(
            f"ring_size={ring_size} does not fit sequence length {n} with layout={layout!r}: "
            f"{need} must divide {n}; ring sizes that work: {divisors}"
        )


def layout_pieces(n: int, ring_size: int, layout: str,
                  document_ids: torch.Tensor | None = None) -> list[list[tuple[int, int]]]:
    """For each rank, its pieces as (start, stop) token ranges (striped: one strided piece; ``"doc_headtail"``:
    two per document, from ``document_ids``)."""
    check_layout(n, ring_size, layout, document_ids)
    w = ring_size
    if layout == DOC_HEADTAIL:
        return _head_tail_pieces(document_ids, w)
    if layout == "contiguous":
        c = n // w
        return [[(r * c, (r + 1) * c)] for r in range(w)]
    if layout == "zigzag":
        c = n // (2 * w)
        return [[(r * c, (r + 1) * c), ((2 * w - 1 - r) * c, (2 * w - r) * c)] for r in range(w)]
    return [[(r, n)] for r in range(w)]  # striped: positions r, r+w, ... < n


def layout_positions(n: int, ring_size: int, layout: str, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(w, c)`` LongTensor: the token positions each rank holds, in shard order (``document_ids``: for
    ``"doc_headtail"``, ignored by the other layouts)."""
    check_layout(n, ring_size, layout, document_ids)
    if layout == "striped":
        return torch.arange(n).reshape(n // ring_size, ring_size).T.contiguous()
    return torch.stack([
        torch.cat([torch.arange(a, b) for a, b in pieces])
        for pieces in layout_pieces(n, ring_size, layout, document_ids)
    ])


def usp_positions(n: int, ring_size: int, ulysses_size: int, layout: str,
                  document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(w, c)`` LongTensor: the tokens each rank holds in the 2-D hybrid (Ulysses inside groups, a ring across).

    Rank ``g·u + i`` (``u = ulysses_size`` consecutive ranks per group) holds
    the ``i``-th of ``u`` equal contiguous parts of ring shard ``g`` of
    ``layout`` over ``w/u`` ranks, so a group's all-to-all gathers exactly its
    ring shard. ``ulysses_size=1`` is :func:`layout_positions` (``document_ids``
    as there).
    """
    check_positive_int(ulysses_size, "ulysses_size")
    check_positive_int(ring_size, "ring_size")
    if ring_size % ulysses_size:
        sizes = [u for u in range(1, ring_size + 1) if ring_size % u == 0]
        raise ValueError(f"ulysses_size={ulysses_size} must divide the ring size {ring_size}; sizes that work: {sizes}")
    groups = ring_size // ulysses_size
    ring = layout_positions(n, groups, layout, document_ids)
    if ring.shape[1] % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size} does not divide the {ring.shape[1]} tokens of a ring shard "
                         f"(n={n} over {groups} groups, layout={layout!r}); choose n divisible by "
                         f"{groups * ulysses_size * (2 if layout == 'zigzag' else 1)}")
    return ring.reshape(ring_size, -1)


@dataclasses.dataclass(frozen=True)
class Block:
    """One computed block: query rows ``q`` and key rows ``kv`` (ranges inside the shards)."""

    q: tuple[int, int]
    kv: tuple[int, int]
    kind: str  # "full", "causal" (the causal mask cuts it) or "masked" (a document or window boundary does)

    @property
    def area(self) -> int:
        return (self.q[1] - self.q[0]) * (self.kv[1] - self.kv[0])


@dataclasses.dataclass(frozen=True)
class Step:
    """What ``rank`` does at ring step ``step``: attend to the shard that started on ``kv_rank``."""

    rank: int
    step: int
    kv_rank: int
    blocks: tuple[Block, ...]
    skipped: tuple[Block, ...]

    @property
    def computed(self) -> bool:
        return bool(self.blocks)

    @property
    def work(self) -> int:
        """Scores computed (tile areas), the unit of the load-balance plots."""
        return sum(b.area for b in self.blocks)


def _shard_ranges(pieces: list[tuple[int, int]], layout: str, ring_size: int):
    """(start, stop) inside the shard for each piece, with its token positions."""
    out, offset = [], 0
    for a, b in pieces:
        pos = torch.arange(a, b, ring_size) if layout == "striped" else torch.arange(a, b)
        out.append(((offset, offset + pos.numel()), pos))
        offset += pos.numel()
    return out


def ring_schedule(n: int, ring_size: int, *, layout: str = "contiguous", causal: bool = False,
                  document_ids: torch.Tensor | None = None, window: int | None = None) -> list[list[Step]]:
    """``schedule[t][r]``: what rank r computes at step t, for ``n`` tokens.

    Without a mask every block is ``"full"``. With ``causal`` (and the
    documents and window of :mod:`ringbook.masks`) a block no query sees any
    key of is skipped (never computed), one whose every pair is seen is
    ``"full"``, one only the causal mask cuts is ``"causal"``, and one a
    document or window boundary cuts is ``"masked"``. ``document_ids``
    (``b n`` or ``n``) describe the whole sequence, the same for every rank.
    """
    ids = check_document_ids(document_ids, 1 if document_ids is None or document_ids.dim() == 1
                             else document_ids.shape[0], n)
    check_layout(n, ring_size, layout, ids)
    return [list(row) for row in schedule_for(n, ring_size, layout, mask_spec(causal, ids, check_window(window)))]


@functools.lru_cache(maxsize=128)
def schedule_for(n: int, ring_size: int, layout: str, spec: MaskSpec) -> tuple[tuple[Step, ...], ...]:
    """:func:`ring_schedule` for a :class:`~ringbook.masks.MaskSpec` (hashable: cached per call shape)."""
    pieces = [_shard_ranges(p, layout, ring_size) for p in layout_pieces(n, ring_size, layout, spec.ids())]
    schedule = []
    for t in range(ring_size):
        row = []
        for r in range(ring_size):
            src = (r - t) % ring_size
            blocks, skipped = [], []
            for q_rng, q_pos in pieces[r]:
                for k_rng, k_pos in pieces[src]:
                    kind = classify(q_pos, k_pos, spec)
                    if kind == "empty":
                        skipped.append(Block(q_rng, k_rng, "skip"))
                    else:
                        blocks.append(Block(q_rng, k_rng, kind))
            row.append(Step(r, t, src, tuple(blocks), tuple(skipped)))
        schedule.append(tuple(row))
    return tuple(schedule)


def gathered_rows(n: int, ring_size: int, *, layout: str, causal: bool, window: int | None = None) -> int:
    """How many rows of each shard an all-gather must bring: its last ``min(c, W − 1)`` under a causal window on
    contiguous shards, else all ``c = n / ring_size``.

    Query i sees keys j with i − W < j ≤ i, and a rank's first query sits
    at the start of its shard: no key more than W − 1 positions before the
    shard is seen, and those are the ends of the earlier shards. (Zigzag's
    halves would each need their own end, and a window without causality
    the other side's beginning too: they gather whole shards.)
    """
    c = n // ring_size
    if causal and window is not None and layout == "contiguous":
        return min(c, window - 1)
    return c


def work_per_rank(n: int, ring_size: int, *, layout: str = "contiguous", causal: bool = True,
                  document_ids: torch.Tensor | None = None, window: int | None = None) -> list[int]:
    """Tile areas each rank computes over the whole ring (the load-balance picture; a partial tile counts whole)."""
    sched = ring_schedule(n, ring_size, layout=layout, causal=causal, document_ids=document_ids, window=window)
    return [sum(sched[t][r].work for t in range(ring_size)) for r in range(ring_size)]


@dataclasses.dataclass(frozen=True)
class LayoutWork:
    """One layout's work per rank under a mask: ``needed``, the (query, key) pairs the mask keeps of the rank's
    queries; ``computed``, the tile areas it computes (:func:`work_per_rank`: a partial tile counts whole)."""

    layout: str
    needed: tuple[int, ...]
    computed: tuple[int, ...]

    @property
    def imbalance(self) -> float:
        """Busiest / mean rank of the needed pairs: 1.0 is a perfect balance."""
        mean = sum(self.needed) / len(self.needed)
        return max(self.needed) / mean if mean else 1.0

    @property
    def busiest(self) -> int:
        """The busiest rank's computed tile area: the ring runs at its pace."""
        return max(self.computed)


def layout_report(n: int, ring_size: int, *, causal: bool = True, document_ids: torch.Tensor | None = None,
                  window: int | None = None, layouts: tuple[str, ...] | None = None) -> dict[str, LayoutWork]:
    """Every layout's :class:`LayoutWork` for this mask, ``{layout: work}`` in the order of ``layouts``.

    ``layouts`` defaults to :data:`LAYOUTS` plus ``"doc_headtail"`` when
    there are documents; a layout that cannot deal ``n`` tokens (or these
    documents) to ``ring_size`` ranks is left out. The counts are exact
    (:func:`ringbook.masks.visible_keys`, :func:`ring_schedule`), for a
    teaching-sized sequence: the schedule classifies every block.
    """
    ids = check_document_ids(document_ids, 1 if document_ids is None or document_ids.dim() == 1
                             else document_ids.shape[0], n)
    window = check_window(window)
    if layouts is None:
        layouts = LAYOUTS + ((DOC_HEADTAIL,) if ids is not None else ())
    keys = visible_keys(n, causal=causal, document_ids=ids, window=window)
    report = {}
    for layout in layouts:
        try:
            positions = layout_positions(n, ring_size, layout, ids)
        except ValueError:
            if layout not in LAYOUTS + (DOC_HEADTAIL,):
                raise
            continue  # this layout cannot deal these tokens
        computed = work_per_rank(n, ring_size, layout=layout, causal=causal, document_ids=ids, window=window)
        report[layout] = LayoutWork(layout, tuple(keys[positions].sum(dim=1).tolist()), tuple(computed))
    return report


def best_layout(n: int, ring_size: int, *, causal: bool = True, document_ids: torch.Tensor | None = None,
                window: int | None = None, layouts: tuple[str, ...] | None = None) -> str:
    """The layout of :func:`layout_report` whose busiest rank computes least; ties go to the better balance of the
    needed pairs, then to the earlier layout in ``layouts`` (contiguous first).

    The busiest rank's *computed* work decides, not the needed balance alone:
    striped balances the needed pairs of any mask but cuts no block empty, so
    it computes every score. The K/V hops are not counted (a window's traffic
    favours contiguous shards: notebook 07). Use it where the caller may
    permute the tokens (``ringbook.ring_attention(layout="best")`` takes the
    whole sequence and puts it back in order).
    """
    report = layout_report(n, ring_size, causal=causal, document_ids=document_ids, window=window, layouts=layouts)
    if not report:
        raise ValueError(f"no layout of {layouts or LAYOUTS} deals n={n} tokens to ring_size={ring_size} ranks; "
                         f"choose a ring size that divides {n}")
    order = list(report)
    return min(report.values(), key=lambda x: (x.busiest, x.imbalance, order.index(x.layout))).layout
