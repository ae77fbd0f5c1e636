"""Packed documents and sliding windows (ringbook.masks) in the reference, the schedule, the plans and the rings.

* the masks by their definitions (documents, causal, windows causal and
  symmetric) in ``naive_attention``; rows that see nothing give 0 / -inf;
* ``classify`` never calls a block full or empty that is not (checked against
  the formed mask on random blocks of every layout);
* ``production_ring_attention`` with documents and windows equals the
  reference in float64, forward and backward, at ring sizes 1–5 and both of
  its layouts: documents of length 1, a document over every shard, a boundary
  on a shard boundary, many tiny ones; windows of 1, under a shard, over a
  shard and over n;
* skip, don't mask: empty blocks are never launched and the steps nobody
  needs are dropped (a window's hops), counted in the plans;
* the distributed ring (gloo, world 3) with both masks, exact, and ids that
  differ between ranks refused on every rank;
* the per-document head-tail layout (``"doc_headtail"``): a permutation,
  every document balanced, exact in the one-process ring and the shards;
  the layout report checked by hand; its refusals say what would fit;
* bad input refused by name.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_within_2x_rule, refusal

import ringbook
from ringbook import distributed as rd
from ringbook.fast.plans import production_plan, rank_plan
from ringbook.masks import check_document_ids, classify, document_ids_from_cu_seqlens, keep, mask_spec
from ringbook.schedule import layout_positions, ring_schedule

N = 30


def _docs(kind: str, n: int = N) -> torch.Tensor | None:
    lengths = {"none": None, "random": [7, 1, 9, 3, 10], "one": [n], "tiny": [1] * n,
               "on a boundary": [n // 5 * 2, n - n // 5 * 2]}[kind]
    if lengths is None:
        return None
    return document_ids_from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()])


def _qkv(n=N, b=2, h=2, d=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 1, 4])
def test_naive_masks_are_their_definitions(causal, window):
    q, k, v = _qkv()
    ids = _docs("random")
    out, lse = ringbook.naive_attention(q, k, v, causal=causal, document_ids=ids, window=window)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    allowed = ids[:, None] == ids[None, :]
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j < window) & (j <= i) if causal else (i - j).abs() < window
    ref = ringbook.naive_attention(q, k, v, mask=allowed)
    torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref[1]))


def test_classify_never_overstates():
    gen = torch.Generator().manual_seed(3)
    spec_args = [(causal, _docs(kind), window) for causal in (False, True) for kind in ("none", "random", "tiny")
                 for window in (None, 1, 5, 40)]
    for causal, ids, window in spec_args:
        spec = mask_spec(causal, None if ids is None else ids[None], window)
        for layout, w in (("contiguous", 5), ("zigzag", 3), ("striped", 6)):
            pos = layout_positions(N, w, layout)
            for _ in range(6):
                r, s = (int(x) for x in torch.randint(w, (2,), generator=gen))
                qp, kp = pos[r], pos[s]
                kind = classify(qp, kp, spec)
                seen = keep(qp, kp, causal=causal, window=window, q_doc=None if ids is None else ids[None, qp],
                            k_doc=None if ids is None else ids[None, kp])
                seen = torch.ones(len(qp), len(kp), dtype=torch.bool) if seen is None else seen.reshape(-1, len(kp))
                if kind == "empty":
                    assert not seen.any()
                if kind == "full":
                    assert seen.all()
                if kind == "causal":
                    assert torch.equal(seen, kp[None, :] <= qp[:, None])


@pytest.mark.parametrize("docs", ["none", "random", "one", "tiny", "on a boundary"])
@pytest.mark.parametrize("window", [None, 1, 4, 8, 100])
def test_production_with_documents_and_windows_is_exact(docs, window):
    ids = _docs(docs)
    if ids is None and window is None:
        pytest.skip("the dense ring: tested elsewhere")
    for causal in (False, True):
        q, k, v = _qkv(seed=7)
        ref_out, ref_lse = ringbook.naive_attention(q, k, v, causal=causal, document_ids=ids, window=window)
        g = torch.randn(ref_out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
        ref = torch.autograd.grad((ref_out * g).sum(), (q, k, v))
        for w, layout in ((1, "contiguous"), (3, "zigzag"), (5, "contiguous"), (5, "zigzag")):
            out, lse = ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, layout=layout,
                                                          document_ids=ids, window=window)
            case = f"docs={docs} window={window} causal={causal} w={w} {layout}"
            assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), case
            fin = torch.isfinite(ref_lse)
            torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=1e-10, atol=1e-10, msg=case)
            torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10, msg=case)
            for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=case)


@pytest.mark.parametrize("layout,w", [("contiguous", 4), ("zigzag", 4), ("zigzag", 3), ("doc_headtail", 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_the_stacked_plan_counts_the_pairs_the_mask_leaves(layout, w, window):
    """Plan.work (each block kind's scores: masked blocks of several ranks stacked in one launch included) sums to
    the visible pairs of the whole mask: nothing is computed twice or left out."""
    from ringbook.fast.plans import stacked_plan
    from ringbook.masks import visible_pairs

    ids = document_ids_from_cu_seqlens([0, 12, 16, 48])
    spec = mask_spec(True, ids[None], window)
    plan = stacked_plan(48, w, 2, 1, layout=layout, causal=True, doubled=False, mask=spec, merge_group=4)
    assert sum(plan.work(batch=2, heads=3)) == 2 * 3 * visible_pairs(48, causal=True, document_ids=ids, window=window)


@pytest.mark.parametrize("window", [None, 3, 100])
def test_production_with_the_head_tail_layout_is_exact(window):
    """layout="doc_headtail": each rank's whole shard against each held one is one masked block (keys of a
    document in two runs: two layers), forward and backward in float64 at ring sizes 1–4."""
    ids = document_ids_from_cu_seqlens([0, 16, 24, 48])
    q, k, v = _qkv(n=48, seed=11)
    for causal in (False, True):
        ref_out, ref_lse = ringbook.naive_attention(q, k, v, causal=causal, document_ids=ids, window=window)
        g = torch.randn(ref_out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
        ref = torch.autograd.grad((ref_out * g).sum(), (q, k, v))
        for w in (1, 2, 4):
            out, lse = ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, layout="doc_headtail",
                                                          document_ids=ids, window=window)
            case = f"window={window} causal={causal} w={w}"
            assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), case
            torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10, msg=case)
            for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=case)
    plan = production_plan(48, 4, layout="doc_headtail", causal=True, mask=mask_spec(True, ids[None], None))
    assert [len(step) for step in plan] == [1, 2, 2, 2]  # one stacked launch per step (two where the shards wrap)
    with pytest.raises(ValueError, match="document_ids"):
        ringbook.production_ring_attention(q, k, v, ring_size=2, layout="doc_headtail")


def test_low_precision_within_the_2x_rule():
    q, k, v = (x.detach() for x in _qkv(seed=9))
    ids = _docs("random")
    ref = ringbook.naive_attention(q, k, v, causal=True, document_ids=ids, window=6)[0]
    lowp = [x.bfloat16() for x in (q, k, v)]
    naive = ringbook.naive_attention(*lowp, causal=True, document_ids=ids, window=6, precision="input")[0]
    out = ringbook.production_ring_attention(*lowp, ring_size=3, causal=True, document_ids=ids, window=6)[0]
    assert_within_2x_rule(out, ref, naive)


@pytest.mark.parametrize("window,c", [(1, 6), (5, 6), (6, 6), (7, 6), (13, 6), (100, 6)])
def test_a_window_needs_only_the_hops_it_reaches(window, c):
    w = 5
    spec = mask_spec(True, None, window)
    plan = production_plan(w * c, w, layout="contiguous", causal=True, mask=spec)
    hops = min(w - 1, math.ceil((window - 1) / c))  # the earliest key a query sees is window − 1 tokens back
    assert len(plan) == hops + 1
    assert all(len(rank_plan(w * c, w, r, "contiguous", True, mask=spec).steps) == hops + 1 for r in range(w))


def test_empty_blocks_are_never_launched():
    ids = document_ids_from_cu_seqlens([0, 12, 24])  # two documents over four shards of 6
    spec = mask_spec(True, ids[None], None)
    plan = production_plan(24, 4, layout="contiguous", causal=True, mask=spec)
    pairs = {(t, r) for t, step in enumerate(plan) for launch in step for r in range(*launch.ranks)}
    assert pairs == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 3)}  # rank 2's shard 1 is another document
    sched = ring_schedule(24, 4, causal=True, document_ids=ids)
    assert sum(len(s.blocks) for row in sched for s in row) == 6
    assert [blk.kind for blk in sched[1][2].skipped] == ["skip"]


@pytest.mark.parametrize("bad,kind,match", [
    (torch.tensor([0, 1, 0]), ValueError, "non-decreasing"),
    (torch.tensor([0.0, 1.0, 1.0]), TypeError, "integer dtype"),
    (torch.zeros(2, 4, dtype=torch.long), ValueError, "shape"),
    ([0, 0, 1], TypeError, "document_ids must be an integer torch.Tensor"),
])
def test_bad_document_ids_are_refused_by_name(bad, kind, match):
    with pytest.raises(kind, match=match):
        check_document_ids(bad, 1, 3)
    q, k, v = (x.detach()[:, :3] for x in _qkv())
    with pytest.raises(kind, match=match):
        ringbook.naive_attention(q, k, v, document_ids=bad)


@pytest.mark.parametrize("window,kind", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_window_is_refused_by_name(window, kind):
    q, k, v = (x.detach() for x in _qkv())
    with pytest.raises(kind, match="window must be"):
        ringbook.production_ring_attention(q, k, v, ring_size=3, causal=True, window=window)


# --------------------------------------------------------------------------- over a process group

def _rank(rank, world):
    n = 6 * world
    ids = document_ids_from_cu_seqlens([0, 1, 7, n])
    res = {}
    for layout in ("contiguous", "zigzag"):
        for window in (None, 3):
            g = torch.Generator().manual_seed(2)
            q, k, v = (torch.randn(2, n, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
            xs = [rd.shard(x, rank, world, layout).requires_grad_() for x in (q, k, v)]
            out, lse = rd.ring_attention(*xs, causal=True, layout=layout, document_ids=ids, window=window,
                                         timeout=30)
            out.sum().backward()
            res[(layout, window)] = (q, k, v, out.detach(), lse.detach(), [x.grad for x in xs])
    head_tail = document_ids_from_cu_seqlens([0, 2 * world, n])  # every document a multiple of 2w
    for window in (None, 3):  # the per-document head-tail layout: shards dealt from the documents
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, n, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
        xs = [rd.shard(x, rank, world, "doc_headtail", document_ids=head_tail).requires_grad_() for x in (q, k, v)]
        out, lse = rd.ring_attention(*xs, causal=True, layout="doc_headtail", document_ids=head_tail, window=window,
                                     timeout=30)
        out.sum().backward()
        res[("doc_headtail", window)] = (q, k, v, out.detach(), lse.detach(), [x.grad for x in xs])
    bad = ids.clone()
    if rank == 1:
        bad[-1] += 1  # rank 1 describes another sequence
    qs = rd.shard(torch.randn(1, n, 2, 3, dtype=torch.float64), rank, world)
    res["disagree"] = refusal(lambda: rd.ring_attention(qs, qs, qs, causal=True, document_ids=bad, timeout=10))
    res["no ids"] = refusal(lambda: rd.ring_attention(qs, qs, qs, causal=True, layout="doc_headtail", timeout=10))
    return res


@pytest.mark.slow
def test_the_distributed_ring_with_documents_and_a_window():
    world = 3
    results = rd.spawn(_rank, world, timeout=180)
    n = 6 * world
    ids = document_ids_from_cu_seqlens([0, 1, 7, n])
    checked = 0
    for key in results[0]:
        if key in ("disagree", "no ids"):
            continue
        layout, window = key
        docs = document_ids_from_cu_seqlens([0, 2 * world, n]) if layout == "doc_headtail" else ids
        for rank, res in enumerate(results):
            q, k, v, out, lse, grads = res[key]
            ref = [x.clone().requires_grad_() for x in (q, k, v)]
            ro, rl = ringbook.naive_attention(*ref, causal=True, document_ids=docs, window=window)
            ro.sum().backward()
            pos = layout_positions(n, world, layout, docs)[rank]
            torch.testing.assert_close(out, ro[:, pos].detach(), rtol=1e-10, atol=1e-10)
            assert torch.equal(torch.isneginf(lse), torch.isneginf(rl[:, :, pos]))
            for a, b in zip(grads, ref):
                torch.testing.assert_close(a, b.grad[:, pos], rtol=1e-10, atol=1e-10)
            checked += 1
    assert checked == 6 * world
    for res in results:
        assert res["disagree"]["type"] == "ValueError" and "same document_ids and window" in res["disagree"]["msg"]
        assert res["no ids"]["type"] == "ValueError" and "'doc_headtail' with document_ids" in res["no ids"]["msg"]


@pytest.mark.parametrize("window", [None, 1, 4, 40])
def test_the_readable_paths_take_both_masks(window):
    """ring_attention (one process, every layout) and blockwise_attention (every block size) with documents."""
    ids = _docs("random")
    for causal in (False, True):
        q, k, v = _qkv(seed=11)
        ref_out, ref_lse = ringbook.naive_attention(q, k, v, causal=causal, document_ids=ids, window=window)
        ref = torch.autograd.grad(ref_out.sum(), (q, k, v))
        calls = [lambda: ringbook.ring_attention(q, k, v, ring_size=w, causal=causal, layout=layout,
                                                 document_ids=ids, window=window)
                 for w, layout in ((3, "contiguous"), (3, "zigzag"), (5, "striped"))]
        calls += [lambda bs=bs: ringbook.blockwise_attention(q, k, v, block_size=bs, causal=causal, document_ids=ids,
                                                             window=window) for bs in (1, 7, 64)]
        for call in calls:
            out, lse = call()
            assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
            torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
            for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 3])
def test_the_strategies_teaching_forms_take_both_masks(window):
    from ringbook import strategies

    ids = document_ids_from_cu_seqlens([0, 5, 6, 17, 24])
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 24, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 24, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for causal in (False, True):
        ref_out, ref_lse = ringbook.naive_attention(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2),
                                                    causal=causal, document_ids=ids, window=window)
        ref = torch.autograd.grad(ref_out.sum(), (q, k, v))
        for call in (lambda: strategies.allgather_attention(q, k, v, ring_size=3, causal=causal, layout="zigzag",
                                                            document_ids=ids, window=window),
                     lambda: strategies.ulysses_attention(q, k, v, ring_size=2, causal=causal, document_ids=ids,
                                                          window=window),
                     lambda: strategies.usp_attention(q, k, v, ring_size=4, ulysses_size=2, causal=causal,
                                                      layout="zigzag", document_ids=ids, window=window)):
            out, lse = call()
            assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
            torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
            for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_windowed_ring_schedule_sends_only_the_hops_it_needs():
    from ringbook.strategies import bytes_sent, strategy_schedule

    kw = dict(heads=2, kv_heads=2, head_dim=3, dtype_bytes=2, causal=True, backward=True)
    dense = strategy_schedule("ring", 24, 6, **kw)
    windowed = strategy_schedule("ring", 24, 6, window=3, **kw)  # shards of 4: one hop back is enough
    assert len([s for s in windowed if s.phase == "forward"]) == 2
    assert sum(bytes_sent(windowed, 6)) < sum(bytes_sent(dense, 6)) / 2
    home = [m for s in windowed if s.phase == "backward" and s.step == 1 for m in s.messages]
    assert all(m.what == "dK/dV" and m.dst == (m.src - 1) % 6 for m in home)  # straight home, one rank back


def test_visible_pairs_counts_what_the_mask_leaves():
    from ringbook.masks import visible_keys, visible_pairs

    ids = _docs("random")
    pos = torch.arange(N)
    for causal in (False, True):
        for window in (None, 1, 3, 50):
            for docs in (None, ids):
                seen = keep(pos, pos, causal=causal, window=window, q_doc=None if docs is None else docs[None],
                            k_doc=None if docs is None else docs[None])
                want = N * N if seen is None else int(seen.sum())
                assert visible_pairs(N, causal=causal, document_ids=docs, window=window) == want
                per_query = visible_keys(N, causal=causal, document_ids=docs, window=window)
                assert per_query.tolist() == ([N] * N if seen is None else seen.reshape(N, N).sum(1).tolist())


def _packed(lengths: list[int]) -> torch.Tensor:
    return document_ids_from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()])


@pytest.mark.parametrize("lengths, world", [([72, 16, 8, 32], 4), ([72, 16, 8, 32], 2), ([8] * 5, 4), ([48], 3),
                                            ([6, 30, 12], 3), ([2, 2, 4], 1)])
def test_head_tail_is_a_permutation_that_balances_each_document(lengths, world):
    """Rank r holds chunks r and 2w − 1 − r of every document: a permutation, the causal work of every rank equal
    (each document balanced on its own), and on the uneven packing at least as good as zigzag."""
    from ringbook.schedule import head_tail_positions, layout_report

    ids, n = _packed(lengths), sum(lengths)
    pos = head_tail_positions(ids, world)
    assert pos.shape == (world, n // world) and torch.equal(pos.flatten().sort().values, torch.arange(n))
    assert torch.equal(pos, layout_positions(n, world, "doc_headtail", ids))
    assert torch.equal(pos, head_tail_positions(ids.expand(3, -1), world))  # a batch of the same documents
    start = 0
    for length in lengths:  # chunk r and chunk 2w − 1 − r of this document, in order
        m = length // (2 * world)
        for r in range(world):
            mine = pos[r][(pos[r] >= start) & (pos[r] < start + length)] - start
            assert mine.tolist() == [*range(r * m, (r + 1) * m), *range((2 * world - 1 - r) * m, (2 * world - r) * m)]
        start += length
    report = layout_report(n, world, causal=True, document_ids=ids)
    assert report["doc_headtail"].imbalance == 1.0
    assert report["doc_headtail"].busiest <= report["zigzag"].busiest
    if lengths == [72, 16, 8, 32]:
        assert report["zigzag"].imbalance > 1.3 and report["doc_headtail"].busiest < report["zigzag"].busiest / 2


def test_layout_report_by_hand():
    """Documents [12, 4] on 2 ranks, causal: query i of a document sees i + 1 keys (1..12, then 1..4)."""
    from ringbook.schedule import LayoutWork, best_layout, head_tail_positions, layout_report

    ids = _packed([12, 4])
    assert head_tail_positions(ids, 2).tolist() == [[0, 1, 2, 9, 10, 11, 12, 15], [3, 4, 5, 6, 7, 8, 13, 14]]
    report = layout_report(16, 2, causal=True, document_ids=ids)
    assert list(report) == ["contiguous", "zigzag", "striped", "doc_headtail"]
    # needed: contiguous 1+…+8 = 36 | 9+…+12 + 1+…+4 = 52; zigzag (chunks of 4: 0, 3 | 1, 2) 10 + 10 | 5+…+12;
    # striped 1+3+…+11 + 1+3 | 2+4+…+12 + 2+4; head-tail (6 + 33) + (1 + 4) | 4+…+9 + (2 + 3), mean 44.
    # computed (tile areas): contiguous 8×8 causal | two 8×8 masked; zigzag two 4×4 causal | 3 + 2 tiles of 16;
    # striped: no tile is empty, 2 × 64 each; head-tail: tiles of 3 and 1, 30 + 20 on each rank.
    assert report == {"contiguous": LayoutWork("contiguous", (36, 52), (64, 128)),
                      "zigzag": LayoutWork("zigzag", (20, 68), (32, 80)),
                      "striped": LayoutWork("striped", (40, 48), (128, 128)),
                      "doc_headtail": LayoutWork("doc_headtail", (44, 44), (50, 50))}
    assert [round(x.imbalance * 11, 9) for x in report.values()] == [13, 17, 12, 11]
    assert best_layout(16, 2, causal=True, document_ids=ids) == "doc_headtail"
    assert best_layout(16, 2, causal=True, document_ids=ids, layouts=("contiguous", "zigzag")) == "zigzag"
    assert best_layout(16, 2, causal=True) == "zigzag" and best_layout(16, 2, causal=False) == "contiguous"
    assert "doc_headtail" not in layout_report(16, 2, document_ids=_packed([6, 10]))  # 6 is no multiple of 4


def test_doc_headtail_runs_in_the_ring_and_the_shards(monkeypatch):
    """ring_attention(layout="doc_headtail", "best" or, with documents, the default) is exact; shard/unshard deal
    and restore it."""
    import ringbook.ring as ring_module

    ids = _packed([12, 4, 8])
    q, k, v = (torch.randn(2, 24, 2, 3, dtype=torch.float64) for _ in range(3))
    for causal, window in ((True, None), (False, 5), (True, 3)):
        ref_out, ref_lse = ringbook.naive_attention(q, k, v, causal=causal, document_ids=ids, window=window)
        for layout in ("doc_headtail", "best", None):  # None: "best", since document_ids are given
            out, lse = ringbook.ring_attention(q, k, v, ring_size=2, causal=causal, layout=layout, document_ids=ids,
                                               window=window)
            torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    chosen = []
    monkeypatch.setattr(ring_module, "best_layout", lambda *a, **kw: chosen.append(kw) or "doc_headtail")
    ringbook.ring_attention(q, k, v, ring_size=2, causal=True, document_ids=ids)
    ringbook.ring_attention(q, k, v, ring_size=2, causal=True)  # no documents: contiguous, not chosen
    assert len(chosen) == 1 and chosen[0]["document_ids"] is not None
    shards = [rd.shard(q, r, 2, "doc_headtail", document_ids=ids) for r in range(2)]
    assert torch.equal(shards[1], q[:, layout_positions(24, 2, "doc_headtail", ids)[1]])
    assert torch.equal(rd.unshard(shards, "doc_headtail", document_ids=ids), q)
    lse_shards = [rd.shard(ref_lse, r, 2, "doc_headtail", dim=2, ulysses_size=2, document_ids=ids) for r in range(2)]
    assert torch.equal(rd.unshard(lse_shards, "doc_headtail", dim=2, ulysses_size=2, document_ids=ids), ref_lse)


def test_doc_headtail_refusals_say_what_would_work():
    from ringbook.schedule import head_tail_positions

    with pytest.raises(ValueError, match=r"2·ring_size = 4 equal chunks, but documents 0 \(length 6\), 1 \(length 2\) "
                                         r"are not multiples of 4; ring sizes that fit these documents: \[1\], or pad"):
        head_tail_positions(_packed([6, 2]), 2)
    with pytest.raises(ValueError, match=r"document 1 \(length 6\) is not a multiple of 8; ring sizes that fit these "
                                         r"documents: \[1\]"):
        ringbook.ring_attention(*(torch.randn(1, 14, 1, 2) for _ in range(3)), ring_size=4, layout="doc_headtail",
                                document_ids=_packed([8, 6]))
    with pytest.raises(ValueError, match="no ring size fits"):
        head_tail_positions(_packed([3, 5]), 1)
    with pytest.raises(ValueError, match="batch row 1 packs different documents from row 0"):
        head_tail_positions(torch.stack([_packed([4, 4]), _packed([2, 6])]), 2)
    with pytest.raises(ValueError, match="'doc_headtail' is dealt from document_ids"):
        ringbook.ring_attention(*(torch.randn(1, 8, 1, 2) for _ in range(3)), ring_size=2, layout="doc_headtail")
    with pytest.raises(ValueError, match=r"dealt from the documents: pass document_ids="):
        rd.shard(torch.randn(1, 8, 1, 2), 0, 2, "doc_headtail")
