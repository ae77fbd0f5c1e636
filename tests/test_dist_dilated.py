"""The multi-process ring dilated attention (ringbook.dist_dilated) against the one-process dilated_attention.

Real processes, gloo on CPU. Starting processes costs seconds on a 2-core
runner, so each world size is started once (a module fixture) and every check
of that world runs inside it; the tests assert on what the ranks sent back:

* world 2 and 4: segments inside a shard, straddling two shards, spanning 2
  and 4 shards; heads "all" and "grouped"; causal and not — forward and
  backward (gradient on lse too) in float64, and the traffic each rank posted
  (only dilated K/V, only to the ranks it shares a segment with, exactly
  ``dilated_ring_plan(...).sent_elements``; the backward returns the same
  amount; nothing at all when every segment is local);
* one bfloat16 case under the 2× rule (world 4);
* refusals on every rank: unequal shard lengths, a dilation rate that differs
  between ranks, k/v requiring grad on one rank only, an invalid
  configuration (the one-process message) — and the group still works after;
* faults: in world 2, rank 1 stalls before the backward exchange and rank 0
  must raise a TimeoutError naming rank 1 within its timeout; in world 4,
  rank 3 raises just before the forward exchange and the other three must
  fail with a clear error, quickly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_matches_reference, assert_within_2x_rule, load_rank_results, make_qkv, randn, refusal, rounding_atol,
)

import ringbook
from ringbook import dist_dilated as dd
from ringbook import distributed as rd
from ringbook.dilated import dilated_attention, dilated_attention_dense

B, H, D, N = 2, 4, 4, 24
CONFIGS = [  # (segment_lengths, dilation_rates, heads); shards are 12 (world 2) or 6 (world 4) tokens
    ([6], [2], "all"),  # every segment inside a shard: no communication
    ([4, 12], [1, 2], "all"),  # world 4: segments of 4 straddle shards of 6, 12 spans 2 shards
    ([8, 24], [2, 4], "grouped"),  # 24 spans every shard
    ([6, 12, 24], [1, 2, 3], "grouped"),  # local, 2 shards, all shards (4 in world 4)
]
CASES = [(i, causal) for i in range(len(CONFIGS)) for causal in (False, True)]
LOWP = dict(n=48, d=8, config=([6, 12, 48], [1, 2, 4], "all"), causal=True, dtype=torch.bfloat16)
STALL_TIMEOUT_S = 1.5
RAISE_TIMEOUT_S = 10.0


def _kw(config, causal):
    seg, rates, mode = config
    return dict(segment_lengths=seg, dilation_rates=rates, heads=mode, causal=causal)


def _global_inputs(n=N, d=D, dtype=torch.float64, seed=0):
    q, k, v = make_qkv(B, n, H, d, dtype=dtype, seed=seed)
    return q, k, v, randn(B, n, H, d, dtype=dtype, seed=seed + 3), randn(B, H, n, seed=seed + 4)


def _loss(out, lse, dout, dlse):
    """A random linear function of out and the finite lse entries (no gradient into -inf rows)."""
    fin = torch.isfinite(lse)
    return (out * dout.to(out.dtype)).sum() + (torch.where(fin, lse, 0.0) * torch.where(fin, dlse, 0.0)).sum()


class _Traffic:
    """Records every point-to-point op posted through ``dist.batch_isend_irecv`` in this process."""

    def __init__(self):
        self.ops, self._orig = [], torch.distributed.batch_isend_irecv

    def __enter__(self):
        def recording(ops):
            self.ops += [("send" if op.op is torch.distributed.isend else "recv", op.peer, op.tensor.numel(),
                          op.tag) for op in ops]
            return self._orig(ops)

        torch.distributed.batch_isend_irecv = recording
        return self

    def __exit__(self, *exc):
        torch.distributed.batch_isend_irecv = self._orig

    def take(self):
        ops, self.ops = self.ops, []
        return ops


def _case(rank, world, config, causal, *, n=N, d=D, dtype=torch.float64, timeout=30.0):
    """This rank's out, lse, gradients and posted traffic (forward, backward) for one case."""
    q, k, v, dout, dlse = _global_inputs(n, d, dtype)
    qs, ks, vs = (rd.shard(x, rank, world, "contiguous").requires_grad_() for x in (q, k, v))
    with _Traffic() as traffic:
        out, lse = dd.ring_dilated_attention(qs, ks, vs, **_kw(config, causal), timeout=timeout)
        fwd = traffic.take()
        _loss(out, lse, rd.shard(dout, rank, world), rd.shard(dlse, rank, world, dim=2)).backward()
        bwd = traffic.take()
    return {"out": out.detach(), "lse": lse.detach(), "dq": qs.grad, "dk": ks.grad, "dv": vs.grad,
            "fwd": fwd, "bwd": bwd}


