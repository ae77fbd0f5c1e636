"""ring_attention (one process plays every rank) against the float64 reference,
forward and backward, every layout and ring size; it computes exactly the
schedule's blocks; and attend_block's explicit positions."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    LOW_PRECISION,
    assert_matches_reference,
    assert_within_2x_rule,
    check_attention,
    make_qkv,
    randn,
    rounding_atol,
    to64,
)

import ringbook
import ringbook.ring
from ringbook import LAYOUTS, attend_block, layout_positions, naive_attention, ring_attention, ring_schedule
from ringbook.naive import causal_mask, causal_mask_positions


@pytest.fixture(autouse=True)
def _one_thread():
    """The ring makes many tiny tensor ops; on a busy 2-core machine intra-op
    threads only add contention (measured 30x slower), so run them on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ring(ring_size, layout):
    return functools.partial(ring_attention, ring_size=ring_size, layout=layout)


def fitting_n(w: int, layout: str, k: int) -> int:
    """A sequence length that ``layout`` deals to ``w`` ranks (k tokens per piece)."""
    return 2 * w * k if layout == "zigzag" else w * k


# --- float64: exact against the reference ----------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("w", range(1, 9))
@pytest.mark.parametrize("causal", [False, True])
def test_float64_matches_reference(layout, w, causal):
    n = fitting_n(w, layout, k=3 if layout == "zigzag" else 5)
    q, k, v = make_qkv(2, n, 2, 8, seed=10 * w + len(layout))
    out, lse = check_attention(ring(w, layout), q, k, v, causal=causal)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("layout,n,w", [
    ("contiguous", 1, 1), ("striped", 1, 1), ("zigzag", 2, 1),  # one token
    ("contiguous", 7, 7), ("striped", 7, 7), ("zigzag", 14, 7),  # one token per rank (piece)
    ("contiguous", 113, 1), ("striped", 113, 1),  # prime length
    ("contiguous", 1000, 8), ("striped", 1000, 8), ("zigzag", 1000, 5),
])
@pytest.mark.parametrize("causal", [False, True])
def test_awkward_sizes(layout, n, w, causal):
    q, k, v = make_qkv(1, n, 1, 8, seed=n + w)
    check_attention(ring(w, layout), q, k, v, causal=causal)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", [0.3, -1.5, 30.0])
def test_scale_and_huge_logits(layout, scale):
    q, k, v = make_qkv(2, 24, 2, 16, seed=3, std=3.0)
    out, lse = check_attention(ring(3, layout), q, k, v, causal=True, scale=scale, atol64=1e-9)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_layouts_and_ring_sizes_agree():
    q, k, v = make_qkv(2, 48, 2, 8, seed=4)
    ref = ring_attention(q, k, v, ring_size=1, causal=True)
    for layout in LAYOUTS:
        for w in (2, 3, 4, 6):
            got = ring_attention(q, k, v, ring_size=w, causal=True, layout=layout)
            assert_matches_reference(*got, *ref, atol=1e-12, rtol=1e-12, what=f"{layout} w={w}")


# --- low precision: the 2x rule --------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("w", [1, 3, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_2x_rule(dtype, layout, w, causal):
    q, k, v = make_qkv(2, 96, 2, 32, dtype=dtype, seed=w + 7)
    out, lse = check_attention(ring(w, layout), q, k, v, causal=causal)
    assert out.dtype == dtype and lse.dtype == torch.float32  # float32 accumulators


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_float32_absolute_accuracy(layout, causal):
    """float32 merges up to 2w partials per row, so hold it to an absolute bound, not the 2x rule."""
    q, k, v = make_qkv(2, 96, 2, 32, dtype=torch.float32, seed=10)
    out, lse = ring_attention(q, k, v, ring_size=8, causal=causal, layout=layout)
    assert out.dtype == lse.dtype == torch.float32
    ref_out, ref_lse = naive_attention(*to64(q, k, v), causal=causal)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=1e-5)


# --- gradients -------------------------------------------------------------------------------


