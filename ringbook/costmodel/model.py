"""Cost of each strategy on a machine, read from :func:`ringbook.strategy_schedule`.

For every step of a strategy's schedule: each device's compute seconds (its
:class:`~ringbook.strategies.Work` blocks as kernel calls, timed by the
machine's :class:`~ringbook.costmodel.machine.KernelRate`) and each message's
seconds on the link between its ends; then :func:`~ringbook.costmodel.simulate.simulate`
plays them on one compute and one communication stream per device.

Kernel calls: the blocks of one :class:`~ringbook.schedule.Step` that share
their query rows and kind form one call (the keys stacked), so a zigzag step
makes one or two calls; ``one_process=True`` plays every rank on one device
and stacks the same call of all ranks into one launch, as the production
engine does. Each call's result is then folded into float32 accumulators at
the machine's memory bandwidth (:func:`fold_bytes`).

Documents and a window (``Workload(documents=, window=)``) go to the
schedule, which leaves out the blocks no query sees and the ring's hops
nobody needs; so communication counts only the hops that are sent. Each
block left is counted in tokens of the workload
(:func:`ringbook.costmodel.visible.visible_pairs`, exact): ``"full"`` when
every pair is seen, ``"causal"`` when only the causal mask cuts it (half its
area, as the benchmarks count), else ``"masked"``. A masked call is costed
by the tiles a fused kernel computes for it (``Machine.fused``: the tiles its
visible pairs touch, :func:`ringbook.costmodel.visible.tile_counts`, each
computed whole, plus a cost per tile row and per masked tile,
:meth:`~ringbook.costmodel.machine.FusedMasked.call_time`), by its visible
pairs at the causal rate without one, or, with ``Machine.masked``, as the
whole block on a dense masked kernel (see :mod:`ringbook.costmodel.machine`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch

from .._utils import check_bool, check_positive_int
from ..masks import check_window
from ..schedule import Step, layout_pieces
from ..strategies import CommStep, Work, bytes_sent, lcm_heads, strategy_schedule
from .machine import FusedMasked, Machine
from .simulate import Phase, Timeline, Transfer, simulate
from .visible import Tiles, tile_counts, visible_pairs

RESULTS = frozenset({"out", "lse", "dq", "dK/dV"})  # sent after the step's compute
MAX_SCHEDULED = 64  # ring steps and all-gather peers read exactly up to this many; beyond, see predict


@dataclasses.dataclass(frozen=True)
class Workload:
    """What to run: ``devices`` GPUs, ``seq_len`` tokens, heads/kv heads, head dim, bytes per element, the mask.

    ``documents``: the lengths of the packed documents, in order, summing to
    ``seq_len`` (the same in every batch row; :func:`packed` makes equal
    ones); ``window``: a sliding window of ``W`` tokens (:mod:`ringbook.masks`:
    causal ``i − W < j ≤ i``, else ``|i − j| < W``).
    """

    devices: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    dtype_bytes: int = 2
    causal: bool = True
    backward: bool = False
    batch: int = 1
    documents: tuple[int, ...] | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        for name in ("devices", "seq_len", "heads", "kv_heads", "head_dim", "dtype_bytes", "batch"):
            check_positive_int(getattr(self, name), name)
        check_bool(self.causal, "causal")
        check_bool(self.backward, "backward")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads} must divide heads={self.heads}")
        if self.documents is not None:
            docs = self.documents
            if isinstance(docs, (str, bytes)) or not isinstance(docs, Sequence) or not docs:
                raise ValueError(f"documents must be a non-empty sequence of document lengths (tokens) summing to "
                                 f"seq_len={self.seq_len}, or None; got {docs!r}")
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in docs):
                raise ValueError(f"documents must be positive int lengths, got {list(docs)[:8]!r}…")
            if sum(docs) != self.seq_len:
                raise ValueError(f"documents must sum to seq_len={self.seq_len} (every token in one document), they "
                                 f"sum to {sum(docs)}; packed(seq_len, count) makes {self.seq_len} tokens of equal ones")
            object.__setattr__(self, "documents", tuple(int(x) for x in docs))
        check_window(self.window)

    @property
    def masked(self) -> bool:
        """Two documents or more, or a window shorter than the sequence: some blocks are cut or left out."""
        return (self.documents is not None and len(self.documents) > 1) or (self.window or self.seq_len) < self.seq_len

    @functools.cached_property
    def starts(self) -> tuple[int, ...] | None:
        """Each document's first token, or None."""
        if self.documents is None:
            return None
        return (0, *itertools.accumulate(self.documents[:-1]))

    @property
    def flops(self) -> float:
        """Forward FLOPs of the whole attention, ``4·b·h·d`` per visible pair: ``4·b·h·n²·d`` (half for causal)."""
        f = 4 * self.batch * self.heads * self.head_dim
        if self.masked:
            return f * visible_pairs((0, self.seq_len), (0, self.seq_len), causal=self.causal, window=self.window,
                                     starts=self.starts, n=self.seq_len)
        return f * self.seq_len ** 2 / (2 if self.causal else 1)


