"""Ring-sharded dilated attention: the same function as dilated_attention for every ring size, its plan,
its communication, gradients, and refusals."""

import pytest
import torch
from helpers import assert_matches_reference, assert_within_2x_rule, make_qkv, rounding_atol, to64
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dilated import _kw, check_grads, configs

import ringbook
from ringbook import dilated, ring_dilated
from ringbook.dilated import dilated_attention, dilated_attention_dense
from ringbook.ring_dilated import dilated_ring_plan, ring_dilated_attention


def _ring_sizes(n):
    return [w for w in range(1, n + 1) if n % w == 0]


@settings(max_examples=25, deadline=None)
@given(configs(lengths=(8, 12, 16, 24, 36)), st.integers(0, 2 ** 16))
def test_every_ring_size_matches_dilated_and_dense(config, seed):
    n, seg, rates, mode, h, causal = config
    q, k, v = make_qkv(b=2, n_q=n, h=h, d=4, seed=seed)
    kw = _kw(seg, rates, mode, causal)
    ref_out, ref_lse = dilated_attention_dense(q, k, v, **kw)
    assert_matches_reference(*dilated_attention(q, k, v, **kw), ref_out, ref_lse)
    for w in _ring_sizes(n):
        comm = {}
        out, lse = ring_dilated_attention(q, k, v, ring_size=w, comm=comm, **kw)
        assert_matches_reference(out, lse, ref_out, ref_lse, what=f"ring_size={w}")
        plan = dilated_ring_plan(n, w, seg, rates, num_heads=h, heads=mode, causal=causal)
        assert comm["sent_elements"] == plan.sent_elements(2, 4)


@settings(max_examples=10, deadline=None)
@given(configs(lengths=(8, 12, 24)), st.integers(0, 2 ** 16), st.data())
def test_backward_matches_dense_reference(config, seed, data):
    w = data.draw(st.sampled_from(_ring_sizes(config[0])))
    check_grads(ring_dilated_attention, config, seed, ring_size=w)


