"""A block cut by documents or a window as variable-length attention: the fused kernel for :class:`~ringbook.fast.blocks.Masked`.

A masked block's rows split into *pieces*: a run of queries and a run of
keys of one document, each run consecutive in token position. Inside a
piece the mask is a band of the (query, key) grid: with query positions
``qs … qe − 1`` and key positions ``ks … ke − 1``, query i sees key j iff

    causal:        j ≤ i                  and, with a window W,  j > i − W
    not causal:    every key               or, with a window W, |i − j| < W

A variable-length kernel (FlashAttention's ``varlen`` form, PyTorch's
``_flash_attention_forward`` with ``cum_seq_q``/``cum_seq_k``, which
:func:`torch.nn.attention.varlen.varlen_attn` wraps) attends many
sequences in one launch, each with its own lengths, and cuts each with a band
aligned at the bottom right: local query a sees local key b iff

    a + (n_k − n_q) − left  ≤  b  ≤  a + (n_k − n_q) + right      (−1: no bound)

so a piece is exact as one such sequence once its band is written in those
terms. With ``shift = qe − ke`` (how far the queries' run ends after the
keys'), ``i = qs + a`` and ``j = ks + b`` the conditions above are

    causal:        right = shift,          left = W − 1 − shift  (−1 without a window)
    not causal:    right = shift + W − 1,  left = W − 1 − shift  (both −1 without a window)

Both must be ≥ 0 (a negative bound means "none" to the kernel): so each
piece is first trimmed of the keys no query of it sees and the queries that
see none of its keys, which makes them so. Pieces with the same
``(left, right)`` go in one launch. Queries in no piece see no key of the
block: out 0, lse −inf. The backward is the kernel's own, given the block's
rows of the *global* out and lse (as the fused full blocks are).

:func:`pieces` is plain torch and runs anywhere (the tests check it against
the mask on the CPU, through :func:`reference_varlen`, which follows the
kernel's definition above); :func:`varlen_forward` and
:func:`varlen_backward` call the CUDA kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from .._utils import compute_dtype
from ..online_softmax import merge_partials

Rows = tuple[int, int]


@dataclasses.dataclass(frozen=True, eq=False)
class Launch:
    """One variable-length kernel call: sequences of query rows and key rows with one band ``(left, right)``.

    ``q_rows``/``k_rows``: indices into the block's flattened ``(b n)`` query and
    key rows, sequence after sequence; ``cu_q``/``cu_k``: the int32 offsets of
    each sequence in them (length sequences + 1). ``q_span``/``k_span``: where
    the rows are one run ``[start, stop)`` (each sequence starts where the one
    before it ends, as the documents of a block do), that run: the kernel then
    reads and writes slices of the block, with no gather or scatter.
    ``layer``: where a document's keys sit in several runs of the block (a
    shard dealt head and tail, say), its queries meet run ``layer`` here: the
    launches of one layer hold each query row at most once, and the layers'
    results are merged (equation (M)).
    """

    q_rows: Tensor
    k_rows: Tensor
    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int
    left: int
    right: int
    q_span: Rows | None = None
    k_span: Rows | None = None
    layer: int = 0

    def to(self, device: torch.device | str) -> Launch:
        return dataclasses.replace(self, **{f: getattr(self, f).to(device)
                                            for f in ("q_rows", "k_rows", "cu_q", "cu_k")})


def _runs(pos: Tensor, doc: Tensor | None) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges along which positions rise by one and the document stays the same."""
    brk = pos[1:] != pos[:-1] + 1
    if doc is not None:
        brk = brk | (doc[1:] != doc[:-1])
    cuts = [0, *(torch.nonzero(brk).flatten() + 1).tolist(), pos.numel()]
    return list(zip(cuts[:-1], cuts[1:]))


def _trim(qs: int, qe: int, ks: int, ke: int, causal: bool, window: int | None) -> tuple[int, int, int, int]:
    """The piece's query and key position ranges without the keys no query sees and the queries that see none."""
    for _ in range(2):  # a second pass settles what the first one's cuts changed
        if causal:
            ke = min(ke, qe)  # key j ≤ i ≤ qe − 1
            qs = max(qs, ks)  # query i ≥ j ≥ ks
            if window is not None:
                ks = max(ks, qs - window + 1)  # j > i − W ≥ qs − W
                qe = min(qe, ke - 1 + window)  # i < j + W ≤ ke − 1 + W
        elif window is not None:
            ks, ke = max(ks, qs - window + 1), min(ke, qe + window - 1)
            qs, qe = max(qs, ks - window + 1), min(qe, ke + window - 1)
    return qs, qe, ks, ke


