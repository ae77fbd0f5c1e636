"""The fused merge (equation (M)) as a Triton kernel; imported only on CUDA by :mod:`ringbook.fast.merge`.

One program handles ``BLOCK_R`` rows ``(b, i, h)`` of the accumulator and
folds up to :data:`MAX_BLOCKS` block results into it at once: it reads the
lse of every part of each row, forms the weights ``w_j = e^{lse_j − lse}``
with ``lse = log Σ_j e^{lse_j}`` (rows empty everywhere stay (0, -inf)),
then reads each block's output row once and writes the float32
accumulator row once. Folding G blocks in one pass costs ``G`` block reads
and one accumulator read-modify-write instead of G of each; with
``INIT`` the accumulator is not read at all (its first blocks set it).
Importing this module needs triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

MAX_BLOCKS = 4  # block results one call folds in


@triton.jit
def _part(ptr, lse_ptr, lse_off, o_off, mask2, rmask, m_safe):
    """One block's weight numerator e^{lse − m} (per row) and its output rows (float32)."""
    lb = tl.load(lse_ptr + lse_off, mask=rmask, other=float("-inf")).to(tl.float32)
    return tl.exp(lb - m_safe), tl.load(ptr + o_off, mask=mask2, other=0.0).to(tl.float32)


@triton.jit
def _merge_kernel(acc_ptr, acc_lse_ptr, b0, l0, b1, l1, b2, l2, b3, l3, n_rows, N, H,
                  sa_b, sa_n, sa_h, sl_b, sl_h, sl_n, so_b, so_n, so_h, sk_b, sk_h, sk_n,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, G: tl.constexpr,
                  INIT: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < n_rows
    hh = rows % H
    ii = (rows // H) % N
    bb = rows // (H * N)
    acc_lse_off = bb * sl_b + hh * sl_h + ii * sl_n
    lse_off = bb * sk_b + hh * sk_h + ii * sk_n
    # the row maximum over the parts
    if INIT:
        la = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    else:
        la = tl.load(acc_lse_ptr + acc_lse_off, mask=rmask, other=float("-inf"))
    m = tl.maximum(la, tl.load(l0 + lse_off, mask=rmask, other=float("-inf")).to(tl.float32))
    if G > 1:
        m = tl.maximum(m, tl.load(l1 + lse_off, mask=rmask, other=float("-inf")).to(tl.float32))
    if G > 2:
        m = tl.maximum(m, tl.load(l2 + lse_off, mask=rmask, other=float("-inf")).to(tl.float32))
    if G > 3:
        m = tl.maximum(m, tl.load(l3 + lse_off, mask=rmask, other=float("-inf")).to(tl.float32))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    cols = tl.arange(0, BLOCK_D)
    mask2 = rmask[:, None] & (cols < D)[None, :]
    a_off = (bb * sa_b + ii * sa_n + hh * sa_h)[:, None] + cols[None, :]
    o_off = (bb * so_b + ii * so_n + hh * so_h)[:, None] + cols[None, :]
    # Σ_j e^{lse_j − m} O_j and Σ_j e^{lse_j − m}
    s, num = _part(b0, l0, lse_off, o_off, mask2, rmask, m_safe)
    num = num * s[:, None]
    if not INIT:
        ea = tl.exp(la - m_safe)
        num += tl.load(acc_ptr + a_off, mask=mask2, other=0.0) * ea[:, None]
        s += ea
    if G > 1:
        e, o = _part(b1, l1, lse_off, o_off, mask2, rmask, m_safe)
        num += o * e[:, None]
        s += e
    if G > 2:
        e, o = _part(b2, l2, lse_off, o_off, mask2, rmask, m_safe)
        num += o * e[:, None]
        s += e
    if G > 3:
        e, o = _part(b3, l3, lse_off, o_off, mask2, rmask, m_safe)
        num += o * e[:, None]
        s += e
    # s == 0 only for a row empty on every side; a NaN s (a NaN lse came in) stays NaN in out and lse
    s_safe = tl.where(s != 0, s, 1.0)
    lse = tl.where(s != 0, m_safe + tl.log(s_safe), float("-inf"))
    tl.store(acc_ptr + a_off, num / s_safe[:, None], mask=mask2)
    tl.store(acc_lse_ptr + acc_lse_off, lse, mask=rmask)


def merge_many_into_triton_(acc_out: torch.Tensor, acc_lse: torch.Tensor, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                            initialise: bool = False) -> None:
    """Fold up to :data:`MAX_BLOCKS` ``(out, lse)`` of the same rows into the accumulators in one pass.

    The blocks share one shape and one set of strides; ``initialise``: the
    accumulators hold nothing yet (they are written, not read).
    """
    b, n, h, d = acc_out.shape
    if not 1 <= len(blocks) <= MAX_BLOCKS:
        raise ValueError(f"merge_many_into_triton_ folds 1 to {MAX_BLOCKS} blocks, got {len(blocks)}")
    out_blk, lse_blk = blocks[0]
    for o, lse in blocks:
        if tuple(o.shape) != (b, n, h, d) or tuple(lse.shape) != (b, h, n) or o.stride() != out_blk.stride() \
                or lse.stride() != lse_blk.stride():
            raise ValueError(f"merge_into_: blocks do not fit: acc {tuple(acc_out.shape)}, block {tuple(o.shape)} "
                             f"{o.stride()}, block lse {tuple(lse.shape)} {lse.stride()} (all blocks need the "
                             f"accumulator's shape and the first block's strides)")
    if tuple(acc_lse.shape) != (b, h, n):
        raise ValueError(f"merge_into_: lse {tuple(acc_lse.shape)} does not fit the accumulator {tuple(acc_out.shape)}")
    if acc_out.dtype != torch.float32 or acc_lse.dtype != torch.float32 or acc_out.stride(-1) != 1 \
            or out_blk.stride(-1) != 1:
        raise ValueError("merge_into_triton_ needs float32 accumulators and unit stride along head_dim")
    n_rows = b * n * h
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(64, 8192 // block_d))
    grid = (triton.cdiv(n_rows, block_r),)
    padded = list(blocks) + [blocks[0]] * (MAX_BLOCKS - len(blocks))  # unused slots: never read (G)
    ptrs = [x for pair in padded for x in pair]
    _merge_kernel[grid](acc_out, acc_lse, *ptrs, n_rows, n, h,
                        acc_out.stride(0), acc_out.stride(1), acc_out.stride(2),
                        acc_lse.stride(0), acc_lse.stride(1), acc_lse.stride(2),
                        out_blk.stride(0), out_blk.stride(1), out_blk.stride(2),
                        lse_blk.stride(0), lse_blk.stride(1), lse_blk.stride(2),
                        D=d, BLOCK_D=block_d, BLOCK_R=block_r, G=len(blocks), INIT=initialise, num_warps=4)
