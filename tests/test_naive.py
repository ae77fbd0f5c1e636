"""naive_attention, the reference, against torch's own attention and explicit scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from helpers import (
    ALL_DTYPES,
    LOW_PRECISION,
    assert_matches_reference,
    expected_lse_dtype,
    make_qkv,
    max_err,
    randn,
    to64,
)

from ringbook import causal_mask, naive_attention

SHAPES = [(1, 1), (7, 7), (113, 113), (7, 113), (113, 7), (1, 9), (9, 1)]


def sdpa(q, k, v, **kwargs):
    """torch's attention in ``b n h d`` (it wants ``b h n d``)."""
    out = F.scaled_dot_product_attention(*(rearrange(x, "b n h d -> b h n d") for x in (q, k, v)), **kwargs)
    return rearrange(out, "b h n d -> b n h d")


def explicit_scores(q, k, scale):
    return einsum(q, k, "b i h d, b j h d -> b h i j") * scale


@pytest.mark.parametrize("n_q,n_k", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa_float64(n_q, n_k, causal):
    q, k, v = make_qkv(2, n_q, 3, 16, n_k, seed=n_q * 1000 + n_k)
    out, lse = naive_attention(q, k, v, causal=causal)
    ref = sdpa(q, k, v, is_causal=causal)  # is_causal is top-left aligned, like ours
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    mask = causal_mask(n_q, n_k) if causal else None
    s = explicit_scores(q, k, 1 / math.sqrt(16))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("scale", [0.05, 1.0, -0.7, 3.0])
def test_scale_matches_sdpa_and_lse(scale):
    q, k, v = make_qkv(2, 13, 2, 8, 11, seed=11)
    out, lse = naive_attention(q, k, v, scale=scale)
    torch.testing.assert_close(out, sdpa(q, k, v, scale=scale), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(explicit_scores(q, k, scale), -1), atol=1e-12, rtol=1e-12)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 9, 2, 16, seed=3)
    out, lse = naive_attention(q, k, v)
    out_s, lse_s = naive_attention(q, k, v, scale=0.25)
    assert torch.equal(out, out_s) and torch.equal(lse, lse_s)
    out_1, _ = naive_attention(q, k, v, scale=1.0)
    assert (out_1 - out).abs().max() > 1e-3  # the scale actually matters


def test_lse_is_natural_log_of_sum_exp():
    q, k, v = make_qkv(1, 5, 1, 4, 6, seed=4)
    _, lse = naive_attention(q, k, v, scale=0.5)
    s = explicit_scores(q, k, 0.5)
    torch.testing.assert_close(lse, torch.log(torch.exp(s).sum(-1)), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "mask_shape", ["2d", (1, 1, "i", "j"), ("b", 1, "i", "j"), (1, "h", "i", "j"), ("b", "h", "i", "j"), ("b", 1, 1, "j")]
)
@pytest.mark.parametrize("causal", [False, True])
def test_mask_matches_sdpa_and_explicit_softmax(mask_shape, causal):
    b, n_q, h, d, n_k = 2, 10, 3, 8, 12
    q, k, v = make_qkv(b, n_q, h, d, n_k, seed=21)
    sizes = {"b": b, "h": h, "i": n_q, "j": n_k}
    shape = (n_q, n_k) if mask_shape == "2d" else tuple(sizes.get(s, s) for s in mask_shape)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(shape, generator=g) < 0.6
    mask[..., 0] = True  # every row keeps a key, so torch's SDPA (NaN on empty rows) is comparable
    assert not mask.all()
    out, lse = naive_attention(q, k, v, mask=mask, causal=causal)

    keep = mask.expand(b, h, n_q, n_k)
    if causal:
        keep = keep & causal_mask(n_q, n_k)
    ref = sdpa(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    s = explicit_scores(q, k, d**-0.5).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-12, rtol=1e-12)


def test_causal_is_top_left_aligned():
    # Query i sees keys 0..i, whatever the lengths (like SDPA's is_causal).
    for n_q, n_k in [(5, 9), (9, 5), (6, 6)]:
        q, k, v = make_qkv(1, n_q, 2, 4, n_k, seed=n_q + n_k)
        out, lse = naive_attention(q, k, v, causal=True)
        for i in range(n_q):
            o_i, l_i = naive_attention(q[:, i:i + 1], k[:, : i + 1], v[:, : i + 1])
            torch.testing.assert_close(out[:, i:i + 1], o_i, atol=1e-13, rtol=1e-13)
            torch.testing.assert_close(lse[..., i:i + 1], l_i, atol=1e-13, rtol=1e-13)


def test_causal_mask_values_and_offsets():
    m = causal_mask(3, 4)
    assert m.dtype == torch.bool
    assert m.tolist() == [[True, False, False, False], [True, True, False, False], [True, True, True, False]]
    assert torch.equal(causal_mask(5, 5), torch.ones(5, 5, dtype=torch.bool).tril())
    # offsets: query positions 4..5, key positions 3..6
    m = causal_mask(2, 4, q_offset=4, k_offset=3)
    assert m.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert not causal_mask(2, 3, q_offset=0, k_offset=5).any()


