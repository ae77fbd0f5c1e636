"""The online-softmax core: one block of attention, the lse merge, and the
blockwise loop built from the two (derived in ``notebooks/01_online_softmax``).

Attention over a key set J can be summarised per query by two numbers of the
softmax — the output ``O_J`` and the log-sum-exp ``lse_J`` — and two
summaries over disjoint key sets A and B combine exactly (equation (M)):

.. math::

    \\mathrm{lse} = \\log(e^{\\mathrm{lse}_A} + e^{\\mathrm{lse}_B}), \\qquad
    O = e^{\\mathrm{lse}_A - \\mathrm{lse}}\\, O_A + e^{\\mathrm{lse}_B - \\mathrm{lse}}\\, O_B

The merge is commutative and associative with ``(0, -inf)`` as identity, so
blocks can be visited in any order and grouping: the online softmax of
Milakov & Gimelshein (2018) and Rabe & Staats (2021) visits them in a loop,
ring attention visits them as they travel round a ring.
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange

from ._utils import (
    check_bool,
    check_positive_int,
    check_qkv,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from .masks import check_document_ids, check_window, classify, mask_spec
from .masks import keep as keep_mask
from .naive import causal_mask, causal_mask_positions

# Keys per score tile when a ring attends one shard: the tile is (shard × KEY_CHUNK),
# so memory per rank stays O(n / w) however long the shards get.
KEY_CHUNK = 2048

def _check_partial(out, lse, tag: str) -> None:
    check_tensor(out, f"out_{tag}", ndim=4)
    check_tensor(lse, f"lse_{tag}", ndim=3)
    b, n, h, _ = out.shape
    if tuple(lse.shape) != (b, h, n):
        raise ValueError(
            f"lse_{tag} must have shape (batch, heads, seq) = {(b, h, n)} to match out_{tag} "
            f"{tuple(out.shape)} ('b n h d'), got {tuple(lse.shape)}"
        )


def _logaddexp_safe(lse_a, lse_b):
    """``log(e^a + e^b)`` twice differentiable everywhere, with 0 on rows empty on both sides; and those rows.

    ``torch.logaddexp`` is -inf-correct in value and first derivative, but
    its second derivative is NaN where a side is -inf (an accumulator row
    still empty) or the sides differ by more than the exponent range
    (``e^{b-a}`` overflows): its backward divides by ``1 + e^{b-a}``. Here
    the max ``m`` is shifted out and *detached* — ``m + log(e^{a-m} + e^{b-m})``
    equals logaddexp for every constant ``m``, so its derivatives of every
    order are those of logaddexp — and every exponent is ≤ 0. Rows empty on
    both sides (both -inf) would still give ``log 0``, so they go in as
    ``(0, 0)`` and come out 0 (the "double where" trick: the where before
    the log keeps -inf out of the graph, so no derivative sees it). The
    caller sets them to -inf.
    """
    empty = torch.isneginf(lse_a) & torch.isneginf(lse_b)
    zero = torch.zeros((), dtype=lse_a.dtype, device=lse_a.device)
    a, b = torch.where(empty, zero, lse_a), torch.where(empty, zero, lse_b)
    m = torch.maximum(a, b).detach()
    m = torch.where(torch.isfinite(m), m, zero)  # +inf/NaN input: no shift, the result is non-finite anyway
    lse = m + torch.log(torch.exp(a - m) + torch.exp(b - m))
    return torch.where(empty, zero, lse), empty


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets, equation (M). Returns ``(out, lse)``.

    ``out_*`` are ``b n h d`` and ``lse_*`` are ``b h n``. The work is done in
    at least float32 and the result has the promoted dtype of the inputs. It is
    stable for any magnitude of lse: every exponent is ≤ 0. A row with no key
    on either side (lse -inf on both) gives out 0 and lse -inf, so merging
    with an empty partial ``(0, -inf)`` is the identity.

    Twice differentiable: first and second derivatives are finite and exact
    for every lse, -inf on one or both sides included (an accumulator row
    still empty) and however far apart the two sides are.
    """
    _check_partial(out_a, lse_a, "a")
    _check_partial(out_b, lse_b, "b")
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} must have the same shape")
    for x in (lse_a, out_b, lse_b):
        if x.device != out_a.device:
            raise ValueError(f"all partials must be on one device, got {out_a.device} and {x.device}")
    out_dtype = torch.promote_types(out_a.dtype, out_b.dtype)
    lse_dtype_ = torch.promote_types(lse_a.dtype, lse_b.dtype)
    work = torch.promote_types(compute_dtype(out_dtype), compute_dtype(lse_dtype_))

    lse_a, lse_b = lse_a.to(work), lse_b.to(work)
    lse_safe, empty = _logaddexp_safe(lse_a, lse_b)
    lse = torch.where(empty, torch.full_like(lse_safe, float("-inf")), lse_safe)
    w_a = rearrange(torch.exp(lse_a - lse_safe), "b h n -> b n h 1")
    w_b = rearrange(torch.exp(lse_b - lse_safe), "b h n -> b n h 1")
    out = w_a * out_a.to(work) + w_b * out_b.to(work)
    return out.to(out_dtype), lse.to(lse_dtype_)


