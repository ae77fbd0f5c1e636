"""Ring attention over a ``torch.distributed`` process group (notebook 02, one rank per process).

Each process holds one shard of q, k and v (``b c h d``, ``c = n / w`` tokens
dealt by a layout of :mod:`ringbook.schedule`) and never the whole sequence:
memory per rank is O(n / w). The key/value shard travels round the ring,
rank r → r+1, by batched point-to-point messages
(``dist.batch_isend_irecv``); while the next shard is in flight the current
one is attended (double buffering), and each block's ``(out, lse)`` is folded
into the rank's running summary with equation (M),
:func:`~ringbook.online_softmax.merge_partials`. Which blocks each rank
computes at each step is read from :func:`~ringbook.schedule.ring_schedule`.

The backward runs the ring again (:func:`~ringbook.online_softmax.attend_block_backward`
per block, with the final lse): dq stays home, dk/dv travel with their
key/value shard and one more hop after the last step brings them back to
the rank that owns the shard.

Every wait on the network has a deadline (``timeout=``, default from the
environment variable ``RINGBOOK_P2P_TIMEOUT`` or 60 s): a peer that died,
raised or stalls makes the others raise a ``TimeoutError``/``RuntimeError``
naming the peer and the step instead of hanging. Inputs that do not fit
together across ranks (unequal shard lengths, a layout the shards cannot
have, a different batch, heads, head_dim, dtype, causal, layout, scale or
kernel on some rank) are refused with a ``ValueError`` on every rank. Ranks
in messages are ranks in the process group passed as ``group``.

:func:`~ringbook.launch.spawn` (re-exported here) starts a function on ``w``
local processes (gloo by default) for tests and notebooks. Importing this
module starts nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import struct
from collections.abc import Iterable

import torch
import torch.distributed as dist
from einops import einsum

from ._utils import (
    FLOAT_DTYPES, check_bool, check_positive_int, check_qkv, compute_dtype, lse_dtype, refuse_double_backward,
    resolve_scale,
)
from ._comm import DEFAULT_TIMEOUT_S, _exchange, _peer_error, _Ring, _wait, agree_on_shards, resolve_timeout  # noqa: F401
from .kernels import BACKENDS, _forward_block, block_attention_backward, expand_kv, merge_many_into_, reduce_kv
from .online_softmax import KEY_CHUNK, attend_block, attend_block_backward, merge_partials
from .schedule import LAYOUTS, check_layout, layout_positions, ring_schedule



# --------------------------------------------------------------------------- sharding

def _check_dim(dim, ndim: int, what: str) -> int:
    """``dim`` as a non-negative axis of a ``ndim``-dimensional tensor, else raise naming ``dim``."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for {what} with {ndim} dimensions "
                         f"(valid: {-ndim}..{ndim - 1}; 1 for b n h d, 2 for an lse b h n)")
    return int(dim) % ndim


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of ``x`` along ``dim`` (1 for ``b n h d``, 2 for an lse ``b h n``).

    Raises TypeError/ValueError naming the argument: ``x`` not a tensor,
    ``rank`` not an int in ``0..world_size-1``, ``world_size`` not a positive
    int, ``dim`` not an axis of ``x``, a layout that cannot deal ``x``'s
    length to ``world_size`` ranks.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    world_size = check_positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int in 0..{world_size - 1}, got {type(rank).__name__} {rank!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    dim = _check_dim(dim, x.dim(), f"x of shape {tuple(x.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n, parts = x.shape[dim], 2 * world_size if layout == "zigzag" else world_size
    if n % parts:
        need = f"2·world_size = {parts}" if layout == "zigzag" else f"world_size = {parts}"
        raise ValueError(f"world_size={world_size} does not fit length {n} (dim {dim} of shape {tuple(x.shape)}) with "
                         f"layout={layout!r}: {need} must divide {n}")
    positions = layout_positions(n, world_size, layout)
    return x.index_select(dim, positions[int(rank)].to(x.device))


def unshard(shards, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Put per-rank shards (a list, rank order) back into token order along ``dim``.

    Raises TypeError/ValueError naming the argument: ``shards`` not a
    sequence of tensors (``shards[i]`` named), shards of different
    dimensions, dtype, device or shape (apart from their common length along
    ``dim``), ``dim`` not an axis, a layout they cannot come from.
    """
    if isinstance(shards, (str, bytes)) or not isinstance(shards, Iterable) or (
            isinstance(shards, torch.Tensor) and shards.dim() == 0):
        raise TypeError(f"shards must be a list of tensors (one per rank, in rank order), got {type(shards).__name__}")
    shards = list(shards)
    if not shards:
        raise ValueError("unshard needs at least one shard")
    for i, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"shards[{i}] must be a torch.Tensor, got {type(s).__name__}")
    first = shards[0]
    dim = _check_dim(dim, first.dim(), f"shards[0] of shape {tuple(first.shape)}")
    for i, s in enumerate(shards[1:], start=1):
        if s.dim() != first.dim() or s.dtype != first.dtype or s.device != first.device:
            raise ValueError(f"shards[{i}] ({tuple(s.shape)}, {s.dtype}, {s.device}) does not match shards[0] "
                             f"({tuple(first.shape)}, {first.dtype}, {first.device}): shards must share dimensions, "
                             "dtype and device")
    lengths = {s.shape[dim] for s in shards}
    if len(lengths) != 1:
        raise ValueError(f"shards must have equal length along dim {dim}, got {[s.shape[dim] for s in shards]}")
    others = {tuple(x for a, x in enumerate(s.shape) if a != dim) for s in shards}
    if len(others) != 1:
        raise ValueError(f"shards must have the same shape apart from dim {dim}, got {[tuple(s.shape) for s in shards]}")
    w, c = len(shards), lengths.pop()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and c % 2:
        raise ValueError(f"layout='zigzag' gives each rank two chunks of equal length, so shards must have an even "
                         f"length along dim {dim}, got {c}; pass the layout the shards were cut with")
    positions = layout_positions(w * c, w, layout).reshape(-1)  # where each row of the cat goes
    inverse = torch.argsort(positions).to(first.device)
    return torch.cat(shards, dim=dim).index_select(dim, inverse)


# --------------------------------------------------------------------------- communication

# --------------------------------------------------------------------------- input checks

def _scale_bits(scale: float) -> int:
    """The float64 bit pattern of ``scale`` as an int64 (exact: it travels in the agreement's int64 table)."""
    return struct.unpack("<q", struct.pack("<d", scale))[0]


def _bits_scale(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _local_problem(q, k, v, causal, layout, scale, kernel="einops"):
    """``(problem, scale)``: the first thing wrong with this rank's own input (or None) and the resolved scale."""
    try:
        if kernel not in BACKENDS:
            raise ValueError(f"kernel must be one of {BACKENDS}, got {kernel!r}")
        check_qkv(q, k, v, allow_gqa=kernel != "einops")
        check_bool(causal, "causal")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if k.shape[1] != q.shape[1]:
            raise ValueError(
                f"each rank must hold q and k/v shards of the same length, got q {q.shape[1]} and "
                f"k {k.shape[1]} tokens; shard all three with ringbook.distributed.shard"
            )
        scale = resolve_scale(scale, q.shape[3])
    except (TypeError, ValueError) as exc:
        return exc, None
    return None, scale


def _check_agreement(q, k, v, causal, layout, scale, ring: _Ring, kernel="einops") -> float:
    """All-gather a few ints per rank and refuse, on every rank, inputs that do not fit together.

    Returns the resolved scale (the same on every rank: its bits are compared).
    """
    problem, scale = _local_problem(q, k, v, causal, layout, scale, kernel)
    if problem is None:
        info = [1, q.shape[1], q.shape[0], q.shape[2], q.shape[3], LAYOUTS.index(layout), int(causal),
                FLOAT_DTYPES.index(q.dtype), k.shape[2], _scale_bits(scale), BACKENDS.index(kernel)]
    else:
        info = [0] + [-1] * 10
    table = agree_on_shards(
        ring, info, problem, "checking the shards with all ranks before step 0 (all_gather of shard lengths)",
        "cut the sequence with ringbook.distributed.shard(x, rank, world_size, layout), which needs a length "
        "divisible by world_size (2·world_size for zigzag)")
    names = {2: "batch", 3: "heads", 4: "head_dim", 5: "layout", 6: "causal", 7: "dtype", 8: "k/v heads",
             9: "scale", 10: "kernel"}
    readable = {"layout": lambda x: LAYOUTS[x], "causal": bool, "dtype": lambda x: str(FLOAT_DTYPES[x]),
                "scale": _bits_scale, "kernel": lambda x: BACKENDS[x]}
    for col, name in names.items():
        values = [row[col] for row in table]
        if len(set(values)) != 1:
            values = [readable.get(name, int)(x) for x in values]
            raise ValueError(f"every rank must call {ring.op} with the same {name}, got {values} on "
                             f"ranks 0..{ring.world - 1}")
    c = table[0][1]  # the common shard length
    if layout == "zigzag" and c % 2:
        raise ValueError(
            f"layout='zigzag' gives each rank two chunks of equal length, so the local length must be "
            f"even, got {c}; shard with layout='zigzag' (sequence length divisible by "
            f"2·world_size = {2 * ring.world}) or pass the layout the shards were made with"
        )
    check_layout(c * ring.world, ring.world, layout)
    return scale


# --------------------------------------------------------------------------- the ring

@dataclasses.dataclass(frozen=True)
class _Plan:
    ring: _Ring
    causal: bool
    layout: str
    scale: float
    positions: torch.Tensor  # (w, c) token positions of every rank's shard
    schedule: list
    kernel: str = "einops"  # "einops": attend_block; else a ringbook.kernels backend for the block kernel
    top_left: frozenset = frozenset()  # (step, rank, block index) of causal blocks the top-left mask is exact for


def _top_left_blocks(positions: torch.Tensor, schedule) -> frozenset:
    """Causal blocks whose position mask is the top-left one (square, key i the last one query i sees).

    Those the fused kernels take with ``is_causal=True``: every diagonal
    block, and striped blocks from an earlier rank. Computed once, on the CPU.
    """
    found = set()
    for t, row in enumerate(schedule):
        for step in row:
            for i, block in enumerate(step.blocks):
                if block.kind != "causal":
                    continue
                (q0, q1), (k0, k1) = block.q, block.kv
                qp, kp = positions[step.rank, q0:q1], positions[step.kv_rank, k0:k1]
                if qp.numel() == kp.numel() and bool((kp[1:] > kp[:-1]).all()) and torch.equal(
                        torch.searchsorted(kp, qp, right=True), torch.arange(1, qp.numel() + 1)):
                    found.add((t, step.rank, i))
    return frozenset(found)


@functools.lru_cache(maxsize=64)
def _layout_parts(n: int, world: int, layout: str, causal: bool, fused: bool, device: str):
    """Token positions (on ``device``), the schedule and the top-left causal blocks; cached per call shape.

    Building them takes milliseconds of CPU (a host-to-device copy too), which
    a GPU call of a few tens of milliseconds would wait for on every call.
    """
    positions = layout_positions(n, world, layout)
    schedule = ring_schedule(n, world, layout=layout, causal=causal)
    top_left = _top_left_blocks(positions, schedule) if fused and causal else frozenset()
    return positions.to(device), schedule, top_left


def _fast_block(plan: _Plan, t: int, step, i: int, block) -> bool:
    """Whether block ``i`` of ``step`` goes to the fused kernel (else the einops path with positions)."""
    return plan.kernel != "einops" and (block.kind == "full" or (t, step.rank, i) in plan.top_left)


def _block_args(plan: _Plan, step, block):
    """Row slices and mask keywords of one block of the schedule."""
    (q0, q1), (k0, k1) = block.q, block.kv
    kw = {"scale": plan.scale, "causal": block.kind == "causal", "chunk": KEY_CHUNK}
    if kw["causal"]:
        kw["q_pos"] = plan.positions[step.rank, q0:q1]
        kw["k_pos"] = plan.positions[step.kv_rank, k0:k1]
    return slice(q0, q1), slice(k0, k1), kw


def _forward(q, k, v, plan: _Plan):
    ring = plan.ring
    b, c, h, d = q.shape
    work = compute_dtype(q.dtype)
    out = torch.zeros(b, c, h, d, dtype=work, device=q.device)
    lse = torch.full((b, h, c), float("-inf"), dtype=work, device=q.device)
    # What travels: K and V (contiguous; sent as they are at step 0, never written). Received shards go to
    # two buffer pairs in turn, so the one being attended is never the one being received into.
    held = [k.contiguous(), v.contiguous()]
    buffers = [[torch.empty_like(x) for x in held] for _ in range(2)] if ring.world > 1 else []
    for t in range(ring.world):
        what = ring.describe("forward", t, "the K/V shard")
        spare = buffers[t % 2] if t < ring.world - 1 else None
        works = _exchange(held, spare, ring, 0, what) if spare is not None else []
        step = plan.schedule[t][ring.rank]
        for i, block in enumerate(step.blocks):
            rows, keys, kw = _block_args(plan, step, block)
            if plan.kernel == "einops":
                o_blk, lse_blk = attend_block(q[:, rows], held[0][:, keys], held[1][:, keys], **kw)
                out[:, rows], lse[:, :, rows] = merge_partials(out[:, rows], lse[:, :, rows], o_blk, lse_blk)
                continue
            if _fast_block(plan, t, step, i, block):
                o_blk, lse_blk = _forward_block(q[:, rows], held[0][:, keys], held[1][:, keys], scale=plan.scale,
                                                causal=block.kind == "causal", backend=plan.kernel)
            else:  # a causal block the top-left mask cannot express: positions, einops
                o_blk, lse_blk = attend_block(q[:, rows], *(expand_kv(x[:, keys], q.shape[2]) for x in held), **kw)
            # step 0's first block over every row sets the accumulators (no read of the zeros)
            merge_many_into_(out[:, rows], lse[:, :, rows], [(o_blk, lse_blk)], initialise=t == 0 and i == 0
                             and block.q == (0, c))
        if works:
            _wait(works, ring, what)
            held = spare
    return out.to(q.dtype), lse.to(lse_dtype(q.dtype))


def _backward(q, k, v, out, lse, dout, dlse, plan: _Plan):
    ring = plan.ring
    work = compute_dtype(q.dtype)
    delta = einsum(dout.to(work), out.to(work), "b i h d, b i h d -> b h i")  # D = rowsum(dO ∘ O)
    if dlse is not None:
        delta = delta - dlse.to(work)  # a gradient of lse adds P ∘ dlse to dS
    # The flash backward op computes D itself and cannot take dlse: give it delta=None when it may run.
    fast_delta = None if dlse is None else delta
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    held = torch.stack([k, v]).contiguous()
    spare = torch.empty_like(held)
    grad_works, grad_in, grad_out = [], None, None
    for t in range(ring.world):
        kv_what = ring.describe("backward", t, "the K/V shard")
        kv_works = _exchange([held], [spare], ring, 0, kv_what) if t < ring.world - 1 else []
        step = plan.schedule[t][ring.rank]
        grad = torch.zeros((2, *k.shape), dtype=work, device=q.device)  # this rank's dk, dv of the held shard
        for i, block in enumerate(step.blocks):
            rows, keys, kw = _block_args(plan, step, block)
            if _fast_block(plan, t, step, i, block):
                dq_b, dk_b, dv_b = block_attention_backward(
                    q[:, rows], held[0][:, keys], held[1][:, keys], out[:, rows], lse[:, :, rows], dout[:, rows],
                    scale=plan.scale, causal=block.kind == "causal",
                    delta=None if fast_delta is None else fast_delta[:, :, rows], backend=plan.kernel)
            else:
                dq_b, dk_b, dv_b = attend_block_backward(
                    q[:, rows], *(expand_kv(x[:, keys], q.shape[2]) for x in held), out[:, rows],
                    lse[:, :, rows], dout[:, rows], delta=delta[:, :, rows], **kw)
                dk_b, dv_b = reduce_kv(dk_b, k.shape[2]), reduce_kv(dv_b, k.shape[2])
            dq[:, rows] += dq_b
            grad[0][:, keys] += dk_b
            grad[1][:, keys] += dv_b
        if t > 0:  # add what the ranks before me accumulated for this shard
            _wait(grad_works, ring, grad_what)
            grad += grad_in
        # send the shard's gradients on with it; after the last step this hop brings them home
        grad_out, grad_in = grad, torch.empty_like(grad)
        if ring.world > 1:
            grad_what = ring.describe("backward", t, "dK/dV" if t < ring.world - 1 else "dK/dV (the hop home)")
            grad_works = _exchange([grad_out], [grad_in], ring, 2, grad_what)
        if kv_works:
            _wait(kv_works, ring, kv_what)
            held, spare = spare, held
    if ring.world > 1:
        _wait(grad_works, ring, grad_what)
    else:
        grad_in = grad_out
    return dq.to(q.dtype), grad_in[0].to(k.dtype), grad_in[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse = _forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        # Before any message: every rank that asks for create_graph refuses here, none waits on the ring.
        refuse_double_backward(
            f"ringbook.distributed.{ctx.plan.ring.op}",
            "a second trip round the ring: the dK/dV other ranks add arrive as messages, which autograd cannot "
            "differentiate", "For second derivatives use ringbook.ring_attention in one process (einops, twice "
            "differentiable).")
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.plan)
        return dq, dk, dv, None


def ring_attention(q, k, v, *, causal=False, layout="contiguous", group=None, scale=None, timeout=None,
                   kernel="einops"):
    """Exact attention over the shards held by the ranks of ``group``. Returns this rank's ``(out, lse)``.

    Args:
        q, k, v: this rank's ``b c h d`` shards, as :func:`shard` cuts them
            with the same ``layout``; the sequence is ``n = w · c`` tokens.
        causal: key j is seen by query i only if j ≤ i (positions in the
            original token order, whatever the layout).
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"`` (:mod:`ringbook.schedule`).
        group: the process group (default: the world).
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        timeout: seconds to wait for any peer (default ``$RINGBOOK_P2P_TIMEOUT`` or 60).
        kernel: the block kernel. ``"einops"`` (default): :func:`~ringbook.online_softmax.attend_block`,
            the reading path. ``"auto"`` (or a backend of :data:`ringbook.kernels.BACKENDS`):
            the fused kernels of :mod:`ringbook.kernels` — PyTorch's cuDNN/flash/efficient SDPA
            on CUDA, the flash backward op, the fused merge — and grouped-query attention
            (k/v with fewer heads, dividing q's; they travel unexpanded). Causal blocks the
            kernels' top-left mask cannot express (striped, from a later rank) use the einops
            path with positions.

    Returns:
        out ``b c h d`` (input dtype) and lse ``b h c`` (float32 for
        float16/bfloat16) for this rank's queries; :func:`unshard` of every
        rank's parts equals :func:`ringbook.naive_attention` of the whole
        sequence. Once differentiable: the backward is a second trip round
        the ring, which every rank must take (call ``backward`` on every
        rank); ``create_graph=True`` (double backward) raises a RuntimeError
        on every rank that asks for it, before any message, instead of
        giving second derivatives that miss the other ranks' terms.

    Raises:
        ValueError on every rank if the shards do not fit together (unequal
        lengths, a layout they cannot have, different batch/heads/dtype,
        options that differ between ranks: causal, layout, scale, kernel)
        or one rank's input is invalid (that rank raises its own error, the
        others name it);
        TimeoutError or RuntimeError naming the peer and step if a peer does
        not answer within ``timeout``.
    """
    return _ring_attention(q, k, v, causal=causal, layout=layout, group=group, scale=scale, timeout=timeout,
                           kernel=kernel, op="ring_attention")


def _ring_attention(q, k, v, *, causal, layout, group, scale, timeout, kernel, op):
    ring = _Ring.of(group, resolve_timeout(timeout), op=op)
    scale = _check_agreement(q, k, v, causal, layout, scale, ring, kernel)
    causal = bool(causal)  # checked: True/False or numpy.bool_
    positions, schedule, top_left = _layout_parts(q.shape[1] * ring.world, ring.world, layout, causal,
                                                  kernel != "einops", str(q.device))
    plan = _Plan(ring, causal, layout, scale, positions, schedule, kernel, top_left)
    return _RingAttention.apply(q, k, v, plan)


def production_ring_attention(q, k, v, *, causal=False, layout=None, group=None, scale=None, timeout=None,
                              kernel="auto"):
    """:func:`ring_attention` with the fused kernels (``kernel="auto"``) and the production default layout.

    The multi-process form of :func:`ringbook.production_ring_attention`:
    ``layout`` defaults to ``"zigzag"`` when causal (balanced work), else
    ``"contiguous"``; k/v may have fewer heads than q (grouped-query
    attention). Shards as :func:`shard` cuts them with that layout. Errors
    name ``production_ring_attention``. Once differentiable, as
    :func:`ring_attention`.
    """
    layout = layout if layout is not None else ("zigzag" if causal else "contiguous")
    return _ring_attention(q, k, v, causal=causal, layout=layout, group=group, scale=scale, timeout=timeout,
                           kernel=kernel, op="production_ring_attention")


# The local launcher lives in ringbook.launch; re-exported for convenience.
from .launch import SpawnError, free_port, spawn  # noqa: E402,F401
# The multi-process dilated V2 (ringbook.dist_dilated), re-exported here.
from .dist_dilated import ring_dilated_attention  # noqa: E402,F401
