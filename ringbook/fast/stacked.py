"""Ring attention made fast in one process: every rank of a step in one batched kernel call (notebook 02).

:func:`production_ring_attention` computes exactly what :func:`ringbook.ring_attention`
computes (or :func:`ringbook.ring_dilated_attention` when ``segment_lengths``
is given), with the same ring: ``w`` ranks, each holding one shard of q,
k and v, the key/value shards travelling r → r+1 for ``w`` steps. What
changes is how one process plays the ranks:

* **Ranks stacked in the batch.** Shard r of every tensor is batch slice
  ``r·b … (r+1)·b`` of a ``(w b) c h d`` tensor. At step t every rank does
  the same kind of block (contiguous non-causal: all of them), so one kernel
  call does them all. With ``causal`` the ranks split into at most two
  groups of equal block shapes (zigzag: ranks whose shard came from an
  earlier rank attend all their queries to its first half; the others attend
  their second half of queries to all of it) plus the diagonal step, one
  causal call. :func:`~ringbook.fast.plans.production_plan` lists those calls,
  lowered from :func:`ringbook.schedule.ring_schedule`, the one schedule.
* **The "send" is a view.** On one device the shards do not need to move:
  rank r holds shard ``(r − t) mod w`` at step t, a run of stacked rows
  that wraps past the last shard at most once. Causal plans never wrap
  (their launches start at rank t or end before it); a non-causal step
  does, and reads either the window ``kv2[(w−t)·b : (2w−t)·b]`` of the
  stacked K/V written twice in a row (one launch; used while that extra
  copy takes at most ``Tuning.doubled_kv_fraction`` of the free memory) or
  the single copy in two launches. A real ring moves the bytes
  (:mod:`ringbook.distributed`); this is the same schedule and arithmetic
  without the network, and it does not pretend otherwise. In the engine's
  terms (:mod:`ringbook.fast.engine`) the launches become a
  :class:`~ringbook.fast.engine.Plan` of stacked block calls and the mover
  is a :class:`~ringbook.fast.engine.StackedMover`.
* **Fast kernels, fused merge.** Blocks go to PyTorch's cuDNN/flash/efficient
  SDPA kernels (:func:`ringbook.fast.kernels.block_attention`); each result is
  folded into float32 accumulators by :func:`ringbook.fast.merge.merge_boxes_into_`
  (up to ``Tuning.merge_group`` block results per pass, whatever rows each
  covers, so the float32 accumulator is read and written once per group,
  not per block); the backward's gradient sums run on a second CUDA stream
  under the next block's kernel. The backward runs the ring again with a fused backward op fed the global
  out and lse of the rows (as ring-flash-attention and PyTorch's context
  parallel do): cuDNN's where it agrees with the einops path, else flash's.
  Only q, k, v, out and lse are kept for it (in the engine's layout when
  entering it is a gather, as zigzag's is, so the backward gathers nothing again).

Grouped-query attention: k/v may have fewer heads than q (dividing them);
K/V travel unexpanded and are expanded only at a kernel that needs it.
The striped layout is refused: its causal blocks interleave positions, which
the kernels' top-left causal mask cannot express (use zigzag, which balances
causal work as well, or :func:`ringbook.ring_attention` to study striped).
No ``n × n`` tensor is ever formed: the einops fallback visits keys
``KEY_CHUNK`` at a time. Shapes: q ``b n h d``, k/v ``b n h_kv d``, lse ``b h n``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch
from einops import rearrange

from .._utils import available_bytes, check_bool, check_qkv, compute_dtype, resolve_scale
from ..masks import MaskSpec, check_document_ids, check_window, mask_spec
from ..schedule import DOC_HEADTAIL, check_layout
from .dilated import production_dilated_attention
from .engine import Job, Mover, Part, Settings, StackedMover, check_graph, run
from .kernels import check_backend
from .plans import PRODUCTION_LAYOUTS, _striped_message, part_plan, positions_of, production_plan, stacked_plan, wraps
from .strategies import check_strategy, run_strategy
from .tuning import Tuning, check_tuning

__all__ = ["GatherMover", "production_plan", "production_ring_attention"]


@functools.lru_cache(maxsize=64)
def _layout_order(n: int, world: int, layout: str, device: str, mask: MaskSpec | None = None) -> torch.Tensor | None:
    """The stacked token order on ``device`` (None when contiguous); cached per call shape."""
    if layout == "contiguous":
        return None
    return _positions_on(n, world, layout, device, mask).reshape(-1)


@dataclasses.dataclass(frozen=True)
class _Stacking:
    """How the caller's ``b n …`` tensors enter and leave the engine's ``(w b) c …`` layout."""

    world: int
    order: torch.Tensor | None  # token order of the stacked shards (None: contiguous, a view)

    def enter(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``b (w c) h d`` → ``(w b) c h d`` (lse: ``b h (w c)`` → ``(w b) h c``): a view, or one gather."""
        if self.order is not None:
            x = x.index_select(dim, self.order)
        if dim == 1:
            return rearrange(x, "b (w c) h d -> (w b) c h d", w=self.world)
        return rearrange(x, "b h (w c) -> (w b) h c", w=self.world)

    def leave(self, x: torch.Tensor, dim: int = 1, dtype=None) -> torch.Tensor:
        """Inverse of :meth:`enter`, converting to ``dtype`` on the way: a view and a conversion, or one scatter.

        (A whole call is at most a couple of GiB of working memory, see
        ``Tuning.parts_min_extra_bytes``; a longer one writes its parts straight
        into the output.)
        """
        pattern = "(w b) c h d -> b (w c) h d" if dim == 1 else "(w b) h c -> b h (w c)"
        x = rearrange(x, pattern, w=self.world)
        dtype = dtype or x.dtype
        if self.order is None:
            return x.to(dtype)
        return torch.empty(x.shape, dtype=dtype, device=x.device).index_copy_(dim, self.order, x.to(dtype))


