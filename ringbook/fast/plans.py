"""Every plan of the ring engine, in one place, lowered from the one schedule.

:func:`ringbook.schedule.ring_schedule` says, for each step t and rank r,
which (query piece, key piece) blocks are computed and which are skipped. The
engine runs a :class:`~ringbook.fast.engine.Plan` of block calls. Lowering the
one into the other is :func:`rank_calls`: per (step, rank), the fewest kernel
calls that compute exactly the schedule's blocks —

* a rank's own shard (step 0) with ``causal``: one top-left causal call over
  the whole shard (every layout's positions increase along its shard, so the
  kernels' mask is exact, and it masks the skipped blocks);
* any other causal block: a top-left causal call where its position mask is
  the kernels' (striped, from an earlier rank), else a call with the token
  positions (:class:`~ringbook.fast.blocks.Positions`, the einops path);
* full blocks merged while their union is a rectangle (a zigzag step's two
  half-blocks become one call);
* with documents or a window (a :class:`~ringbook.masks.MaskSpec`): empty
  blocks never called, a block a boundary cuts a ``"masked"`` call
  (:class:`~ringbook.fast.blocks.Masked`), and the steps after the last one
  any rank needs dropped, so no hop nobody needs is sent.

The plans built from those calls:

* :func:`production_plan` — the one-process ring as launches: ranks whose
  calls are the same at a step run as one batched call (:class:`Launch`);
* :func:`stacked_plan` — those launches on the ranks stacked in the batch
  (:class:`~ringbook.fast.engine.StackedMover`); :func:`part_plan` — the
  same for a share of the query ranks (a long forward run in parts);
* :func:`rank_plan` — one rank's row, for a rank of a process group;
  :func:`allgather_plan` — one rank of all-gather context parallelism;
* :func:`stacked_dilated_plan` / :func:`rank_dilated_plan` — dilated attention
  as gathered blocks (:mod:`ringbook.fast.dilated`), from
  :func:`ringbook.ring_dilated.dilated_ring_plan`.

Each plan carries its traffic as data (``Plan.sent``, ``received``,
``grad_sent``: K vectors per batch row), and its work per step is
``Plan.work(batch, heads)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from .._utils import check_bool, check_positive_int
from ..masks import MaskSpec
from ..ring_dilated import DilatedRingPlan
from ..schedule import DOC_HEADTAIL, check_layout, gathered_rows, layout_positions, schedule_for
from .blocks import (
    CAUSAL,
    FULL,
    Block,
    Kernel,
    Masked,
    MaskedRanks,
    Positions,
    Strided,
    box,
    gather_spec,
    gathered_block,
    head_slots,
)
from .engine import Plan

PRODUCTION_LAYOUTS = ("contiguous", "zigzag")  # and "doc_headtail" with documents (positions_of)


@functools.lru_cache(maxsize=64)
def positions_of(n: int, world: int, layout: str, mask: MaskSpec | None = None) -> torch.Tensor:
    """``(w, c)``: the token positions each rank holds (:func:`~ringbook.schedule.layout_positions`; for
    ``"doc_headtail"`` dealt from the mask's documents). Cached per call shape."""
    ids = mask.ids() if mask is not None and layout == DOC_HEADTAIL else None
    return layout_positions(n, world, layout, ids)
Rows = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Call:
    """One kernel call of a rank at a step: query rows × key rows of the held shard, and its mask."""

    q: Rows
    kv: Rows
    kind: str  # "full", "causal" (top-left: a diagonal block), "positions" (the causal mask by token positions)
    # or "masked" (a document or window boundary cuts it: the kernel gets positions, documents and window)


def _top_left(qp: torch.Tensor, kp: torch.Tensor) -> bool:
    """Whether ``k_pos ≤ q_pos`` is the top-left causal mask: square, key i the last one query i sees."""
    return qp.numel() == kp.numel() and bool((kp[1:] > kp[:-1]).all()) and torch.equal(
        torch.searchsorted(kp, qp, right=True), torch.arange(1, qp.numel() + 1))


def _merge_full(calls: list[Call]) -> list[Call]:
    """Full calls merged while two of them share their key rows and abut in query rows, or the other way round."""
    calls = list(calls)
    merged = True
    while merged:
        merged = False
        for i, a in enumerate(calls):
            for j, b in enumerate(calls):
                if i == j or a.kind != "full" or b.kind != "full":
                    continue
                if a.kv == b.kv and a.q[1] == b.q[0]:
                    new = Call((a.q[0], b.q[1]), a.kv, "full")
                elif a.q == b.q and a.kv[1] == b.kv[0]:
                    new = Call(a.q, (a.kv[0], b.kv[1]), "full")
                else:
                    continue
                calls = [x for x_i, x in enumerate(calls) if x_i not in (i, j)]
                calls.insert(min(i, j), new)
                merged = True
                break
            if merged:
                break
    return calls


@functools.lru_cache(maxsize=128)
def rank_calls(n: int, world: int, layout: str, causal: bool,
               mask: MaskSpec | None = None) -> tuple[tuple[tuple[Call, ...], ...], ...]:
    """``calls[t][r]``: rank r's kernel calls at step t, lowered from :func:`~ringbook.schedule.ring_schedule`.

    (Module docstring.) Positions of a ``"positions"`` or ``"masked"`` call are
    ``layout_positions(n, world, layout)[r][q]`` and ``[(r − t) mod w][kv]``.
    ``mask``: documents and a window (:class:`~ringbook.masks.MaskSpec`, with
    the same ``causal``); empty blocks are not called, and the steps after the
    last one any rank needs are dropped (no hop nobody needs).
    """
    spec = mask if mask is not None else MaskSpec(bool(causal))
    if spec.causal != bool(causal):
        raise ValueError(f"rank_calls: the mask says causal={spec.causal} but causal={causal}")
    c = n // world
    if layout == DOC_HEADTAIL:  # two chunks of every document per rank: the whole shard is one masked call
        return tuple(tuple((Call((0, c), (0, c), "masked"),) for _ in range(world)) for _ in range(world))
    positions = positions_of(n, world, layout, mask)
    out = []
    for row in schedule_for(n, world, layout, spec):
        steps = []
        for step in row:
            if causal and spec.plain and step.blocks and step.kv_rank == step.rank:
                steps.append((Call((0, c), (0, c), "causal"),))  # the own shard: positions increase along it
                continue
            calls = []
            for blk in step.blocks:
                if blk.kind in ("full", "masked"):
                    calls.append(Call(blk.q, blk.kv, blk.kind))
                    continue
                qp = positions[step.rank, blk.q[0]:blk.q[1]]
                kp = positions[step.kv_rank, blk.kv[0]:blk.kv[1]]
                calls.append(Call(blk.q, blk.kv, "causal" if _top_left(qp, kp) else "positions"))
            steps.append(tuple(_merge_full(calls)))
        out.append(tuple(steps))
    while len(out) > 1 and not any(out[-1]):  # no rank computes anything at the last step: nobody needs its hop
        out.pop()
    return tuple(out)


def kernel_of(call: Call, rank: int, src: int, n: int, world: int, layout: str, spec: MaskSpec,
              device: str = "cpu") -> Kernel:
    """The block kernel of a call of ``rank`` on the shard that started on ``src``: FULL, CAUSAL, or the positions
    (and documents, window) it needs."""
    if call.kind == "full":
        return FULL
    if call.kind == "causal":
        return CAUSAL
    positions = positions_of(n, world, layout, spec if layout == DOC_HEADTAIL else None)
    qp, kp = positions[rank, call.q[0]:call.q[1]], positions[src, call.kv[0]:call.kv[1]]
    if call.kind == "positions":
        return Positions(qp.to(device), kp.to(device))
    ids = spec.ids()
    return Masked(qp.to(device), kp.to(device), spec.causal, None if ids is None else ids[:, qp].to(device),
                  None if ids is None else ids[:, kp].to(device), spec.window)


def _ring_traffic(n: int, world: int, kv_heads: int, steps: int | None = None) -> dict:
    """A ring's traffic per rank (K vectors per batch row) over ``steps`` steps (default ``world``): its shard
    ``steps − 1`` hops on; dK/dV a hop per step, the last one home (none when the plan never leaves the rank)."""
    steps = world if steps is None else steps
    shard = n // world * kv_heads
    return {"sent": (shard,) * (steps - 1) + (0,), "received": (shard,) * (steps - 1) + (0,),
            "grad_sent": (shard,) * steps if world > 1 and steps > 1 else (0,) * steps}


# --------------------------------------------------------------------------- one process: ranks stacked in the batch

@dataclasses.dataclass(frozen=True)
class Launch:
    """One batched kernel call of a ring step: ranks ``[r0, r1)`` at once, rows ``q`` × ``kv`` of their shards."""

    ranks: tuple[int, int]
    q: Rows  # query rows inside each rank's shard
    kv: Rows  # key rows inside the held shard
    kind: str  # "full", "causal" (diagonal: the same positions, top-left mask) or "masked" (one rank)


def _striped_message(layout: str) -> str:
    return (f"layout={layout!r} is not supported by production_ring_attention: its causal blocks interleave token "
            "positions, which the fused kernels' top-left causal mask cannot express. Use layout='zigzag' (it "
            "balances causal work too) or 'contiguous', or ringbook.ring_attention(layout='striped') to study it")


def production_plan(n: int, ring_size: int, *, layout: str = "contiguous", causal: bool = False,
                    mask: MaskSpec | None = None) -> list[tuple]:
    """``plan[t]``: the batched kernel calls (:class:`Launch`) of ring step t of the one-process ring.

    Lowered from the schedule (:func:`rank_calls`): at step t, consecutive
    ranks whose calls are the same run as one launch. So rank r, holding the
    shard that started on rank ``(r − t) mod w``, does:

    * non-causal (any layout): one call, all ranks, every row × every key;
    * causal, step 0: one diagonal causal call over the whole shard;
    * causal, contiguous, step t > 0: ranks ``t … w−1`` (shard from an
      earlier rank) see all of it; ranks before t skip it (never computed);
    * causal, zigzag (rank r holds chunks r and 2w−1−r, each ``c/2``), step
      t > 0: ranks ``0 … t−1`` attend the second half of their queries to
      all of it, ranks ``t … w−1`` all their queries to its first half.

    With documents or a window (``mask``) a block a boundary cuts is a
    ``"masked"`` launch: consecutive ranks with such a block over the same
    rows are one launch (each keeps its own positions and documents; the
    fused path stacks their variable-length sequences into one kernel call),
    cut where the held shards wrap past the last one at step t > 0. Empty
    blocks and the steps nobody needs are left out.
    """
    check_positive_int(n, "n")
    causal = check_bool(causal, "causal")
    check_layout(n, ring_size, layout, None if mask is None else mask.ids())
    if layout == DOC_HEADTAIL and (mask is None or mask.starts is None):
        raise ValueError(f"layout={DOC_HEADTAIL!r} is dealt from the documents: give the mask's document ids")
    if layout not in PRODUCTION_LAYOUTS + (DOC_HEADTAIL,):
        raise ValueError(_striped_message(layout))
    plan = []
    for t, row in enumerate(rank_calls(n, ring_size, layout, causal, mask)):
        launches, r0 = [], 0
        for r in range(1, ring_size + 1):
            if r == ring_size or row[r] != row[r0]:
                launches += [Launch((r0, r), call.q, call.kv, call.kind) for call in row[r0] if call.kind != "masked"]
                r0 = r
        masked: dict[tuple[Rows, Rows], list[int]] = {}
        for x in range(ring_size):
            for call in row[x]:
                if call.kind == "masked":
                    masked.setdefault((call.q, call.kv), []).append(x)
        for (q_rows, kv_rows), ranks in masked.items():
            start = ranks[0]
            for a, b in zip(ranks, [*ranks[1:], None]):
                if b is None or b != a + 1 or (t > 0 and b == t):  # a gap, or the held shards wrap at rank t
                    launches.append(Launch((start, a + 1), q_rows, kv_rows, "masked"))
                    start = b
        plan.append(tuple(launches))
    return plan


def _wraps(launch: Launch, t: int, world: int) -> bool:
    """Whether the shards held by the launch's ranks at step t wrap past the last shard (rank r holds r − t)."""
    r0, r1 = launch.ranks
    return (r0 - t) % world + (r1 - r0) > world


def _pieces(launch: Launch, t: int, world: int, batch: int, doubled: bool,
            kernel_for: Callable[[tuple[int, int]], Kernel | None] = lambda ranks: None) -> list[Block]:
    """The launch at step t as stacked block calls.

    Rank r holds shard ``(r − t) mod w``. With ``doubled`` the K/V are the
    stacked shards written twice (``[kv, kv]``) and the held shards are the
    window starting at row ``(w − t) mod w`` of it: one block. Without, a
    launch whose held shards wrap past the last one becomes two blocks
    (two kernel calls) over the single copy.
    """
    b, w = batch, world
    (r0, r1), qr, kr = launch.ranks, launch.q, launch.kv

    def kernel(ranks):
        return kernel_for(ranks) or (CAUSAL if launch.kind == "causal" else FULL)

    if doubled:
        base = (w - t) % w
        return [box(qr, kr, q_batch=(r0 * b, r1 * b), kv_batch=((base + r0) * b, (base + r1) * b),
                    kernel=kernel((r0, r1)))]
    s0 = (r0 - t) % w
    split = min(r1, r0 + (w - s0))  # ranks r0 … split−1 hold shards s0 … w−1; the rest hold 0 …
    blocks = [box(qr, kr, q_batch=(r0 * b, split * b), kv_batch=(s0 * b, (s0 + split - r0) * b),
                  kernel=kernel((r0, split)))]
    if split < r1:
        blocks.append(box(qr, kr, q_batch=(split * b, r1 * b), kv_batch=(0, (r1 - split) * b),
                          kernel=kernel((split, r1))))
    return blocks


@functools.lru_cache(maxsize=256)
def wraps(n: int, world: int, layout: str, causal: bool, mask: MaskSpec | None = None) -> bool:
    """Whether some launch's held shards wrap past the last one (doubled K/V make it one call); cached per shape."""
    launches = production_plan(n, world, layout=layout, causal=causal, mask=mask)
    return world > 1 and any(_wraps(launch, t, world) for t, step in enumerate(launches) for launch in step)


@functools.lru_cache(maxsize=256)
def stacked_plan(n: int, world: int, batch: int, kv_heads: int, *, layout: str, causal: bool, doubled: bool,
                 merge_group: int = 1, grad_group: int = 1, mask: MaskSpec | None = None, device: str = "cpu") -> Plan:
    """:func:`production_plan` as the engine's :class:`~ringbook.fast.engine.Plan` of stacked block calls.

    Its traffic is what each rank of a real ring would send (one process moves nothing).
    """
    launches = production_plan(n, world, layout=layout, causal=causal, mask=mask)
    spec = mask or MaskSpec(bool(causal))
    steps = tuple(tuple(blk for launch in step for blk in _pieces(
        launch, t, world, batch, doubled,
        functools.partial(_launch_kernel, launch, t, n, world, layout, spec, device)))
        for t, step in enumerate(launches))
    return Plan(steps, merge_group=merge_group, grad_group=grad_group,
                **_ring_traffic(n, world, kv_heads, len(launches)))


def _launch_kernel(launch: Launch, t: int, n: int, world: int, layout: str, spec: MaskSpec, device: str,
                   ranks: tuple[int, int] | None = None) -> Kernel | None:
    """A masked launch's kernel over its ranks ``ranks`` (default: all of them): each rank's positions and
    documents (:class:`Masked`, stacked as :class:`MaskedRanks`); None for the others (FULL/CAUSAL)."""
    if launch.kind != "masked":
        return None
    parts = tuple(kernel_of(Call(launch.q, launch.kv, "masked"), r, (r - t) % world, n, world, layout, spec, device)
                  for r in range(*(ranks or launch.ranks)))
    return parts[0] if len(parts) == 1 else MaskedRanks(parts)


@functools.lru_cache(maxsize=256)
def part_plan(n: int, world: int, batch: int, ranks: tuple[int, int], *, layout: str, causal: bool,
              merge_group: int = 1, mask: MaskSpec | None = None, device: str = "cpu") -> Plan:
    """:func:`production_plan` for the query ranks ``[g0, g1)`` alone, on K/V gathered for them
    (:class:`ringbook.fast.stacked.GatherMover`)."""
    g0, g1 = ranks
    steps = []
    spec = mask or MaskSpec(bool(causal))
    for t, step in enumerate(production_plan(n, world, layout=layout, causal=causal, mask=mask)):
        blocks = []
        for launch in step:
            r0, r1 = max(launch.ranks[0], g0), min(launch.ranks[1], g1)
            if r0 < r1:
                rows = ((r0 - g0) * batch, (r1 - g0) * batch)
                kernel = _launch_kernel(launch, t, n, world, layout, spec, device, (r0, r1))
                blocks.append(box(launch.q, launch.kv, q_batch=rows, kv_batch=rows,
                                  kernel=kernel or (CAUSAL if launch.kind == "causal" else FULL)))
        steps.append(tuple(blocks))
    return Plan(tuple(steps), merge_group=merge_group)


# --------------------------------------------------------------------------- one rank of a process group

@functools.lru_cache(maxsize=64)
def rank_plan(n: int, world: int, rank: int, layout: str, causal: bool, *, kv_heads: int = 1,
              device: str = "cpu", merge_group: int = 1, grad_group: int = 1, mask: MaskSpec | None = None) -> Plan:
    """This rank's row of :func:`rank_calls` as the engine's :class:`~ringbook.fast.engine.Plan` (all batch rows).

    Step t attends the shard held then (the one that started on rank
    ``(rank − t) mod w``). A causal call the kernels' top-left mask cannot
    express carries its token positions (on ``device``) and runs on the
    einops path. ``kv_heads`` only scales the traffic the plan reports.
    Built once per call shape (on the CPU).
    """
    spec = mask or MaskSpec(bool(causal))
    steps = []
    for t, row in enumerate(rank_calls(n, world, layout, causal, mask)):
        src = (rank - t) % world
        steps.append(tuple(box(call.q, call.kv, kernel=kernel_of(call, rank, src, n, world, layout, spec, device))
                           for call in row[rank]))
    return Plan(tuple(steps), merge_group=merge_group, grad_group=grad_group,
                **_ring_traffic(n, world, kv_heads, len(steps)))


@functools.lru_cache(maxsize=32)
def gather_order(n: int, world: int, layout: str) -> torch.Tensor | None:
    """The all-gathered K/V's rows in token order: ``order[t]`` is the row (shard s at ``s·c …``) holding token t.

    None where no reordering is wanted: contiguous shards are in token order
    already, and a striped shard's tokens are not runs of tokens (its blocks
    stay in shard order). For zigzag, one index copy turns every other rank's
    two half-shards into one run of earlier tokens: a rank's queries then read
    the keys before them in one call, not one call per shard (as Llama 3 and
    ring-flash-attention's all-gather reorder the gathered K/V).
    """
    if layout != "zigzag" or world == 1:
        return None
    return torch.argsort(layout_positions(n, world, layout).flatten())


def _token_runs(call: Call, positions: torch.Tensor, src: int) -> list[tuple[Call, Rows]]:
    """``call`` on shard ``src`` cut where its keys stop being consecutive tokens: ``[(piece, token rows), …]``,
    each piece in the shard's own rows."""
    kp = positions[src, call.kv[0]:call.kv[1]]
    cuts = [0, *((torch.nonzero(kp[1:] != kp[:-1] + 1).flatten() + 1).tolist()), kp.numel()]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        kind = "positions" if call.kind == "causal" and len(cuts) > 2 else call.kind  # top-left on the whole only
        out.append((Call(call.q, (call.kv[0] + a, call.kv[0] + b), kind), (int(kp[a]), int(kp[a]) + b - a)))
    return out


@functools.lru_cache(maxsize=256)
def allgather_plan(n: int, world: int, rank: int, layout: str, causal: bool, *, kv_heads: int = 1,
                   device: str = "cpu", merge_group: int = 1, grad_group: int = 1,
                   mask: MaskSpec | None = None) -> Plan:
    """One rank of all-gather context parallelism (Llama 3): its own shard first, then every other shard at once.

    Step 0 attends the rank's queries to its own K/V (the schedule's step 0,
    computed while the all-gather is in flight); step 1 to the gathered K/V
    of the whole sequence: the schedule's steps 1 … w−1 with their key rows
    moved there, full calls merged where they abut. The gathered rows are in
    token order where :func:`gather_order` reorders them (zigzag: a rank's
    queries read all the keys before them in one call), else in shard order
    (shard s at rows ``s·c …``). Under a causal window on contiguous shards
    only each shard's last ``L = min(c, W − 1)`` rows are gathered
    (:func:`ringbook.schedule.gathered_rows`), at rows ``s·L …``. ``mask``:
    documents and a window, as :func:`rank_calls`. Traffic: the all-gather
    brings ``(w − 1)·L`` K vectors per kv head (and sends as many, on a ring
    algorithm); the backward reduce-scatters dK/dV, as much again.
    """
    spec = mask or MaskSpec(bool(causal))
    c = n // world
    rows = gathered_rows(n, world, layout=layout, causal=bool(causal), window=spec.window)
    calls = rank_calls(n, world, layout, causal, mask)
    positions = layout_positions(n, world, layout)
    in_tokens = rows == c and gather_order(n, world, layout) is not None
    own = tuple(box(x.q, x.kv, kernel=kernel_of(x, rank, rank, n, world, layout, spec, device)) for x in calls[0][rank])
    full, rest = [], []
    for t in range(1, len(calls)):
        src = (rank - t) % world
        for x in calls[t][rank]:
            if x.kv[0] < c - rows:  # a cut block's rows before the gathered tail: no query of it sees them
                if x.kind == "full" or x.kv[1] <= c - rows:
                    raise RuntimeError(f"allgather_plan: rank {rank} reads rows {x.kv} of shard {src} ({x.kind}), "
                                       f"but only its last {rows} rows are gathered")
                x = Call(x.q, (c - rows, x.kv[1]), x.kind)
            at = src * rows - (c - rows)  # shard src's last `rows` rows sit at src·rows … in the gathered K/V
            pieces = _token_runs(x, positions, src) if in_tokens else [(x, (x.kv[0] + at, x.kv[1] + at))]
            for piece, where in pieces:
                if piece.kind == "full":  # merged where they abut
                    full.append(Call(piece.q, where, "full"))
                else:
                    kernel = kernel_of(piece, rank, src, n, world, layout, spec, device)
                    rest.append(box(piece.q, where, kernel=kernel))
    rest = [box(x.q, x.kv) for x in _merge_full(full)] + rest
    steps = (own, tuple(rest)) if world > 1 else (own,)
    gathered = (world - 1) * rows * kv_heads
    return Plan(steps, merge_group=merge_group, grad_group=grad_group, sent=(gathered, 0)[:len(steps)],
                received=(gathered, 0)[:len(steps)], grad_sent=(0, gathered)[:len(steps)])


# --------------------------------------------------------------------------- dilated attention: gathered blocks

@functools.lru_cache(maxsize=128)
def stacked_dilated_plan(n: int, num_heads: int, kv_heads: int, pairs: tuple, patterns: tuple, *, causal: bool,
                         device: str) -> Plan:
    """The one-process dilated plan: one step, one gathered block per pair over every segment.

    ``pairs`` ``((s, r), …)`` and ``patterns`` (:func:`ringbook.dilated.pair_heads`,
    as tuples). A pair's block writes its heads' rows if no earlier pair used
    those heads (grouped heads), else merges into them. The ring size changes
    where the rows live, not what is computed (:mod:`ringbook.fast.dilated`),
    so this plan has no ring size and moves nothing.
    """
    blocks, seen = [], set()
    for (seg, r), (hs, offs) in zip(pairs, patterns):
        slots = head_slots(hs, offs, num_heads // kv_heads)
        spec = gather_spec(seg, r, slots, q_at=0, kv_at=0, count=n // seg, q_rows=(0, seg // r),
                           kv_rows=(0, seg // r), first=not (seen & set(hs)), device=device)
        seen |= set(hs)
        blocks.append(gathered_block(spec, causal=causal))
    return Plan((tuple(blocks),))


def dilated_window(plan: DilatedRingPlan, rank: int) -> tuple[int, int]:
    """Token range ``[lo, hi)`` of the K/V rows a rank's dilated blocks read: its shard and its segments' other pieces.

    ``plan``: a :class:`ringbook.ring_dilated.DilatedRingPlan`. Causal: no key
    after the shard's end is ever seen, so the window ends there.
    """
    c = plan.shard_len
    base = rank * c
    lo = min(base // seg * seg for seg, _ in plan.pairs)
    hi = base + c if plan.causal else max(-(-(base + c) // seg) * seg for seg, _ in plan.pairs)
    return lo, hi


@functools.lru_cache(maxsize=256)
def rank_dilated_plan(plan: DilatedRingPlan, rank: int, kv_group: int, device: torch.device | str, traffic: tuple = ((), (), ())
                      ) -> Plan:
    """One rank's gathered blocks of a :class:`~ringbook.ring_dilated.DilatedRingPlan`: one step, blocks per pair.

    Per pair: one block over the run of segments inside the shard, and one
    per spanning segment over the rank's piece of it — queries from the
    shard, keys from the window (:func:`dilated_window`): the whole segment,
    or with ``causal`` the pieces up to this rank's (its diagonal square,
    masked, plus the earlier pieces unmasked). At most three blocks per pair
    (five causal), whatever the number of segments. ``traffic``:
    ``(sent, received, grad_sent)`` of its one step, from the exchange's routes
    (:func:`ringbook.distributed.dilated.routes`). Cached per call shape: the
    walk over the segments runs once, not per call.
    """
    c, base = plan.shard_len, rank * plan.shard_len
    lo, _ = dilated_window(plan, rank)
    blocks, seen = [], set()
    for p, ((seg_len, r), (hs, offs)) in enumerate(zip(plan.pairs, plan.patterns)):
        slots = head_slots(hs, offs, kv_group)
        first = not (seen & set(hs))
        seen |= set(hs)
        m = seg_len // r
        segs = plan.segments_on(rank, p)
        local = [s for s in segs if s.kind == "local"]
        if local:
            spec = gather_spec(seg_len, r, slots, q_at=local[0].start - base, kv_at=local[0].start - lo,
                               count=len(local), q_rows=(0, m), kv_rows=(0, m), first=first, device=device)
            blocks.append(gathered_block(spec, causal=plan.causal))
        for s in segs:
            if s.kind == "local":
                continue
            a, z = s.piece(rank, c)
            if (a - s.start) % r or (z - s.start) % r:  # the piece ends between kept rows: rows differ by offset
                blocks += _strided_blocks(s, a, z, r, m, hs, offs, kv_group, base, lo, first, plan.causal, device)
                continue
            rows = ((a - s.start) // r, (z - s.start) // r)
            common = dict(q_at=s.start - base, kv_at=s.start - lo, count=1, q_rows=rows, device=device)
            if not plan.causal:
                blocks.append(gathered_block(gather_spec(seg_len, r, slots, kv_rows=(0, m), first=first, **common),
                                             causal=False))
                continue
            blocks.append(gathered_block(gather_spec(seg_len, r, slots, kv_rows=rows, first=first, **common),
                                         causal=True))
            if rows[0] > 0:  # the earlier pieces, all before this rank's queries
                blocks.append(gathered_block(gather_spec(seg_len, r, slots, kv_rows=(0, rows[0]), first=False,
                                                         **common), causal=False))
    sent, received, grad_sent = traffic
    return Plan((tuple(blocks),), sent=sent, received=received, grad_sent=grad_sent)


def _strided_blocks(s, a: int, z: int, r: int, m: int, hs, offs, kv_group: int, base: int, lo: int, first: bool,
                    causal: bool, device) -> list[Block]:
    """A spanning piece ``[a, z)`` not aligned to the rate: one :class:`~ringbook.fast.blocks.Strided` block per
    offset (its heads' kept query rows in the piece; keys: the segment's kept rows, or with ``causal`` the diagonal
    square and the earlier rows)."""
    blocks = []
    for o in sorted(set(offs)):
        heads = [h for h, x in zip(hs, offs) if x == o]
        q_heads, _, kv_heads, _ = head_slots(heads, [o] * len(heads), kv_group)
        j0, j1 = -(-(a - s.start - o) // r), -(-(z - s.start - o) // r)  # the piece's kept rows at offset o
        if j1 <= j0:
            continue
        qh, kh = (torch.tensor(x, dtype=torch.long, device=device) for x in (q_heads, kv_heads))
        q_start = s.start + j0 * r + o - base

        def strided(k0, n_k, is_first, qh=qh, kh=kh, q_start=q_start, n_q=j1 - j0):
            return Strided(r, q_start, n_q, s.start + k0 * r + o - lo, n_k, qh, kh, is_first)

        if not causal:
            blocks.append(Block(strided(0, m, first), FULL))
            continue
        blocks.append(Block(strided(j0, j1 - j0, first), CAUSAL))
        if j0 > 0:  # the earlier kept rows, all before this piece's queries
            blocks.append(Block(strided(0, j0, False), FULL))
    return blocks
