"""Dilated attention (equation (D)) against the dense κ_ij reference: values, gradients, work and refusals."""

import math

import pytest
import torch
from helpers import assert_matches_reference, assert_within_2x_rule, make_qkv, rounding_atol, to64
from hypothesis import given, settings
from hypothesis import strategies as st

import ringbook
from ringbook import dilated
from ringbook._utils import attention_flops
from ringbook.dilated import (
    attend_segments,
    dilated_attention,
    dilated_attention_dense,
    dilated_flops,
    dilated_reference_rows,
    dilated_weights,
    grouped_heads,
)

LENGTHS = (8, 12, 16, 24, 32, 36, 48)


def _divisors(x, most=None):
    return [d for d in range(1, (most or x) + 1) if x % d == 0]


@st.composite
def configs(draw, lengths=LENGTHS):
    """(n, segment_lengths, dilation_rates, heads mode, num_heads, causal) that dilated attention accepts."""
    n = draw(st.sampled_from(lengths))
    pairs = draw(st.integers(1, 3))
    seg = [draw(st.sampled_from(_divisors(n))) for _ in range(pairs)]
    rates = [draw(st.sampled_from(_divisors(w, most=6))) for w in seg]
    mode = draw(st.sampled_from(["all", "grouped"]))
    h = draw(st.integers(pairs if mode == "grouped" else 1, 5))
    return n, seg, rates, mode, h, draw(st.booleans())


def _kw(seg, rates, mode, causal):
    return dict(segment_lengths=seg, dilation_rates=rates, heads=mode, causal=causal)


def _brute_weights(n, h, seg, rates, mode, causal):
    """κ_ij straight from the words of the definition, one (head, pair, i, j) at a time."""
    c = torch.zeros(h, n, n, dtype=torch.int64)
    groups = grouped_heads(h, len(seg)) if mode == "grouped" else None
    for head in range(h):
        for p, (w, r) in enumerate(zip(seg, rates)):
            if groups is not None and head not in groups[p]:
                continue
            o = (head - groups[p].start if groups is not None else head) % r
            for i in range(n):
                for j in range(n):
                    if i // w == j // w and (i % w) % r == o and (j % w) % r == o and (not causal or j <= i):
                        c[head, i, j] += 1
    return c


@pytest.mark.parametrize("mode", ["all", "grouped"])
@pytest.mark.parametrize("causal", [False, True])
def test_weights_match_the_definition(mode, causal):
    seg, rates = [4, 6, 12], [2, 3, 1]
    c = dilated_weights(12, 4, segment_lengths=seg, dilation_rates=rates, causal=causal, heads=mode)
    assert c.dtype == torch.int64 and c.shape == (4, 12, 12)
    assert torch.equal(c, _brute_weights(12, 4, seg, rates, mode, causal))
    if not causal:
        assert torch.equal(c, c.transpose(1, 2))


@settings(max_examples=25, deadline=None)
@given(configs(), st.integers(0, 2 ** 16))
def test_forward_matches_dense_reference(config, seed):
    n, seg, rates, mode, h, causal = config
    q, k, v = make_qkv(b=2, n_q=n, h=h, d=4, seed=seed)
    out, lse = dilated_attention(q, k, v, **_kw(seg, rates, mode, causal))
    ref_out, ref_lse = dilated_attention_dense(q, k, v, **_kw(seg, rates, mode, causal))
    assert out.dtype == torch.float64 and lse.shape == (2, h, n)
    assert_matches_reference(out, lse, ref_out, ref_lse)


def _loss(out, lse, seed):
    """A random linear function of out and the finite lse entries (no gradient into -inf)."""
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out.double() * go).sum() + (lse.double() * gl).sum()


