"""production_ring_attention and its kernels against the float64 references (CPU: the einops kernels).

On the CPU the block kernel is the einops path, but the production ring's
own logic — ranks stacked in the batch, the doubled K/V window, the
batched launches of :func:`production_plan`, the fused in-place merge, the
ring backward and grouped-query heads — is the same code that runs on a
GPU, so it is checked here exactly (float64, 1e-10). The CUDA kernels are
checked by ``tools/gpu_check_production.py``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_reference, assert_within_2x_rule, make_qkv, randn
from hypothesis import given
from hypothesis import strategies as st

import ringbook
from ringbook.fast import engine, kernels, merge, plans, stacked
from ringbook.fast.plans import production_plan
from ringbook.fast.tuning import Tuning
from ringbook.schedule import layout_positions, ring_schedule

B, H, HKV, D = 2, 4, 2, 8


def _expand(x, heads=H):
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def _inputs(n, *, hkv=HKV, dtype=torch.float64, seed=0):
    q, k, v = make_qkv(B, n, H, D, dtype=dtype, seed=seed)
    return q, k[:, :, :hkv].contiguous(), v[:, :, :hkv].contiguous()


# --------------------------------------------------------------------------- the plan is the schedule

def _visible(n, w, layout, causal, blocks_of):
    """(w, w, c, c) bool: at step t rank r computes score (i, j) of its shard × the held shard."""
    pos = layout_positions(n, w, layout)
    c = n // w
    seen = torch.zeros(w, w, c, c, dtype=torch.bool)
    for t in range(w):
        for r in range(w):
            src = (r - t) % w
            for (q0, q1), (k0, k1), kind in blocks_of(t, r):
                keep = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
                if kind == "causal":
                    keep = pos[src, k0:k1][None, :] <= pos[r, q0:q1][:, None]
                seen[t, r, q0:q1, k0:k1] |= keep
    return seen


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("w", [1, 2, 3, 5])
def test_plan_computes_exactly_the_schedules_blocks(layout, causal, w):
    n = 4 * w
    sched = ring_schedule(n, w, layout=layout, causal=causal)
    plan = production_plan(n, w, layout=layout, causal=causal)
    want = _visible(n, w, layout, causal, lambda t, r: [(b.q, b.kv, b.kind) for b in sched[t][r].blocks])
    got = _visible(n, w, layout, causal, lambda t, r: [(x.q, x.kv, x.kind) for x in plan[t] if x.ranks[0] <= r < x.ranks[1]])
    assert torch.equal(got, want)
    assert all(1 <= len(step) <= 2 for step in plan)
    (first,) = plan[0]  # step 0 initialises every row of every rank
    assert first.ranks == (0, w) and first.q == (0, n // w)
    # a causal launch is diagonal: every rank's held shard is its own, positions increasing
    pos = layout_positions(n, w, layout)
    assert all(x.kind == "full" for step in plan[1:] for x in step)
    assert all(bool((pos[r, 1:] > pos[r, :-1]).all()) for r in range(w))


# --------------------------------------------------------------------------- forward and backward

@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("w", [1, 2, 3, 4, 8])
def test_matches_naive_float64(layout, causal, w):
    q, k, v = _inputs(2 * w * 3, hkv=H)
    out, lse = ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, layout=layout)
    ref_out, ref_lse = ringbook.naive_attention(q, k, v, causal=causal)
    assert out.dtype == q.dtype and lse.dtype == torch.float64
    assert_matches_reference(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("layout,causal", [("contiguous", False), ("contiguous", True), ("zigzag", True)])
def test_grouped_query_heads_match_naive_on_expanded_kv(hkv, layout, causal):
    q, k, v = _inputs(24, hkv=hkv, seed=3)
    out, lse = ringbook.production_ring_attention(q, k, v, ring_size=3, causal=causal, layout=layout, scale=0.3)
    ref_out, ref_lse = ringbook.naive_attention(q, _expand(k), _expand(v), causal=causal, scale=0.3)
    assert_matches_reference(out, lse, ref_out, ref_lse)


def test_default_layout_and_ring_attention_agree():
    q, k, v = _inputs(32, hkv=H, seed=5)
    for causal in (False, True):
        got = ringbook.production_ring_attention(q, k, v, ring_size=4, causal=causal)
        want = ringbook.ring_attention(q, k, v, ring_size=4, causal=causal, layout="zigzag" if causal else "contiguous")
        assert_matches_reference(*got, *want)


@pytest.mark.parametrize("layout,causal,w", [("contiguous", False, 1), ("contiguous", False, 4), ("contiguous", True, 3),
                                             ("zigzag", True, 4), ("zigzag", False, 2), ("zigzag", True, 1)])
@pytest.mark.parametrize("hkv", [H, 1])
def test_backward_float64_matches_naive(layout, causal, w, hkv):
    q, k, v = _inputs(2 * w * 3, hkv=hkv, seed=7)
    n = q.shape[1]
    dout, dlse = randn(B, n, H, D, seed=11), randn(B, H, n, seed=12)
    grads = []
    for fn in ("production", "naive"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        if fn == "production":
            o, l = ringbook.production_ring_attention(*xs, ring_size=w, causal=causal, layout=layout)
        else:
            o, l = ringbook.naive_attention(xs[0], _expand(xs[1]), _expand(xs[2]), causal=causal)
        ((o * dout).sum() + (l * dlse).sum()).backward()
        grads.append([x.grad for x in xs])
    for name, got, want in zip("qkv", *grads):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-10), f"d{name}: {(got - want).abs().max():.3g}"


@pytest.mark.parametrize("doubled", [False, True])
@pytest.mark.parametrize("w", [2, 3, 4])
def test_wrapping_launches_read_the_held_shards_doubled_or_split(w, doubled):
    """Every piece of every launch reads, for each of its ranks, the shard that rank holds at step t."""
    b, c = 2, 6
    for layout, causal in [("contiguous", False), ("contiguous", True), ("zigzag", True)]:
        plan = production_plan(w * c, w, layout=layout, causal=causal)
        for t, launches in enumerate(plan):
            for launch in launches:
                blocks = plans._pieces(launch, t, w, b, doubled)
                assert len(blocks) == (2 if plans._wraps(launch, t, w) and not doubled else 1)
                assert not (causal and plans._wraps(launch, t, w)), "causal plans never wrap"
                for blk in blocks:
                    ranks = range(blk.at.q_batch[0] // b, blk.at.q_batch[1] // b)
                    held = range(blk.at.kv_batch[0] // b, blk.at.kv_batch[1] // b)
                    assert [s % w for s in held] == [(r - t) % w for r in ranks]
                    assert blk.kernel.causal == (launch.kind == "causal")
                    assert (blk.at.q, blk.at.kv) == (launch.q, launch.kv)


@pytest.mark.parametrize("fraction", [0.0, float("inf")])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_doubled_and_split_kv_give_the_same_function_and_gradients(fraction, layout):
    tuning = Tuning(doubled_kv_fraction=fraction)
    q, k, v = _inputs(24, seed=21)
    dout = randn(B, 24, H, D, seed=22)
    grads = []
    for fn in ("production", "naive"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        if fn == "production":
            o, _ = ringbook.production_ring_attention(*xs, ring_size=4, layout=layout, tuning=tuning)
        else:
            o, _ = ringbook.naive_attention(xs[0], _expand(xs[1]), _expand(xs[2]))
        (o * dout).sum().backward()
        grads.append([o.detach()] + [x.grad for x in xs])
    for got, want in zip(*grads):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-10)


def test_backward_without_lse_gradient():
    q, k, v = _inputs(16, seed=9)
    dout = randn(B, 16, H, D, seed=13)
    grads = []
    for fn in ("production", "naive"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        if fn == "production":
            o, _ = ringbook.production_ring_attention(*xs, ring_size=4, causal=True)
        else:
            o, _ = ringbook.naive_attention(xs[0], _expand(xs[1]), _expand(xs[2]), causal=True)
        (o * dout).sum().backward()
        grads.append([x.grad for x in xs])
    for got, want in zip(*grads):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_within_2x_rule(dtype):
    q, k, v = _inputs(64, hkv=H, dtype=dtype, seed=2)
    out, lse = ringbook.production_ring_attention(q, k, v, ring_size=4, causal=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = ringbook.naive_attention(*(x.double() for x in (q, k, v)), causal=True)
    base_out, _ = ringbook.naive_attention(q, k, v, causal=True, precision="input")
    assert_within_2x_rule(out, ref_out, base_out)
    assert (lse.double() - ref_lse).abs().max() < 1e-3


# --------------------------------------------------------------------------- dilated

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("w", [1, 2, 3, 4])
@pytest.mark.parametrize("heads", ["all", "grouped"])
def test_dilated_matches_dilated_attention(causal, w, heads):
    q, k, v = make_qkv(1, 48, 3, D, seed=4)
    cfg = dict(segment_lengths=[12, 24, 48], dilation_rates=[1, 2, 4], heads=heads)
    out, lse = ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, **cfg)
    ref_out, ref_lse = ringbook.dilated_attention(q, k, v, causal=causal, **cfg)
    assert_matches_reference(out, lse, ref_out, ref_lse)


def test_dilated_grouped_query_and_backward():
    q, k, v = _inputs(24, hkv=2, seed=6)
    cfg = dict(segment_lengths=[8, 24], dilation_rates=[1, 2])
    dout = randn(B, 24, H, D, seed=14)
    grads = []
    for fn in ("production", "reference"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        if fn == "production":
            o, _ = ringbook.production_ring_attention(*xs, ring_size=3, causal=True, **cfg)
        else:
            o, _ = ringbook.dilated_attention(xs[0], _expand(xs[1]), _expand(xs[2]), causal=True, **cfg)
        (o * dout).sum().backward()
        grads.append([x.grad for x in xs])
    for got, want in zip(*grads):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- kernels and the fused merge

def _partial(b, n, h, d, seed, empty_rows=()):
    out = randn(b, n, h, d, seed=seed)
    lse = randn(b, h, n, seed=seed + 1, std=3.0)
    for i in empty_rows:
        out[:, i] = 0
        lse[:, :, i] = float("-inf")
    return out, lse


@pytest.mark.parametrize("blk_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merge_into_matches_merge_partials(blk_dtype):
    acc_out, acc_lse = _partial(2, 7, 3, 5, seed=0, empty_rows=(1, 4))
    blk_out, blk_lse = _partial(2, 7, 3, 5, seed=2, empty_rows=(1, 2))
    blk_out = blk_out.to(blk_dtype)
    want = ringbook.merge_partials(acc_out, acc_lse, blk_out.double(), blk_lse)
    merge.merge_many_into_(acc_out, acc_lse, [(blk_out, blk_lse)])
    atol = 1e-12 if blk_dtype == torch.float64 else 0.0
    assert_matches_reference(acc_out, acc_lse, *want, atol=max(atol, 1e-12), rtol=1e-12)


def test_merge_into_strided_views_touches_only_its_rows():
    acc_out, acc_lse = _partial(4, 10, 2, 3, seed=4)
    blk_out, blk_lse = _partial(2, 4, 2, 3, seed=6)
    want_out, want_lse = acc_out.clone(), acc_lse.clone()
    want_out[1:3, 5:9], want_lse[1:3, :, 5:9] = ringbook.merge_partials(want_out[1:3, 5:9], want_lse[1:3, :, 5:9],
                                                                        blk_out, blk_lse)
    merge.merge_many_into_(acc_out[1:3, 5:9], acc_lse[1:3, :, 5:9], [(blk_out, blk_lse)])
    assert_matches_reference(acc_out, acc_lse, want_out, want_lse, atol=1e-12, rtol=1e-12)


@given(st.integers(1, 6), st.integers(0, 2 ** 16))
def test_merge_into_order_does_not_matter(parts, seed):
    """Folding partials one by one in any order gives merge_partials' answer (the merge is commutative)."""
    blocks = [_partial(1, 3, 2, 2, seed=seed + 10 * i, empty_rows=(i % 3,)) for i in range(parts)]
    want_out, want_lse = torch.zeros(1, 3, 2, 2, dtype=torch.float64), torch.full((1, 2, 3), float("-inf"),
                                                                                    dtype=torch.float64)
    for o, l in blocks:
        want_out, want_lse = ringbook.merge_partials(want_out, want_lse, o, l)
    acc_out, acc_lse = torch.zeros_like(want_out), torch.full_like(want_lse, float("-inf"))
    for o, l in reversed(blocks):
        merge.merge_many_into_(acc_out, acc_lse, [(o, l)])
    assert_matches_reference(acc_out, acc_lse, want_out, want_lse, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("initialise", [False, True])
def test_merge_many_into_is_the_merge_repeated(initialise):
    blocks = [_partial(2, 5, 3, 4, seed=30 + 3 * i, empty_rows=(i,)) for i in range(5)]
    acc_out, acc_lse = _partial(2, 5, 3, 4, seed=50, empty_rows=(2,))
    want_out, want_lse = (blocks[0][0].clone(), blocks[0][1].clone()) if initialise else (acc_out, acc_lse)
    for o, l in blocks[1:] if initialise else blocks:
        want_out, want_lse = ringbook.merge_partials(want_out, want_lse, o, l)
    got_out, got_lse = (torch.full_like(acc_out, float("nan")), torch.full_like(acc_lse, float("nan"))) \
        if initialise else (acc_out.clone(), acc_lse.clone())
    merge.merge_many_into_(got_out, got_lse, blocks, initialise=initialise)  # nothing of a NaN start is read
    assert_matches_reference(got_out, got_lse, want_out, want_lse, atol=1e-12, rtol=1e-12)


def test_triton_merge_agrees_with_torch_merge_in_the_interpreter():
    """The Triton kernel (boxes, 1–8 blocks at once, initialising or not) run by Triton's CPU interpreter."""
    import subprocess
    import sys

    pytest.importorskip("triton", reason="triton is not installed (the CPU wheel of torch does not bring it); "
                                         "on CUDA the kernel self-checks before first use")
    code = ("import torch\nfrom ringbook.fast.triton_merge import add_boxes_into_triton_, merge_boxes_into_triton_\n"
            "from ringbook.fast.merge import _self_check_triton\n"
            "print(_self_check_triton(merge_boxes_into_triton_, torch.device('cpu'), add_boxes_into_triton_))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_merge_group_does_not_change_the_function(monkeypatch, group, causal):
    """Block results are folded ``group`` at a time whatever rows they cover (a causal step's half-blocks too)."""
    tuning = Tuning(merge_group=group, doubled_kv_fraction=float("inf"))
    folds = []
    real = engine.merge_boxes_into_

    def counting(acc_out, acc_lse, items, **kwargs):
        folds.append(len(items))
        return real(acc_out, acc_lse, items, **kwargs)

    monkeypatch.setattr(engine, "merge_boxes_into_", counting)
    q, k, v = _inputs(40, seed=23)
    layout = "zigzag" if causal else "contiguous"
    out, lse = ringbook.production_ring_attention(q, k, v, ring_size=5, causal=causal, layout=layout, tuning=tuning)
    ref_out, ref_lse = ringbook.naive_attention(q, _expand(k), _expand(v), causal=causal)
    assert_matches_reference(out, lse, ref_out, ref_lse)
    blocks = 1 + 2 * 4 if causal else 5  # zigzag: step 0 one causal call, then two half-blocks per step
    assert folds == [group] * (blocks // group) + ([blocks % group] if blocks % group else [])
    k_st, v_st = (stacked._Stacking(5, None).enter(x) for x in (k, v))
    _, plan = stacked._start(40, 5, B, layout, causal, 1, tuning, k_st, v_st, False)
    assert plan.merge_group == group
    no_room = Tuning(merge_group=group, doubled_kv_fraction=0.0)  # no room for held results: one per pass
    _, plan = stacked._start(40, 5, B, layout, causal, 10 ** 12, no_room, k_st, v_st, False)
    assert plan.merge_group == 1


def test_block_attention_einops_path_and_gradients():
    q, k, v = _inputs(6, hkv=1, seed=15)
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = kernels.block_attention(*xs, scale=0.5, causal=True)
    ref_out, ref_lse = ringbook.naive_attention(q, _expand(k), _expand(v), causal=True, scale=0.5)
    assert_matches_reference(out, lse, ref_out, ref_lse)
    (out.sum() + lse.sum()).backward()
    ys = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o, l = ringbook.naive_attention(ys[0], _expand(ys[1]), _expand(ys[2]), causal=True, scale=0.5)
    (o.sum() + l.sum()).backward()
    for a, b in zip(xs, ys):
        assert torch.allclose(a.grad, b.grad, atol=1e-10, rtol=1e-10)


def test_kernel_module_imports_without_triton_and_reports_einops_on_cpu():
    kernels.reset_caches()
    q, k, v = _inputs(8, seed=1)
    kernels.block_attention(q, k, v, scale=0.3)
    assert any("einops" in text for text in kernels.STATUS.values())


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("kwargs,match", [
    (dict(layout="striped"), "striped"),
    (dict(layout="diagonal"), "layout must be one of"),
    (dict(ring_size=5), "ring_size=5"),
    (dict(ring_size=3, causal=True), "2·ring_size = 6"),  # zigzag default needs 2w | n
    (dict(heads="grouped"), "dilated attention only"),
    (dict(segment_lengths=[8]), "both segment_lengths and dilation_rates"),
    (dict(segment_lengths=[8], dilation_rates=[1], layout="zigzag"), "contiguously"),
    (dict(backend="tpu"), "backend must be one of"),
])
def test_bad_options_are_refused(kwargs, match):
    q, k, v = _inputs(16)
    with pytest.raises(ValueError, match=match):
        ringbook.production_ring_attention(q, k, v, **kwargs)


def test_bad_head_counts_are_refused():
    q, k, v = _inputs(16, hkv=H)
    with pytest.raises(ValueError, match="grouped-query attention needs"):
        ringbook.production_ring_attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="grouped-query attention needs"):
        ringbook.production_ring_attention(q, k[:, :, :2], v[:, :, :1])
    with pytest.raises(ValueError, match="heads"):  # the default check still refuses different head counts
        ringbook.ring_attention(q, k[:, :, :2], v[:, :, :2], ring_size=2)
    with pytest.raises(ValueError, match="same sequence length"):
        ringbook.production_ring_attention(q, k[:, :8], v[:, :8])


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(n=0, ring_size=2), ValueError, r"^n must be a positive int, got 0$"),
    (dict(n=8, ring_size=2, causal="x"), TypeError, r"^causal must be True or False, got str 'x'$"),
])
def test_production_plan_refuses_zero_length_and_non_bool_causal(kwargs, error, message):
    """Before: n=0 gave a plan of empty launches and causal='x' was taken for True."""
    n, w = kwargs.pop("n"), kwargs.pop("ring_size")
    with pytest.raises(error, match=message):
        production_plan(n, w, **kwargs)


