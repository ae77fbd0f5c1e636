"""The fused merge (equation (M)) as a Triton kernel; imported only on CUDA by :mod:`ringbook.fast.merge`.

One program handles ``BLOCK_R`` rows ``(b, h, i)`` of the accumulator and
folds up to :data:`MAX_BLOCKS` block results into it at once. Each block
covers a *box* of the accumulator's rows (batch rows ``[b0, b1)`` × sequence
rows ``[n0, n1)``, with its own strides): a ring step's blocks cover
different rows (a causal step's two half-blocks, say), and one pass can fold
several steps. For each row the program reads the lse of every block whose
box holds it, forms the weights ``w_j = e^{lse_j − lse}`` with
``lse = log Σ_j e^{lse_j}`` (rows empty everywhere stay (0, -inf)), then reads
each such block's output row once and writes the float32 accumulator row
once. Folding G blocks in one pass costs G block reads and one accumulator
read-modify-write instead of G of each; with ``INIT`` the accumulator is not
read at all (rows no block covers become the empty partial (0, -inf)); without it, rows no
block covers are neither read nor written, so a pass costs the rows its boxes cover.
Importing this module needs triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

MAX_BLOCKS = 8  # block results one call folds in

Box = tuple[int, int, int, int]  # batch rows [b0, b1) × sequence rows [n0, n1) of the accumulator
# Launch shapes of the two kernels, (elements per program along (rows × head_dim), warps), are Tuning.merge_launch
# and Tuning.add_launch: few registers per thread leave many programs resident and many loads in flight;
# tools/gpu_dense.py --sections tune measures the choices.
# The boxes change from step to step: Triton must not compile a variant per value class of them
_BOX_ARGS = [f"{name}{j}" for j in range(MAX_BLOCKS) for name in ("b0", "b1", "n0", "n1")]


@triton.jit
def _lse_j(l_ptr, sl_b, sl_h, sl_n, b0, b1, n0, n1, bb, ii, hh, rmask):
    """One block's lse for the program's rows (-inf outside its box), and which rows its box holds."""
    inside = rmask & (bb >= b0) & (bb < b1) & (ii >= n0) & (ii < n1)
    off = (bb - b0) * sl_b + hh * sl_h + (ii - n0) * sl_n
    return tl.load(l_ptr + off, mask=inside, other=float("-inf")).to(tl.float32), inside


@triton.jit
def _out_j(o_ptr, so_b, so_n, so_h, b0, n0, inside, bb, ii, hh, cols, dmask):
    """One block's output rows (float32; 0 outside its box)."""
    off = ((bb - b0) * so_b + (ii - n0) * so_n + hh * so_h)[:, None] + cols[None, :]
    return tl.load(o_ptr + off, mask=inside[:, None] & dmask[None, :], other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=_BOX_ARGS)