def check_grads(fn, config, seed, **extra):
    n, seg, rates, mode, h, causal = config
    q, k, v = make_qkv(b=1, n_q=n, h=h, d=4, seed=seed, requires_grad=True)
    grads = torch.autograd.grad(_loss(*fn(q, k, v, **_kw(seg, rates, mode, causal), **extra), seed), (q, k, v))
    ref = torch.autograd.grad(_loss(*dilated_attention_dense(q, k, v, **_kw(seg, rates, mode, causal)), seed),
                              (q, k, v))
    for name, g, r in zip("qkv", grads, ref):
        assert not torch.isnan(g).any(), f"d{name} has NaN"
        assert torch.allclose(g, r, atol=1e-10, rtol=1e-10), f"d{name}: max error {(g - r).abs().max():.3g}"


@settings(max_examples=15, deadline=None)
@given(configs(lengths=(8, 12, 24)), st.integers(0, 2 ** 16))
def test_backward_matches_dense_reference(config, seed):
    check_grads(dilated_attention, config, seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["all", "grouped"])
@pytest.mark.parametrize("causal", [False, True])
def test_los_precision_within_twice_the_dense_error(dtype, mode, causal):
    kw = _kw([32, 64, 128], [1, 2, 4], mode, causal)
    q, k, v = make_qkv(b=1, n_q=128, h=8, d=32, dtype=dtype, seed=3)
    out, lse = dilated_attention(q, k, v, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = dilated_attention_dense(*to64(q, k, v), **kw)
    base_out, base_lse = dilated_attention_dense(q, k, v, precision="input", **kw)
    assert_within_2x_rule(out, ref_out, base_out)
    assert_within_2x_rule(lse, ref_lse, base_lse, atol=rounding_atol(ref_lse, torch.float32), what="lse")


@pytest.mark.parametrize("mode", ["all", "grouped"])
def test_positions_no_pattern_keeps_get_zero_and_minus_inf(mode):
    # 2 heads, rate 4: offsets 2 and 3 of every segment are kept by no head
    seg, rates = ([8], [4]) if mode == "all" else ([8, 8], [4, 4])
    h = 2
    q, k, v = make_qkv(b=1, n_q=16, h=h, d=4, seed=5, requires_grad=True)
    out, lse = dilated_attention(q, k, v, **_kw(seg, rates, mode, True))
    offsets = [0, 1] if mode == "all" else [0, 0]  # grouped: each head is the first of its group
    kept = torch.tensor([[i % 8 % 4 == o for i in range(16)] for o in offsets])  # (h, n)
    assert (~kept.any(0)).any()  # some positions are kept by no head at all (offsets 2 and 3)
    assert torch.equal(out[0].transpose(0, 1)[~kept], torch.zeros(int((~kept).sum()), 4, dtype=out.dtype))
    assert torch.isneginf(lse[0][~kept]).all() and torch.isfinite(lse[0][kept]).all()
    assert not torch.isnan(out).any()
    grads = torch.autograd.grad(_loss(out, lse, 0), (q, k, v))
    assert all(not torch.isnan(g).any() for g in grads)
    dq = grads[0][0].transpose(0, 1)  # (h, n, d)
    assert torch.equal(dq[~kept], torch.zeros_like(dq[~kept])) and (dq[kept] != 0).any()


def test_one_full_segment_is_dense_attention_and_a_repeated_pair_counts_twice():
    q, k, v = make_qkv(b=2, n_q=24, h=3, d=8, seed=7)
    for causal in (False, True):
        ref_out, ref_lse = ringbook.naive_attention(q, k, v, causal=causal)
        out, lse = dilated_attention(q, k, v, segment_lengths=[24], dilation_rates=[1], causal=causal)
        assert_matches_reference(out, lse, ref_out, ref_lse)
        out, lse = dilated_attention(q, k, v, segment_lengths=[24, 24], dilation_rates=[1, 1], causal=causal)
        assert_matches_reference(out, lse, ref_out, ref_lse + math.log(2))  # κ_ij = 2 everywhere


def test_grouped_split_eight_heads_over_three_pairs():
    assert [len(g) for g in grouped_heads(8, 3)] == [2, 3, 3]
    assert [list(g) for g in grouped_heads(8, 3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert [len(g) for g in grouped_heads(7, 3)] == [2, 2, 3]
    assert [len(g) for g in grouped_heads(3, 3)] == [1, 1, 1]
    c = dilated_weights(16, 8, segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4], heads="grouped")
    # head 2 is the first of group 1 (w=8, r=2): it keeps offset 0; head 4 (third) keeps 2 mod 2 = 0
    assert c[2, 0, 2] == 1 and c[2, 1, 3] == 0 and c[3, 1, 3] == 1 and c[4, 0, 2] == 1 and c[2, 0, 8] == 0


def test_dilation_really_cuts_the_work(monkeypatch):
    scores = []

    def counting(q, k, v, **kw):
        scores.append(q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1])
        return ringbook.attend_block(q, k, v, **kw)

    monkeypatch.setattr(dilated, "attend_block", counting)
    n, d, seg, rates = 64, 4, [16, 32, 64], [1, 2, 4]
    q, k, v = make_qkv(b=2, n_q=n, h=8, d=d, seed=1)
    for mode in ("all", "grouped"):
        scores.clear()
        dilated_attention(q, k, v, segment_lengths=seg, dilation_rates=rates, heads=mode)
        heads = [8, 8, 8] if mode == "all" else [2, 3, 3]
        expected = sum(2 * hp * (n // w) * (w // r) ** 2 for hp, w, r in zip(heads, seg, rates))
        assert sum(scores) == expected
        flops = dilated_flops(2, 8, n, d, segment_lengths=seg, dilation_rates=rates, heads=mode)
        assert flops == 4 * d * expected
        kw = dict(segment_lengths=seg, dilation_rates=rates, heads=mode)
        assert dilated_flops(2, 8, n, d, causal=True, **kw) == flops / 2
    # a pair costs n·w/r² scores per head: doubling r quarters the work
    base = dilated_flops(1, 8, 4096, 64, segment_lengths=[1024], dilation_rates=[1])
    for r in (2, 4, 8):
        assert dilated_flops(1, 8, 4096, 64, segment_lengths=[1024], dilation_rates=[r]) == base / r ** 2
    assert base == attention_flops(1, 8, 4096, 1024, 64)  # r = 1: dense attention inside each segment


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_segments_match_one_tile(causal):
    q, k, v = make_qkv(b=3, n_q=20, h=2, d=4, seed=2)
    whole = attend_segments(q, k, v, scale=0.5, causal=causal)
    for budget in (2 * 20 * 20, 2 * 20, 1):  # whole segments, query rows, single rows
        for x, y in zip(attend_segments(q, k, v, scale=0.5, causal=causal, budget=budget), whole):
            assert torch.allclose(x, y, atol=1e-12)


def test_reference_rows_without_the_dense_matrix():
    q, k, v = make_qkv(b=1, n_q=48, h=5, d=4, seed=4)
    kw = _kw([6, 16, 48], [2, 4, 3], "grouped", True)
    ref_out, ref_lse = dilated_attention_dense(q, k, v, **kw)
    rows = torch.tensor([0, 7, 23, 40, 47])
    out, lse = dilated_reference_rows(q, k, v, rows, **kw)
    assert_matches_reference(out, lse, ref_out[:, rows], ref_lse[:, :, rows])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(segment_lengths=[8, 16], dilation_rates=[1]), ValueError,
     "segment_lengths has 2 entries but dilation_rates has 1"),
    (dict(segment_lengths=[8, 7], dilation_rates=[1, 1]), ValueError,
     r"segment_lengths\[1\]=7 does not divide sequence length 48"),
    (dict(segment_lengths=[8, 16], dilation_rates=[1, 3]), ValueError,
     r"dilation_rates\[1\]=3 does not divide segment_lengths\[1\]=16"),
    (dict(segment_lengths=[], dilation_rates=[]), ValueError, "segment_lengths must be a non-empty list"),
    (dict(segment_lengths=8, dilation_rates=[1]), ValueError, "segment_lengths must be a non-empty list"),
    (dict(segment_lengths=[8], dilation_rates=[0]), ValueError, r"dilation_rates\[0\] must be a positive int"),
    (dict(segment_lengths=[-8], dilation_rates=[1]), ValueError, r"segment_lengths\[0\] must be a positive int"),
    (dict(segment_lengths=[8.0], dilation_rates=[1]), TypeError, r"segment_lengths\[0\] must be a positive int"),
    (dict(segment_lengths=[8], dilation_rates=[True]), TypeError, r"dilation_rates\[0\] must be a positive int"),
    (dict(segment_lengths=[8], dilation_rates=[1], heads="some"), ValueError, "heads must be one of"),
    (dict(segment_lengths=[8, 16, 48], dilation_rates=[1, 1, 1], heads="grouped"), ValueError,
     "heads='grouped' needs at least one head per pair: num_heads=2 < 3"),
    (dict(segment_lengths=[8], dilation_rates=[1], causal=1), TypeError, "causal must be True or False"),
])
def test_refused_configurations_name_the_argument(kwargs, error, message):
    q, k, v = make_qkv(b=1, n_q=48, h=2, d=4)
    with pytest.raises(error, match=message):
        dilated_attention(q, k, v, **kwargs)
    if "causal" not in kwargs:
        with pytest.raises(error, match=message):
            dilated_weights(48, 2, **kwargs)


