"""Ulysses context parallelism over a ``torch.distributed`` process group (DeepSpeed-Ulysses; notebook 06).

Each rank holds one shard of the sequence (``b c h d``). One all-to-all
re-deals q, k and v from sequence shards to *head* shards: afterwards rank r
holds every token of heads ``r·h/w … (r+1)·h/w − 1``, attends them as one
ordinary attention (no ring, no merge), and a second all-to-all deals the
output back to sequence shards. Per rank, each all-to-all moves
``(w − 1)/w`` of its shard: ``(w − 1)/w · c·d·(2h + 2g')`` elements for q, k,
v and the output (g' the kv heads after replication, below), whatever the
sequence length — against ``(w − 1)·2·c·g·d`` for the ring.

* The head count must divide by the ranks (each rank gets whole heads):
  ``h % w == 0``, else a ValueError says which group sizes work.
* Grouped-query attention with fewer kv heads than ranks (or a count the ranks
  do not divide): kv heads are *replicated* before the all-to-all, to the
  smallest count ``g'`` that the ranks divide and that keeps every q head with
  its own kv head (as DeepSpeed's ALST does). It costs ``g'/g`` times the K/V
  traffic and K/V memory of ``g``; dK/dV of the copies are summed back.
* With ``causal`` the re-dealt sequence is put back in token order (a layout
  other than contiguous costs one gather), so the attention is one top-left
  causal call: Ulysses needs no load balancing.

Backward (the engine's one autograd Function): the all-to-all of the output's
gradient (and of lse's, when one flows), the attention's backward on the
head shard, and all-to-alls of dq, dk and dv back. The entered q, k, v, out
and lse are kept from the forward, so no forward all-to-all is repeated.
Every all-to-all has the deadline ``timeout``; every rank must call backward.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, reduce

from ..fast.blocks import Masked
from ..fast.engine import CAUSAL, FULL, Plan, Settings, StackedMover, box
from ..fast.tuning import Tuning, check_tuning
from ..schedule import layout_positions
from .comm import _Ring, _wait, all_to_all
from .entry import open_group, run_on_group
from .ring import _check_agreement, local_mask


def replicated_kv_heads(heads: int, kv_heads: int, world: int) -> int:
    """The kv heads after replication: ``kv_heads`` if ``world`` divides it, else the smallest multiple that
    ``world`` divides and ``heads`` is a multiple of (each q head keeps its own kv head)."""
    if kv_heads % world == 0:
        return kv_heads
    m = math.lcm(kv_heads, world)
    return m if heads % m == 0 else heads


def check_heads(heads: int, world: int, what: str = "ulysses_attention") -> None:
    """Refuse a head count the ranks do not divide, naming the group sizes that would work."""
    if heads % world:
        sizes = [x for x in range(1, heads + 1) if heads % x == 0]
        raise ValueError(f"{what} deals whole heads to ranks: {heads} heads do not divide into {world} ranks; "
                         f"use a group of {sizes} ranks (a divisor of the head count), or the ring")


class _HeadShards:
    """How tensors enter the engine's layout (every token, this rank's heads) and leave it, by all-to-alls."""

    def __init__(self, ring: _Ring, n: int, layout: str, kv_from: int, kv_to: int, device):
        self.ring, self.w, self.kv_from, self.kv_to = ring, ring.world, kv_from, kv_to
        order = None if layout == "contiguous" else layout_positions(n, self.w, layout).reshape(-1)
        self.to_tokens = None if order is None else torch.argsort(order).to(device)  # stacked -> token order
        self.to_stacked = None if order is None else order.to(device)
        self.calls = 0

    def _a2a(self, x: torch.Tensor, what: str) -> torch.Tensor:
        out = torch.empty_like(x)
        self.calls += 1
        _wait(all_to_all(out, x, self.ring, what), self.ring, what)
        return out

    def enter(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``b c h d`` → ``b n (h/w) d`` in token order (lse: ``b h c`` → ``b (h/w) n``)."""
        what = "all-to-all: sequence shards to head shards"
        if dim == 1:
            got = self._a2a(rearrange(x, "b c (w hh) d -> w b c hh d", w=self.w).contiguous(), what)
            x = rearrange(got, "w b c hh d -> b (w c) hh d")
        else:
            got = self._a2a(rearrange(x, "b (w hh) c -> w b hh c", w=self.w).contiguous(), what)
            x = rearrange(got, "w b hh c -> b hh (w c)")
        return x if self.to_tokens is None else x.index_select(dim, self.to_tokens)

    def leave(self, x: torch.Tensor, dim: int = 1, dtype=None) -> torch.Tensor:
        """Inverse of :meth:`enter`, converting to ``dtype``."""
        what = "all-to-all: head shards back to sequence shards"
        x = x.to(dtype or x.dtype)
        if self.to_stacked is not None:
            x = x.index_select(dim, self.to_stacked)
        if dim == 1:
            got = self._a2a(rearrange(x, "b (w c) hh d -> w b c hh d", w=self.w).contiguous(), what)
            return rearrange(got, "w b c hh d -> b c (w hh) d")
        got = self._a2a(rearrange(x, "b hh (w c) -> w b hh c", w=self.w).contiguous(), what)
        return rearrange(got, "w b hh c -> b (w hh) c")

    def enter_kv(self, x: torch.Tensor) -> torch.Tensor:
        """k or v, its kv heads replicated to ``kv_to`` first (module docstring)."""
        if self.kv_to != self.kv_from:
            x = x.repeat_interleave(self.kv_to // self.kv_from, dim=2)
        return self.enter(x)

    def leave_kv(self, x: torch.Tensor, dtype=None) -> torch.Tensor:
        """dK or dV back, the gradients of a replicated kv head's copies summed."""
        x = self.leave(x, dtype=torch.promote_types(x.dtype, torch.float32))
        if self.kv_to != self.kv_from:
            x = reduce(x, "b c (g f) d -> b c g d", "sum", g=self.kv_from)
        return x.to(dtype or x.dtype)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      layout: str = "contiguous", group: torch.distributed.ProcessGroup | None = None,
                      scale: float | None = None, timeout: float | None = None, backend: str = "auto",
                      tuning: Tuning | None = None, document_ids: torch.Tensor | None = None,
                      window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the shards of ``group``, computed on head shards after an all-to-all.

    Args:
        q, k, v: this rank's ``b c h d`` shards, cut by
            :func:`ringbook.distributed.shard` with ``layout``; q's heads must
            divide by the group's size (k/v may have fewer heads: replicated
            as the module docstring says).
        causal: key j is seen by query i only if j ≤ i (original positions).
        layout: how the shards were cut (``"contiguous"``, ``"zigzag"``,
            ``"striped"``); any works, contiguous moves nothing extra.
        group, scale, timeout, backend, tuning: as
            :func:`ringbook.distributed.ring_attention` (``backend="auto"``:
            the fused kernels on CUDA).
        document_ids, window: packed documents (ids of the *whole* sequence,
            the same on every rank) and a sliding window, as
            :func:`ringbook.distributed.ring_attention` takes them: the head
            shard's attention over the whole sequence runs with their mask.

    Returns:
        out ``b c h d`` and lse ``b h c`` for this rank's queries, equal to
        :func:`ringbook.naive_attention` of the whole sequence at them. Once
        differentiable (every rank must call backward); ``create_graph=True``
        raises.

    Raises:
        ValueError on every rank if the shards or options do not fit together
        or the head count does not divide by the ranks (naming the sizes that
        would); TimeoutError or RuntimeError if a peer does not answer.
    """
    tuning = check_tuning(tuning)
    ring = open_group(group, timeout, "ulysses_attention")
    mask, problem = local_mask(q, ring.world, causal, document_ids, window)
    scale = _check_agreement(q, k, v, causal, layout, scale, ring, backend,
                             extra=(("document_ids and window", mask),), problem=problem)
    h, g, w = q.shape[2], k.shape[2], ring.world
    check_heads(h, w)
    n = q.shape[1] * w
    shards = _HeadShards(ring, n, layout, g, replicated_kv_heads(h, g, w), q.device)
    if mask is None:
        kernel = CAUSAL if causal else FULL
    else:  # the whole sequence in token order: its positions, documents and window
        pos, ids = torch.arange(n, device=q.device), mask.ids()
        kernel = Masked(pos, pos, bool(causal), None if ids is None else ids.to(q.device),
                        None if ids is None else ids.to(q.device), mask.window)
    plan = Plan(((box((0, n), (0, n), kernel=kernel),),))
    return run_on_group(q, k, v, plan=plan,
                        mover=lambda k_, v_, backward: StackedMover(k_, v_, backward=backward),
                        settings=Settings(scale, backend, who="ringbook.distributed.ulysses_attention",
                                          tuning=tuning),
                        enter=shards.enter, leave=shards.leave, enter_kv=shards.enter_kv, leave_kv=shards.leave_kv,
                        enter_copies=True)