# --------------------------------------------------------------------------- a long forward in parts

PARTS = Tuning(parts_min_extra_bytes=0, parts_extra_fraction=1e-12)  # every call's extra memory over the budget


@pytest.fixture
def parts_forced(monkeypatch):
    """Record the parts' sizes of calls run with :data:`PARTS` (the forward runs in parts of one rank)."""
    used = []
    real = stacked._part_iter

    def spy(*args, **kwargs):
        used.append(args[5])  # ranks per part
        return real(*args, **kwargs)

    monkeypatch.setattr(stacked, "_part_iter", spy)
    return used


@pytest.mark.parametrize("layout,causal", [("contiguous", False), ("contiguous", True), ("zigzag", True),
                                           ("zigzag", False)])
def test_forward_in_parts_is_the_same_function(parts_forced, layout, causal):
    q, k, v = _inputs(48, seed=31)
    out, lse = ringbook.production_ring_attention(q, k, v, ring_size=4, causal=causal, layout=layout, tuning=PARTS)
    assert parts_forced == [1]  # four parts of one rank, K/V gathered per step
    ref_out, ref_lse = ringbook.naive_attention(q, _expand(k), _expand(v), causal=causal)
    assert_matches_reference(out, lse, ref_out, ref_lse)


def test_forward_in_parts_keeps_the_backward_exact(parts_forced):
    q, k, v = (x.requires_grad_() for x in _inputs(48, seed=32))
    out, lse = ringbook.production_ring_attention(q, k, v, ring_size=4, causal=True, tuning=PARTS)
    assert parts_forced == [1]
    g = randn(out.shape, seed=33)
    grads = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v))
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = ringbook.naive_attention(qr, _expand(kr), _expand(vr), causal=True)
    ref = torch.autograd.grad((ref_out * g).sum() + ref_lse.sum(), (qr, kr, vr))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gather_mover_serves_the_forward_only():
    k = torch.zeros(1, 8, 1, 2)
    mover = stacked.GatherMover(k, k, layout_positions(8, 2, "contiguous"), (0, 1))
    assert torch.equal(mover.forward_kv(1)[0], k[:, 4:])  # rank 0 holds shard 1 at step 1
    with pytest.raises(NotImplementedError, match="backward runs whole"):
        mover.backward_kv(0)


