"""All-gather and Ulysses with every rank in one process, on the ring engine: what each costs without a network.

``production_ring_attention(..., strategy=...)`` runs these; the multi-process
forms are :mod:`ringbook.distributed.allgather` and
:mod:`ringbook.distributed.ulysses`. On one device nothing travels, so a
strategy's time beside one fused SDPA call over the whole sequence is its
engine overhead alone — the comparison the strategies issue asks for.

* **all-gather**: the ranks' queries are stacked in the batch (``(w b) c h d``,
  as the one-process ring stacks them). Each rank's blocks are those of
  :func:`ringbook.fast.plans.allgather_plan`: its own diagonal on its own
  shard (one call for all ranks, on the stacked shards), then the *whole*
  K/V in token order (``b n h_kv d``: what the all-gather gives each rank,
  reordered), full blocks merged where they abut.
* **Ulysses**: a rank attends every token of its heads; with every rank in
  one process that is one call over all heads (the head shards side by
  side), so the plan is one block over the whole sequence.

Documents, windows and dilated patterns are the ring's (``strategy="ring"``).
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange

from .._utils import compute_dtype
from .blocks import ALL, CAUSAL, FULL, Box
from .engine import Block, Job, Mover, Plan, Settings, StackedMover, run
from .plans import allgather_plan
from .tuning import Tuning

STRATEGIES = ("ring", "allgather", "ulysses")


@functools.lru_cache(maxsize=64)
def stacked_allgather_plan(n: int, world: int, batch: int, layout: str, causal: bool, merge_group: int) -> Plan:
    """Every rank's :func:`~ringbook.fast.plans.allgather_plan`, ranks stacked in the batch (rank r at batch rows
    ``r·b … (r+1)·b`` of q).

    Step 0: each rank's own block on the stacked shards (``(w b) c h d``), one
    call for every rank where their own blocks are the same (as the ring's
    step 0); step 1: each rank's queries on the whole K/V, which one process
    holds in token order (what the all-gather and :func:`~ringbook.fast.plans.gather_order`
    give each rank).
    """
    own_steps, rest = [], []
    for r in range(world):
        own, *others = allgather_plan(n, world, r, layout, causal).steps
        rows = (r * batch, (r + 1) * batch)
        own_steps.append(own)
        rest += [Block(Box(b.at.q, b.at.kv, rows, ALL), b.kernel) for step in others for b in step]
    first = own_steps[0]
    if all(len(o) == len(first) and all(x.at == y.at and x.kernel is y.kernel for x, y in zip(o, first))
           for o in own_steps):  # the same on every rank: one call over the stacked shards
        every = (0, world * batch)
        own = [Block(Box(b.at.q, b.at.kv, every, every), b.kernel) for b in first]
    else:
        own = [Block(Box(b.at.q, b.at.kv, (r * batch, (r + 1) * batch), (r * batch, (r + 1) * batch)), b.kernel)
               for r, o in enumerate(own_steps) for b in o]
    return Plan((tuple(own), tuple(rest)) if rest else (tuple(own),), merge_group=merge_group)


class _GatheredMover(Mover):
    """Every rank's all-gather in one process: step 0 reads each rank's own shard (stacked in the batch, a copy),
    step 1 the whole K/V in token order (the caller's tensors: no copy, nothing moved)."""

    step_reads_gradients = False

    def __init__(self, k: torch.Tensor, v: torch.Tensor, shards: _Shards, *, backward: bool):
        self.shards, self.k, self.v = shards, k, v
        self.own_k, self.own_v = shards.enter(k), shards.enter(v)
        if backward:
            work = compute_dtype(k.dtype)
            self.dk, self.dv = (torch.zeros(x.shape, dtype=work, device=x.device) for x in (k, v))
            self.own_dk, self.own_dv = (torch.zeros(x.shape, dtype=work, device=x.device)
                                        for x in (self.own_k, self.own_v))

    def forward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.own_k, self.own_v) if t == 0 else (self.k, self.v)

    def backward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if t == 0:
            return self.own_k, self.own_v, self.own_dk, self.own_dv
        return self.k, self.v, self.dk, self.dv

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.dk + self.shards.leave(self.own_dk), self.dv + self.shards.leave(self.own_dv))


def run_strategy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str, ring_size: int, causal: bool,
                 layout: str, order: torch.Tensor | None, settings: Settings, tuning: Tuning, key: tuple
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of ``strategy`` (``"allgather"`` or ``"ulysses"``) with ``ring_size`` ranks in one process.

    ``order``: the layout's token order of the stacked shards (None: contiguous).
    """
    b, n = q.shape[:2]
    if strategy == "ulysses":  # every rank's heads side by side: one block over the whole sequence
        plan = Plan(((Block(Box((0, n), (0, n)), CAUSAL if causal else FULL),),))
        job = Job(settings=settings, start=lambda k_, v_, backward: (StackedMover(k_, v_, backward=backward), plan),
                  key=key)
        return run(q, k, v, job)
    w = ring_size
    plan = stacked_allgather_plan(n, w, b, layout, causal, tuning.merge_group)
    shards = _Shards(w, order)
    job = Job(settings=settings,
              start=lambda k_, v_, backward: (_GatheredMover(k_, v_, shards, backward=backward), plan),
              enter=shards.enter, leave=shards.leave, enter_kv=lambda x: x,
              leave_kv=lambda x, dtype=None: x.to(dtype or x.dtype), enter_copies=order is not None, key=key)
    return run(q, k, v, job)


class _Shards:
    """q as the ranks' stacked shards ``(w b) c h d``; K/V whole, ``b n h_kv d``, shards in rank order."""

    def __init__(self, world: int, order: torch.Tensor | None):
        self.world, self.order = world, order

    def _to_ranks(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x if self.order is None else x.index_select(dim, self.order)

    def _from_ranks(self, x: torch.Tensor, dim: int, dtype) -> torch.Tensor:
        dtype = dtype or x.dtype
        if self.order is None:
            return x.to(dtype)
        return torch.empty(x.shape, dtype=dtype, device=x.device).index_copy_(dim, self.order, x.to(dtype))

    def enter(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        x = self._to_ranks(x, dim)
        if dim == 1:
            return rearrange(x, "b (w c) h d -> (w b) c h d", w=self.world)
        return rearrange(x, "b h (w c) -> (w b) h c", w=self.world)

    def leave(self, x: torch.Tensor, dim: int = 1, dtype=None) -> torch.Tensor:
        pattern = "(w b) c h d -> b (w c) h d" if dim == 1 else "(w b) h c -> b h (w c)"
        return self._from_ranks(rearrange(x, pattern, w=self.world), dim, dtype)

    def enter_kv(self, x: torch.Tensor) -> torch.Tensor:
        return self._to_ranks(x, 1)

    def leave_kv(self, x: torch.Tensor, dtype=None) -> torch.Tensor:
        return self._from_ranks(x, 1, dtype)


def check_strategy(strategy: str, *, heads: int, ring_size: int) -> str:
    """``strategy`` if it is one of :data:`STRATEGIES` and fits (Ulysses deals whole heads to ranks), else a
    ValueError naming it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "ulysses" and heads % ring_size:
        sizes = [x for x in range(1, heads + 1) if heads % x == 0]
        raise ValueError(f"strategy='ulysses' deals whole heads to ranks: {heads} heads do not divide into "
                         f"ring_size={ring_size}; ring sizes that work: {sizes}")
    return strategy
