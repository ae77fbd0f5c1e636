"""The multi-process ring (ringbook.distributed) against the float64 reference.

Real processes, gloo on CPU. Starting a process costs seconds on a 2-core
runner, so each world size is started once (a module fixture) and every
check of that world runs inside it; the tests below then assert on what the
ranks sent back:

* world 2 and 4: every layout, causal and not, forward and backward (with a
  gradient on lse too) in float64, and one bfloat16 case under the 2× rule;
* refusals on every rank: shards of unequal length, a zigzag layout with an
  odd local length — and the group still works afterwards;
* faults: in world 2, rank 1 stalls inside the ring and rank 0 must raise a
  TimeoutError naming rank 1 within its timeout; in world 4, rank 3 raises
  before the ring and the other three must fail with a clear error, quickly.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_matches_reference,
    assert_within_2x_rule,
    load_rank_results,
    make_qkv,
    randn,
    refusal,
    rounding_atol,
    to64,
)

import ringbook
from ringbook import distributed as rd
from ringbook.distributed.comm import resolve_timeout
from ringbook.online_softmax import attend_block_backward
from ringbook.schedule import LAYOUTS

B, H, D = 2, 2, 4
CASES = [(layout, causal) for layout in LAYOUTS for causal in (False, True)]
LOWP = ("zigzag", True, torch.bfloat16)
STALL_TIMEOUT_S = 1.5
RAISE_TIMEOUT_S = 10.0


def _global_inputs(n, dtype=torch.float64, seed=0):
    q, k, v = make_qkv(B, n, H, D, dtype=dtype, seed=seed)
    dout = randn(B, n, H, D, dtype=dtype, seed=seed + 3)
    dlse = randn(B, H, n, dtype=torch.float64, seed=seed + 4)
    return q, k, v, dout, dlse


def _n(world):
    return 2 * world * 5  # divisible for every layout: 10 tokens a rank, zigzag chunks of 5


def _ring_case(rank, world, layout, causal, dtype=torch.float64, timeout=30.0):
    """This rank's out, lse and gradients for the global inputs of the case (seeded, same on every rank)."""
    q, k, v, dout, dlse = _global_inputs(_n(world), dtype)
    qs, ks, vs = (rd.shard(x, rank, world, layout).requires_grad_() for x in (q, k, v))
    out, lse = rd.ring_attention(qs, ks, vs, causal=causal, layout=layout, timeout=timeout)
    dlse_s = rd.shard(dlse, rank, world, layout, dim=2).to(lse.dtype)
    ((out * rd.shard(dout, rank, world, layout)).sum() + (lse * dlse_s).sum()).backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}


PROD_CASES = [("contiguous", False), ("zigzag", True), ("striped", True)]


def _prod_case(rank, world, layout, causal):
    """rd.production_ring_attention (fused-kernel path, grouped-query K/V with one head) on this rank."""
    q, k, v, dout, dlse = _global_inputs(_n(world))
    k, v = k[:, :, :1], v[:, :, :1]
    qs, ks, vs = (rd.shard(x, rank, world, layout).requires_grad_() for x in (q, k, v))
    out, lse = rd.production_ring_attention(qs, ks, vs, causal=causal, layout=layout, timeout=30.0)
    dlse_s = rd.shard(dlse, rank, world, layout, dim=2).to(lse.dtype)
    ((out * rd.shard(dout, rank, world, layout)).sum() + (lse * dlse_s).sum()).backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}


def _stalling_attend_block(seconds):
    from ringbook.fast import kernels

    original = kernels.attend_block
    state = {"slept": False}

    def attend_block(*args, **kwargs):
        if not state["slept"]:
            state["slept"] = True
            time.sleep(seconds)
        return original(*args, **kwargs)

    return attend_block


def _world_checks(rank, world, fault, save_dir):
    """Everything one spawned world checks; runs on every rank.

    The checks before the fault are saved to ``save_dir/rank<r>.pt`` (so a
    rank that then raises on purpose still hands them back); the fault's
    outcome is returned.
    """
    res = {"cases": {case: _ring_case(rank, world, *case) for case in CASES}}
    if world == 2:
        res["lowp"] = _ring_case(rank, world, *LOWP)
        res["prod"] = {case: _prod_case(rank, world, *case) for case in PROD_CASES}
    # shards of unequal length: 4 tokens on rank 0, 6 elsewhere
    c = 4 if rank == 0 else 6
    q, k, v = make_qkv(B, c, H, D, seed=rank)
    res["unequal"] = refusal(lambda: rd.ring_attention(q, k, v, timeout=30))
    # zigzag needs an even local length
    q, k, v = make_qkv(B, 3, H, D, seed=rank)
    res["zigzag_odd"] = refusal(lambda: rd.ring_attention(q, k, v, layout="zigzag", causal=True, timeout=30))
    if world == 2:
        res.update(_agreement_checks(rank))
    # the group still works after refusing
    res["after"] = _ring_case(rank, world, "striped", True)
    torch.save(res, Path(save_dir) / f"rank{rank}.pt")

    res = {}
    if fault == "stall":  # rank 1 sleeps inside its first block; rank 0 must not wait for ever
        if rank == 1:
            from ringbook.fast import kernels

            kernels.attend_block = _stalling_attend_block(STALL_TIMEOUT_S + 3)  # the einops block kernel
        res["fault"] = refusal(lambda: _ring_case(rank, world, "contiguous", False, timeout=STALL_TIMEOUT_S))
    elif fault == "raise":  # the last rank raises before the ring; the others must fail, not hang
        if rank == world - 1:
            raise RuntimeError(f"injected failure on rank {rank} before the ring")
        res["fault"] = refusal(lambda: _ring_case(rank, world, "zigzag", True, timeout=RAISE_TIMEOUT_S))
    return res