@pytest.mark.parametrize("whole,per_rank,budget,want", [(10, 1, 10, 16), (11, 1, 10, 8), (11, 3, 10, 2),
                                                        (11, 20, 10, 1)])
def test_part_size_is_the_largest_ring_divisor_that_fits(whole, per_rank, budget, want):
    assert stacked._part_ranks(16, whole, per_rank, budget) == want


def test_whole_calls_stay_whole_below_the_floor():
    q, k, v = _inputs(48, seed=34)
    assert stacked._parts(48, 4, B, "zigzag", True, 1, Tuning(), q, k, v) is None  # far below the 2 GiB floor


# --------------------------------------------------------------------------- CUDA graphs and the second stream

@pytest.mark.parametrize("graph", ["yes", 1, None, "on"])
def test_graph_argument_is_checked(graph):
    q, k, v = _inputs(16)
    with pytest.raises(ValueError, match="graph must be"):
        ringbook.production_ring_attention(q, k, v, ring_size=2, graph=graph)


def test_graph_true_on_the_cpu_is_refused():
    q, k, v = _inputs(16)
    with pytest.raises(ValueError, match="graph=True needs CUDA tensors"):
        ringbook.production_ring_attention(q, k, v, ring_size=2, graph=True)


def test_graph_auto_on_the_cpu_runs_eagerly_and_caches_nothing():
    q, k, v = _inputs(16)
    before = dict(engine.GRAPHS)
    for _ in range(3):
        out, lse = ringbook.production_ring_attention(q, k, v, ring_size=2)
    assert engine.GRAPHS == before
    ref_out, ref_lse = ringbook.naive_attention(q, _expand(k), _expand(v))
    assert_matches_reference(out, lse, ref_out, ref_lse)


