"""The ring schedule as data (ringbook.schedule): layouts deal every token once,
every rank meets every key/value shard once, shards move r → r+1, and the
block kinds (full / causal / skipped) agree with the token positions."""

from __future__ import annotations

import pytest
import torch

from ringbook import LAYOUTS, layout_positions, ring_schedule, work_per_rank
from ringbook.naive import causal_mask_positions
from ringbook.schedule import check_layout

RING_SIZES = range(1, 9)


def fitting_n(w: int, layout: str, k: int = 3) -> int:
    """A sequence length that ``layout`` can deal to ``w`` ranks, with k tokens per piece."""
    return 2 * w * k if layout == "zigzag" else w * k


# --- layouts --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("w", RING_SIZES)
def test_layout_deals_every_token_once(layout, w):
    n = fitting_n(w, layout)
    pos = layout_positions(n, w, layout)
    assert pos.shape == (w, n // w) and pos.dtype == torch.long
    assert torch.equal(pos.flatten().sort().values, torch.arange(n))


def test_layouts_by_example():
    assert layout_positions(8, 2, "contiguous").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout_positions(8, 2, "zigzag").tolist() == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert layout_positions(8, 2, "striped").tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout_positions(5, 1, "striped").tolist() == [[0, 1, 2, 3, 4]]


# --- the ring -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("w", RING_SIZES)
@pytest.mark.parametrize("causal", [False, True])
def test_every_rank_sees_every_shard_exactly_once(layout, w, causal):
    sched = ring_schedule(fitting_n(w, layout), w, layout=layout, causal=causal)
    assert len(sched) == w and all(len(row) == w for row in sched)
    for t, row in enumerate(sched):
        assert [s.rank for s in row] == list(range(w)) and all(s.step == t for s in row)
        assert sorted(s.kv_rank for s in row) == list(range(w))  # each shard is held by one rank
    for r in range(w):
        assert sorted(sched[t][r].kv_rank for t in range(w)) == list(range(w))
        assert sched[0][r].kv_rank == r  # a rank starts with its own shard
    for t in range(w - 1):  # shards move one rank along: r → r+1
        for r in range(w):
            assert sched[t + 1][(r + 1) % w].kv_rank == sched[t][r].kv_rank


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("w", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_block_kinds_agree_with_positions(layout, w, causal):
    """full = every key visible, causal = some, skipped = none; blocks tile each shard pair."""
    n = fitting_n(w, layout)
    c = n // w
    pos = layout_positions(n, w, layout)
    visible_total = 0
    for row in ring_schedule(n, w, layout=layout, causal=causal):
        for step in row:
            covered = torch.zeros(c, c, dtype=torch.int64)
            for blk in step.blocks + step.skipped:
                (qa, qb), (ka, kb) = blk.q, blk.kv
                covered[qa:qb, ka:kb] += 1
                keep = causal_mask_positions(pos[step.rank][qa:qb], pos[step.kv_rank][ka:kb])
                if causal:
                    expected = "full" if keep.all() else "skip" if not keep.any() else "causal"
                    assert blk.kind == expected, f"step {step.step} rank {step.rank}: {blk}"
                    visible_total += int(keep.sum())
                else:
                    assert blk.kind == "full"
            assert (covered == 1).all()  # every (query, key) pair of the step in exactly one block
            assert all(b.kind != "skip" for b in step.blocks) and all(b.kind == "skip" for b in step.skipped)
            if not causal:
                assert not step.skipped and all(b.kind == "full" for b in step.blocks)
    if causal:
        assert visible_total == n * (n + 1) // 2  # all causal pairs live in computed blocks


def test_contiguous_causal_skips_blocks_above_the_diagonal():
    sched = ring_schedule(12, 3, layout="contiguous", causal=True)
    for t, row in enumerate(sched):
        for r, step in enumerate(row):
            src = (r - t) % 3
            kind = "full" if src < r else "causal" if src == r else None
            assert [b.kind for b in step.blocks] == ([kind] if kind else [])
            assert step.computed == (kind is not None)


# --- load balance -----------------------------------------------------------------------------


@pytest.mark.parametrize("w", [2, 3, 4, 8])
def test_zigzag_balanced_contiguous_not(w):
    k = 4  # tokens per zigzag piece; a contiguous shard is c = 2k tokens
    n, c = 2 * w * k, 2 * k
    zig = work_per_rank(n, w, layout="zigzag", causal=True)
    con = work_per_rank(n, w, layout="contiguous", causal=True)
    dense = work_per_rank(n, w, layout="contiguous", causal=False)
    assert dense == [w * c * c] * w
    # zigzag: 3 piece blocks at step 0, 2 at every other step, on every rank
    assert zig == [(2 * w + 1) * k * k] * w, f"zigzag work per rank {zig}"
    # contiguous: rank r computes r full blocks and its diagonal; the last rank all of its row
    assert con == [(r + 1) * c * c for r in range(w)]
    assert max(con) > min(con)
    assert sum(zig) < sum(dense) and max(zig) < max(con)


def test_striped_is_balanced_but_skips_nothing():
    w, n = 4, 32
    striped = work_per_rank(n, w, layout="striped", causal=True)
    assert len(set(striped)) == 1
    assert striped == work_per_rank(n, w, layout="striped", causal=False)


# --- bad ring sizes and layouts --------------------------------------------------------------


@pytest.mark.parametrize("n,w,layout,need", [
    (72, 5, "contiguous", "ring_size = 5 must divide 72"),
    (72, 5, "striped", "ring_size = 5 must divide 72"),
    (36, 4, "zigzag", "2·ring_size = 8 must divide 36"),
    (7, 2, "contiguous", "ring_size = 2 must divide 7"),
])
def test_non_dividing_ring_size_names_the_fix(n, w, layout, need):
    for fn in (layout_positions, lambda *a: ring_schedule(*a[:2], layout=a[2])):
        with pytest.raises(ValueError, match=f"ring_size={w} does not fit sequence length {n}") as info:
            fn(n, w, layout)
        assert need in str(info.value)
        # the message lists the ring sizes up to 64 that fit
        works = [d for d in range(1, min(n, 64) + 1) if n % (2 * d if layout == "zigzag" else d) == 0]
        assert f"ring sizes that work: {works}" in str(info.value)


@pytest.mark.parametrize("w,err", [(0, ValueError), (-2, ValueError), (True, TypeError), (2.0, TypeError)])
def test_bad_ring_size(w, err):
    with pytest.raises(err, match="ring_size must be a positive int"):
        check_layout(8, w, "contiguous")


def test_unknown_layout():
    with pytest.raises(ValueError, match=r"layout must be one of \('contiguous', 'zigzag', 'striped'\)"):
        ring_schedule(8, 2, layout="spiral")