def _start(n, world, batch, layout, causal, result_bytes, tuning: Tuning, k_st, v_st, backward: bool, *,
           mask: MaskSpec | None = None):
    """The mover and plan of one phase: doubled K/V only where a launch wraps and the copies fit in memory.

    The forward folds up to ``tuning.merge_group`` block results per pass
    (any rows: a causal step's half-blocks too), the backward sums as many
    blocks' gradients per pass, while what is held (``result_bytes`` each at
    most per result, three per block's gradients) fits in
    ``tuning.doubled_kv_fraction`` of the free memory.
    """
    spare = tuning.doubled_kv_fraction * available_bytes(k_st.device) if world > 1 else 0.0  # read once per phase
    doubled = False
    if wraps(n, world, layout, causal, mask):  # some launch wraps
        extra = 2 * (k_st.nbytes + v_st.nbytes)
        if backward:  # doubled K/V also double the dK/dV accumulators (float32 for half precision)
            extra += torch.empty((), dtype=compute_dtype(k_st.dtype)).element_size() * (k_st.numel() + v_st.numel())
        doubled = extra <= spare
    group = 1
    if world > 1:  # forward: held (out, lse) results; backward: held (dq, dk, dv) of a block, about 3 results
        group = int(max(1, min(tuning.merge_group, 1 + spare // max((3 if backward else 1) * result_bytes, 1))))
    plan = stacked_plan(n, world, batch, k_st.shape[2], layout=layout, causal=causal, doubled=doubled, mask=mask,
                        device=str(k_st.device),
                        merge_group=1 if backward else group, grad_group=group if backward else 1)
    return StackedMover(k_st, v_st, backward=backward, doubled=doubled), plan


# --------------------------------------------------------------------------- a forward in parts (long sequences)

# A whole call holds, besides its inputs and output, the stacked (zigzag) copies of q, k and v and a float32
# accumulator of the whole output: about 2.25× cuDNN's peak at every length. Where that extra would pass
# max(tuning.parts_min_extra_bytes, tuning.parts_extra_fraction × (inputs + output)), the forward runs its query
# ranks in parts instead, each with its own small accumulator and the K/V shards it holds at each step gathered per
# step (at such lengths one gather per step costs well under 1% of the step's attention).


class GatherMover(Mover):
    """The K/V of a part's ranks, gathered at each step from the caller's tensors (forward only).

    At step t rank r holds shard ``(r − t) mod w``; the part's ranks
    ``[g0, g1)`` get their shards' token positions (``positions[s]``, the
    layout's) gathered in rank order, so the blocks address them with the
    same batch rows as their queries.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, ranks: tuple[int, int]):
        self.k, self.v, self.positions, self.ranks = k, v, positions, ranks

    def forward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.positions.shape[0]
        shards = [(r - t) % w for r in range(*self.ranks)]
        return tuple(_gather_ranks(x, self.positions, shards) for x in (self.k, self.v))

    def backward_kv(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError("GatherMover serves a forward in parts; the backward runs whole")


def _gather_ranks(x: torch.Tensor, positions: torch.Tensor, ranks: list[int], dim: int = 1) -> torch.Tensor:
    """The rows of ``ranks`` (their token positions) in the engine layout: ``(r b) c h d``, or ``(r b) h c`` (lse)."""
    rows = x.index_select(dim, positions[ranks].reshape(-1))
    if dim == 1:
        return rearrange(rows, "b (r c) h d -> (r b) c h d", r=len(ranks)).contiguous()
    return rearrange(rows, "b h (r c) -> (r b) h c", r=len(ranks)).contiguous()


def _part_ranks(world: int, whole_extra: int, part_extra_per_rank: int, budget: float) -> int:
    """Ranks per part: ``world`` (run whole) if the whole call's extra memory fits the budget, else the largest
    divisor of the ring whose parts fit (1 at least)."""
    if whole_extra <= budget:
        return world
    fitting = [r for r in range(1, world) if world % r == 0 and r * part_extra_per_rank <= budget]
    return max(fitting, default=1)


def _parts(n: int, world: int, batch: int, layout: str, causal: bool, result_bytes: int, tuning: Tuning, q, k, v, *,
           mask: MaskSpec | None = None):
    """None (run whole), or the parts of a long forward (``tuning.parts_*``, above)."""
    out_bytes = q.nbytes
    acc_bytes = 4 * q.numel() + 4 * q.numel() // q.shape[3]  # float32 out and lse
    copies = 0 if layout == "contiguous" else q.nbytes + k.nbytes + v.nbytes
    whole_extra = copies + acc_bytes + result_bytes
    budget = max(tuning.parts_min_extra_bytes,
                 tuning.parts_extra_fraction * (q.nbytes + k.nbytes + v.nbytes + out_bytes))
    # a part of one rank: its q, the K/V of a step (and the next one's), its accumulator and a held result
    per_rank = (q.nbytes + 2 * (k.nbytes + v.nbytes) + acc_bytes + result_bytes) // world
    size = _part_ranks(world, whole_extra, per_rank, budget)
    if size == world:
        return None
    positions = _positions_on(n, world, layout, str(q.device), mask)
    return _part_iter(n, world, batch, layout, causal, size, positions, tuning, q, k, v, mask=mask)


def _part_iter(n, world, batch, layout, causal, size, positions, tuning, q, k, v, *, mask=None):
    group = min(tuning.merge_group, 2 * world)
    for g0 in range(0, world, size):
        ranks = list(range(g0, g0 + size))
        plan = part_plan(n, world, batch, (g0, g0 + size), layout=layout, causal=causal, merge_group=group,
                         mask=mask, device=str(q.device))
        yield Part(_gather_ranks(q, positions, ranks), plan, GatherMover(k, v, positions, (g0, g0 + size)),
                   functools.partial(_put_ranks, positions[ranks].reshape(-1), len(ranks)))


def _put_ranks(index: torch.Tensor, count: int, out, lse, acc_out, acc_lse) -> None:
    """Write a part's accumulators into the caller's ``out`` (its dtype) and ``lse`` at the part's positions."""
    out.index_copy_(1, index, rearrange(acc_out, "(r b) c h d -> b (r c) h d", r=count).to(out.dtype))
    lse.index_copy_(2, index, rearrange(acc_lse, "(r b) h c -> b h (r c)", r=count).to(lse.dtype))


@functools.lru_cache(maxsize=64)
def _positions_on(n: int, world: int, layout: str, device: str, mask: MaskSpec | None = None) -> torch.Tensor:
    """:func:`~ringbook.fast.plans.positions_of` on ``device`` (cached per call shape)."""
    return positions_of(n, world, layout, mask).to(device)


def production_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ring_size: int = 1, causal: bool = False,
                              layout: str | None = None, segment_lengths: Sequence[int] | None = None,
                              dilation_rates: Sequence[int] | None = None, heads: str = "all",
                              scale: float | None = None, backend: str = "auto",
                              graph: bool | str = "auto", tuning: Tuning | None = None,
                              document_ids: torch.Tensor | None = None, window: int | None = None,
                              strategy: str = "ring") -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention with fused kernels, all ranks of a step in one call. Returns ``(out, lse)``.

    Args:
        q: ``b n h d``; k, v: ``b n h_kv d`` with ``h_kv`` dividing ``h``
            (grouped-query attention when smaller).
        ring_size: ranks ``w``; must divide ``n`` (``2w`` must, for zigzag).
        causal: key j is seen by query i only if j ≤ i (original positions).
        layout: ``"zigzag"`` (default when causal) or ``"contiguous"``
            (default otherwise); ``"doc_headtail"`` with ``document_ids``
            (every document dealt head and tail, PyTorch's per-document
            head-tail balancer: each rank's whole shard against each held one
            is one masked block, its documents' pieces one variable-length
            launch per band); ``"striped"`` is refused (module docstring).
        segment_lengths, dilation_rates, heads: given together, dilated
            attention (equation (D)) on the ring engine, one gathered block
            per (pair, head group) (:mod:`ringbook.fast.dilated`; contiguous
            shards, the function :func:`ringbook.ring_dilated_attention`
            computes).
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        backend: block kernel, ``"auto"`` or one of
            :data:`ringbook.fast.kernels.BACKENDS` (``"einops"``: the reference
            path everywhere).
        graph: ``"auto"`` (default): a forward-only CUDA call of a shape
            seen before, with q of at most 64 MiB, is replayed from a CUDA
            graph (one launch for the whole ring; checked against the eager
            call when captured, eager if capture fails); ``True``: at any
            size; ``False``: never (:func:`ringbook.fast.engine.run`).
        tuning: the measured knobs (merge groups, overlap, the memory
            budgets; :class:`ringbook.fast.tuning.Tuning`), None for the
            defaults. They change how it runs, never what it computes
            (beyond rounding).
        document_ids, window: packed documents (``b n`` non-decreasing ids)
            and a sliding window, as :func:`ringbook.naive_attention` takes
            them (:mod:`ringbook.masks`). Blocks no query sees are never
            computed and steps nobody needs are dropped; full blocks keep the
            fused kernels; a block a boundary cuts runs on the einops path
            for now (a fused masked kernel is chosen by measurement on the
            GPU: ``varlen_attn`` or ``flex_attention``, not yet measured).
        strategy: ``"ring"`` (default), ``"allgather"`` or ``"ulysses"``: the
            other strategies with every rank in one process
            (:mod:`ringbook.fast.strategies`: their engine cost without a
            network; dense attention only, Ulysses needs ``ring_size`` to
            divide the heads).

    Returns:
        out ``b n h d`` (input dtype) and lse ``b h n`` (float32 for
        float16/bfloat16), equal to :func:`ringbook.ring_attention` /
        :func:`ringbook.naive_attention` (on K/V expanded to q's heads).
        Accumulation in float32 for low precision.

    Once differentiable: the backward is a custom autograd Function (the
    ring again, fused backward ops), and ``create_graph=True`` (double
    backward) raises a RuntimeError instead of giving NaN or wrong second
    derivatives; use :func:`ringbook.ring_attention` or
    :func:`ringbook.ring_dilated_attention` for those.
    """
    causal = check_bool(causal, "causal")
    check_backend(backend)
    graph = check_graph(graph)
    tuning = check_tuning(tuning)
    if strategy != "ring" and (segment_lengths is not None or dilation_rates is not None or document_ids is not None
                               or window is not None):
        raise ValueError(f"strategy={strategy!r} runs dense attention (causal or not); dilated patterns, documents "
                         "and windows run on strategy='ring' here (and on every strategy in ringbook.distributed)")
    if segment_lengths is not None or dilation_rates is not None:
        return _dilated(q, k, v, ring_size=ring_size, causal=causal, layout=layout, segment_lengths=segment_lengths,
                        dilation_rates=dilation_rates, heads=heads, scale=scale, backend=backend, graph=graph,
                        tuning=tuning)
    if heads != "all":
        raise ValueError(f"heads={heads!r} applies to dilated attention only (give segment_lengths and "
                         "dilation_rates); dense attention uses every head")
    check_qkv(q, k, v, allow_gqa=True)
    b, n, h, d = q.shape
    if k.shape[1] != n:
        raise ValueError(f"production_ring_attention needs q and k of the same sequence length (each rank holds one "
                         f"shard of both), got seq_q={n} and seq_k={k.shape[1]}; use naive_attention or "
                         "blockwise_attention for cross-attention")
    layout = layout if layout is not None else ("zigzag" if causal else "contiguous")
    if layout == DOC_HEADTAIL and (document_ids is None or strategy != "ring"):
        raise ValueError(f"layout={DOC_HEADTAIL!r} is dealt from the documents: pass document_ids= (strategy='ring')")
    if layout not in PRODUCTION_LAYOUTS + (DOC_HEADTAIL,):
        if layout == "striped":
            raise ValueError(_striped_message(layout))
        raise ValueError(f"layout must be one of {PRODUCTION_LAYOUTS} or {DOC_HEADTAIL!r} (with document_ids), got "
                         f"{layout!r}")
    window = check_window(window)
    ids = check_document_ids(document_ids, b, n)
    check_layout(n, ring_size, layout, ids)
    if ring_size == 1:
        layout = "contiguous"  # one rank holds every token in order whatever the layout: no permutation to pay
    check_strategy(strategy, heads=h, ring_size=ring_size)
    mask = None if ids is None and window is None else mask_spec(causal, ids, window)
    stacking = _Stacking(ring_size, _layout_order(n, ring_size, layout, str(q.device),
                                                  mask if layout == DOC_HEADTAIL else None))
    result_bytes = q.nbytes + 4 * q.numel() // d  # a held result: out (input dtype) and its float32 lse
    settings = Settings(resolve_scale(scale, d), backend, who="production_ring_attention", graph=graph, tuning=tuning)
    if strategy != "ring":
        return run_strategy(q, k, v, strategy=strategy, ring_size=ring_size, causal=causal, layout=layout,
                            order=stacking.order, settings=settings, tuning=tuning,
                            key=("production", strategy, n, ring_size, b, layout, causal, settings))
    job = Job(settings=settings, start=functools.partial(_start, n, ring_size, b, layout, causal, result_bytes, tuning,
                                                         mask=mask),
              enter=stacking.enter, leave=stacking.leave, enter_copies=stacking.order is not None,
              key=("production", n, ring_size, b, layout, causal, result_bytes, settings, mask),
              parts=functools.partial(_parts, n, ring_size, b, layout, causal, result_bytes, tuning, mask=mask))
    return run(q, k, v, job)


# --------------------------------------------------------------------------- dilated attention

def _dilated(q, k, v, *, ring_size, causal, layout, segment_lengths, dilation_rates, heads, scale, backend, graph,
             tuning):
    if layout not in (None, "contiguous"):
        raise ValueError(f"dilated ring attention shards contiguously (segments are contiguous); got layout={layout!r}")
    return production_dilated_attention(q, k, v, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
                                        ring_size=ring_size, causal=causal, heads=heads, scale=scale, backend=backend,
                                        graph=graph, tuning=tuning)
