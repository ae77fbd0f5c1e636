"""The ring engine: one forward and one backward loop over a plan of block calls, for every fast path.

A ring computes attention as a sequence of steps. At step ``t`` each rank
holds one K/V shard and attends some rows of its queries to some rows of it;
every result folds into float32 accumulators by equation (M) of notebook 01.
What differs between the fast paths is only

* **the plan** (:class:`Plan`): which block calls each step makes — the
  schedule as data. Dense contiguous and zigzag rings, a rank's own row of
  the schedule, and dilated segments (gathered blocks,
  :mod:`ringbook.fast.dilated`) are plans; documents and windows will be;
* **the mover** (:class:`Mover`): how the K/V a step reads get there, and how
  their gradients get home. :class:`StackedMover` plays every rank in one
  process (the shards are stacked in the batch, and "sending" is choosing a
  view); :class:`ringbook.distributed.ring.P2PMover` sends them to the next
  rank over a process group; :class:`ringbook.distributed.dilated.DilatedMover`
  delivers the dilated rows a rank's segments need in one batched exchange.

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
from ..online_softmax import KEY_CHUNK, attend_block, attend_block_backward
from .kernels import block_attention_backward, delta, expand_kv, forward_block, reduce_kv, warn_once
from .merge import add_boxes_into_, merge_boxes_into_

Rows = tuple[int, int]  # [start, stop)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: identity, as its positions are tensors
class Block:
    """One kernel call of a ring step: query rows × key rows of the K/V held at that step.

    ``q_batch``/``kv_batch`` are rows of the batch dimension (ranks stacked
    in the batch, or all of it), ``q``/``kv`` rows of the sequence dimension.
    ``causal`` is the kernels' top-left mask (a diagonal block). A causal
    block that mask cannot express carries the token positions of its rows
    (``q_pos``, ``k_pos``) and runs on the einops path with them. A
    *gathered* block (dilated attention) carries a ``gather``
    (:class:`ringbook.fast.dilated.Gather`): it reads its rows with
    ``take_q``/``take_kv``/``take_lse`` instead of the row ranges, writes or
    merges its result with ``put`` and adds its gradients with
    ``add_q``/``add_kv``.
    """

    q_batch: Rows
    q: Rows
    kv_batch: Rows
    kv: Rows
    causal: bool = False
    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    gather: Any = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """The schedule as data: ``steps[t]`` are the block calls of step ``t``.

    ``merge_group``: up to this many consecutive block results (over any
    rows, across steps) are held and folded into the accumulators in one pass
    (one read and write of the float32 accumulator per group instead of per
    block). ``grad_group``: likewise for the backward's block gradients,
    summed into dq, dK and dV one group at a time.
    """

    steps: tuple[tuple[Block, ...], ...]
    merge_group: int = 1
    grad_group: int = 1

    @functools.cached_property
    def has_gather(self) -> bool:
        """Whether some block is a gathered one (dilated attention: it writes or merges its own rows)."""
        return any(blk.gather is not None for blocks in self.steps for blk in blocks)

    @functools.cached_property
    def has_positions(self) -> bool:
        """Whether some block carries token positions (it then needs ``D − dlse`` in the backward)."""
        return any(blk.q_pos is not None for blocks in self.steps for blk in blocks)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The one settings record of the fused rings."""

    scale: float
    backend: str  # "auto", a fused backend, or "einops"
    who: str = "the ring"  # the public function, for messages
    twice: str = "ringbook.ring_attention"  # its twice-differentiable twin, for the double-backward refusal
    overlap: bool = True  # on CUDA the backward's gradient sums run on a second stream, under the next block's kernel
    graph: bool | str = "auto"  # replay forward-only CUDA calls from a CUDA graph once their shape repeats (run)


