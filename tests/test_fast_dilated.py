"""Dilated attention on the ring engine (ringbook.fast.dilated): gathered blocks, the batched-call peer.

Against equation (D) in float64 (dense weights), forward and backward (a
gradient on lse too): heads "all" and "grouped", causal and not, ring sizes
that make segments local, straddling and spanning, grouped-query attention
with equal and unequal K/V slots. The launch count depends on the pairs
only: not on the ring size, not on the number of segments.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_qkv, randn

import ringbook
from ringbook.dilated import dilated_attention_dense
from ringbook.fast import blocks
from ringbook.fast import dilated as fd

N, H = 48, 4
CONFIGS = {
    "grouped": dict(segment_lengths=[12, 24], dilation_rates=[2, 3], heads="grouped"),
    "all": dict(segment_lengths=[12, 24, 48], dilation_rates=[1, 2, 3], heads="all"),
}


def _loss(out, lse, dout):
    fin = torch.isfinite(lse)
    return (out * dout).sum() + 0.3 * torch.where(fin, lse, 0.0).sum()


def _grads(fn, q, k, v, dout):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    _loss(out, lse, dout).backward()
    return out.detach(), lse.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("mode", list(CONFIGS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [H, 2, 1])
@pytest.mark.parametrize("ring_size", [1, 3, 4])
def test_production_dilated_matches_equation_d_float64(mode, causal, kv_heads, ring_size):
    q, _, _ = make_qkv(2, N, H, 8, seed=1)
    k, v = randn(2, N, kv_heads, 8, seed=2), randn(2, N, kv_heads, 8, seed=3)
    dout = randn(2, N, H, 8, seed=4)
    cfg = dict(CONFIGS[mode], causal=causal)
    g = H // kv_heads
    got = _grads(lambda q, k, v: ringbook.production_ring_attention(q, k, v, ring_size=ring_size, **cfg), q, k, v, dout)
    ref = _grads(lambda q, k, v: dilated_attention_dense(q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2),
                                                         **cfg), q, k, v, dout)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1]))
    fin = torch.isfinite(ref[1])
    assert torch.allclose(got[0], ref[0], atol=1e-12) and torch.allclose(got[1][fin], ref[1][fin], atol=1e-12)
    for name, a, b in zip(("dq", "dk", "dv"), got[2], ref[2]):
        assert torch.allclose(a, b, atol=1e-12), f"{name}: max error {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("mode", list(CONFIGS))
@pytest.mark.parametrize("causal", [False, True])
def test_dilated_sdpa_peer_matches_equation_d_and_refuses_gqa(mode, causal):
    q, k, v = make_qkv(2, N, H, 8, seed=5)
    dout = randn(2, N, H, 8, seed=6)
    cfg = dict(CONFIGS[mode], causal=causal)
    got = _grads(lambda q, k, v: fd.dilated_sdpa(q, k, v, **cfg), q, k, v, dout)
    ref = _grads(lambda q, k, v: dilated_attention_dense(q, k, v, **cfg), q, k, v, dout)
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1]))
    assert torch.allclose(got[0], ref[0], atol=1e-12) and torch.allclose(got[1][fin], ref[1][fin], atol=1e-12)
    for a, b in zip(got[2], ref[2]):
        assert torch.allclose(a, b, atol=1e-12)
    with torch.no_grad():  # the no-grad path merges heads="all" with the fused merge
        out, lse = fd.dilated_sdpa(q, k, v, **cfg)
    assert torch.allclose(out, ref[0], atol=1e-12)
    with pytest.raises(ValueError, match="heads"):
        fd.dilated_sdpa(q, k[:, :, :2], v[:, :, :2], **cfg)


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_one_kernel_call_per_pair_whatever_the_ring_size_and_segments(mode, monkeypatch):
    calls = []
    real = blocks.forward_block
    monkeypatch.setattr(blocks, "forward_block", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    counts = {}
    for n in (N, 4 * N):
        q, k, v = make_qkv(1, n, H, 8, seed=7)
        for w in (1, 4, 12):
            calls.clear()
            ringbook.production_ring_attention(q, k, v, ring_size=w, causal=True, **CONFIGS[mode])
            counts[n, w] = len(calls)
    assert set(counts.values()) == {len(CONFIGS[mode]["segment_lengths"])}, counts


def test_head_slots_gather_kv_once_when_slots_are_equal():
    # 4 q heads over 2 kv heads (q heads 0, 1 read kv 0; 2, 3 read kv 1), rate 2: every slot one q head
    q_heads, offs, kv_heads, kv_offs = fd.head_slots((0, 1, 2, 3), (0, 1, 0, 1), kv_group=2)
    assert len(kv_heads) == 4 and sorted(zip(kv_offs, kv_heads)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    q_heads, offs, kv_heads, kv_offs = fd.head_slots((0, 1, 2, 3), (0, 0, 0, 0), kv_group=2)
    assert kv_heads == (0, 1) and q_heads == (0, 1, 2, 3)  # each kv head gathered once for its two q heads
    # 3 heads on one kv head at rate 2: slots of 2 and 1 q heads -> K/V gathered per q head
    q_heads, offs, kv_heads, kv_offs = fd.head_slots((0, 1, 2), (0, 1, 0), kv_group=3)
    assert kv_heads == (0, 0, 0) and kv_offs == (0, 1, 0)
    spec = fd.gather_spec(6, 2, (q_heads, offs, kv_heads, kv_offs), q_at=0, kv_at=0, count=2, q_rows=(0, 3),
                          kv_rows=(0, 3), first=True, device="cpu")
    assert not spec.kv_unique  # its dK/dV adds accumulate
    part = fd.gather_spec(6, 2, (q_heads, offs, kv_heads, kv_offs), q_at=0, kv_at=0, count=2, q_rows=(1, 3),
                          kv_rows=(0, 3), first=True, device="cpu")
    with pytest.raises(ValueError, match="must hold one segment"):
        part.take_q(torch.zeros(1, 12, 3, 2))


def test_production_dilated_refusals_name_the_argument():
    q, k, v = make_qkv(1, N, H, 8)
    with pytest.raises(ValueError, match="ring_size=5 does not divide"):
        ringbook.production_ring_attention(q, k, v, ring_size=5, **CONFIGS["all"])
    with pytest.raises(ValueError, match="segment_lengths and dilation_rates"):
        ringbook.production_ring_attention(q, k, v, segment_lengths=[12])
    with pytest.raises(ValueError, match="contiguously"):
        ringbook.production_ring_attention(q, k, v, layout="zigzag", **CONFIGS["all"])