def _band(shift: int, causal: bool, window: int | None) -> tuple[int, int]:
    """``(left, right)`` of a trimmed piece whose query run ends ``shift`` positions after its key run."""
    if causal:
        return (-1 if window is None else window - 1 - shift), shift
    if window is None:
        return -1, -1
    return window - 1 - shift, shift + window - 1


def pieces(q_pos: Tensor, k_pos: Tensor, *, causal: bool, q_doc: Tensor | None = None,
           k_doc: Tensor | None = None, window: int | None = None, batch: int = 1) -> list[Launch] | None:
    """The launches that compute a masked block exactly (a list; ``None`` is kept for callers of the older form,
    which returned it where a document's keys sat in two runs of the block).

    ``q_pos``/``k_pos``: the block's token positions (``i``, ``j``); ``q_doc``/
    ``k_doc``: document ids ``b i``/``b j`` (None: one document; rows of the
    batch may differ); ``batch``: b, when there are no ids. A document whose
    keys sit in several runs of the block meets its queries once per run, each
    run in its own *layer* (:class:`Launch`), merged after.
    """
    q_pos, k_pos = q_pos.cpu(), k_pos.cpu()
    rows = batch if q_doc is None else q_doc.shape[0]
    n_q, n_k = q_pos.numel(), k_pos.numel()
    groups: dict[tuple[int, int, int], list] = {}  # (layer, left, right) -> sequences
    for r in range(rows):
        qd = None if q_doc is None else q_doc[r].cpu()
        kd = None if k_doc is None else k_doc[r].cpu()
        k_runs = _runs(k_pos, kd)
        k_of: dict = {}  # the key runs of each document (None: the block's one document)
        for a, b in k_runs:
            k_of.setdefault(None if kd is None else int(kd[a]), []).append((a, b))
        for a, b in _runs(q_pos, qd):
            doc = None if qd is None else int(qd[a])
            for layer, (c, d) in enumerate(k_of.get(doc, ())):
                qs, ks = int(q_pos[a]), int(k_pos[c])
                qs2, qe2, ks2, ke2 = _trim(qs, qs + b - a, ks, ks + d - c, causal, window)
                if qe2 <= qs2 or ke2 <= ks2:
                    continue
                q0, k0 = r * n_q + a + qs2 - qs, r * n_k + c + ks2 - ks
                groups.setdefault((layer, *_band(qe2 - ke2, causal, window)), []).append(
                    (q0, qe2 - qs2, k0, ke2 - ks2))
    out = []
    for (layer, left, right), seqs in sorted(groups.items(), key=lambda kv: kv[0][0]):
        q_rows = torch.cat([torch.arange(q0, q0 + nq) for q0, nq, _, _ in seqs])
        k_rows = torch.cat([torch.arange(k0, k0 + nk) for _, _, k0, nk in seqs])
        cu_q = torch.tensor([0, *torch.tensor([s[1] for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor([s[3] for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
        out.append(Launch(q_rows, k_rows, cu_q, cu_k, max(s[1] for s in seqs), max(s[3] for s in seqs),
                          left, right, _span([(q0, nq) for q0, nq, _, _ in seqs]),
                          _span([(k0, nk) for _, _, k0, nk in seqs]), layer))
    return out


def stack(parts: list[list[Launch]], q_rows: int, k_rows: int) -> list[Launch]:
    """The launches of several blocks stacked along the batch (part p's query rows start at ``p · q_rows`` of the
    flattened stack, its key rows at ``p · k_rows``): one launch per band over every part's sequences.

    One process runs the ranks of a ring step side by side: their masked blocks become one launch per band
    instead of one per rank, so each launch has enough sequences to fill the GPU.
    """
    bands: dict[tuple[int, int, int], list] = {}
    for p, launches in enumerate(parts):
        for x in launches:
            bands.setdefault((x.layer, x.left, x.right), []).append((p, x))
    out = []
    for (layer, left, right), group in sorted(bands.items(), key=lambda kv: kv[0][0]):
        q_runs = [(p * q_rows + x.q_span[0], x.q_span[1] - x.q_span[0]) if x.q_span else None for p, x in group]
        k_runs = [(p * k_rows + x.k_span[0], x.k_span[1] - x.k_span[0]) if x.k_span else None for p, x in group]
        cu_q, cu_k = [0], [0]
        for _, x in group:
            cu_q += (x.cu_q[1:].long() + cu_q[-1]).tolist()
            cu_k += (x.cu_k[1:].long() + cu_k[-1]).tolist()
        out.append(Launch(torch.cat([x.q_rows + p * q_rows for p, x in group]),
                          torch.cat([x.k_rows + p * k_rows for p, x in group]),
                          torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
                          max(x.max_q for _, x in group), max(x.max_k for _, x in group), left, right,
                          None if None in q_runs else _span(q_runs), None if None in k_runs else _span(k_runs),
                          layer))
    return out


def _span(runs: list[tuple[int, int]]) -> Rows | None:
    """``[start, stop)`` where the ``(start, length)`` runs follow one another with no gap, else None."""
    for (a, n), (b, _) in zip(runs, runs[1:]):
        if b != a + n:
            return None
    return runs[0][0], runs[-1][0] + runs[-1][1]


def _take(x: Tensor, rows: Tensor, span: Rows | None) -> Tensor:
    """A launch's rows of a flattened block: a slice where they are one run, else a gather."""
    return x[span[0]:span[1]] if span is not None else x[rows]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def reference_varlen(qp: Tensor, kp: Tensor, vp: Tensor, launch: Launch, scale: float) -> tuple[Tensor, Tensor]:
    """The variable-length kernel's definition (module docstring) in float64 einsums, on a launch's packed rows
    (``t h d``): ``(out t h d, lse t h)`` — what the tests hold :func:`pieces` to, in place of the CUDA kernel."""
    outs, lses = [], []
    for s in range(launch.cu_q.numel() - 1):
        q = qp[launch.cu_q[s]:launch.cu_q[s + 1]].double()
        k = kp[launch.cu_k[s]:launch.cu_k[s + 1]].double()
        v = vp[launch.cu_k[s]:launch.cu_k[s + 1]].double()
        a = torch.arange(q.shape[0])[:, None] + (k.shape[0] - q.shape[0])
        b = torch.arange(k.shape[0])[None, :]
        ok = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool)
        if launch.left >= 0:
            ok &= b >= a - launch.left
        if launch.right >= 0:
            ok &= b <= a + launch.right
        scores = (torch.einsum("ihd,jhd->hij", q, k) * scale).masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.einsum("hij,jhd->ihd", torch.exp(scores - lse[..., None]).nan_to_num(0.0), v))
        lses.append(lse.T)
    return torch.cat(outs), torch.cat(lses)


def _flash(qp: Tensor, kp: Tensor, vp: Tensor, launch: Launch, scale: float) -> tuple[Tensor, Tensor]:
    """One launch on the CUDA kernel: ``(out t h d, lse t h)``."""
    res = torch.ops.aten._flash_attention_forward(
        qp, kp, vp, launch.cu_q, launch.cu_k, launch.max_q, launch.max_k, 0.0, False, False, scale=scale,
        window_size_left=launch.left, window_size_right=launch.right)
    return res[0], _lse_rows(res[1], launch)


def _lse_rows(lse: Tensor, launch: Launch) -> Tensor:
    """The kernel's lse as ``t h`` (packed rows): it gives ``h t`` (unpadded) or ``s h max_q`` (padded)."""
    if lse.dim() == 2:
        return lse.transpose(0, 1)
    lengths = (launch.cu_q[1:] - launch.cu_q[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=lse.device), lengths)
    local = torch.arange(seq.numel(), device=lse.device) - launch.cu_q[:-1].long()[seq]
    return lse[seq, :, local]


def _lse_kernel(lse_rows: Tensor, launch: Launch, like: Tensor) -> Tensor:
    """``t h`` rows in the layout the kernel gave (``like``): the inverse of :func:`_lse_rows`."""
    if like.dim() == 2:
        return lse_rows.transpose(0, 1).contiguous()
    lengths = (launch.cu_q[1:] - launch.cu_q[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=lse_rows.device), lengths)
    local = torch.arange(seq.numel(), device=lse_rows.device) - launch.cu_q[:-1].long()[seq]
    out = torch.zeros_like(like)
    out[seq, :, local] = lse_rows
    return out


_PROBE: dict = {}  # per device: the kernel's lse layout and the (unused, dropout 0) random-state tensors


def _probe(device: torch.device) -> dict:
    """One tiny launch, once per device: how the kernel lays out its lse and what its backward takes for the
    random state (dropout is 0, so nothing reads it)."""
    if device not in _PROBE:
        x = torch.randn(4, 1, 64, device=device, dtype=torch.bfloat16)
        cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
        res = torch.ops.aten._flash_attention_forward(x, x, x, cu, cu, 4, 4, 0.0, False, False, scale=0.125)
        _PROBE[device] = {"lse": res[1], "rng_state": res[2], "unused": res[3]}
    return _PROBE[device]


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, launches: list[Launch], *, scale: float,
                   kernel: Callable[..., tuple[Tensor, Tensor]] = _flash) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of a masked block (``b i h d``, ``b h i``) from its launches; k/v have q's heads (expanded
    by the caller). ``out`` is the kernel's own (input dtype) where one launch covers every row, else float32
    for half precision; lse float32. ``kernel``: the CUDA kernel, or :func:`reference_varlen` (the tests)."""
    out = lse = None
    for layer in sorted({x.layer for x in launches}) or [0]:  # keys of a document in several runs: merged layers
        part = _one_layer(q, k, v, [x for x in launches if x.layer == layer], scale, kernel)
        out, lse = part if out is None else merge_partials(out, lse, *part)
    return out, lse


def _one_layer(q: Tensor, k: Tensor, v: Tensor, launches: list[Launch], scale: float,
               kernel: Callable[..., tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """:func:`varlen_forward` of launches that hold each query row at most once (one layer)."""
    b, i, h, d = q.shape
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    if len(launches) == 1 and launches[0].q_span == (0, b * i):  # one launch over every row: its result is the block's
        launch = launches[0]
        o, s = kernel(qf, _take(kf, launch.k_rows, launch.k_span), _take(vf, launch.k_rows, launch.k_span), launch,
                      scale)
        return o.view(b, i, h, d), s.view(b, i, h).transpose(1, 2)
    work = compute_dtype(q.dtype)
    out = torch.zeros(b * i, h, d, dtype=work, device=q.device)
    lse = torch.full((b * i, h), float("-inf"), dtype=work, device=q.device)
    for launch in launches:
        o, s = kernel(_take(qf, launch.q_rows, launch.q_span), _take(kf, launch.k_rows, launch.k_span),
                      _take(vf, launch.k_rows, launch.k_span), launch, scale)
        if launch.q_span is not None:
            out[launch.q_span[0]:launch.q_span[1]] = o
            lse[launch.q_span[0]:launch.q_span[1]] = s
        else:
            out.index_copy_(0, launch.q_rows, o.to(work))
            lse.index_copy_(0, launch.q_rows, s.to(work))
    return out.view(b, i, h, d), lse.view(b, i, h).transpose(1, 2)


def varlen_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                    launches: list[Launch], *, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` (float32) of a masked block given its rows of the global out and lse, from the CUDA
    kernel's backward; k/v have q's heads."""
    b, i, h, d = q.shape
    probe = _probe(q.device)
    qf, kf, vf, of, gf = _flat(q), _flat(k), _flat(v), _flat(out.to(q.dtype)), _flat(dout.to(q.dtype))
    lf = lse.transpose(1, 2).reshape(b * i, h).float()
    dq = torch.zeros(qf.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(kf.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(vf.shape, dtype=torch.float32, device=q.device)
    for launch in launches:
        like = probe["lse"] if probe["lse"].dim() == 2 else probe["lse"].new_empty(
            (launch.cu_q.numel() - 1, h, launch.max_q))
        qs, ks = launch.q_span, launch.k_span
        g = torch.ops.aten._flash_attention_backward(
            _take(gf, launch.q_rows, qs), _take(qf, launch.q_rows, qs), _take(kf, launch.k_rows, ks),
            _take(vf, launch.k_rows, ks), _take(of, launch.q_rows, qs),
            _lse_kernel(_take(lf, launch.q_rows, qs), launch, like), launch.cu_q, launch.cu_k, launch.max_q,
            launch.max_k, 0.0, False, probe["rng_state"], probe["unused"], scale=scale, window_size_left=launch.left,
            window_size_right=launch.right)
        for acc, grad, rows, span in ((dq, g[0], launch.q_rows, qs), (dk, g[1], launch.k_rows, ks),
                                      (dv, g[2], launch.k_rows, ks)):
            if span is not None:
                acc[span[0]:span[1]] += grad
            else:
                acc.index_add_(0, rows, grad.float())
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
