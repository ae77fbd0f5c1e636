"""Equation (M) in place: folding block results ``(out, lse)`` into a ring's float32 accumulators.

:func:`~ringbook.online_softmax.merge_partials` is the readable, differentiable
merge; this module is the fast one the ring engine uses, without autograd:

* :func:`merge_into_torch_` — one block, with torch ops (one ``lerp_`` pass);
* :func:`merge_many_into_` — several blocks of the same rows. On CUDA a
  Triton kernel (:mod:`ringbook.fast.triton_merge`) folds up to four per
  pass, reading each block once and the float32 accumulator once; it is used
  only after it agrees with the torch merge on a small check
  (:data:`TRITON` records the outcome, ``kernels.STATUS`` says it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange

from .kernels import STATUS

TRITON: dict = {}  # device -> True or the reason the Triton merge is not used


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


def _triton_ready(device) -> bool:
    """Whether the Triton merge runs on ``device``: triton imports and agrees with the torch merge once."""
    if device not in TRITON:
        try:
            from .triton_merge import merge_many_into_triton_
        except Exception as exc:  # noqa: BLE001 - absent or broken triton: the torch merge is used
            TRITON[device] = f"triton not importable ({type(exc).__name__}: {exc})"[:200]
        else:
            TRITON[device] = _self_check_triton(merge_many_into_triton_, device)
        STATUS[f"merge {device}"] = "triton" if TRITON[device] is True else f"torch ({TRITON[device]})"
    return TRITON[device] is True


def _self_check_triton(fn, device):
    """True if the Triton merge (one block, several, and initialising) agrees with the torch merge, else why not."""
    gen = torch.Generator(device=device).manual_seed(0)
    acc = torch.randn(2, 40, 3, 64, generator=gen, device=device)
    lse = torch.randn(2, 3, 40, generator=gen, device=device)
    lse[0, 1, :5] = float("-inf")
    acc[0, :5, 1] = 0
    blocks = []
    for j in range(4):  # strided views (rows 10…50 of larger buffers), with some empty rows
        blk = torch.randn(2, 60, 3, 64, generator=gen, device=device).to(torch.bfloat16)[:, 10:50]
        lse_b = torch.randn(2, 3, 60, generator=gen, device=device)[:, :, 10:50]
        lse_b[0, 1, :3 + j] = float("-inf")
        blk[0, :3 + j, 1] = 0  # a kernel's output for a row that saw no key
        blocks.append((blk, lse_b))
    want_o, want_l = acc.clone(), lse.clone()
    for o, l in blocks:
        merge_into_torch_(want_o, want_l, o, l)
    want_init_o, want_init_l = blocks[0][0].float(), blocks[0][1].clone()
    for o, l in blocks[1:]:
        merge_into_torch_(want_init_o, want_init_l, o, l)
    init_o, init_l = torch.empty_like(acc), torch.empty_like(lse)
    try:
        fn(acc, lse, blocks[:1])
        fn(acc, lse, blocks[1:])
        fn(init_o, init_l, blocks, initialise=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001
        return f"triton merge failed: {type(exc).__name__}: {str(exc)[:150]}"
    for got_o, got_l, ref_o, ref_l in ((acc, lse, want_o, want_l), (init_o, init_l, want_init_o, want_init_l)):
        if not (torch.allclose(got_o, ref_o, atol=1e-5, rtol=1e-5)
                and torch.equal(torch.isneginf(got_l), torch.isneginf(ref_l))
                and torch.allclose(got_l, ref_l, atol=1e-5, rtol=1e-5)):
            return "triton merge disagrees with the torch merge"
    return True


def merge_many_into_(acc_out: torch.Tensor, acc_lse: torch.Tensor, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                     initialise: bool = False) -> None:
    """Fold several blocks ``[(out, lse), …]`` of the same rows into the accumulators, equation (M) repeated.

    On CUDA with the Triton merge, up to ``MAX_BLOCKS`` (4) blocks per pass:
    each block output is read once and the float32 accumulator is read and
    written once per pass, instead of once per block. ``initialise``: the
    accumulators hold nothing yet, the blocks set them (no read). Elsewhere
    the torch merge, block by block. The result does not depend on the
    grouping (the merge is associative; up to rounding).
    """
    if not blocks:
        return
    if acc_out.is_cuda and acc_out.dtype == torch.float32 and acc_out.stride(-1) == 1 \
            and all(o.stride() == blocks[0][0].stride() and l.stride() == blocks[0][1].stride() for o, l in blocks) \
            and blocks[0][0].stride(-1) == 1 and _triton_ready(acc_out.device):
        from .triton_merge import MAX_BLOCKS, merge_many_into_triton_
        for i in range(0, len(blocks), MAX_BLOCKS):
            merge_many_into_triton_(acc_out, acc_lse, blocks[i:i + MAX_BLOCKS], initialise=initialise and i == 0)
        return
    if initialise:
        acc_out.copy_(blocks[0][0])
        acc_lse.copy_(blocks[0][1])
        blocks = blocks[1:]
    for out_blk, lse_blk in blocks:
        merge_into_torch_(acc_out, acc_lse, out_blk, lse_blk)
