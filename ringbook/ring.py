"""Ring attention in one process: ``w`` ranks played in turn (notebook 02).

Rank r holds the query, key and value shard that :func:`ringbook.schedule.layout_positions`
deals it. At each of the ``w`` steps every rank attends its queries to the
key/value shard it currently holds (:func:`~ringbook.online_softmax.attend_block`),
folds the result into its running ``(out, lse)`` with equation (M),
:func:`~ringbook.online_softmax.merge_partials` (derived in notebook 01), and
then every key/value shard moves one rank along the ring, r → r+1. After
``w`` steps each rank has seen every shard exactly once, so its summary is
exact attention over the whole sequence (Liu, Zaharia & Abbeel, 2023).

The math (attend, merge) and the communication (the rotation of ``held``)
are kept apart; *which* blocks are computed comes from
:func:`ringbook.schedule.ring_schedule`, so a block that causality masks
completely is never computed. Shapes: q/k/v ``b n h d``, lse ``b h n``; a
shard is ``b c h d`` with ``c = n / w`` tokens, its positions a ``c`` LongTensor.
"""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange

from ._utils import check_bool, check_qkv, compute_dtype, resolve_scale
from .masks import check_document_ids, check_window
from .online_softmax import KEY_CHUNK, attend_block, merge_partials
from .schedule import best_layout, check_layout, layout_positions, ring_schedule


@dataclasses.dataclass(frozen=True)
class KVShard:
    """What travels round the ring: a key/value shard, its token positions and where it started."""

    origin: int  # the rank that held it at step 0 (the schedule's ``kv_rank``)
    k: torch.Tensor  # b c h d
    v: torch.Tensor  # b c h d
    pos: torch.Tensor  # c


