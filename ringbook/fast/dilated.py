"""Dilated attention on the ring engine: one batched, gathered block call per (pair, head group) (notebook 03).

Equation (D) of :mod:`ringbook.dilated` runs here as a :class:`~ringbook.fast.engine.Plan`
whose blocks are *gathered*: a block names ``count`` consecutive segments of
one pair ``(s, r)``, and a head group with each head's offset ``o`` (a
:class:`~ringbook.fast.blocks.Gather`, the block kind; the plans are
:func:`ringbook.fast.plans.stacked_dilated_plan` and ``rank_dilated_plan``).
Viewing a ``b n h d`` tensor as ``b (count m r) h d`` (m = s/r) makes the
kept rows of every segment one index, ``[:, :, :, o_j, h_j]``, so

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
where the rows live, not what is computed (:func:`production_dilated_attention`
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

from collections.abc import Sequence

import torch
from einops import rearrange

from .._utils import check_bool, check_positive_int, check_qkv, compute_dtype, resolve_scale
from ..dilated import check_dilated_config, pair_heads
from .blocks import Gather, gather_spec, gathered_block, head_slots
from .engine import Job, Settings, StackedMover, check_graph, run
from .kernels import block_attention, check_backend
from .merge import merge_many_into_
from .plans import stacked_dilated_plan
from .tuning import Tuning, check_tuning

__all__ = ["Gather", "check_dilated_call", "dilated_sdpa", "gather_spec", "gathered_block", "head_slots",
           "production_dilated_attention"]


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
                                 graph: bool | str = "auto", tuning: Tuning | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
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
    forward-only calls whose shape repeats); ``tuning``: :class:`ringbook.fast.tuning.Tuning`.
    """
    causal = check_bool(causal, "causal")
    check_backend(backend)
    graph = check_graph(graph)
    tuning = check_tuning(tuning)
    pairs, patterns = check_dilated_call(q, k, v, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
                                         heads=heads, ring_size=ring_size)
    b, n, h, d = q.shape
    plan = stacked_dilated_plan(n, h, k.shape[2], pairs, patterns, causal=causal, device=str(q.device))
    settings = Settings(resolve_scale(scale, d), backend, who="production_ring_attention (dilated)",
                        twice="ringbook.dilated_attention or ringbook.ring_dilated_attention", graph=graph,
                        tuning=tuning)
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