def test_dilated_attention_is_self_attention():
    q, k, v = make_qkv(b=1, n_q=8, n_k=16, h=1, d=4)
    with pytest.raises(ValueError, match="q has length 8 but k and v have 16"):
        dilated_attention(q, k, v, segment_lengths=[8], dilation_rates=[1])


@pytest.mark.parametrize("call", [
    lambda seq_len, num_heads: dilated_weights(seq_len, num_heads, segment_lengths=[4], dilation_rates=[1]),
    lambda seq_len, num_heads: ringbook.dilated_flops(1, num_heads, seq_len, 4, segment_lengths=[4],
                                                      dilation_rates=[1]),
    lambda seq_len, num_heads: ringbook.dilated_ring_plan(seq_len, 1, [4], [1], num_heads=num_heads),
], ids=["dilated_weights", "dilated_flops", "dilated_ring_plan"])
@pytest.mark.parametrize("seq_len,num_heads,error,message", [
    (0, 2, ValueError, r"^seq_len must be a positive int, got 0$"),
    (-8, 2, ValueError, r"^seq_len must be a positive int, got -8$"),
    (8.0, 2, TypeError, r"^seq_len must be a positive int, got float 8\.0$"),
    (8, 0, ValueError, r"^num_heads must be a positive int, got 0$"),
    (8, -1, ValueError, r"^num_heads must be a positive int, got -1$"),
])
def test_size_helpers_follow_the_zero_size_rule(call, seq_len, num_heads, error, message):
    """Before: an empty plan/weights, a negative FLOP count, or a torch error from deep inside."""
    with pytest.raises(error, match=message):
        call(seq_len, num_heads)


@pytest.mark.parametrize("name,value", [("batch", 0), ("head_dim", 0), ("batch", 1.0)])
def test_dilated_flops_sizes_must_be_positive_ints(name, value):
    kwargs = dict(batch=1, num_heads=2, seq_len=8, head_dim=4) | {name: value}
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must be a positive int"):
        ringbook.dilated_flops(**kwargs, segment_lengths=[4], dilation_rates=[1])


def test_dilated_attention_makes_one_batched_call_per_pair(monkeypatch):
    q, k, v = (torch.randn(1, 32, 4, 8, dtype=torch.float64) for _ in range(3))
    cfg = dict(segment_lengths=[8, 16], dilation_rates=[1, 2], heads="grouped", causal=True)
    ref_out, ref_lse = dilated.dilated_attention_dense(q, k, v, **cfg)
    calls = []
    real = dilated.attend_segments

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(dilated, "attend_segments", counting)
    out, lse = dilated.dilated_attention(q, k, v, **cfg)
    assert len(calls) == 2  # one batched call per pair: every segment and every head of the pair at once
    assert torch.allclose(out, ref_out, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert torch.allclose(lse[torch.isfinite(lse)], ref_lse[torch.isfinite(ref_lse)], atol=1e-12)
