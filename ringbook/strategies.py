"""Beyond the ring: all-gather, Ulysses and their hybrid with the ring, in one process (notebook 06).

Four ways to spread attention over ``w`` ranks that each hold ``c = n / w``
tokens, with ``h`` query heads, ``g`` kv heads, head dim ``d`` and ``e`` bytes
per element (forward bytes one rank sends; ``g'`` below):

* **ring** (pass K/V, :mod:`ringbook.ring`): ``w − 1`` hops of one K/V shard,
  ``2·c·g·d·e`` bytes each.
* **all-gather** (Llama 3): every rank receives every K/V shard,
  ``(w−1)/w · 2·n·g·d·e``, then attends its own queries to all keys.
* **Ulysses** (DeepSpeed-Ulysses): an all-to-all turns sequence shards into
  head shards (rank r gets every token of heads ``r·h/w … (r+1)·h/w − 1``),
  each rank attends its heads over the whole sequence, a second all-to-all
  brings the output back: ``(w−1)/w · c·d·e·(2h + 2g')`` plus the lse.
* **USP** (hybrid ``u × r``, ``w = u·r``): Ulysses inside groups of ``u``
  consecutive ranks, the ring across the ``r`` groups with K/V blocks of
  ``2·(n/r)·(g'/u)·d·e`` bytes per hop.

Grouped-query attention: q head i reads kv head ``i // (h/g)``. Ulysses over
``u`` ranks needs every rank's q heads to read its own kv heads, so kv heads
are replicated to ``g' = lcm(g, u)`` first (as DeepSpeed's ALST does); that is
``max(g, u)`` whenever one divides the other (powers of two). Replication
costs ``(g'/g − 1)`` times the K/V bytes of the all-to-all and of the ring
hops, and as much K/V memory per rank.

:func:`strategy_schedule` is the communication of each strategy as plain
data: per step, the messages (sender, receiver, bytes, what) and the blocks
each rank computes (:class:`ringbook.schedule.Step` objects). The one-process
forms :func:`allgather_attention`, :func:`ulysses_attention` and
:func:`usp_attention` compute those blocks and, given a :class:`Wire`,
record every message they hand from one rank to another, so tests can hold
the schedule against what was moved. Shapes: q/k/v ``b n h d``, lse ``b h n``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from einops import rearrange, repeat

from ._utils import check_bool, check_positive_int, check_qkv, compute_dtype, resolve_scale
from .masks import check_document_ids, check_window
from .online_softmax import KEY_CHUNK, attend_block
from .ring import _merge_rows
from .schedule import LAYOUTS, Step, check_layout, gathered_rows, layout_positions, ring_schedule

STRATEGIES = ("ring", "allgather", "ulysses", "usp")


# --------------------------------------------------------------------------- the schedule as data

@dataclasses.dataclass(frozen=True)
class Message:
    """``nbytes`` sent by rank ``src`` to rank ``dst``: ``what`` is "q", "K/V", "out", "lse", "dout", "dlse",
    "dq" or "dK/dV" (K and V, or their gradients, travel together)."""

    src: int
    dst: int
    nbytes: int
    what: str


@dataclasses.dataclass(frozen=True)
class Work:
    """The blocks ``rank`` computes in one step, for query heads ``heads`` (a range).

    ``steps`` are :class:`ringbook.schedule.Step` objects of
    ``ring_schedule(n, shards, layout=layout, causal=...)``: query shard
    ``step.rank`` against key shard ``step.kv_rank`` of that deal of the
    tokens, with its (full, causal) blocks; skipped blocks are not computed.
    """

    rank: int
    heads: tuple[int, int]
    steps: tuple[Step, ...]
    shards: int
    layout: str

    @property
    def scores(self) -> int:
        """Scores computed per batch row: tile areas (a causal tile counts whole) times heads."""
        return sum(s.work for s in self.steps) * (self.heads[1] - self.heads[0])


@dataclasses.dataclass(frozen=True)
class CommStep:
    """One step of a strategy: the collective in flight, its messages, and what each rank computes meanwhile.

    ``collective`` is "p2p", "all-gather", "all-to-all", "reduce-scatter" or
    "" (compute only); ``work`` has one entry per rank that computes.
    """

    phase: str  # "forward" or "backward"
    step: int
    collective: str
    messages: tuple[Message, ...]
    work: tuple[Work, ...]


def lcm_heads(kv_heads: int, ulysses_size: int) -> int:
    """``g'``: kv heads after replication for Ulysses over ``ulysses_size`` ranks, ``lcm(g, u)``."""
    return kv_heads * ulysses_size // math.gcd(kv_heads, ulysses_size)


