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

import torch

from ._utils import check_positive_int
from .masks import MaskSpec, check_document_ids, check_window, classify, mask_spec

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(n: int, ring_size: int, layout: str) -> None:
    """Raise ValueError unless ``layout`` can deal ``n`` tokens evenly to ``ring_size`` ranks."""
    check_positive_int(ring_size, "ring_size")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    parts = 2 * ring_size if layout == "zigzag" else ring_size
    if n % parts:
        divisors = [d for d in range(1, min(n, 64) + 1) if n % (2 * d if layout == "zigzag" else d) == 0]
        need = f"2·ring_size = {parts}" if layout == "zigzag" else f"ring_size = {parts}"
        raise ValueError(
            f"ring_size={ring_size} does not fit sequence length {n} with layout={layout!r}: "
            f"{need} must divide {n}; ring sizes that work: {divisors}"
        )


def layout_pieces(n: int, ring_size: int, layout: str) -> list[list[tuple[int, int]]]:
    """For each rank, its pieces as (start, stop) token ranges (striped: one strided piece)."""
    check_layout(n, ring_size, layout)
    w = ring_size
    if layout == "contiguous":
        c = n // w
        return [[(r * c, (r + 1) * c)] for r in range(w)]
    if layout == "zigzag":
        c = n // (2 * w)
        return [[(r * c, (r + 1) * c), ((2 * w - 1 - r) * c, (2 * w - r) * c)] for r in range(w)]
    return [[(r, n)] for r in range(w)]  # striped: positions r, r+w, ... < n


def layout_positions(n: int, ring_size: int, layout: str) -> torch.Tensor:
    """``(w, c)`` LongTensor: the token positions each rank holds, in shard order."""
    check_layout(n, ring_size, layout)
    if layout == "striped":
        return torch.arange(n).reshape(n // ring_size, ring_size).T.contiguous()
    return torch.stack([
        torch.cat([torch.arange(a, b) for a, b in pieces])
        for pieces in layout_pieces(n, ring_size, layout)
    ])


def usp_positions(n: int, ring_size: int, ulysses_size: int, layout: str) -> torch.Tensor:
    """``(w, c)`` LongTensor: the tokens each rank holds in the 2-D hybrid (Ulysses inside groups, a ring across).

    Rank ``g·u + i`` (``u = ulysses_size`` consecutive ranks per group) holds
    the ``i``-th of ``u`` equal contiguous parts of ring shard ``g`` of
    ``layout`` over ``w/u`` ranks, so a group's all-to-all gathers exactly its
    ring shard. ``ulysses_size=1`` is :func:`layout_positions`.
    """
    check_positive_int(ulysses_size, "ulysses_size")
    check_positive_int(ring_size, "ring_size")
    if ring_size % ulysses_size:
        sizes = [u for u in range(1, ring_size + 1) if ring_size % u == 0]
        raise ValueError(f"ulysses_size={ulysses_size} must divide the ring size {ring_size}; sizes that work: {sizes}")
    groups = ring_size // ulysses_size
    ring = layout_positions(n, groups, layout)
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
    check_layout(n, ring_size, layout)
    ids = check_document_ids(document_ids, 1 if document_ids is None or document_ids.dim() == 1
                             else document_ids.shape[0], n)
    return [list(row) for row in schedule_for(n, ring_size, layout, mask_spec(causal, ids, check_window(window)))]


@functools.lru_cache(maxsize=128)
def schedule_for(n: int, ring_size: int, layout: str, spec: MaskSpec) -> tuple[tuple[Step, ...], ...]:
    """:func:`ring_schedule` for a :class:`~ringbook.masks.MaskSpec` (hashable: cached per call shape)."""
    pieces = [_shard_ranges(p, layout, ring_size) for p in layout_pieces(n, ring_size, layout)]
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


def work_per_rank(n: int, ring_size: int, *, layout: str = "contiguous", causal: bool = True,
                  document_ids: torch.Tensor | None = None, window: int | None = None) -> list[int]:
    """Tile areas each rank computes over the whole ring (the load-balance picture; a partial tile counts whole)."""
    sched = ring_schedule(n, ring_size, layout=layout, causal=causal, document_ids=document_ids, window=window)
    return [sum(sched[t][r].work for t in range(ring_size)) for r in range(ring_size)]
