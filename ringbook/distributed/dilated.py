"""Ring dilated attention over a ``torch.distributed`` process group (notebook 03, one rank per process).

The multi-process form of :func:`ringbook.ring_dilated_attention`: the same
function as :func:`ringbook.dilated_attention` (equation (D)) for every
world size ``w`` dividing ``n``, each process holding only its contiguous
shard (``b c h d``, ``c = n / w``, as :func:`ringbook.distributed.shard`
cuts it with ``layout="contiguous"``). Which segment spans which ranks, and
what each rank sends, is read from :func:`~ringbook.ring_dilated.dilated_ring_plan`:

* a segment inside one shard is **local**: computed from the rank's own
  shard, with no communication;
* a segment spanning several ranks is **exchanged**: each spanned rank sends
  the *dilated* rows of its piece of K and V (``w/r`` tokens of the segment
  per head, never the whole K or V) to the other spanned ranks (with
  ``causal``, to the later ones only), then attends its own dilated queries
  to the gathered segment.

Why point-to-point among the spanned ranks and not a collective over the
group: a segment concerns only the ranks it spans (two of eight, say), the
pieces differ in size (a piece shorter than ``r`` may hold no kept row) and
causal traffic is one-way, none of which an ``all_gather`` (every rank, equal
sizes, every direction) expresses. Every piece a rank sends to one peer —
all pairs, all segments, all offsets — is packed into **one** flat buffer,
so a call posts at most one send and one receive per peer, in a single
``dist.batch_isend_irecv`` (safe under NCCL, where separate per-peer calls
could deadlock). Both ends compute the buffer's layout from the plan, so no
sizes travel.

Backward: a custom autograd Function. The forward keeps the local graph —
leaves for q, k, v and for the received pieces — so the backward is that
graph's backward plus the reverse exchange: each rank sends the dK/dV of
the pieces it received back to their owners and adds what comes back for
the pieces it sent (gradient of the rows they were gathered from). The
reverse exchange moves exactly the bytes of the forward, the other way.
A rank whose outputs depend on nothing (no query of its shard is kept by
any pattern) still takes part in the reverse exchange and gets zero
gradients. The forward's graph serves the first backward and is then
freed; a later backward of a retained graph (``retain_graph=True``,
``torch.autograd.gradcheck``) rebuilds it from the saved shards and
received pieces, with no forward messages, and gives the same gradients.
Once differentiable: ``create_graph=True`` (double backward) is refused
with a RuntimeError on every rank that asks for it, before any message.

Guarantees, as :func:`ringbook.distributed.ring_attention`: every wait has a
deadline (``timeout=``, default ``$RINGBOOK_P2P_TIMEOUT`` or 60 s) after
which a ``TimeoutError``/``RuntimeError`` names the peer and the phase;
inputs that do not fit together across ranks (unequal shard lengths,
different options) are refused with a ``ValueError`` on every rank, and an
invalid dilated configuration raises the one-process form's ``ValueError``
on every rank. Ranks are ranks in ``group``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .._utils import FLOAT_DTYPES, check_bool, check_qkv, compute_dtype, refuse_double_backward, resolve_scale
from ..fast.engine import Job, Mover, Settings, run
from ..fast.kernels import BACKENDS
from ..fast.plans import dilated_window as _window
from ..fast.plans import rank_dilated_plan
from ..online_softmax import merge_partials
from ..ring_dilated import DilatedRingPlan, _count, _dilated_rows, _offset_groups, _rank_pair, dilated_ring_plan
from .comm import _peer_error, _Ring, _wait, agree_on_shards, resolve_timeout

FORWARD_TAG, BACKWARD_TAG = 16, 17  # apart from ringbook.distributed's tags 0..3

# --------------------------------------------------------------------------- who sends what (from the plan)


def routes(plan: DilatedRingPlan, rank: int) -> tuple[dict, dict]:
    """The pieces ``rank`` sends to and receives from each peer: ``{peer: [(segment, offset, heads), ...]}``.

    Both ends list a message's pieces in the same order (plan order, then
    offset), which is how a receiver knows the layout of a flat buffer.
    """
    send: dict[int, list] = {}
    recv: dict[int, list] = {}
    for seg in plan.segments:
        if seg.kind == "local" or rank not in seg.ranks:
            continue
        me = seg.ranks.index(rank)
        for o, hs in _offset_groups(*plan.patterns[seg.pair]).items():
            for i, peer in enumerate(seg.ranks):
                if i != me and (not plan.causal or i > me):  # causal: a piece goes to later ranks only
                    send.setdefault(peer, []).append((seg, o, tuple(hs)))
                if i != me and (not plan.causal or i < me):
                    recv.setdefault(peer, []).append((seg, o, tuple(hs)))
    return send, recv


_cached_routes = functools.lru_cache(maxsize=256)(routes)  # routes walks every segment: once per call shape


def _piece_rows(plan: DilatedRingPlan, seg, rank: int, o: int) -> int:
    """Kept rows (offset ``o``) of ``rank``'s piece of ``seg``."""
    a, z = seg.piece(rank, plan.shard_len)
    return _count(a - seg.start, z - seg.start, o, plan.pairs[seg.pair][1])


