"""blockwise_attention (online softmax over key/value blocks) and its pieces,
attend_block and online_softmax_trace, against the float64 reference."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    ALL_DTYPES,
    LOW_PRECISION,
    assert_matches_reference,
    assert_within_2x_rule,
    check_attention,
    expected_lse_dtype,
    make_qkv,
    randn,
    to64,
)

from ringbook import (
    attend_block,
    blockwise_attention,
    causal_mask,
    merge_partials,
    naive_attention,
    online_softmax_trace,
)


def blockwise(block_size):
    return functools.partial(blockwise_attention, block_size=block_size)


# --- float64: exact against the reference ----------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 113])
@pytest.mark.parametrize("block_size", [1, 3, 7, 16, 113, 500])
@pytest.mark.parametrize("causal", [False, True])
def test_float64_matches_reference(n, block_size, causal):
    q, k, v = make_qkv(2, n, 2, 8, seed=n * 31 + block_size)
    check_attention(blockwise(block_size), q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_1000(causal):
    q, k, v = make_qkv(1, 1000, 1, 8, seed=1000)
    check_attention(blockwise(128), q, k, v, causal=causal)  # 128 does not divide 1000


@pytest.mark.parametrize("n_q,n_k", [(7, 113), (113, 7), (1, 50), (50, 1), (9, 10), (10, 9)])
@pytest.mark.parametrize("block_size", [4, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_query_and_key_lengths(n_q, n_k, block_size, causal):
    q, k, v = make_qkv(2, n_q, 2, 8, n_k, seed=n_q * 7 + n_k)
    out, lse = check_attention(blockwise(block_size), q, k, v, causal=causal)
    assert torch.isfinite(lse).all()  # top-left causal: query 0 always sees key 0


@pytest.mark.parametrize("scale", [None, 0.3, -1.5, 30.0])
def test_scale(scale):
    q, k, v = make_qkv(2, 37, 2, 16, seed=3)
    check_attention(blockwise(8), q, k, v, scale=scale, causal=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("how", ["scale=30", "large q/k"])
def test_huge_logits_float64(causal, how):
    if how == "scale=30":
        q, k, v = make_qkv(2, 50, 2, 16, seed=4)
        scale = 30.0
    else:
        q, k, v = make_qkv(2, 50, 2, 16, seed=5, std=40.0)
        scale = None
    s = torch.einsum("bihd,bjhd->bhij", q, k) * (scale or 16**-0.5)
    assert s.abs().max() > 500  # exp() overflows float64 above ~709
    out, lse = check_attention(blockwise(7), q, k, v, causal=causal, scale=scale, atol64=1e-9)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_block_size_does_not_change_the_result():
    q, k, v = make_qkv(2, 45, 2, 8, seed=6)
    outs = [blockwise_attention(q, k, v, block_size=bs, causal=True) for bs in (1, 2, 5, 9, 45, 46, 1000)]
    for out, lse in outs[1:]:
        assert_matches_reference(out, lse, *outs[0], atol=1e-12, rtol=1e-12)


def test_batch_and_heads_independent():
    q, k, v = make_qkv(3, 20, 4, 8, seed=7)
    out, lse = blockwise_attention(q, k, v, block_size=6, causal=True)
    for b in range(3):
        for h in range(4):
            o1, l1 = blockwise_attention(q[b:b + 1, :, h:h + 1], k[b:b + 1, :, h:h + 1], v[b:b + 1, :, h:h + 1],
                                         block_size=6, causal=True)
            torch.testing.assert_close(out[b:b + 1, :, h:h + 1], o1, atol=1e-14, rtol=1e-14)
            torch.testing.assert_close(lse[b:b + 1, h:h + 1], l1, atol=1e-14, rtol=1e-14)


# --- low precision: flash-attention's 2x rule -------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float32,))
@pytest.mark.parametrize("n_q,n_k", [(1, 1), (7, 7), (113, 113), (113, 7), (7, 113)])
@pytest.mark.parametrize("block_size", [16, 200])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_2x_rule(dtype, n_q, n_k, block_size, causal):
    q, k, v = make_qkv(2, n_q, 2, 32, n_k, dtype=dtype, seed=n_q + n_k + block_size)
    check_attention(blockwise(block_size), q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float32,))
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_long_sequence(dtype, causal):
    q, k, v = make_qkv(1, 1000, 1, 16, dtype=dtype, seed=8)
    check_attention(blockwise(96), q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_huge_logits(dtype, causal):
    q, k, v = make_qkv(2, 64, 2, 16, dtype=dtype, seed=9)
    out, lse = check_attention(blockwise(10), q, k, v, causal=causal, scale=30.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_float32_absolute_accuracy():
    q, k, v = make_qkv(2, 113, 2, 32, dtype=torch.float32, seed=10)
    out, lse = blockwise_attention(q, k, v, block_size=16, causal=True)
    ref_out, ref_lse = naive_attention(*to64(q, k, v), causal=True)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_output_and_lse_dtypes(dtype, causal):
    q, k, v = make_qkv(2, 10, 3, 8, 12, dtype=dtype, seed=11)
    out, lse = blockwise_attention(q, k, v, block_size=4, causal=causal)
    assert out.dtype == dtype and out.shape == (2, 10, 3, 8)
    assert lse.dtype == expected_lse_dtype(dtype) and lse.shape == (2, 3, 10)


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_q,n_k", [(9, 9), (1, 6), (13, 5), (5, 13)])
@pytest.mark.parametrize("block_size", [1, 4, 20])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_naive_float64(n_q, n_k, block_size, causal):
    seed = 100 * n_q + n_k
    q, k, v = make_qkv(2, n_q, 2, 4, n_k, seed=seed, requires_grad=True)
    g_out = randn(2, n_q, 2, 4, seed=seed + 7)
    g_lse = randn(2, 2, n_q, seed=seed + 8)

    def grads(fn):
        for x in (q, k, v):
            x.grad = None
        out, lse = fn(q, k, v, causal=causal)
        ((out * g_out).sum() + (lse * g_lse).sum()).backward()
        return [x.grad.clone() for x in (q, k, v)]

    got = grads(blockwise(block_size))
    ref = grads(naive_attention)
    for name, a, r in zip("qkv", got, ref):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")
    assert any(a.abs().max() > 1e-3 for a in got)


def test_gradcheck_float64():
    q, k, v = make_qkv(1, 5, 1, 3, 6, seed=12, requires_grad=True)

    def f(q, k, v):
        return blockwise_attention(q, k, v, block_size=2, causal=True, scale=0.7)

    assert torch.autograd.gradcheck(f, (q, k, v))


# --- attend_block and the trace --------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("q_offset,k_offset", [(0, 0), (4, 0), (0, 4), (3, 5), (10, 2)])
def test_attend_block_with_offsets(dtype, q_offset, k_offset):
    q, k, v = make_qkv(2, 6, 2, 8, 7, dtype=dtype, seed=13)
    out, lse = attend_block(q, k, v, scale=0.4, causal=True, q_offset=q_offset, k_offset=k_offset)
    assert out.dtype == lse.dtype == expected_lse_dtype(dtype)  # the accumulator dtype
    mask = causal_mask(6, 7, q_offset=q_offset, k_offset=k_offset)
    ref_out, ref_lse = naive_attention(*to64(q, k, v), mask=mask, scale=0.4)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_matches_reference(out, lse, ref_out, ref_lse, atol=tol, rtol=tol)
    empty = ~mask.any(-1)  # rows before the block's first key
    assert (out[:, empty] == 0).all() and torch.isneginf(lse[:, :, empty]).all()


def test_attend_block_gradients_finite_on_empty_rows():
    q, k, v = make_qkv(1, 4, 1, 3, 3, seed=14, requires_grad=True)
    out, lse = attend_block(q, k, v, scale=1.0, causal=True, q_offset=0, k_offset=2)  # queries 0, 1 see nothing
    assert torch.isneginf(lse[0, 0, :2]).all()
    merged, mlse = merge_partials(out, lse, out.detach() * 0, torch.full_like(lse, float("-inf")))
    (merged.sum() + torch.where(torch.isfinite(mlse), mlse, 0.0).sum()).backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[0, :2] == 0).all() and q.grad[0, 2:].abs().sum() > 0


def test_merging_attend_blocks_is_attention():
    q, k, v = make_qkv(2, 12, 2, 8, 12, seed=15)
    a = attend_block(q, k[:, :5], v[:, :5], scale=0.3, causal=True, k_offset=0)
    b = attend_block(q, k[:, 5:], v[:, 5:], scale=0.3, causal=True, k_offset=5)
    ref = naive_attention(q, k, v, causal=True, scale=0.3)
    assert_matches_reference(*merge_partials(*a, *b), *ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("n,block_size", [(1, 1), (10, 3), (33, 8), (16, 16), (5, 100)])
def test_online_softmax_trace_ends_at_logsumexp(n, block_size):
    scores = randn(n, seed=n, std=20.0)
    trace = online_softmax_trace(scores, block_size)
    assert len(trace) == -(-n // block_size)
    ms = [m for m, _ in trace]
    assert ms == sorted(ms)  # the running max never decreases
    for i, (m, l) in enumerate(trace):
        seen = scores[: (i + 1) * block_size]
        assert m == seen.max().item()
        assert l == pytest.approx(torch.exp(seen - seen.max()).sum().item(), rel=1e-12)
    m, l = trace[-1]
    assert m + torch.log(torch.tensor(l, dtype=torch.float64)).item() == pytest.approx(
        torch.logsumexp(scores, 0).item(), rel=1e-12
    )


# --- the 2x-rule helper itself can fail -------------------------------------------------------


def test_2x_rule_helper_rejects_a_bad_output():
    q, k, v = make_qkv(1, 32, 2, 16, dtype=torch.bfloat16, seed=16)
    ref_out, ref_lse = naive_attention(*to64(q, k, v))
    base_out, _ = naive_attention(q, k, v, precision="input")
    good, _ = blockwise_attention(q, k, v, block_size=8)
    assert_within_2x_rule(good, ref_out, base_out)
    bad = (good.double() + 0.05).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="error"):
        assert_within_2x_rule(bad, ref_out, base_out)
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_within_2x_rule(nan, ref_out, base_out)
    lse_wrong_inf = ref_lse.clone()
    lse_wrong_inf[0, 0, 0] = float("-inf")
    with pytest.raises(AssertionError, match="inf entries differ"):
        assert_within_2x_rule(lse_wrong_inf, ref_lse, ref_lse)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("positions", [False, True])
def test_attend_block_chunk_bounds_the_tile_without_changing_the_result(causal, positions):
    """chunk visits long key blocks a chunk at a time (the ring's O(n / w) memory); same out, lse and grads."""
    from ringbook.online_softmax import attend_block_backward

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 40, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    kw = dict(scale=0.4, causal=causal)
    if positions:  # strided positions, as in the striped layout
        kw.update(q_pos=torch.arange(40) * 3 + 1, k_pos=torch.arange(40) * 3)
    else:
        kw.update(q_offset=17, k_offset=5)
    ref = attend_block(q, k, v, **kw)
    got = attend_block(q, k, v, chunk=7, **kw)
    assert torch.allclose(got[0], ref[0], atol=1e-12) and torch.allclose(got[1], ref[1], atol=1e-12)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    g_ref = attend_block_backward(q, k, v, *ref, dout, **kw)
    g_got = attend_block_backward(q, k, v, *ref, dout, chunk=7, **kw)
    for a, b in zip(g_got, g_ref):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
