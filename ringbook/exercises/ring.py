"""Exercises of notebook 02 (ring attention), in increasing difficulty.

The ring loop (``toy_ring_attention``), the zigzag positions, which causal
blocks the contiguous layout skips, the kind of any block of any layout
(full, causal or skip), the ring backward (dQ stays, dK/dV travel, the final
hop) and the overlap threshold of double buffering. Toy shapes are one head
without batch: q, k, v ``(n, d)``, lse ``(n,)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..demo import ring_step_seconds
from ..naive import naive_attention
from ..schedule import LAYOUTS, layout_pieces, layout_positions, ring_schedule
from ._core import _as_bool, _close, _gen, _pair, _run, _same_bool, _same_integers


def _naive_2d(q, k, v, causal=False):
    out, lse = naive_attention(q[None, :, None], k[None, :, None], v[None, :, None], causal=causal)
    return out[0, :, 0], lse[0, 0]


def check_toy_ring_attention(fn: Callable) -> bool | None:
    """``fn(q, k, v, w) -> (out, lse)``: w ranks played in turn, one head, no mask; q, k, v ``(n, d)``.

    Rank r keeps queries ``r·c … (r+1)·c − 1`` (``c = n / w``) and starts
    with the K/V shard of the same tokens; at each of ``w`` steps every rank
    attends its queries to the shard it holds, merges by (M), and passes the
    shard to rank ``r + 1``. The result is compared with naive attention.
    """
    g = _gen(3)
    cases = []
    for label, n, w, scale in (("n = 24 over 4 ranks", 24, 4, 1.0), ("one rank (w = 1)", 6, 1, 1.0),
                               ("one token a rank (c = 1)", 3, 3, 1.0), ("logits scaled by 100", 12, 3, 10.0)):
        q, k, v = (torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(3))
        q = q * scale
        cases.append((label, (q, k, v, w), _naive_2d(q, k, v),
                      lambda got, want: _pair(got) is not None and _close(_pair(got)[0], want[0])
                      and _close(_pair(got)[1], want[1])))

    def hint(c):
        if _pair(c["got"]) is None:
            return "return the whole sequence's (out, lse): the ranks' pieces put back in token order"
        return ("each rank must meet every K/V shard exactly once: does the shard a rank holds change between "
                "steps? and is each block merged with (M), weighted by its lse, not averaged?")
    return _run("toy_ring_attention", fn, cases, hint)


def check_zigzag_positions(fn: Callable) -> bool | None:
    """``fn(n, world, rank) -> positions``: the token positions rank ``rank`` holds in the zigzag layout, in order."""
    cases = []
    for n, w in ((8, 2), (12, 3), (16, 4), (4, 1), (2, 1)):
        ref = layout_positions(n, w, "zigzag")
        for rank in range(w):
            cases.append((f"n={n}, world={w}, rank {rank}", (n, w, rank), ref[rank].long(), _same_integers))
    return _run("zigzag_positions", fn, cases, lambda c: (
        "zigzag cuts the sequence into 2·world chunks and every rank holds two of them, one early and one late: "
        "which pair makes every rank's causal work the same? (the picture above shows it for world = 4; positions "
        "are whole numbers)"))


def check_causal_skip(fn: Callable) -> bool | None:
    """``fn(rank, step, world) -> bool``: whether, causal and contiguous, rank ``rank`` skips its block at ``step``.

    At step t rank r holds the K/V shard of rank (r − t) mod w. A block is
    skipped when every key comes after every query. A Python, numpy or
    one-element torch bool is accepted.
    """
    cases = []
    for w in (1, 2, 3, 5):
        sched = ring_schedule(8 * w, w, layout="contiguous", causal=True)
        for t in range(w):
            for r in range(w):
                cases.append((f"world={w}, step {t}, rank {r}", (r, t, w), sched[t][r].work == 0, _same_bool))

    def hint(c):
        if _as_bool(c["got"]) is None:
            return "return True (skipped) or False (computed)"
        if c["args"][1] == 0:
            return "step 0 is the diagonal (the rank's own shard, half masked): it is never skipped"
        return "which rank's shard does rank r hold at step t? its keys all come after r's queries when it is a later rank"
    return _run("causal_skip", fn, cases, hint)


KINDS = ("full", "causal", "skip")


def _kind(q_pos: torch.Tensor, k_pos: torch.Tensor) -> str:
    if k_pos.max() <= q_pos.min():
        return "full"
    if k_pos.min() > q_pos.max():
        return "skip"
    return "causal"


def check_classify_block(fn: Callable) -> bool | None:
    """``fn(q_pos, k_pos) -> "full" | "causal" | "skip"``: a causal block's kind, for any layout.

    ``q_pos`` and ``k_pos`` are the token positions (LongTensors, in any order)
    of a block's queries and keys: "full" when every key is at or before every
    query (no mask needed), "skip" when every key is after every query
    (nothing to compute), "causal" otherwise (the mask is needed). The cases
    are every block of every step of ``ringbook.ring_schedule`` for the three
    layouts, plus shuffled positions.
    """
    cases, seen = [], set()
    for layout in LAYOUTS:
        for w in (1, 2, 3, 4):
            n = 4 * w
            pieces = [[torch.arange(a, b, w) if layout == "striped" else torch.arange(a, b) for a, b in p]
                      for p in layout_pieces(n, w, layout)]
            for t in range(w):
                for r in range(w):
                    for qp in pieces[r]:
                        for kp in pieces[(r - t) % w]:
                            key = (tuple(qp.tolist()), tuple(kp.tolist()))
                            if key not in seen:
                                seen.add(key)
                                cases.append((f"{layout}, world={w}, step {t}, rank {r}", (qp, kp), _kind(qp, kp)))
    g = _gen(4)
    for _ in range(6):  # positions in no particular order
        qp, kp = torch.randperm(10, generator=g)[:3], torch.randperm(10, generator=g)[:3]
        cases.append(("positions in no order", (qp, kp), _kind(qp, kp)))
    cases.append(("one query and the same key (the diagonal)", (torch.tensor([5]), torch.tensor([5])), "full"))
    cases = [(label, args, want, lambda got, want: isinstance(got, str) and got == want)
             for label, args, want in cases]

    def hint(c):
        if c["got"] not in KINDS:
            return 'return one of the strings "full", "causal", "skip"'
        return ("compare extremes, not single entries: which key is the latest and which query the earliest? "
                "a key at the same position as a query is visible")
    return _run("classify_block", fn, cases, hint)


def block_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block ``(dq, dk, dv)``, one head, no mask: shapes ``(i, d)``, ``(j, d)``, lse ``(i,)``.

    ``out`` and ``lse`` are the *final* ones of the query rows (over every key),
    so ``P = e^{S − lse}`` are the global probabilities and the blocks' ``dq``
    add up (the FlashAttention backward; notebook 01, §6).
    """
    scale = q.shape[-1] ** -0.5
    p = torch.exp(q @ k.T * scale - lse[:, None])
    dv = p.T @ dout
    ds = p * (dout @ v.T - (dout * out).sum(dim=1, keepdim=True))
    return scale * ds @ k, scale * ds.T @ q, dv