@pytest.mark.parametrize("mode", ["all", "grouped"])
@pytest.mark.parametrize("causal", [False, True])
def test_seed_configuration_backward_every_ring_size(mode, causal):
    config = (32, [8, 16, 32], [1, 2, 4], mode, 8, causal)
    for w in (1, 2, 4, 8, 16, 32):
        check_grads(ring_dilated_attention, config, seed=w, ring_size=w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_within_twice_the_dense_error(dtype, causal):
    kw = _kw([32, 64, 128], [1, 2, 4], "grouped", causal)
    q, k, v = make_qkv(b=1, n_q=128, h=8, d=32, dtype=dtype, seed=11)
    ref_out, ref_lse = dilated_attention_dense(*to64(q, k, v), **kw)
    base_out, base_lse = dilated_attention_dense(q, k, v, precision="input", **kw)
    for w in (1, 4, 8):
        out, lse = ring_dilated_attention(q, k, v, ring_size=w, **kw)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert_within_2x_rule(out, ref_out, base_out, what=f"out ring_size={w}")
        assert_within_2x_rule(lse, ref_lse, base_lse, atol=rounding_atol(ref_lse, torch.float32), what="lse")


def test_no_head_group_skipped_and_no_segment_cut_to_the_shard():
    """The seed's bugs: segments longer than a shard were skipped (zero heads) or cut to the shard."""
    q, k, v = make_qkv(b=1, n_q=64, h=8, d=8, seed=9)
    kw = _kw([16, 32, 64], [1, 2, 4], "grouped", False)
    ref = dilated_attention(q, k, v, **kw)
    for w in (8, 16):  # shard 8 or 4 tokens: every segment spans several ranks
        out, lse = ring_dilated_attention(q, k, v, ring_size=w, **kw)
        assert_matches_reference(out, lse, *ref)
        assert (out.abs().amax(dim=(0, 1, 3)) > 0).all()  # every head computed
        plan = dilated_ring_plan(64, w, [16, 32, 64], [1, 2, 4], num_heads=8, heads="grouped")
        assert all(s.kind == "exchanged" for s in plan.segments)


def test_plan_marks_local_and_exchanged_segments():
    plan = dilated_ring_plan(64, 4, [8, 16, 32, 64], [1, 2, 2, 4], num_heads=4)
    assert plan.shard_len == 16
    by = {(s.pair, s.index): s for s in plan.segments}
    assert len(plan.segments) == 8 + 4 + 2 + 1
    for s in plan.segments:
        w = (8, 16, 32, 64)[s.pair]
        assert (s.start, s.stop) == (s.index * w, (s.index + 1) * w)
        if w <= 16:  # fits a shard (and 16 is a multiple of w): local, nothing sent
            assert s.kind == "local" and s.ranks == (s.start // 16,) and s.send_rows == (0,)
    assert by[(2, 0)].ranks == (0, 1) and by[(2, 1)].ranks == (2, 3) and by[(3, 0)].ranks == (0, 1, 2, 3)
    # 4 heads, r = 2 (offsets 0,1,0,1): each 16-token piece sends 8 rows per head; r = 4: 4 rows per head
    assert by[(2, 0)].send_rows == (32, 32) and by[(3, 0)].send_rows == (16, 16, 16, 16)
    assert by[(3, 0)].receivers == (3, 3, 3, 3)
    assert plan.segments_on(1, 0) == [by[(0, 2)], by[(0, 3)]]
    # every rank sends: pair 2 → 32 rows to 1 rank, pair 3 → 16 rows to 3 ranks; K and V, b=1, d=2
    assert plan.sent_elements(1, 2) == [2 * 2 * (32 + 48)] * 4
    # causal: a piece goes only to the later ranks of its segment
    causal = dilated_ring_plan(64, 4, [8, 16, 32, 64], [1, 2, 2, 4], num_heads=4, causal=True)
    assert [s.receivers for s in causal.segments if s.pair == 3] == [(3, 2, 1, 0)]


def test_plan_segment_not_aligned_with_shards():
    # shard 12, segment 8: segment 1 = [8, 16) straddles ranks 0 and 1 though it is shorter than a shard
    plan = dilated_ring_plan(24, 2, [8], [2], num_heads=3)
    assert [(s.ranks, s.kind) for s in plan.segments] == [((0,), "local"), ((0, 1), "exchanged"), ((1,), "local")]
    # pieces [8, 12) and [12, 16): offsets 0, 1, 0 keep 2 rows each per head
    assert plan.segments[1].send_rows == (6, 6)
    # odd pieces: shard 3, rate 2: rank 0 holds [0, 3) (offset 0: 2 rows, offset 1: 1 row)
    odd = dilated_ring_plan(12, 4, [6], [2], num_heads=2)
    assert odd.segments[0].ranks == (0, 1) and odd.segments[0].send_rows == (3, 3)
    q, k, v = make_qkv(b=1, n_q=12, h=2, d=4, seed=3)
    for causal in (False, True):
        assert_matches_reference(*ring_dilated_attention(q, k, v, segment_lengths=[6], dilation_rates=[2],
                                                         ring_size=4, causal=causal),
                                 *dilated_attention_dense(q, k, v, segment_lengths=[6], dilation_rates=[2],
                                                          causal=causal))


def test_only_dilated_keys_travel(monkeypatch):
    n, h, d = 64, 4, 8
    q, k, v = make_qkv(b=1, n_q=n, h=h, d=d, seed=1)
    comm = {}
    ring_dilated_attention(q, k, v, segment_lengths=[8, 16], dilation_rates=[1, 2], ring_size=4, comm=comm)
    assert comm == {"sent_elements": [0, 0, 0, 0], "messages": 0}  # every segment is local
    ring_dilated_attention(q, k, v, segment_lengths=[64], dilation_rates=[4], ring_size=4, comm=comm)
    # each rank's 16 tokens hold 4 kept rows per head, sent (K and V) to the 3 other ranks
    assert comm["sent_elements"] == [2 * 4 * h * d * 3] * 4
    assert sum(comm["sent_elements"]) < 2 * n * h * d * 3 / 4 + 1  # a quarter of undilated all-gather

    scores = []

    def counting(q, k, v, **kw):
        scores.append(q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1])
        return ringbook.attend_block(q, k, v, **kw)

    monkeypatch.setattr(dilated, "attend_block", counting)
    for w in (1, 4, 16):
        scores.clear()
        ring_dilated_attention(q, k, v, segment_lengths=[16, 64], dilation_rates=[2, 4], ring_size=w)
        assert sum(scores) == h * ((n // 16) * 8 ** 2 + 16 ** 2)  # the same dilated work at every ring size


def test_local_segments_need_no_inbox(monkeypatch):
    """A rank computes its local segments from its own shard alone: a ring of shards = the segments."""
    q, k, v = make_qkv(b=1, n_q=32, h=2, d=4, seed=6)
    kw = dict(segment_lengths=[8], dilation_rates=[2])
    monkeypatch.setattr(ring_dilated, "_dilated_rows", None)  # the exchange path is never entered
    assert_matches_reference(*ring_dilated_attention(q, k, v, ring_size=4, **kw), *dilated_attention(q, k, v, **kw))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(ring_size=5), ValueError, r"ring_size=5 does not divide sequence length 48; choose a divisor of 48"),
    (dict(ring_size=0), ValueError, "ring_size must be a positive int"),
    (dict(ring_size=2.0), TypeError, "ring_size must be a positive int"),
    (dict(ring_size=2, segment_lengths=[8, 32]), ValueError, r"segment_lengths\[1\]=32 does not divide"),
    (dict(ring_size=2, dilation_rates=[1, 5]), ValueError, r"dilation_rates\[1\]=5 does not divide"),
    (dict(ring_size=2, heads="grouped", segment_lengths=[8, 16, 48], dilation_rates=[1, 2, 4]), ValueError,
     "heads='grouped' needs at least one head per pair"),
])
def test_refused_configurations_name_the_argument(kwargs, error, message):
    q, k, v = make_qkv(b=1, n_q=48, h=2, d=4)
    kw = {"segment_lengths": [8, 16], "dilation_rates": [1, 2], **kwargs}
    with pytest.raises(error, match=message):
        ring_dilated_attention(q, k, v, **kw)


