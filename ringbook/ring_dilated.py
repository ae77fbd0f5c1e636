"""Dilated attention sharded over a ring of ranks, in one process (notebook ``03_dilated_attention``).

Dilated attention over a ring: the same function as
:func:`ringbook.dilated_attention` (equation (D)) for every ring size. The
sequence is sharded contiguously, rank ``k`` holding tokens
``[k·c, (k+1)·c)`` with ``c = n / ring_size``. For each pair (s, r):

* a segment inside one shard is **local**: its rank computes it alone, all
  its local segments batched, with no communication;
* a segment spanning several shards is **exchanged**: every spanned rank
  sends the *dilated* keys/values of its piece (``s/r`` tokens per head for
  the whole segment, not ``s``) to the other spanned ranks, then attends its
  own dilated queries to the gathered segment.

Why an all-gather among the spanned ranks rather than a ring: every spanned
rank needs the whole dilated segment (its queries attend all of it), the
payload is small (``s/r`` tokens), and an all-gather delivers it in one
collective — a ring would move the same bytes in ``|ranks| − 1`` dependent
steps. With ``causal`` a piece goes only to the later spanned ranks (earlier
ones never see it), which halves the traffic.

The plan (:func:`dilated_ring_plan`) is plain data; the compute loop
consumes it, and the notebook and tests read it. Communication (phase 1:
build every send buffer from the sender's own shard, deliver it) is kept
apart from math (phase 2: each rank attends using only its own shard and
what it received). Shapes: ``b n h d``; a shard is ``b c h d``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from einops import rearrange

from ._utils import check_bool, check_positive_int, check_qkv, compute_dtype, resolve_scale
from .dilated import attend_segments, check_dilated_config, gather_dilated, pair_heads, scatter_dilated
from .online_softmax import merge_partials


def _count(lo: int, hi: int, o: int, r: int) -> int:
    """How many t in [lo, hi) have t ≡ o (mod r)."""
    return (hi - 1 - o) // r - (lo - 1 - o) // r


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """One segment of one pair: the ranks whose shards it spans and what each sends."""

    pair: int
    index: int  # segment number within the pair
    start: int
    stop: int
    ranks: tuple[int, ...]
    send_rows: tuple[int, ...]  # per spanned rank: dilated K rows it sends (summed over heads; V the same)
    receivers: tuple[int, ...]  # per spanned rank: how many ranks receive them

    @property
    def kind(self) -> str:
        return "local" if len(self.ranks) == 1 else "exchanged"

    def piece(self, rank: int, shard_len: int) -> tuple[int, int]:
        """The global token range of this segment held by ``rank``."""
        return max(self.start, rank * shard_len), min(self.stop, (rank + 1) * shard_len)


@dataclasses.dataclass(frozen=True)
class DilatedRingPlan:
    seq_len: int
    ring_size: int
    shard_len: int
    causal: bool
    pairs: tuple[tuple[int, int], ...]  # (seg, r)
    patterns: tuple  # per pair: (heads, offsets), see ringbook.dilated.pair_heads
    segments: tuple[SegmentPlan, ...]

    def segments_on(self, rank: int, pair: int) -> list[SegmentPlan]:
        """The segments of ``pair`` that overlap ``rank``'s shard, in sequence order."""
        return [s for s in self.segments if s.pair == pair and rank in s.ranks]

    def sent_elements(self, batch: int, head_dim: int) -> list[int]:
        """Elements each rank sends over the whole call (K and V, every receiver counted)."""
        sent = [0] * self.ring_size
        for seg in self.segments:
            for rank, rows, receivers in zip(seg.ranks, seg.send_rows, seg.receivers):
                sent[rank] += 2 * batch * head_dim * rows * receivers
        return sent