def _faulty_deliver(rank, phase, action):
    """``dd._deliver`` that, in ``phase``, first raises or sleeps (``action``) — once."""
    original, state = dd._deliver, {"done": False}

    def deliver(send, recv_numel, like, ring, tag, this_phase):
        if this_phase == phase and not state["done"]:
            state["done"] = True
            if action == "raise":
                raise RuntimeError(f"injected failure on rank {rank} before the {phase} exchange")
            time.sleep(action)
        return original(send, recv_numel, like, ring, tag, this_phase)

    return deliver


def _world_checks(rank, world, save_dir):
    """Everything one spawned world checks, on every rank; saved before the fault, whose outcome is returned."""
    res = {"cases": {case: _case(rank, world, CONFIGS[case[0]], case[1]) for case in CASES}}
    if world == 4:
        res["lowp"] = _case(rank, world, LOWP["config"], LOWP["causal"], n=LOWP["n"], d=LOWP["d"],
                            dtype=LOWP["dtype"])
    kw = _kw(CONFIGS[3], False)
    c = 4 if rank == 0 else 6  # unequal shards
    q, k, v = make_qkv(B, c, H, D, seed=rank)
    res["unequal"] = refusal(lambda: dd.ring_dilated_attention(q, k, v, **kw, timeout=30))
    q, k, v = make_qkv(B, N // world, H, D, seed=rank)
    rates = [1, 2, 3] if rank else [1, 2, 6]  # rank 0 disagrees
    res["rates"] = refusal(lambda: dd.ring_dilated_attention(q, k, v, **{**kw, "dilation_rates": rates},
                                                              timeout=30))
    kg = k.clone().requires_grad_(rank == 1)  # only rank 1 would take the backward exchange
    res["grad"] = refusal(lambda: dd.ring_dilated_attention(q, kg, v, **kw, timeout=30))
    res["config"] = refusal(lambda: dd.ring_dilated_attention(q, k, v, **{**kw, "segment_lengths": [6, 5, 24]},
                                                               timeout=30))
    with torch.no_grad():  # inference, and the group still works after the refusals
        res["after"] = dd.ring_dilated_attention(*(rd.shard(x, rank, world) for x in _global_inputs()[:3]),
                                                 **_kw(CONFIGS[2], True), timeout=30)
    torch.save(res, Path(save_dir) / f"rank{rank}.pt")

    if world == 2:  # rank 1 sleeps before the backward exchange; rank 0 must not wait for ever
        if rank == 1:
            dd._deliver = _faulty_deliver(rank, "backward", STALL_TIMEOUT_S + 3)
        return {"fault": refusal(lambda: _case(rank, world, CONFIGS[2], False, timeout=STALL_TIMEOUT_S))}
    if rank == world - 1:  # the last rank raises just before the forward exchange; the others must fail
        dd._deliver = _faulty_deliver(rank, "forward", "raise")
        _case(rank, world, CONFIGS[3], False, timeout=RAISE_TIMEOUT_S)
    return {"fault": refusal(lambda: _case(rank, world, CONFIGS[3], False, timeout=RAISE_TIMEOUT_S))}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """World 2, ending with rank 1 stalling in backward: (per-rank checks, per-rank fault outcomes, seconds)."""
    save_dir = tmp_path_factory.mktemp("world2")
    t0 = time.monotonic()
    faults = rd.spawn(_world_checks, 2, str(save_dir), timeout=180)
    return load_rank_results(save_dir, 2), faults, time.monotonic() - t0


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    """World 4, ending with rank 3 raising: (per-rank checks, the SpawnError, seconds)."""
    save_dir = tmp_path_factory.mktemp("world4")
    t0 = time.monotonic()
    with pytest.raises(rd.SpawnError) as info:
        rd.spawn(_world_checks, 4, str(save_dir), timeout=180)
    return load_rank_results(save_dir, 4), info.value, time.monotonic() - t0


def _results(world, world2, world4):
    return (world2 if world == 2 else world4)[0]


def _gathered(parts):
    return {key: rd.unshard([p[key] for p in parts], dim=2 if key == "lse" else 1)
            for key in ("out", "lse", "dq", "dk", "dv")}


def _reference(config, causal, *, n=N, d=D, dtype=torch.float64, precision=None):
    """dilated_attention of the gathered inputs and its gradients (dense in ``precision`` if given)."""
    q, k, v, dout, dlse = _global_inputs(n, d, dtype)
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    if precision is None:
        out, lse = dilated_attention(*xs, **_kw(config, causal))
    else:
        xs = [x.detach().to(torch.float64 if precision == "float64" else dtype).requires_grad_() for x in xs]
        out, lse = dilated_attention_dense(*xs, **_kw(config, causal), precision=precision)
    _loss(out, lse, dout, dlse).backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}