def _pack(k, v, pieces, plan, rank):
    """One flat buffer: K then V rows of each piece of ``rank``'s own shard, in ``pieces`` order."""
    parts = []
    for seg, o, hs in pieces:
        r = plan.pairs[seg.pair][1]
        parts += [_dilated_rows(x, seg, rank, plan, o, r, list(hs))[0].reshape(-1) for x in (k, v)]
    return torch.cat(parts)


def _unpack(flat, pieces, plan, sender, b, d):
    """Inverse of :func:`_pack` for a buffer from ``sender``: ``{(pair, segment, offset): (k, v)}``, ``b m h d``."""
    shapes = [(b, _piece_rows(plan, seg, sender, o), len(hs), d) for seg, o, hs in pieces]
    sizes = [s[0] * s[1] * s[2] * s[3] for s in shapes for _ in (0, 1)]
    chunks = flat.split(sizes)
    return {(seg.pair, seg.index, o): (chunks[2 * i].view(shapes[i]), chunks[2 * i + 1].view(shapes[i]))
            for i, (seg, o, _) in enumerate(pieces)}


def _numel(pieces, plan, sender, b, d) -> int:
    return sum(2 * b * _piece_rows(plan, seg, sender, o) * len(hs) * d for seg, o, hs in pieces)


# --------------------------------------------------------------------------- communication


def _deliver(send: dict, recv_numel: dict, like: torch.Tensor, ring: _Ring, tag: int, phase: str) -> dict:
    """Post every send and receive in one batch; wait (one deadline for all) per peer. Returns ``{peer: flat}``."""
    recv = {p: like.new_empty(n) for p, n in recv_numel.items() if n}
    glob = (lambda p: dist.get_global_rank(ring.group, p)) if ring.group is not None else (lambda p: p)
    ops, peer_of = [], []
    for p, t in send.items():
        if t.numel():
            ops.append(dist.P2POp(dist.isend, t.contiguous(), glob(p), ring.group, tag))
            peer_of.append(p)
    for p, t in recv.items():
        ops.append(dist.P2POp(dist.irecv, t, glob(p), ring.group, tag))
        peer_of.append(p)
    if not ops:
        return recv
    peers = sorted(set(peer_of))

    def what(ps):
        ps = [ps] if isinstance(ps, int) else list(ps)
        return (f"ring_dilated_attention {phase}: exchanging dilated K/V pieces with rank{'s' * (len(ps) > 1)} "
                f"{', '.join(map(str, ps))} (ranks this rank shares segments with)")

    try:
        works = dist.batch_isend_irecv(ops)
    except Exception as exc:  # noqa: BLE001 - a closed connection fails already here
        raise _peer_error(ring, what(peers), exc) from exc
    by_peer = {p: [w for w, q in zip(works, peer_of) if q == p] for p in peers} if len(works) == len(ops) \
        else {tuple(peers): works}  # a coalescing backend (NCCL) returns one work for the batch
    deadline = time.monotonic() + ring.timeout_s
    for p, ws in by_peer.items():
        left = dataclasses.replace(ring, timeout_s=max(deadline - time.monotonic(), 1e-3))
        try:
            _wait(ws, left, what(p))
        except (TimeoutError, RuntimeError) as exc:  # say the whole timeout, not what was left of it
            cause = exc.__cause__ or exc
            raise _peer_error(ring, what(p), cause) from cause
    return recv