def packed(seq_len: int, count: int) -> tuple[int, ...]:
    """``count`` documents of (nearly) equal length filling ``seq_len`` tokens: the first ``seq_len % count`` one longer."""
    n, m = check_positive_int(seq_len, "seq_len"), check_positive_int(count, "count")
    if m > n:
        raise ValueError(f"count={m} documents do not fit seq_len={n} tokens (one token each at least)")
    return tuple(n // m + (i < n % m) for i in range(m))


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One schedule step: the slowest device's compute and communication seconds, and whether the second hides."""

    phase: str
    step: int
    collective: str
    compute: float
    comm: float

    @property
    def hides(self) -> bool:
        return self.comm <= self.compute or self.comm == 0


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A strategy on a machine: total seconds, per-step costs, timeline, memory per device, or why it is ruled out."""

    label: str
    strategy: str
    layout: str
    ulysses_size: int | None
    total: float
    steps: tuple[StepCost, ...]
    timeline: Timeline | None
    memory: float
    bytes_per_device: float
    ruled_out: str | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.ruled_out is None


def candidates(work: Workload) -> list[tuple[str, str, int | None]]:
    """``(strategy, layout, ulysses_size)`` for the ring (each layout), all-gather, Ulysses and every hybrid.

    All-gather and the hybrids deal zigzag when causal (balanced work), but contiguously with documents or a
    window: most of the work then stays near the diagonal, so contiguous is balanced too and leaves the ring's
    far hops out, which zigzag (every rank holding an early and a late chunk) cannot.
    """
    w = work.devices
    bal = "zigzag" if work.causal and not work.masked else "contiguous"
    out = [("ring", "contiguous", None), ("ring", "zigzag", None), ("allgather", bal, None), ("ulysses", "contiguous", None)]
    out += [("usp", bal, u) for u in range(2, w) if w % u == 0]
    return out


def label(strategy: str, layout: str, ulysses_size: int | None, devices: int) -> str:
    if strategy == "usp":
        return f"hybrid {ulysses_size}×{devices // ulysses_size}"
    return {"ring": f"ring ({layout})", "allgather": "all-gather", "ulysses": "Ulysses"}[strategy]


def fold_bytes(rows: int, keys: int, heads: float, work: Workload, backward: bool = False) -> float:
    """Bytes one kernel call's fold moves through device memory (the merge, or the gradients' sum).

    Forward (the online-softmax merge of notebook 01): the call's out
    (``e`` bytes) and lse (4) are read, the float32 running out and lse read
    and written: ``b·rows·h·(d·(e + 8) + 12)``. Backward: the call's dq and
    dK/dV are read and added into float32 accumulators:
    ``b·(rows·h + 2·keys·g)·d·(e + 8)``, ``g = h·kv_heads/heads``.
    """
    b, d, e = work.batch, work.head_dim, work.dtype_bytes
    if backward:
        return b * (rows * heads + 2 * keys * heads * work.kv_heads / work.heads) * d * (e + 8)
    return b * rows * heads * (d * (e + 8) + 12)


_NO_TILES = Tiles(0, 0, 0, 0)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One kernel call: query rows and key rows (tokens), heads, its kind, area and counted pairs (per head)."""

    rank: int
    step: int
    rows: int
    keys: int
    heads: float
    kind: str  # "full", "causal" or "masked"
    area: float
    pairs: float  # full: the area; causal: half of it (the benchmarks' count); masked: the visible pairs
    tiles: Tiles = _NO_TILES  # masked, with a fused kernel: the tiles it computes (per head; averaged when stacked)


