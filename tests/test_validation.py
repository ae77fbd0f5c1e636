"""Bad input raises TypeError/ValueError that names the argument and says what was expected."""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch
from helpers import make_qkv, randn

from ringbook import blockwise_attention, merge_partials, naive_attention

ATTENTION = {
    "naive": naive_attention,
    "blockwise": functools.partial(blockwise_attention, block_size=4),
}
attention_fns = pytest.mark.parametrize("fn", list(ATTENTION.values()), ids=list(ATTENTION))


def qkv(**kw):
    return make_qkv(2, 5, 3, 8, 6, seed=1, **kw)


# --- q, k, v ---------------------------------------------------------------------------------


@attention_fns
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("bad", [[[1.0]], np.ones((2, 5, 3, 8)), None, 3.0], ids=["list", "ndarray", "None", "float"])
def test_non_tensor_input(fn, which, bad):
    args = list(qkv())
    args[which] = bad
    name = "qkv"[which]
    with pytest.raises(TypeError, match=rf"^{name} must be a torch\.Tensor, got {type(bad).__name__}"):
        fn(*args)


@attention_fns
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtype(fn, dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"^k must have a floating dtype .*got {re.escape(str(dtype))}"):
        fn(q, k.to(dtype), v)


@attention_fns
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("shape", [(5, 3, 8), (2, 5, 3, 8, 1), (40,)])
def test_wrong_number_of_dimensions(fn, which, shape):
    args = list(qkv())
    args[which] = randn(*shape, seed=2)
    name = "qkv"[which]
    with pytest.raises(ValueError, match=rf"^{name} must have 4 dimensions \(batch, seq, heads, head_dim.*got {len(shape)}"):
        fn(*args)


@attention_fns
@pytest.mark.parametrize("which", [1, 2])
def test_dtype_mismatch(fn, which):
    args = list(qkv())
    args[which] = args[which].float()
    name = "qkv"[which]
    with pytest.raises(TypeError, match=rf"^{name} has dtype torch\.float32 but q has torch\.float64"):
        fn(*args)


@attention_fns
@pytest.mark.parametrize("which", [0, 1, 2])
def test_device_mismatch(fn, which):
    args = list(qkv())
    args[which] = args[which].to("meta")
    if which == 0:
        pattern = r"^k is on cpu but q is on meta"
    else:
        pattern = rf"^{'qkv'[which]} is on meta but q is on cpu"
    with pytest.raises(ValueError, match=pattern):
        fn(*args)


@attention_fns
@pytest.mark.parametrize(
    "which,axis,what",
    [(1, 0, "batch"), (2, 0, "batch"), (1, 2, "heads"), (2, 2, "heads"), (1, 3, "head_dim"), (2, 3, "head_dim")],
)
def test_batch_heads_head_dim_mismatch(fn, which, axis, what):
    args = list(qkv())
    shape = list(args[which].shape)
    shape[axis] += 1
    args[which] = randn(*shape, seed=3)
    name = "qkv"[which]
    with pytest.raises(ValueError, match=rf"^{name} has {what}={shape[axis]} but q has {what}={shape[axis] - 1}"):
        fn(*args)


