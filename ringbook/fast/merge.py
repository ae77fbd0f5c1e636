"""Equation (M) in place: folding block results ``(out, lse)`` into a ring's float32 accumulators.

:func:`~ringbook.online_softmax.merge_partials` is the readable, differentiable
merge; this module is the fast one the ring engine uses, without autograd:

* :func:`merge_into_torch_` — one block, with torch ops (one ``lerp_`` pass);
* :func:`merge_boxes_into_` — several blocks, each over its own box of the
  accumulator's rows (a causal step's half-blocks, several steps at once).
  On CUDA a Triton kernel (:mod:`ringbook.fast.triton_merge`) folds up to
  eight per pass, reading each block once and the float32 accumulator once;
  it is used only after it agrees with the torch merge on a small check
  (:data:`ringbook.fast.state.TRITON` records the outcome, ``state.STATUS`` says it);
* :func:`merge_many_into_` — several blocks of the same rows (every box the
  whole accumulator).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange

from .state import STATUS, TRITON
from .tuning import DEFAULT, Tuning


def merge_into_torch_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out_blk: torch.Tensor,
                      lse_blk: torch.Tensor) -> None:
    """Equation (M) in place with torch ops: ``(acc_out, acc_lse) ← merge(acc, blk)``.

    ``acc_out`` (``b n h d``) and ``acc_lse`` (``b h n``) are the float32 or
    float64 accumulators (views are fine); the block may be any float dtype.
    Since ``w_a + w_b = 1``, the merge is a linear interpolation,
    ``O ← O + w_b (O_blk − O)`` with ``w_b = e^{lse_blk − lse}``: one
    ``lerp_`` pass over the accumulator. Rows empty on both sides stay
    (0, -inf); merging an empty block changes nothing.
    """
    lse_blk = lse_blk.to(acc_lse.dtype)
    lse = torch.logaddexp(acc_lse, lse_blk)  # -inf for rows empty on both sides
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros((), dtype=lse.dtype, device=lse.device), lse)
    w_b = torch.exp(lse_blk - lse_safe)
    acc_out.lerp_(out_blk.to(acc_out.dtype), rearrange(w_b, "b h n -> b n h 1"))
    acc_lse.copy_(lse)


Box = tuple[int, int, int, int]  # batch rows [b0, b1) × sequence rows [n0, n1) of the accumulator


def _triton_ready(device) -> bool:
    """Whether the Triton merge runs on ``device``: triton imports and agrees with the torch merge once."""
    if device not in TRITON:
        try:
            from .triton_merge import add_boxes_into_triton_, merge_boxes_into_triton_
        except Exception as exc:  # noqa: BLE001 - absent or broken triton: the torch merge is used
            TRITON[device] = f"triton not importable ({type(exc).__name__}: {exc})"[:200]
        else:
            TRITON[device] = _self_check_triton(merge_boxes_into_triton_, device, add_boxes_into_triton_)
        STATUS[f"merge {device}"] = "triton" if TRITON[device] is True else f"torch ({TRITON[device]})"
    return TRITON[device] is True


def _self_check_triton(fn, device, add_fn=None):
    """True if the Triton merge (whole rows and boxes, several at once, initialising or not) agrees with the
    torch merge, and the Triton gradient sum (``add_fn``, when given) with torch's, else why not."""
    gen = torch.Generator(device=device).manual_seed(0)
    acc = torch.randn(3, 40, 3, 64, generator=gen, device=device)
    lse = torch.randn(3, 3, 40, generator=gen, device=device)
    lse[0, 1, :5] = float("-inf")
    acc[0, :5, 1] = 0
    boxes = [(0, 3, 0, 40), (0, 3, 0, 40), (1, 3, 0, 40), (0, 2, 20, 40), (0, 3, 10, 30), (2, 3, 0, 40),
             (0, 3, 0, 40), (0, 1, 0, 40), (1, 2, 5, 35)]
    items = []
    for j, (b0, b1, n0, n1) in enumerate(boxes):  # strided views (a window of a larger buffer), some rows empty
        m = n1 - n0
        blk = torch.randn(b1 - b0, m + 20, 3, 64, generator=gen, device=device).to(torch.bfloat16)[:, 10:10 + m]
        lse_b = torch.randn(b1 - b0, 3, m + 20, generator=gen, device=device)[:, :, 10:10 + m]
        lse_b[0, 1, :3 + j % 4] = float("-inf")
        blk[0, :3 + j % 4, 1] = 0  # a kernel's output for a row that saw no key
        items.append(((b0, b1, n0, n1), blk, lse_b))
    partial = [items[3], items[8]]  # a pass leaving rows uncovered (batch row 2, rows 0-19 of 0): they keep their values
    want_o, want_l = acc.clone(), lse.clone()
    _torch_boxes(want_o, want_l, items)
    _torch_boxes(want_o, want_l, partial)
    want_init_o, want_init_l = torch.empty_like(acc), torch.empty_like(lse)
    _torch_boxes(want_init_o, want_init_l, items[2:], initialise=True)  # some rows covered by no box
    init_o, init_l = torch.full_like(acc, float("nan")), torch.full_like(lse, float("nan"))
    try:
        fn(acc, lse, items[:1])
        fn(acc, lse, items[1:])
        fn(acc, lse, partial)
        fn(init_o, init_l, items[2:], initialise=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001
        return f"triton merge failed: {type(exc).__name__}: {str(exc)[:150]}"
    for got_o, got_l, ref_o, ref_l in ((acc, lse, want_o, want_l), (init_o, init_l, want_init_o, want_init_l)):
        if not (torch.allclose(got_o, ref_o, atol=1e-5, rtol=1e-5)
                and torch.equal(torch.isneginf(got_l), torch.isneginf(ref_l))
                and torch.allclose(got_l, ref_l, atol=1e-5, rtol=1e-5)):
            return "triton merge disagrees with the torch merge"
    if add_fn is not None:
        grads = [(box, o.transpose(1, 2).contiguous().transpose(1, 2) if j % 2 else o) for j, (box, o, _) in
                 enumerate(items)]  # half of them in the (b h n d) layout a backward op may return
        want = acc.clone()
        _torch_add_boxes(want, grads)
        try:
            add_fn(acc, grads[:3])
            add_fn(acc, grads[3:])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001
            return f"triton gradient sum failed: {type(exc).__name__}: {str(exc)[:150]}"
        if not torch.allclose(acc, want, atol=1e-5, rtol=1e-5):
            return "triton gradient sum disagrees with torch's"
    return True


def _torch_add_boxes(acc, items) -> None:
    for (b0, b1, n0, n1), g in items:
        acc[b0:b1, n0:n1].add_(g)


def add_boxes_into_(acc: torch.Tensor, items: Sequence[tuple[Box, torch.Tensor]], *, tuning: Tuning = DEFAULT) -> None:
    """``acc[b0:b1, n0:n1] += g`` for every ``((b0, b1, n0, n1), g)``: the backward's gradient sums.

    On CUDA with the Triton kernels, up to ``MAX_BLOCKS`` (8) per pass: each
    gradient is read once and the float32 accumulator read and written once
    per pass, instead of once per block (``tuning.triton``; launch shape
    ``tuning.add_launch``). Elsewhere torch's ``add_``.
    """
    if not items:
        return
    if tuning.triton and acc.is_cuda and acc.dtype == torch.float32 and acc.stride(-1) == 1 \
            and all(g.stride(-1) == 1 for _, g in items) and _triton_ready(acc.device):
        from .triton_merge import MAX_BLOCKS, add_boxes_into_triton_
        for i in range(0, len(items), MAX_BLOCKS):
            add_boxes_into_triton_(acc, items[i:i + MAX_BLOCKS], launch=tuning.add_launch)
        return
    _torch_add_boxes(acc, items)


def _torch_boxes(acc_out, acc_lse, items, *, initialise: bool = False) -> None:
    if initialise:
        acc_out.zero_()
        acc_lse.fill_(float("-inf"))
    for (b0, b1, n0, n1), out_blk, lse_blk in items:
        merge_into_torch_(acc_out[b0:b1, n0:n1], acc_lse[b0:b1, :, n0:n1], out_blk, lse_blk)


def merge_boxes_into_(acc_out: torch.Tensor, acc_lse: torch.Tensor,
                      items: Sequence[tuple[Box, torch.Tensor, torch.Tensor]], *, initialise: bool = False,
                      tuning: Tuning = DEFAULT) -> None:
    """Fold blocks ``[(box, out, lse), …]`` into the accumulators, equation (M) repeated.

    ``box = (b0, b1, n0, n1)``: the block's rows are the accumulator's batch
    rows ``[b0, b1)`` × sequence rows ``[n0, n1)`` (``out`` is
    ``(b1−b0, n1−n0, h, d)``, ``lse`` ``(b1−b0, h, n1−n0)``). On CUDA with the
    Triton merge, up to ``MAX_BLOCKS`` (8) blocks per pass over the
    accumulator: each block is read once and the float32 accumulator read and
    written once per pass. ``initialise``: the accumulators hold nothing yet
    (not read; rows no block covers become the empty partial 0 / -inf).
    Elsewhere (or with ``tuning.triton`` False) the torch merge, block by block. The result does not depend on
    the grouping (the merge is associative; up to rounding).
    """
    if not items:
        if initialise:
            _torch_boxes(acc_out, acc_lse, (), initialise=True)
        return
    if tuning.triton and acc_out.is_cuda and acc_out.dtype == torch.float32 and acc_out.stride(-1) == 1 \
            and all(o.stride(-1) == 1 for _, o, _ in items) and _triton_ready(acc_out.device):
        from .triton_merge import MAX_BLOCKS, merge_boxes_into_triton_
        for i in range(0, len(items), MAX_BLOCKS):
            merge_boxes_into_triton_(acc_out, acc_lse, items[i:i + MAX_BLOCKS], initialise=initialise and i == 0,
                                     launch=tuning.merge_launch)
        return
    _torch_boxes(acc_out, acc_lse, items, initialise=initialise)


def merge_many_into_(acc_out: torch.Tensor, acc_lse: torch.Tensor, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                     initialise: bool = False) -> None:
    """Fold several blocks ``[(out, lse), …]`` of the accumulator's own rows: :func:`merge_boxes_into_` with
    every box the whole accumulator."""
    b, n = acc_out.shape[:2]
    merge_boxes_into_(acc_out, acc_lse, [((0, b, 0, n), o, lse) for o, lse in blocks], initialise=initialise)
