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

It runs on the ring engine (:mod:`ringbook.fast.engine`), as the dense
ring does: the plan is this rank's gathered blocks
(:func:`ringbook.fast.plans.rank_dilated_plan`: one step, at most a few
blocks per pair), and the mover (:class:`DilatedMover`) builds a K/V window
of the rank's shard and the dilated rows it receives, in one batched
exchange. Backward (the engine's one autograd Function): the exchange again,
each block's gradients from the global out and lse, then the reverse
exchange: each rank sends the dK/dV of the rows it received back to their
owners and adds what comes back for the rows it sent — exactly the bytes of
the forward, the other way. A rank whose outputs depend on nothing (no query
of its shard is kept by any pattern) still takes part and gets zero
gradients. ``retain_graph=True`` and repeated backward work (only q, k, v,
out and lse are kept). Once differentiable: ``create_graph=True`` (double
backward) is refused with a RuntimeError on every rank that asks for it,
before any message.

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
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .._utils import FLOAT_DTYPES, check_bool, check_qkv, compute_dtype, resolve_scale
from ..fast.engine import Mover, Settings
from ..fast.kernels import BACKENDS
from ..fast.plans import dilated_window as _window
from ..fast.plans import rank_dilated_plan
from ..fast.tuning import Tuning, check_tuning
from ..ring_dilated import DilatedRingPlan, _count, _offset_groups, dilated_ring_plan
from .comm import _peer_error, _Ring, _wait, agree
from .entry import open_group, run_on_group

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


def _check_agreement(q, k, v, causal, scale, options: dict, ring: _Ring) -> float:
    """The one agreement check (:func:`~ringbook.distributed.comm.agree`) with the dilated options. Returns the scale."""
    try:
        if options.get("backend") not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {options['backend']!r}")
        check_qkv(q, k, v, allow_gqa=True)
        check_bool(causal, "causal")
        if k.shape[1] != q.shape[1]:
            raise ValueError(f"each rank must hold q and k/v shards of the same length, got q {q.shape[1]} and "
                             f"k {k.shape[1]} tokens; shard all three with ringbook.distributed.shard")
        scale = resolve_scale(scale, q.shape[3])
        problem = None
    except (TypeError, ValueError) as exc:
        problem = exc
    kv_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    names = ("batch", "num_heads", "head_dim", "causal", "dtype", "k/v requires_grad", *options, "scale")
    values = [None] * len(names) if problem is not None else [
        q.shape[0], q.shape[2], q.shape[3], bool(causal), q.dtype, bool(kv_grad), *options.values(), scale]
    fields = list(zip(names, values))
    agree(ring, problem, q.shape[1] if problem is None else -1, fields,
          how_to_shard="cut the sequence with ringbook.distributed.shard(x, rank, world_size, 'contiguous'), which "
                       "needs a length divisible by world_size",
          choices={"dtype": FLOAT_DTYPES, "backend": BACKENDS},
          hints={"k/v requires_grad": " (call backward on every rank or on none: run every rank with the same "
                                      "torch.no_grad() state and requires_grad on k and v)"})
    return scale


@dataclasses.dataclass(frozen=True)
class _Setup:
    ring: _Ring
    plan: DilatedRingPlan
    scale: float
    kv_grad: bool  # the same on every rank (checked): whether backward runs the reverse exchange


def ring_dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment_lengths: Sequence[int],
                           dilation_rates: Sequence[int], causal: bool = False, heads: str = "all",
                           group: dist.ProcessGroup | None = None, scale: float | None = None,
                           timeout: float | None = None, backend: str = "einops",
                           tuning: Tuning | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention (equation (D)) over the shards held by the ranks of ``group``. Returns ``(out, lse)``.

    Args:
        q, k, v: this rank's ``b c h d`` shards, cut with
            ``ringbook.distributed.shard(x, rank, world_size, "contiguous")``;
            the sequence is ``n = world_size · c`` tokens.
        segment_lengths, dilation_rates, heads, causal, scale: as
            :func:`ringbook.dilated_attention` (each ``w`` must divide ``n``).
        group: the process group (default: the world).
        timeout: seconds to wait for any peer (default ``$RINGBOOK_P2P_TIMEOUT`` or 60).
        backend: the block kernel, as for :func:`ringbook.distributed.ring_attention`:
            ``"einops"`` (default; the reading path's kernels) or ``"auto"``
            (or a backend of :data:`ringbook.fast.kernels.BACKENDS`:
            PyTorch's fused kernels on CUDA, einops blocks elsewhere). Either
            runs on the ring engine: this rank's gathered blocks
            (:func:`ringbook.fast.plans.rank_dilated_plan`) and the exchange of
            :class:`DilatedMover`; k/v may have fewer heads than q
            (grouped-query attention); any configuration (a rate that does
            not divide the shard length gives strided blocks).
        tuning: :class:`ringbook.fast.tuning.Tuning` (None: the defaults).

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
    ring = open_group(group, timeout, "ring_dilated_attention")
    options = {"segment_lengths": segment_lengths, "dilation_rates": dilation_rates, "heads": heads,
               "backend": backend, "kv heads": k.shape[2] if k.dim() == 4 else None}
    scale = _check_agreement(q, k, v, causal, scale, options, ring)
    tuning = check_tuning(tuning)
    # Agreed options and lengths: this raises the one-process ValueError identically on every rank.
    plan = _ring_plan(q.shape[1] * ring.world, ring.world, segment_lengths, dilation_rates, q.shape[2], heads,
                      causal)
    on = torch.is_grad_enabled()
    setup = _Setup(ring, plan, scale, on and (k.requires_grad or v.requires_grad))
    kv_group = q.shape[2] // k.shape[2]
    blocks = rank_dilated_plan(plan, ring.rank, kv_group, str(q.device), _traffic(plan, ring.rank, kv_group))
    return run_on_group(q, k, v, plan=blocks,
                        mover=lambda k_, v_, backward: DilatedMover(setup, k_, v_, kv_group, backward),
                        settings=Settings(scale, backend, who="ringbook.distributed.ring_dilated_attention",
                                          twice="ringbook.ring_dilated_attention in one process", tuning=tuning))


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
