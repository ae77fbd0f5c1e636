"""Ring attention over a ``torch.distributed`` process group (notebook 02, one rank per process).

Each process holds one shard of q, k and v (``b c h d``, ``c = n / w`` tokens
dealt by a layout of :mod:`ringbook.schedule`) and never the whole sequence:
memory per rank is O(n / w). It runs on the ring engine
(:mod:`ringbook.fast.engine`): the plan is this rank's row of
:func:`~ringbook.schedule.ring_schedule` (:func:`rank_plan`), and the mover
(:class:`P2PMover`) sends the key/value shard round the ring, rank r → r+1,
by batched point-to-point messages (``dist.batch_isend_irecv``); while the
next shard is in flight the current one is attended (double buffering), and
each block's ``(out, lse)`` is folded into the rank's running summary with
equation (M). ``backend="einops"`` (the default of :func:`ring_attention`)
computes the blocks with :func:`~ringbook.online_softmax.attend_block`, the
reading path; ``backend="auto"`` with PyTorch's fused kernels.

The backward runs the ring again (per block, with the final lse): dq stays
home, dk/dv travel with their key/value shard and one more hop after the
last step brings them back to the rank that owns the shard.

Every wait on the network has a deadline (``timeout=``, default from the
environment variable ``RINGBOOK_P2P_TIMEOUT`` or 60 s): a peer that died,
raised or stalls makes the others raise a ``TimeoutError``/``RuntimeError``
naming the peer and the step instead of hanging. Inputs that do not fit
together across ranks (unequal shard lengths, a layout the shards cannot
have, a different batch, heads, head_dim, dtype, causal, layout, scale or
backend on some rank) are refused with a ``ValueError`` on every rank. Ranks
in messages are ranks in the process group passed as ``group``.

Importing this module starts nothing.
"""

from __future__ import annotations

import torch

from .._utils import FLOAT_DTYPES, check_bool, check_qkv, compute_dtype, resolve_scale
from ..fast.engine import Mover, Settings
from ..fast.kernels import BACKENDS
from ..fast.plans import rank_plan
from ..fast.tuning import Tuning, check_tuning
from ..masks import MaskSpec, check_document_ids, check_window, mask_spec
from ..schedule import DOC_HEADTAIL, LAYOUTS, check_layout
from .comm import _exchange, _Ring, _wait, agree
from .entry import open_group, run_on_group


def _local_problem(q, k, v, causal, layout, scale, backend="einops", layouts: tuple[str, ...] = LAYOUTS):
    """``(problem, scale)``: the first thing wrong with this rank's own input (or None) and the resolved scale."""
    try:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_qkv(q, k, v, allow_gqa=True)
        check_bool(causal, "causal")
        if layout not in layouts:
            also = f" ({DOC_HEADTAIL!r} with document_ids)" if DOC_HEADTAIL not in layouts else ""
            raise ValueError(f"layout must be one of {layouts}{also}, got {layout!r}")
        if k.shape[1] != q.shape[1]:
            raise ValueError(
                f"each rank must hold q and k/v shards of the same length, got q {q.shape[1]} and "
                f"k {k.shape[1]} tokens; shard all three with ringbook.distributed.shard"
            )
        scale = resolve_scale(scale, q.shape[3])
    except (TypeError, ValueError) as exc:
        return exc, None
    return None, scale


def local_mask(q: torch.Tensor, world: int, causal: bool, document_ids: torch.Tensor | None,
               window: int | None) -> tuple[MaskSpec | None, Exception | None]:
    """``(mask, problem)``: this rank's documents and window as a :class:`~ringbook.masks.MaskSpec` (None: neither),
    or the error they raise (refused on every rank by the agreement check). ``document_ids`` describe the whole
    sequence of ``q.shape[1]·world`` tokens, the same on every rank."""
    try:
        window = check_window(window)
        if document_ids is None and window is None:
            return None, None
        b = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else 1
        n = q.shape[1] * world if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
        return mask_spec(bool(causal), check_document_ids(document_ids, b, n), window), None
    except (TypeError, ValueError) as exc:
        return None, exc