def dilated_ring_plan(seq_len: int, ring_size: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int], *,
                      num_heads: int, heads: str = "all", causal: bool = False) -> DilatedRingPlan:
    """Which ranks each segment spans, local or exchanged, and how many dilated rows each rank sends."""
    check_positive_int(ring_size, "ring_size")
    check_positive_int(seq_len, "seq_len")
    check_positive_int(num_heads, "num_heads")
    causal = check_bool(causal, "causal")
    if seq_len % ring_size:
        divisors = [x for x in range(1, min(seq_len, 64) + 1) if seq_len % x == 0]
        raise ValueError(f"ring_size={ring_size} does not divide sequence length {seq_len}; "
                         f"choose a divisor of {seq_len}: {divisors}")
    pairs = check_dilated_config(seq_len, segment_lengths, dilation_rates, heads=heads, num_heads=num_heads)
    patterns = tuple(pair_heads(num_heads, dilation_rates, heads))
    c = seq_len // ring_size
    segments = []
    for p, ((seg_len, r), (_, offs)) in enumerate(zip(pairs, patterns)):
        for s, start in enumerate(range(0, seq_len, seg_len)):
            ranks = tuple(range(start // c, (start + seg_len - 1) // c + 1))
            if len(ranks) == 1:
                rows, receivers = (0,), (0,)
            else:
                pieces = [(max(start, k * c) - start, min(start + seg_len, (k + 1) * c) - start) for k in ranks]
                rows = tuple(sum(_count(a, b, o, r) for o in offs) for a, b in pieces)
                receivers = tuple(len(ranks) - 1 - i if causal else len(ranks) - 1 for i in range(len(ranks)))
            segments.append(SegmentPlan(p, s, start, start + seg_len, ranks, rows, receivers))
    return DilatedRingPlan(seq_len, ring_size, c, causal, tuple(pairs), patterns, tuple(segments))


def _offset_groups(hs, offs):
    """{offset: heads with that offset}: heads sharing an offset keep the same rows of a piece."""
    groups: dict[int, list[int]] = {}
    for h, o in zip(hs, offs):
        groups.setdefault(o, []).append(h)
    return groups


def _dilated_rows(x, seg: SegmentPlan, rank: int, plan: DilatedRingPlan, o: int, r: int, heads):
    """From ``rank``'s own shard ``x``: its piece of ``s``, rows ≡ o (mod r) in the segment, heads ``heads``."""
    a, b = seg.piece(rank, plan.shard_len)
    first = (o - (a - seg.start)) % r
    lo = a - rank * plan.shard_len
    return x[:, lo + first:b - rank * plan.shard_len:r][:, :, heads], first


def ring_dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment_lengths: Sequence[int],
                           dilation_rates: Sequence[int], ring_size: int, causal: bool = False, heads: str = "all",
                           scale: float | None = None, comm: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Equation (D) computed by ``ring_size`` ranks in one process. Returns ``(out, lse)``.

    Args as :func:`ringbook.dilated_attention`, plus ``ring_size`` (must
    divide ``n``) and ``comm``: if a dict, it receives ``sent_elements`` (per
    rank, K and V elements sent) and ``messages`` (send buffers delivered).
    The result equals :func:`ringbook.dilated_attention` for every ring size:
    no head group is skipped and no segment is cut to a shard.

    Segments are attended batched by :func:`~ringbook.dilated.attend_segments`.
    Twice differentiable (plain torch autograd; ``create_graph=True`` gives
    exact second derivatives). The fused form of the same plan is
    :func:`ringbook.production_ring_attention` with ``segment_lengths``.
    """
    check_qkv(q, k, v)
    causal = check_bool(causal, "causal")
    if comm is not None and not isinstance(comm, dict):
        raise TypeError(f"comm must be a dict (filled with sent_elements and messages) or None, got "
                        f"{type(comm).__name__}")
    b, n, h, d = q.shape
    if k.shape[1] != n:
        raise ValueError(f"dilated attention is self-attention: q has length {n} but k and v have {k.shape[1]}")
    plan = dilated_ring_plan(n, ring_size, segment_lengths, dilation_rates, num_heads=h, heads=heads, causal=causal)
    scale = resolve_scale(scale, d)
    # Each rank's own tensors: the only data a rank reads besides what it receives.
    shards = [tuple(t) for t in zip(*(rearrange(x, "b (w c) h d -> w b c h d", w=ring_size).unbind(0)
                                      for x in (q, k, v)))]

    # Phase 1, communication: every spanned rank sends its dilated K/V piece.
    inbox: dict = {}  # (rank, pair, segment, offset) -> (k, v) as received, in sequence order
    sent, messages = [0] * ring_size, 0
    for seg in plan.segments:
        if seg.kind == "local":
            continue
        r = plan.pairs[seg.pair][1]
        for o, hs_o in _offset_groups(*plan.patterns[seg.pair]).items():
            bufs = [tuple(_dilated_rows(shards[rk][i], seg, rk, plan, o, r, hs_o)[0] for i in (1, 2))
                    for rk in seg.ranks]
            for pos, rk in enumerate(seg.ranks):
                senders = range(pos + 1) if causal else range(len(seg.ranks))  # causal: earlier pieces only
                got = [bufs[i] for i in senders]
                inbox[(rk, seg.pair, seg.index, o)] = tuple(torch.cat([g[i] for g in got], dim=1) for i in (0, 1))
                for i in senders:
                    if i != pos:
                        sent[seg.ranks[i]] += bufs[i][0].numel() + bufs[i][1].numel()
                        messages += 1
    if comm is not None:
        comm.update(sent_elements=sent, messages=messages)

    # Phase 2, math: each rank computes its queries, pair by pair, and merges the pairs by lse.
    outs, lses = [], []
    for rank, (q_r, k_r, v_r) in enumerate(shards):
        out = lse = None
        for p in range(len(plan.pairs)):
            o_p, l_p = _rank_pair(rank, p, q_r, k_r, v_r, inbox, plan, scale, causal)
            out, lse = (o_p, l_p) if out is None else merge_partials(out, lse, o_p, l_p)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(lses, dim=2).to(compute_dtype(q.dtype))


def _rank_pair(rank, p, q_r, k_r, v_r, inbox, plan, scale, causal):
    """One rank's ``(out b c h d, lse b h c)`` for pair ``p``: its local run, then its exchanged pieces
    (segments attended batched, :func:`~ringbook.dilated.attend_segments`)."""
    (seg_len, r), (hs, offs) = plan.pairs[p], plan.patterns[p]
    b, c, h, _ = q_r.shape
    base = rank * c
    hs_t, offs_t = (torch.tensor(x, dtype=torch.long, device=q_r.device) for x in (hs, offs))
    regions, run = [], []

    def flush():  # all local segments of this rank, batched
        if run:
            a, z = run[0].start - base, run[-1].stop - base
            o, l = attend_segments(*(gather_dilated(x[:, a:z], seg_len, r, hs_t, offs_t) for x in (q_r, k_r, v_r)),
                                   scale=scale, causal=causal)
            regions.append(scatter_dilated(o, l, batch=b, num_heads=h, seg=seg_len, r=r, hs=hs_t, offs=offs_t))
            run.clear()

    for seg in plan.segments_on(rank, p):
        if seg.kind == "local":
            run.append(seg)
            continue
        flush()
        a, z = seg.piece(rank, c)
        length = z - a
        out = q_r.new_zeros((length, h, b, q_r.shape[-1]), dtype=torch.promote_types(q_r.dtype, torch.float32))
        lse = torch.full((length, h, b), float("-inf"), dtype=out.dtype, device=q_r.device)
        for o, hs_o in _offset_groups(hs, offs).items():
            q_o, first = _dilated_rows(q_r, seg, rank, plan, o, r, hs_o)
            if q_o.shape[1] == 0:
                continue
            k_o, v_o = inbox[(rank, p, seg.index, o)]
            m0 = (a - seg.start + first) // r  # dilated index of this rank's first query in the segment
            og, lg = attend_segments(q_o, k_o, v_o, scale=scale, causal=causal, q_start=m0)
            rows = rearrange(torch.arange(first, length, r, device=q_r.device), "i -> i 1")
            heads = rearrange(torch.tensor(hs_o, device=q_r.device), "h -> 1 h")
            out = out.index_put((rows, heads), rearrange(og, "b i h d -> i h b d").to(out.dtype))
            lse = lse.index_put((rows, heads), rearrange(lg, "b h i -> i h b").to(out.dtype))
        regions.append((rearrange(out, "i h b d -> b i h d"), rearrange(lse, "i h b -> b h i")))
    flush()
    return torch.cat([x[0] for x in regions], dim=1), torch.cat([x[1] for x in regions], dim=2)
