"""The engine's contract, read this first to add a strategy: a hand-written plan, a toy mover, every block kind.

The ring engine (:mod:`ringbook.fast.engine`) runs any :class:`Plan` of
:class:`Block` s with any :class:`Mover`. A new strategy writes

* a **mover**: ``forward_kv(t)`` returns the K/V the blocks of step ``t``
  read; ``backward_kv(t)`` the same plus the dK/dV buffers their gradients
  go to; ``gradients()`` dK/dV of the caller's own K/V at the end;
* a **plan**: per step, blocks ``Block(at, kernel)``: *where* the rows are
  (:class:`Box` row ranges, or a :class:`~ringbook.fast.blocks.Gather` of
  dilated rows) and *which kernel* runs (:data:`FULL`, :data:`CAUSAL` — the
  top-left mask — or :class:`Positions`);
* a **job** (:class:`Job`): its settings and ``start(k, v, backward) ->
  (mover, plan)``; :func:`run` does the rest (autograd, CUDA graphs).

Below, one process plays a causal attention over three chunks of keys, one
chunk per step, with every block kind, and the result and its gradients
match the float64 reference exactly (1e-10). The distributed test at the end
runs a plan with fewer steps than ranks over a real process group: dK/dV
still reach their owners.
"""

from __future__ import annotations

import torch
from helpers import assert_matches_reference, make_qkv, randn

import ringbook
from ringbook.fast.blocks import gather_spec, gathered_block, head_slots
from ringbook.fast.engine import CAUSAL, FULL, Job, Mover, Plan, Positions, Settings, box, run

C = 4  # tokens per chunk
N = 3 * C


class ChunkMover(Mover):
    """Step t reads key chunk t (a view); its gradients go to that chunk of full-size float64 buffers."""

    def __init__(self, k, v, backward):
        self.k, self.v = k, v
        if backward:
            self.dk, self.dv = torch.zeros_like(k), torch.zeros_like(v)

    def forward_kv(self, t):
        return self.k[:, t * C:(t + 1) * C], self.v[:, t * C:(t + 1) * C]

    def backward_kv(self, t):
        rows = slice(t * C, (t + 1) * C)
        return self.k[:, rows], self.v[:, rows], self.dk[:, rows], self.dv[:, rows]

    def gradients(self):
        return self.dk, self.dv


def chunk(i):
    return (i * C, (i + 1) * C)


# Causal attention: query chunk i sees key chunks before it in full and its own under the causal mask.
PLAN = Plan((
    (box(chunk(0), (0, C), kernel=CAUSAL), box((C, N), (0, C), kernel=FULL)),
    (box(chunk(1), (0, C), kernel=Positions(torch.arange(C, 2 * C), torch.arange(C, 2 * C))),
     box(chunk(2), (0, C), kernel=FULL)),
    (box(chunk(2), (0, C), kernel=CAUSAL),),
), merge_group=2, grad_group=2)


def _job(plan, scale=0.5):
    return Job(settings=Settings(scale, "einops", who="the contract test"),
               start=lambda k, v, backward: (ChunkMover(k, v, backward), plan))


def test_every_dense_block_kind_forward_and_backward_against_the_reference():
    q, k, v = (x.requires_grad_() for x in make_qkv(2, N, 2, 3, seed=5))
    out, lse = run(q, k, v, _job(PLAN))
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = ringbook.naive_attention(*ref, causal=True, scale=0.5)
    assert_matches_reference(out, lse, ref_out, ref_lse)
    g, gl = randn(out.shape, seed=6), randn(lse.shape, seed=7)
    got = torch.autograd.grad((out * g).sum() + (lse * gl).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * g).sum() + (ref_lse * gl).sum(), ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_plan_says_its_work_per_step():
    # step 0: a causal 4×4 block (10 scores) and 8×4 full (32); step 1: positions 4×4 (10) and 4×4 (16); step 2: 10
    assert PLAN.work(batch=2, heads=3) == tuple(2 * 3 * x for x in (10 + 32, 10 + 16, 10))
    assert sum(PLAN.work(1, 1)) == N * (N + 1) // 2  # causal attention over N tokens


def test_a_gathered_block_on_the_same_loop():
    """A hand-written dilated plan: one gathered block over the segments of one (segment, rate) pair."""
    cfg = dict(segment_lengths=[4], dilation_rates=[2], heads="all")
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 8, 2, 3, seed=8))
    slots = head_slots((0, 1), (0, 1), kv_group=1)  # head 0 keeps offset 0 of each segment, head 1 offset 1
    spec = gather_spec(4, 2, slots, q_at=0, kv_at=0, count=2, q_rows=(0, 2), kv_rows=(0, 2), first=True,
                       device="cpu")
    plan = Plan(((gathered_block(spec, causal=False),),))
    job = Job(settings=Settings(0.5, "einops"), start=lambda k_, v_, backward: (ChunkMover(k_, v_, backward), plan))
    global C
    saved, C = C, 8  # one step over all 8 keys
    try:
        out, lse = run(q, k, v, job)
        ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = ringbook.dilated_attention_dense(*ref, scale=0.5, **cfg)
        assert_matches_reference(out, lse, ref_out, ref_lse)
        g = randn(out.shape, seed=9)
        got = torch.autograd.grad((out * g).sum(), (q, k, v))
        want = torch.autograd.grad((ref_out * g).sum(), ref)
    finally:
        C = saved
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert plan.work(1, 2) == (2 * 2 * 2 * 2,)  # 2 segments × 2 heads × 2 kept queries × 2 kept keys


# --------------------------------------------------------------------------- fewer steps than ranks, over gloo

def _banded(rank, world):
    """Each rank attends its own shard (causal) and the previous rank's (full): a plan of 2 steps on a ring of w."""
    import torch.distributed as dist

    from ringbook.distributed.comm import _Ring
    from ringbook.distributed.ring import P2PMover

    q, k, v = (x.requires_grad_() for x in make_qkv(1, 3 * world, 2, 2, seed=11))
    ring = _Ring.of(None, 30.0, op="the contract test")
    mine = [x.detach()[:, rank * 3:(rank + 1) * 3].clone().requires_grad_() for x in (q, k, v)]
    steps = ((box((0, 3), (0, 3), kernel=CAUSAL),), (box((0, 3), (0, 3)),) if rank > 0 else ())
    plan = Plan(steps)
    job = Job(settings=Settings(0.5, "einops"),
              start=lambda k_, v_, backward: (P2PMover(ring, k_, v_, backward, len(plan.steps)), plan))
    out, lse = run(*mine, job)
    g = randn(out.shape, seed=12 + rank)
    grads = torch.autograd.grad((out * g).sum(), mine)
    # the reference: the whole sequence with the banded mask, on every rank
    pos = torch.arange(3 * world)
    shard = pos // 3
    mask = (pos[None, :] <= pos[:, None]) & (shard[None, :] >= shard[:, None] - 1)
    ref_out, ref_lse = ringbook.naive_attention(q, k, v, mask=mask, scale=0.5)
    g_all = torch.cat([randn(out.shape, seed=12 + r) for r in range(world)], dim=1)
    ref_grads = torch.autograd.grad((ref_out * g_all).sum(), (q, k, v))
    rows = slice(rank * 3, (rank + 1) * 3)
    assert_matches_reference(out, lse, ref_out[:, rows], ref_lse[:, :, rows])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b[:, rows], rtol=1e-10, atol=1e-10)
    dist.barrier()
    return True


def test_a_mover_brings_gradients_home_for_a_plan_shorter_than_the_ring():
    from ringbook.distributed import spawn

    assert spawn(_banded, 3, timeout=120) == [True, True, True]
