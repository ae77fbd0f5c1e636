"""Dilated attention on the ring engine: one batched, gathered block call per (pair, head group) (notebook 03).

Equation (D) of :mod:`ringbook.dilated` runs here as a :class:`~ringbook.fast.engine.Plan`
whose blocks are *gathered*: a block names ``count`` consecutive segments of
one pair ``(s, r)``, and a head group with each head's offset ``o`` (a
:class:`Gather`). Viewing a ``b n h d`` tensor as ``b (count m r) h d`` (m = s/r)
makes the kept rows of every segment one index, ``[:, :, :, o_j, h_j]``, so

1. one gather takes the dilated rows of q, k and v of every segment of the
   block — ``(b·count, m, G, d)``, heads side by side;
2. one fused SDPA call (:func:`~ringbook.fast.kernels.forward_block`) returns
   their out and lse;
3. one scatter writes them into the float32 accumulators (heads no earlier
   block wrote: ``heads="grouped"``), or merges them there by equation (M)
   (``heads="all"``: every head takes every pair).

The backward is the fused backward op on the same gathers, fed the global
out and lse of the rows, with dq, dK and dV scattered back and added. The
number of kernel launches depends on the pairs only, never on the number of
segments or the ring size, and no Python loop runs per segment or per rank.

**One process, any ring size.** With contiguous shards of ``c = n/w``
tokens a segment lies inside one shard (local) or spans several (exchanged:
:func:`ringbook.ring_dilated_plan`). On one device the spanned ranks' dilated
queries are consecutive rows of their segment, and the K/V rows they would
exchange are the segment's own, so one block over every segment of a pair
*is* every rank's local and exchanged work, batched: the ring size changes
where the rows live, not what is computed (:func:`stacked_dilated_plan`
takes ``ring_size`` only to check it). The multi-process form
(:mod:`ringbook.distributed.dilated`) uses the same blocks on each rank's
shard, with the exchanged dilated rows delivered by its mover.

Grouped-query attention: k/v may have ``h_kv`` heads (q head i reads kv head
``i // (h / h_kv)``). The K/V rows a block needs are one per (offset, kv
head) *slot*; when every slot serves the same number of q heads, the
block gathers each slot once and calls the kernel with that q-per-kv ratio
(no expansion). When slots serve unequal numbers of q heads (e.g. 3 heads
over rate 2 share kv head 0 as 2 + 1), one kernel call cannot take them
with a single ratio, so that block gathers K/V once per q head instead —
an expansion of the gathered rows only, never of the whole K/V.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch
from einops import rearrange

from .._utils import check_bool, check_positive_int, check_qkv, compute_dtype, resolve_scale
from ..dilated import check_dilated_config, pair_heads
from .engine import Block, Job, Plan, Settings, StackedMover, check_graph, run
from .kernels import block_attention, check_backend
from .merge import merge_into_torch_, merge_many_into_

Rows = tuple[int, int]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds index tensors
class Gather:
    """Which rows a gathered block reads and writes (see the module docstring).

    ``count`` segments of pair ``(seg, r)`` start at row ``q_at`` of the
    query-side tensors (q, out, lse, dout, dq) and at row ``kv_at`` of the
    K/V-side tensors (k, v, dk, dv). Inside each segment the block takes
    dilated rows ``q_rows`` of the queries and ``kv_rows`` of the keys
    (``(0, seg // r)``: all of them; a part only with ``count == 1``, as a
    rank's piece of a spanning segment). Head ``j`` of the block is q head
    ``q_heads[j]`` at offset ``offsets[j]``; K/V slot ``u`` is kv head
    ``kv_heads[u]`` at offset ``kv_offsets[u]``, serving q heads
    ``j·G/U … (j+1)·G/U − 1``. ``first``: no earlier block wrote these
    accumulator rows (a plain write, no merge).
    """

    seg: int
    r: int
    q_heads: torch.Tensor
    offsets: torch.Tensor
    kv_heads: torch.Tensor
    kv_offsets: torch.Tensor
    q_at: int
    kv_at: int
    count: int
    q_rows: Rows
    kv_rows: Rows
    first: bool = True
    kv_unique: bool = True  # every K/V slot a different (offset, kv head)

    def _view(self, x: torch.Tensor, at: int, rows: Rows) -> torch.Tensor:
        """``x`` (``b n h …``) at this block's segments as ``b count m r h …`` (only the dilated rows ``rows``)."""
        m = self.seg // self.r
        if rows == (0, m):
            part = x[:, at:at + self.count * self.seg]
            return part.unflatten(1, (self.count, m, self.r))
        if self.count != 1:
            raise ValueError(f"a gathered block over part of its segments' rows must hold one segment, got "
                             f"count={self.count}")
        part = x[:, at + rows[0] * self.r:at + rows[1] * self.r]
        return part.unflatten(1, (1, rows[1] - rows[0], self.r))

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return self._view(x, self.q_at, self.q_rows)[:, :, :, self.offsets, self.q_heads]

    def take_q(self, x: torch.Tensor) -> torch.Tensor:
        """Dilated query rows of ``x`` (q, out or dout, ``b n h d``) as ``(b·count) m_q G d``."""
        return self._q(x).flatten(0, 1)

    def take_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Dilated key rows of ``x`` (k or v, ``b n h_kv d``) as ``(b·count) m_k U d``."""
        return self._view(x, self.kv_at, self.kv_rows)[:, :, :, self.kv_offsets, self.kv_heads].flatten(0, 1)

    def take_lse(self, x: torch.Tensor) -> torch.Tensor:
        """Dilated query rows of a ``b h n`` row statistic (lse, delta) as ``(b·count) G m_q``."""
        got = self._q(x.transpose(1, 2))
        return rearrange(got, "b s m g -> (b s) g m").contiguous()

    def put(self, acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Write (``first``) or merge (equation (M)) a block result into the accumulators' rows."""
        b = acc_out.shape[0]
        view_o = self._view(acc_out, self.q_at, self.q_rows)
        view_l = self._view(acc_lse.transpose(1, 2), self.q_at, self.q_rows)
        out = rearrange(out, "(b s) m g d -> b s m g d", b=b)
        lse = rearrange(lse, "(b s) g m -> b s m g", b=b)
        index = (slice(None),) * 3 + (self.offsets, self.q_heads)
        if not self.first:
            cur_o, cur_l = view_o[index], view_l[index]
            merge_into_torch_(cur_o.flatten(0, 1), rearrange(cur_l, "b s m g -> (b s) g m"), out.flatten(0, 1),
                              rearrange(lse, "b s m g -> (b s) g m"))
            out, lse = cur_o, cur_l  # merged in place (the views of cur_* above)
        view_o[index] = out.to(acc_out.dtype)
        view_l[index] = lse.to(acc_lse.dtype)

    def add_q(self, acc: torch.Tensor, grad: torch.Tensor) -> None:
        """``acc`` (dq, ``b n h d``) += a block's query gradient at its rows."""
        view = self._view(acc, self.q_at, self.q_rows)
        view[:, :, :, self.offsets, self.q_heads] += rearrange(grad, "(b s) m g d -> b s m g d", b=acc.shape[0])

    def add_kv(self, acc: torch.Tensor, grad: torch.Tensor) -> None:
        """``acc`` (dk or dv, ``b n h_kv d``) += a block's key/value gradient at its rows.

        Where K/V were gathered per q head (unequal slots) a row appears in
        several slots, and the adds accumulate.
        """
        view = self._view(acc, self.kv_at, self.kv_rows)
        grad = rearrange(grad, "(b s) m u d -> b s m u d", b=acc.shape[0])
        if self.kv_unique:
            view[:, :, :, self.kv_offsets, self.kv_heads] += grad
        else:
            view.permute(3, 4, 0, 1, 2, 5).index_put_((self.kv_offsets, self.kv_heads),
                                                      rearrange(grad, "b s m u d -> u b s m d").to(acc.dtype),
                                                      accumulate=True)


def head_slots(heads: Sequence[int], offsets: Sequence[int], kv_group: int) -> tuple[tuple, tuple, tuple, tuple]:
    """Order a block's heads by K/V slot: ``(q_heads, offsets, kv_heads, kv_offsets)`` (module docstring).

    ``kv_group = h / h_kv``. Q heads sharing an (offset, kv head) slot come
    together, slot after slot; when the slots serve unequal numbers of q
    heads every q head gets its own slot (K/V gathered per q head).
    """
    slots: dict[tuple[int, int], list[int]] = {}
    for h, o in zip(heads, offsets):
        slots.setdefault((o, h // kv_group), []).append(h)
    if len({len(hs) for hs in slots.values()}) == 1:
        q_heads = tuple(h for hs in slots.values() for h in hs)
        offs = tuple(o for (o, _), hs in slots.items() for _ in hs)
        return q_heads, offs, tuple(kv for _, kv in slots), tuple(o for o, _ in slots)
    heads, offsets = tuple(heads), tuple(offsets)
    return heads, offsets, tuple(h // kv_group for h in heads), offsets


def gather_spec(seg: int, r: int, slots: tuple, *, q_at: int, kv_at: int, count: int, q_rows: Rows, kv_rows: Rows,
                first: bool, device: torch.device | str) -> Gather:
    """A :class:`Gather` with its head indices on ``device``."""
    q_heads, offs, kv_heads, kv_offs = (torch.tensor(x, dtype=torch.long, device=device) for x in slots)
    unique = len(set(zip(slots[2], slots[3]))) == len(slots[2])
    return Gather(seg, r, q_heads, offs, kv_heads, kv_offs, q_at, kv_at, count, q_rows, kv_rows, first, unique)


def gathered_block(spec: Gather, *, causal: bool) -> Block:
    """The engine block of a gather (its row fields name the rows it covers, for reading)."""
    q0 = spec.q_at + spec.q_rows[0] * spec.r if spec.count == 1 else spec.q_at
    k0 = spec.kv_at + spec.kv_rows[0] * spec.r if spec.count == 1 else spec.kv_at
    span = lambda a, rows: a + (spec.count * spec.seg if rows == (0, spec.seg // spec.r)  # noqa: E731
                                else (rows[1] - rows[0]) * spec.r)
    return Block((0, 0), (q0, span(q0, spec.q_rows)), (0, 0), (k0, span(k0, spec.kv_rows)), causal, gather=spec)


@functools.lru_cache(maxsize=128)
def stacked_dilated_plan(n: int, num_heads: int, kv_heads: int, pairs: tuple, patterns: tuple, *, causal: bool,
                         device: str) -> Plan:
    """The one-process plan: one step, one gathered block per pair over every segment (module docstring).

    ``pairs`` ``((s, r), …)`` and ``patterns`` (:func:`ringbook.dilated.pair_heads`,
    as tuples). A pair's block writes its heads' rows if no earlier pair used
    those heads (grouped heads), else merges into them.
    """
    blocks, seen = [], set()
    for (seg, r), (hs, offs) in zip(pairs, patterns):
        slots = head_slots(hs, offs, num_heads // kv_heads)
        spec = gather_spec(seg, r, slots, q_at=0, kv_at=0, count=n // seg, q_rows=(0, seg // r),
                           kv_rows=(0, seg // r), first=not (seen & set(hs)), device=device)
        seen |= set(hs)
        blocks.append(gathered_block(spec, causal=causal))
    return Plan((tuple(blocks),))


def check_dilated_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment_lengths: Sequence[int] | None,
                       dilation_rates: Sequence[int] | None, heads: str, ring_size: int = 1) -> tuple[tuple, tuple]:
    """The checks every dilated entry point makes; returns ``(pairs, patterns)`` as tuples."""
    check_qkv(q, k, v, allow_gqa=True)
    b, n, h, d = q.shape
    if k.shape[1] != n:
        raise ValueError(f"dilated attention is self-attention: q has length {n} but k and v have {k.shape[1]}")
    check_positive_int(ring_size, "ring_size")
    if n % ring_size:
        divisors = [x for x in range(1, min(n, 64) + 1) if n % x == 0]
        raise ValueError(f"ring_size={ring_size} does not divide sequence length {n}; choose a divisor of {n}: "
                         f"{divisors}")
    if segment_lengths is None or dilation_rates is None:
        raise ValueError("dilated attention needs both segment_lengths and dilation_rates (one rate per length)")
    pairs = check_dilated_config(n, segment_lengths, dilation_rates, heads=heads, num_heads=h)
    patterns = tuple((tuple(hs), tuple(offs)) for hs, offs in pair_heads(h, dilation_rates, heads))
    return tuple(pairs), patterns


def production_dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment_lengths: Sequence[int],
                                 dilation_rates: Sequence[int], ring_size: int = 1, causal: bool = False,
                                 heads: str = "all", scale: float | None = None, backend: str = "auto",
                                 graph: bool | str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated ring attention (equation (D)) on the ring engine, every rank in one process. Returns ``(out, lse)``.

    What :func:`ringbook.production_ring_attention` runs when given
    ``segment_lengths`` and ``dilation_rates``; the same function as
    :func:`ringbook.dilated_attention` and :func:`ringbook.ring_dilated_attention`
    (contiguous shards) for every ``ring_size`` dividing ``n``. k/v may have
    fewer heads than q (grouped-query attention, module docstring). Output in
    the input dtype, lse float32 for half precision; rows no pattern keeps:
    0 / -inf. Once differentiable (the engine's fused backward;
    ``create_graph=True`` raises). ``graph``: as for
    :func:`ringbook.production_ring_attention` (CUDA-graph replay of
    forward-only calls whose shape repeats).
    """
    causal = check_bool(causal, "causal")
    check_backend(backend)
    graph = check_graph(graph)
    pairs, patterns = check_dilated_call(q, k, v, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
                                         heads=heads, ring_size=ring_size)
    b, n, h, d = q.shape
    plan = stacked_dilated_plan(n, h, k.shape[2], pairs, patterns, causal=causal, device=str(q.device))
    settings = Settings(resolve_scale(scale, d), backend, who="production_ring_attention (dilated)",
                        twice="ringbook.dilated_attention or ringbook.ring_dilated_attention", graph=graph)
    job = Job(settings=settings, start=lambda k_st, v_st, backward: (StackedMover(k_st, v_st, backward=backward), plan),
              key=("production_dilated", plan, settings))
    return run(q, k, v, job)


def dilated_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], causal: bool = False, heads: str = "all", scale: float | None = None,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's batched-call peer: equation (D) by the plainest fast code. Returns ``(out, lse)``.

    For each pair: view q, k, v as ``b (segments m r) h d``, take the kept
    rows of every segment with one index (``[:, :, :, offsets, heads]``),
    make one lse-returning SDPA call (:func:`~ringbook.fast.kernels.block_attention`),
    scatter out and lse back. With ``heads="grouped"`` the pairs' heads are
    disjoint, so the scatters fill one output; with ``"all"`` each pair
    fills its own and the pairs are merged by lse in one pass. No engine, no
    accumulator, no plan. k/v must have q's heads. Differentiable through
    the fused block's backward and autograd's indexing.
    """
    causal = check_bool(causal, "causal")
    check_backend(backend)
    check_qkv(q, k, v)
    pairs, patterns = check_dilated_call(q, k, v, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
                                         heads=heads)
    b, n, h, d = q.shape
    scale = resolve_scale(scale, d)
    work = compute_dtype(q.dtype)
    # heads="grouped": the pairs' heads are disjoint, one output; "all": one per pair, merged at the end
    parts = [(q.new_zeros(q.shape), torch.full((b, n, h), float("-inf"), dtype=work, device=q.device))
             for _ in range(len(pairs) if heads == "all" else 1)]
    for p, ((seg, r), (hs, offs)) in enumerate(zip(pairs, patterns)):
        hs_t, offs_t = (torch.tensor(x, dtype=torch.long, device=q.device) for x in (hs, offs))
        view = lambda x: x.unflatten(1, (n // seg, seg // r, r))[:, :, :, offs_t, hs_t].flatten(0, 1)  # noqa: E731
        o, l = block_attention(view(q), view(k), view(v), scale=scale, causal=causal, backend=backend)
        out, lse = parts[p if heads == "all" else 0]
        out.unflatten(1, (n // seg, seg // r, r))[:, :, :, offs_t, hs_t] = o.unflatten(0, (b, n // seg)).to(q.dtype)
        lse.unflatten(1, (n // seg, seg // r, r))[:, :, :, offs_t, hs_t] = rearrange(
            l, "(b s) g m -> b s m g", b=b).to(work)
    if len(parts) == 1:
        out, lse = parts[0]
        return out, lse.transpose(1, 2)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        from ..online_softmax import merge_partials

        out, lse = parts[0][0].to(work), parts[0][1].transpose(1, 2)
        for o, l in parts[1:]:
            out, lse = merge_partials(out, lse, o.to(work), l.transpose(1, 2))
        return out.to(q.dtype), lse
    acc_out, acc_lse = torch.empty(q.shape, dtype=work, device=q.device), torch.empty(b, h, n, dtype=work,
                                                                                        device=q.device)
    merge_many_into_(acc_out, acc_lse, [(o, l.transpose(1, 2)) for o, l in parts], initialise=True)
    return acc_out.to(q.dtype), acc_lse