# --------------------------------------------------------------------------- input checks


def _fingerprint(x) -> int:
    """A stable (cross-process) 31-bit digest of an option, to compare it across ranks."""
    if isinstance(x, (list, tuple)):
        x = list(x)
    return zlib.crc32(repr(x).encode()) & 0x7FFFFFFF


def _check_agreement(q, k, v, causal, scale, options: dict, ring: _Ring, allow_gqa: bool = False) -> float:
    """All-gather a few ints per rank; refuse on every rank inputs that do not fit together. Returns the scale."""
    try:
        if options.get("backend") is not None and options["backend"] not in BACKENDS:
            raise ValueError(f"backend must be None (the einops form) or one of {BACKENDS}, got "
                             f"{options['backend']!r}")
        check_qkv(q, k, v, allow_gqa=allow_gqa)
        check_bool(causal, "causal")
        if k.shape[1] != q.shape[1]:
            raise ValueError(f"each rank must hold q and k/v shards of the same length, got q {q.shape[1]} and "
                             f"k {k.shape[1]} tokens; shard all three with ringbook.distributed.shard")
        scale = resolve_scale(scale, q.shape[3])
        problem = None
    except (TypeError, ValueError) as exc:
        problem = exc
    kv_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    names = ["shard length", "batch", "num_heads", "head_dim", "causal", "dtype", "k/v requires_grad"] + list(options)
    if problem is None:
        info = [1, q.shape[1], q.shape[0], q.shape[2], q.shape[3], int(causal), FLOAT_DTYPES.index(q.dtype),
                int(kv_grad)] + [_fingerprint(x) for x in options.values()] + [_fingerprint(scale)]
    else:
        info = [0] + [-1] * (len(names) + 1)
    names.append("scale")
    table = agree_on_shards(
        ring, info, problem,
        "checking the shards with all ranks before the exchange (all_gather of shard lengths and options)",
        "cut the sequence with ringbook.distributed.shard(x, rank, world_size, 'contiguous'), which needs a "
        "length divisible by world_size")
    readable = {"dtype": lambda x: str(FLOAT_DTYPES[x]), "causal": bool, "k/v requires_grad": bool}
    for col, name in enumerate(names[1:], start=2):
        values = [row[col] for row in table]
        if len(set(values)) == 1:
            continue
        if col <= 7:
            values = [readable.get(name, int)(x) for x in values]
            got = f"got {values} on ranks 0..{ring.world - 1}"
        else:  # an option: say which ranks agree, and this rank's value
            groups = [[r for r, x in enumerate(values) if x == y] for y in dict.fromkeys(values)]
            mine_value = scale if name == "scale" else options[name]
            got = f"ranks agree only in groups {groups}; this rank (rank {ring.rank}) has {mine_value!r}"
        hint = (" (call backward on every rank or on none: run every rank with the same torch.no_grad() "
                "state and requires_grad on k and v)") if name == "k/v requires_grad" else ""
        raise ValueError(f"every rank must call ring_dilated_attention with the same {name}: {got}{hint}")
    return scale


# --------------------------------------------------------------------------- math (one rank)


def _attend(q, k, v, received: dict, plan: DilatedRingPlan, scale: float, rank: int):
    """This rank's ``(out, lse)`` from its own shard and the pieces it received (``{peer: {key: (k, v)}}``).

    Builds the inbox of :func:`ringbook.ring_dilated_attention` (each exchanged
    segment's dilated K/V in sequence order, this rank's own piece cut from
    its shard) and runs the same per-rank computation.
    """
    inbox = {}
    for seg in plan.segments:
        if seg.kind == "local" or rank not in seg.ranks:
            continue
        me = seg.ranks.index(rank)
        r = plan.pairs[seg.pair][1]
        for o, hs in _offset_groups(*plan.patterns[seg.pair]).items():
            parts = []
            for i, peer in enumerate(seg.ranks[:me + 1] if plan.causal else seg.ranks):
                if peer == rank:
                    parts.append(tuple(_dilated_rows(x, seg, rank, plan, o, r, hs)[0] for x in (k, v)))
                else:
                    parts.append(received[peer][(seg.pair, seg.index, o)])
            inbox[(rank, seg.pair, seg.index, o)] = tuple(torch.cat([p[j] for p in parts], dim=1) for j in (0, 1))
    out = lse = None
    for p in range(len(plan.pairs)):
        o_p, l_p = _rank_pair(rank, p, q, k, v, inbox, plan, scale, plan.causal)
        out, lse = (o_p, l_p) if out is None else merge_partials(out, lse, o_p, l_p)
    return out.to(q.dtype), lse.to(compute_dtype(q.dtype))