def test_side_stream_is_only_for_cuda():
    assert engine._Side(torch.zeros(1), True).stream is None
    calls = []
    engine._Side(torch.zeros(1), True).run(lambda: calls.append(1))
    assert calls == [1]  # in line


# --------------------------------------------------------------------------- the box merge

@pytest.mark.parametrize("initialise", [False, True])
def test_box_merge_is_the_merge_of_each_box(initialise):
    acc_out, acc_lse = randn((3, 10, 2, 4), seed=40), randn((3, 2, 10), seed=41)
    boxes = [(0, 3, 0, 10), (1, 3, 2, 7), (0, 1, 5, 10), (2, 3, 0, 4)]
    items = [(bx, randn((bx[1] - bx[0], bx[3] - bx[2], 2, 4), seed=50 + i),
              randn((bx[1] - bx[0], 2, bx[3] - bx[2]), seed=60 + i)) for i, bx in enumerate(boxes[1:] if initialise
                                                                                      else boxes)]
    if initialise:  # row (0, 0..4) of batch 0 is covered by no box: it must become (0, -inf)
        want_o, want_l = torch.zeros_like(acc_out), torch.full_like(acc_lse, float("-inf"))
    else:
        want_o, want_l = acc_out.clone(), acc_lse.clone()
    for (b0, b1, n0, n1), o, lse in items:
        mo, ml = ringbook.merge_partials(want_o[b0:b1, n0:n1], want_l[b0:b1, :, n0:n1], o, lse)
        want_o[b0:b1, n0:n1], want_l[b0:b1, :, n0:n1] = mo, ml
    got_o, got_l = (torch.full_like(acc_out, float("nan")), torch.full_like(acc_lse, float("nan"))) if initialise \
        else (acc_out.clone(), acc_lse.clone())
    merge.merge_boxes_into_(got_o, got_l, items, initialise=initialise)
    assert_matches_reference(got_o, got_l, want_o, want_l, atol=1e-12, rtol=1e-12)
    if initialise:
        assert (got_o[0, :5] == 0).all() and torch.isneginf(got_l[0, :, :5]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_gradient_sums_keep_the_backward_exact(monkeypatch, causal):
    """The backward sums ``grad_group`` blocks' gradients per pass into dq, dK and dV (held across steps)."""
    tuning = Tuning(merge_group=4, doubled_kv_fraction=float("inf"))
    passes = []
    real = engine.add_boxes_into_

    def counting(acc, items, **kwargs):
        passes.append(len(items))
        return real(acc, items, **kwargs)

    monkeypatch.setattr(engine, "add_boxes_into_", counting)
    q, k, v = (x.requires_grad_() for x in _inputs(40, seed=44))
    out, lse = ringbook.production_ring_attention(q, k, v, ring_size=5, causal=causal, tuning=tuning)
    g = randn(out.shape, seed=45)
    grads = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v))
    blocks = 9 if causal else 5
    assert passes == [n for n in [4] * (blocks // 4) + [blocks % 4] for _ in range(3)]  # dq, dK, dV per group
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = ringbook.naive_attention(qr, _expand(kr), _expand(vr), causal=causal)
    ref = torch.autograd.grad((ref_out * g).sum() + ref_lse.sum(), (qr, kr, vr))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- the other strategies in one process

@pytest.mark.parametrize("strategy", ["allgather", "ulysses"])
@pytest.mark.parametrize("causal", [False, True])
def test_one_process_strategies_are_exact(strategy, causal):
    """All-gather (every rank reads the whole K/V) and Ulysses (head shards side by side) on the engine."""
    for w, layout in ((1, "contiguous"), (2, "zigzag"), (4, "contiguous"), (4, "zigzag")):
        q, k, v = (x.requires_grad_() for x in _inputs(24, seed=50 + w))
        out, lse = ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, layout=layout,
                                                      strategy=strategy)
        qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
        ref_out, ref_lse = ringbook.naive_attention(qr, _expand(kr), _expand(vr), causal=causal)
        assert_matches_reference(out, lse, ref_out, ref_lse)
        g = randn(out.shape, seed=51)
        got = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v))
        want = torch.autograd.grad((ref_out * g).sum() + ref_lse.sum(), (qr, kr, vr))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_one_process_allgather_calls_each_rank_once_per_merged_block(monkeypatch):
    """Causal all-gather: one diagonal call for every rank at once, then one call per rank on every earlier key
    (zigzag: its later half's queries on the keys between its halves too, a second call except on the ranks whose
    halves have no earlier keys (rank 0) or no keys between them (rank w − 1))."""
    from ringbook.fast.strategies import stacked_allgather_plan

    for layout, rest in (("contiguous", 3), ("zigzag", 1 + 2 + 2 + 1)):
        plan = stacked_allgather_plan(32, 4, B, layout, True, merge_group=8)
        own, others = plan.steps
        assert (len(own), len(others)) == (1, rest), layout
        assert sum(plan.work(B, H)) == B * H * 32 * 33 // 2  # every causal score once


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="gather"), "strategy must be one of"),
    (dict(strategy="ulysses", ring_size=3), "heads do not divide into ring_size=3"),
    (dict(strategy="allgather", window=4), "runs dense attention"),
])
def test_one_process_strategy_refusals(kwargs, match):
    q, k, v = _inputs(24)
    with pytest.raises(ValueError, match=match):
        ringbook.production_ring_attention(q, k, v, **{"ring_size": 2, **kwargs})
