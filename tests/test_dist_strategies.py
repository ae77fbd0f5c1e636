"""All-gather, Ulysses and the 2-D hybrid (USP) over real processes (gloo) against the float64 reference.

Starting processes costs seconds on a 2-core runner, so each world size is
started once (a module fixture) and every check of that world runs inside it;
the tests assert on what the ranks sent back:

* worlds 2 and 4 (USP 2×2, 4×1 and 1×4 at 4): every strategy, causal and not,
  every layout it takes, grouped-query attention (kv heads replicated where
  the ranks do not divide them), forward and backward exact in float64; and
  each with packed documents and a sliding window;
  one bfloat16 case per strategy under flash-attention's 2× rule;
* what the collectives carry: the all-gather's K/V, (w − 1) times a shard per
  rank, equals the plan's traffic; Ulysses' all-to-alls carry q, k, v and out;
* refusals on every rank: a head count the ranks do not divide (naming the
  sizes that work), a ``ulysses_size`` that does not divide the ranks, a
  ``ulysses_size`` or layout that differs between ranks;
* faults, last: a rank that fails just before the K/V all-gather (world 2)
  makes the other raise within its timeout, naming the all-gather.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_within_2x_rule, refusal

import ringbook
from ringbook import distributed as rd
from ringbook.fast.plans import allgather_plan
from ringbook.masks import mask_spec
from ringbook.schedule import usp_positions

B, H, D = 2, 4, 3
FAULT_TIMEOUT_S = 2.0


def _inputs(n, hk, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, H, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, n, hk, D, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, n, H, D, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, dout)]


WINDOW = 3  # shorter than a shard (4 tokens): a causal all-gather on contiguous shards brings only their last 2 rows


def _docs(n):
    """Three packed documents: a short one, a long one, one of a single token at the end."""
    return (torch.arange(n) >= 3).long() + (torch.arange(n) >= n - 1).long()


def _run(strategy, rank, world, *, causal, layout, hk, u=1, dtype=torch.float64, masked=False):
    """This rank's (out, lse, dq, dk, dv) and its token positions."""
    n = 4 * world
    q, k, v, dout = _inputs(n, hk, dtype)
    xs = [rd.shard(x, rank, world, layout, ulysses_size=u).requires_grad_() for x in (q, k, v)]
    kw = dict(causal=causal, layout=layout, timeout=30)
    if masked:
        kw.update(document_ids=_docs(n), window=WINDOW)
    if strategy == "usp":
        kw["ulysses_size"] = u
    out, lse = getattr(rd, f"{strategy}_attention")(*xs, backend="einops", **kw)
    (out.double() * rd.shard(dout, rank, world, layout, ulysses_size=u).double()).sum().backward()
    return [out.detach(), lse.detach()] + [x.grad for x in xs], usp_positions(n, world, u, layout)[rank]


def _cases(world):
    cases = [("allgather", layout, causal, hk, 1) for layout in ("contiguous", "zigzag", "striped")
             for causal in (False, True) for hk in (H, 1)]
    cases += [("ulysses", layout, causal, hk, 1) for layout in ("contiguous", "zigzag")
              for causal in (False, True) for hk in (H, 2, 1)]
    splits = [world] if world == 2 else [2, 1, 4]
    cases += [("usp", layout, causal, hk, u) for u in splits for layout in ("contiguous", "zigzag")
              for causal in (False, True) for hk in (H, 1)]
    # packed documents and a window of WINDOW tokens: ("masked", strategy, layout, causal, u)
    cases += [("masked", strategy, layout, causal, u) for strategy, u in (("allgather", 1), ("ulysses", 1),
                                                                             ("usp", 2)) for layout in ("contiguous",
                                                                                                        "zigzag")
              for causal in (False, True)]
    return cases


def _rank(rank, world):
    results = {"exact": {}, "lowp": {}}
    for case in _cases(world):
        if case[0] == "masked":
            _, strategy, layout, causal, u = case
            results["exact"][case] = _run(strategy, rank, world, causal=causal, layout=layout, hk=2, u=u, masked=True)
            continue
        strategy, layout, causal, hk, u = case
        results["exact"][case] = _run(strategy, rank, world, causal=causal, layout=layout, hk=hk, u=u)
    for strategy in ("allgather", "ulysses", "usp"):
        results["lowp"][strategy] = _run(strategy, rank, world, causal=True, layout="contiguous", hk=2,
                                         u=2, dtype=torch.bfloat16)
    # what the all-gather carries
    sent = []
    original = ringbook.distributed.comm._ALL_GATHER

    def recording(out, x, **kwargs):
        sent.append(x.numel())
        return original(out, x, **kwargs)

    ringbook.distributed.comm._ALL_GATHER = recording
    _run("allgather", rank, world, causal=False, layout="contiguous", hk=2)
    results["allgather_elements"] = sent
    sent = []
    _run("allgather", rank, world, causal=True, layout="contiguous", hk=2, masked=True)
    results["allgather_window_elements"] = sent
    ringbook.distributed.comm._ALL_GATHER = original
    # refusals, on every rank alike
    q, k, v, _ = (rd.shard(x, rank, world) for x in _inputs(4 * world, H))
    results["heads"] = refusal(lambda: rd.ulysses_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], timeout=10))
    results["split"] = refusal(lambda: rd.usp_attention(q, k, v, ulysses_size=3, timeout=10))
    results["split_differs"] = refusal(lambda: rd.usp_attention(q, k, v, ulysses_size=1 + (rank % 2),
                                                                timeout=10))
    results["layout_differs"] = refusal(lambda: rd.allgather_attention(
        q, k, v, layout="zigzag" if rank else "contiguous", timeout=10))
    if world == 2:  # rank 1 fails just before the K/V all-gather; rank 0 must raise within its timeout (last)
        if rank == 1:
            def broken(*args, **kwargs):
                raise RuntimeError("injected: rank 1 never joins the all-gather")
            ringbook.distributed.allgather.all_gather = broken
        results["fault"] = refusal(lambda: rd.allgather_attention(q, k, v, timeout=FAULT_TIMEOUT_S))
    return results