def _merge_rows(out, lse, rows: tuple[int, int], out_blk, lse_blk):
    """Merge a block's partial into rows ``rows`` of a rank's accumulators, equation (M).

    Rebuilds with ``torch.cat`` instead of writing into slices: merge_partials
    saves its inputs for backward, and an in-place write would break autograd.
    """
    a, b = rows
    out_m, lse_m = merge_partials(out[:, a:b], lse[:, :, a:b], out_blk, lse_blk)
    out = torch.cat([out[:, :a], out_m, out[:, b:]], dim=1)
    lse = torch.cat([lse[:, :, :a], lse_m, lse[:, :, b:]], dim=2)
    return out, lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ring_size: int, causal: bool = False,
                   layout: str | None = None, scale: float | None = None, document_ids: torch.Tensor | None = None,
                   window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention computed round a ring of ``ring_size`` ranks in one process. Returns ``(out, lse)``.

    Args:
        q, k, v: ``b n h d`` tensors; q and k must have the same length ``n``.
        ring_size: number of ranks ``w``; it must divide ``n`` (``2w`` must,
            for zigzag, and every document length, for doc_headtail).
        causal: key j is seen by query i only if j ≤ i (positions in the
            original order, whatever the layout).
        layout: ``"contiguous"``, ``"zigzag"``, ``"striped"`` or, with
            ``document_ids``, ``"doc_headtail"`` (zigzag inside every document),
            how tokens are dealt to ranks (:mod:`ringbook.schedule`); ``"best"``:
            the one :func:`~ringbook.schedule.best_layout` picks for the mask.
            Default: ``"best"`` with ``document_ids`` (the tokens come back in
            order, so the deal is free to choose: packed documents unbalance
            zigzag), else ``"contiguous"``.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        document_ids, window: packed documents (``b n`` non-decreasing ids)
            and a sliding window (:mod:`ringbook.masks`); the schedule then
            skips every block no query sees, and a block a boundary cuts is
            attended with its mask.

    Returns:
        out ``b n h d`` in the input dtype and lse ``b h n`` (float32 for
        float16/bfloat16 input), in the original token order; equal to
        :func:`ringbook.naive_attention` with the same masks. Accumulation is in float32 for
        low-precision input, gradients included (they flow through plain
        torch autograd and are rounded to the input dtype once). Twice
        differentiable: ``create_graph=True`` gives exact second derivatives.
    """
    check_qkv(q, k, v)
    causal = check_bool(causal, "causal")
    b, n, h, d = q.shape
    if k.shape[1] != n:
        raise ValueError(
            f"ring attention needs q and k of the same sequence length (each rank holds one shard "
            f"of both), got seq_q={n} and seq_k={k.shape[1]}; use naive_attention or blockwise_attention "
            "for cross-attention"
        )
    ids = check_document_ids(document_ids, b, n)
    window = check_window(window)
    if layout is None:
        layout = "best" if ids is not None else "contiguous"
    if layout == "best":  # the tokens are put back in order, so any deal will do: the one whose busiest rank is least
        try:
            layout = best_layout(n, ring_size, causal=causal, document_ids=ids, window=window)
        except ValueError:  # no layout fits: let check_layout name what ring_size and n must satisfy
            layout = "contiguous"
    check_layout(n, ring_size, layout, ids)  # before any work: ring_size and layout must fit n (and the documents)
    scale = resolve_scale(scale, d)
    w = ring_size
    work = compute_dtype(q.dtype)
    schedule = ring_schedule(n, w, layout=layout, causal=causal, document_ids=ids, window=window)
    docs = None if ids is None else ids.to(q.device)

    # Deal the tokens to the ranks: shard r holds positions pos[r].
    pos = layout_positions(n, w, layout, ids).to(q.device)  # w c
    order = rearrange(pos, "w c -> (w c)")
    # One cast to the accumulator dtype before the deal, so that under autograd the
    # per-block gradients of a shard are summed in float32 and rounded once
    # (casting per block would sum them in bf16/fp16: error growing with w).
    q_sh, k_sh, v_sh = (rearrange(x.to(work)[:, order], "b (w c) h d -> w b c h d", w=w) for x in (q, k, v))
    held = [KVShard(r, k_sh[r], v_sh[r], pos[r]) for r in range(w)]

    c = n // w
    outs = [torch.zeros(b, c, h, d, dtype=work, device=q.device) for _ in range(w)]
    lses = [torch.full((b, h, c), float("-inf"), dtype=work, device=q.device) for _ in range(w)]
    for t, row in enumerate(schedule):
        for r, step in enumerate(row):  # every rank, one after the other
            kv = held[r]
            assert kv.origin == step.kv_rank, (
                f"step {t}: rank {r} holds shard {kv.origin}, schedule says {step.kv_rank}")
            for blk in step.blocks:  # skipped (fully masked) blocks are not in step.blocks
                (qa, qb), (ka, kb) = blk.q, blk.kv
                qp, kp = pos[r][qa:qb], kv.pos[ka:kb]
                masked = blk.kind == "masked"  # a document or window boundary cuts it: its whole mask
                out_blk, lse_blk = attend_block(
                    q_sh[r][:, qa:qb], kv.k[:, ka:kb], kv.v[:, ka:kb], scale=scale,
                    causal=blk.kind == "causal" or (masked and causal), q_pos=qp, k_pos=kp, chunk=KEY_CHUNK,
                    q_doc=docs[:, qp] if masked and docs is not None else None,
                    k_doc=docs[:, kp] if masked and docs is not None else None, window=window if masked else None,
                )
                outs[r], lses[r] = _merge_rows(outs[r], lses[r], blk.q, out_blk, lse_blk)
        # Communication: every rank sends its shard to rank r+1 (receives from r-1).
        held = [held[(r - 1) % w] for r in range(w)]

    # Undo the deal: gather every rank's rows back into the original token order.
    inverse = torch.argsort(order)
    out = rearrange(torch.stack(outs), "w b c h d -> b (w c) h d")[:, inverse]
    lse = rearrange(torch.stack(lses), "w b h c -> b h (w c)")[:, :, inverse]
    return out.to(q.dtype), lse.to(compute_dtype(q.dtype))