@dataclasses.dataclass(frozen=True)
class _Setup:
    ring: _Ring
    plan: DilatedRingPlan
    scale: float
    grad: bool  # whether this rank keeps a graph (autograd on and q, k or v requires grad)
    kv_grad: bool  # the same on every rank (checked): whether backward runs the reverse exchange


def _local_graph(q, k, v, setup: _Setup, flats=None):
    """This rank's local computation, on leaves: ``(leaves, flats, sent, out, lse)``.

    ``flats`` (``{peer: flat}``, what each peer sent) given: no communication,
    the received buffers become leaves too — the backward's recomputation.
    Not given: the forward, delivering the pieces this rank sends and
    receiving its peers' (``flats`` then holds only peers that sent rows).
    """
    plan, rank = setup.plan, setup.ring.rank
    b, _, _, d = q.shape
    send, recv = _cached_routes(plan, rank)  # read only: shared between calls
    grad = setup.grad
    with torch.enable_grad() if grad else torch.no_grad():
        leaves = [x.detach().requires_grad_(grad) for x in (q, k, v)]
        sent = {p: _pack(leaves[1], leaves[2], pieces, plan, rank) for p, pieces in send.items()}
        if flats is None:
            flats = _deliver({p: t.detach() for p, t in sent.items()},
                             {p: _numel(pieces, plan, p, b, d) for p, pieces in recv.items()},
                             k, setup.ring, FORWARD_TAG, "forward")
        flats = {p: f.detach().requires_grad_(grad) for p, f in flats.items()}
        received = {p: _unpack(flats.get(p, k.new_empty(0)), pieces, plan, p, b, d)
                    for p, pieces in recv.items()}
        out, lse = _attend(*leaves, received, plan, setup.scale, rank)
    return leaves, flats, sent, out, lse


def _grad(outputs, inputs, grad_outputs):
    """``torch.autograd.grad`` over the outputs that depend on anything (None for an input nothing reaches).

    A rank none of whose queries a pattern keeps has outputs that are
    constants — out 0, lse -inf — and no graph: its gradients are zeros (and
    it still sends zeros home for the pieces it received), not an error.
    """
    pairs = [(t, g) for t, g in zip(outputs, grad_outputs) if t.requires_grad]
    if not pairs:
        return (None,) * len(inputs)
    return torch.autograd.grad([t for t, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


class _RingDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, setup: _Setup):
        leaves, flats, sent, out, lse = _local_graph(q, k, v, setup)
        if setup.grad:
            # The graph just built serves the first backward; a later one (retain_graph=True, gradcheck)
            # rebuilds it from the saved shards and received buffers, with no communication. Saved
            # through save_for_backward, so a backward after the graph was freed gets autograd's own error.
            ctx.graph = (leaves, flats, sent, out, lse)
            ctx.peers = tuple(flats)
            ctx.save_for_backward(q, k, v, *(f.detach() for f in flats.values()))
            ctx.setup = setup
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, dout, dlse):
        # Before any message: every rank that asks for create_graph refuses here, none waits on the exchange.
        refuse_double_backward(
            "ringbook.distributed.ring_dilated_attention (distributed ring_dilated_attention)",
            "the reverse exchange: the dK/dV of the pieces other ranks received arrive as messages, which "
            "autograd cannot differentiate", "For second derivatives use ringbook.ring_dilated_attention in one "
            "process (einops, twice differentiable).")
        saved = ctx.saved_tensors  # raises autograd's error if the graph was freed by an earlier backward
        setup = ctx.setup
        graph, ctx.graph = ctx.graph, None  # the graph of the forward is used once, then freed
        if graph is None:
            graph = _local_graph(*saved[:3], setup, flats=dict(zip(ctx.peers, saved[3:])))
        (q, k, v), flats, sent, out, lse = graph
        del graph
        peers = list(flats)
        with torch.no_grad():
            grads = _grad((out, lse), (q, k, v, *flats.values()), (dout, dlse))
            dq, dk, dv = (torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), grads[:3]))
            if setup.kv_grad:
                # dK/dV of the received pieces go home; those of the pieces this rank sent come back.
                back = {p: torch.zeros_like(flats[p]) if g is None else g for p, g in zip(peers, grads[3:])}
                home = _deliver(back, {p: t.numel() for p, t in sent.items()}, k, setup.ring, BACKWARD_TAG,
                                "backward")
                sent = {p: t for p, t in sent.items() if t.numel()}
                if sent:
                    dk_s, dv_s = _grad(tuple(sent.values()), (k, v), tuple(home[p] for p in sent))
                    dk = dk if dk_s is None else dk + dk_s
                    dv = dv if dv_s is None else dv + dv_s
        return dq, dk, dv, None