@functools.lru_cache(maxsize=64)
def _offsets(n: int, shards: int, layout: str) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per shard, ``(offset inside the shard, first token)`` of each piece."""
    out = []
    for pieces in layout_pieces(n, shards, layout):
        off, row = 0, []
        for a, b in pieces:
            row.append((off, a))
            off += b - a
        out.append(tuple(row))
    return tuple(out)


def _tokens(rows: tuple[int, int], pieces: tuple[tuple[int, int], ...], k: int) -> tuple[int, int]:
    """A block's rows inside its shard as token positions of the workload (the schedule read at ``n/k``)."""
    off, first = max(p for p in pieces if p[0] <= rows[0])
    return (first + rows[0] - off) * k, (first + rows[1] - off) * k


def _blocks(wk: Work, st: Step, work: Workload, n: int, k: int,
            fused: FusedMasked | None = None) -> Iterator[tuple[tuple[int, int], str, int, float, Tiles]]:
    """``(query rows, kind, area, pairs, tiles)`` of each block ``st`` computes, in tokens of ``work`` (module
    docstring).

    The schedule was read at ``n = seq_len/k`` tokens. Without documents or a
    window its kinds stand (a causal block counts half its area). With them
    every block is counted exactly in tokens: all pairs seen → full; only the
    causal mask cuts → causal; else masked, counted by its visible pairs and,
    with ``fused``, by the tiles that kernel computes for it.
    """
    for blk in st.blocks:
        area = blk.area * k * k
        if not work.masked:
            yield blk.q, blk.kind, area, area / 2 if blk.kind == "causal" else area, _NO_TILES
            continue
        offsets = _offsets(n, wk.shards, wk.layout)
        q, kv = _tokens(blk.q, offsets[st.rank], k), _tokens(blk.kv, offsets[st.kv_rank], k)
        seen = visible_pairs(q, kv, causal=work.causal, window=work.window, starts=work.starts, n=work.seq_len)
        if seen == area:
            yield blk.q, "full", area, area, _NO_TILES
        elif work.causal and seen == visible_pairs(q, kv, causal=True):
            yield blk.q, "causal", area, area / 2, _NO_TILES
        elif seen:
            tiles = _NO_TILES if fused is None else tile_counts(
                q, kv, causal=work.causal, window=work.window, starts=work.starts, n=work.seq_len, tile=fused.tile,
                aligned=fused.aligned)
            yield blk.q, "masked", area, seen, tiles


def _add(a: Tiles, b: Tiles, wa: float = 1.0, wb: float = 1.0) -> Tiles:
    """``wa·a + wb·b``, field by field (tile counts of calls stacked into one)."""
    if b is _NO_TILES and wa == 1.0:
        return a
    return Tiles(wa * a.tiles + wb * b.tiles, wa * a.partial + wb * b.partial, wa * a.rows + wb * b.rows,
                 wa * a.banded + wb * b.banded)


def _calls(cs: CommStep, work: Workload, n: int, k: int, fused: FusedMasked | None = None) -> Iterator[_Call]:
    """The kernel calls of a step: each rank's blocks of one Step grouped by query rows and kind (keys stacked)."""
    for wk in cs.work:
        nh = wk.heads[1] - wk.heads[0]
        for st in wk.steps:
            group: dict[tuple, list] = defaultdict(lambda: [0, 0, 0.0, _NO_TILES])
            for q, kind, area, pairs, tiles in _blocks(wk, st, work, n, k, fused):
                acc = group[(q, kind)]
                acc[0] += area // ((q[1] - q[0]) * k)  # key rows
                acc[1] += area
                acc[2] += pairs
                acc[3] = _add(acc[3], tiles)
            for (q, kind), (keys, area, pairs, tiles) in group.items():
                yield _Call(wk.rank, st.step, (q[1] - q[0]) * k, keys, nh, kind, area, pairs, tiles)


def _seconds(c: _Call, work: Workload, machine: Machine, backward: bool) -> float:
    """A call's kernel seconds (4·b·h·d FLOPs per counted pair) plus its fold at the machine's memory bandwidth."""
    per_pair = 4 * work.batch * c.heads * work.head_dim
    fold = fold_bytes(c.rows, c.keys, c.heads, work, backward) / machine.hbm if machine.hbm else 0.0
    if c.kind == "masked" and machine.masked is not None:  # a dense masked kernel: every pair, at its full rate
        kern, t = machine.masked, machine.masked.call_time(per_pair * c.area, False)
    elif c.kind == "masked" and machine.fused is not None:  # a fused masked kernel: the tiles it computes
        fz, tl = machine.fused, c.tiles
        return fz.call_time(per_pair * fz.tile ** 2, tl.tiles, tl.partial, tl.rows, tl.banded, backward) + fold
    else:  # full at the full rate; causal and masked by the pairs they count, at the causal rate
        kern, t = machine.kernel, machine.kernel.call_time(per_pair * c.pairs, c.kind != "full")
    t *= kern.backward if backward else 1.0
    return t + fold