def _agreement_checks(rank):
    """Options that differ between the two ranks, one rank's bad input, create_graph: how each rank refuses."""
    q, k, v = make_qkv(B, 4, H, D, seed=rank)
    res = {
        "scale": refusal(lambda: rd.ring_attention(q, k, v, scale=0.5 if rank == 0 else 0.25, timeout=10)),
        "prod_scale": refusal(lambda: rd.production_ring_attention(q, k, v, scale=0.5 + rank, timeout=10)),
        "causal": refusal(lambda: rd.ring_attention(q, k, v, causal=bool(rank), layout="contiguous", timeout=10)),
        "prod_heads": refusal(lambda: rd.production_ring_attention(q[:, :, :1 + rank], k[:, :, :1 + rank],
                                                                   v[:, :, :1 + rank], timeout=10)),
        # a scale only rank 1 gets wrong: before, rank 1 raised after the agreement and rank 0 waited in the ring
        "bad_scale": refusal(lambda: rd.ring_attention(q, k, v, scale="0.5" if rank == 1 else None, timeout=10)),
        "empty": refusal(lambda: rd.ring_attention(q[:, :0] if rank == 1 else q, k, v, timeout=10)),
        "numpy_causal": refusal(lambda: rd.ring_attention(q, k, v, causal=torch.tensor(True).numpy()[()],
                                                          timeout=10)),
    }
    k_nan = k.clone()
    k_nan[0, 1, 0, 0] = float("nan")
    with ringbook.check_finite():
        res["nan"] = refusal(lambda: rd.ring_attention(q, k_nan if rank == 1 else k, v, timeout=10))
    for name, fn in (("create_graph", rd.ring_attention), ("prod_create_graph", rd.production_ring_attention)):
        qs = q.clone().requires_grad_()
        out, _ = fn(qs, k, v, causal=True, timeout=10)
        res[name] = refusal(lambda: torch.autograd.grad(out.sum(), qs, create_graph=True))
    return res


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """World 2, ending with rank 1 stalling: (per-rank checks, per-rank fault outcomes, seconds)."""
    save_dir = tmp_path_factory.mktemp("world2")
    t0 = time.monotonic()
    faults = rd.spawn(_world_checks, 2, "stall", str(save_dir), timeout=180)
    return load_rank_results(save_dir, 2), faults, time.monotonic() - t0


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    """World 4, ending with rank 3 raising: (per-rank checks, the SpawnError, seconds)."""
    save_dir = tmp_path_factory.mktemp("world4")
    t0 = time.monotonic()
    with pytest.raises(rd.SpawnError) as info:
        rd.spawn(_world_checks, 4, "raise", str(save_dir), timeout=180)
    return load_rank_results(save_dir, 4), info.value, time.monotonic() - t0


def _results(world, world2, world4):
    return (world2 if world == 2 else world4)[0]


def _reference(world, layout, causal, dtype=torch.float64):
    """Unsharded float64 reference and its gradients (and the low-precision naive baseline for other dtypes)."""
    q, k, v, dout, dlse = _global_inputs(_n(world), dtype)
    out = {}
    for name, precision in (("ref", "float64"), ("base", "input")):
        if precision == "input" and dtype == torch.float64:
            continue
        xs = [x.detach().clone().requires_grad_() for x in ((q, k, v) if precision == "input" else to64(q, k, v))]
        o, l = ringbook.naive_attention(*xs, causal=causal, precision=precision)
        ((o * dout.to(o.dtype)).sum() + (l * dlse.to(l.dtype)).sum()).backward()
        out[name] = {"out": o.detach(), "lse": l.detach(), "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}
    return out


def _gathered(parts, layout):
    return {key: rd.unshard([p[key] for p in parts], layout, dim=2 if key == "lse" else 1) for key in parts[0]}


# --------------------------------------------------------------------------- no processes

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, world):
    n = 2 * world * 3
    x = randn(B, n, H, D, seed=world)
    lse = randn(B, H, n, seed=world + 1)
    shards = [rd.shard(x, r, world, layout) for r in range(world)]
    positions = ringbook.layout_positions(n, world, layout)
    for r, s in enumerate(shards):
        assert torch.equal(s, x[:, positions[r]])
    assert torch.equal(rd.unshard(shards, layout), x)
    assert torch.equal(rd.unshard([rd.shard(lse, r, world, layout, dim=2) for r in range(world)], layout, dim=2), lse)


