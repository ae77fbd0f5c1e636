"""The fused multi-process dilated ring (``ring_dilated_attention(backend="auto")``) on the ring engine.

Real processes, gloo on CPU, where the engine's gathered blocks run the
einops kernels: worlds 2, 3 and 4, one spawn each. Every rank checks, in
float64 against the one-process dilated_attention (K/V expanded for
grouped-query attention): out, lse (the same uncovered rows), and dq, dk, dv
of a loss on out and lse — heads "all" and "grouped", causal and not,
segments local, straddling and spanning every shard, pairs keeping the same
rows (which come home once in the backward), k/v with fewer heads. The
traffic is only the plan's dilated rows. Refusals on every rank: a rate that
does not divide the shard, a backend that differs between ranks, an unknown
backend.
"""

from __future__ import annotations

import pytest
import torch
from helpers import refusal

from ringbook import distributed as rd
from ringbook.dilated import dilated_attention
from ringbook.distributed import dilated as dd
from ringbook.ring_dilated import dilated_ring_plan

B, N, H, D = 2, 24, 4, 4
CONFIGS = [  # (segment_lengths, dilation_rates, heads); shards of 12, 8 or 6 tokens
    ([6], [2], "all"),
    ([4, 12], [1, 2], "all"),  # world 4: pairs keep the same rows of a spanning piece
    ([6, 12, 24], [1, 2, 3], "grouped"),  # local, 2 shards, every shard
    ([8, 24], [2, 2], "grouped"),
    ([24], [6], "all"),  # world 4: every rank holds one dilated row per head
]