class Mover:
    """How the K/V of each step reach the blocks, and how their gradients get home (see the module docstring).

    ``step_reads_gradients``: :meth:`backward_done` reads the step's dK/dV
    (a P2P mover sends them on), so the step's gradient sums must be done
    before it is called.
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


def _rows(x: torch.Tensor, batch: Rows, rows: Rows, dim: int = 1) -> torch.Tensor:
    """The view of ``x`` at batch rows ``batch`` and rows ``rows`` of dimension ``dim`` (1, or 2 for an lse)."""
    if dim == 1:
        return x[batch[0]:batch[1], rows[0]:rows[1]]
    return x[batch[0]:batch[1], :, rows[0]:rows[1]]


def _block_forward(q, k, v, blk: Block, s: Settings):
    if blk.gather is not None:
        g = blk.gather
        return forward_block(g.take_q(q), g.take_kv(k), g.take_kv(v), scale=s.scale, causal=blk.causal,
                             backend=s.backend)
    qb, kb, vb = _rows(q, blk.q_batch, blk.q), _rows(k, blk.kv_batch, blk.kv), _rows(v, blk.kv_batch, blk.kv)
    if blk.q_pos is not None:
        h = q.shape[2]
        return attend_block(qb, expand_kv(kb, h), expand_kv(vb, h), scale=s.scale, causal=True, q_pos=blk.q_pos,
                            k_pos=blk.k_pos, chunk=KEY_CHUNK)
    return forward_block(qb, kb, vb, scale=s.scale, causal=blk.causal, backend=s.backend)


_SIDE_STREAMS: dict = {}  # device index -> the engine's second stream
OVERLAP = True  # False: every fold runs in line (an ablation switch for the GPU tools)


class _Side:
    """Where the backward's memory-bound folds run: the sums of block gradients into dq, dK and dV.

    On CUDA (with ``Settings.overlap``) they go to a second stream, so a
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
        if enabled and OVERLAP and x.is_cuda:
            index = x.device.index if x.device.index is not None else torch.cuda.current_device()
            if index not in _SIDE_STREAMS:
                _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
            self.stream = _SIDE_STREAMS[index]

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


