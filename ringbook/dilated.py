"""Dilated attention (LongNet, Ding et al., 2023), derived in ``notebooks/03_dilated_attention``.

A pattern is a pair (segment length ``s``, dilation rate ``r``). The sequence
is cut into segments of ``s`` tokens; inside each segment head ``h`` keeps the
positions whose index within the segment is ≡ ``o_h`` (mod ``r``), and a kept
query attends the kept keys of its own segment. Several pairs are combined
through their softmax denominators (equation (M) of notebook 01), which is
dense attention in which key j counts ``κ_ij`` times for query i — equation (D):

.. math::

    \\kappa^h_{ij} = \\#\\{p : i, j \\text{ in one segment of } s_p,\\;
               i \\bmod s_p \\equiv j \\bmod s_p \\equiv o_{h,p} \\pmod{r_p}\\}
               \\;[\\,j \\le i \\text{ if causal}],\\qquad
    \\mathrm{lse}_i = \\log \\sum_j \\kappa_{ij} e^{s_{ij}},\\quad
    O_i = \\frac{\\sum_j \\kappa_{ij} e^{s_{ij}} V_j}{\\sum_j \\kappa_{ij} e^{s_{ij}}}

A position no pattern keeps gets out 0 and lse -inf. Head modes: ``"all"`` —
every head uses every pair with offset ``o = h mod r``; ``"grouped"`` (the
benchmark's configuration) — the heads are split into one contiguous group per pair
(:func:`grouped_heads`) and the j-th head of group g keeps ``j mod r_g``.

Queries, keys and values are dilated together: a pair costs
``(n/s)·(s/r)²`` scores per head, not ``n·s`` (:func:`dilated_flops`).
Shapes: q/k/v ``b n h d``, lse ``b h n``; ``s`` segment, ``m = s/r`` dilated
tokens of a segment, ``r`` rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import einsum, rearrange

from ._utils import check_bool, check_positive_int, check_qkv, compute_dtype, resolve_scale
from .online_softmax import attend_block, merge_partials

HEAD_MODES = ("all", "grouped")
# Largest score tile (elements) one attend_block call may materialise; bigger work is chunked.
SCORE_BUDGET = 2 ** 26


def check_dilated_config(seq_len: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int], *,
                         heads: str = "all", num_heads: int | None = None) -> list[tuple[int, int]]:
    """Validate a configuration; return the pairs ``[(s, r), ...]`` or raise naming the offending argument.

    ``seq_len`` and ``num_heads`` (when given) must be positive ints: the
    zero-size rule of :func:`ringbook._utils.check_qkv`, for the helpers that
    take sizes instead of tensors.
    """
    check_positive_int(seq_len, "seq_len")
    if num_heads is not None:
        check_positive_int(num_heads, "num_heads")
    if heads not in HEAD_MODES:
        raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
    pairs = []
    for name, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{name} must be a non-empty list of positive ints, got {values!r}")
        for i, x in enumerate(values):
            check_positive_int(x, f"{name}[{i}]")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(f"segment_lengths has {len(segment_lengths)} entries but dilation_rates has "
                         f"{len(dilation_rates)}; give one dilation rate per segment length")
    for i, (seg, r) in enumerate(zip(segment_lengths, dilation_rates)):
        if seq_len % seg:
            raise ValueError(f"segment_lengths[{i}]={seg} does not divide sequence length {seq_len}")
        if seg % r:
            raise ValueError(f"dilation_rates[{i}]={r} does not divide segment_lengths[{i}]={seg}")
        pairs.append((int(seg), int(r)))
    if heads == "grouped" and num_heads is not None and num_heads < len(pairs):
        raise ValueError(f"heads='grouped' needs at least one head per pair: num_heads={num_heads} < "
                         f"{len(pairs)} pairs (len(segment_lengths)); use heads='all' or fewer pairs")
    return pairs


def grouped_heads(num_heads: int, num_pairs: int) -> list[range]:
    """Contiguous head groups, as even as possible, later groups taking the extra heads (8 over 3: 2, 3, 3)."""
    base, extra = divmod(num_heads, num_pairs)
    sizes = [base + (g >= num_pairs - extra) for g in range(num_pairs)]
    starts = [sum(sizes[:g]) for g in range(num_pairs)]
    return [range(a, a + s) for a, s in zip(starts, sizes)]


def pair_heads(num_heads: int, dilation_rates: Sequence[int],
               heads: str = "all") -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """For each pair: (the heads that use it, each head's offset ``o`` within the segment, mod r)."""
    if heads == "all":
        return [(tuple(range(num_heads)), tuple(h % r for h in range(num_heads))) for r in dilation_rates]
    groups = grouped_heads(num_heads, len(dilation_rates))
    return [(tuple(g), tuple(j % r for j in range(len(g)))) for g, r in zip(groups, dilation_rates)]


def _row_weights(rows, cols, num_heads, pairs, patterns, causal):
    """``κ_ij`` of equation (D) for query positions ``rows`` and key positions ``cols``: ``(h, i, j)`` int64."""
    c = torch.zeros(num_heads, rows.numel(), cols.numel(), dtype=torch.int64, device=rows.device)
    for (seg, r), (hs, offs) in zip(pairs, patterns):
        same = rearrange(rows // seg, "i -> 1 i 1") == rearrange(cols // seg, "j -> 1 1 j")
        o = torch.tensor(offs, device=rows.device)
        keep_i = rearrange(rows % seg % r, "i -> 1 i 1") == rearrange(o, "h -> h 1 1")
        keep_j = rearrange(cols % seg % r, "j -> 1 1 j") == rearrange(o, "h -> h 1 1")
        c = c.index_add(0, torch.tensor(hs, device=rows.device), (same & keep_i & keep_j).long())
    if causal:
        c = c * (rearrange(cols, "j -> 1 1 j") <= rearrange(rows, "i -> 1 i 1"))
    return c


def dilated_weights(seq_len: int, num_heads: int, *, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                    causal: bool = False, heads: str = "all") -> torch.Tensor:
    """The dense ``(h, n, n)`` integer weights ``κ_ij`` of equation (D) (teaching tool and test reference)."""
    check_positive_int(num_heads, "num_heads")
    causal = check_bool(causal, "causal")
    pairs = check_dilated_config(seq_len, segment_lengths, dilation_rates, heads=heads, num_heads=num_heads)
    pos = torch.arange(seq_len)
    return _row_weights(pos, pos, num_heads, pairs, pair_heads(num_heads, dilation_rates, heads), causal)


def _weighted_softmax(s, c, v, work):
    """Equation (D) from scores ``s`` (b h i j) and weights ``c`` (h i j); out in ``work``, lse in ``s.dtype``."""
    s = s.masked_fill(c == 0, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    l = (c * torch.exp(s - m)).sum(dim=-1)
    seen = l != 0  # double where: no NaN gradient through log 0 for rows no pattern keeps (NaN stays NaN)
    lse = torch.where(seen, rearrange(m, "b h i 1 -> b h i") + torch.log(torch.where(seen, l, 1.0)), float("-inf"))
    lse_safe = torch.where(seen, lse, torch.zeros_like(lse))
    p = c * torch.exp(s - rearrange(lse_safe, "b h i -> b h i 1"))
    return einsum(p.to(work), v.to(work), "b h i j, b j h d -> b i h d"), lse


def dilated_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment_lengths: Sequence[int],
                            dilation_rates: Sequence[int], causal: bool = False, heads: str = "all",
                            scale: float | None = None, precision: str = "float64") -> tuple[torch.Tensor, torch.Tensor]:
    """Equation (D) with the ``n×n`` weights materialised. Returns ``(out, lse)``.

    The reference of the tests: ``precision="float64"`` (default) computes in
    float64; ``"input"`` does the same arithmetic in the input dtype (softmax
    in float32 for half precision), the low-precision baseline of the 2× rule.
    Twice differentiable.
    """
    check_qkv(q, k, v)
    if precision not in ("float64", "input"):
        raise ValueError(f"precision must be 'float64' or 'input', got {precision!r}")
    b, n, h, d = q.shape
    scale = resolve_scale(scale, d)
    c = dilated_weights(n, h, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
                        causal=check_bool(causal, "causal"), heads=heads).to(q.device)
    work = torch.float64 if precision == "float64" else q.dtype
    s = (einsum(q.to(work), k.to(work), "b i h d, b j h d -> b h i j") * scale).to(compute_dtype(work))
    out, lse = _weighted_softmax(s, c, v, work)
    return out.to(q.dtype), lse.to(compute_dtype(q.dtype))


def dilated_reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, *,
                           segment_lengths: Sequence[int], dilation_rates: Sequence[int], causal: bool = False,
                           heads: str = "all", scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Equation (D) in float64 for query ``rows`` only, without an ``n×n`` matrix: ``(out b i h d, lse b h i)``.

    A query's keys all lie in its segments, so each row needs only the key
    window spanned by its segments (at most ``2·max(s)`` keys).
    """
    b, n, h, d = q.shape
    pairs = check_dilated_config(n, segment_lengths, dilation_rates, heads=heads, num_heads=h)
    patterns = pair_heads(h, dilation_rates, heads)
    scale = resolve_scale(scale, d)
    outs, lses = [], []
    for i in rows.tolist():
        lo, hi = min(i - i % seg for seg, _ in pairs), max(i - i % seg + seg for seg, _ in pairs)
        cols = torch.arange(lo, hi, device=q.device)
        c = _row_weights(torch.tensor([i], device=q.device), cols, h, pairs, patterns, causal)
        s = einsum(q[:, i:i + 1].double(), k[:, lo:hi].double(), "b i h d, b j h d -> b h i j") * scale
        out, lse = _weighted_softmax(s, c, v[:, lo:hi], torch.float64)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def dilated_flops(batch: int, num_heads: int, seq_len: int, head_dim: int, *, segment_lengths: Sequence[int],
                  dilation_rates: Sequence[int], causal: bool = False, heads: str = "all") -> float:
    """Forward FLOPs dilated attention needs: 4·d per computed score, ``(n/s)·(s/r)²`` scores per head and pair.

    Causal halves the in-segment work, the convention of dense attention.
    """
    for value, name in ((batch, "batch"), (num_heads, "num_heads"), (head_dim, "head_dim")):
        check_positive_int(value, name)
    pairs = check_dilated_config(seq_len, segment_lengths, dilation_rates, heads=heads, num_heads=num_heads)
    scores = sum(len(hs) * (seq_len // seg) * (seg // r) ** 2
                 for (seg, r), (hs, _) in zip(pairs, pair_heads(num_heads, dilation_rates, heads)))
    flops = 4.0 * batch * head_dim * scores
    return flops / 2 if causal else flops


def gather_dilated(x: torch.Tensor, seg: int, r: int, hs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The kept tokens of every segment, ``b n h d`` → ``(b s) m h d``: heads ``hs`` at offsets ``offs``."""
    x = rearrange(x, "b (s m r) h d -> b s m r h d", m=seg // r, r=r)
    return rearrange(x[:, :, :, offs, hs], "b s m h d -> (b s) m h d")  # head j takes slot offs[j]


def scatter_dilated(out: torch.Tensor, lse: torch.Tensor, *, batch: int, num_heads: int, seg: int, r: int,
                    hs: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`gather_dilated`: ``b n h d`` / ``b h n`` with 0 / -inf where nothing was kept."""
    o = rearrange(out, "(b s) m h d -> h b s m d", b=batch)
    l = rearrange(lse, "(b s) h m -> h b s m", b=batch)
    zo = o.new_zeros((r, num_heads) + tuple(o.shape[1:])).index_put((offs, hs), o)  # out of place: autograd-safe
    zl = l.new_full((r, num_heads) + tuple(l.shape[1:]), float("-inf")).index_put((offs, hs), l)
    return rearrange(zo, "r h b s m d -> b (s m r) h d"), rearrange(zl, "r h b s m -> b h (s m r)")


def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                    q_start: int = 0, budget: int = SCORE_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention inside each segment: ``(B m h d)`` dilated q (dilated indices from ``q_start``) and k/v (from 0).

    Segments are batched; the work is split into chunks of at most ``budget``
    scores (whole segments, then query rows). With ``causal``, keys after a
    chunk's last query are never computed. Returns ``(out B m h d, lse B h m)``
    in the accumulator dtype.
    """
    n_b, m_q, h, _ = q.shape
    m_k = k.shape[1]
    if n_b * h * m_q * m_k <= budget or m_q == 0:
        stop = min(m_k, q_start + m_q) if causal else m_k
        return attend_block(q, k[:, :stop], v[:, :stop], scale=scale, causal=causal, q_offset=q_start)
    if h * m_q * m_k <= budget:  # whole segments per chunk
        step = budget // (h * m_q * m_k)
        parts = [attend_segments(q[i:i + step], k[i:i + step], v[i:i + step], scale=scale, causal=causal,
                                 q_start=q_start, budget=budget) for i in range(0, n_b, step)]
        return torch.cat([p[0] for p in parts], dim=0), torch.cat([p[1] for p in parts], dim=0)
    step = max(1, budget // (n_b * h * m_k))  # query rows per chunk
    parts = [attend_segments(q[:, i:i + step], k, v, scale=scale, causal=causal, q_start=q_start + i,
                             budget=max(budget, n_b * h * step * m_k)) for i in range(0, m_q, step)]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=2)


def _index(values, device):
    return torch.tensor(values, dtype=torch.long, device=device)


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment_lengths: Sequence[int],
                      dilation_rates: Sequence[int], causal: bool = False, heads: str = "all",
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention, equation (D), without ever scoring a dropped position. Returns ``(out, lse)``.

    Args:
        q, k, v: ``b n h d`` (self-attention: one length ``n``).
        segment_lengths, dilation_rates: the pairs ``(s, r)``; each ``s`` must
            divide ``n`` and each ``r`` its ``s``.
        causal: a query sees only kept keys at or before it.
        heads: ``"all"`` or ``"grouped"`` (see the module docstring).
        scale: softmax scale, default ``1/sqrt(d)``.

    For each pair the kept tokens are gathered per segment
    (:func:`gather_dilated`), attended with segments batched
    (:func:`attend_segments`), scattered back and merged over pairs by lse
    (:func:`~ringbook.online_softmax.merge_partials`). Output in the input
    dtype, lse float32 for half precision; rows no pattern keeps: 0 / -inf.
    Twice differentiable (plain torch autograd; ``create_graph=True`` gives
    exact second derivatives, zero for rows no pattern keeps).
    """
    check_qkv(q, k, v)
    causal = check_bool(causal, "causal")
    b, n, h, d = q.shape
    if k.shape[1] != n:
        raise ValueError(f"dilated attention is self-attention: q has length {n} but k and v have {k.shape[1]}")
    pairs = check_dilated_config(n, segment_lengths, dilation_rates, heads=heads, num_heads=h)
    scale = resolve_scale(scale, d)
    out = lse = None
    for (seg, r), (hs, offs) in zip(pairs, pair_heads(h, dilation_rates, heads)):
        hs_t, offs_t = _index(hs, q.device), _index(offs, q.device)
        o, l = attend_segments(*(gather_dilated(x, seg, r, hs_t, offs_t) for x in (q, k, v)), scale=scale,
                               causal=causal)
        o, l = scatter_dilated(o, l, batch=b, num_heads=h, seg=seg, r=r, hs=hs_t, offs=offs_t)
        out, lse = (o, l) if out is None else merge_partials(out, lse, o, l)
    return out.to(q.dtype), lse.to(compute_dtype(q.dtype))