def check_toy_ring_backward(fn: Callable) -> bool | None:
    """``fn(q, k, v, out, lse, dout, w) -> (dq, dk, dv)``: the ring backward, w ranks played in turn.

    Rank r keeps its queries, ``out``, ``lse``, ``dout`` and its ``dq``; the
    K/V shards travel round the ring as in the forward, and with each shard
    travel its dK/dV partial sums; after the last step one more hop brings
    each dK/dV to the rank that owns the shard. ``block_backward`` gives one
    block's gradients. Compared with autograd through naive attention.
    """
    g = _gen(5)
    cases = []
    for label, n, w in (("n = 12 over 3 ranks", 12, 3), ("one rank (w = 1)", 4, 1), ("n = 16 over 4 ranks", 16, 4),
                        ("one token a rank (c = 1)", 2, 2)):
        q, k, v, dout = (torch.randn(n, 3, generator=g, dtype=torch.float64) for _ in range(4))
        qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
        out, lse = _naive_2d(qr, kr, vr)
        (out * dout).sum().backward()
        cases.append((label, (q, k, v, out.detach(), lse.detach(), dout, w), (qr.grad, kr.grad, vr.grad),
                      lambda got, want: isinstance(got, (tuple, list)) and len(got) == 3
                      and all(_close(a, b) for a, b in zip(got, want))))

    def hint(c):
        got, want = c["got"], c["want"]
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            return "return the whole sequence's (dq, dk, dv), each (n, d), in token order"
        w, n = c["args"][6], c["args"][0].shape[0]
        cc = n // w
        if _close(got[0], want[0]) and not _close(got[1], want[1]):
            shifted = [torch.roll(x, cc * s, dims=0) for s in (1, -1) for x in (got[1],)]
            if any(_close(x, want[1]) for x in shifted):
                return ("dk is right but on the wrong rank: after the last step, whose shard does each rank hold? "
                        "the final hop brings each dK/dV home")
            return "a shard's dK/dV must collect the contribution of every rank's queries as it travels round the ring"
        return "dq stays home and sums the contributions of every K/V shard the rank meets"
    return _run("toy_ring_backward", fn, cases, hint)


def check_overlap_threshold(fn: Callable) -> bool | None:
    """``fn(flops_per_s, bytes_per_s, elem_bytes, causal) -> tokens``: the smallest shard length that hides the transfer.

    Forward pass, one step, as in notebook 02 §6: a block of ``c`` queries and
    ``c`` keys costs ``4·b·h·c²·d`` FLOPs (half of it causal, zigzag); the
    next K/V shard is ``2·b·c·h·d`` elements of ``elem_bytes``. Return ``c``
    where compute time equals transfer time (a float; b, h, d cancel).
    """
    cases = []
    dtypes = {2: torch.bfloat16, 4: torch.float32, 1: torch.float8_e4m3fn}
    for label, f, b, e, causal in (("H100 bf16 over NVLink, no mask", 700e12, 450e9, 2, False),
                                   ("H100 bf16 over NVLink, causal zigzag", 700e12, 450e9, 2, True),
                                   ("bf16 over InfiniBand 50 GB/s, causal", 700e12, 50e9, 2, True),
                                   ("float32 at 60 TFLOP/s over PCIe 25 GB/s", 60e12, 25e9, 4, False),
                                   ("fp8 at 1.5 PFLOP/s over 900 GB/s, causal", 1.5e15, 900e9, 1, True)):
        want = ring_step_seconds(1024, flops_per_s=f, bytes_per_s=b, dtype=dtypes[e], causal=causal)["threshold"]
        cases.append((label, (f, b, e, causal), want,
                      lambda got, want: isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-6)))

    def hint(c):
        got, want = c["got"], c["want"]
        if isinstance(got, (int, float)) and got and math.isclose(want / got, 2, rel_tol=1e-6):
            return ("too small by 2: did you count both K and V in the bytes, and half the FLOPs of a causal "
                    "(zigzag) step?")
        return ("write compute time and transfer time of one step as functions of c (b, h, d cancel) and solve for "
                "the c where they are equal; a causal zigzag step computes half the scores for the same bytes")
    return _run("overlap_threshold", fn, cases, hint)
