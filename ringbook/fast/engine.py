"""The ring engine: one forward and one backward loop over a plan of block calls, for every fast path.

A ring computes attention as a sequence of steps. At step ``t`` each rank
holds one K/V shard and attends some rows of its queries to some rows of it;
every result folds into float32 accumulators by equation (M) of notebook 01.
What differs between the fast paths is only

* **the plan** (:class:`Plan`): which block calls each step makes — the
  schedule as data, built in one module (:mod:`ringbook.fast.plans`) from the
  one schedule (:func:`ringbook.schedule.ring_schedule`). A block
  (:mod:`ringbook.fast.blocks`) is a *place* (row ranges, or gathered dilated
  rows) and a *kernel* (full, top-left causal, positions; documents and
  windows will be kernels too), each bringing its own code, so the loops
  below never branch on a pattern;
* **the mover** (:class:`Mover`): how the K/V a step reads get there, and how
  their gradients get home. :class:`StackedMover` plays every rank in one
  process (the shards are stacked in the batch, and "sending" is choosing a
  view); :class:`ringbook.distributed.ring.P2PMover` sends them to the next
  rank over a process group; :class:`ringbook.distributed.dilated.DilatedMover`
  delivers the dilated rows a rank's segments need in one batched exchange.

A strategy is a mover, a plan and a :class:`Job` (how the caller's tensors
enter and leave the engine's layout), run by :func:`run`;
``tests/test_engine_contract.py`` shows the contract with a toy mover.
Tuning (merge groups, the second stream, memory budgets) is data:
:class:`~ringbook.fast.tuning.Tuning` in :class:`Settings`.

:func:`ring_forward` and :func:`ring_backward` are the only loops. The
backward runs the ring again and feeds each block the *global* out and lse
of its rows, as FlashAttention's backward (and PyTorch's context parallel)
does; ``D − dlse`` is formed once (:func:`~ringbook.fast.kernels.delta`).
:class:`RingFunction` is the one autograd Function of the fused rings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from .._utils import LOW_PRECISION, compute_dtype, refuse_double_backward
from ..tolerance import TOLERANCE
from .blocks import ALL, CAUSAL, FULL, Block, Box, Kernel, Place, Positions, box
from .kernels import delta, warn_once
from .merge import add_boxes_into_, merge_boxes_into_
from .state import GRAPHS, SIDE_STREAMS
from .tuning import DEFAULT, Tuning

__all__ = ["ALL", "CAUSAL", "FULL", "Accumulator", "Block", "Box", "Gradients", "Job", "Kernel", "Mover", "Part",
           "Place", "Plan", "Positions", "RingFunction", "Settings", "StackedMover", "box", "check_graph",
           "ring_backward", "ring_forward", "run"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The schedule as data: ``steps[t]`` are the block calls of step ``t`` (:mod:`ringbook.fast.plans` builds them).

    ``merge_group``: up to this many consecutive block results (over any
    rows, across steps) are held and folded into the accumulators in one pass
    (one read and write of the float32 accumulator per group instead of per
    block). ``grad_group``: likewise for the backward's block gradients,
    summed into dq, dK and dV one group at a time.

    What a rank moves, as data (per batch row, in K vectors — one token of one
    kv head; V moves as many): ``sent[t]`` / ``received[t]`` after step ``t``
    of the forward, ``grad_sent[t]`` the dK/dV vectors it sends on in step
    ``t`` of the backward (which also moves K/V as the forward does). Empty:
    nothing moves (one process). :meth:`work` and :meth:`bytes_sent` read them.
    """

    steps: tuple[tuple[Block, ...], ...]
    merge_group: int = 1
    grad_group: int = 1
    sent: tuple[int, ...] = ()
    received: tuple[int, ...] = ()
    grad_sent: tuple[int, ...] = ()

    @functools.cached_property
    def in_groups(self) -> bool:
        """Whether every block's result is folded in groups (the first fold may then set the accumulators)."""
        return all(blk.at.in_groups for blocks in self.steps for blk in blocks)

    @functools.cached_property
    def needs_delta(self) -> bool:
        """Whether some block's backward always takes ``D − dlse`` (positions: the einops path)."""
        return any(blk.kernel.needs_delta for blocks in self.steps for blk in blocks)

    def work(self, batch: int, heads: int) -> tuple[int, ...]:
        """Scores computed at each step, over the plan's batch rows and heads (4·head_dim FLOPs each forward)."""
        return tuple(sum(blk.scores(batch, heads) for blk in blocks) for blocks in self.steps)

    def bytes_sent(self, batch: int, head_dim: int, dtype: torch.dtype, *, backward: bool = False) -> int:
        """Bytes this rank sends in one call: K and V in ``dtype``; with ``backward`` again, plus float32 dK/dV."""
        elem = torch.empty((), dtype=dtype).element_size()
        work = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        kv = 2 * batch * head_dim * sum(self.sent) * elem
        return kv + ((kv + 2 * batch * head_dim * sum(self.grad_sent) * work) if backward else 0)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The one settings record of the fused rings: what a call computes with, and how it is tuned."""

    scale: float
    backend: str  # the block kernel: "auto", a fused backend, or "einops"
    who: str = "the ring"  # the public function, for messages
    twice: str = "ringbook.ring_attention"  # its twice-differentiable twin, for the double-backward refusal
    graph: bool | str = "auto"  # replay forward-only CUDA calls from a CUDA graph once their shape repeats (run)
    tuning: Tuning = DEFAULT  # the measured knobs (ringbook.fast.tuning)


class Mover:
    """How the K/V of each step reach the blocks, and how their gradients get home (see the module docstring).

    A mover is made for a plan of ``steps`` steps (any number: a window's
    plan has fewer than the ring has ranks) and brings dK/dV to their owner
    whatever that number is. ``step_reads_gradients``: :meth:`backward_done`
    reads the step's dK/dV (a P2P mover sends them on), so the step's
    gradient sums must be done before it is called.
    """

    step_reads_gradients = True

    def forward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V the blocks of step ``t`` read (waiting for them to arrive); the next transfer may start."""
        raise NotImplementedError

    def forward_done(self, t: int) -> None:
        """Step ``t``'s blocks are issued."""

    def backward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v, dk, dv)`` for step ``t``: the held K/V and where their gradients accumulate."""
        raise NotImplementedError

    def backward_done(self, t: int) -> None:
        """Step ``t``'s gradients are accumulated (a P2P mover sends them on)."""

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """dK and dV of this process's own K/V once every step is done."""
        raise NotImplementedError


