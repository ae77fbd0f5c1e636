"""The one-process strategies (all-gather, Ulysses, USP) and their communication schedule.

Each form against the float64 reference, forward and backward, causal and
not, grouped-query attention, ring sizes 1–4, every layout it takes; bad
input refused by name; the schedule's bytes against the closed-form
formulas of each strategy and against what the forms actually move; bf16
under flash-attention's 2× rule.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from einops import repeat
from helpers import assert_within_2x_rule, check_attention, randn

import ringbook
from ringbook import LAYOUTS, allgather_attention, naive_attention, strategy_schedule, ulysses_attention, usp_attention
from ringbook.schedule import layout_positions
from ringbook.strategies import STRATEGIES, Wire, bytes_sent, head_split, hybrid_groups, lcm_heads

N, D = 24, 4  # 24 tokens: divisible by 2w for w = 1, 2, 3, 4 (zigzag)


def _expand(x, h):
    return repeat(x, "b n g d -> b n (g r) d", r=h // x.shape[2])


def _reference(q, k, v, causal):
    return naive_attention(q, _expand(k, q.shape[2]), _expand(v, q.shape[2]), causal=causal)


def _forms():
    """(id, fn) for every form, ring size and layout it takes (USP: 4 = 2×2, 4×1, 1×4, 2 = 2×1, 1×2)."""
    out = []
    for w in (1, 2, 3, 4):
        for layout in LAYOUTS:
            out.append((f"allgather-w{w}-{layout}", functools.partial(allgather_attention, ring_size=w, layout=layout)))
        out.append((f"ulysses-w{w}", functools.partial(ulysses_attention, ring_size=w)))
    for w, u in ((4, 2), (4, 1), (4, 4), (2, 1), (2, 2)):
        for layout in LAYOUTS:
            out.append((f"usp-{u}x{w // u}-{layout}",
                        functools.partial(usp_attention, ring_size=w, ulysses_size=u, layout=layout)))
    return out


FORMS = _forms()


def _heads_for(fn):
    """(h, g) pairs: MHA, GQA 2:1 and MQA; 6 query heads where the Ulysses part has 3 ranks."""
    u = fn.keywords.get("ulysses_size", fn.keywords["ring_size"] if fn.func is ulysses_attention else 1)
    return ((6, 6), (6, 3), (6, 1)) if u == 3 else ((4, 4), (4, 2), (4, 1))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name,fn", FORMS, ids=[f[0] for f in FORMS])
def test_forms_match_naive_float64_forward_and_backward(name, fn, causal):
    for h, g in _heads_for(fn):
        q = randn(2, N, h, D, seed=1, requires_grad=True)
        k, v = (randn(2, N, g, D, seed=s, requires_grad=True) for s in (2, 3))
        dout, dlse = randn(2, N, h, D, seed=4), randn(2, h, N, seed=5)
        out, lse = fn(q, k, v, causal=causal)
        ref_out, ref_lse = _reference(q, k, v, causal)
        assert (out - ref_out).abs().max() < 1e-10 and (lse - ref_lse).abs().max() < 1e-10, (h, g)
        grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), (q, k, v))
        for x, ref, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
            assert (x - ref).abs().max() < 1e-10, (h, g, what, (x - ref).abs().max().item())


def test_usp_extremes_are_the_ring_and_ulysses():
    q, k, v = (randn(1, N, 4, D, seed=s) for s in (1, 2, 3))
    for layout in LAYOUTS:
        ring = ringbook.ring_attention(q, k, v, ring_size=4, causal=True, layout=layout)
        usp = usp_attention(q, k, v, ring_size=4, ulysses_size=1, causal=True, layout=layout)
        assert all((a - b).abs().max() < 1e-12 for a, b in zip(ring, usp))
    kw = {"heads": 8, "kv_heads": 2, "head_dim": 16, "dtype_bytes": 2, "causal": True, "backward": True}
    assert (strategy_schedule("usp", 64, 4, ulysses_size=1, layout="zigzag", **kw)
            == strategy_schedule("ring", 64, 4, layout="zigzag", **kw))
    assert strategy_schedule("usp", 64, 4, ulysses_size=4, **kw) == strategy_schedule("ulysses", 64, 4, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forms_low_precision_within_2x_rule(dtype):
    q, k, v = (randn(1, 64, 4, 16, dtype=dtype, seed=s, std=2.0 if s < 3 else 1.0) for s in (1, 2, 3))
    for fn in (functools.partial(allgather_attention, ring_size=4, layout="zigzag"),
               functools.partial(ulysses_attention, ring_size=4),
               functools.partial(usp_attention, ring_size=4, ulysses_size=2, layout="zigzag")):
        for causal in (False, True):
            check_attention(fn, q, k, v, causal=causal)
    # backward: gradients under the same rule, against the naive path's gradients in the same dtype
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    dout = randn(1, 64, 4, 16, seed=7)
    ref = torch.autograd.grad((naive_attention(q64, k64, v64, causal=True)[0] * dout).sum(), (q64, k64, v64))
    ql, kl, vl = (x.clone().requires_grad_() for x in (q, k, v))
    base = torch.autograd.grad((naive_attention(ql, kl, vl, causal=True, precision="input")[0]
                                * dout.to(dtype)).sum(), (ql, kl, vl))
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    got = torch.autograd.grad((usp_attention(qs, ks, vs, ring_size=4, ulysses_size=2, causal=True, layout="zigzag")[0]
                               * dout.to(dtype)).sum(), (qs, ks, vs))
    for x, r, b, what in zip(got, ref, base, ("dq", "dk", "dv")):
        assert_within_2x_rule(x, r, b, what=what)


# --------------------------------------------------------------------------- refusals

def test_bad_input_is_refused_by_name():
    q, k, v = (randn(1, N, 4, D, seed=s) for s in (1, 2, 3))
    with pytest.raises(ValueError, match=r"ring_size=3 does not divide the 4 query heads.*\[1, 2, 4\]"):
        ulysses_attention(q, k, v, ring_size=3)
    with pytest.raises(ValueError, match=r"ulysses_size=3 must divide ring_size=4.*\[1, 2, 4\]"):
        usp_attention(q, k, v, ring_size=4, ulysses_size=3)
    q6 = randn(1, N, 6, D)
    with pytest.raises(ValueError, match=r"ulysses_size=4 does not divide the 6 query heads.*\[1, 2\]"):
        usp_attention(q6, randn(1, N, 6, D), randn(1, N, 6, D), ring_size=8, ulysses_size=4)
    with pytest.raises(TypeError, match="ulysses_size must be a positive int"):
        usp_attention(q, k, v, ring_size=4, ulysses_size=2.0)
    with pytest.raises(ValueError, match="ring_size=5 does not fit sequence length 24"):
        allgather_attention(q, k, v, ring_size=5)
    with pytest.raises(ValueError, match="ring_size=7 does not fit sequence length 24"):
        ulysses_attention(randn(1, N, 7, D), randn(1, N, 7, D), randn(1, N, 7, D), ring_size=7)
    with pytest.raises(ValueError, match="layout must be one of"):
        allgather_attention(q, k, v, ring_size=2, layout="spiral")
    with pytest.raises(ValueError, match="grouped-query attention needs"):
        ulysses_attention(q, k[:, :, :3], v[:, :, :3], ring_size=2)
    with pytest.raises(ValueError, match="same sequence length"):
        allgather_attention(q, k[:, :12], v[:, :12], ring_size=2)
    with pytest.raises(TypeError, match="causal must be True or False"):
        usp_attention(q, k, v, ring_size=2, ulysses_size=2, causal=1)
    kw = {"heads": 4, "kv_heads": 2, "head_dim": 8, "dtype_bytes": 2}
    with pytest.raises(ValueError, match="strategy must be one of"):
        strategy_schedule("tree", 16, 2, **kw)
    with pytest.raises(ValueError, match="strategy='usp' needs ulysses_size"):
        strategy_schedule("usp", 16, 2, **kw)
    with pytest.raises(ValueError, match="ulysses_size is for strategy='usp' only"):
        strategy_schedule("ring", 16, 2, ulysses_size=2, **kw)
    with pytest.raises(ValueError, match="kv_heads=3 must divide heads=4"):
        strategy_schedule("ring", 16, 2, **{**kw, "kv_heads": 3})


# --------------------------------------------------------------------------- the schedule's bytes

def _formula(strategy, n, w, h, g, d, e, u=None, backward=False):
    """Bytes one rank sends, from the one-page formulas (integers: (w−1)/w · n = (w−1)·c)."""
    a = max(e, 4)  # accumulator bytes: summed gradients and the lse
    c = n // w
    if strategy == "ring":
        fwd = (w - 1) * 2 * c * g * d * e
        return fwd + (fwd + (w * 2 * c * g * d * a if w > 1 else 0) if backward else 0)
    if strategy == "allgather":
        fwd = (w - 1) * 2 * c * g * d * e  # (w−1)/w · 2·n·g·d·e
        return fwd + (fwd + (w - 1) * 2 * c * g * d * a if backward else 0)
    u = w if strategy == "ulysses" else u
    r, gp = w // u, lcm_heads(g, u)
    ulysses = (u - 1) * c * d * e * (2 * h + 2 * gp) // u + (u - 1) * c * h * a // u  # + the lse
    ring = (r - 1) * 2 * (n // r) * (gp // u) * d * e
    if not backward:
        return ulysses + ring
    grads = (u - 1) * c * d * e * (2 * h + 2 * gp) // u + (u - 1) * c * h * a // u  # dout, dlse in; dq, dK/dV out
    return ulysses + ring + grads + ring + (r * 2 * (n // r) * (gp // u) * d * a if r > 1 else 0)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_schedule_bytes_match_the_formulas(backward):
    n, d = 96, 16
    checked = 0
    for w in (1, 2, 3, 4, 6, 8):
        for h, g in ((24, 24), (24, 8), (24, 2), (24, 1)):
            for e in (2, 4, 8):
                for strategy, u in [("ring", None), ("allgather", None), ("ulysses", None)] + [
                        ("usp", x) for x in range(1, w + 1) if w % x == 0]:
                    if strategy == "ulysses" and h % w:
                        continue
                    got = bytes_sent(strategy_schedule(strategy, n, w, heads=h, kv_heads=g, head_dim=d, dtype_bytes=e,
                                                       causal=True, ulysses_size=u, backward=backward), w)
                    want = _formula(strategy, n, w, h, g, d, e, u, backward)
                    assert got == [want] * w, (strategy, w, u, h, g, e, got, want)
                    checked += 1
    assert checked > 300


def test_ulysses_bytes_match_the_page_with_replicated_kv_heads():
    """STRATEGIES' line, (w−1)/w · (n/w)·d·e·(2h + 2g'), g' = max(g, w), for q, K/V and out (powers of two)."""
    n, h, d, e = 256, 16, 64, 2
    for w in (2, 4, 8, 16):
        for g in (1, 2, 4, 8, 16):
            sched = strategy_schedule("ulysses", n, w, heads=h, kv_heads=g, head_dim=d, dtype_bytes=e)
            got = bytes_sent(sched, w, what=("q", "K/V", "out"))
            assert got == [(w - 1) * (n // w) * d * e * (2 * h + 2 * max(g, w)) // w] * w, (w, g)


def test_schedule_batch_scales_every_message():
    kw = {"heads": 4, "kv_heads": 2, "head_dim": 8, "dtype_bytes": 2, "causal": True, "backward": True}
    for strategy, u in (("ring", None), ("allgather", None), ("ulysses", None), ("usp", 2)):
        one = bytes_sent(strategy_schedule(strategy, 32, 4, ulysses_size=u, **kw), 4)
        three = bytes_sent(strategy_schedule(strategy, 32, 4, ulysses_size=u, batch=3, **kw), 4)
        assert three == [3 * x for x in one] and min(one) > 0


def _moved(fn, q, k, v, **kw):
    wire = Wire()
    fn(q, k, v, wire=wire, **kw)
    return Counter((src, dst, what, nbytes) for _, src, dst, what, nbytes in wire.log)


def _scheduled(strategy, q, k, **kw):
    sched = strategy_schedule(strategy, q.shape[1], kw.pop("ring_size"), heads=q.shape[2], kv_heads=k.shape[2],
                              head_dim=q.shape[3], dtype_bytes=q.element_size(), batch=q.shape[0], **kw)
    return Counter((m.src, m.dst, m.what, m.nbytes) for st in sched for m in st.messages)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_forms_move_exactly_what_the_schedule_says(dtype):
    for h, g in ((4, 4), (4, 2), (4, 1)):
        q = randn(2, N, h, D, dtype=dtype, seed=1)
        k, v = (randn(2, N, g, D, dtype=dtype, seed=s) for s in (2, 3))
        for w in (2, 3, 4):
            for layout in ("contiguous", "zigzag"):
                kw = {"ring_size": w, "causal": True, "layout": layout}
                assert _moved(allgather_attention, q, k, v, **kw) == _scheduled("allgather", q, k, **kw)
                for u in (x for x in range(1, w + 1) if w % x == 0 and h % x == 0):
                    moved = _moved(usp_attention, q, k, v, ulysses_size=u, **kw)
                    assert moved == _scheduled("usp", q, k, ulysses_size=u, **kw), (w, u, layout, h, g)
                    assert sum(moved.values()) > 0
            if h % w == 0:
                assert (_moved(ulysses_attention, q, k, v, ring_size=w)
                        == _scheduled("ulysses", q, k, ring_size=w))


@pytest.mark.parametrize("strategy,u", [("ring", None), ("allgather", None), ("ulysses", None), ("usp", 2)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_schedule_work_covers_every_visible_score_once(strategy, u, causal):
    n, w, h = 16, 4, 4
    for layout in (("contiguous",) if strategy == "ulysses" else ("contiguous", "zigzag", "striped")):
        cover = torch.zeros(h, n, n, dtype=torch.long)
        for st in strategy_schedule(strategy, n, w, heads=h, kv_heads=2, head_dim=8, dtype_bytes=2, causal=causal,
                                    layout=layout, ulysses_size=u, backward=True):
            if st.phase != "forward":
                continue
            for wk in st.work:
                pos = layout_positions(n, wk.shards, wk.layout)
                for s in wk.steps:
                    for blk in s.blocks:
                        qi, kj = pos[s.rank][blk.q[0]:blk.q[1]], pos[s.kv_rank][blk.kv[0]:blk.kv[1]]
                        cover[wk.heads[0]:wk.heads[1], qi[:, None], kj[None, :]] += 1
        visible = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
        assert bool((cover[:, visible] == 1).all()), (strategy, layout)
        assert bool((cover <= 1).all())


# --------------------------------------------------------------------------- the layouts of heads and groups

def test_head_split_gives_each_rank_the_kv_heads_its_queries_read():
    for h in (4, 8, 12, 16):
        for g in (x for x in range(1, h + 1) if h % x == 0):
            for u in (x for x in range(1, h + 1) if h % x == 0):
                split = head_split(h, g, u)
                assert sorted(i for qh, _ in split for i in qh) == list(range(h))
                gp = lcm_heads(g, u)
                assert gp == max(g, u) or (g % u and u % g)  # lcm is the max when one divides the other
                for qh, kh in split:
                    assert len(kh) == gp // u
                    for a, i in enumerate(qh):  # local q head a reads local kv head a // (|qh| / |kh|)
                        assert kh[a // (len(qh) // len(kh))] == i // (h // g)
    with pytest.raises(ValueError, match=r"ring_size=3 does not divide the 4 query heads"):
        head_split(4, 2, 3)


def test_hybrid_groups():
    ulysses, ring = hybrid_groups(8, 2)
    assert ulysses == [[0, 1], [2, 3], [4, 5], [6, 7]] and ring == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert hybrid_groups(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    with pytest.raises(ValueError, match="ulysses_size=3 must divide ring_size=8"):
        hybrid_groups(8, 3)


def test_strategies_listed():
    assert STRATEGIES == ("ring", "allgather", "ulysses", "usp")
    assert lcm_heads(6, 4) == 12 and lcm_heads(1, 8) == 8 and lcm_heads(8, 2) == 8


# --------------------------------------------------------------------------- pictures

def test_plots_draw_one_arrow_per_message_and_one_line_per_strategy():
    pytest.importorskip("matplotlib")
    from matplotlib.patches import FancyArrowPatch

    from ringbook.viz.strategies import plot_bytes_per_rank, plot_strategy_schedule

    kw = {"heads": 8, "kv_heads": 2, "head_dim": 16, "dtype_bytes": 2, "causal": True, "backward": True}
    for strategy, u in (("ring", None), ("allgather", None), ("ulysses", None), ("usp", 2)):
        sched = strategy_schedule(strategy, 64, 4, ulysses_size=u, layout="contiguous", **kw)
        for phase in ("forward", "backward"):
            fig = plot_strategy_schedule(sched, 4, phase=phase)
            arrows = [p for p in fig.axes[0].patches if isinstance(p, FancyArrowPatch)]
            assert len(arrows) == sum(len(st.messages) for st in sched if st.phase == phase) > 0
    with pytest.raises(ValueError, match="no 'backward' steps"):
        plot_strategy_schedule(strategy_schedule("ring", 64, 4, **{**kw, "backward": False}), 4, phase="backward")
    fig = plot_bytes_per_rank([2, 4], {"ring": [1e6, 2e6], "allgather": [1e6, 2e6], "ulysses": [3e6, 1e6]})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["ring", "allgather (= ring)", "ulysses"]