def _fits(config, world):
    return all((N // world) % r == 0 for r in config[1])


def _inputs(hk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N, h, D, generator=g, dtype=torch.float64) for h in (H, hk, hk))
    return q, k, v, torch.randn(B, N, H, D, generator=g, dtype=torch.float64)


def _loss(out, lse, dout):
    fin = torch.isfinite(lse)
    return (out * dout).sum() + 0.1 * torch.where(fin, lse, 0.0).sum()


def _reference(config, causal, hk):
    q, k, v, dout = _inputs(hk)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    g = H // hk
    out, lse = dilated_attention(xs[0], xs[1].repeat_interleave(g, 2), xs[2].repeat_interleave(g, 2),
                                 segment_lengths=config[0], dilation_rates=config[1], heads=config[2], causal=causal)
    _loss(out, lse, dout).backward()
    return out.detach(), lse.detach(), [x.grad for x in xs]


RATE = {2: 8, 3: 3, 4: 4}  # per world: divides the segment (24), not the shard length


def _rank(rank, world):
    results = {}
    sent = []
    original = torch.distributed.batch_isend_irecv

    def recording(ops):
        sent.extend(op.tensor.numel() for op in ops if op.op is torch.distributed.isend)
        return original(ops)

    torch.distributed.batch_isend_irecv = recording
    for i, config in enumerate(CONFIGS):
        if not _fits(config, world):
            continue
        for causal in (False, True):
            for hk in (H, 2):
                q, k, v, dout = _inputs(hk)
                qs, ks, vs = (rd.shard(x, rank, world, "contiguous").requires_grad_() for x in (q, k, v))
                sent.clear()
                out, lse = dd.ring_dilated_attention(qs, ks, vs, segment_lengths=config[0], dilation_rates=config[1],
                                                     heads=config[2], causal=causal, backend="auto", timeout=30)
                fwd = sum(sent)
                _loss(out, lse, rd.shard(dout, rank, world)).backward()
                results[(i, causal, hk)] = {"out": out.detach(), "lse": lse.detach(), "grads": [qs.grad, ks.grad, vs.grad],
                                            "sent_forward": fwd}
    torch.distributed.batch_isend_irecv = original
    q, k, v, _ = _inputs(H)
    qs, ks, vs = (rd.shard(x, rank, world) for x in (q, k, v))
    rate = RATE[world]  # divides the segment (24), not the shard: strided blocks
    for causal in (False, True):
        q, k, v, dout = _inputs(2)
        xs = [rd.shard(x, rank, world).requires_grad_() for x in (q, k, v)]
        out, lse = dd.ring_dilated_attention(*xs, segment_lengths=[24], dilation_rates=[rate], causal=causal,
                                             timeout=30)
        _loss(out, lse, rd.shard(dout, rank, world)).backward()
        results[("rate", causal)] = {"out": out.detach(), "lse": lse.detach(), "grads": [x.grad for x in xs]}
    q, k, v, _ = _inputs(H)
    qs, ks, vs = (rd.shard(x, rank, world) for x in (q, k, v))
    results["disagree"] = refusal(lambda: dd.ring_dilated_attention(qs, ks, vs, segment_lengths=[6], dilation_rates=[2],
                                                                    backend="auto" if rank else "einops", timeout=30))
    results["unknown"] = refusal(lambda: dd.ring_dilated_attention(qs, ks, vs, segment_lengths=[6], dilation_rates=[2],
                                                                   backend="fast", timeout=30))
    return results


@pytest.fixture(scope="module", params=[2, 3, 4])
def fused_world(request):
    world = request.param
    return world, rd.spawn(_rank, world, timeout=180)


@pytest.mark.slow
def test_fused_matches_one_process_dilated_attention_float64(fused_world):
    world, results = fused_world
    c = N // world
    checked = 0
    for i, config in enumerate(CONFIGS):
        if not _fits(config, world):
            continue
        for causal in (False, True):
            for hk in (H, 2):
                out, lse, grads = _reference(config, causal, hk)
                plan = dilated_ring_plan(N, world, config[0], config[1], num_heads=H, heads=config[2], causal=causal)
                for rank, res in enumerate(results):
                    got = res[(i, causal, hk)]
                    rows = slice(rank * c, (rank + 1) * c)
                    case = f"config {config}, causal={causal}, kv heads {hk}, rank {rank} of {world}"
                    assert torch.equal(torch.isneginf(got["lse"]), torch.isneginf(lse[:, :, rows])), case
                    fin = torch.isfinite(lse[:, :, rows])
                    assert torch.allclose(got["lse"][fin], lse[:, :, rows][fin], atol=1e-10, rtol=1e-10), case
                    assert torch.allclose(got["out"], out[:, rows], atol=1e-10, rtol=1e-10), case
                    for name, g, r in zip(("dq", "dk", "dv"), got["grads"], grads):
                        assert torch.allclose(g, r[:, rows], atol=1e-10, rtol=1e-10), \
                            f"{case}: {name} max error {(g - r[:, rows]).abs().max():.3g}"
                    if hk == H:  # only the plan's dilated rows travel
                        assert got["sent_forward"] == plan.sent_elements(B, D)[rank], case
                    checked += 1
    assert checked >= 8 * world


@pytest.mark.slow
def test_a_rate_that_does_not_divide_the_shard_is_exact(fused_world):
    """Pieces of a spanning segment that start between kept rows run as strided blocks, one per offset."""
    world, results = fused_world
    c = N // world
    for causal in (False, True):
        out, lse, grads = _reference(([24], [RATE[world]], "all"), causal, 2)
        for rank, res in enumerate(results):
            got, rows = res[("rate", causal)], slice(rank * c, (rank + 1) * c)
            assert torch.equal(torch.isneginf(got["lse"]), torch.isneginf(lse[:, :, rows]))
            fin = torch.isfinite(lse[:, :, rows])
            assert torch.allclose(got["lse"][fin], lse[:, :, rows][fin], atol=1e-10, rtol=1e-10)
            assert torch.allclose(got["out"], out[:, rows], atol=1e-10, rtol=1e-10)
            for g, r in zip(got["grads"], grads):
                assert torch.allclose(g, r[:, rows], atol=1e-10, rtol=1e-10), (rank, causal, (g - r[:, rows]).abs().max())


@pytest.mark.slow
def test_fused_refusals_on_every_rank(fused_world):
    world, results = fused_world
    for rank, res in enumerate(results):
        assert res["disagree"]["type"] == "ValueError" and "same backend" in res["disagree"]["msg"], res["disagree"]
        assert res["unknown"]["type"] == "ValueError" and "backend must be one of" in res["unknown"]["msg"], \
            res["unknown"]