def check_split(n: int, heads: int, kv_heads: int, ring_size: int, ulysses_size: int, layout: str) -> None:
    """Raise ValueError (naming the argument and what would work) unless ``u × (w/u)`` fits the problem."""
    w = check_positive_int(ring_size, "ring_size")
    u = check_positive_int(ulysses_size, "ulysses_size")
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}; choose kv_heads among "
                         f"{[x for x in range(1, heads + 1) if heads % x == 0]}")
    fits = [x for x in range(1, w + 1) if w % x == 0 and heads % x == 0]
    if w % u:
        raise ValueError(f"ulysses_size={u} must divide ring_size={w} (the ring runs across ring_size/ulysses_size "
                         f"groups of ulysses_size ranks); ulysses sizes that work with {heads} heads: {fits}")
    if heads % u:
        what = "ring_size" if u == w else "ulysses_size"
        works = [x for x in range(1, heads + 1) if heads % x == 0] if u == w else fits
        raise ValueError(f"{what}={u} does not divide the {heads} query heads: Ulysses gives each of its ranks "
                         f"heads/{what} whole heads; {what} values that work: {works}")
    r = w // u
    check_layout(n, r, layout)
    if (n // r) % u:
        raise ValueError(f"ring_size={w} does not fit sequence length {n}: every rank holds n/ring_size tokens, "
                         f"so ring_size must divide {n}; ring sizes that work: {[x for x in range(1, 65) if n % x == 0]}")


def _hybrid_groups(w: int, u: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(ulysses_groups, ring_groups)``: rank ``i·u + j`` is member j of Ulysses group i and i of ring group j."""
    r = w // u
    return [[i * u + j for j in range(u)] for i in range(r)], [[i * u + j for i in range(r)] for j in range(u)]


def hybrid_groups(ring_size: int, ulysses_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The hybrid's layout: ``(ulysses_groups, ring_groups)`` as lists of ranks.

    Ulysses groups are ``ulysses_size`` consecutive ranks (fast links inside a
    node); ring group j holds member j of every Ulysses group.
    """
    w, u = check_positive_int(ring_size, "ring_size"), check_positive_int(ulysses_size, "ulysses_size")
    if w % u:
        raise ValueError(f"ulysses_size={u} must divide ring_size={w}; choose among "
                         f"{[x for x in range(1, w + 1) if w % x == 0]}")
    return _hybrid_groups(w, u)


def head_split(heads: int, kv_heads: int, ulysses_size: int) -> list[tuple[list[int], list[int]]]:
    """Per Ulysses rank: ``(q_heads, kv_heads)`` it attends, kv heads in the original numbering (repeats = replicas).

    Rank j gets q heads ``j·h/u … (j+1)·h/u − 1`` and replicated kv heads
    ``j·g'/u … (j+1)·g'/u − 1`` of ``g' = lcm(g, u)``, replica ``x`` being
    original head ``x // (g'/g)``.
    """
    check_split(ulysses_size, heads, kv_heads, ulysses_size, ulysses_size, "contiguous")
    u, gp = ulysses_size, lcm_heads(kv_heads, ulysses_size)
    hq, hk = heads // u, gp // u
    return [(list(range(j * hq, (j + 1) * hq)), [x // (gp // kv_heads) for x in range(j * hk, (j + 1) * hk)])
            for j in range(u)]


def _alltoall(phase: str, step: int, groups, parts: dict[str, int]) -> CommStep:
    """An all-to-all inside each group: every member sends every other member ``parts[what]`` bytes of each."""
    msgs = tuple(Message(s, t, nb, what) for grp in groups for s in grp for t in grp if s != t
                 for what, nb in parts.items() if nb)
    return CommStep(phase, step, "all-to-all", msgs, ())


def _needed_steps(sched) -> int:
    """Steps up to the last one any rank computes something at (a mask can leave the last hops unneeded)."""
    return max([t + 1 for t, row in enumerate(sched) if any(st.blocks for st in row)] + [1])


def _ring_steps(phase: str, first: int, n: int, w: int, u: int, layout: str, causal: bool, kv_bytes: int,
                grad_bytes: int, heads: int, masks: dict) -> list[CommStep]:
    """The ring across ``w/u`` groups: K/V (and in the backward dK/dV, then home) to the next group; only the
    steps some rank needs (documents and a window can leave the last ones empty)."""
    r = w // u
    sched = ring_schedule(n, r, layout=layout, causal=causal, **masks)
    steps = _needed_steps(sched)
    ulysses_groups, _ = _hybrid_groups(w, u)
    hq = heads // u
    out = []
    for t in range(steps):
        msgs = []
        for i in range(r):
            for j in range(u):
                src, dst = ulysses_groups[i][j], ulysses_groups[(i + 1) % r][j]
                if t < steps - 1:
                    msgs.append(Message(src, dst, kv_bytes, "K/V"))
                if phase == "backward" and r > 1 and (t < steps - 1 or t > 0):  # the last: home to the owner
                    home = ulysses_groups[(i - t) % r][j] if t == steps - 1 else dst
                    msgs.append(Message(src, home, grad_bytes, "dK/dV"))
        work = tuple(Work(ulysses_groups[i][j], (j * hq, (j + 1) * hq), (sched[t][i],), r, layout)
                     for i in range(r) for j in range(u))
        out.append(CommStep(phase, first + t, "p2p" if msgs else "", tuple(msgs), work))
    return out


def strategy_schedule(strategy: str, n: int, ring_size: int, *, heads: int, kv_heads: int, head_dim: int,
                      dtype_bytes: int, causal: bool = False, layout: str = "contiguous",
                      ulysses_size: int | None = None, batch: int = 1, backward: bool = False,
                      document_ids: torch.Tensor | None = None, window: int | None = None) -> list[CommStep]:
    """Who sends how many bytes to whom at each step, and which blocks each rank computes. Plain data.

    Args:
        strategy: ``"ring"``, ``"allgather"``, ``"ulysses"`` or ``"usp"``.
        n: tokens; ring_size: ranks ``w``; heads, kv_heads: ``h`` and ``g``
            (grouped-query attention: ``g`` divides ``h``); head_dim ``d``;
            dtype_bytes ``e``: bytes per element of q, k, v (2 for bf16).
        causal, layout: the mask and how tokens are dealt to the ring's ranks
            (ring, all-gather, the ring part of USP; Ulysses deals contiguously).
        ulysses_size: ``u`` for ``"usp"`` (required there, refused elsewhere).
        batch: batch rows; every byte count is proportional to it.
        backward: append the backward's steps (phase ``"backward"``).
        document_ids, window: packed documents and a sliding window
            (:mod:`ringbook.masks`): blocks no query sees are not computed and
            the ring's hops nobody needs are not sent.

    Returns:
        A list of :class:`CommStep`, forward first. Each has ``messages``
        (:class:`Message`: ``src``, ``dst``, ``nbytes``, ``what``) and
        ``work`` (:class:`Work`: the rank, its query heads, the
        :class:`~ringbook.schedule.Step` blocks it computes). Per strategy:

        * ring: ``w`` p2p steps (K/V to rank r+1 after each but the last);
          backward ``w`` steps moving K/V again and dK/dV every step (the last
          hop brings them home), as ``ringbook.distributed.ring_attention``.
        * allgather: an all-gather step (K/V, with the own diagonal block
          computed meanwhile), then a compute step; backward: all-gather
          again, compute, then reduce-scatter of dK/dV.
        * ulysses: all-to-all of q and K/V (kv heads replicated to
          ``lcm(g, w)`` first), a compute step, all-to-all of out and lse;
          backward: all-to-all of dout and dlse, compute, all-to-all of dq
          and dK/dV (summed over replicas on arrival).
        * usp: the Ulysses all-to-alls inside groups of ``u`` consecutive
          ranks around the ring's steps across the ``w/u`` groups.

        Gradients that ranks sum (the ring's and all-gather's dK/dV) travel
        in the accumulator dtype (float32 for 2-byte input); Ulysses' are a
        permutation and travel in the input dtype; lse in the accumulator
        dtype. Steps with nothing to send or compute are left out.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for value, name in ((n, "n"), (heads, "heads"), (kv_heads, "kv_heads"), (head_dim, "head_dim"),
                        (dtype_bytes, "dtype_bytes"), (batch, "batch")):
        check_positive_int(value, name)
    causal, backward = check_bool(causal, "causal"), check_bool(backward, "backward")
    w = check_positive_int(ring_size, "ring_size")
    if strategy == "usp":
        if ulysses_size is None:
            raise ValueError("strategy='usp' needs ulysses_size (the ranks of one Ulysses group), a divisor of "
                             f"ring_size={w}")
        u = check_positive_int(ulysses_size, "ulysses_size")
    elif ulysses_size is not None:
        raise ValueError(f"ulysses_size is for strategy='usp' only, got ulysses_size={ulysses_size} with "
                         f"strategy={strategy!r}")
    else:
        u = {"ring": 1, "allgather": 1, "ulysses": w}[strategy]
    if strategy == "ulysses":
        layout = "contiguous"
    check_split(n, heads, kv_heads, w, u, layout)
    e, a = dtype_bytes, max(dtype_bytes, 4)  # input and accumulator bytes per element
    c, g, d = n // w, kv_heads, head_dim
    masks = {"document_ids": document_ids, "window": window}
    if strategy == "allgather":  # each shard's rows that anyone reads: its last min(c, W − 1) under a causal window
        rows = gathered_rows(n, w, layout=layout, causal=bool(causal), window=check_window(window))
        return _allgather_schedule(n, w, rows * g * d * batch, heads, causal, layout, e, a, backward, masks)
    gp = lcm_heads(g, u)
    r = w // u
    ulysses_groups, _ = _hybrid_groups(w, u)
    # per message of the all-to-all: this rank's c tokens of the receiver's heads
    q_part, kv_part = batch * c * (heads // u) * d, 2 * batch * c * (gp // u) * d
    lse_part = batch * c * (heads // u)
    kv_hop = 2 * batch * (n // r) * (gp // u) * d  # the ring part: a group's chunk of the member's kv heads
    steps = []
    for phase in ("forward", "backward") if backward else ("forward",):
        fwd = phase == "forward"
        into = {"q": q_part * e, "K/V": kv_part * e} if fwd else {"dout": q_part * e, "dlse": lse_part * a}
        back = {"out": q_part * e, "lse": lse_part * a} if fwd else {"dq": q_part * e, "dK/dV": kv_part * e}
        first = int(u > 1)  # the all-to-all in, if any, is step 0
        if u > 1:
            steps.append(_alltoall(phase, 0, ulysses_groups, into))
        ring = _ring_steps(phase, first, n, w, u, layout, causal, kv_hop * e, kv_hop * a, heads, masks)
        steps += ring
        if u > 1:
            steps.append(_alltoall(phase, first + len(ring), ulysses_groups, back))
    return steps


def _allgather_schedule(n, w, kv_elems, heads, causal, layout, e, a, backward, masks) -> list[CommStep]:
    """All-gather K/V (own diagonal block meanwhile), attend the rest; backward also reduce-scatters dK/dV."""
    sched = ring_schedule(n, w, layout=layout, causal=causal, **masks)
    everyone = [(s, t) for s in range(w) for t in range(w) if s != t and kv_elems]  # nothing to gather: no message
    gather = tuple(Message(s, t, 2 * kv_elems * e, "K/V") for s, t in everyone)
    diag = tuple(Work(r, (0, heads), (sched[0][r],), w, layout) for r in range(w))
    rest = tuple(Work(r, (0, heads), tuple(sched[t][r] for t in range(1, w)), w, layout) for r in range(w))
    steps = []
    for phase in ("forward", "backward") if backward else ("forward",):
        steps.append(CommStep(phase, 0, "all-gather" if w > 1 else "", gather, diag))
        if w > 1:
            steps.append(CommStep(phase, 1, "", (), rest))
            if phase == "backward":  # rank t sends rank s its partial dK/dV of s's shard
                steps.append(CommStep(phase, 2, "reduce-scatter",
                                      tuple(Message(t, s, 2 * kv_elems * a, "dK/dV") for s, t in everyone), ()))
    return steps


def bytes_sent(schedule: Sequence[CommStep], ring_size: int, *, phase: str | None = None,
               what: Sequence[str] | None = None) -> list[int]:
    """Bytes each rank sends over a schedule (one phase, some kinds of message, or all)."""
    total = [0] * ring_size
    for st in schedule:
        if phase is None or st.phase == phase:
            for m in st.messages:
                if what is None or m.what in what:
                    total[m.src] += m.nbytes
    return total


# --------------------------------------------------------------------------- the one-process forms

class Wire:
    """What the one-process forms hand from rank to rank: ``log`` of ``(phase, src, dst, what, nbytes)``.

    A message's bytes are its elements times the *input* dtype's element size
    (what a rank would send; the forms compute in the accumulator dtype).
    """

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, str, int]] = []

    def send(self, src: int, dst: int, what: str, elem_bytes: int, *tensors: torch.Tensor) -> None:
        if src != dst:
            self.log.append(("forward", src, dst, what, sum(x.numel() for x in tensors) * elem_bytes))


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """kv heads repeated to ``heads`` (query head i reads kv head ``i // (heads/g)``)."""
    return repeat(x, "b n g d -> b n (g r) d", r=heads // x.shape[2])


def _attend(work: Work, q_of: Callable, kv_of: Callable, acc: dict, scale: float, masks: tuple = (False, None, None)
            ) -> None:
    """Compute a :class:`Work`'s blocks and fold each into ``acc[query shard]`` with equation (M).

    ``masks = (causal, document ids b n or None, window or None)``: a ``"masked"`` block (a document or window
    boundary cuts it) is attended with all of them."""
    causal, docs, window = masks
    for step in work.steps:
        q, q_pos = q_of(step.rank)
        k, v, k_pos = kv_of(step.kv_rank)
        out, lse = acc[step.rank]
        for blk in step.blocks:
            (qa, qb), (ka, kb) = blk.q, blk.kv
            qp, kp, cut = q_pos[qa:qb], k_pos[ka:kb], blk.kind == "masked"
            part = attend_block(q[:, qa:qb], _expand(k[:, ka:kb], q.shape[2]), _expand(v[:, ka:kb], q.shape[2]),
                                scale=scale, causal=blk.kind == "causal" or (cut and causal), q_pos=qp, k_pos=kp,
                                chunk=KEY_CHUNK, q_doc=docs[:, qp] if cut and docs is not None else None,
                                k_doc=docs[:, kp] if cut and docs is not None else None,
                                window=window if cut else None)
            out, lse = _merge_rows(out, lse, blk.q, *part)
        acc[step.rank] = (out, lse)


def _check(q, k, v, causal, scale, ring_size, layout):
    check_qkv(q, k, v, allow_gqa=True)
    causal = check_bool(causal, "causal")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"context parallelism shards q and k/v alike, so they need the same sequence length; got "
                         f"seq_q={q.shape[1]} and seq_k={k.shape[1]}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_positive_int(ring_size, "ring_size")
    return causal, resolve_scale(scale, q.shape[3])


def _masks(document_ids, window, b: int, n: int, causal: bool, device) -> tuple[dict, tuple]:
    """Checked documents and window: the keyword arguments of the schedule, and ``_attend``'s ``masks``."""
    window = check_window(window)
    ids = check_document_ids(document_ids, b, n)
    return ({"document_ids": ids, "window": window},
            (causal, None if ids is None else ids.to(device), window))


def _empty(q, c, heads):
    b, d = q.shape[0], q.shape[3]
    work = compute_dtype(q.dtype)
    return (torch.zeros(b, c, heads, d, dtype=work, device=q.device),
            torch.full((b, heads, c), float("-inf"), dtype=work, device=q.device))


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ring_size: int, causal: bool = False,
                        layout: str = "contiguous", scale: float | None = None,
                        wire: Wire | None = None, document_ids: torch.Tensor | None = None,
                        window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with K/V all-gathered over ``ring_size`` ranks played in one process. Returns ``(out, lse)``.

    Rank r holds the tokens ``layout_positions(n, w, layout)[r]``; every
    rank receives every other rank's K/V shard, ``(w−1)/w · 2·n·g·d·e`` bytes
    per rank (under a causal window on contiguous shards only each shard's
    last ``min(c, W − 1)`` rows: :func:`ringbook.schedule.gathered_rows`),
    then attends its queries to all keys (causal by token position,
    blocks no query sees skipped; zigzag balances that work). k/v may have
    fewer heads than q. ``wire`` records the messages. ``document_ids`` and
    ``window``: as :func:`ringbook.naive_attention` (blocks they empty are
    skipped). Returns out ``b n h d`` and lse ``b h n`` in the original token
    order, equal to :func:`ringbook.naive_attention`; twice differentiable
    (plain autograd).
    """
    causal, scale = _check(q, k, v, causal, scale, ring_size, layout)
    b, n, h, d = q.shape
    masks, docs = _masks(document_ids, window, b, n, causal, q.device)
    check_split(n, h, k.shape[2], ring_size, 1, layout)
    w, work, e = ring_size, compute_dtype(q.dtype), q.element_size()
    pos = layout_positions(n, w, layout).to(q.device)
    order = rearrange(pos, "w c -> (w c)")
    q_sh, k_sh, v_sh = (rearrange(x.to(work)[:, order], "b (w c) h d -> w b c h d", w=w) for x in (q, k, v))
    rows = gathered_rows(n, w, layout=layout, causal=causal, window=masks["window"])
    for s in range(w):  # the all-gather: shard s to every rank (its last `rows`: all that any rank reads of it)
        for t in range(w):
            if wire is not None and rows:
                wire.send(s, t, "K/V", e, k_sh[s][:, n // w - rows:], v_sh[s][:, n // w - rows:])
    acc = {rank: _empty(q, n // w, h) for rank in range(w)}  # rank r's running (out, lse)
    for st in strategy_schedule("allgather", n, w, heads=h, kv_heads=k.shape[2], head_dim=d, dtype_bytes=e,
                                causal=causal, layout=layout, batch=b, **masks):
        for wk in st.work:  # every rank holds every shard now: shard s is k_sh[s]
            _attend(wk, lambda i: (q_sh[i], pos[i]), lambda s: (k_sh[s], v_sh[s], pos[s]), acc, scale, docs)
    inverse = torch.argsort(order)
    out = rearrange(torch.stack([acc[r][0] for r in range(w)]), "w b c h d -> b (w c) h d")[:, inverse]
    lse = rearrange(torch.stack([acc[r][1] for r in range(w)]), "w b h c -> b h (w c)")[:, :, inverse]
    return out.to(q.dtype), lse.to(work)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ring_size: int, ulysses_size: int,
                  causal: bool = False, layout: str = "contiguous", scale: float | None = None,
                  wire: Wire | None = None, document_ids: torch.Tensor | None = None,
                  window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses inside groups of ``ulysses_size`` consecutive ranks, the ring across the groups. Returns ``(out, lse)``.

    With ``u = ulysses_size`` and ``r = ring_size / u`` groups: the layout
    deals the tokens to the ``r`` groups (ring chunk i has
    ``layout_positions(n, r, layout)[i]``), and member j of group i holds the
    j-th ``n/w`` of that chunk. (1) All-to-all inside each group: member j
    receives its group's chunk for query heads ``j·h/u … (j+1)·h/u − 1`` and
    replicated kv heads ``j·g'/u …`` (``g' = lcm(g, u)``); (2) the ring of
    :mod:`ringbook.ring` across the groups, member j of each group with
    member j of the next, over ``r`` steps of :func:`ringbook.ring_schedule`;
    (3) all-to-all of out and lse back. ``u = 1`` is the ring, ``u = w`` is
    Ulysses. A split that does not fit (``u`` not dividing ``ring_size`` or
    the heads) raises ValueError naming the argument and the values that
    work. ``wire`` records the messages. ``document_ids`` and ``window``: as
    :func:`ringbook.naive_attention` (blocks they empty are skipped, and the
    ring's hops nobody needs are not sent). Equal to
    :func:`ringbook.naive_attention`; twice differentiable.
    """
    causal, scale = _check(q, k, v, causal, scale, ring_size, layout)
    b, n, h, d = q.shape
    g = k.shape[2]
    masks, docs = _masks(document_ids, window, b, n, causal, q.device)
    check_split(n, h, g, ring_size, ulysses_size, layout)
    w, u = ring_size, ulysses_size
    r, gp, dtype, work, e = w // u, lcm_heads(g, u), q.dtype, compute_dtype(q.dtype), q.element_size()
    groups, _ = _hybrid_groups(w, u)
    pos = layout_positions(n, r, layout).to(q.device)  # r, n/r: the ring chunks
    order = rearrange(pos, "r m -> (r m)")
    # one cast before the deal (gradients summed in the accumulator dtype), then kv heads replicated to g'
    q, k, v = q.to(work), *(repeat(x.to(work), "b n g d -> b n (g x) d", x=gp // g) for x in (k, v))
    # rank i·u + j holds tokens [j·c, (j+1)·c) of chunk i; cut its heads into the u receivers' slices
    q_sh, k_sh, v_sh = (rearrange(x[:, order], "b (i j c) (t hh) d -> i j t b c hh d", i=r, j=u, t=u)
                        for x in (q, k, v))
    # (1) all-to-all in each group: member j gathers its heads' slice of the group's chunk
    for i in range(r):
        for s in range(u):
            for t in range(u):
                if wire is not None:
                    wire.send(groups[i][s], groups[i][t], "q", e, q_sh[i, s, t])
                    wire.send(groups[i][s], groups[i][t], "K/V", e, k_sh[i, s, t], v_sh[i, s, t])
    q_hd, k_hd, v_hd = (rearrange(x, "i s t b c hh d -> i t b (s c) hh d") for x in (q_sh, k_sh, v_sh))
    # (2) the ring across groups, one ring per member index j; K/V move group i → i+1 after each step
    acc = {(i, j): _empty(q, n // r, h // u) for i in range(r) for j in range(u)}
    held = [[i for _ in range(u)] for i in range(r)]  # held[i][j]: the chunk member j of group i holds
    for st in strategy_schedule("usp", n, w, heads=h, kv_heads=g, head_dim=d, dtype_bytes=e, causal=causal,
                                layout=layout, ulysses_size=u, batch=b, **masks):
        if st.collective == "all-to-all":
            continue
        for wk in st.work:
            i, j = divmod(wk.rank, u)
            assert all(s.kv_rank == held[i][j] for s in wk.steps), "the ring's shards moved off schedule"
            sub = {i: acc[i, j]}
            _attend(wk, lambda x, j=j: (q_hd[x, j], pos[x]), lambda x, j=j: (k_hd[x, j], v_hd[x, j], pos[x]), sub,
                    scale, docs)
            acc[i, j] = sub[i]
        for m in st.messages:  # K/V of the chunk each member holds to the same member of the next group
            i, j = divmod(m.src, u)
            if wire is not None:
                wire.send(m.src, m.dst, "K/V", e, k_hd[held[i][j], j], v_hd[held[i][j], j])
        if st.messages:
            held = [held[(i - 1) % r] for i in range(r)]
    # (3) all-to-all back: member j returns token slice s of its heads to member s
    out_hd = torch.stack([torch.stack([acc[i, j][0] for j in range(u)]) for i in range(r)])  # i j b m hh d
    lse_hd = torch.stack([torch.stack([acc[i, j][1] for j in range(u)]) for i in range(r)])  # i j b hh m
    out_sh = rearrange(out_hd, "i t b (s c) hh d -> i s t b c hh d", s=u)
    lse_sh = rearrange(lse_hd, "i t b hh (s c) -> i s t b hh c", s=u)
    for i in range(r):
        for s in range(u):
            for t in range(u):
                if wire is not None:
                    wire.send(groups[i][t], groups[i][s], "out", e, out_sh[i, s, t])
                    wire.send(groups[i][t], groups[i][s], "lse", max(e, 4), lse_sh[i, s, t])
    inverse = torch.argsort(order)
    out = rearrange(out_sh, "i s t b c hh d -> b (i s c) (t hh) d")[:, inverse]
    lse = rearrange(lse_sh, "i s t b hh c -> b (t hh) (i s c)")[:, :, inverse]
    return out.to(dtype), lse.to(work)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ring_size: int, causal: bool = False,
                      scale: float | None = None, wire: Wire | None = None, document_ids: torch.Tensor | None = None,
                      window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention by DeepSpeed-Ulysses over ``ring_size`` ranks in one process. Returns ``(out, lse)``.

    Rank r holds tokens ``[r·c, (r+1)·c)``, ``c = n / w``. An all-to-all
    re-shards from sequence to heads: rank r receives every token of query
    heads ``r·h/w … (r+1)·h/w − 1`` and of their kv heads; it attends them
    over the whole sequence (any mask works: it has every key), and a second
    all-to-all brings out and lse back to the sequence shards. Bytes per
    rank: ``(w−1)/w · c·d·e·(2h + 2g')`` plus the lse.

    The head count must be divisible by ``ring_size`` (ValueError listing the
    ring sizes that work). With fewer kv heads than ranks (or a count that
    does not split evenly) kv heads are replicated to ``g' = lcm(g, w)``
    before the all-to-all, as DeepSpeed's ALST does: K/V then cost
    ``g'/g`` times their bytes on the wire and in memory (``g = 1``, ``w = 8``:
    8×), which takes back much of what GQA saved. It is :func:`usp_attention`
    with ``ulysses_size = ring_size``. Equal to :func:`ringbook.naive_attention`;
    twice differentiable.
    """
    return usp_attention(q, k, v, ring_size=ring_size, ulysses_size=ring_size, causal=causal, layout="contiguous",
                         document_ids=document_ids, window=window,
                         scale=scale, wire=wire)