# --------------------------------------------------------------------------- no processes

def test_without_process_group_says_what_to_do():
    q, k, v = make_qkv(1, 4, 1, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        dd.ring_dilated_attention(q, k, v, segment_lengths=[4], dilation_rates=[1])


@pytest.mark.parametrize("world", [2, 3, 4, 6])
@pytest.mark.parametrize("causal", [False, True])
def test_routes_mirror_each_other_and_match_the_plan(world, causal):
    """What rank a sends to b is, piece for piece, what b expects from a; the totals are the plan's."""
    plan = ringbook.dilated_ring_plan(N, world, [4, 8, 24], [1, 2, 4], num_heads=H, heads="all", causal=causal)
    tables = [dd.routes(plan, r) for r in range(world)]
    for a in range(world):
        for peer, pieces in tables[a][0].items():
            assert tables[peer][1][a] == pieces
            assert not causal or peer > a
        assert dd._numel(sum(tables[a][0].values(), []), plan, a, B, D) == plan.sent_elements(B, D)[a]


# --------------------------------------------------------------------------- real processes (gloo)

@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", [2, 4])
def test_matches_one_process_dilated_attention_float64(world, case, world2, world4):
    config, causal = CONFIGS[case[0]], case[1]
    parts = [r["cases"][case] for r in _results(world, world2, world4)]
    got, ref = _gathered(parts), _reference(config, causal)
    assert_matches_reference(got["out"], got["lse"], ref["out"], ref["lse"])
    assert_matches_reference(got["out"], got["lse"], *dilated_attention_dense(*_global_inputs()[:3],
                                                                               **_kw(config, causal)))
    for key in ("dq", "dk", "dv"):
        assert not torch.isnan(got[key]).any(), key
        assert torch.allclose(got[key], ref[key], atol=1e-10, rtol=1e-10), \
            f"{key}: max error {(got[key] - ref[key]).abs().max():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", [2, 4])
