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
engine does.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

from .._utils import check_bool, check_positive_int
from ..strategies import CommStep, bytes_sent, lcm_heads, strategy_schedule
from .machine import Machine
from .simulate import Phase, Timeline, Transfer, simulate

RESULTS = frozenset({"out", "lse", "dq", "dK/dV"})  # sent after the step's compute
MAX_SCHEDULED = 64  # ring steps and all-gather peers read exactly up to this many; beyond, see predict


@dataclasses.dataclass(frozen=True)
class Workload:
    """What to run: ``devices`` GPUs, ``seq_len`` tokens, heads/kv heads, head dim, bytes per element, the mask."""

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
        if self.documents is not None or self.window is not None:
            raise NotImplementedError("documents and window are not in the cost model yet: the strategies' "
                                      "schedules take them (ringbook.strategy_schedule(document_ids=, window=)), but "
                                      "the model has no rate for the partial blocks they leave; pass documents=None "
                                      "and window=None")

    @property
    def flops(self) -> float:
        """Forward FLOPs of the whole attention, ``4·b·h·n²·d`` (half for causal)."""
        f = 4 * self.batch * self.heads * self.seq_len ** 2 * self.head_dim
        return f / 2 if self.causal else f


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
    """``(strategy, layout, ulysses_size)`` for the ring (each layout), all-gather, Ulysses and every hybrid."""
    w = work.devices
    bal = "zigzag" if work.causal else "contiguous"
    out = [("ring", "contiguous", None), ("ring", "zigzag", None), ("allgather", bal, None), ("ulysses", "contiguous", None)]
    out += [("usp", bal, u) for u in range(2, w) if w % u == 0]
    return out


def label(strategy: str, layout: str, ulysses_size: int | None, devices: int) -> str:
    if strategy == "usp":
        return f"hybrid {ulysses_size}×{devices // ulysses_size}"
    return {"ring": f"ring ({layout})", "allgather": "all-gather", "ulysses": "Ulysses"}[strategy]


def _calls(cs: CommStep, head_dim: int, batch: int, k: int = 1):
    """(rank, flops, causal) per kernel call of a step: a Step's blocks grouped by query rows and kind."""
    for wk in cs.work:
        nh = wk.heads[1] - wk.heads[0]
        for st in wk.steps:
            group: dict[tuple, int] = defaultdict(int)
            for b in st.blocks:
                group[(b.q, b.kind)] += b.area
            for (_, kind), area in group.items():
                f = 4 * batch * nh * area * head_dim * k * k
                yield wk.rank, (f / 2 if kind == "causal" else f), kind == "causal"


def _phases(schedule: list[CommStep], work: Workload, machine: Machine, devices: int,
            one_process: bool, k: int = 1) -> list[Phase]:
    kern = machine.kernel
    phases = []
    for cs in schedule:
        scale = kern.backward if cs.phase == "backward" else 1.0
        if one_process:
            launches: dict[tuple, float] = defaultdict(float)
            for wk in cs.work:  # the same call of every rank: one launch
                nh = wk.heads[1] - wk.heads[0]
                for st in wk.steps:
                    group: dict[tuple, int] = defaultdict(int)
                    for b in st.blocks:
                        group[(b.q, b.kind)] += b.area
                    for (q, kind), area in group.items():
                        launches[(st.step, q[1] - q[0], area, kind)] += 4 * work.batch * nh * area * work.head_dim * k * k
            sec = sum(kern.call_time(f / 2 if key[3] == "causal" else f, key[3] == "causal") for key, f in launches.items())
            phases.append(Phase(f"{cs.phase} {cs.step}", (sec * scale,), ()))
            continue
        comp = [0.0] * devices
        for rank, f, causal in _calls(cs, work.head_dim, work.batch, k):
            comp[rank] += kern.call_time(f, causal) * scale
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


def predict(strategy: str, work: Workload, machine: Machine, *, layout: str = "contiguous",
            ulysses_size: int | None = None, one_process: bool = False) -> Prediction:
    """Play ``strategy``'s schedule for ``work`` on ``machine``; a ruled-out strategy comes back with the reason.

    ``one_process=True`` plays every rank on one device (the one-process
    benchmark rows). Up to :data:`MAX_SCHEDULED` ring steps (all-gather: peers)
    the schedule is read and played whole; beyond, the schedule of
    :data:`MAX_SCHEDULED` devices with the same tokens per device is played and
    its last step repeated for the missing ring steps (exact for a balanced
    layout, an underestimate for the contiguous causal ring), and all-gather's
    transfer and compute grow by ``(w−1)/(63)`` and ``w/64``.
    """
    if not isinstance(work, Workload):
        raise TypeError(f"work must be a Workload, got {type(work).__name__}")
    if not isinstance(machine, Machine):
        raise TypeError(f"machine must be a Machine, got {type(machine).__name__}")
    one_process = check_bool(one_process, "one_process")
    w = work.devices
    name = label(strategy, layout, ulysses_size, w)
    u = {"ring": 1, "allgather": 1, "ulysses": w}.get(strategy, ulysses_size)
    r = w // u if u else w
    big = r > MAX_SCHEDULED or (strategy == "allgather" and w > MAX_SCHEDULED)
    played = work if not big else dataclasses.replace(work, devices=w // r * MAX_SCHEDULED,
                                                      seq_len=work.seq_len // r * MAX_SCHEDULED)
    # Block boundaries and bytes scale with the length: read the schedule at n/k (areas × k², bytes × k)
    unit = 16 * played.devices
    k = played.seq_len // unit if layout != "striped" and played.seq_len % unit == 0 else 1
    try:
        sched = strategy_schedule(strategy, played.seq_len // k, played.devices, heads=work.heads, kv_heads=work.kv_heads,
                                  head_dim=work.head_dim, dtype_bytes=work.dtype_bytes, causal=work.causal,
                                  layout=layout, ulysses_size=ulysses_size, batch=work.batch, backward=work.backward)
    except ValueError as err:
        return Prediction(name, strategy, layout, ulysses_size, math.inf, (), None, math.nan, math.nan, str(err))
    devices = 1 if one_process else played.devices
    phases = _phases(sched, played, machine, devices, one_process, k)
    note = ""
    if big:
        grow = r / MAX_SCHEDULED
        if strategy == "allgather":
            more = (w - 1) / (MAX_SCHEDULED - 1)
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
                phases += [p for p in ph if p.sync and ph.index(p) == 0] + ring + [ring[-1]] * (r - MAX_SCHEDULED)
                phases += [p for p in ph if p.sync and ph.index(p) > 0]
        note = f"played at {played.devices} devices with {work.seq_len // w} tokens each, extended to {w}"
    timeline = simulate(phases, devices)
    costs = []
    for cs, p in zip(sched, phases):
        per = defaultdict(float)
        for t in p.transfers:
            per[t.src] += t.seconds
        costs.append(StepCost(cs.phase, cs.step, cs.collective, max(p.compute), max(per.values(), default=0.0)))
    sent = max(bytes_sent(sched, played.devices)) * k * (w / played.devices if big else 1)
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
    t = machine.kernel.call_time(work.flops, work.causal)
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
