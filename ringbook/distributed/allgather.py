"""All-gather context parallelism over a ``torch.distributed`` process group (Llama 3's method; notebook 06).

Each rank holds one shard of q, k and v (``b c h d``, dealt by a layout of
:mod:`ringbook.schedule`). Instead of passing K/V round a ring, every rank
gathers the K/V of the whole sequence in one collective
(``all_gather``: each rank receives ``(w − 1)·c`` tokens of K and of V per kv
head — little under grouped-query attention, where kv heads are few) and
attends its own queries to all of it. The gather is started first and the
rank's own diagonal block is computed while it is in flight (step 0 of
:func:`ringbook.fast.plans.allgather_plan`); step 1 attends to every other
shard at once, full blocks merged into as few kernel calls as their rows
allow. With ``causal`` the zigzag layout balances the work, as for the ring.

Backward (the engine's one autograd Function): the gather again, each block's
gradients from the global out and lse, then one ``reduce_scatter`` that sums
every rank's dK/dV of each shard on the shard's owner.

Guarantees, as :func:`ringbook.distributed.ring_attention`: every wait has a
deadline (``timeout=``) after which a ``TimeoutError``/``RuntimeError`` names
what was in flight; inputs that do not fit together across ranks are refused
with a ``ValueError`` on every rank (the one agreement check). Memory: the
whole sequence's K/V on every rank (``n·h_kv·d`` elements each), plus its
float32 gradients in the backward — the price of one collective instead of
``w − 1`` hops.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .._utils import compute_dtype
from ..fast.engine import Mover, Settings
from ..fast.plans import allgather_plan, gather_order
from ..fast.tuning import Tuning, check_tuning
from ..schedule import gathered_rows
from .comm import _Ring, _wait, all_gather, reduce_scatter
from .entry import open_group, run_on_group
from .ring import _check_agreement, local_mask


class AllGatherMover(Mover):
    """Step 0: this rank's own K/V (the gather in flight); step 1: every rank's K/V, gathered; dK/dV reduce-scattered.

    Gathered K/V arrive stacked in rank order along the sequence (shard s at
    rows ``s·c … (s+1)·c``); ``order`` (:func:`~ringbook.fast.plans.gather_order`)
    puts them in token order with one index copy, as
    :func:`~ringbook.fast.plans.allgather_plan` addresses them, and the
    gradients back in rank order before the reduce-scatter (None: rank order).
    ``rows``: how many of each shard's last rows are gathered
    (:func:`ringbook.schedule.gathered_rows`; None: all; 0: nothing is sent).
    """

    def __init__(self, ring: _Ring, k: torch.Tensor, v: torch.Tensor, backward: bool, steps: int,
                 order: torch.Tensor | None = None, rows: int | None = None):
        if steps not in (1, 2) or (steps == 1) != (ring.world == 1):
            raise ValueError(f"AllGatherMover: a plan of {steps} steps does not fit a group of {ring.world} ranks")
        self.ring, self.k, self.v, self.backward = ring, k.contiguous(), v.contiguous(), backward
        self.order = None if order is None else order.to(k.device)
        self.rows = k.shape[1] if rows is None else rows
        self.works, self.what = [], ""
        if backward:
            work = compute_dtype(k.dtype)
            self.dk = torch.zeros(k.shape, dtype=work, device=k.device)
            self.dv = torch.zeros(v.shape, dtype=work, device=v.device)

    def _start_gather(self, phase: str) -> None:
        w = self.ring.world
        self.what = f"{phase}: all-gather of the K/V shards (every rank's, into every rank)"
        mine = torch.stack([self.k, self.v])[:, :, self.k.shape[1] - self.rows:]  # the rows anyone reads
        self.gathered = self.k.new_empty((w * 2, *mine.shape[1:]))  # rank r's K and V at rows 2r, 2r + 1
        self.works = all_gather(self.gathered, mine.contiguous(), self.ring, self.what) if self.rows else []

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        _wait(self.works, self.ring, self.what)
        kv = rearrange(self.gathered, "(w two) b c h d -> two b (w c) h d", two=2)
        del self.gathered
        if self.order is not None:
            kv = kv.index_select(2, self.order)
        return kv[0], kv[1]

    def forward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if t == 0:
            if self.ring.world > 1:
                self._start_gather(f"forward step {t}")
            return self.k, self.v
        return self._gathered()

    def backward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if t == 0:
            if self.ring.world > 1:
                self._start_gather(f"backward step {t}")
            return self.k, self.v, self.dk, self.dv
        k, v = self._gathered()
        work = compute_dtype(self.k.dtype)
        self.dkv_all = torch.zeros((2, *k.shape), dtype=work, device=k.device)
        return k, v, self.dkv_all[0], self.dkv_all[1]

    def backward_done(self, t: int) -> None:
        if t == 1:  # every shard's dK/dV summed on its owner
            w = self.ring.world
            self.what = "backward: reduce-scatter of dK/dV (each shard's gradients to its owner)"
            self.mine = self.dkv_all.new_empty((2, self.dk.shape[0], self.rows, *self.dk.shape[2:]))
            if self.order is not None:  # token order back to rank order
                self.dkv_all = torch.empty_like(self.dkv_all).index_copy_(2, self.order, self.dkv_all)
            chunks = rearrange(self.dkv_all, "two b (w c) h d -> (w two) b c h d", w=w)
            self.works = reduce_scatter(self.mine, chunks, self.ring, self.what) if self.rows else []
            del self.dkv_all

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ring.world > 1:
            _wait(self.works, self.ring, self.what)
            c = self.dk.shape[1]
            self.dk[:, c - self.rows:] += self.mine[0]
            self.dv[:, c - self.rows:] += self.mine[1]
        return self.dk, self.dv


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        layout: str | None = None, group: torch.distributed.ProcessGroup | None = None,
                        scale: float | None = None, timeout: float | None = None, backend: str = "auto",
                        tuning: Tuning | None = None, document_ids: torch.Tensor | None = None,
                        window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with the K/V of every rank gathered on every rank. Returns this rank's ``(out, lse)``.

    Args:
        q, k, v: this rank's ``b c h d`` shards (k/v may have fewer heads,
            dividing q's: grouped-query attention), cut by
            :func:`ringbook.distributed.shard` with the same ``layout``.
        causal: key j is seen by query i only if j ≤ i (original positions).
        layout: ``"contiguous"``, ``"zigzag"`` (default when causal: balanced
            work) or ``"striped"``.
        group, scale, timeout, tuning: as :func:`ringbook.distributed.ring_attention`.
        backend: the block kernel: ``"auto"`` (default; PyTorch's fused
            kernels on CUDA, einops elsewhere), a fused backend or ``"einops"``.
        document_ids, window: packed documents (ids of the *whole* sequence,
            the same on every rank) and a sliding window, as
            :func:`ringbook.distributed.ring_attention` takes them (blocks
            no query sees are not computed).

    Returns:
        out ``b c h d`` and lse ``b h c`` (float32 for half precision) for
        this rank's queries; :func:`ringbook.distributed.unshard` of every
        rank's parts equals :func:`ringbook.naive_attention` of the whole
        sequence. Once differentiable (every rank must call backward: it
        gathers and reduce-scatters); ``create_graph=True`` raises.

    Raises:
        ValueError on every rank if the shards or options do not fit together;
        TimeoutError or RuntimeError naming what was in flight if a peer does
        not answer within ``timeout``.
    """
    layout = layout if layout is not None else ("zigzag" if causal else "contiguous")
    tuning = check_tuning(tuning)
    ring = open_group(group, timeout, "allgather_attention")
    mask, problem = local_mask(q, ring.world, causal, document_ids, window)
    scale = _check_agreement(q, k, v, causal, layout, scale, ring, backend,
                             extra=(("document_ids and window", mask),), problem=problem)
    n = q.shape[1] * ring.world
    plan = allgather_plan(n, ring.world, ring.rank, layout, bool(causal), kv_heads=k.shape[2],
                          device=str(q.device), merge_group=tuning.rank_merge_group,
                          grad_group=tuning.rank_grad_group, mask=mask)
    rows = gathered_rows(n, ring.world, layout=layout, causal=bool(causal), window=mask and mask.window)
    order = gather_order(n, ring.world, layout) if rows == q.shape[1] else None
    return run_on_group(q, k, v, plan=plan,
                        mover=lambda k_, v_, backward: AllGatherMover(ring, k_, v_, backward, len(plan.steps), order,
                                                                      rows),
                        settings=Settings(scale, backend, who="ringbook.distributed.allgather_attention",
                                          tuning=tuning))