@pytest.fixture(scope="module", params=[2, 4])
def strategies_world(request):
    world = request.param
    return world, rd.spawn(_rank, world, timeout=240)


def _reference(case, world):
    masks = {}
    if case[0] == "masked":
        case = (case[1], case[2], case[3], 2, case[4])
        masks = dict(document_ids=_docs(4 * world), window=WINDOW)
    strategy, layout, causal, hk, u = case
    q, k, v, dout = _inputs(4 * world, hk)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = ringbook.naive_attention(xs[0], xs[1].repeat_interleave(H // hk, 2), xs[2].repeat_interleave(H // hk, 2),
                                        causal=causal, **masks)
    (out * dout).sum().backward()
    return [out.detach(), lse.detach()] + [x.grad for x in xs]


@pytest.mark.slow
def test_every_strategy_is_exact_forward_and_backward(strategies_world):
    world, results = strategies_world
    for case in _cases(world):
        ref = _reference(case, world)
        for rank, res in enumerate(results):
            got, pos = res["exact"][case]
            for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
                want = r[:, :, pos] if name == "lse" else r[:, pos]
                if name == "lse":  # rows that see no key: -inf on both sides
                    assert torch.equal(torch.isneginf(g), torch.isneginf(want)), f"{case} rank {rank}: empty rows"
                    g, want = g.nan_to_num(neginf=0.0), want.nan_to_num(neginf=0.0)
                assert torch.allclose(g, want, atol=1e-10, rtol=1e-10), \
                    f"{case} rank {rank} of {world}: {name} off by {(g - want).abs().max():.3g}"


@pytest.mark.slow
def test_bfloat16_within_the_2x_rule(strategies_world):
    world, results = strategies_world
    q, k, v, _ = _inputs(4 * world, 2)
    kx, vx = (x.repeat_interleave(H // 2, 2) for x in (k, v))
    ref = ringbook.naive_attention(q, kx, vx, causal=True)[0]
    naive_bf16 = ringbook.naive_attention(q.bfloat16(), kx.bfloat16(), vx.bfloat16(), causal=True)[0]
    for strategy in ("allgather", "ulysses", "usp"):
        for rank, res in enumerate(results):
            (out, *_), pos = res["lowp"][strategy]
            assert out.dtype == torch.bfloat16
            assert_within_2x_rule(out, ref[:, pos], naive_bf16[:, pos], what=f"{strategy} rank {rank}")


@pytest.mark.slow
def test_the_all_gather_carries_the_plans_traffic(strategies_world):
    world, results = strategies_world
    c = 4
    plan = allgather_plan(4 * world, world, 0, "contiguous", False, kv_heads=2)
    for res in results:
        fwd, bwd = res["allgather_elements"]  # this rank's K and V shard, gathered in the forward and the backward
        elements = 2 * B * c * 2 * D
        assert fwd == bwd == elements
        # a ring all-gather sends each rank's shard on w − 1 times: the plan's traffic in bytes
        assert (world - 1) * elements * 8 == plan.bytes_sent(B, D, torch.float64)
        # a causal window of 3 on contiguous shards: only each shard's last 2 rows are gathered, as the plan says
        fwd, bwd = res["allgather_window_elements"]
        assert fwd == bwd == 2 * B * (WINDOW - 1) * 2 * D
        masked = allgather_plan(4 * world, world, 0, "contiguous", True, kv_heads=2,
                                mask=mask_spec(True, _docs(4 * world)[None].expand(B, -1), WINDOW))
        assert (world - 1) * fwd * 8 == masked.bytes_sent(B, D, torch.float64)


@pytest.mark.slow
def test_refusals_on_every_rank(strategies_world):
    world, results = strategies_world
    for rank, res in enumerate(results):
        assert res["heads"]["type"] == "ValueError" and "3 heads do not divide into" in res["heads"]["msg"] \
            and "[1, 3]" in res["heads"]["msg"], res["heads"]
        assert res["split"]["type"] == "ValueError" and "ulysses_size=3 must divide" in res["split"]["msg"], \
            res["split"]
        assert res["split_differs"]["type"] == "ValueError" and "same ulysses_size" in res["split_differs"]["msg"]
        assert res["layout_differs"]["type"] == "ValueError" and "same layout" in res["layout_differs"]["msg"]


@pytest.mark.slow
def test_a_rank_missing_from_the_all_gather_is_named_within_the_timeout(strategies_world):
    world, results = strategies_world
    if world != 2:
        pytest.skip("the fault runs in world 2 only")
    fault = results[0]["fault"]
    assert fault["type"] in ("TimeoutError", "RuntimeError"), fault
    assert "all-gather of the K/V shards" in fault["msg"] and fault["elapsed"] < FAULT_TIMEOUT_S + 5, fault
    assert "injected" in results[1]["fault"]["msg"]