def attend_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                 q_offset: int = 0, k_offset: int = 0, q_pos: torch.Tensor | None = None,
                 k_pos: torch.Tensor | None = None, chunk: int | None = None, q_doc: torch.Tensor | None = None,
                 k_doc: torch.Tensor | None = None, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of a query block to one key/value block, in ``compute_dtype``.

    The one place that materialises scores: a ``b h i j`` tile of the block's
    size. Positions start at ``q_offset``/``k_offset`` for the causal test
    (key position ≤ query position); explicit LongTensor positions ``q_pos``
    (length i) and ``k_pos`` (length j) replace them when given, for shards
    whose tokens are not contiguous (the ring's striped layout). Returns
    ``(out, lse)`` in float32 for low-precision input (the accumulator
    dtype), else in the input dtype; rows with no visible key give out 0 and
    lse -inf. Inputs are assumed valid.

    ``chunk`` bounds the tile: longer key blocks are visited ``chunk`` keys
    at a time and folded with :func:`merge_partials` (memory O(i·chunk)
    instead of O(i·j); the ring uses it to keep memory per rank O(n / w)).
    ``q_doc``/``k_doc`` (``b i``/``b j`` document ids) and ``window``: the
    masks of :mod:`ringbook.masks`, by the same positions.
    Twice differentiable (rows with no visible key included).
    """
    if chunk is not None and k.shape[1] > chunk:
        out = lse = None
        for a in range(0, k.shape[1], chunk):
            part = attend_block(q, k[:, a:a + chunk], v[:, a:a + chunk], scale=scale, causal=causal,
                                q_offset=q_offset, k_offset=k_offset + a, q_pos=q_pos,
                                k_pos=None if k_pos is None else k_pos[a:a + chunk], q_doc=q_doc,
                                k_doc=None if k_doc is None else k_doc[:, a:a + chunk], window=window)
            out, lse = part if out is None else merge_partials(out, lse, *part)
        return out, lse
    work = compute_dtype(q.dtype)
    s = einsum(q.to(work), k.to(work), "b i h d, b j h d -> b h i j") * scale
    keep = _block_keep(q.shape[1], k.shape[1], q.device, q_offset, k_offset, q_pos, k_pos, causal, q_doc, k_doc,
                       window)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # The running max m of the notebook. It cancels out of out and lse for any value, so it is
    # detached: no gradient through amax (whose ties would split it) and every derivative order exact.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1)  # normaliser l
    # Double where: a row that sees no key of the block (l = 0) divides by and takes the log of 1,
    # then gets lse -inf; no 0/0 or log 0 enters the graph, so even second derivatives stay finite.
    seen = l != 0  # not l > 0: a NaN row (NaN input) must stay NaN, not pass for empty
    l_safe = torch.where(seen, l, torch.ones_like(l))
    out = einsum(p, v.to(work), "b h i j, b j h d -> b i h d")
    out = out / rearrange(l_safe, "b h i -> b i h 1")  # empty rows: 0 / 1
    lse = rearrange(m, "b h i 1 -> b h i") + torch.log(l_safe)
    lse = torch.where(seen, lse, torch.full_like(lse, float("-inf")))
    return out, lse


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, causal: bool = False,
                        scale: float | None = None, document_ids: torch.Tensor | None = None,
                        window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax attention over key/value blocks. Returns ``(out, lse)``.

    Keys and values are visited ``block_size`` at a time (the last block may
    be shorter); each block's ``(out, lse)`` from :func:`attend_block` is
    folded into float32 (or float64) accumulators with :func:`merge_partials`.
    All query rows are processed together, so at most one ``block_size``-wide
    tile of scores per query exists at a time: memory O(n·block_size), not
    O(n²). With ``causal``, a key block is attended only by the queries at or
    after its first position, and blocks no query can see are never computed.
    ``document_ids`` and ``window`` (:mod:`ringbook.masks`; self-attention):
    a key block no query sees under them is skipped too.
    Twice differentiable: plain torch autograd through :func:`attend_block` and
    :func:`merge_partials`, so ``create_graph=True`` gives exact second derivatives.
    """
    check_qkv(q, k, v)
    causal = check_bool(causal, "causal")
    block_size = check_positive_int(block_size, "block_size")
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    scale = resolve_scale(scale, d)
    work = compute_dtype(q.dtype)

    window = check_window(window)
    ids = None
    if document_ids is not None or window is not None:
        if n_q != n_k:
            raise ValueError(f"document_ids and window describe one sequence (self-attention): q has {n_q} tokens, "
                             f"k has {n_k}")
        ids = check_document_ids(document_ids, b, n_q)
        spec = mask_spec(causal, ids, window)
        ids = None if ids is None else ids.to(q.device)
    out = torch.zeros(b, n_q, h, d, dtype=work, device=q.device)
    lse = torch.full((b, h, n_q), float("-inf"), dtype=work, device=q.device)
    for start in range(0, n_k, block_size):
        stop = min(start + block_size, n_k)
        first_q = start if causal else 0  # queries before `start` see none of this block
        if first_q >= n_q:
            break
        masks = {}
        if document_ids is not None or window is not None:
            if classify(torch.arange(first_q, n_q), torch.arange(start, stop), spec) == "empty":
                continue  # no query sees this block
            masks = dict(q_doc=None if ids is None else ids[:, first_q:], window=window,
                         k_doc=None if ids is None else ids[:, start:stop])
        o_blk, lse_blk = attend_block(
            q[:, first_q:], k[:, start:stop], v[:, start:stop],
            scale=scale, causal=causal, q_offset=first_q, k_offset=start, **masks,
        )
        out_q, lse_q = merge_partials(out[:, first_q:], lse[:, :, first_q:], o_blk, lse_blk)
        # Rebuild rather than assign into slices: merge_partials saves views
        # of `out`/`lse` for backward, and an in-place write would break autograd.
        out = torch.cat([out[:, :first_q], out_q], dim=1)
        lse = torch.cat([lse[:, :, :first_q], lse_q], dim=2)
    return out.to(q.dtype), lse.to(compute_dtype(q.dtype))


def online_softmax_trace(scores: torch.Tensor, block_size: int) -> list[tuple[float, float]]:
    """Running max ``m``, normaliser ``l`` after each block of a 1-D score row.

    Teaching helper for notebook 01: returns a list of ``(m, l)`` floats, one
    per block seen, using the update
    ``m' = max(m, max(s_blk)),  l' = l·e^{m - m'} + Σ e^{s_blk - m'}``.
    After the last block, ``m + log l`` equals ``logsumexp(scores)``.
    """
    check_tensor(scores, "scores", ndim=1)
    block_size = check_positive_int(block_size, "block_size")
    m, l = float("-inf"), 0.0
    trace = []
    for start in range(0, scores.numel(), block_size):
        blk = scores[start:start + block_size].double()
        m_new = max(m, blk.max().item())
        if m_new == float("-inf"):  # nothing visible yet: m and l stay (-inf, 0)
            trace.append((m, l))
            continue
        l = l * math.exp(m - m_new) + torch.exp(blk - m_new).sum().item()
        m = m_new
        trace.append((m, l))
    return trace


def _block_keep(n_q: int, n_k: int, device, q_offset: int, k_offset: int, q_pos, k_pos, causal: bool = True,
                q_doc=None, k_doc=None, window=None) -> torch.Tensor | None:
    """The keep-mask of one block (None: every pair), from offsets or explicit positions (as in
    :func:`attend_block`), with the document and window masks of :mod:`ringbook.masks`."""
    if q_doc is None and window is None:
        if not causal:
            return None
        if q_pos is None and k_pos is None:
            return causal_mask(n_q, n_k, device=device, q_offset=q_offset, k_offset=k_offset)
    i = q_pos if q_pos is not None else torch.arange(q_offset, q_offset + n_q, device=device)
    j = k_pos if k_pos is not None else torch.arange(k_offset, k_offset + n_k, device=device)
    if q_doc is None and window is None:
        return causal_mask_positions(i, j)
    return keep_mask(i.to(device), j.to(device), causal=causal, q_doc=None if q_doc is None else q_doc.to(device),
                     k_doc=None if k_doc is None else k_doc.to(device), window=window)


def attend_block_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          dout: torch.Tensor, *, scale: float, causal: bool = False, q_offset: int = 0,
                          k_offset: int = 0, q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                          delta: torch.Tensor | None = None, chunk: int | None = None,
                          q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
                          window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one query block's attention through one key/value block. Returns ``(dq, dk, dv)``.

    The FlashAttention backward for a block, given the *final* ``out`` and
    ``lse`` of the query rows (over all keys, not just this block's), so the
    recomputed probabilities are the global ones:

    .. math::

        P = e^{S - \\mathrm{lse}},\\quad dV = P^\\top dO,\\quad dP = dO\\, V^\\top,\\quad
        D = \\mathrm{rowsum}(dO \\circ O),\\quad dS = P \\circ (dP - D),\\quad
        dQ = \\mathrm{scale}\\cdot dS\\, K,\\quad dK = \\mathrm{scale}\\cdot dS^\\top Q

    Summing ``dq`` over every key block of a row, and ``dk``/``dv`` over every
    query block of a key, gives the gradients of full attention. ``delta``
    (``b h i``) replaces D when given; a gradient ``dlse`` of the lse output
    enters as ``delta = D − dlse``. Causal masking as in :func:`attend_block`
    (offsets or explicit positions). Work and results are in float32 for
    low-precision input, else in the input dtype; rows with lse -inf (no key
    anywhere) get zero gradient. Inputs are assumed valid. ``chunk``, the
    documents and the window as in :func:`attend_block`.
    """
    work = compute_dtype(q.dtype)
    if chunk is not None and k.shape[1] > chunk:
        if delta is None:
            delta = einsum(dout.to(work), out.to(work), "b i h d, b i h d -> b h i")
        dq, dks, dvs = 0, [], []
        for a in range(0, k.shape[1], chunk):
            dq_c, dk_c, dv_c = attend_block_backward(
                q, k[:, a:a + chunk], v[:, a:a + chunk], out, lse, dout, scale=scale, causal=causal,
                q_offset=q_offset, k_offset=k_offset + a, q_pos=q_pos,
                k_pos=None if k_pos is None else k_pos[a:a + chunk], delta=delta, q_doc=q_doc,
                k_doc=None if k_doc is None else k_doc[:, a:a + chunk], window=window)
            dq = dq + dq_c
            dks.append(dk_c)
            dvs.append(dv_c)
        return dq, torch.cat(dks, dim=1), torch.cat(dvs, dim=1)
    qw, kw, vw, ow, dow = (x.to(work) for x in (q, k, v, out, dout))
    lse = lse.to(work)
    s = einsum(qw, kw, "b i h d, b j h d -> b h i j") * scale
    keep = _block_keep(q.shape[1], k.shape[1], q.device, q_offset, k_offset, q_pos, k_pos, causal, q_doc, k_doc,
                       window)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - rearrange(lse_safe, "b h i -> b h i 1"))  # masked or empty rows: exp(-inf) = 0
    if delta is None:
        delta = einsum(dow, ow, "b i h d, b i h d -> b h i")
    dv = einsum(p, dow, "b h i j, b i h d -> b j h d")
    dp = einsum(dow, vw, "b i h d, b j h d -> b h i j")
    ds = p * (dp - rearrange(delta.to(work), "b h i -> b h i 1"))
    dq = einsum(ds, kw, "b h i j, b j h d -> b i h d") * scale
    dk = einsum(ds, qw, "b h i j, b i h d -> b j h d") * scale
    return dq, dk, dv