def test_benchmark_row_counts_dilated_work_and_checks_against_equation_d():
    from ringbook import bench

    assert bench.bench_dilated_config(16384)["segment_lengths"] == [2048, 4096, 8192]
    assert bench.bench_dilated_config(65536)["segment_lengths"] == [4096, 8192, 16384]
    assert bench.bench_dilated_config(131072)["segment_lengths"] == [8192, 16384, 32768]
    assert bench.bench_dilated_config(256) == {"segment_lengths": [32, 64, 128], "dilation_rates": [1, 2, 4]}
    cpu = dict(dtype=torch.float32, batch=1, heads=8, head_dim=16, device=torch.device("cpu"), warmup=1, repeats=3)
    impl = bench.IMPLS["ring_dilated"]
    assert impl.ring and "[1, 2, 4]" in impl.description and "did not state" in impl.description
    for causal in (False, True):
        row = bench.run_row(impl, seq_len=128, ring_size=4, causal=causal, **cpu)
        assert row["status"] == "ok", row["error"]
        assert row["max_rel_err"] < 1e-5 and row["checked_rows"] == 128
        # grouped 2:3:3 over (16, 1), (32, 2), (64, 4): (n/w)·(w/r)² scores per head
        scores = 2 * 8 * 16 ** 2 + 3 * 4 * 16 ** 2 + 3 * 2 * 16 ** 2
        assert row["flops"] == 4 * 16 * scores / (2 if causal else 1)
    # dense attention is not dilated attention: the row's own reference catches it
    dense = bench.Impl("dense", bench.IMPLS["naive"].fn, "test double", reference=impl.reference)
    row = bench.run_row(dense, seq_len=128, ring_size=1, causal=False, **cpu)
    assert row["status"] == "error" and "wrong result" in row["error"]
    # refused configurations become error rows that say why
    row = bench.run_row(impl, seq_len=100, ring_size=1, causal=False, **cpu)
    assert row["status"] == "error" and "multiple of 8" in row["error"] and row["flops"] is None
    row = bench.run_row(impl, seq_len=128, ring_size=3, causal=False, **cpu)
    assert row["status"] == "error" and "ring_size=3 does not divide sequence length 128" in row["error"]
    assert "ring_dilated" in bench.default_config("cpu").impls


@pytest.mark.parametrize("n, seg, rates", [
    (1, [1], [1]), (7, [7, 1], [7, 1]), (7, [7], [1]), (113, [113], [113]), (113, [113, 113], [1, 113]),
])
@pytest.mark.parametrize("causal", [False, True])
def test_awkward_sizes(n, seg, rates, causal):
    q, k, v = make_qkv(b=1, n_q=n, h=3, d=4, seed=n)
    kw = _kw(seg, rates, "all", causal)
    ref = dilated_attention_dense(q, k, v, **kw)
    assert_matches_reference(*dilated_attention(q, k, v, **kw), *ref)
    for w in _ring_sizes(n):
        assert_matches_reference(*ring_dilated_attention(q, k, v, ring_size=w, **kw), *ref, what=f"ring_size={w}")


@pytest.mark.parametrize("kwargs,message", [
    (dict(comm=[]), r"^comm must be a dict \(filled with sent_elements and messages\) or None, got list$"),
])
def test_bad_comm_refused_by_name(kwargs, message):
    """Before: AttributeError ('list' object has no attribute 'update')."""
    q, k, v = make_qkv(1, 8, 2, 2)
    with pytest.raises(TypeError, match=message):
        ring_dilated_attention(q, k, v, segment_lengths=[4], dilation_rates=[1], ring_size=2, **kwargs)