def ring_dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment_lengths: Sequence[int],
                           dilation_rates: Sequence[int], causal: bool = False, heads: str = "all",
                           group: dist.ProcessGroup | None = None, scale: float | None = None,
                           timeout: float | None = None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention (equation (D)) over the shards held by the ranks of ``group``. Returns ``(out, lse)``.

    Args:
        q, k, v: this rank's ``b c h d`` shards, cut with
            ``ringbook.distributed.shard(x, rank, world_size, "contiguous")``;
            the sequence is ``n = world_size · c`` tokens.
        segment_lengths, dilation_rates, heads, causal, scale: as
            :func:`ringbook.dilated_attention` (each ``w`` must divide ``n``).
        group: the process group (default: the world).
        timeout: seconds to wait for any peer (default ``$RINGBOOK_P2P_TIMEOUT`` or 60).
        backend: ``None`` (default): the einops form, this rank's part of
            :func:`ringbook.ring_dilated_attention` with autograd's graph
            (the reading path; any configuration). ``"auto"`` (or a backend
            of :data:`ringbook.fast.kernels.BACKENDS`): the ring engine's
            gathered blocks (:func:`rank_dilated_plan`, :class:`DilatedMover`)
            with PyTorch's fused kernels on CUDA (einops blocks elsewhere),
            k/v may then have fewer heads than q (grouped-query attention);
            it needs each dilation rate to divide the shard length.

    Returns:
        out ``b c h d`` (input dtype) and lse ``b h c`` (float32 for
        float16/bfloat16) for this rank's queries; ``unshard`` of every
        rank's parts equals :func:`ringbook.dilated_attention` of the whole
        sequence. Differentiable; if k or v needs a gradient, the backward
        is an exchange too, so every rank must call ``backward`` (a rank
        that keeps no query gets zero gradients). ``retain_graph=True``
        and repeated backward (``torch.autograd.gradcheck``) are supported.
        Once differentiable: double backward (``create_graph=True``) is
        not supported through distributed ring_dilated_attention and
        raises a RuntimeError rather than returning wrong second
        derivatives; use the one-process
        :func:`ringbook.ring_dilated_attention` for those.

    Raises:
        ValueError on every rank if the shards or options do not fit together,
        a shard has a zero-size dimension (batch, seq, heads or head_dim; the
        message names it) or the dilated configuration is invalid (the
        one-process messages);
        TimeoutError or RuntimeError naming the peer if it does not answer
        within ``timeout``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ringbook.distributed.ring_dilated_attention needs an initialised process group: start the processes "
            "with torchrun or ringbook.distributed.spawn and call torch.distributed.init_process_group first "
            "(ringbook.ring_dilated_attention plays the ring in one process)")
    ring = _Ring.of(group, resolve_timeout(timeout), op="ring_dilated_attention")
    options = {"segment_lengths": segment_lengths, "dilation_rates": dilation_rates, "heads": heads,
               "backend": backend, "kv heads": k.shape[2] if k.dim() == 4 else None}
    scale = _check_agreement(q, k, v, causal, scale, options, ring, allow_gqa=backend is not None)
    # Agreed options and lengths: this raises the one-process ValueError identically on every rank.
    plan = _ring_plan(q.shape[1] * ring.world, ring.world, segment_lengths, dilation_rates, q.shape[2], heads,
                      causal)
    on = torch.is_grad_enabled()
    setup = _Setup(ring, plan, scale, on and any(x.requires_grad for x in (q, k, v)),
                   on and (k.requires_grad or v.requires_grad))
    if backend is not None:
        return _fused(q, k, v, setup, backend)
    return _RingDilatedAttention.apply(q, k, v, setup)