def _check_agreement(q, k, v, causal, layout, scale, ring: _Ring, backend="einops", extra: tuple = (),
                     problem: Exception | None = None, mask: MaskSpec | None = None) -> float:
    """The one agreement check (:func:`~ringbook.distributed.comm.agree`): inputs that do not fit together are
    refused on every rank. ``extra``: more ``(name, value)`` options a strategy needs the same on every rank.
    Returns the resolved scale (the same on every rank: its bits are compared)."""
    layouts = LAYOUTS + ((DOC_HEADTAIL,) if mask is not None and mask.starts is not None else ())
    own, scale = _local_problem(q, k, v, causal, layout, scale, backend, layouts)
    problem = problem or own
    names = ("batch", "heads", "head_dim", "layout", "causal", "dtype", "k/v heads", "scale", "backend")
    values = [None] * len(names) if problem is not None else [
        q.shape[0], q.shape[2], q.shape[3], layout, bool(causal), q.dtype, k.shape[2], scale, backend]
    fields = list(zip(names, values)) + [(name, None if problem is not None else value) for name, value in extra]
    agree(ring, problem, q.shape[1] if problem is None else -1, fields,
          how_to_shard="cut the sequence with ringbook.distributed.shard(x, rank, world_size, layout), which needs a "
                       "length divisible by world_size (2·world_size for zigzag)",
          choices={"layout": layouts, "dtype": FLOAT_DTYPES, "backend": BACKENDS})
    c = q.shape[1]  # the common shard length
    if layout == "zigzag" and c % 2:
        raise ValueError(
            f"layout='zigzag' gives each rank two chunks of equal length, so the local length must be "
            f"even, got {c}; shard with layout='zigzag' (sequence length divisible by "
            f"2·world_size = {2 * ring.world}) or pass the layout the shards were made with"
        )
    check_layout(c * ring.world, ring.world, layout, mask.ids() if layout == DOC_HEADTAIL else None)
    return scale


# --------------------------------------------------------------------------- the ring on the engine