class _Side:
    """Where the backward's memory-bound folds run: the sums of block gradients into dq, dK and dV.

    On CUDA (with ``Tuning.overlap``) they go to a second stream, so a
    fold runs under the next block's backward kernel, which is bound by
    compute, not memory; the gradients a fold reads are marked as used by
    that stream (``record_stream``), so their memory is not reused before the
    fold is done. Elsewhere they run in line. :meth:`join` makes the current
    stream wait for every fold issued so far. (The forward's merges run in
    line: measured on an H200, a second stream did not make the forward
    faster, as cuDNN's forward kernel leaves no room beside it, and it costs
    host time per block; ``tools/gpu_dense.py``.)
    """

    def __init__(self, x: torch.Tensor, enabled: bool):
        self.stream = None
        if enabled and x.is_cuda:
            index = x.device.index if x.device.index is not None else torch.cuda.current_device()
            if index not in SIDE_STREAMS:
                SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
            self.stream = SIDE_STREAMS[index]

    def run(self, fold: Callable[[], None], *held: torch.Tensor) -> None:
        if self.stream is None:
            fold()
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            fold()
        for x in held:
            x.record_stream(self.stream)

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


class Accumulator:
    """The forward's float32 ``(out, lse)`` accumulators, and the block results held to be folded in groups.

    A place folds its result by :meth:`hold` (a box of rows: merged
    ``group`` results at a time, :func:`~ringbook.fast.merge.merge_boxes_into_`)
    or :meth:`write` (a place that writes or merges its own rows: the held
    results are folded first). With ``initialise`` the first fold sets the
    accumulators (rows it does not cover become the empty partial ``(0, -inf)``);
    without, they start at ``(0, -inf)``.
    """

    def __init__(self, q: torch.Tensor, group: int, initialise: bool, tuning: Tuning):
        b, c, h, d = q.shape
        work = compute_dtype(q.dtype)
        self.out = torch.empty(b, c, h, d, dtype=work, device=q.device)
        self.lse = torch.empty(b, h, c, dtype=work, device=q.device)
        if not initialise:
            self.out.zero_()
            self.lse.fill_(float("-inf"))
        self.group, self.initialise, self.tuning, self.pending = group, initialise, tuning, []

    def hold(self, box: tuple[int, int, int, int], out: torch.Tensor, lse: torch.Tensor) -> None:
        self.pending.append((box, out, lse))
        if len(self.pending) == self.group:
            self.flush()

    def write(self, put: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        self.flush()
        put(self.out, self.lse)

    def flush(self) -> None:
        if self.pending or self.initialise:
            merge_boxes_into_(self.out, self.lse, self.pending, initialise=self.initialise, tuning=self.tuning)
            self.pending, self.initialise = [], False


class Gradients:
    """The backward's dq and the current step's dK/dV, with the block gradients held to be summed in groups.

    A place adds its gradients by :meth:`hold` (boxes of rows: ``group``
    blocks summed per pass, :func:`~ringbook.fast.merge.add_boxes_into_`) or
    :meth:`run` (a place that adds its own rows). Sums run on the side
    stream (:class:`_Side`).
    """

    def __init__(self, dq: torch.Tensor, group: int, side: _Side, tuning: Tuning):
        self.dq, self.dk, self.dv = dq, None, None
        self.group, self.side, self.tuning, self.held = group, side, tuning, []

    def target(self, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """The step's dK/dV buffers; held sums for other buffers go there first."""
        if self.held and self.dk is not dk:
            self.flush()
        self.dk, self.dv = dk, dv

    def hold(self, q_box: tuple[int, int, int, int], dq: torch.Tensor, kv_box: tuple[int, int, int, int],
             dk: torch.Tensor, dv: torch.Tensor) -> None:
        self.held.append((q_box, dq, kv_box, dk, dv))
        if len(self.held) == self.group:
            self.flush()

    def run(self, add: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None], *grads: torch.Tensor) -> None:
        self.side.run(functools.partial(add, self.dq, self.dk, self.dv), *grads)

    def flush(self) -> None:
        if self.held:
            items, self.held = self.held, []
            self.side.run(functools.partial(_sum_gradients, self.dq, self.dk, self.dv, items, self.tuning),
                          *(x for it in items for x in (it[1], it[3], it[4])))


def _sum_gradients(dq, dk, dv, items: list, tuning: Tuning) -> None:
    """Add held block gradients into dq and the dK/dV buffers, one pass over each per group."""
    add_boxes_into_(dq, [(q_box, gq) for q_box, gq, *_ in items], tuning=tuning)
    add_boxes_into_(dk, [(kv_box, gk) for _, _, kv_box, gk, _ in items], tuning=tuning)
    add_boxes_into_(dv, [(kv_box, gv) for _, _, kv_box, _, gv in items], tuning=tuning)


def ring_forward(q: torch.Tensor, plan: Plan, mover: Mover, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q`` against every step's K/V, in the accumulator dtype (float32 for half precision).

    Each block takes its rows, runs its kernel and folds its result where
    its place says (:class:`Accumulator`); ``plan.merge_group`` boxed results
    are folded per pass.
    """
    if len(plan.steps) == 1 and len(plan.steps[0]) == 1 and plan.steps[0][0].at.whole(q):
        blk = plan.steps[0][0]  # one block over every row: its result is the answer
        k, v = mover.forward_kv(0)
        out = blk.kernel.forward(blk.at.take_q(q), blk.at.take_kv(k), blk.at.take_kv(v), scale=s.scale,
                                 backend=s.backend)
        mover.forward_done(0)
        return out
    acc = Accumulator(q, plan.merge_group, plan.in_groups, s.tuning)
    for t, blocks in enumerate(plan.steps):
        k, v = mover.forward_kv(t)
        for blk in blocks:
            at = blk.at
            at.fold(acc, *blk.kernel.forward(at.take_q(q), at.take_kv(k), at.take_kv(v), scale=s.scale,
                                             backend=s.backend))
        mover.forward_done(t)
    acc.flush()
    return acc.out, acc.lse


def ring_backward(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                  dlse: torch.Tensor | None, plan: Plan, mover: Mover, s: Settings) -> torch.Tensor:
    """The ring again; each block's gradients from the global ``out``/``lse`` of its rows. Returns dq.

    dK/dV accumulate where the mover says (:meth:`Mover.backward_kv`) and come
    home through :meth:`Mover.gradients`. The fused backward ops cannot take
    a gradient of lse: where one flows, every block uses the einops backward
    with ``delta = D − dlse`` (exact, slower, and said once in a warning).
    """
    fast = q.is_cuda and q.dtype in LOW_PRECISION and s.backend != "einops"
    if dlse is not None and fast and bool((dlse != 0).any()):
        warn_once(f"{s.who}: a gradient flows into lse; the fused backward ops cannot take it, so this backward "
                  "uses the (slower, exact) einops kernels")
        fast = False
    full_delta = delta(dout, out, dlse) if (plan.needs_delta or not fast) else None
    backend = s.backend if fast else "einops"
    side = _Side(q, s.tuning.overlap)
    grads = Gradients(torch.zeros(q.shape, dtype=compute_dtype(q.dtype), device=q.device), plan.grad_group, side,
                      s.tuning)
    for t, blocks in enumerate(plan.steps):
        k, v, dk, dv = mover.backward_kv(t)
        grads.target(dk, dv)
        for blk in blocks:
            at = blk.at
            blk_delta = at.take_lse(full_delta) if full_delta is not None and (
                blk.kernel.needs_delta or not fast) else None
            at.add(grads, *blk.kernel.backward(at.take_q(q), at.take_kv(k), at.take_kv(v), at.take_q(out),
                                               at.take_lse(lse), at.take_q(dout), delta=blk_delta, scale=s.scale,
                                               backend=backend))
        if mover.step_reads_gradients:
            grads.flush()
            side.join()
        mover.backward_done(t)
    grads.flush()
    side.join()
    return grads.dq


@dataclasses.dataclass(frozen=True)
class Job:
    """One fused ring call: its settings, and how its tensors enter and leave the engine.

    ``start(k, v, backward) -> (mover, plan)`` makes the mover and the plan
    of a phase for the engine-layout K/V (a plan may depend on memory: the
    one-process runner doubles K/V where it can). ``enter(x, dim)`` maps a
    caller's tensor to the engine's layout (the one-process runner stacks the
    ranks in the batch; a process group's rank uses its shard as it is),
    ``leave(x, dim, dtype)`` maps back. ``key``: everything besides the
    tensors that decides the call's kernels (None: the call is never
    replayed from a CUDA graph, see :func:`run`). ``parts(q, k, v)``: None
    when the forward runs whole, else the :class:`Part` s it runs one after
    the other (query rows in turn, each with the K/V it needs brought per
    step), so that no full-size copy or float32 accumulator is held.
    ``enter_copies``: ``enter`` copies (a gather) rather than views, so a
    call that will be differentiated keeps the entered tensors for its backward.
    ``enter_kv``/``leave_kv``: where K/V enter differently from q (Ulysses
    replicates kv heads when there are fewer than ranks, and sums their
    gradients back); None: as ``enter``/``leave``.
    """

    settings: Settings
    start: Callable[[torch.Tensor, torch.Tensor, bool], tuple[Mover, Plan]]
    enter: Callable[..., torch.Tensor] = lambda x, dim=1: x
    leave: Callable[..., torch.Tensor] = lambda x, dim=1, dtype=None: x.to(dtype or x.dtype)
    key: tuple | None = None
    parts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None
    enter_copies: bool = False
    enter_kv: Callable[..., torch.Tensor] | None = None
    leave_kv: Callable[..., torch.Tensor] | None = None

    def kv_in(self, x: torch.Tensor) -> torch.Tensor:
        """k or v in the engine's layout (``enter_kv``, else ``enter``)."""
        return (self.enter_kv or self.enter)(x)

    def kv_out(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dK or dV back in the caller's layout (``leave_kv``, else ``leave``)."""
        return (self.leave_kv or self.leave)(x, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Part:
    """A share of a forward's query rows, run as a ring of its own (when the whole call would hold too much memory).

    ``q``: the share's queries in the engine layout; ``plan`` and ``mover``
    as for a whole call; ``put(out, lse, acc_out, acc_lse)`` writes the
    share's result into the caller's output tensors.
    """

    q: torch.Tensor
    plan: Plan
    mover: Mover
    put: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class RingFunction(torch.autograd.Function):
    """The autograd Function of every fused ring: :func:`ring_forward` forward, :func:`ring_backward` backward.

    Only q, k, v, out and lse are saved, as FlashAttention does: as the
    caller passed them when entering the engine's layout is a view (the
    backward enters them again for free), else (``Job.enter_copies``: a
    gather, as the zigzag layout's) in the engine's layout, so the backward
    does not gather them again. Once differentiable: ``create_graph=True`` raises.
    """

    @staticmethod
    def forward(ctx, q, k, v, job: Job):
        ctx.set_materialize_grads(False)
        parts = job.parts(q, k, v) if job.parts is not None else None
        keep_entered = job.enter_copies and parts is None and any(ctx.needs_input_grad[:3])
        if parts is None:
            q_e, k_e, v_e = job.enter(q), job.kv_in(k), job.kv_in(v)
            mover, plan = job.start(k_e, v_e, False)
            acc_out, acc_lse = ring_forward(q_e, plan, mover, job.settings)
            del mover
            out = job.leave(acc_out, dtype=q.dtype)
            out_e = acc_out.to(q.dtype) if keep_entered else None
            del acc_out
            lse = job.leave(acc_lse, dim=2, dtype=compute_dtype(q.dtype))
            lse_e = acc_lse.to(lse.dtype) if keep_entered else None
        else:
            b, n, h, _ = q.shape
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            lse = torch.empty(b, h, n, dtype=compute_dtype(q.dtype), device=q.device)
            for part in parts:  # one share of the rows at a time: only its buffers are alive
                part.put(out, lse, *ring_forward(part.q, part.plan, part.mover, job.settings))
                del part
        if keep_entered:  # entering copies (a gather): keep the engine-layout tensors, do not gather them again
            ctx.save_for_backward(q_e, k_e, v_e, out_e, lse_e)
        else:
            ctx.save_for_backward(q, k, v, out, lse)
        ctx.entered = keep_entered
        ctx.job = job
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        job = ctx.job
        kernels = "its einops block backward" if job.settings.backend == "einops" else "fused backward kernels"
        refuse_double_backward(job.settings.who, f"a custom autograd Function running the ring again with {kernels}",
                               f"For second derivatives use {job.settings.twice} (einops, twice differentiable).")
        q, k, v, out, lse = ctx.saved_tensors
        if not ctx.entered:
            q, k, v, out, lse = job.enter(q), job.kv_in(k), job.kv_in(v), job.enter(out), job.enter(lse, dim=2)
        dout = torch.zeros(out.shape, dtype=out.dtype, device=out.device) if dout is None else job.enter(
            dout.to(out.dtype).contiguous())
        mover, plan = job.start(k, v, True)
        dq = ring_backward(q, out, lse, dout, None if dlse is None else job.enter(dlse, dim=2), plan, mover,
                           job.settings)
        dk, dv = mover.gradients()
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return job.leave(dq, dtype=q_dtype), job.kv_out(dk, dtype=k_dtype), job.kv_out(dv, dtype=v_dtype), None


# --------------------------------------------------------------------------- CUDA graphs

GRAPH_CACHE_SIZE = 8  # captured graphs kept (each holds its working memory); GRAPHS (ringbook.fast.state) holds them


class _Seen:
    def __repr__(self) -> str:
        return "seen once"


_SEEN = _Seen()  # a shape met once: the next call of it is captured


@dataclasses.dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the static q, k, v the graph reads
    outputs: tuple[torch.Tensor, torch.Tensor]  # the static out, lse it writes


def check_graph(graph: object) -> bool | str:
    """``graph`` must be ``"auto"``, ``True`` or ``False`` (what :func:`run` does with each)."""
    if graph is True or graph is False or (isinstance(graph, str) and graph == "auto"):
        return graph
    raise ValueError(f'graph must be "auto", True or False, got {graph!r}')


def _layout(x: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, str(x.device))


def _wants_graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, job: Job) -> bool:
    mode = job.settings.graph
    if mode is False or job.key is None or not q.is_cuda:
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return False  # training calls run eagerly: the backward needs the forward's autograd graph
    if torch.cuda.is_current_stream_capturing():
        return False  # the caller is capturing a graph of its own: take part in it
    return mode is True or q.nbytes <= job.settings.tuning.graph_max_bytes


def _capture(q, k, v, job: Job, want: tuple[torch.Tensor, torch.Tensor]) -> _Graph | str:
    """Capture the call on static copies of its inputs; refuse (say why) unless a replay reproduces ``want``."""
    inputs = tuple(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)
                   for x in (q, k, v))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.no_grad():
            side = torch.cuda.Stream(q.device)  # warm up on a side stream, as torch.cuda.graphs asks
            side.wait_stream(torch.cuda.current_stream(q.device))
            with torch.cuda.stream(side):
                RingFunction.apply(*inputs, job)
            torch.cuda.current_stream(q.device).wait_stream(side)
            with torch.cuda.graph(graph):
                outputs = RingFunction.apply(*inputs, job)
            graph.replay()
    except Exception as exc:  # noqa: BLE001 - any capture failure: this call shape runs eagerly
        return f"capture failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    tol = TOLERANCE.get(q.dtype, 0.0)
    for got, ref in zip(outputs, want):
        if got.shape != ref.shape or not torch.allclose(got.float(), ref.float(), rtol=0, atol=tol, equal_nan=True):
            return "the graph's replay disagrees with the eager call"
    return _Graph(graph, inputs, outputs)


def _graphed(q, k, v, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
    """The call replayed from a CUDA graph once its shape repeats; the first sighting and any refusal run eagerly."""
    key = (job.key, _layout(q), _layout(k), _layout(v))
    entry = GRAPHS.get(key)
    if entry is None or isinstance(entry, str):  # a new shape, or one whose capture was refused
        out = RingFunction.apply(q, k, v, job)
        if entry is None:
            GRAPHS[key] = _SEEN
        return out
    if entry is _SEEN:
        out = RingFunction.apply(q, k, v, job)
        GRAPHS[key] = _capture(q, k, v, job, out)
        if isinstance(GRAPHS[key], str):
            warn_once(f"{job.settings.who}: CUDA graph not used for shape {tuple(q.shape)} ({GRAPHS[key]}); "
                      "running eagerly")
        while sum(isinstance(e, _Graph) for e in GRAPHS.values()) > GRAPH_CACHE_SIZE:
            del GRAPHS[next(k_ for k_, e in GRAPHS.items() if isinstance(e, _Graph))]  # the oldest
        return out
    GRAPHS[key] = GRAPHS.pop(key)  # most recently used last
    for static, x in zip(entry.inputs, (q, k, v)):
        static.copy_(x)
    entry.graph.replay()
    return entry.outputs[0].clone(), entry.outputs[1].clone()


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of one fused ring call (differentiable through :class:`RingFunction`).

    A forward-only CUDA call whose job has a ``key`` may be replayed from a
    CUDA graph (``Settings.graph``: ``"auto"`` for calls with q of at most
    :attr:`Tuning.graph_max_bytes`, ``True`` for any size, ``False`` never): the
    first call of a shape runs eagerly, the second captures it on static
    copies of its inputs and keeps the graph only if its replay agrees with
    that call's eager result, later calls copy their inputs in and replay
    (one launch of the whole ring instead of dozens). A shape whose capture
    fails runs eagerly, with one warning (:data:`ringbook.fast.state.GRAPHS` holds why). Each
    kept graph holds its call's working memory (at most
    :data:`GRAPH_CACHE_SIZE` graphs, the least recently used dropped first);
    :func:`ringbook.fast.state.reset_caches` gives it back.
    """
    if job.settings.graph is True and not q.is_cuda:
        raise ValueError(f"{job.settings.who}: graph=True needs CUDA tensors (CUDA graphs), got q on {q.device}; "
                         'use graph="auto" or False')
    if _wants_graph(q, k, v, job):
        return _graphed(q, k, v, job)
    return RingFunction.apply(q, k, v, job)


class StackedMover(Mover):
    """Every rank in one process: K/V stacked in the batch (written twice when ``doubled``), never moved.

    A step's blocks address the held shard by batch rows (a view: rank r
    holds shard ``(r − t) mod w``). Gradients accumulate into full-size
    buffers; with the doubled K/V shard s's gradient is the sum of rows s and
    w + s.
    """

    step_reads_gradients = False

    def __init__(self, k: torch.Tensor, v: torch.Tensor, *, backward: bool, doubled: bool = False):
        self.doubled = doubled
        self.k, self.v = (torch.cat([x, x]) if doubled else x for x in (k, v))
        if backward:
            work = compute_dtype(k.dtype)
            self.dk = torch.zeros(self.k.shape, dtype=work, device=k.device)
            self.dv = torch.zeros(self.v.shape, dtype=work, device=v.device)

    def forward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def backward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k, self.v, self.dk, self.dv

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.doubled:
            return self.dk, self.dv
        half = self.dk.shape[0] // 2
        return self.dk[:half] + self.dk[half:], self.dv[:half] + self.dv[half:]