# --------------------------------------------------------------------------- the fused form, on the ring engine


def _kv_heads(hs, kv_group: int) -> list[int]:
    """The kv heads that q heads ``hs`` read (grouped-query attention: q head i reads kv head i // g)."""
    return sorted({h // kv_group for h in hs})


def _ring_plan(n, world, segment_lengths, dilation_rates, num_heads, heads, causal) -> DilatedRingPlan:
    """:func:`~ringbook.ring_dilated.dilated_ring_plan`, cached per call shape (it walks every segment).

    Arguments the cache cannot hold go straight to ``dilated_ring_plan``,
    which raises its usual error for them.
    """
    if isinstance(segment_lengths, (list, tuple)) and isinstance(dilation_rates, (list, tuple)):
        try:
            return _cached_ring_plan(n, world, tuple(segment_lengths), tuple(dilation_rates), num_heads, heads,
                                     causal)
        except TypeError:  # an unhashable option: not cached
            pass
    return dilated_ring_plan(n, world, segment_lengths, dilation_rates, num_heads=num_heads, heads=heads,
                             causal=causal)


@functools.lru_cache(maxsize=64)
def _cached_ring_plan(n, world, segment_lengths, dilation_rates, num_heads, heads, causal) -> DilatedRingPlan:
    return dilated_ring_plan(n, world, list(segment_lengths), list(dilation_rates), num_heads=num_heads,
                             heads=heads, causal=causal)


class DilatedMover(Mover):
    """The K/V window of one rank: its shard, plus the dilated rows its peers send (one batched exchange).

    The window (:func:`_window`) holds this rank's K/V at its place and, at
    the positions they came from, the dilated K/V rows of its segments'
    other pieces (:func:`routes`: only those rows, only from the spanned
    ranks, earlier ones only with ``causal``); rows never received are never
    read. Gradients accumulate into float32 windows; :meth:`gradients` sends
    the received rows' dK/dV back to their owners (the same pieces, the other
    way) and adds what comes back for the rows this rank sent. The backward
    builds the window again (the forward's exchange is repeated, as the
    dense ring runs its ring again), so only q, k, v, out and lse are kept.
    """

    step_reads_gradients = False  # the window's gradients are read only by gradients()

    def __init__(self, setup: _Setup, k: torch.Tensor, v: torch.Tensor, kv_group: int, backward: bool):
        self.setup, self.kv_group = setup, kv_group
        plan, rank = setup.plan, setup.ring.rank
        self.lo, hi = _window(plan, rank)
        self.base, self.c = rank * plan.shard_len, plan.shard_len
        self.send, self.recv = _cached_routes(plan, rank)  # read only: shared between calls
        b, _, hk, d = k.shape
        own = slice(self.base - self.lo, self.base - self.lo + self.c)
        self.k, self.v = (x.new_zeros(b, hi - self.lo, hk, d) for x in (k, v))
        self.k[:, own], self.v[:, own] = k, v
        flats = _deliver({p: self._pack((k, v), pieces, rank, self.base) for p, pieces in self.send.items()},
                         {p: self._numel(pieces, p, b, d) for p, pieces in self.recv.items()}, k, setup.ring,
                         FORWARD_TAG, "forward")
        for p, pieces in self.recv.items():
            self._unpack(flats.get(p), pieces, p, (self.k, self.v), at=self.lo, add=False)
        if backward:
            work = compute_dtype(k.dtype)
            self.dk, self.dv = (torch.zeros(x.shape, dtype=work, device=x.device) for x in (self.k, self.v))

    def _place(self, seg, sender, o, hs, at, device):
        """Rows and kv heads of ``sender``'s piece of ``seg`` at offset ``o``, in a tensor whose row 0 is token ``at``."""
        a, z = seg.piece(sender, self.setup.plan.shard_len)
        r = self.setup.plan.pairs[seg.pair][1]
        first = (o - (a - seg.start)) % r
        return slice(a - at + first, z - at, r), torch.tensor(_kv_heads(hs, self.kv_group), device=device)

    def _pack(self, tensors, pieces, sender, at, *, take: bool = False):
        """One flat buffer of the pieces' rows of ``tensors``, in ``pieces`` order (K then V per piece).

        ``take``: zero the rows once packed. Pieces of different pairs can
        hold the same rows (a row kept by two pairs arrives twice); a dK/dV
        window row must go home once, with everything it accumulated.
        """
        parts = []
        for seg, o, hs in pieces:
            rows, heads = self._place(seg, sender, o, hs, at, tensors[0].device)
            parts += [x[:, rows].index_select(2, heads).reshape(-1) for x in tensors]
            if take:
                for x in tensors:
                    x[:, rows].index_fill_(2, heads, 0)
        return torch.cat(parts) if parts else tensors[0].new_empty(0)

    def _numel(self, pieces, sender, b, d) -> int:
        plan = self.setup.plan
        return sum(2 * b * _piece_rows(plan, seg, sender, o) * len(_kv_heads(hs, self.kv_group)) * d
                   for seg, o, hs in pieces)

    def _unpack(self, flat, pieces, sender, tensors, *, at: int, add: bool):
        """Write (or add) a flat buffer from ``sender`` into ``tensors`` (row 0 = token ``at``) at its pieces' rows."""
        if flat is None:  # nothing travelled (no kept rows)
            return
        offset = 0
        for seg, o, hs in pieces:
            rows, heads = self._place(seg, sender, o, hs, at, flat.device)
            for x in tensors:
                view = x[:, rows]
                shape = (view.shape[0], view.shape[1], heads.numel(), view.shape[3])
                part = flat[offset:offset + math.prod(shape)].view(shape).to(x.dtype)
                offset += part.numel()
                (view.index_add_ if add else view.index_copy_)(2, heads, part)

    def forward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def backward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k, self.v, self.dk, self.dv

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        own = slice(self.base - self.lo, self.base - self.lo + self.c)
        dk, dv = self.dk[:, own].clone(), self.dv[:, own].clone()
        if self.setup.kv_grad:
            rank = self.setup.ring.rank
            back = {p: self._pack((self.dk, self.dv), pieces, p, self.lo, take=True) for p, pieces in self.recv.items()}
            b, _, _, d = dk.shape
            home = _deliver(back, {p: self._numel(pieces, rank, b, d) for p, pieces in self.send.items()}, dk,
                            self.setup.ring, BACKWARD_TAG, "backward")
            for p, pieces in self.send.items():
                self._unpack(home.get(p), pieces, rank, (dk, dv), at=self.base, add=True)
        return dk, dv


@functools.lru_cache(maxsize=256)
def _traffic(plan: DilatedRingPlan, rank: int, kv_group: int) -> tuple:
    """``(sent, received, grad_sent)`` of a rank's one exchange, in K vectors per batch row (from :func:`routes`)."""
    send, recv = _cached_routes(plan, rank)

    def vectors(pieces, sender):
        return sum(_piece_rows(plan, seg, sender, o) * len(_kv_heads(hs, kv_group)) for seg, o, hs in pieces)

    sent = sum(vectors(pieces, rank) for pieces in send.values())
    received = sum(vectors(pieces, peer) for peer, pieces in recv.items())
    return (sent,), (received,), (received,)  # the backward sends the received rows' dK/dV home


def _fused(q, k, v, setup: _Setup, backend: str):
    """The engine form: :func:`rank_dilated_plan` with a :class:`DilatedMover`."""
    plan = setup.plan
    bad = [r for _, r in plan.pairs if plan.shard_len % r]
    if bad:
        raise ValueError(f"ring_dilated_attention(backend={backend!r}) needs every dilation rate to divide the shard "
                         f"length {plan.shard_len} (so a rank's piece of a segment holds whole dilated rows), got "
                         f"dilation rates {bad}; use backend=None (the einops form takes any configuration)")
    kv_group = q.shape[2] // k.shape[2]
    blocks = rank_dilated_plan(plan, setup.ring.rank, kv_group, str(q.device), _traffic(plan, setup.ring.rank, kv_group))
    job = Job(settings=Settings(setup.scale, backend, who="ringbook.distributed.ring_dilated_attention",
                                twice="ringbook.ring_dilated_attention in one process"),
              start=lambda k_, v_, backward: (DilatedMover(setup, k_, v_, kv_group, backward), blocks))
    return run(q, k, v, job)