def test_shard_refuses_bad_sizes():
    x = randn(1, 10, 1, 2)
    with pytest.raises(ValueError, match="must divide 10"):
        rd.shard(x, 0, 4, "contiguous")
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        rd.shard(x, 2, 2)
    with pytest.raises(ValueError, match="equal length"):
        rd.unshard([x[:, :4], x[:, 4:]])


@pytest.mark.parametrize("args,error,pattern", [
    (([1, 2], 0, 2), TypeError, r"^x must be a torch\.Tensor, got list$"),
    ((None, 0, 2), TypeError, r"^x must be a torch\.Tensor, got NoneType$"),
    (("x", 0.0, 2), TypeError, r"^rank must be an int in 0\.\.1, got float 0\.0$"),
    (("x", True, 2), TypeError, r"^rank must be an int in 0\.\.1, got bool True$"),
    (("x", -1, 2), ValueError, r"^rank must be in 0\.\.1, got -1$"),
    (("x", 0, 2.0), TypeError, r"^world_size must be a positive int, got float 2\.0$"),
    (("x", 0, 0), ValueError, r"^world_size must be a positive int, got 0$"),
    (("x", 0, 2, "diagonal"), ValueError, r"^layout must be one of"),
    (("x", 0, 2, "contiguous", 4), ValueError, r"^dim=4 is out of range for x of shape \(1, 10, 1, 2\)"),
    (("x", 0, 2, "contiguous", 1.0), TypeError, r"^dim must be an int, got float 1\.0$"),
    (("x", 0, 3), ValueError, r"^world_size=3 does not fit length 10 \(dim 1 of shape \(1, 10, 1, 2\)\)"),
    (("x", 0, 2, "zigzag", 2), ValueError, r"^world_size=2 does not fit length 1 .*2·world_size = 4 must divide 1"),
])
def test_shard_refuses_bad_arguments_by_name(args, error, pattern):
    """Before: shard([1, 2], 0, 2) raised an AttributeError and shard(x, 0.0, 2) a torch IndexError."""
    x = randn(1, 10, 1, 2)
    args = tuple(x if a == "x" else a for a in args)
    with pytest.raises(error, match=pattern):
        rd.shard(*args)


@pytest.mark.parametrize("shards,kwargs,error,pattern", [
    (7, {}, TypeError, r"^shards must be a list of tensors .*got int$"),
    ("ab", {}, TypeError, r"^shards must be a list of tensors .*got str$"),
    ([], {}, ValueError, r"^unshard needs at least one shard$"),
    (["x", [1.0]], {}, TypeError, r"^shards\[1\] must be a torch\.Tensor, got list$"),
    (["x", "x64"], {}, ValueError, r"^shards\[1\] .*float32.* does not match shards\[0\]"),
    (["x", "wide"], {}, ValueError, r"^shards must have the same shape apart from dim 1"),
    (["x", "x"], {"dim": 5}, ValueError, r"^dim=5 is out of range for shards\[0\]"),
    (["x", "x"], {"dim": None}, TypeError, r"^dim must be an int, got NoneType None$"),
    (["x", "x"], {"layout": "zigzag"}, ValueError, r"^layout='zigzag' .* even length along dim 1, got 5"),
    (["x", "x"], {"layout": "diagonal"}, ValueError, r"^layout must be one of"),
])
def test_unshard_refuses_bad_arguments_by_name(shards, kwargs, error, pattern):
    x = randn(1, 5, 1, 2)
    named = {"x": x, "x64": x.float(), "wide": randn(1, 5, 2, 2)}
    if isinstance(shards, list):
        shards = [named.get(s, s) if isinstance(s, str) else s for s in shards]
    with pytest.raises(error, match=pattern):
        rd.unshard(shards, **kwargs)


def test_production_without_process_group_names_itself():
    q, k, v = make_qkv(1, 4, 1, 2)
    with pytest.raises(RuntimeError, match=r"^ringbook\.distributed\.production_ring_attention needs an initialised "
                                           r"process group.*\(ringbook\.production_ring_attention plays the ring"):
        rd.production_ring_attention(q, k, v)