class P2PMover(Mover):
    """K/V travel round the ring r → r+1 by batched P2P messages; dK/dV travel with them and then home.

    Made for a plan of ``steps`` steps (at most the ring's size: a window
    needs fewer). Forward: K and V are sent as they are at step 0 and received
    into two buffer pairs in turn, so the pair being attended is never the
    one being received into; the next shard is in flight while this one is
    attended. Backward: the shard travels again (K and V stacked in one
    message) and each step's gradients of the held shard travel with it,
    adding what the ranks before contributed; after the last step one more
    message brings them to the shard's owner (one hop on when the plan walks
    the whole ring, ``steps − 1`` hops back otherwise). Every wait has the
    ring's deadline.
    """

    def __init__(self, ring: _Ring, k: torch.Tensor, v: torch.Tensor, backward: bool, steps: int):
        if not 1 <= steps <= ring.world:
            raise ValueError(f"P2PMover: a plan of {steps} steps does not fit a ring of {ring.world} ranks")
        self.ring, self.backward, self.steps = ring, backward, steps
        if not backward:
            self.held = [k.contiguous(), v.contiguous()]
            self.buffers = [[torch.empty_like(x) for x in self.held] for _ in range(2)] if steps > 1 else []
        else:
            self.held = torch.stack([k, v]).contiguous()
            self.spare = torch.empty_like(self.held)
            self.work = compute_dtype(k.dtype)
            self.grad_works, self.grad_in, self.grad_out, self.grad_what = [], None, None, ""
        self.works, self.next, self.what = [], None, ""

    # forward
    def forward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        ring = self.ring
        self.what = ring.describe("forward", t, "the K/V shard")
        self.next = self.buffers[t % 2] if t < self.steps - 1 else None
        self.works = _exchange(self.held, self.next, ring, 0, self.what) if self.next is not None else []
        return self.held[0], self.held[1]

    def forward_done(self, t: int) -> None:
        if self.works:
            _wait(self.works, self.ring, self.what)
            self.held = self.next

    # backward
    def backward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ring = self.ring
        self.what = ring.describe("backward", t, "the K/V shard")
        self.works = _exchange([self.held], [self.spare], ring, 0, self.what) if t < self.steps - 1 else []
        self.grad = torch.zeros((2, *self.held.shape[1:]), dtype=self.work, device=self.held.device)
        return self.held[0], self.held[1], self.grad[0], self.grad[1]

    def backward_done(self, t: int) -> None:
        ring = self.ring
        if t > 0:  # add what the ranks before me accumulated for this shard
            _wait(self.grad_works, ring, self.grad_what)
            self.grad += self.grad_in
        # send the shard's gradients on with it; after the last step, to the shard's owner
        self.grad_out, self.grad_in = self.grad, torch.empty_like(self.grad)
        last = t == self.steps - 1
        hops = 1 if not last else -t % ring.world  # the held shard started on rank (rank − t)
        if hops:
            self.grad_what = ring.describe("backward", t, "dK/dV" if not last else "dK/dV (the way home)", hops=hops)
            self.grad_works = _exchange([self.grad_out], [self.grad_in], ring, 2, self.grad_what, hops=hops)
        else:  # the held shard is this rank's own: nothing travels
            self.grad_works, self.grad_in = [], self.grad_out
        if self.works:
            _wait(self.works, ring, self.what)
            self.held, self.spare = self.spare, self.held

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grad_works:
            _wait(self.grad_works, self.ring, self.grad_what)
        return self.grad_in[0], self.grad_in[1]


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   layout: str = "contiguous", group: torch.distributed.ProcessGroup | None = None,
                   scale: float | None = None, timeout: float | None = None, backend: str = "einops",
                   tuning: Tuning | None = None, document_ids: torch.Tensor | None = None,
                   window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the shards held by the ranks of ``group``. Returns this rank's ``(out, lse)``.

    Args:
        q, k, v: this rank's ``b c h d`` shards, as :func:`shard` cuts them
            with the same ``layout``; the sequence is ``n = w · c`` tokens.
        causal: key j is seen by query i only if j ≤ i (positions in the
            original token order, whatever the layout).
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"`` (:mod:`ringbook.schedule`), or
            ``"doc_headtail"`` with ``document_ids`` (shards from
            ``shard(x, rank, world_size, "doc_headtail", document_ids=ids)``).
        group: the process group (default: the world).
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        timeout: seconds to wait for any peer (default ``$RINGBOOK_P2P_TIMEOUT`` or 60).
        backend: the block kernel. ``"einops"`` (default): :func:`~ringbook.online_softmax.attend_block`,
            the reading path. ``"auto"`` (or a backend of :data:`ringbook.fast.kernels.BACKENDS`):
            the fused kernels of :mod:`ringbook.fast.kernels` — PyTorch's cuDNN/flash/efficient SDPA
            on CUDA, the flash backward op, the fused merge — and grouped-query attention
            (k/v with fewer heads, dividing q's; they travel unexpanded). Causal blocks the
            kernels' top-left mask cannot express (striped, from a later rank) use the einops
            path with positions. k/v may have fewer heads than q with either backend.
        tuning: :class:`ringbook.fast.tuning.Tuning` (None: the defaults).
        document_ids, window: packed documents (``b n`` ids of the *whole*
            sequence, the same on every rank, as ``cu_seqlens`` is in
            ring-flash-attention) and a sliding window, as
            :func:`ringbook.naive_attention` takes them. Blocks no query sees
            are never computed, and the ring stops after the last step any
            rank needs: a window of W tokens over contiguous shards of c
            takes min(w − 1, ⌈(W − 1)/c⌉) hops, not w − 1 (dK/dV then go home
            directly); zigzag, whose shards reach both ends, needs them all.

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
        options that differ between ranks: causal, layout, scale, backend)
        or one rank's input is invalid (that rank raises its own error, the
        others name it);
        TimeoutError or RuntimeError naming the peer and step if a peer does
        not answer within ``timeout``.
    """
    return _ring_attention(q, k, v, causal=causal, layout=layout, group=group, scale=scale, timeout=timeout,
                           backend=backend, op="ring_attention", tuning=tuning, document_ids=document_ids,
                           window=window)


def _ring_attention(q, k, v, *, causal, layout, group, scale, timeout, backend, op, tuning, document_ids=None,
                    window=None):
    tuning = check_tuning(tuning)
    ring = open_group(group, timeout, op)
    mask, problem = local_mask(q, ring.world, causal, document_ids, window)
    scale = _check_agreement(q, k, v, causal, layout, scale, ring, backend, extra=(("document_ids and window", mask),),
                             problem=problem, mask=mask)
    causal = bool(causal)  # checked: True/False or numpy.bool_
    # Results are fresh kernel outputs, so a rank may hold a few across steps and fold them in one pass (the
    # one-process ring's box merge); a step's block gradients are summed together before they travel on.
    plan = rank_plan(q.shape[1] * ring.world, ring.world, ring.rank, layout, causal, kv_heads=k.shape[2],
                     device=str(q.device), merge_group=tuning.rank_merge_group, grad_group=tuning.rank_grad_group,
                     mask=mask)
    return run_on_group(q, k, v, plan=plan, mover=lambda k_, v_, backward: P2PMover(ring, k_, v_, backward,
                                                                                      len(plan.steps)),
                        settings=Settings(scale, backend, who=f"ringbook.distributed.{op}", tuning=tuning))


def production_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                              layout: str | None = None, group: torch.distributed.ProcessGroup | None = None,
                              scale: float | None = None, timeout: float | None = None, backend: str = "auto",
                              tuning: Tuning | None = None, document_ids: torch.Tensor | None = None,
                              window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ring_attention` with the fused kernels (``backend="auto"``) and the production default layout.

    The multi-process form of :func:`ringbook.production_ring_attention`:
    ``layout`` defaults to ``"zigzag"`` when causal (balanced work), else
    ``"contiguous"``; k/v may have fewer heads than q (grouped-query
    attention). Shards as :func:`shard` cuts them with that layout. Errors
    name ``production_ring_attention``. Once differentiable, as
    :func:`ring_attention`.
    """
    layout = layout if layout is not None else ("zigzag" if causal else "contiguous")
    return _ring_attention(q, k, v, causal=causal, layout=layout, group=group, scale=scale, timeout=timeout,
                           backend=backend, op="production_ring_attention", tuning=tuning,
                           document_ids=document_ids, window=window)