def _phases(schedule: list[CommStep], work: Workload, machine: Machine, devices: int,
            one_process: bool, n: int, k: int = 1) -> list[Phase]:
    phases = []
    for cs in schedule:
        backward = cs.phase == "backward"
        if one_process:  # the same call of every rank: one launch, the ranks stacked like heads
            launches: dict[tuple, _Call] = {}
            for c in _calls(cs, work, n, k, machine.fused):
                key = (c.step, c.rows, c.area, c.kind)
                prev = launches.get(key)
                heads = None if prev is None else prev.heads + c.heads
                launches[key] = c if prev is None else dataclasses.replace(
                    prev, heads=heads, pairs=(prev.pairs * prev.heads + c.pairs * c.heads) / heads,
                    tiles=_add(prev.tiles, c.tiles, prev.heads / heads, c.heads / heads))
            sec = sum(_seconds(c, work, machine, backward) for c in launches.values())
            phases.append(Phase(f"{cs.phase} {cs.step}", (sec,), ()))
            continue
        comp = [0.0] * devices
        for c in _calls(cs, work, n, k, machine.fused):
            comp[c.rank] += _seconds(c, work, machine, backward)
        sync = cs.collective not in ("p2p", "")
        per_pair: dict[tuple, float] = defaultdict(float)
        for m in cs.messages:
            per_pair[(m.src, m.dst, m.what in RESULTS)] += m.nbytes * k
        transfers = []
        for (src, dst, res), nb in per_pair.items():
            link = machine.link(src, dst)
            sec = nb / link.bandwidth + (link.latency if not sync else 0.0)
            transfers.append(Transfer(src, dst, sec, res))
        if sync and transfers:  # a collective: one latency per peer it waits for
            transfers = [dataclasses.replace(t, seconds=t.seconds + machine.link(t.src, t.dst).latency)
                         for t in transfers]
        phases.append(Phase(f"{cs.phase} {cs.step} {cs.collective}".strip(), tuple(comp), tuple(transfers), sync))
    return phases