def test_ring_attention_without_process_group_says_what_to_do():
    q, k, v = make_qkv(1, 4, 1, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        rd.ring_attention(q, k, v)


def test_timeout_from_argument_and_environment(monkeypatch):
    monkeypatch.delenv("RINGBOOK_P2P_TIMEOUT", raising=False)
    assert resolve_timeout(None) == rd.DEFAULT_TIMEOUT_S == 60.0
    assert resolve_timeout(2) == 2.0
    monkeypatch.setenv("RINGBOOK_P2P_TIMEOUT", "7.5")
    assert resolve_timeout(None) == 7.5
    monkeypatch.setenv("RINGBOOK_P2P_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="RINGBOOK_P2P_TIMEOUT"):
        resolve_timeout(None)
    for bad in (0, -1, "1", True, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number of seconds"):
            resolve_timeout(bad)
    import numpy as np
    assert resolve_timeout(np.int64(5)) == 5.0 and resolve_timeout(np.float32(2.5)) == 2.5  # before: refused


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("positions", [False, True])
def test_attend_block_backward_sums_to_autograd_of_naive(causal, positions):
    """Block gradients, summed over key blocks (dq) and query blocks (dk, dv), equal full attention's, float64."""
    n_q, n_k = 7, 11
    q, k, v = make_qkv(2, n_q, 3, 5, n_k=n_k, seed=3, requires_grad=True)
    dout, dlse = randn(2, n_q, 3, 5, seed=7), randn(2, 3, n_q, seed=8)
    scale = 0.3
    # queries at positions 4..10, keys 0..10: every query sees at least one key
    q_pos, k_pos = torch.arange(4, 4 + n_q), torch.arange(n_k)
    mask = (k_pos[None, :] <= q_pos[:, None]) if causal else None
    out, lse = ringbook.naive_attention(q, k, v, mask=mask, scale=scale)
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    delta = torch.einsum("bihd,bihd->bhi", dout, out.detach()) - dlse

    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1 in ((0, 3), (3, 7)):
        for k0, k1 in ((0, 4), (4, 5), (5, 11)):
            where = ({"q_pos": q_pos[q0:q1], "k_pos": k_pos[k0:k1]} if positions
                     else {"q_offset": 4 + q0, "k_offset": k0})
            g = attend_block_backward(q[:, q0:q1].detach(), k[:, k0:k1].detach(), v[:, k0:k1].detach(),
                                      out[:, q0:q1].detach(), lse[:, :, q0:q1].detach(), dout[:, q0:q1],
                                      scale=scale, causal=causal, delta=delta[:, :, q0:q1], **where)
            dq[:, q0:q1] += g[0]
            dk[:, k0:k1] += g[1]
            dv[:, k0:k1] += g[2]
    for got, ref, name in ((dq, q.grad, "dq"), (dk, k.grad, "dk"), (dv, v.grad, "dv")):
        assert torch.allclose(got, ref, atol=1e-12, rtol=1e-10), f"{name}: {(got - ref).abs().max():.3g}"


def test_attend_block_backward_default_delta_and_empty_rows():
    """Without ``delta`` it uses rowsum(dO∘O); rows that see no key get zero gradient, never NaN."""
    q, k, v = make_qkv(1, 5, 2, 4, n_k=6, seed=11, requires_grad=True)
    dout = randn(1, 5, 2, 4, seed=12)
    # keys at positions 2..7, queries 0..4: queries 0 and 1 see nothing
    mask = torch.arange(2, 8)[None, :] <= torch.arange(5)[:, None]
    out, lse = ringbook.naive_attention(q, k, v, mask=mask)
    assert torch.isneginf(lse[:, :, :2]).all()
    seen = slice(2, 5)
    o2, _ = ringbook.naive_attention(q[:, seen], k, v, mask=mask[seen])
    (o2 * dout[:, seen]).sum().backward()
    dq, dk, dv = attend_block_backward(q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dout,
                                       scale=4 ** -0.5, causal=True, q_offset=0, k_offset=2)
    assert not any(torch.isnan(g).any() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :2], torch.zeros_like(dq[:, :2]))
    assert torch.allclose(dq[:, seen], q.grad[:, seen], atol=1e-12)
    assert torch.allclose(dk, k.grad, atol=1e-12) and torch.allclose(dv, v.grad, atol=1e-12)


def test_attend_block_backward_low_precision_accumulates_in_float32():
    q, k, v = make_qkv(1, 6, 2, 4, dtype=torch.bfloat16, seed=5)
    out, lse = ringbook.attend_block(q, k, v, scale=0.5)
    grads = attend_block_backward(q, k, v, out.to(q.dtype), lse, randn(1, 6, 2, 4, dtype=torch.bfloat16),
                                  scale=0.5)
    assert all(g.dtype == torch.float32 for g in grads)


# --------------------------------------------------------------------------- real processes (gloo)

@pytest.mark.slow
@pytest.mark.parametrize("layout,causal", CASES)
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_matches_naive_float64(world, layout, causal, world2, world4):
    parts = [r["cases"][(layout, causal)] for r in _results(world, world2, world4)]
    assert len(parts) == world
    got = _gathered(parts, layout)
    ref = _reference(world, layout, causal)["ref"]
    assert_matches_reference(got["out"], got["lse"], ref["out"], ref["lse"])
    for key in ("dq", "dk", "dv"):
        assert got[key].shape == ref[key].shape
        assert torch.allclose(got[key], ref[key], atol=1e-10, rtol=1e-10), \
            f"{key}: max error {(got[key] - ref[key]).abs().max():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("layout,causal", PROD_CASES)
def test_distributed_production_gqa_matches_naive_float64(layout, causal, world2):
    """kernel="auto" (the fused-kernel path; einops kernels on CPU) with one K/V head for two q heads."""
    q, k, v, dout, dlse = _global_inputs(_n(2))
    xs = [x.detach().clone().requires_grad_() for x in (q, k[:, :, :1], v[:, :, :1])]
    o, l = ringbook.naive_attention(xs[0], *(x.expand(-1, -1, H, -1) for x in xs[1:]), causal=causal)
    ((o * dout).sum() + (l * dlse).sum()).backward()
    ref = {"out": o, "lse": l, "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}
    got = _gathered([r["prod"][(layout, causal)] for r in world2[0]], layout)
    for key, value in ref.items():
        assert got[key].shape == value.shape, key
        assert torch.allclose(got[key], value.detach(), atol=1e-10, rtol=1e-10), key


def test_distributed_low_precision_within_2x_rule(world2):
    layout, causal, dtype = LOWP
    got = _gathered([r["lowp"] for r in world2[0]], layout)
    ref = _reference(2, layout, causal, dtype)
    assert got["out"].dtype == dtype and got["lse"].dtype == torch.float32
    assert got["dq"].dtype == dtype
    assert_within_2x_rule(got["out"], ref["ref"]["out"], ref["base"]["out"], what="out")
    assert_within_2x_rule(got["lse"], ref["ref"]["lse"], ref["base"]["lse"],
                          atol=rounding_atol(ref["ref"]["lse"], torch.float32), what="lse")
    for key in ("dq", "dk", "dv"):
        assert_within_2x_rule(got[key], ref["ref"][key], ref["base"][key], what=key)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_unequal_shards_refused_on_every_rank(world, world2, world4):
    for r, res in enumerate(_results(world, world2, world4)):
        assert res["unequal"]["type"] == "ValueError", f"rank {r}: {res['unequal']}"
        assert "equal length on every rank" in res["unequal"]["msg"]
        assert "[4, 6" in res["unequal"]["msg"], res["unequal"]["msg"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_layout_mismatch_refused_on_every_rank(world, world2, world4):
    for r, res in enumerate(_results(world, world2, world4)):
        assert res["zigzag_odd"]["type"] == "ValueError", f"rank {r}: {res['zigzag_odd']}"
        assert "local length must be even, got 3" in res["zigzag_odd"]["msg"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_group_still_works_after_refusals(world, world2, world4):
    parts = [r["after"] for r in _results(world, world2, world4)]
    ref = _reference(world, "striped", True)["ref"]
    positions = ringbook.layout_positions(_n(world), world, "striped")
    for r, part in enumerate(parts):
        assert_matches_reference(part["out"], part["lse"], ref["out"][:, positions[r]],
                                 ref["lse"][:, :, positions[r]], what=f"rank {r}")


@pytest.mark.slow
@pytest.mark.parametrize("key,op,name,values", [
    ("scale", "ring_attention", "scale", "[0.5, 0.25]"),
    ("prod_scale", "production_ring_attention", "scale", "[0.5, 1.5]"),
    ("causal", "ring_attention", "causal", "[False, True]"),
    ("prod_heads", "production_ring_attention", "heads", "[1, 2]"),
])
def test_options_that_differ_between_ranks_refused_on_every_rank(key, op, name, values, world2):
    """Before: a different scale on each rank ran as if nothing happened; causal printed [0, 1];
    production's messages named ring_attention."""
    for r, res in enumerate(world2[0]):
        got = res[key]
        assert got["type"] == "ValueError", f"rank {r}: {got}"
        assert got["msg"] == f"every rank must call {op} with the same {name}, got {values} on ranks 0..1", got


@pytest.mark.slow
@pytest.mark.parametrize("key,own_type,own_msg", [
    ("bad_scale", "TypeError", "scale must be a real number or None, got str"),
    ("empty", "ValueError", "q has seq=0 (shape (2, 0, 2, 4)); attention needs at least one token"),
    ("nan", "ValueError", "k has NaN at index (0, 1, 0, 0) (shape (2, 4, 2, 4); 1 non-finite value in all); "
                          "non-finite input is refused while ringbook.check_finite is on"),
])
def test_one_rank_with_bad_input_stops_every_rank(key, own_type, own_msg, world2):
    """Before, with a bad scale on one rank only, that rank raised after the agreement and the other waited
    in the ring until its timeout."""
    rank0, rank1 = (res[key] for res in world2[0])
    assert (rank1["type"], rank1["msg"]) == (own_type, own_msg), rank1
    assert rank0["type"] == "ValueError", rank0
    assert "rank(s) [1] refused their input to ring_attention" in rank0["msg"], rank0
    assert rank0["elapsed"] < 5, rank0


@pytest.mark.slow
def test_numpy_bool_causal_accepted(world2):
    for res in world2[0]:
        assert res["numpy_causal"]["type"] is None, res["numpy_causal"]


@pytest.mark.slow
@pytest.mark.parametrize("key,op", [("create_graph", "ring_attention"),
                                    ("prod_create_graph", "production_ring_attention")])
def test_create_graph_refused_on_every_rank(key, op, world2):
    for r, res in enumerate(world2[0]):
        got = res[key]
        assert got["type"] == "RuntimeError", f"rank {r}: {got}"
        assert got["msg"].startswith(f"ringbook.distributed.{op} is once differentiable: "), got
        assert "create_graph=True" in got["msg"] and "ringbook.ring_attention" in got["msg"], got


@pytest.mark.slow
def test_stalled_peer_times_out_with_named_rank_and_step(world2):
    _, results, elapsed = world2
    fault = results[0]["fault"]
    assert fault["type"] == "TimeoutError", fault
    assert "rank 0 of 2" in fault["msg"] and "from rank 1" in fault["msg"] and "step 0" in fault["msg"], fault
    assert "timeout" in fault["msg"]
    assert fault["elapsed"] < STALL_TIMEOUT_S + 2.0, fault
    # the stalled rank, once awake, finds its peer gone and fails too (it does not hang)
    late = results[1]["fault"]
    assert late["type"] in ("TimeoutError", "RuntimeError"), late
    assert "ring_attention on rank 1 of 2" in late["msg"] and "from rank 0" in late["msg"], late
    assert late["elapsed"] < STALL_TIMEOUT_S + 3 + STALL_TIMEOUT_S + 2.0, late
    assert elapsed < 120


@pytest.mark.slow
def test_rank_that_raises_does_not_hang_the_others(world4):
    _, err, elapsed = world4
    assert sorted(err.errors) == [3]
    assert "injected failure on rank 3" in err.errors[3]
    assert "rank 3" in str(err)
    for r in range(3):
        fault = err.results[r]["fault"]
        assert fault["type"] in ("TimeoutError", "RuntimeError"), f"rank {r}: {fault}"
        assert f"ring_attention on rank {r} of 4" in fault["msg"] and "peer" in fault["msg"], fault
        assert fault["elapsed"] < RAISE_TIMEOUT_S + 2.0, fault
    assert elapsed < 150


@pytest.mark.slow
def test_dist_bench_under_torchrun(tmp_path):
    import json

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node=2", "--master-port", str(rd.free_port()), "-m", "ringbook.bench.dist_sweep",
           "--seq-lens", "128", "--dtype", "fp32", "--causal", "both", "--heads", "2", "--head-dim", "16",
           "--warmup", "1", "--repeats", "2", "--timeout", "30", "--out", str(tmp_path), "--stem", "rows"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["causal"] for r in rows] == [False, True]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["impl"] == "ring_dist" and row["ring_size"] == 2 and row["seq_len"] == 128
        assert row["layout"] == ("zigzag" if row["causal"] else "contiguous")
        assert row["max_rel_err"] < 1e-4 and row["checked_rows"] == 128 and row["lse_max_rel_err"] < 1e-4
        assert "gathered on rank 0" in row["check"] and "whole output, lse finite" in row["check"]
        assert len(row["per_rank_time_ms"]) == 2 and len(row["per_rank_peak_mem_gb"]) == 2
        assert row["time_ms"] == statistics.median(row["times_ms"]) > 0
        assert row["peak_mem_gb"] == max(row["per_rank_peak_mem_gb"]) > 0
        assert row["tflops"] > 0 and row["tokens_per_s"] > 0
        for key in ("device", "torch_version", "dtype", "batch", "heads", "head_dim", "peak_mem_kind"):
            assert key in row


@pytest.mark.slow
def test_dist_bench_measures_every_strategy_in_one_run(tmp_path):
    """--strategy ring allgather ulysses usp, with packed documents and a window, forward and backward: one row
    each, checked against the masked float64 reference, bytes from each one's plan or schedule."""
    import json

    from ringbook.bench import dist_sweep
    from ringbook.bench.dist_sweep import packed_documents

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node=2", "--master-port", str(rd.free_port()), "-m", "ringbook.bench.dist_sweep",
           "--seq-lens", "64", "--dtype", "fp32", "--causal", "true", "--heads", "2", "--head-dim", "8",
           "--warmup", "0", "--repeats", "1", "--timeout", "30", "--strategy", "ring", "allgather", "ulysses", "usp",
           "--ulysses-size", "2", "--documents", "3", "--window", "9", "--mode", "fwd+bwd", "--out", str(tmp_path),
           "--stem", "rows"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["ring_dist", "allgather_dist", "ulysses_dist", "usp_dist"]
    ids = packed_documents(64, 3, 0)
    for row in rows:
        assert row["status"] == "ok" and row["documents"] == 3 and row["window"] == 9, row
        assert row["max_rel_err"] < 1e-4 and row["grad_max_rel_err"] < 1e-4 and row["checked_rows"] == 64, row
        want = max(dist_sweep.bytes_sent_per_gpu(64, 2, r, pattern="dense", causal=True, batch=1, heads=2,
                                                 head_dim=8, dtype=torch.float32, backward=True,
                                                 strategy=row["strategy"], layout="zigzag", ulysses_size=2,
                                                 document_ids=ids, window=9) for r in range(2))
        assert row["bytes_sent_per_gpu"] == want > 0, row


@pytest.mark.slow
def test_dist_bench_production_with_peers(tmp_path):
    """--kernel auto with both peers in one run: fused ring rows, one-GPU rows, CP rows (not run on the CPU), summary."""
    import json

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node=2", "--master-port", str(rd.free_port()), "-m", "ringbook.bench.dist_sweep",
           "--seq-lens", "128", "--dtype", "fp32", "--causal", "both", "--heads", "2", "--head-dim", "16",
           "--warmup", "1", "--repeats", "2", "--timeout", "30", "--out", str(tmp_path), "--stem", "rows",
           "--kernel", "auto", "--peers", "one_gpu", "context_parallel", "--formats", "json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]  # --formats json
    data = json.loads((tmp_path / "rows.json").read_text())
    rows, meta = data["rows"], data["meta"]
    assert meta["kernel"] == "auto" and meta["peers"] == ["one_gpu", "context_parallel"]
    for causal in (False, True):
        same = [r for r in rows if r["causal"] == causal]
        ours = [r for r in same if r["impl"] == "production_dist"]
        assert len(ours) == 1 and not any(r["impl"] == "ring_dist" for r in rows)
        ours = ours[0]
        assert ours["status"] == "ok" and ours["kernel"] == "auto" and ours["gpus"] == ours["ring_size"] == 2
        assert ours["layout"] == ("zigzag" if causal else "contiguous")
        assert ours["max_rel_err"] < 1e-4 and ours["checked_rows"] == 128
        assert len(ours["per_rank_peak_mem_gb"]) == 2 and ours["peak_mem_gb"] > 0
        one = [r for r in same if r.get("peer_of") == "dist"]
        assert sorted(r["impl"] for r in one) == ["production", "sdpa"]
        for r in one:
            assert r["status"] == "ok" and r["gpus"] == r["ring_size"] == 1 and r["seq_len"] == 128, r
            assert r["max_rel_err"] < 1e-4 and r["time_ms"] > 0 and r["peak_mem_gb"] > 0
        cp = [r for r in same if r["impl"] == "context_parallel"]
        assert sorted(r["sdpa_backend"] for r in cp) == ["cudnn", "flash"]
        for r in cp:
            assert r["status"] == "error" and r["error"] == "not run: context_parallel needs CUDA (NCCL)", r
            assert r["time_ms"] is None and "traceback" not in r
        summary = [s for s in meta["scaling"] if s["causal"] == causal]
        assert len(summary) == 1
        s = summary[0]
        fastest = min(one, key=lambda r: r["time_ms"])
        assert s["seq_len"] == 128 and s["impl"] == "production_dist" and s["time_ms"] == ours["time_ms"]
        assert s["one_gpu_impl"] == fastest["impl"] and s["one_gpu_time_ms"] == fastest["time_ms"]
        assert s["speedup_vs_one_gpu"] == pytest.approx(fastest["time_ms"] / ours["time_ms"])
        assert s["per_rank_peak_mem_gb"] == ours["per_rank_peak_mem_gb"]
        assert s["cp_time_ms"] is None and s["cp_time_over_ours"] is None
    assert "speedup" in proc.stdout and "not run: context_parallel needs CUDA" in proc.stdout


def test_dist_bench_scaling_summary_and_cp_rows_check():
    """The summary picks the fastest ok peers; the CP check reads rows at their global (head-tail) positions."""
    from ringbook.bench import dist_sweep, measure, report
    from ringbook.schedule import layout_positions

    def row(impl, ms, status="ok", **extra):
        return {"impl": impl, "causal": True, "seq_len": 64, "ring_size": 1, "status": status, "time_ms": ms,
                "peak_mem_gb": 1.0, **extra}

    rows = [row("production_dist", 10.0, ring_size=2, kernel="auto", per_rank_peak_mem_gb=[0.5, 0.6]),
            row("sdpa_cudnn", 19.0, peer_of="dist"), row("production", 25.0, peer_of="dist"),
            row("sdpa", 5.0, "error", peer_of="dist"),
            row("context_parallel", 14.0, ring_size=2, sdpa_backend="flash", per_rank_peak_mem_gb=[0.7, 0.7]),
            row("context_parallel", 12.0, ring_size=2, sdpa_backend="cudnn", per_rank_peak_mem_gb=[0.8, 0.8])]
    (s,) = report.scaling_summary(rows)
    assert (s["one_gpu_impl"], s["speedup_vs_one_gpu"]) == ("sdpa_cudnn", pytest.approx(1.9))
    assert (s["cp_sdpa_backend"], s["cp_time_over_ours"]) == ("cudnn", pytest.approx(1.2))
    assert s["cp_per_rank_peak_mem_gb"] == [0.8, 0.8] and s["gpus"] == 2

    q, k, v = (randn(1, 64, 2, 8, seed=i) for i in range(3))
    out, _ = ringbook.naive_attention(q, k, v, causal=True)
    for rank in range(2):
        pos = layout_positions(64, 2, "zigzag")[rank]
        assert dist_sweep._layout_name(pos, 64, 2, rank) == "zigzag"
        err, scale, checked = measure.reference_error(q, k, v, out[:, pos], positions=pos, causal=True)
        assert err / scale < 1e-12 and checked == 32
        err, scale, _ = measure.reference_error(q, k, v, out[:, pos.flip(0)], positions=pos, causal=True)
        assert err / scale > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["dense", "dilated"])
def test_dist_bench_forward_backward_with_the_stacked_peer(tmp_path, pattern):
    """--mode fwd+bwd, --peers one_gpu stacked (and --pattern dilated): the rows issue 15's multi-GPU runs need."""
    import json

    torchrun = Path(sys.executable).with_name("torchrun")
    n = "256" if pattern == "dilated" else "128"
    cmd = [str(torchrun), "--nproc-per-node=2", "--master-port", str(rd.free_port()), "-m", "ringbook.bench.dist_sweep",
           "--seq-lens", n, "--dtype", "fp32", "--causal", "both", "--heads", "8" if pattern == "dilated" else "2",
           "--head-dim", "16", "--warmup", "1", "--repeats", "2", "--timeout", "30", "--out", str(tmp_path),
           "--stem", "rows", "--kernel", "auto", "--mode", "fwd+bwd", "--pattern", pattern,
           "--peers", "one_gpu", "stacked", "--formats", "json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "rows.json").read_text())
    rows, meta = data["rows"], data["meta"]
    assert meta["mode"] == "fwd+bwd" and meta["pattern"] == pattern
    ring = "production_dist" if pattern == "dense" else "production_dilated_dist"
    stacked = "production" if pattern == "dense" else "production_dilated"
    for causal in (False, True):
        same = [r for r in rows if r["causal"] == causal]
        assert all(r["status"] == "ok" and r["mode"] == "forward+backward" for r in same), same
        ours = next(r for r in same if r["impl"] == ring)
        assert ours["max_rel_err"] < 1e-4 and ours["gpus"] == 2
        # the benchmark's longest segment is n/2, one shard of two: the dilated ring sends nothing at 2 ranks
        assert (ours["bytes_sent_per_gpu"] > 0) == (pattern == "dense")
        assert ours["layout"] == ("contiguous" if pattern == "dilated" or not causal else "zigzag")
        peer = next(r for r in same if r.get("peer_of") == "stacked")
        assert peer["impl"] == stacked and peer["ring_size"] == 2 and peer["gpus"] == 1
        s = next(x for x in meta["scaling"] if x["causal"] == causal)
        assert s["impl"] == ring and s["stacked_time_ms"] == peer["time_ms"]
        assert s["parallel_efficiency"] == pytest.approx(s["speedup_vs_one_gpu"] / 2)
        assert s["one_gpu_impl"] != stacked or s["one_gpu_time_ms"] != peer["time_ms"]  # not the stacked row


@pytest.mark.slow
def test_dist_bench_checks_every_entry_at_every_length(tmp_path):
    """Above --check-max-seq nothing is gathered: before, a NaN output, a +inf lse or a NaN dq on one rank was ok."""
    import json

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node=2", "--master-port", str(rd.free_port()),
           str(Path(__file__).with_name("dist_sweep_injected.py")), "--seq-lens", "128", "256", "512", "--dtype",
           "fp32", "--causal", "false", "--heads", "2", "--head-dim", "8", "--warmup", "0", "--repeats", "2",
           "--timeout", "30", "--check-max-seq", "64", "--mode", "fwd+bwd", "--out", str(tmp_path), "--stem", "rows",
           "--formats", "json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout  # a failed row: exit status 1
    rows = {r["seq_len"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    for n, what in ((128, "output is NaN"), (256, "lse is +inf"), (512, "dq is NaN")):
        assert rows[n]["status"] == "error", rows[n]
        assert rows[n]["error"].startswith("rank 1: wrong result: " + what) and "in the last timed call" in \
            rows[n]["error"], rows[n]["error"]
        assert rows[n]["time_ms"] is None


@pytest.mark.slow
def test_dist_bench_refuses_an_unwritable_out_before_measuring(tmp_path):
    """Before: the whole sweep was measured, then rank 0 raised a raw FileNotFoundError and no JSON was written."""
    torchrun = Path(sys.executable).with_name("torchrun")
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    cmd = [str(torchrun), "--nproc-per-node=2", "--master-port", str(rd.free_port()), "-m", "ringbook.bench.dist_sweep",
           "--seq-lens", "64", "--dtype", "fp32", "--heads", "2", "--head-dim", "8", "--timeout", "30",
           "--out", str(target)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("ringbook.bench.dist_sweep: ")]
    assert ours == [f"ringbook.bench.dist_sweep: error: --out {target} is a file; expected a folder to write "
                    "results into"], proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr and "ring_dist" not in proc.stdout  # nothing was measured
    assert 'File "' + str(Path(rd.__file__).parents[1]) not in proc.stderr  # no traceback from ringbook


def test_bytes_sent_follow_the_schedule():
    from ringbook.bench import dist_sweep
    from ringbook.distributed import dilated as dd

    kw = {"batch": 1, "heads": 8, "head_dim": 16, "dtype": torch.float32}
    # dense: K and V of a shard (2 × 64 rows × 8 heads × 16) travel w − 1 = 3 hops
    assert dist_sweep.bytes_sent_per_gpu(256, 4, 0, pattern="dense", causal=False, backward=False, **kw) == \
        3 * 2 * 64 * 8 * 16 * 4
    # with the backward: once more, plus float32 dK/dV for w hops
    assert dist_sweep.bytes_sent_per_gpu(256, 4, 0, pattern="dense", causal=False, backward=True, **kw) == \
        2 * 3 * 2 * 64 * 8 * 16 * 4 + 4 * 2 * 64 * 8 * 16 * 4
    cfg = dist_sweep.bench_dilated_config(256)
    plan = dd._ring_plan(256, 4, cfg["segment_lengths"], cfg["dilation_rates"], 8, "grouped", False)
    for rank in range(4):
        send, _ = dd.routes(plan, rank)
        want = sum(dd._numel(p, plan, rank, 1, 16) for p in send.values()) * 4
        assert dist_sweep.bytes_sent_per_gpu(256, 4, rank, pattern="dilated", causal=False, backward=False,
                                             **kw) == want
