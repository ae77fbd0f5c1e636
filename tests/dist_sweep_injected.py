"""``ringbook.bench.dist_sweep`` with an injected fault, run by tests/test_distributed.py under torchrun.

Rank 1's attention is right except in one entry, chosen by its shard length
(global length / 2): 64 → its output NaN at local row 1, 128 → its lse +inf
at local row 1, 256 → its dq NaN at local row 1. With ``--check-max-seq 64``
none of these lengths is gathered; each row must still be an error.
"""

import sys

import torch
import torch.distributed as dist

from ringbook.bench import dist_sweep

real = dist_sweep._attend


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[0, 1, 0, 0] = float("nan")
        return g


def attend(q, k, v, **kw):
    fault = dist.get_rank() == 1 and q.shape[1]
    if fault == 256:
        q = _NanGradient.apply(q)
    out, lse = real(q, k, v, **kw)
    row = torch.arange(q.shape[1]) == 1
    if fault == 64:
        out = torch.where(row.view(1, -1, 1, 1), float("nan"), out)
    if fault == 128:
        lse = torch.where(row.view(1, 1, -1), float("inf"), lse)
    return out, lse


dist_sweep._attend = attend
sys.exit(dist_sweep.main())
