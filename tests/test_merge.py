"""merge_partials, equation (M): algebra (hypothesis), stability, empty rows, and
that merging attention over parts of a key set gives attention over the whole."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_matches_reference, make_qkv, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from ringbook import causal_mask, merge_partials, naive_attention

NEG_INF = float("-inf")

shapes = st.tuples(
    st.integers(1, 2),  # b
    st.integers(1, 6),  # n
    st.integers(1, 3),  # h
    st.integers(1, 5),  # d
)
seeds = st.integers(0, 2**31 - 1)


def make_partial(shape, seed, *, dtype=torch.float64, offset=0.0, spread=3.0, empty_frac=0.0):
    """A random partial (out ``b n h d``, lse ``b h n``); a fraction of rows is empty (lse -inf)."""
    b, n, h, d = shape
    out = randn(b, n, h, d, seed=seed, dtype=dtype)
    lse = (randn(b, h, n, seed=seed + 1) * spread + offset).to(dtype)
    if empty_frac > 0:
        g = torch.Generator().manual_seed(seed + 2)
        lse = lse.masked_fill(torch.rand(b, h, n, generator=g) < empty_frac, NEG_INF)
    return out, lse


def empty_partial(shape, dtype=torch.float64):
    b, n, h, d = shape
    return torch.zeros(b, n, h, d, dtype=dtype), torch.full((b, h, n), NEG_INF, dtype=dtype)


def assert_no_nan(out, lse):
    assert not torch.isnan(out).any(), "out has NaN"
    assert not torch.isnan(lse).any(), "lse has NaN"


def reference_merge(out_a, lse_a, out_b, lse_b):
    """Equation (M) written out directly in float64 (for rows with a finite side)."""
    out_a, lse_a, out_b, lse_b = (x.to(torch.float64) for x in (out_a, lse_a, out_b, lse_b))
    m = torch.maximum(lse_a, lse_b)
    lse = m + torch.log(torch.exp(lse_a - m) + torch.exp(lse_b - m))
    w_a = torch.exp(lse_a - lse).permute(0, 2, 1).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).permute(0, 2, 1).unsqueeze(-1)
    return w_a * out_a + w_b * out_b, lse


# --- algebra ---------------------------------------------------------------------------------


@given(shape=shapes, seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]),
       empty_frac=st.sampled_from([0.0, 0.3, 1.0]))
def test_commutative(shape, seed, dtype, empty_frac):
    a = make_partial(shape, seed, dtype=dtype, empty_frac=empty_frac)
    b = make_partial(shape, seed + 10, dtype=dtype, empty_frac=empty_frac)
    out_ab, lse_ab = merge_partials(*a, *b)
    out_ba, lse_ba = merge_partials(*b, *a)
    assert_no_nan(out_ab, lse_ab)
    assert torch.equal(out_ab, out_ba)
    assert torch.equal(lse_ab, lse_ba)


@given(shape=shapes, seed=seeds, empty_frac=st.sampled_from([0.0, 0.4]),
       offsets=st.tuples(*[st.sampled_from([-50.0, 0.0, 20.0])] * 3))
def test_associative(shape, seed, empty_frac, offsets):
    a, b, c = (make_partial(shape, seed + 10 * i, offset=offsets[i], empty_frac=empty_frac) for i in range(3))
    left = merge_partials(*merge_partials(*a, *b), *c)
    right = merge_partials(*a, *merge_partials(*b, *c))
    assert_no_nan(*left)
    assert_matches_reference(*left, *right, atol=1e-12, rtol=1e-12)


@given(shape=shapes, seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]),
       offset=st.sampled_from([0.0, 1e4, -1e4]), empty_frac=st.sampled_from([0.0, 0.5]))
def test_empty_partial_is_exact_identity(shape, seed, dtype, offset, empty_frac):
    a = make_partial(shape, seed, dtype=dtype, offset=offset, empty_frac=empty_frac)
    e = empty_partial(shape, dtype)
    for out, lse in (merge_partials(*a, *e), merge_partials(*e, *a)):
        assert torch.equal(out, a[0].masked_fill(torch.isneginf(a[1]).permute(0, 2, 1).unsqueeze(-1), 0.0))
        assert torch.equal(lse, a[1])


@given(shape=shapes, seed=seeds)
def test_identity_ignores_the_out_of_an_empty_side(shape, seed):
    # lse = -inf means "no keys": its out has weight exactly 0, whatever it holds.
    a = make_partial(shape, seed)
    junk = randn(*shape, seed=seed + 5) * 1e6
    out, lse = merge_partials(*a, junk, torch.full_like(a[1], NEG_INF))
    assert torch.equal(out, a[0]) and torch.equal(lse, a[1])


@given(shape=shapes, seed=seeds)
def test_matches_equation_m(shape, seed):
    a = make_partial(shape, seed, spread=10.0)
    b = make_partial(shape, seed + 10, spread=10.0)
    out, lse = merge_partials(*a, *b)
    ref_out, ref_lse = reference_merge(*a, *b)
    assert_matches_reference(out, lse, ref_out, ref_lse, atol=1e-13, rtol=1e-13)


@given(shape=shapes, seed=seeds)
def test_same_out_on_both_sides_is_kept(shape, seed):
    # The weights are a convex combination: they sum to 1.
    out_a, lse_a = make_partial(shape, seed)
    _, lse_b = make_partial(shape, seed + 10)
    out, lse = merge_partials(out_a, lse_a, out_a.clone(), lse_b)
    torch.testing.assert_close(out, out_a, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(lse, torch.logaddexp(lse_a, lse_b), atol=1e-14, rtol=1e-14)


# --- stability -------------------------------------------------------------------------------


@given(shape=shapes, seed=seeds, off_a=st.sampled_from([-1e4, -5e3, 0.0, 1e4]),
       delta=st.sampled_from([-30.0, -1.0, 0.0, 2.5, 40.0]))
def test_stable_for_huge_lse_float64(shape, seed, off_a, delta):
    # Shifting both lse by C shifts the merged lse by C and leaves out unchanged.
    out_a, lse_a = make_partial(shape, seed, spread=1.0)
    out_b, lse_b = make_partial(shape, seed + 10, spread=1.0)
    lse_b = lse_b + delta
    out, lse = merge_partials(out_a, lse_a + off_a, out_b, lse_b + off_a)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    out0, lse0 = merge_partials(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, out0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse - off_a, lse0, atol=1e-9, rtol=0)


@given(shape=shapes, seed=seeds, off=st.sampled_from([-1e4, 1e4]), sign=st.sampled_from([-1.0, 1.0]))
def test_stable_for_huge_lse_float32(shape, seed, off, sign):
    a = make_partial(shape, seed, dtype=torch.float32, offset=off, spread=2.0)
    b = make_partial(shape, seed + 10, dtype=torch.float32, offset=off + sign * 3.0, spread=2.0)
    out, lse = merge_partials(*a, *b)
    assert out.dtype == lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref_out, ref_lse = reference_merge(*a, *b)
    # lse near 1e4 carries float32's absolute resolution ~1e-3, so do the weights.
    ulp = 1e4 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(lse.double(), ref_lse, atol=4 * ulp, rtol=0)
    torch.testing.assert_close(out.double(), ref_out, atol=8 * ulp * ref_out.abs().max().item(), rtol=0)


@given(shape=shapes, seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_one_side_negligible(shape, seed, dtype):
    # lse_a - lse_b = 2e4: exp(-2e4) underflows to 0, the merge must return side a, not NaN/inf.
    a = make_partial(shape, seed, dtype=dtype, offset=1e4, spread=0.5)
    b = make_partial(shape, seed + 10, dtype=dtype, offset=-1e4, spread=0.5)
    for out, lse in (merge_partials(*a, *b), merge_partials(*b, *a)):
        assert torch.equal(lse, a[1])
        assert torch.equal(out, a[0])


# --- empty rows ------------------------------------------------------------------------------


@given(shape=shapes, seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_both_empty_gives_zero_and_neg_inf(shape, seed, dtype):
    out_a, lse_a = make_partial(shape, seed, dtype=dtype, empty_frac=0.5)
    out_b, lse_b = make_partial(shape, seed + 10, dtype=dtype, empty_frac=0.5)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert_no_nan(out, lse)
    both = torch.isneginf(lse_a) & torch.isneginf(lse_b)  # b h n
    assert torch.equal(torch.isneginf(lse), both)
    assert torch.isfinite(lse[~both]).all()
    rows = both.permute(0, 2, 1)  # b n h
    assert (out[rows] == 0).all()  # even though out_a/out_b hold random values there
    assert torch.isfinite(out).all()


def test_all_rows_empty():
    shape = (2, 3, 2, 4)
    out, lse = merge_partials(randn(*shape, seed=1), torch.full((2, 2, 3), NEG_INF, dtype=torch.float64),
                              randn(*shape, seed=2), torch.full((2, 2, 3), NEG_INF, dtype=torch.float64))
    assert torch.equal(out, torch.zeros(shape, dtype=torch.float64))
    assert torch.isneginf(lse).all()


def test_gradients_finite_with_empty_rows():
    shape = (1, 4, 2, 3)
    out_a, lse_a = make_partial(shape, 7, empty_frac=0.5)
    out_b, lse_b = make_partial(shape, 8)
    lse_b[0, 0, 1] = NEG_INF
    lse_a[0, 0, 1] = NEG_INF  # row (head 0, query 1) is empty on both sides
    leaves = [x.clone().requires_grad_(True) for x in (out_a, lse_a, out_b, lse_b)]
    out, lse = merge_partials(*leaves)
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    for x in leaves:
        assert torch.isfinite(x.grad).all()
    assert leaves[1].grad[0, 0, 1] == 0 and leaves[3].grad[0, 0, 1] == 0


def test_gradcheck_float64():
    shape = (1, 3, 2, 2)
    leaves = [x.requires_grad_(True) for x in (*make_partial(shape, 11), *make_partial(shape, 12))]
    assert torch.autograd.gradcheck(merge_partials, tuple(leaves))


# --- attention over parts of the keys --------------------------------------------------------


@settings(max_examples=25)
@given(n_q=st.integers(1, 9), n_k=st.integers(2, 12), frac=st.floats(0.0, 1.0), causal=st.booleans(),
       seed=seeds, scale=st.sampled_from([None, 0.1, 30.0]))
def test_halves_of_the_keys_merge_to_the_whole(n_q, n_k, frac, causal, seed, scale):
    split = min(max(1, round(frac * n_k)), n_k - 1)
    q, k, v = make_qkv(2, n_q, 2, 4, n_k, seed=seed % 10_000)
    ref_out, ref_lse = naive_attention(q, k, v, causal=causal, scale=scale)

    def part(lo, hi):
        mask = causal_mask(n_q, hi - lo, k_offset=lo) if causal else None
        return naive_attention(q, k[:, lo:hi], v[:, lo:hi], mask=mask, scale=scale)

    out, lse = merge_partials(*part(0, split), *part(split, n_k))
    assert_no_nan(out, lse)
    assert_matches_reference(out, lse, ref_out, ref_lse, atol=1e-12, rtol=1e-12)


@settings(max_examples=20)
@given(n_k=st.integers(3, 20), data=st.data(), seed=seeds)
def test_any_partition_in_any_order_merges_to_the_whole(n_k, data, seed):
    q, k, v = make_qkv(1, 5, 2, 4, n_k, seed=seed % 10_000)
    cuts = sorted(data.draw(st.sets(st.integers(1, n_k - 1), max_size=4)))
    bounds = list(zip([0, *cuts], [*cuts, n_k]))
    order = data.draw(st.permutations(bounds))
    out, lse = empty_partial(q.shape)
    for lo, hi in order:
        out, lse = merge_partials(out, lse, *naive_attention(q, k[:, lo:hi], v[:, lo:hi], causal=False))
    ref_out, ref_lse = naive_attention(q, k, v)
    assert_matches_reference(out, lse, ref_out, ref_lse, atol=1e-12, rtol=1e-12)


# --- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_out_float32_lse(dtype):
    shape = (2, 9, 2, 8)
    out_a, lse_a = make_partial(shape, 21, spread=5.0)
    out_b, lse_b = make_partial(shape, 22, spread=5.0)
    out, lse = merge_partials(out_a.to(dtype), lse_a.float(), out_b.to(dtype), lse_b.float())
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = reference_merge(out_a.to(dtype), lse_a.float(), out_b.to(dtype), lse_b.float())
    # computed in float32, then rounded once to the output dtype
    eps = torch.finfo(dtype).eps
    assert (out.double() - ref_out).abs().max() <= eps * ref_out.abs().max()
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)


def test_mixed_dtypes_promote():
    shape = (1, 4, 2, 3)
    out_a, lse_a = make_partial(shape, 31)
    out_b, lse_b = make_partial(shape, 32)
    out, lse = merge_partials(out_a.float(), lse_a.float(), out_b, lse_b.float())
    assert out.dtype == torch.float64 and lse.dtype == torch.float32
    ref_out, _ = reference_merge(out_a.float(), lse_a.float(), out_b, lse_b.float())
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    assert math.isfinite(lse.sum().item())
