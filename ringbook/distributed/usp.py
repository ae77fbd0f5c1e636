"""The 2-D hybrid over a ``torch.distributed`` process group: Ulysses inside groups, the ring across them.

USP (yunchang), TransformerEngine's ``a2a+p2p`` and LoongTrain's double ring
split ``w`` ranks into ``w/u`` groups of ``u`` consecutive ranks (``u =
ulysses_size``; notebook 06):

1. inside each group an all-to-all re-deals the group's tokens from sequence
   shards to head shards (:mod:`ringbook.distributed.ulysses`): rank
   ``g·u + i`` then holds every token of its group for heads
   ``i·h/u … (i+1)·h/u − 1``;
2. across the groups, the ranks with the same ``i`` form a ring of ``w/u``
   ranks (:mod:`ringbook.distributed.ring`, any layout of its), which passes
   those heads' K/V round, double-buffered, as the ring does;
3. an all-to-all deals the output back to sequence shards.

So the all-to-alls stay inside a group (on NVLink in a node, say) and only the
ring crosses groups, with K/V blocks ``u`` times longer and ``u`` times fewer
heads than a ring of all ``w`` ranks would pass. ``u = 1`` is the ring,
``u = w`` is Ulysses. The shards are those of
:func:`ringbook.schedule.usp_positions` (:func:`ringbook.distributed.shard`
with ``ulysses_size=u``): each group's shards together are one ring shard of
``layout`` over ``w/u`` ranks.

The groups are made once per (process group, ``u``) with ``dist.new_group``,
which every rank of the world must call in the same order: the first call
with a new ``u`` does that, on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..fast.engine import Settings
from ..fast.plans import rank_plan
from ..fast.tuning import Tuning, check_tuning
from ..schedule import usp_positions
from .comm import _Ring
from .entry import open_group, run_on_group
from .ring import P2PMover, _check_agreement, local_mask
from .ulysses import _HeadShards, check_heads, replicated_kv_heads

_GROUPS: dict = {}  # (process group, world, ulysses_size) -> (the ulysses groups, the ring groups), as new_group made them


def _subgroups(ring: _Ring, u: int) -> tuple:
    """This rank's Ulysses group (its ``u`` consecutive ranks) and ring group (the ranks with its index in theirs)."""
    key = (ring.group, ring.world, u)
    if key not in _GROUPS:
        w = ring.world
        ulysses = [dist.new_group([ring.global_rank(g * u + i) for i in range(u)]) for g in range(w // u)]
        rings = [dist.new_group([ring.global_rank(g * u + i) for g in range(w // u)]) for i in range(u)]
        _GROUPS[key] = (ulysses, rings)
    ulysses, rings = _GROUPS[key]
    return ulysses[ring.rank // u], rings[ring.rank % u]


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ulysses_size: int, causal: bool = False,
                  layout: str | None = None, group: torch.distributed.ProcessGroup | None = None,
                  scale: float | None = None, timeout: float | None = None, backend: str = "auto",
                  tuning: Tuning | None = None, document_ids: torch.Tensor | None = None,
                  window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention by the 2-D hybrid: Ulysses in groups of ``ulysses_size`` ranks, the ring across groups.

    Args:
        q, k, v: this rank's ``b c h d`` shards, cut by
            ``ringbook.distributed.shard(x, rank, world_size, layout, ulysses_size=u)``.
        ulysses_size: ``u``, ranks per Ulysses group; it must divide the
            group's size ``w`` and q's heads.
        causal: key j is seen by query i only if j ≤ i (original positions).
        layout: the ring's layout across the ``w/u`` groups: ``"contiguous"``,
            ``"zigzag"`` (default when causal) or ``"striped"``.
        group, scale, timeout, backend, tuning: as
            :func:`ringbook.distributed.ring_attention` (``backend="auto"``).
        document_ids, window: packed documents (ids of the *whole* sequence,
            the same on every rank) and a sliding window, as
            :func:`ringbook.distributed.ring_attention` takes them (the ring
            across groups skips what they mask).

    Returns:
        out ``b c h d`` and lse ``b h c`` for this rank's queries, equal to
        :func:`ringbook.naive_attention` of the whole sequence at them. Once
        differentiable (every rank must call backward); ``create_graph=True``
        raises.

    Raises:
        ValueError on every rank for shards or options that do not fit
        together, a ``ulysses_size`` that does not divide the ranks or the
        heads (naming the sizes that would); TimeoutError or RuntimeError if
        a peer does not answer.
    """
    layout = layout if layout is not None else ("zigzag" if causal else "contiguous")
    tuning = check_tuning(tuning)
    ring = open_group(group, timeout, "usp_attention")
    mask, problem = local_mask(q, ring.world, causal, document_ids, window)
    scale = _check_agreement(q, k, v, causal, layout, scale, ring, backend, problem=problem,
                             extra=(("ulysses_size", ulysses_size), ("document_ids and window", mask)))
    u, w, h, g = ulysses_size, ring.world, q.shape[2], k.shape[2]
    n = q.shape[1] * w
    usp_positions(n, w, u, layout)  # refuses a split that does not fit, the same on every rank
    check_heads(h, u, "usp_attention (ulysses_size)")
    ulysses_group, ring_group = _subgroups(ring, u)
    inner = _Ring.of(ulysses_group, ring.timeout_s, op="usp_attention (the all-to-all in a group)")
    outer = _Ring.of(ring_group, ring.timeout_s, op="usp_attention (the ring across groups)")
    kv_to = replicated_kv_heads(h, g, u)
    shards = _HeadShards(inner, q.shape[1] * u, "contiguous", g, kv_to, q.device)
    plan = rank_plan(n, w // u, outer.rank, layout, bool(causal), kv_heads=kv_to // u, device=str(q.device),
                     merge_group=tuning.rank_merge_group, grad_group=tuning.rank_grad_group, mask=mask)
    return run_on_group(q, k, v, plan=plan,
                        mover=lambda k_, v_, backward: P2PMover(outer, k_, v_, backward, len(plan.steps)),
                        settings=Settings(scale, backend, who="ringbook.distributed.usp_attention", tuning=tuning),
                        enter=shards.enter, leave=shards.leave, enter_kv=shards.enter_kv, leave_kv=shards.leave_kv,
                        enter_copies=True)