def test_only_dilated_pieces_travel_to_spanned_ranks(world, case, world2, world4):
    seg, rates, mode = CONFIGS[case[0]]
    plan = ringbook.dilated_ring_plan(N, world, seg, rates, num_heads=H, heads=mode, causal=case[1])
    expected = plan.sent_elements(B, D)
    for rank, res in enumerate(_results(world, world2, world4)):
        fwd, bwd = res["cases"][case]["fwd"], res["cases"][case]["bwd"]
        if all(s.kind == "local" for s in plan.segments):
            assert fwd == [] and bwd == [], f"rank {rank}: local segments need no communication"
        sent = {peer: numel for kind, peer, numel, _ in fwd if kind == "send"}
        received = {peer: numel for kind, peer, numel, _ in fwd if kind == "recv"}
        assert sum(sent.values()) == expected[rank], f"rank {rank}: sent {sent}, plan says {expected[rank]}"
        partners = {p for s in plan.segments if s.kind == "exchanged" and rank in s.ranks for p in s.ranks} - {rank}
        assert set(sent) | set(received) <= partners
        assert len(fwd) == len(sent) + len(received), "one message per peer and direction"
        # backward: the gradients of what was received go home, those of what was sent come back
        assert {p: x for kind, p, x, _ in bwd if kind == "send"} == received
        assert {p: x for kind, p, x, _ in bwd if kind == "recv"} == sent
    # never the whole K/V: a rank sends at most its dilated rows to each other spanned rank
    assert max(expected) <= 2 * B * (N // world) * H * D * (world - 1)


@pytest.mark.slow
def test_low_precision_within_2x_rule(world4):
    config, causal, dtype = LOWP["config"], LOWP["causal"], LOWP["dtype"]
    got = _gathered([r["lowp"] for r in world4[0]])
    ref = _reference(config, causal, n=LOWP["n"], d=LOWP["d"], dtype=dtype, precision="float64")
    base = _reference(config, causal, n=LOWP["n"], d=LOWP["d"], dtype=dtype, precision="input")
    assert got["out"].dtype == dtype and got["lse"].dtype == torch.float32 and got["dk"].dtype == dtype
    assert_within_2x_rule(got["out"], ref["out"], base["out"], what="out")
    assert_within_2x_rule(got["lse"], ref["lse"], base["lse"], atol=rounding_atol(ref["lse"], torch.float32),
                          what="lse")
    for key in ("dq", "dk", "dv"):
        assert_within_2x_rule(got[key], ref[key], base[key], what=key)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_refusals_on_every_rank(world, world2, world4):
    q, k, v = make_qkv(B, N, H, D)
    with pytest.raises(ValueError) as one_process:
        dilated_attention(q, k, v, **_kw(([6, 5, 24], [1, 2, 3], "grouped"), False))
    for r, res in enumerate(_results(world, world2, world4)):
        for key in ("unequal", "rates", "grad", "config"):
            assert res[key]["type"] == "ValueError", f"rank {r} {key}: {res[key]}"
        assert "equal length on every rank" in res["unequal"]["msg"]
        assert f"[4, {', '.join(['6'] * (world - 1))}]" in res["unequal"]["msg"], res["unequal"]["msg"]
        assert "same dilation_rates" in res["rates"]["msg"] and f"[[0], [1{', 2, 3' * (world == 4)}]]" \
            in res["rates"]["msg"], res["rates"]["msg"]
        assert "same k/v requires_grad" in res["grad"]["msg"] and "backward on every rank" in res["grad"]["msg"]
        assert res["config"]["msg"] == str(one_process.value) == \
            "segment_lengths[1]=5 does not divide sequence length 24"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_group_still_works_after_refusals(world, world2, world4):
    out, lse = (rd.unshard([r["after"][i] for r in _results(world, world2, world4)], dim=1 + i) for i in (0, 1))
    assert_matches_reference(out, lse, *dilated_attention(*_global_inputs()[:3], **_kw(CONFIGS[2], True)))


@pytest.mark.slow
def test_stalled_peer_in_backward_times_out_naming_it(world2):
    _, results, elapsed = world2
    fault = results[0]["fault"]
    assert fault["type"] == "TimeoutError", fault
    assert "rank 0 of 2" in fault["msg"] and "backward" in fault["msg"] and "with rank 1 " in fault["msg"], fault
    assert "timeout" in fault["msg"]
    assert fault["elapsed"] < STALL_TIMEOUT_S + 2.0, fault
    late = results[1]["fault"]  # the stalled rank, once awake, finds its peer gone and fails too
    assert late["type"] in ("TimeoutError", "RuntimeError"), late
    assert "rank 1 of 2" in late["msg"] and "with rank 0 " in late["msg"], late
    assert elapsed < 120


@pytest.mark.slow
def test_rank_that_raises_does_not_hang_the_others(world4):
    _, err, elapsed = world4
    assert sorted(err.errors) == [3]
    assert "injected failure on rank 3 before the forward exchange" in err.errors[3]
    for r in range(3):
        fault = err.results[r]["fault"]
        assert fault["type"] in ("TimeoutError", "RuntimeError"), f"rank {r}: {fault}"
        assert f"rank {r} of 4" in fault["msg"] and "forward" in fault["msg"] and "peer" in fault["msg"], fault
        assert fault["elapsed"] < RAISE_TIMEOUT_S + 2.0, fault
    assert elapsed < 150