@attention_fns
def test_k_v_length_mismatch(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^k and v must have the same sequence length, got k 6 and v 7"):
        fn(q, k, randn(2, 7, 3, 8, seed=4))


# --- options ---------------------------------------------------------------------------------


@attention_fns
@pytest.mark.parametrize("scale", ["0.1", torch.tensor(0.1), True, [0.1], 1j])
def test_scale_wrong_type(fn, scale):
    with pytest.raises(TypeError, match=r"^scale must be a real number or None"):
        fn(*qkv(), scale=scale)


@attention_fns
@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_scale_not_finite(fn, scale):
    with pytest.raises(ValueError, match=r"^scale must be finite"):
        fn(*qkv(), scale=scale)


@attention_fns
@pytest.mark.parametrize("scale", [np.float32(0.5), 2, np.float64(0.25)])
def test_scale_accepts_real_numbers(fn, scale):
    out, _ = fn(*qkv(), scale=scale)
    ref, _ = naive_attention(*qkv(), scale=float(scale))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@attention_fns
@pytest.mark.parametrize("causal", [1, "yes", None, torch.tensor(True)])
def test_causal_must_be_bool(fn, causal):
    with pytest.raises(TypeError, match=r"^causal must be True or False"):
        fn(*qkv(), causal=causal)


@pytest.mark.parametrize("block_size", [0, -1, -128])
def test_block_size_not_positive(block_size):
    with pytest.raises(ValueError, match=rf"^block_size must be a positive int, got {block_size}$"):
        blockwise_attention(*qkv(), block_size=block_size)


@pytest.mark.parametrize("block_size", [2.5, 4.0, "4", None, True])
def test_block_size_not_int(block_size):
    with pytest.raises(TypeError, match=r"^block_size must be a positive int"):
        blockwise_attention(*qkv(), block_size=block_size)


def test_block_size_required():
    with pytest.raises(TypeError, match="block_size"):
        blockwise_attention(*qkv())


def test_block_size_accepts_numpy_int():
    out, _ = blockwise_attention(*qkv(), block_size=np.int64(3))
    torch.testing.assert_close(out, naive_attention(*qkv())[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("precision", ["float32", "fp64", None, "INPUT"])
def test_naive_bad_precision(precision):
    with pytest.raises(ValueError, match=r"^precision must be 'float64' or 'input'"):
        naive_attention(*qkv(), precision=precision)


# --- mask --------------------------------------------------------------------------------------

# q is (b, n_q, h, d) = (2, 5, 3, 8), k has n_k = 6.


@pytest.mark.parametrize(
    "shape",
    [(5, 5), (6, 5), (6, 6), (1, 6), (5, 1), (5,), (3, 5, 6), (2, 3, 5, 7), (2, 4, 5, 6), (3, 1, 5, 6), (1, 1, 1, 5, 6)],
)
def test_mask_wrong_shape(shape):
    mask = torch.ones(shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^mask must be \(seq_q, seq_k\) = \(5, 6\) or broadcastable to "
                                         r"\(batch, heads, seq_q, seq_k\) = \(2, 3, 5, 6\), got shape"):
        naive_attention(*qkv(), mask=mask)


@pytest.mark.parametrize("shape", [(5, 6), (1, 1, 5, 6), (2, 1, 5, 6), (1, 3, 5, 6), (2, 3, 5, 6), (2, 1, 1, 6),
                                   (1, 1, 5, 1)])
def test_mask_good_shapes_accepted(shape):
    mask = torch.ones(shape, dtype=torch.bool)
    out, lse = naive_attention(*qkv(), mask=mask)
    ref_out, ref_lse = naive_attention(*qkv())
    assert out.shape == ref_out.shape and torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.uint8])
def test_mask_wrong_dtype(dtype):
    mask = torch.ones(5, 6, dtype=dtype)
    with pytest.raises(TypeError, match=rf"^mask must have dtype torch\.bool \(True = attend\), got {re.escape(str(dtype))}"):
        naive_attention(*qkv(), mask=mask)


@pytest.mark.parametrize("mask", [[[True] * 6] * 5, np.ones((5, 6), dtype=bool), True])
def test_mask_not_a_tensor(mask):
    with pytest.raises(TypeError, match=r"^mask must be a boolean torch\.Tensor or None"):
        naive_attention(*qkv(), mask=mask)


def test_mask_wrong_device():
    mask = torch.ones(5, 6, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"^mask is on meta but q is on cpu"):
        naive_attention(*qkv(), mask=mask)


# --- merge_partials -------------------------------------------------------------------------


def partials():
    out = randn(2, 5, 3, 8, seed=5)
    lse = randn(2, 3, 5, seed=6)
    return out, lse, randn(2, 5, 3, 8, seed=7), randn(2, 3, 5, seed=8)


@pytest.mark.parametrize("which,name", [(0, "out_a"), (1, "lse_a"), (2, "out_b"), (3, "lse_b")])
def test_merge_non_tensor(which, name):
    args = list(partials())
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=rf"^{name} must be a torch\.Tensor, got list"):
        merge_partials(*args)


@pytest.mark.parametrize("which,name", [(0, "out_a"), (1, "lse_a"), (2, "out_b"), (3, "lse_b")])
def test_merge_non_float(which, name):
    args = list(partials())
    args[which] = args[which].long()
    with pytest.raises(TypeError, match=rf"^{name} must have a floating dtype"):
        merge_partials(*args)


@pytest.mark.parametrize("which,name,ndim", [(0, "out_a", 4), (1, "lse_a", 3), (2, "out_b", 4), (3, "lse_b", 3)])
def test_merge_wrong_ndim(which, name, ndim):
    args = list(partials())
    args[which] = args[which][0]
    with pytest.raises(ValueError, match=rf"^{name} must have {ndim} dimensions"):
        merge_partials(*args)


@pytest.mark.parametrize("tag", ["a", "b"])
def test_merge_lse_shape_must_match_out(tag):
    out_a, lse_a, out_b, lse_b = partials()
    bad = randn(2, 5, 3, seed=9)  # b n h instead of b h n
    args = (out_a, bad, out_b, lse_b) if tag == "a" else (out_a, lse_a, out_b, bad)
    with pytest.raises(ValueError, match=rf"^lse_{tag} must have shape \(batch, heads, seq\) = \(2, 3, 5\) "
                                         rf"to match out_{tag}"):
        merge_partials(*args)


def test_merge_out_shapes_must_match():
    out_a, lse_a, _, _ = partials()
    out_b, lse_b = randn(2, 4, 3, 8, seed=10), randn(2, 3, 4, seed=11)
    with pytest.raises(ValueError, match=r"^out_a \(2, 5, 3, 8\) and out_b \(2, 4, 3, 8\) must have the same shape"):
        merge_partials(out_a, lse_a, out_b, lse_b)


