"""The reference: attention with the full score matrix, in float64.

.. math::

    S = \\mathrm{scale}\\cdot Q K^\\top, \\quad
    \\mathrm{lse}_i = \\log \\sum_j e^{S_{ij}}, \\quad
    O_i = \\sum_j e^{S_{ij} - \\mathrm{lse}_i} V_j

Everything else in ringbook is tested against this function. It is written
to be obviously right, not fast: it materialises the ``b h i j`` scores.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange

from ._utils import check_bool, check_qkv, compute_dtype, resolve_scale
from .masks import check_document_ids, check_window
from .masks import keep as keep_mask


def causal_mask(n_q: int, n_k: int, device: torch.device | str | None = None, q_offset: int = 0,
                k_offset: int = 0) -> torch.Tensor:
    """Boolean ``(n_q, n_k)`` mask, True where key position ≤ query position.

    Positions start at ``q_offset`` and ``k_offset``; with both 0 this is the
    top-left aligned mask of ``torch.nn.functional.scaled_dot_product_attention``.
    """
    i = torch.arange(q_offset, q_offset + n_q, device=device)
    j = torch.arange(k_offset, k_offset + n_k, device=device)
    return causal_mask_positions(i, j)


def causal_mask_positions(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean ``(len(q_pos), len(k_pos))`` mask, True where ``k_pos[j] ≤ q_pos[i]``.

    The same test as :func:`causal_mask` for tokens whose positions are not a
    contiguous range, e.g. a striped or zigzag shard of the ring.
    """
    return rearrange(k_pos, "j -> 1 j") <= rearrange(q_pos, "i -> i 1")


def _check_mask(mask, b: int, h: int, n_q: int, n_k: int, device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a boolean torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = attend), got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but q is on {device}")
    expected = "(seq_q, seq_k) = " f"({n_q}, {n_k}) or broadcastable to (batch, heads, seq_q, seq_k) = ({b}, {h}, {n_q}, {n_k})"
    if mask.dim() not in (2, 4):
        raise ValueError(f"mask must be {expected}, got shape {tuple(mask.shape)}")
    try:
        shape = torch.broadcast_shapes(mask.shape, (b, h, n_q, n_k))
    except RuntimeError:
        raise ValueError(f"mask must be {expected}, got shape {tuple(mask.shape)}") from None
    if tuple(shape) != (b, h, n_q, n_k):  # e.g. a batch-3 mask for batch-1 q would grow the output
        raise ValueError(f"mask must be {expected}, got shape {tuple(mask.shape)}")
    if tuple(mask.shape[-2:]) != (n_q, n_k) and mask.dim() == 2:
        raise ValueError(f"mask must be {expected}, got shape {tuple(mask.shape)}")
    return mask


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    mask: torch.Tensor | None = None, scale: float | None = None,
                    precision: str = "float64", document_ids: torch.Tensor | None = None,
                    window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention. Returns ``(out, lse)``.

    Args:
        q, k, v: ``b n h d`` tensors (k and v may have another length than q).
        causal: key j is seen by query i only if j ≤ i (top-left aligned).
        mask: boolean ``(seq_q, seq_k)`` or broadcastable ``(b, h, seq_q, seq_k)``,
            True = attend. Combined with ``causal`` by logical and.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        precision: ``"float64"`` (default, the reference) or ``"input"``, which
            does the same arithmetic in the input dtype (float32 for lse). The
            latter is the naive low-precision baseline of flash-attention's
            2× error rule, and the "naive" benchmark row.
        document_ids: ``b n`` (or ``n``) non-decreasing ints: a query sees
            only keys of its own document (:mod:`ringbook.masks`; self-attention).
        window: a query at i sees keys j with ``i − window < j ≤ i`` when
            causal, ``|i − j| < window`` otherwise (:mod:`ringbook.masks`).

    Returns:
        out ``b n h d`` in the input dtype and lse ``b h n`` (natural log;
        float32 for float16/bfloat16 input). A query that sees no key gets
        out 0 and lse -inf.

    Twice differentiable: plain torch autograd, with ``create_graph=True``
    giving exact second derivatives (rows that see no key included: zero,
    never NaN).
    """
    check_qkv(q, k, v)
    causal = check_bool(causal, "causal")
    if precision not in ("float64", "input"):
        raise ValueError(f"precision must be 'float64' or 'input', got {precision!r}")
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    scale = resolve_scale(scale, d)
    work = torch.float64 if precision == "float64" else q.dtype

    keep = None
    if mask is not None:
        keep = _check_mask(mask, b, h, n_q, n_k, q.device)
    window = check_window(window)
    if document_ids is not None or window is not None:
        if n_q != n_k:
            raise ValueError(f"document_ids and window describe one sequence (self-attention): q has {n_q} tokens, "
                             f"k has {n_k}")
        ids = check_document_ids(document_ids, b, n_q)
        pos = torch.arange(n_q, device=q.device)
        doc = None if ids is None else ids.to(q.device)
        dm = keep_mask(pos, pos, causal=causal, q_doc=doc, k_doc=doc, window=window)
        keep = dm if keep is None else keep & dm
    elif causal:
        cm = causal_mask(n_q, n_k, device=q.device)
        keep = cm if keep is None else keep & cm

    # Scores in the working dtype; the softmax itself in at least float32, as
    # torch.softmax does internally for half-precision input.
    s = einsum(q.to(work), k.to(work), "b i h d, b j h d -> b h i j") * scale
    s = s.to(compute_dtype(work))
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # Double where: a row with no key goes through logsumexp as zeros and gets -inf afterwards, so
    # no exp(-inf - -inf) = NaN enters the graph (its derivatives of every order stay finite).
    seen = ~torch.isneginf(s).all(dim=-1)  # a NaN score counts as seen: NaN input stays NaN
    lse = torch.logsumexp(torch.where(rearrange(seen, "b h i -> b h i 1"), s, torch.zeros_like(s)), dim=-1)
    lse = torch.where(seen, lse, torch.full_like(lse, float("-inf")))  # b h i; -inf for a row with no key
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - rearrange(lse_safe, "b h i -> b h i 1"))
    out = einsum(p.to(work), v.to(work), "b h i j, b j h d -> b i h d")
    return out.to(q.dtype), lse.to(compute_dtype(q.dtype))