def memory_per_device(strategy: str, work: Workload, ulysses_size: int | None = None) -> float:
    """Bytes of tensors one device holds at its peak (kernel workspace and the allocator's slack left out).

    Its shard of q, k, v and out in the input dtype, the lse and a float32
    output accumulator, plus what the strategy brings in: two K/V buffers for
    a ring hop (the one in use and the one arriving), the whole sequence's K/V
    for all-gather, ``n`` tokens of ``h/u`` q heads and ``g'/u`` kv heads for
    Ulysses' part. The backward doubles the activations (their gradients) and
    adds float32 dK/dV accumulators for what travels.
    """
    w, n, h, g, d, e, b = work.devices, work.seq_len, work.heads, work.kv_heads, work.head_dim, work.dtype_bytes, work.batch
    c = n / w
    u = {"ring": 1, "allgather": 1, "ulysses": w}.get(strategy, ulysses_size or 1)
    gp = lcm_heads(g, u)
    own = b * c * d * (2 * h + 2 * g) * e + b * c * h * (4 + 4 * d)  # q, k, v, out; lse, out accumulator
    rows, hq, hk = (n / (w // u)), h / u, gp / u  # the tokens and heads one device attends
    kv_block = 2 * b * rows * hk * d * e
    extra = b * rows * d * (2 * hq) * e + kv_block if u > 1 else 0.0  # Ulysses: q, out and K/V, all n/r tokens
    extra += 2 * b * n * g * d * e if strategy == "allgather" else 2 * kv_block  # gathered K/V, or two ring buffers
    total = own + extra
    if work.backward:
        total = 2 * total + 2 * kv_block * 4 / e
    return float(total)


def _first_documents(documents: tuple[int, ...], tokens: int) -> tuple[int, ...]:
    """The documents of the first ``tokens`` tokens (the last one cut)."""
    out, total = [], 0
    for length in documents:
        out.append(min(length, tokens - total))
        total += out[-1]
        if total == tokens:
            break
    return tuple(out)


def _read_at(work: Workload) -> int:
    """``k``: the schedule is read at ``seq_len/k`` tokens, ``16·devices`` when it divides, and every document
    and window boundary on a multiple of ``k`` (block areas scale by ``k²``, bytes by ``k``)."""
    unit = 16 * work.devices
    k = work.seq_len // unit if work.seq_len % unit == 0 else 1
    return math.gcd(k, *(work.documents or ()), work.window or 0)


def predict(strategy: str, work: Workload, machine: Machine, *, layout: str = "contiguous",
            ulysses_size: int | None = None, one_process: bool = False) -> Prediction:
    """Play ``strategy``'s schedule for ``work`` on ``machine``; a ruled-out strategy comes back with the reason.

    ``one_process=True`` plays every rank on one device (the one-process
    benchmark rows). Up to :data:`MAX_SCHEDULED` ring steps (all-gather: peers)
    the schedule is read and played whole; beyond, the schedule of
    :data:`MAX_SCHEDULED` devices with the same tokens per device is played and
    its last step repeated for the missing ring steps (exact for a balanced
    layout, an underestimate for the contiguous causal ring), and all-gather's
    transfer and compute grow by ``(w−1)/(63)`` and ``w/64``. With documents
    or a window that played part holds the first documents (and the window):
    no step is repeated when their schedule already leaves hops out, and
    all-gather's compute does not grow (exact while no document or window
    reaches over more than 64 devices' tokens).
    """
    if not isinstance(work, Workload):
        raise TypeError(f"work must be a Workload, got {type(work).__name__}")
    if not isinstance(machine, Machine):
        raise TypeError(f"machine must be a Machine, got {type(machine).__name__}")
    one_process = check_bool(one_process, "one_process")
    if work.masked and layout == "striped":
        raise ValueError("layout='striped' with documents or a window is not in the cost model (its blocks are not "
                         "contiguous tokens); choose layout='contiguous' or 'zigzag'")
    w = work.devices
    name = label(strategy, layout, ulysses_size, w)
    u = {"ring": 1, "allgather": 1, "ulysses": w}.get(strategy, ulysses_size)
    r = w // u if u else w
    big = r > MAX_SCHEDULED or (strategy == "allgather" and w > MAX_SCHEDULED)
    played = work
    if big:
        tokens = work.seq_len // r * MAX_SCHEDULED
        played = dataclasses.replace(work, devices=w // r * MAX_SCHEDULED, seq_len=tokens, documents=None if
                                     work.documents is None else _first_documents(work.documents, tokens))
    k = _read_at(played) if layout != "striped" else 1
    n = played.seq_len // k
    # the schedule at n tokens: documents of length/k; a window of W tokens reaches into W/k + 1 cells of k
    # (its edge is diagonal), so the schedule keeps exactly the blocks and hops the tokens need
    ids = None if played.documents is None else torch.repeat_interleave(
        torch.arange(len(played.documents)), torch.tensor(played.documents) // k)
    window = None if played.window is None else played.window // k + (k > 1)
    try:
        sched = strategy_schedule(strategy, n, played.devices, heads=work.heads, kv_heads=work.kv_heads,
                                  head_dim=work.head_dim, dtype_bytes=work.dtype_bytes, causal=work.causal,
                                  layout=layout, ulysses_size=ulysses_size, batch=work.batch, backward=work.backward,
                                  document_ids=ids, window=window)
    except ValueError as err:
        return Prediction(name, strategy, layout, ulysses_size, math.inf, (), None, math.nan, math.nan, str(err))
    devices = 1 if one_process else played.devices
    phases = _phases(sched, played, machine, devices, one_process, n, k)
    note, grow_bytes = "", 1.0
    if big:
        grow = r / MAX_SCHEDULED
        if strategy == "allgather":
            more, grow_bytes = (w - 1) / (MAX_SCHEDULED - 1), grow
            grow = 1.0 if work.masked else grow  # a mask keeps each device's work local: the played part stands
            phases = [dataclasses.replace(p, compute=tuple(x * grow if p.transfers == () else x for x in p.compute),
                                          transfers=tuple(dataclasses.replace(t, seconds=t.seconds * more)
                                                          for t in p.transfers)) for p in phases]
        else:
            by_phase = defaultdict(list)
            for p in phases:
                by_phase[p.label.split()[0]].append(p)
            phases = []
            for ph in by_phase.values():
                ring = [p for p in ph if not p.sync]
                extend = len(ring) == MAX_SCHEDULED  # the mask left no hop out: the missing ones are needed too
                grow_bytes = grow if extend else 1.0
                phases += [p for p in ph if p.sync and ph.index(p) == 0] + ring
                phases += [ring[-1]] * (r - MAX_SCHEDULED if extend else 0)
                phases += [p for p in ph if p.sync and ph.index(p) > 0]
        note = f"played at {played.devices} devices with {work.seq_len // w} tokens each, extended to {w}"
    timeline = simulate(phases, devices)
    costs = []
    for cs, p in zip(sched, phases):
        per = defaultdict(float)
        for t in p.transfers:
            per[t.src] += t.seconds
        costs.append(StepCost(cs.phase, cs.step, cs.collective, max(p.compute), max(per.values(), default=0.0)))
    sent = max(bytes_sent(sched, played.devices)) * k * grow_bytes
    mem = memory_per_device(strategy, work, ulysses_size)
    ruled = None
    if not one_process and mem > machine.memory:
        ruled = f"needs {mem / 1e9:.1f} GB per device, the machine has {machine.memory / 1e9:.0f} GB"
    return Prediction(name, strategy, layout, ulysses_size, timeline.total, tuple(costs), timeline, mem, sent, ruled, note)


def compare(work: Workload, machine: Machine, *, all_hybrids: bool = False) -> list[Prediction]:
    """Every candidate strategy for ``work`` on ``machine``, fastest first (ruled-out ones last).

    Hybrids keep their Ulysses groups inside a node (``u ≤ gpus_per_node``,
    USP's design) unless ``all_hybrids``.
    """
    all_hybrids = check_bool(all_hybrids, "all_hybrids")
    preds = [predict(s, work, machine, layout=lay, ulysses_size=u) for s, lay, u in candidates(work)
             if all_hybrids or u is None or u <= machine.gpus_per_node]
    return sorted(preds, key=lambda p: (not p.ok, p.total))


def ideal(work: Workload, machine: Machine) -> float:
    """Seconds of one device doing the whole attention in one call, divided by the devices (the 100% line)."""
    t = machine.kernel.call_time(work.flops, work.causal or work.masked)
    return t * (1 + machine.kernel.backward if work.backward else 1) / work.devices


def overlap_threshold(flops_rate: float, bandwidth: float, *, heads: int, kv_heads: int, dtype_bytes: int = 2,
                      causal: bool = False, backward: bool = False, backward_factor: float = 2.5) -> float:
    """Fewest tokens per device ``c`` at which one ring hop hides behind its block (Liu et al.).

    Forward: a hop moves ``2·c·g·d·e`` bytes while the block computes
    ``4·c²·h·d`` FLOPs (half with a causal balanced layout), so
    ``c ≥ g·e·F / (2·h·B)`` (``/`` one half when causal). Backward: the hop
    also moves float32 dK/dV (``2·c·g·d·4``) while ``backward_factor`` times
    the forward's work runs. ``d`` cancels.
    """
    for v, nm in ((flops_rate, "flops_rate"), (bandwidth, "bandwidth")):
        if not v > 0:
            raise ValueError(f"{nm} must be > 0, got {v}")
    check_positive_int(heads, "heads")
    check_positive_int(kv_heads, "kv_heads")
    check_positive_int(dtype_bytes, "dtype_bytes")
    share = 0.5 if check_bool(causal, "causal") else 1.0
    if check_bool(backward, "backward"):
        return (2 * kv_heads * (dtype_bytes + 4)) * flops_rate / (4 * heads * share * backward_factor * bandwidth)
    return 2 * kv_heads * dtype_bytes * flops_rate / (4 * heads * share * bandwidth)


def pass_kv_preferred(new_tokens: int, cached_tokens: int, *, heads: int, kv_heads: int) -> bool:
    """Meta's rule (Yang et al. 2024, as quoted in STRATEGIES.md): pass K/V when ``T/(T+P) ≥ 2·g/h``, else pass Q."""
    t = check_positive_int(new_tokens, "new_tokens")
    if isinstance(cached_tokens, bool) or not isinstance(cached_tokens, int) or cached_tokens < 0:
        raise ValueError(f"cached_tokens must be an int ≥ 0, got {cached_tokens!r}")
    return t / (t + cached_tokens) >= 2 * check_positive_int(kv_heads, "kv_heads") / check_positive_int(heads, "heads")
