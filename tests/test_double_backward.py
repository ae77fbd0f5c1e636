"""Second derivatives (``create_graph=True``): exact on the einops paths, refused on the custom-Function ones.

* ``torch.autograd.gradgradcheck`` (float64, fast mode) on small cases of every
  einops path: merge_partials (rows empty on one or both sides, sides far
  apart), attend_block, naive, blockwise, ring (every layout), dilated and
  ring dilated (several pairs, heads all/grouped, rows no pattern keeps);
* Hessian-vector products against the float64 reference for the whole grid
  (every layout, causal and not, ring sizes 1..4; dilated heads all/grouped,
  ring sizes 1..4) — the same second derivatives at 1e-10, never NaN;
* production_ring_attention (dense and dilated) and kernels.block_attention
  raise a clear RuntimeError under ``create_graph=True`` (the multi-process
  rings are checked in tests/test_distributed.py), and stay once differentiable.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_qkv, randn
from torch.autograd import gradgradcheck

import ringbook
from ringbook.fast import kernels
from ringbook.schedule import LAYOUTS

NEG_INF = float("-inf")


def _qkv(b, n, h, d, seed=0, n_k=None):
    return make_qkv(b, n, h, d, n_k=n_k, seed=seed, requires_grad=True)


def _ggc(fn, *inputs):
    assert gradgradcheck(fn, inputs, fast_mode=True, raise_exception=True)


def _hvp(fn, q, k, v, seed=0):
    """``H·r`` of the scalar ``<out, dout> + <lse, dlse>`` for fixed random ``dout``, ``dlse``, ``r``: float64."""
    out, lse = fn(q, k, v)
    dout = randn(*out.shape, seed=seed + 10)
    dlse = randn(*lse.shape, seed=seed + 11)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse), create_graph=True)
    rs = [randn(*x.shape, seed=seed + 12 + i) for i, x in enumerate((q, k, v))]
    second = torch.autograd.grad(sum((g * r).sum() for g, r in zip(grads, rs)), (q, k, v))
    for x, name in zip(second, "qkv"):
        assert not torch.isnan(x).any(), f"d²/d{name}: NaN"
    return second


def _assert_same_hvp(fn, ref, q, k, v, seed=0):
    got, want = _hvp(fn, q, k, v, seed), _hvp(ref, q, k, v, seed)
    for g, w, name in zip(got, want, "qkv"):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=lambda m: f"d²/d{name}: {m}")


# --------------------------------------------------------------------------- the issue's example


def test_issue_example_zigzag_second_derivative_is_finite():
    q, k, v = (randn(1, 4, 1, 2, seed=s, requires_grad=True) for s in range(3))
    out, _ = ringbook.ring_attention(q, k, v, ring_size=1, layout="zigzag")
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), q)
    out_ref, _ = ringbook.naive_attention(q, k, v)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), q, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.sum(), q)
    assert not torch.isnan(gg).any()
    torch.testing.assert_close(gg, gg_ref, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- merge_partials, attend_block, naive


def _partial(seed, empty=(), lse_offset=0.0):
    out = randn(1, 3, 2, 2, seed=seed, requires_grad=False)
    lse = randn(1, 2, 3, seed=seed + 1) + lse_offset
    for h, i in empty:
        lse[0, h, i] = NEG_INF
        out[0, i, h] = 0.0
    return out.requires_grad_(), lse.requires_grad_()


@pytest.mark.parametrize("case", ["finite", "one_side_empty", "both_empty", "far_apart"])
def test_merge_partials_gradgradcheck(case):
    """-inf on a side (an accumulator row still empty) gave NaN second derivatives through logaddexp; so did
    sides further apart than the exponent range (e^{b-a} overflows in logaddexp's backward)."""
    empty_a = {"one_side_empty": [(0, 1), (1, 2)], "both_empty": [(0, 1), (1, 0)]}.get(case, [])
    empty_b = {"one_side_empty": [(1, 0)], "both_empty": [(0, 1), (1, 1)]}.get(case, [])
    a = _partial(0, empty_a)
    b = _partial(5, empty_b, lse_offset=-800.0 if case == "far_apart" else 0.0)
    _ggc(ringbook.merge_partials, *a, *b)


def test_merge_partials_second_derivative_finite_far_apart():
    a, b = _partial(0), _partial(5, lse_offset=-800.0)
    out, lse = ringbook.merge_partials(*a, *b)
    g = torch.autograd.grad(lse.sum() + out.sum(), (a[1], b[1]), create_graph=True)
    gg = torch.autograd.grad(sum(x.sum() for x in g), (a[1], b[1]), allow_unused=True)
    assert all(x is None or not torch.isnan(x).any() for x in gg)


@pytest.mark.parametrize("q_offset,k_offset", [(0, 0), (0, 3), (2, 0)])
def test_attend_block_gradgradcheck_with_empty_rows(q_offset, k_offset):
    """k_offset 3: queries 0..2 see no key of the block (out 0, lse -inf): no 0/0 or log 0 in the graph."""
    q, k, v = _qkv(1, 4, 1, 2, seed=1, n_k=3)
    _ggc(lambda q, k, v: ringbook.attend_block(q, k, v, scale=0.7, causal=True, q_offset=q_offset,
                                               k_offset=k_offset), q, k, v)


def test_attend_block_chunked_gradgradcheck():
    q, k, v = _qkv(1, 3, 1, 2, seed=2, n_k=5)
    _ggc(lambda q, k, v: ringbook.attend_block(q, k, v, scale=0.5, causal=True, q_offset=2, chunk=2), q, k, v)


def test_naive_gradgradcheck_with_a_row_that_sees_nothing():
    q, k, v = _qkv(1, 4, 1, 2, seed=3)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    _ggc(lambda q, k, v: ringbook.naive_attention(q, k, v, mask=mask, causal=True), q, k, v)


# --------------------------------------------------------------------------- blockwise, ring


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_gradgradcheck(causal):
    q, k, v = _qkv(1, 5, 1, 2, seed=4, n_k=4)
    _ggc(lambda q, k, v: ringbook.blockwise_attention(q, k, v, block_size=3, causal=causal), q, k, v)


@pytest.mark.parametrize("block_size", [1, 2, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_hvp_matches_naive(causal, block_size):
    q, k, v = _qkv(2, 5, 2, 3, seed=5)
    _assert_same_hvp(lambda q, k, v: ringbook.blockwise_attention(q, k, v, block_size=block_size, causal=causal),
                     lambda q, k, v: ringbook.naive_attention(q, k, v, causal=causal), q, k, v)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_gradgradcheck(layout):
    """Causal, two ranks; the grid of layouts × causal × ring sizes 1..4 is covered by the products below."""
    q, k, v = _qkv(1, 4, 1, 2, seed=6)
    _ggc(lambda q, k, v: ringbook.ring_attention(q, k, v, ring_size=2, layout=layout, causal=True), q, k, v)


@pytest.mark.parametrize("w", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_hvp_matches_naive(layout, causal, w):
    q, k, v = _qkv(1, 2 * w, 2, 2, seed=7 + w)
    _assert_same_hvp(lambda q, k, v: ringbook.ring_attention(q, k, v, ring_size=w, layout=layout, causal=causal),
                     lambda q, k, v: ringbook.naive_attention(q, k, v, causal=causal), q, k, v, seed=w)


# --------------------------------------------------------------------------- dilated, ring dilated

# Several pairs; (8, 4) keeps a quarter of each segment, so with heads="grouped" some rows are kept by no pattern.
DILATED = dict(segment_lengths=[2, 4, 8], dilation_rates=[1, 2, 4])


@pytest.mark.parametrize("heads", ["all", "grouped"])
def test_dilated_gradgradcheck(heads):
    q, k, v = _qkv(1, 8, 3, 1, seed=8)
    _ggc(lambda q, k, v: ringbook.dilated_attention(q, k, v, **DILATED, causal=True, heads=heads), q, k, v)


def test_dilated_dense_gradgradcheck():
    q, k, v = _qkv(1, 8, 3, 1, seed=9)
    _ggc(lambda q, k, v: ringbook.dilated_attention_dense(q, k, v, **DILATED, causal=True, heads="grouped"), q, k, v)


def test_ring_dilated_gradgradcheck():
    """Grouped heads, two ranks (segments local and exchanged); the grid is covered by the products below."""
    q, k, v = _qkv(1, 8, 3, 1, seed=10)
    _ggc(lambda q, k, v: ringbook.ring_dilated_attention(q, k, v, **DILATED, ring_size=2, causal=True,
                                                         heads="grouped"), q, k, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", ["all", "grouped"])
def test_dilated_hvp_matches_dense(heads, causal):
    q, k, v = _qkv(2, 8, 3, 2, seed=11)
    ref = lambda q, k, v: ringbook.dilated_attention_dense(q, k, v, **DILATED, causal=causal, heads=heads)  # noqa: E731
    _assert_same_hvp(lambda q, k, v: ringbook.dilated_attention(q, k, v, **DILATED, causal=causal, heads=heads),
                     ref, q, k, v)


@pytest.mark.parametrize("w", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", ["all", "grouped"])
def test_ring_dilated_hvp_matches_dense(heads, causal, w):
    n = 24 if w == 3 else 8
    config = dict(segment_lengths=[2, 4, 8], dilation_rates=[1, 2, 4]) if n == 8 else \
        dict(segment_lengths=[4, 12], dilation_rates=[2, 3])
    q, k, v = _qkv(1, n, 3, 1, seed=12 + w)
    ref = lambda q, k, v: ringbook.dilated_attention_dense(q, k, v, **config, causal=causal, heads=heads)  # noqa: E731
    _assert_same_hvp(lambda q, k, v: ringbook.ring_dilated_attention(q, k, v, **config, ring_size=w, causal=causal,
                                                                      heads=heads), ref, q, k, v, seed=w)


# --------------------------------------------------------------------------- custom autograd Functions refuse


PRODUCTION = {
    "dense": lambda q, k, v: ringbook.production_ring_attention(q, k, v, ring_size=2, causal=True),
    "gqa": lambda q, k, v: ringbook.production_ring_attention(q, k[:, :, :1], v[:, :, :1], ring_size=2),
    "dilated": lambda q, k, v: ringbook.production_ring_attention(q, k, v, ring_size=2, causal=True, **DILATED),
    "block_attention": lambda q, k, v: kernels.block_attention(q, k, v, scale=0.5, causal=True),
}


@pytest.mark.parametrize("name", list(PRODUCTION))
def test_custom_function_paths_refuse_create_graph(name):
    q, k, v = _qkv(1, 8, 2, 2, seed=13)
    out, lse = PRODUCTION[name](q, k, v)
    what = "ringbook.fast.kernels.block_attention" if name == "block_attention" else "production_ring_attention"
    with pytest.raises(RuntimeError, match=rf"^{what}.* is once differentiable: .*create_graph=True.* is refused"):
        torch.autograd.grad((out.sum() + lse.sum()), (q, k, v), create_graph=True)
    # first order still works, and matches the reference
    out, lse = PRODUCTION[name](q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is not None and not torch.isnan(g).any() for g in grads)


@pytest.mark.parametrize("backend,words", [("einops", "einops block backward"), ("auto", "fused backward kernels")])
def test_the_refusal_names_the_backward_that_runs(backend, words):
    """Before: the einops backend's refusal said it ran "fused backward kernels"."""
    q, k, v = _qkv(1, 8, 2, 2, seed=14)
    out, lse = ringbook.production_ring_attention(q, k, v, ring_size=2, causal=True, backend=backend)
    with pytest.raises(RuntimeError, match=words):
        torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