@pytest.mark.parametrize("which", [1, 2, 3])
def test_merge_device_mismatch(which):
    args = list(partials())
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=r"^all partials must be on one device, got cpu and meta"):
        merge_partials(*args)


@pytest.mark.parametrize("shape", [(3, 1, 5, 6), (1, 2, 5, 6), (2, 2, 5, 6)])
def test_mask_may_not_grow_batch_or_heads(shape):
    # A batch-3 mask must not silently turn a batch-1 q into a batch-3 output.
    q, k, v = make_qkv(1, 5, 1, 8, 6, seed=12)
    mask = torch.ones(shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^mask must be .*\(batch, heads, seq_q, seq_k\) = \(1, 1, 5, 6\), "
                                         rf"got shape {re.escape(str(shape))}"):
        naive_attention(q, k, v, mask=mask)


# --- the zero-size rule (ringbook._utils.check_qkv), every implementation ---------------------

import ringbook  # noqa: E402

EVERY = {
    "naive": naive_attention,
    "blockwise": functools.partial(blockwise_attention, block_size=2),
    "ring_contiguous": functools.partial(ringbook.ring_attention, ring_size=2),
    "ring_zigzag": functools.partial(ringbook.ring_attention, ring_size=2, layout="zigzag"),
    "ring_striped": functools.partial(ringbook.ring_attention, ring_size=2, layout="striped"),
    "production": functools.partial(ringbook.production_ring_attention, ring_size=2),
    "production_zigzag": functools.partial(ringbook.production_ring_attention, ring_size=2, causal=True),
    "dilated": functools.partial(ringbook.dilated_attention, segment_lengths=[4], dilation_rates=[2]),
    "dilated_dense": functools.partial(ringbook.dilated_attention_dense, segment_lengths=[4], dilation_rates=[2]),
    "ring_dilated": functools.partial(ringbook.ring_dilated_attention, segment_lengths=[4], dilation_rates=[2],
                                      ring_size=2),
    "production_dilated": functools.partial(ringbook.production_ring_attention, ring_size=2, segment_lengths=[4],
                                            dilation_rates=[2]),
}
every_fn = pytest.mark.parametrize("fn", list(EVERY.values()), ids=list(EVERY))
DIMS = [(0, "batch", "at least one sequence in the batch"), (1, "seq", "at least one token"),
        (2, "heads", "at least one head"), (3, "head_dim", r"head_dim >= 1 \(at least one feature per head\)")]


@every_fn
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("axis,dim,needs", DIMS, ids=[d[1] for d in DIMS])
def test_zero_size_dimension_refused_everywhere(fn, which, axis, dim, needs):
    """Before: IndexError (amax), RuntimeError, torch.cat ValueError, ZeroDivisionError or an empty output."""
    args = list(make_qkv(1, 8, 2, 4, seed=1))
    shape = list(args[which].shape)
    shape[axis] = 0
    args[which] = torch.zeros(shape, dtype=torch.float64)
    name = "qkv"[which]
    with pytest.raises(ValueError, match=rf"^{name} has {dim}=0 \(shape {re.escape(str(tuple(shape)))}\); "
                                         rf"attention needs {needs}$"):
        fn(*args)


def test_zero_size_message_as_documented():
    q = torch.zeros(1, 0, 2, 8)
    with pytest.raises(ValueError) as info:
        naive_attention(q, q, q)
    assert str(info.value) == "q has seq=0 (shape (1, 0, 2, 8)); attention needs at least one token"


def test_production_zero_heads_gets_the_zero_size_message_not_the_gqa_one():
    q, k, v = make_qkv(1, 4, 2, 4, seed=2)
    with pytest.raises(ValueError, match=r"^k has heads=0 \(shape \(1, 4, 0, 4\)\)"):
        ringbook.production_ring_attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match=r"^q has heads=0"):
        ringbook.production_ring_attention(q[:, :, :0], k, v)


def test_production_messages_name_production_ring_attention():
    q, k, v = make_qkv(1, 4, 2, 4, n_k=6, seed=3)
    with pytest.raises(ValueError, match=r"^production_ring_attention needs q and k of the same sequence length"):
        ringbook.production_ring_attention(q, k, v)


@every_fn
def test_numpy_bool_accepted_as_causal(fn):
    """Before: 'causal must be True or False, got bool np.True_'."""
    q, k, v = make_qkv(1, 8, 2, 4, seed=4)
    for flag in (True, False):
        want = fn(q, k, v, causal=flag)
        got = fn(q, k, v, causal=np.bool_(flag))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("causal", [np.int64(1), np.float64(1.0), np.array(True), np.array([True])])
def test_numpy_non_bool_still_refused_as_causal(causal):
    with pytest.raises(TypeError, match=r"^causal must be True or False"):
        naive_attention(*qkv(), causal=causal)