def ring_forward(q: torch.Tensor, plan: Plan, mover: Mover, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q`` against every step's K/V, in the accumulator dtype (float32 for half precision).

    Block results are held and folded into the accumulators ``plan.merge_group``
    at a time, whatever rows each covers (:func:`~ringbook.fast.merge.merge_boxes_into_`);
    the first fold sets the accumulators (rows it does not cover become the
    empty partial ``(0, -inf)``). A plan with gathered blocks starts them at
    ``(0, -inf)`` instead, as its blocks write or merge their own rows.
    """
    b, c, h, d = q.shape
    work = compute_dtype(q.dtype)
    first = plan.steps[0][0] if plan.steps and plan.steps[0] else None
    whole = first is not None and first.gather is None and first.q_batch == (0, b) and first.q == (0, c)
    if whole and len(plan.steps) == 1 and len(plan.steps[0]) == 1:  # one block: its result is the answer
        k, v = mover.forward_kv(0)
        out, lse = _block_forward(q, k, v, first, s)
        mover.forward_done(0)
        return out, lse
    acc_out = torch.empty(b, c, h, d, dtype=work, device=q.device)
    acc_lse = torch.empty(b, h, c, dtype=work, device=q.device)
    initialise = not plan.has_gather
    if plan.has_gather:
        acc_out.zero_()
        acc_lse.fill_(float("-inf"))
    pending: list = []

    def flush():
        nonlocal pending, initialise
        if pending or initialise:
            merge_boxes_into_(acc_out, acc_lse, pending, initialise=initialise)
            pending, initialise = [], False

    for t, blocks in enumerate(plan.steps):
        k, v = mover.forward_kv(t)
        for blk in blocks:
            if blk.gather is not None:  # a gathered block writes or merges its own rows
                flush()
                blk.gather.put(acc_out, acc_lse, *_block_forward(q, k, v, blk, s))
                continue
            pending.append(((*blk.q_batch, *blk.q), *_block_forward(q, k, v, blk, s)))
            if len(pending) == plan.merge_group:
                flush()
        mover.forward_done(t)
    flush()
    return acc_out, acc_lse


def ring_backward(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                  dlse: torch.Tensor | None, plan: Plan, mover: Mover, s: Settings) -> torch.Tensor:
    """The ring again; each block's gradients from the global ``out``/``lse`` of its rows. Returns dq.

    dK/dV accumulate where the mover says (:meth:`Mover.backward_kv`) and come
    home through :meth:`Mover.gradients`. The fused backward ops cannot take
    a gradient of lse: where one flows, every block uses the einops backward
    with ``delta = D − dlse`` (exact, slower, and said once in a warning).
    """
    work = compute_dtype(q.dtype)
    fast = q.is_cuda and q.dtype in LOW_PRECISION and s.backend != "einops"
    if dlse is not None and fast and bool((dlse != 0).any()):
        warn_once(f"{s.who}: a gradient flows into lse; the fused backward ops cannot take it, so this backward "
                  "uses the (slower, exact) einops kernels")
        fast = False
    full_delta = delta(dout, out, dlse) if (plan.has_positions or not fast) else None
    backend = s.backend if fast else "einops"
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    h = q.shape[2]
    side = _Side(q, s.overlap)
    held: list = []  # block gradients not yet summed: (q box, gq, kv box, gk, gv, (dk, dv))

    def flush():
        if held:
            items = list(held)
            held.clear()
            side.run(functools.partial(_sum_gradients, dq, items), *(x for it in items for x in (it[1], it[3], it[4])))

    for t, blocks in enumerate(plan.steps):
        k, v, dk, dv = mover.backward_kv(t)
        if held and held[-1][5][0] is not dk:
            flush()  # the mover hands out new gradient buffers: the held sums go to the old ones first
        for blk in blocks:
            if blk.gather is not None:
                _gathered_backward(blk, q, k, v, out, lse, dout, dq, dk, dv, full_delta, fast, backend, s, side)
                continue
            sl = (blk.q_batch, blk.q)
            args = (_rows(q, *sl), _rows(k, blk.kv_batch, blk.kv), _rows(v, blk.kv_batch, blk.kv), _rows(out, *sl),
                    _rows(lse, *sl, dim=2), _rows(dout, *sl))
            blk_delta = None if full_delta is None else _rows(full_delta, *sl, dim=2)
            if blk.q_pos is not None:
                gq, gk, gv = attend_block_backward(args[0], expand_kv(args[1], h), expand_kv(args[2], h), *args[3:],
                                                   scale=s.scale, causal=True, q_pos=blk.q_pos, k_pos=blk.k_pos,
                                                   delta=blk_delta, chunk=KEY_CHUNK)
                gk, gv = reduce_kv(gk, k.shape[2]), reduce_kv(gv, k.shape[2])
            else:
                gq, gk, gv = block_attention_backward(*args, scale=s.scale, causal=blk.causal,
                                                      delta=None if fast else blk_delta, backend=backend)
            held.append(((*blk.q_batch, *blk.q), gq, (*blk.kv_batch, *blk.kv), gk, gv, (dk, dv)))
            if len(held) == plan.grad_group:
                flush()
        if mover.step_reads_gradients:
            flush()
            side.join()
        mover.backward_done(t)
    flush()
    side.join()
    return dq


def _sum_gradients(dq: torch.Tensor, items: list) -> None:
    """Add held block gradients into dq and their dK/dV buffers, one pass over each per group."""
    dk, dv = items[0][5]
    add_boxes_into_(dq, [(box, gq) for box, gq, *_ in items])
    add_boxes_into_(dk, [(box, gk) for _, _, box, gk, _, _ in items])
    add_boxes_into_(dv, [(box, gv) for _, _, box, _, gv, _ in items])


def _gathered_backward(blk, q, k, v, out, lse, dout, dq, dk, dv, full_delta, fast, backend, s: Settings, side: _Side):
    """One gathered block's backward: its rows taken from the global tensors, its gradients added back."""
    g = blk.gather
    blk_delta = None if (fast or full_delta is None) else g.take_lse(full_delta)
    gq, gk, gv = block_attention_backward(g.take_q(q), g.take_kv(k), g.take_kv(v), g.take_q(out), g.take_lse(lse),
                                          g.take_q(dout), scale=s.scale, causal=blk.causal, delta=blk_delta,
                                          backend=backend)

    def add():
        g.add_q(dq, gq)
        g.add_kv(dk, gk)
        g.add_kv(dv, gv)

    side.run(add, gq, gk, gv)


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
    """

    settings: Settings
    start: Callable[[torch.Tensor, torch.Tensor, bool], tuple[Mover, Plan]]
    enter: Callable[..., torch.Tensor] = lambda x, dim=1: x
    leave: Callable[..., torch.Tensor] = lambda x, dim=1, dtype=None: x.to(dtype or x.dtype)
    key: tuple | None = None
    parts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None


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

    Only q, k, v, out and lse are saved (the backward re-enters them), as
    FlashAttention does. Once differentiable: ``create_graph=True`` raises.
    """

    @staticmethod
    def forward(ctx, q, k, v, job: Job):
        ctx.set_materialize_grads(False)
        parts = job.parts(q, k, v) if job.parts is not None else None
        if parts is None:
            mover, plan = job.start(job.enter(k), job.enter(v), False)
            acc_out, acc_lse = ring_forward(job.enter(q), plan, mover, job.settings)
            del mover
            out = job.leave(acc_out, dtype=q.dtype)
            del acc_out
            lse = job.leave(acc_lse, dim=2, dtype=compute_dtype(q.dtype))
        else:
            b, n, h, _ = q.shape
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            lse = torch.empty(b, h, n, dtype=compute_dtype(q.dtype), device=q.device)
            for part in parts:  # one share of the rows at a time: only its buffers are alive
                part.put(out, lse, *ring_forward(part.q, part.plan, part.mover, job.settings))
                del part
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.job = job
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        job = ctx.job
        refuse_double_backward(job.settings.who, "a custom autograd Function running the ring again with fused "
                               "backward kernels", f"For second derivatives use {job.settings.twice} (einops, "
                               "twice differentiable).")
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype).contiguous()
        mover, plan = job.start(job.enter(k), job.enter(v), True)
        dq = ring_backward(job.enter(q), job.enter(out), job.enter(lse, dim=2), job.enter(dout),
                           None if dlse is None else job.enter(dlse, dim=2), plan, mover, job.settings)
        dk, dv = mover.gradients()
        return (job.leave(dq, dtype=q.dtype), job.leave(dk, dtype=k.dtype), job.leave(dv, dtype=v.dtype), None)


# --------------------------------------------------------------------------- CUDA graphs

GRAPH_MAX_BYTES = 64 << 20  # with graph="auto", calls whose q is at most this big (launch-bound sizes) are graphed
GRAPH_CACHE_SIZE = 8  # captured graphs kept (each holds its working memory)
GRAPHS: dict = {}  # (job key, tensor layout) -> _SEEN, a _Graph, or why capture was refused (a string)


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
    return mode is True or q.nbytes <= GRAPH_MAX_BYTES


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
    from ..bench.rules import TOLERANCE

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
    :data:`GRAPH_MAX_BYTES`, ``True`` for any size, ``False`` never): the
    first call of a shape runs eagerly, the second captures it on static
    copies of its inputs and keeps the graph only if its replay agrees with
    that call's eager result, later calls copy their inputs in and replay
    (one launch of the whole ring instead of dozens). A shape whose capture
    fails runs eagerly, with one warning (:data:`GRAPHS` holds why). Each
    kept graph holds its call's working memory (at most
    :data:`GRAPH_CACHE_SIZE` graphs, the least recently used dropped first);
    :func:`ringbook.fast.kernels.reset_caches` gives it back.
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