def _grads(fn, q, k, v, g_out, g_lse, causal):
    for x in (q, k, v):
        x.grad = None
    out, lse = fn(q, k, v, causal=causal)
    ((out * g_out).sum() + (lse * g_lse).sum()).backward()
    return [x.grad.clone() for x in (q, k, v)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("w", range(1, 9))
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_naive_float64(layout, w, causal):
    n = fitting_n(w, layout, k=2)
    seed = 100 * w + len(layout)
    q, k, v = make_qkv(1, n, 2, 4, seed=seed, requires_grad=True)
    g_out, g_lse = randn(1, n, 2, 4, seed=seed + 7), randn(1, 2, n, seed=seed + 8)
    got = _grads(ring(w, layout), q, k, v, g_out, g_lse, causal)
    ref = _grads(naive_attention, q, k, v, g_out, g_lse, causal)
    for name, a, r in zip("qkv", got, ref):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")
    assert all(a.abs().max() > 1e-3 for a in got)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(layout):
    q, k, v = make_qkv(1, 6, 1, 3, seed=12, requires_grad=True)

    def f(q, k, v):
        return ring_attention(q, k, v, ring_size=3 if layout != "zigzag" else 1, causal=True, layout=layout,
                              scale=0.7)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_gradients_2x_rule(dtype, layout):
    n, w, causal = 64, 4, True
    q, k, v = make_qkv(1, n, 2, 16, dtype=dtype, seed=21, requires_grad=True)
    g_out, g_lse = randn(1, n, 2, 16, seed=22), randn(1, 2, n, seed=23)
    got = _grads(ring(w, layout), q, k, v, g_out.to(dtype), g_lse.float(), causal)
    base = _grads(functools.partial(naive_attention, precision="input"), q, k, v, g_out.to(dtype), g_lse.float(), causal)
    q64, k64, v64 = (x.requires_grad_(True) for x in to64(q, k, v))
    ref = _grads(naive_attention, q64, k64, v64, g_out, g_lse, causal)
    for name, a, b, r in zip("qkv", got, base, ref):
        assert a.dtype == dtype
        assert_within_2x_rule(a, r, b, atol=rounding_atol(r, dtype), what=f"d{name}")


# --- it computes exactly the schedule's blocks -----------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("w", [1, 2, 4, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_computes_exactly_the_scheduled_blocks(monkeypatch, layout, w, causal):
    """Count attend_block calls: one per scheduled block, none for a skipped (fully masked) one."""
    n = fitting_n(w, layout, k=3)
    calls = []

    def counting(q, k, v, **kw):
        calls.append((tuple(kw["q_pos"].tolist()), tuple(kw["k_pos"].tolist()), kw["causal"]))
        return attend_block(q, k, v, **kw)

    monkeypatch.setattr(ringbook.ring, "attend_block", counting)
    q, k, v = make_qkv(1, n, 1, 4, seed=w)
    assert_matches_reference(*ring_attention(q, k, v, ring_size=w, causal=causal, layout=layout),
                             *naive_attention(q, k, v, causal=causal))

    pos = layout_positions(n, w, layout)
    expected = []
    for row in ring_schedule(n, w, layout=layout, causal=causal):
        for step in row:
            for blk in step.blocks:
                expected.append((tuple(pos[step.rank][slice(*blk.q)].tolist()),
                                 tuple(pos[step.kv_rank][slice(*blk.kv)].tolist()), blk.kind == "causal"))
    assert calls == expected  # same blocks, same order (step by step, rank by rank)
    for q_pos, k_pos, masked in calls:
        keep = causal_mask_positions(torch.tensor(q_pos), torch.tensor(k_pos))
        assert keep.any() if causal else keep.numel() > 0  # never a fully masked block
        assert masked == (causal and not keep.all())  # the mask only where it is needed
    n_pairs = sum(len(a) * len(b) for a, b, _ in calls)
    skipped = sum(blk.area for row in ring_schedule(n, w, layout=layout, causal=causal)
                  for step in row for blk in step.skipped)
    assert n_pairs + skipped == n * n
    if causal and (layout == "zigzag" or layout == "contiguous" and w > 1):
        assert skipped > 0 and n_pairs < n * n  # work was really saved


def test_wrong_shard_held_is_caught(monkeypatch):
    """The loop checks the shard it holds against the schedule's kv_rank."""
    real = ringbook.ring.ring_schedule

    def swapped(*args, **kwargs):
        sched = real(*args, **kwargs)
        return [sched[1], sched[0]] + sched[2:]

    monkeypatch.setattr(ringbook.ring, "ring_schedule", swapped)
    q, k, v = make_qkv(1, 6, 1, 4)
    with pytest.raises(AssertionError, match="step 0: rank 0 holds shard 0, schedule says 2"):
        ring_attention(q, k, v, ring_size=3)


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if any block is computed (errors must come before any work)."""
    def boom(*args, **kwargs):
        raise AssertionError("attend_block was called before the input was validated")

    monkeypatch.setattr(ringbook.ring, "attend_block", boom)


@pytest.mark.parametrize("n,w,layout,msg", [
    (72, 5, "contiguous", r"ring_size=5 does not fit sequence length 72 .*ring_size = 5 must divide 72; "
                          r"ring sizes that work: \[1, 2, 3, 4, 6, 8, 9, 12, 18, 24, 36\]"),
    (36, 4, "zigzag", r"2·ring_size = 8 must divide 36; ring sizes that work: \[1, 2, 3, 6, 9, 18\]"),
    (10, 4, "striped", r"ring_size = 4 must divide 10"),
])
def test_non_dividing_ring_size(no_compute, n, w, layout, msg):
    q, k, v = make_qkv(1, n, 1, 4)
    with pytest.raises(ValueError, match=msg):
        ring_attention(q, k, v, ring_size=w, layout=layout)


def test_seq_q_differs_from_seq_k(no_compute):
    q, k, v = make_qkv(1, 8, 1, 4, n_k=12)
    with pytest.raises(ValueError, match="same sequence length.*seq_q=8 and seq_k=12"):
        ring_attention(q, k, v, ring_size=2)


@pytest.mark.parametrize("kwargs,err,msg", [
    ({"ring_size": 0}, ValueError, "ring_size must be a positive int"),
    ({"ring_size": 2.0}, TypeError, "ring_size must be a positive int"),
    ({"ring_size": True}, TypeError, "ring_size must be a positive int"),
    ({"ring_size": 2, "layout": "spiral"}, ValueError, "layout must be one of"),
    ({"ring_size": 2, "causal": 1}, TypeError, "causal must be True or False"),
    ({"ring_size": 2, "scale": float("nan")}, ValueError, "scale must be finite"),
])
def test_bad_options(no_compute, kwargs, err, msg):
    q, k, v = make_qkv(1, 8, 1, 4)
    with pytest.raises(err, match=msg):
        ring_attention(q, k, v, **kwargs)


def test_qkv_are_validated(no_compute):
    q, k, v = make_qkv(1, 8, 1, 4)
    with pytest.raises(TypeError, match=r"^k must be a torch\.Tensor"):
        ring_attention(q, k.numpy(), v, ring_size=2)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        ring_attention(q[0], k, v, ring_size=2)
    with pytest.raises(TypeError, match="v has dtype torch.float32 but q has torch.float64"):
        ring_attention(q, k, v.float(), ring_size=2)
    with pytest.raises(ValueError, match="v has head_dim=3 but q has head_dim=4"):
        ring_attention(q, k, v[..., :3], ring_size=2)


# --- attend_block with explicit positions ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_attend_block_with_positions(dtype):
    q, k, v = make_qkv(2, 6, 2, 8, 5, dtype=dtype, seed=30)
    q_pos = torch.tensor([1, 4, 7, 10, 13, 16])  # a striped shard
    k_pos = torch.tensor([2, 3, 9, 12, 20])
    out, lse = attend_block(q, k, v, scale=0.4, causal=True, q_pos=q_pos, k_pos=k_pos)
    mask = causal_mask_positions(q_pos, k_pos)
    assert mask.tolist()[0] == [False] * 5 and 0 < mask.sum() < mask.numel()
    ref_out, ref_lse = naive_attention(*to64(q, k, v), mask=mask, scale=0.4)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_matches_reference(out, lse, ref_out, ref_lse, atol=tol, rtol=tol)
    assert (out[:, 0] == 0).all() and torch.isneginf(lse[:, :, 0]).all()  # query 1 sees no key


def test_attend_block_positions_match_offsets():
    q, k, v = make_qkv(1, 5, 2, 4, 7, seed=31)
    by_offset = attend_block(q, k, v, scale=0.5, causal=True, q_offset=3, k_offset=1)
    by_pos = attend_block(q, k, v, scale=0.5, causal=True, q_pos=torch.arange(3, 8), k_pos=torch.arange(1, 8))
    only_k = attend_block(q, k, v, scale=0.5, causal=True, q_offset=3, k_pos=torch.arange(1, 8))
    for got in (by_pos, only_k):
        assert_matches_reference(*got, *by_offset, atol=0, rtol=0)
    assert torch.equal(causal_mask_positions(torch.arange(3, 8), torch.arange(1, 8)),
                       causal_mask(5, 7, q_offset=3, k_offset=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_low_precision_gradients_are_summed_in_float32_and_rounded_once(dtype, layout):
    """Regression (found by notebook 04): block gradients of a shard were summed in half precision,
    so the error grew with the ring size. The ring must equal a float32 run rounded once."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(1, 64, 2, 16, generator=g).to(dtype)
    out, _ = ring_attention(q, k, v, ring_size=8, layout=layout, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out32, _ = ring_attention(q32, k32, v32, ring_size=8, layout=layout, causal=True)
    grads32 = torch.autograd.grad(out32, (q32, k32, v32), dout.float())
    assert torch.equal(out, out32.to(dtype))
    for got, ref in zip(grads, grads32):
        assert got.dtype == dtype and torch.equal(got, ref.to(dtype))