def test_fully_masked_row_gives_zero_and_neg_inf():
    b, n_q, h, d, n_k = 2, 6, 2, 8, 9
    q, k, v = make_qkv(b, n_q, h, d, n_k, seed=31)
    mask = torch.ones(n_q, n_k, dtype=torch.bool)
    mask[2] = False
    mask[4, ::2] = False
    out, lse = naive_attention(q, k, v, mask=mask)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    assert torch.isneginf(lse[:, :, 2]).all()
    assert torch.isfinite(lse[:, :, [0, 1, 3, 4, 5]]).all()
    # Other rows are unaffected by the empty one.
    rows = [0, 1, 3, 4, 5]
    o_ref, l_ref = naive_attention(q[:, rows], k, v, mask=mask[rows])
    torch.testing.assert_close(out[:, rows], o_ref, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(lse[:, :, rows], l_ref, atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_fully_masked_row_low_precision_and_input_precision(dtype):
    q, k, v = make_qkv(1, 4, 2, 8, 5, dtype=dtype, seed=32)
    mask = torch.ones(1, 2, 4, 5, dtype=torch.bool)
    mask[0, 1, 3] = False  # head 1, query 3 sees nothing
    for precision in ("float64", "input"):
        out, lse = naive_attention(q, k, v, mask=mask, precision=precision)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert (out[0, 3, 1] == 0).all() and torch.isneginf(lse[0, 1, 3])
        assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(lse[0, 1, :3]).all()


def test_gradient_finite_with_fully_masked_row():
    q, k, v = make_qkv(1, 5, 2, 4, 6, seed=33, requires_grad=True)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[1] = False
    out, lse = naive_attention(q, k, v, mask=mask)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[:, 1] == 0).all()  # the empty row has no gradient to give
    assert q.grad.abs().sum() > 0


def test_causal_more_queries_than_keys_is_finite():
    q, k, v = make_qkv(2, 20, 2, 8, 6, seed=34)
    out, lse = naive_attention(q, k, v, causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # rows at or past the last key see every key: same as non-causal there
    o_full, l_full = naive_attention(q, k, v)
    torch.testing.assert_close(out[:, 5:], o_full[:, 5:], atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(lse[..., 5:], l_full[..., 5:], atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("causal", [False, True])
def test_huge_logits_stay_finite_and_correct(causal):
    q, k, v = make_qkv(2, 33, 2, 16, seed=35, std=3.0)  # |logits| in the hundreds at scale 30
    out, lse = naive_attention(q, k, v, scale=30.0, causal=causal)
    s = explicit_scores(q, k, 30.0)
    if causal:
        s = s.masked_fill(~causal_mask(33, 33), float("-inf"))
    assert s.abs()[torch.isfinite(s)].max() > 1000  # exp() would overflow without the max trick
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, sdpa(q, k, v, scale=30.0, is_causal=causal), atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("precision", ["float64", "input"])
def test_output_and_lse_dtypes(dtype, precision):
    q, k, v = make_qkv(2, 5, 2, 8, 3, dtype=dtype, seed=36)
    out, lse = naive_attention(q, k, v, precision=precision)
    assert out.dtype == dtype and out.shape == (2, 5, 2, 8)
    assert lse.dtype == expected_lse_dtype(dtype) and lse.shape == (2, 2, 5)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_float64_precision_is_the_reference_rounded(dtype):
    # precision="float64" on low-precision input = the float64 reference on the same values, rounded once.
    q, k, v = make_qkv(2, 17, 2, 8, dtype=dtype, seed=37)
    out, lse = naive_attention(q, k, v, causal=True)
    ref_out, ref_lse = naive_attention(*to64(q, k, v), causal=True)
    assert torch.equal(out, ref_out.to(dtype))
    assert torch.equal(lse, ref_lse.to(expected_lse_dtype(dtype)))


@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float32,))
def test_input_precision_is_a_lower_precision_baseline(dtype):
    q, k, v = make_qkv(2, 64, 2, 32, dtype=dtype, seed=38)
    ref_out, ref_lse = naive_attention(*to64(q, k, v))
    out_in, lse_in = naive_attention(q, k, v, precision="input")
    out_64, _ = naive_attention(q, k, v)
    err_in, err_64 = max_err(out_in, ref_out), max_err(out_64, ref_out)
    eps = torch.finfo(dtype).eps
    assert err_64 <= eps  # one rounding of values |x| < 1
    assert 0 < err_in < 20 * eps  # low-precision arithmetic: worse, but within a few ulps
    assert max_err(lse_in, ref_lse) < 20 * eps * ref_lse.abs().max().item() + 1e-6


def test_input_precision_float64_equals_reference():
    q, k, v = make_qkv(2, 9, 2, 8, 11, seed=39)
    out, lse = naive_attention(q, k, v, causal=True)
    out_in, lse_in = naive_attention(q, k, v, causal=True, precision="input")
    assert_matches_reference(out_in, lse_in, out, lse, atol=1e-14, rtol=1e-14)


def test_long_sequence_cheap():
    q, k, v = make_qkv(1, 1000, 1, 8, seed=40)
    for causal in (False, True):
        out, lse = naive_attention(q, k, v, causal=causal)
        torch.testing.assert_close(out, sdpa(q, k, v, is_causal=causal), atol=1e-12, rtol=1e-12)
        assert torch.isfinite(lse).all()


def test_gradcheck_float64():
    q, k, v = make_qkv(1, 4, 2, 3, 5, seed=41, requires_grad=True)
    mask = causal_mask(4, 5, k_offset=-1)

    def f(q, k, v):
        return naive_attention(q, k, v, mask=mask, scale=0.8)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradients_match_sdpa():
    q, k, v = make_qkv(2, 9, 2, 8, 7, seed=42, requires_grad=True)
    g = randn(2, 9, 2, 8, seed=43)
    (naive_attention(q, k, v, causal=True)[0] * g).sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    (sdpa(q, k, v, is_causal=True) * g).sum().backward()
    for a, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(a, x.grad, atol=1e-12, rtol=1e-12)