def _merge_kernel(acc_ptr, acc_lse_ptr, sa_b, sa_n, sa_h, sal_b, sal_h, sal_n, n_rows, N, H,
                  o0, l0, so_b0, so_n0, so_h0, sl_b0, sl_h0, sl_n0, b00, b10, n00, n10,
                  o1, l1, so_b1, so_n1, so_h1, sl_b1, sl_h1, sl_n1, b01, b11, n01, n11,
                  o2, l2, so_b2, so_n2, so_h2, sl_b2, sl_h2, sl_n2, b02, b12, n02, n12,
                  o3, l3, so_b3, so_n3, so_h3, sl_b3, sl_h3, sl_n3, b03, b13, n03, n13,
                  o4, l4, so_b4, so_n4, so_h4, sl_b4, sl_h4, sl_n4, b04, b14, n04, n14,
                  o5, l5, so_b5, so_n5, so_h5, sl_b5, sl_h5, sl_n5, b05, b15, n05, n15,
                  o6, l6, so_b6, so_n6, so_h6, sl_b6, sl_h6, sl_n6, b06, b16, n06, n16,
                  o7, l7, so_b7, so_n7, so_h7, sl_b7, sl_h7, sl_n7, b07, b17, n07, n17,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, G: tl.constexpr,
                  INIT: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < n_rows
    ii = rows % N  # rows run along the sequence, so the lse reads (b h n) are contiguous
    hh = (rows // N) % H
    bb = rows // (H * N)
    acc_lse_off = bb * sal_b + hh * sal_h + ii * sal_n
    # the row maximum over the accumulator and the blocks that hold the row
    la = tl.full((BLOCK_R,), float("-inf"), tl.float32)  # the accumulator's: read below where a block holds the row
    m = la
    la0, in0 = _lse_j(l0, sl_b0, sl_h0, sl_n0, b00, b10, n00, n10, bb, ii, hh, rmask)
    m = tl.maximum(m, la0)
    cov = in0
    if G > 1:
        la1, in1 = _lse_j(l1, sl_b1, sl_h1, sl_n1, b01, b11, n01, n11, bb, ii, hh, rmask)
    if G > 1:
        m = tl.maximum(m, la1)
        cov = cov | in1
    if G > 2:
        la2, in2 = _lse_j(l2, sl_b2, sl_h2, sl_n2, b02, b12, n02, n12, bb, ii, hh, rmask)
    if G > 2:
        m = tl.maximum(m, la2)
        cov = cov | in2
    if G > 3:
        la3, in3 = _lse_j(l3, sl_b3, sl_h3, sl_n3, b03, b13, n03, n13, bb, ii, hh, rmask)
    if G > 3:
        m = tl.maximum(m, la3)
        cov = cov | in3
    if G > 4:
        la4, in4 = _lse_j(l4, sl_b4, sl_h4, sl_n4, b04, b14, n04, n14, bb, ii, hh, rmask)
    if G > 4:
        m = tl.maximum(m, la4)
        cov = cov | in4
    if G > 5:
        la5, in5 = _lse_j(l5, sl_b5, sl_h5, sl_n5, b05, b15, n05, n15, bb, ii, hh, rmask)
    if G > 5:
        m = tl.maximum(m, la5)
        cov = cov | in5
    if G > 6:
        la6, in6 = _lse_j(l6, sl_b6, sl_h6, sl_n6, b06, b16, n06, n16, bb, ii, hh, rmask)
    if G > 6:
        m = tl.maximum(m, la6)
        cov = cov | in6
    if G > 7:
        la7, in7 = _lse_j(l7, sl_b7, sl_h7, sl_n7, b07, b17, n07, n17, bb, ii, hh, rmask)
    if G > 7:
        m = tl.maximum(m, la7)
        cov = cov | in7
    # Rows no block holds keep their values: without INIT they are neither read nor written (a pass costs the
    # rows its boxes cover, not the whole accumulator); with INIT they are written as the empty partial.
    if not INIT:
        la = tl.load(acc_lse_ptr + acc_lse_off, mask=cov, other=float("-inf"))
        m = tl.maximum(m, la)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    a_off = (bb * sa_b + ii * sa_n + hh * sa_h)[:, None] + cols[None, :]
    if INIT:
        put = rmask
    else:
        put = cov
    mask2 = put[:, None] & dmask[None, :]
    # Σ_j e^{lse_j − m} O_j and Σ_j e^{lse_j − m}
    num = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    if not INIT:
        ea = tl.exp(la - m_safe)
        num += tl.load(acc_ptr + a_off, mask=mask2, other=0.0) * ea[:, None]
        s += ea
    e = tl.exp(la0 - m_safe)
    num += _out_j(o0, so_b0, so_n0, so_h0, b00, n00, in0, bb, ii, hh, cols, dmask) * e[:, None]
    s += e
    if G > 1:
        e = tl.exp(la1 - m_safe)
    if G > 1:
        num += _out_j(o1, so_b1, so_n1, so_h1, b01, n01, in1, bb, ii, hh, cols, dmask) * e[:, None]
    if G > 1:
        s += e
    if G > 2:
        e = tl.exp(la2 - m_safe)
    if G > 2:
        num += _out_j(o2, so_b2, so_n2, so_h2, b02, n02, in2, bb, ii, hh, cols, dmask) * e[:, None]
    if G > 2:
        s += e
    if G > 3:
        e = tl.exp(la3 - m_safe)
    if G > 3:
        num += _out_j(o3, so_b3, so_n3, so_h3, b03, n03, in3, bb, ii, hh, cols, dmask) * e[:, None]
    if G > 3:
        s += e
    if G > 4:
        e = tl.exp(la4 - m_safe)
    if G > 4:
        num += _out_j(o4, so_b4, so_n4, so_h4, b04, n04, in4, bb, ii, hh, cols, dmask) * e[:, None]
    if G > 4:
        s += e
    if G > 5:
        e = tl.exp(la5 - m_safe)
    if G > 5:
        num += _out_j(o5, so_b5, so_n5, so_h5, b05, n05, in5, bb, ii, hh, cols, dmask) * e[:, None]
    if G > 5:
        s += e
    if G > 6:
        e = tl.exp(la6 - m_safe)
    if G > 6:
        num += _out_j(o6, so_b6, so_n6, so_h6, b06, n06, in6, bb, ii, hh, cols, dmask) * e[:, None]
    if G > 6:
        s += e
    if G > 7:
        e = tl.exp(la7 - m_safe)
    if G > 7:
        num += _out_j(o7, so_b7, so_n7, so_h7, b07, n07, in7, bb, ii, hh, cols, dmask) * e[:, None]
    if G > 7:
        s += e
    # s == 0 only for a row empty on every side; a NaN s (a NaN lse came in) stays NaN in out and lse
    s_safe = tl.where(s != 0, s, 1.0)
    lse = tl.where(s != 0, m_safe + tl.log(s_safe), float("-inf"))
    tl.store(acc_ptr + a_off, num / s_safe[:, None], mask=mask2)
    tl.store(acc_lse_ptr + acc_lse_off, lse, mask=put)


def merge_boxes_into_triton_(acc_out: torch.Tensor, acc_lse: torch.Tensor,
                             items: Sequence[tuple[Box, torch.Tensor, torch.Tensor]], *,
                             initialise: bool = False, launch: tuple[int, int] = (1024, 2)) -> None:
    """Fold up to :data:`MAX_BLOCKS` ``(box, out, lse)`` into the accumulators in one pass.

    ``out`` is ``(b1 − b0, n1 − n0, h, d)`` and ``lse`` ``(b1 − b0, h, n1 − n0)``
    (any strides, unit stride along head_dim); ``initialise``: the
    accumulators hold nothing yet (they are written, not read; rows no box
    covers become 0 / -inf). ``launch``: (elements per program, warps), :attr:`ringbook.fast.tuning.Tuning.merge_launch`.
    """
    b, n, h, d = acc_out.shape
    if not 1 <= len(items) <= MAX_BLOCKS:
        raise ValueError(f"merge_boxes_into_triton_ folds 1 to {MAX_BLOCKS} blocks, got {len(items)}")
    if tuple(acc_lse.shape) != (b, h, n):
        raise ValueError(f"merge_boxes_into_triton_: lse {tuple(acc_lse.shape)} does not fit the accumulator "
                         f"{tuple(acc_out.shape)}")
    if acc_out.dtype != torch.float32 or acc_lse.dtype != torch.float32 or acc_out.stride(-1) != 1:
        raise ValueError("merge_boxes_into_triton_ needs float32 accumulators with unit stride along head_dim")
    args = []
    for (b0, b1, n0, n1), o, lse in items:
        if not (0 <= b0 < b1 <= b and 0 <= n0 < n1 <= n) or tuple(o.shape) != (b1 - b0, n1 - n0, h, d) \
                or tuple(lse.shape) != (b1 - b0, h, n1 - n0) or o.stride(-1) != 1:
            raise ValueError(f"merge_boxes_into_triton_: block {tuple(o.shape)} / lse {tuple(lse.shape)} does not "
                             f"fit box {(b0, b1, n0, n1)} of the accumulator {tuple(acc_out.shape)} (unit stride "
                             "along head_dim needed)")
        args += [o, lse, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
                 b0, b1, n0, n1]
    args += args[:12] * (MAX_BLOCKS - len(items))  # unused slots: never read (G)
    n_rows = b * n * h
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(d)
    elements, warps = launch
    block_r = max(1, elements // block_d)
    grid = (triton.cdiv(n_rows, block_r),)
    _merge_kernel[grid](acc_out, acc_lse, acc_out.stride(0), acc_out.stride(1), acc_out.stride(2),
                        acc_lse.stride(0), acc_lse.stride(1), acc_lse.stride(2), n_rows, n, h, *args,
                        D=d, BLOCK_D=block_d, BLOCK_R=block_r, G=len(items), INIT=initialise, num_warps=warps)


# --------------------------------------------------------------------------- gradient sums (the backward)

@triton.jit
def _grad_j(g_ptr, sg_b, sg_n, sg_h, b0, b1, n0, n1, bb, ii, hh, cols, rmask, dmask):
    """One block gradient's rows (float32; 0 outside its box), and which rows its box holds."""
    inside = rmask & (bb >= b0) & (bb < b1) & (ii >= n0) & (ii < n1)
    off = ((bb - b0) * sg_b + (ii - n0) * sg_n + hh * sg_h)[:, None] + cols[None, :]
    return tl.load(g_ptr + off, mask=inside[:, None] & dmask[None, :], other=0.0).to(tl.float32), inside


@triton.jit(do_not_specialize=_BOX_ARGS)
def _add_kernel(acc_ptr, sa_b, sa_n, sa_h, n_rows, N, H,
                g0, sg_b0, sg_n0, sg_h0, b00, b10, n00, n10,
                g1, sg_b1, sg_n1, sg_h1, b01, b11, n01, n11,
                g2, sg_b2, sg_n2, sg_h2, b02, b12, n02, n12,
                g3, sg_b3, sg_n3, sg_h3, b03, b13, n03, n13,
                g4, sg_b4, sg_n4, sg_h4, b04, b14, n04, n14,
                g5, sg_b5, sg_n5, sg_h5, b05, b15, n05, n15,
                g6, sg_b6, sg_n6, sg_h6, b06, b16, n06, n16,
                g7, sg_b7, sg_n7, sg_h7, b07, b17, n07, n17,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, G: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < n_rows
    hh = rows % H  # rows in memory order (b, i, h): the accumulator is read and written contiguously
    ii = (rows // H) % N
    bb = rows // (H * N)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    a_off = (bb * sa_b + ii * sa_n + hh * sa_h)[:, None] + cols[None, :]
    total, cov = _grad_j(g0, sg_b0, sg_n0, sg_h0, b00, b10, n00, n10, bb, ii, hh, cols, rmask, dmask)
    if G > 1:
        g_j, in_j = _grad_j(g1, sg_b1, sg_n1, sg_h1, b01, b11, n01, n11, bb, ii, hh, cols, rmask, dmask)
        total += g_j
        cov = cov | in_j
    if G > 2:
        g_j, in_j = _grad_j(g2, sg_b2, sg_n2, sg_h2, b02, b12, n02, n12, bb, ii, hh, cols, rmask, dmask)
        total += g_j
        cov = cov | in_j
    if G > 3:
        g_j, in_j = _grad_j(g3, sg_b3, sg_n3, sg_h3, b03, b13, n03, n13, bb, ii, hh, cols, rmask, dmask)
        total += g_j
        cov = cov | in_j
    if G > 4:
        g_j, in_j = _grad_j(g4, sg_b4, sg_n4, sg_h4, b04, b14, n04, n14, bb, ii, hh, cols, rmask, dmask)
        total += g_j
        cov = cov | in_j
    if G > 5:
        g_j, in_j = _grad_j(g5, sg_b5, sg_n5, sg_h5, b05, b15, n05, n15, bb, ii, hh, cols, rmask, dmask)
        total += g_j
        cov = cov | in_j
    if G > 6:
        g_j, in_j = _grad_j(g6, sg_b6, sg_n6, sg_h6, b06, b16, n06, n16, bb, ii, hh, cols, rmask, dmask)
        total += g_j
        cov = cov | in_j
    if G > 7:
        g_j, in_j = _grad_j(g7, sg_b7, sg_n7, sg_h7, b07, b17, n07, n17, bb, ii, hh, cols, rmask, dmask)
        total += g_j
        cov = cov | in_j
    mask2 = cov[:, None] & dmask[None, :]  # rows no block holds are neither read nor written
    acc = tl.load(acc_ptr + a_off, mask=mask2, other=0.0)
    tl.store(acc_ptr + a_off, acc + total, mask=mask2)


def add_boxes_into_triton_(acc: torch.Tensor, items: Sequence[tuple[Box, torch.Tensor]], *,
                           launch: tuple[int, int] = (2048, 8)) -> None:
    """``acc[box] += g`` for up to :data:`MAX_BLOCKS` ``(box, g)`` in one pass over the float32 ``acc``.

    ``g`` is ``(b1 − b0, n1 − n0, h, d)`` of any float dtype and strides (unit
    stride along head_dim); boxes may overlap (their sums add up). ``launch``:
    :attr:`ringbook.fast.tuning.Tuning.add_launch`.
    """
    b, n, h, d = acc.shape
    if not 1 <= len(items) <= MAX_BLOCKS:
        raise ValueError(f"add_boxes_into_triton_ adds 1 to {MAX_BLOCKS} blocks, got {len(items)}")
    if acc.dtype != torch.float32 or acc.stride(-1) != 1:
        raise ValueError("add_boxes_into_triton_ needs a float32 accumulator with unit stride along head_dim")
    args = []
    for (b0, b1, n0, n1), g in items:
        if not (0 <= b0 < b1 <= b and 0 <= n0 < n1 <= n) or tuple(g.shape) != (b1 - b0, n1 - n0, h, d) \
                or g.stride(-1) != 1:
            raise ValueError(f"add_boxes_into_triton_: block {tuple(g.shape)} does not fit box {(b0, b1, n0, n1)} "
                             f"of the accumulator {tuple(acc.shape)} (unit stride along head_dim needed)")
        args += [g, g.stride(0), g.stride(1), g.stride(2), b0, b1, n0, n1]
    args += args[:8] * (MAX_BLOCKS - len(items))  # unused slots: never read (G)
    n_rows = b * n * h
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(d)
    elements, warps = launch
    block_r = max(1, elements // block_d)
    _add_kernel[(triton.cdiv(n_rows, block_r),)](acc, acc.stride(0), acc.stride(1), acc.stride(2), n_rows, n, h,
                                                 *args, D=d, BLOCK_D=block_d, BLOCK_R=block_r, G=len(items),
                                                 num_warps=warps)
