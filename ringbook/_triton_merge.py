"""The fused merge (equation (M)) as a Triton kernel; imported only on CUDA by :mod:`ringbook.kernels`.

One program handles ``BLOCK_R`` rows ``(b, i, h)`` of the accumulator: it
reads the two lse values of each row, forms the weights
``w_a = e^{lse_a − lse}``, ``w_b = e^{lse_b − lse}`` with
``lse = log(e^{lse_a} + e^{lse_b})`` (rows empty on both sides stay
(0, -inf)), then reads the row of the block output once and rewrites the
float32 accumulator row once. Importing this module needs triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(acc_ptr, acc_lse_ptr, blk_ptr, blk_lse_ptr, n_rows, N, H,
                  sa_b, sa_n, sa_h, sl_b, sl_h, sl_n, so_b, so_n, so_h, sk_b, sk_h, sk_n,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < n_rows
    hh = rows % H
    ii = (rows // H) % N
    bb = rows // (H * N)
    la = tl.load(acc_lse_ptr + bb * sl_b + hh * sl_h + ii * sl_n, mask=rmask, other=float("-inf"))
    lb = tl.load(blk_lse_ptr + bb * sk_b + hh * sk_h + ii * sk_n, mask=rmask, other=float("-inf")).to(tl.float32)
    m = tl.maximum(la, lb)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    ea = tl.exp(la - m_safe)
    eb = tl.exp(lb - m_safe)
    s = ea + eb
    s_safe = tl.where(s > 0, s, 1.0)
    lse = tl.where(s > 0, m_safe + tl.log(s_safe), float("-inf"))
    wa = ea / s_safe
    wb = eb / s_safe
    cols = tl.arange(0, BLOCK_D)
    mask2 = rmask[:, None] & (cols < D)[None, :]
    a_off = (bb * sa_b + ii * sa_n + hh * sa_h)[:, None] + cols[None, :]
    o_off = (bb * so_b + ii * so_n + hh * so_h)[:, None] + cols[None, :]
    acc = tl.load(acc_ptr + a_off, mask=mask2, other=0.0)
    blk = tl.load(blk_ptr + o_off, mask=mask2, other=0.0).to(tl.float32)
    tl.store(acc_ptr + a_off, acc * wa[:, None] + blk * wb[:, None], mask=mask2)
    tl.store(acc_lse_ptr + bb * sl_b + hh * sl_h + ii * sl_n, lse, mask=rmask)


def merge_into_triton_(acc_out, acc_lse, out_blk, lse_blk) -> None:
    """In place: ``(acc_out, acc_lse) ← merge((acc_out, acc_lse), (out_blk, lse_blk))``; float32 accumulators."""
    b, n, h, d = acc_out.shape
    if tuple(out_blk.shape) != (b, n, h, d) or tuple(acc_lse.shape) != (b, h, n) or tuple(lse_blk.shape) != (b, h, n):
        raise ValueError(f"merge_into_: shapes do not fit: acc {tuple(acc_out.shape)}, lse {tuple(acc_lse.shape)}, "
                         f"block {tuple(out_blk.shape)}, block lse {tuple(lse_blk.shape)}")
    if acc_out.dtype != torch.float32 or acc_lse.dtype != torch.float32 or acc_out.stride(-1) != 1 \
            or out_blk.stride(-1) != 1:
        raise ValueError("merge_into_triton_ needs float32 accumulators and unit stride along head_dim")
    n_rows = b * n * h
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(64, 8192 // block_d))
    grid = (triton.cdiv(n_rows, block_r),)
    _merge_kernel[grid](acc_out, acc_lse, out_blk, lse_blk, n_rows, n, h,
                        acc_out.stride(0), acc_out.stride(1), acc_out.stride(2),
                        acc_lse.stride(0), acc_lse.stride(1), acc_lse.stride(2),
                        out_blk.stride(0), out_blk.stride(1), out_blk.stride(2),
                        lse_blk.stride(0), lse_blk.stride(1), lse_blk.stride(2),
                        D=d, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=4)
