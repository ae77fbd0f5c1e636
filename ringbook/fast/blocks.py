"""Block kinds: what one kernel call of a ring step reads, runs and writes back.

A :class:`Block` of the engine's plan (:mod:`ringbook.fast.engine`) is two
things, each of which brings its own code, so that the engine's loops never
ask what kind of block they hold:

* **where** its rows are — a :class:`Place`: :class:`Box` (a range of batch
  rows × a range of sequence rows of the query side and of the held K/V), or
  a gather of dilated rows (:class:`ringbook.fast.dilated.Gather`). A place
  takes its rows out of the engine's tensors (``take_q``, ``take_kv``,
  ``take_lse``), *folds* a result into the float32 accumulators (a box is held
  and merged in groups; a gather writes or merges its own rows) and *adds*
  its gradients into dq, dK and dV;
* **which kernel** it runs — a :class:`Kernel`: :data:`FULL` (every key seen),
  :data:`CAUSAL` (the kernels' top-left mask: a diagonal block), or
  :class:`Positions` (a causal mask by token positions, which the fused
  kernels cannot express: the einops path), :class:`Masked` (a block a
  document or window boundary cuts: FlashAttention's variable-length kernel
  on CUDA, the einops path elsewhere) and :class:`MaskedRanks` (the masked
  blocks of neighbouring ranks of one step, launched together). A kernel
  brings its forward and its backward.

Each block also says how much work it is (:meth:`Block.scores`: the
(query, key) pairs whose score is computed, heads included), so a plan's work
per step is data (:meth:`ringbook.fast.engine.Plan.work`).

Shapes: q/out/dout ``b n h d``, k/v ``b n h_kv d``, lse/delta ``b h n``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from ..online_softmax import KEY_CHUNK, attend_block, attend_block_backward
from . import varlen
from .kernels import block_attention_backward, expand_kv, forward_block, reduce_kv
from .merge import merge_into_torch_

Rows = tuple[int, int]  # [start, stop)
ALL = None  # a Box's batch rows: all of them


# --------------------------------------------------------------------------- kernels

class Kernel:
    """Which attention a block computes on the rows its place takes. Subclasses bring forward and backward.

    ``needs_delta``: its backward always takes ``delta = D − dlse`` of its
    rows (the einops path); other kernels get it only when the fused backward
    ops are not used.
    """

    needs_delta = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` of the block's queries against its keys."""
        raise NotImplementedError

    def backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, *,
                 delta: Tensor | None, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(dq, dk, dv)`` of the block, given the *global* out and lse of its query rows."""
        raise NotImplementedError

    def visible(self, n_q: int, n_k: int) -> int:
        """(query, key) pairs of an ``n_q × n_k`` block whose score is computed (per head and batch row)."""
        raise NotImplementedError

    def scores(self, copies: int, n_q: int, n_k: int) -> int:
        """The pairs computed over ``copies`` (batch rows × heads) of an ``n_q × n_k`` block."""
        return copies * self.visible(n_q, n_k)


@dataclasses.dataclass(frozen=True)
class Full(Kernel):
    """Every key seen by every query (``causal=False``), or, in :class:`Causal`, the top-left mask."""

    causal = False

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, backend: str) -> tuple[Tensor, Tensor]:
        return forward_block(q, k, v, scale=scale, causal=self.causal, backend=backend)

    def backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, *,
                 delta: Tensor | None, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        return block_attention_backward(q, k, v, out, lse, dout, scale=scale, causal=self.causal, delta=delta,
                                        backend=backend)

    def visible(self, n_q: int, n_k: int) -> int:
        return n_q * n_k


@dataclasses.dataclass(frozen=True)
class Causal(Full):
    """A diagonal block: query i sees keys 0…i (the fused kernels' top-left causal mask)."""

    causal = True

    def visible(self, n_q: int, n_k: int) -> int:
        m = min(n_q, n_k)
        return m * (m + 1) // 2 + (n_q - m) * n_k


FULL = Full()
CAUSAL = Causal()


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds tensors
class Positions(Kernel):
    """A causal block whose mask is given by token positions: key j seen by query i iff ``k_pos[j] ≤ q_pos[i]``.

    Striped blocks from a later rank are such blocks: no top-left mask
    expresses them, so they run on the einops path
    (:func:`~ringbook.online_softmax.attend_block`), keys ``KEY_CHUNK`` at a time.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    needs_delta = True

    def on(self, device: torch.device | str) -> Positions:
        """The same kernel with its positions on ``device``."""
        return Positions(self.q_pos.to(device), self.k_pos.to(device))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, backend: str) -> tuple[Tensor, Tensor]:
        h = q.shape[2]
        return attend_block(q, expand_kv(k, h), expand_kv(v, h), scale=scale, causal=True, q_pos=self.q_pos,
                            k_pos=self.k_pos, chunk=KEY_CHUNK)

    def backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, *,
                 delta: Tensor | None, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        h, hk = q.shape[2], k.shape[2]
        dq, dk, dv = attend_block_backward(q, expand_kv(k, h), expand_kv(v, h), out, lse, dout, scale=scale,
                                           causal=True, q_pos=self.q_pos, k_pos=self.k_pos, delta=delta,
                                           chunk=KEY_CHUNK)
        return dq, reduce_kv(dk, hk), reduce_kv(dv, hk)

    def visible(self, n_q: int, n_k: int) -> int:
        keys = torch.sort(self.k_pos.cpu()).values
        return int(torch.searchsorted(keys, self.q_pos.cpu(), right=True).sum())


def fused_ok(q: Tensor, backend: str) -> bool:
    """Whether the fused variable-length kernel takes these rows: CUDA, half precision, a head size it runs,
    ``backend`` not einops."""
    return backend != "einops" and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) \
        and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds tensors
class Masked(Kernel):
    """A block cut by a document or window boundary (:mod:`ringbook.masks`): its mask from the rows' token
    positions (``q_pos``, ``k_pos``), document ids (``q_doc`` ``b i``, ``k_doc`` ``b j``; None: one document)
    and ``window``, causal or not. On CUDA in half precision: the fused variable-length kernel, one launch
    per band (:mod:`ringbook.fast.varlen`: exact, with the lse; its backward takes the global out and lse);
    elsewhere, or where a document's keys sit in two runs of the block, the einops path
    (:func:`~ringbook.online_softmax.attend_block`), keys ``KEY_CHUNK`` at a time. Full blocks keep the
    fused kernels and empty ones are never planned.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    causal: bool
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    window: int | None = None
    needs_delta = True

    def _mask(self) -> dict:
        return dict(causal=self.causal, q_pos=self.q_pos, k_pos=self.k_pos, q_doc=self.q_doc, k_doc=self.k_doc,
                    window=self.window)

    _cache: dict = dataclasses.field(default_factory=dict, repr=False)  # launches per (batch rows, device)

    def launches(self, batch: int, device: torch.device | str = "cpu") -> list | None:
        """The block over ``batch`` batch rows as variable-length launches (:func:`ringbook.fast.varlen.pieces`;
        the documents' rows must match, or be one row shared by all), on ``device``; None where they cannot
        express it. Built once per (batch, device)."""
        key = (batch, str(device))
        if key not in self._cache:
            q_doc, k_doc = self.q_doc, self.k_doc
            if q_doc is not None and q_doc.shape[0] != batch:
                q_doc, k_doc = q_doc.expand(batch, -1), k_doc.expand(batch, -1)
            found = varlen.pieces(self.q_pos, self.k_pos, causal=self.causal, q_doc=q_doc, k_doc=k_doc,
                                  window=self.window, batch=batch)
            self._cache[key] = None if found is None else [x.to(device) for x in found]
        return self._cache[key]

    def _fused(self, q: Tensor, backend: str) -> list | None:
        """The launches where the fused variable-length kernel runs this block (CUDA, half precision, a head
        size it takes, ``backend`` not einops), else None."""
        if not fused_ok(q, backend):
            return None
        return self.launches(q.shape[0], q.device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, backend: str) -> tuple[Tensor, Tensor]:
        h = q.shape[2]
        launches = self._fused(q, backend)
        if launches is not None:
            return varlen.varlen_forward(q, expand_kv(k, h), expand_kv(v, h), launches, scale=scale)
        return attend_block(q, expand_kv(k, h), expand_kv(v, h), scale=scale, chunk=KEY_CHUNK, **self._mask())

    def backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, *,
                 delta: Tensor | None, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        h, hk = q.shape[2], k.shape[2]
        launches = self._fused(q, backend)
        if launches is not None:
            dq, dk, dv = varlen.varlen_backward(q, expand_kv(k, h), expand_kv(v, h), out, lse, dout, launches,
                                                scale=scale)
            return dq, reduce_kv(dk, hk), reduce_kv(dv, hk)
        dq, dk, dv = attend_block_backward(q, expand_kv(k, h), expand_kv(v, h), out, lse, dout, scale=scale,
                                           delta=delta, chunk=KEY_CHUNK, **self._mask())
        return dq, reduce_kv(dk, hk), reduce_kv(dv, hk)

    def visible(self, n_q: int, n_k: int) -> int:
        from ..masks import keep

        seen = keep(self.q_pos.cpu(), self.k_pos.cpu(), causal=self.causal, window=self.window,
                    q_doc=None if self.q_doc is None else self.q_doc[:1].cpu(),
                    k_doc=None if self.k_doc is None else self.k_doc[:1].cpu())
        return n_q * n_k if seen is None else int(seen.sum())


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds tensors
class MaskedRanks(Kernel):
    """Masked blocks of consecutive ranks of one ring step, stacked along the batch (one process): ``parts[p]``
    is rank ``r0 + p``'s :class:`Masked` block, its rows batch rows ``[p·b, (p+1)·b)`` of the stack.

    On the fused path their variable-length launches are stacked (:func:`ringbook.fast.varlen.stack`): one
    launch per band for every rank at once, each with enough sequences to fill the GPU, where a launch per
    rank would leave it idle between small ones. Elsewhere (or where a part cannot run fused) each part runs
    its own kernel on its rows.
    """

    parts: tuple[Masked, ...]
    needs_delta = True
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)  # stacked launches per (shapes, device)

    def _stacked(self, q: Tensor, k: Tensor, backend: str) -> list | None:
        """The stacked launches where every part runs fused, else None."""
        if not fused_ok(q, backend):
            return None
        p = len(self.parts)
        b, i, j = q.shape[0] // p, q.shape[1], k.shape[1]
        key = (b, i, j, str(q.device))
        if key not in self._cache:
            per = [x.launches(b) for x in self.parts]
            self._cache[key] = None if None in per else [x.to(q.device) for x in varlen.stack(per, b * i, b * j)]
        return self._cache[key]

    def _split(self, *xs: Tensor) -> list[tuple[Tensor, ...]]:
        return list(zip(*(x.chunk(len(self.parts)) for x in xs)))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, backend: str) -> tuple[Tensor, Tensor]:
        launches = self._stacked(q, k, backend)
        if launches is not None:
            h = q.shape[2]
            return varlen.varlen_forward(q, expand_kv(k, h), expand_kv(v, h), launches, scale=scale)
        res = [part.forward(*xs, scale=scale, backend=backend) for part, xs in zip(self.parts, self._split(q, k, v))]
        work = functools.reduce(torch.promote_types, (r[0].dtype for r in res))  # fused parts: input dtype
        return torch.cat([r[0].to(work) for r in res]), torch.cat([r[1] for r in res])

    def backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, *,
                 delta: Tensor | None, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        launches = self._stacked(q, k, backend)
        if launches is not None:
            h, hk = q.shape[2], k.shape[2]
            dq, dk, dv = varlen.varlen_backward(q, expand_kv(k, h), expand_kv(v, h), out, lse, dout, launches,
                                                scale=scale)
            return dq, reduce_kv(dk, hk), reduce_kv(dv, hk)
        xs = self._split(q, k, v, out, lse, dout, *(() if delta is None else (delta,)))
        res = [part.backward(*x[:6], delta=None if delta is None else x[6], scale=scale, backend=backend)
               for part, x in zip(self.parts, xs)]
        return tuple(torch.cat([r[i] for r in res]) for i in range(3))

    def visible(self, n_q: int, n_k: int) -> int:
        """Per batch row, averaged over the parts (:meth:`scores` counts each part's own)."""
        return sum(p.visible(n_q, n_k) for p in self.parts) // len(self.parts)

    def scores(self, copies: int, n_q: int, n_k: int) -> int:
        return copies // len(self.parts) * sum(p.visible(n_q, n_k) for p in self.parts)


# --------------------------------------------------------------------------- places

class Place:
    """Where a block's rows are: how it takes them, folds its result and adds its gradients (module docstring).

    ``in_groups``: its results are held and folded into the accumulators in
    groups (:meth:`Accumulator.hold`); a plan whose places all do may let its
    first fold set the accumulators.
    """

    in_groups = False

    def take_q(self, x: torch.Tensor) -> torch.Tensor:
        """The block's query rows of a query-side tensor (q, out, dout: ``b n h d``)."""
        raise NotImplementedError

    def take_kv(self, x: torch.Tensor) -> torch.Tensor:
        """The block's key rows of a K/V-side tensor (k, v: ``b n h_kv d``)."""
        raise NotImplementedError

    def take_lse(self, x: torch.Tensor) -> torch.Tensor:
        """The block's query rows of a row statistic (lse, delta: ``b h n``)."""
        raise NotImplementedError

    def fold(self, acc: Any, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Fold the block's ``(out, lse)`` into the engine's accumulators ``acc``."""
        raise NotImplementedError

    def add(self, grads: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """Add the block's gradients into the engine's gradient sums ``grads``."""
        raise NotImplementedError

    def whole(self, q: torch.Tensor) -> bool:
        """Whether the block's query rows are every row of ``q`` (one such block's result is the answer)."""
        return False

    def shape(self, batch: int, heads: int) -> tuple[int, int, int]:
        """``(copies, n_q, n_k)``: the block is ``copies`` (batch rows × heads) attention problems of n_q × n_k."""
        raise NotImplementedError


def _span(rows: Rows | None, size: int) -> tuple[int, int]:
    return (0, size) if rows is ALL else rows


@dataclasses.dataclass(frozen=True)
class Box(Place):
    """Row ranges: batch rows ``q_batch`` × sequence rows ``q`` of the queries, ``kv_batch`` × ``kv`` of the held K/V.

    ``q_batch``/``kv_batch`` :data:`ALL` (None): every batch row (a rank of a
    process group); a range: ranks stacked in the batch (one process).
    """

    q: Rows
    kv: Rows
    q_batch: Rows | None = ALL
    kv_batch: Rows | None = ALL
    in_groups = True

    def _rows(self, x: torch.Tensor, batch: Rows | None, rows: Rows, dim: int) -> torch.Tensor:
        b0, b1 = _span(batch, x.shape[0])
        return x[b0:b1, rows[0]:rows[1]] if dim == 1 else x[b0:b1, :, rows[0]:rows[1]]

    def take_q(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(x, self.q_batch, self.q, 1)

    def take_kv(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(x, self.kv_batch, self.kv, 1)

    def take_lse(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(x, self.q_batch, self.q, 2)

    def q_box(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        """``(b0, b1, n0, n1)`` of the query rows in ``x``'s batch (the merge's box)."""
        return (*_span(self.q_batch, x.shape[0]), *self.q)

    def kv_box(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        return (*_span(self.kv_batch, x.shape[0]), *self.kv)

    def fold(self, acc: Any, out: torch.Tensor, lse: torch.Tensor) -> None:
        acc.hold(self.q_box(acc.out), out, lse)

    def add(self, grads: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
        grads.hold(self.q_box(grads.dq), dq, self.kv_box(grads.dk), dk, dv)

    def whole(self, q: torch.Tensor) -> bool:
        return _span(self.q_batch, q.shape[0]) == (0, q.shape[0]) and self.q == (0, q.shape[1])

    def shape(self, batch: int, heads: int) -> tuple[int, int, int]:
        b0, b1 = _span(self.q_batch, batch)
        return (b1 - b0) * heads, self.q[1] - self.q[0], self.kv[1] - self.kv[0]


@dataclasses.dataclass(frozen=True)
class Block:
    """One kernel call of a ring step: where its rows are (``at``) and which kernel runs on them."""

    at: Place
    kernel: Kernel = FULL

    def scores(self, batch: int, heads: int) -> int:
        """The (query, key) scores this call computes, over its batch rows and heads (4·d FLOPs each forward)."""
        copies, n_q, n_k = self.at.shape(batch, heads)
        return self.kernel.scores(copies, n_q, n_k)


# --------------------------------------------------------------------------- dilated rows: gathered blocks

@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds index tensors
class Gather(Place):
    """Dilated rows of segments: which rows a gathered block reads and writes (:mod:`ringbook.fast.dilated`).

    ``count`` segments of pair ``(seg, r)`` start at row ``q_at`` of the
    query-side tensors (q, out, lse, dout, dq) and at row ``kv_at`` of the
    K/V-side tensors (k, v, dk, dv). Inside each segment the block takes
    dilated rows ``q_rows`` of the queries and ``kv_rows`` of the keys
    (``(0, seg // r)``: all of them; a part only with ``count == 1``, as a
    rank's piece of a spanning segment). Head ``j`` of the block is q head
    ``q_heads[j]`` at offset ``offsets[j]``; K/V slot ``u`` is kv head
    ``kv_heads[u]`` at offset ``kv_offsets[u]``, serving q heads
    ``j·G/U … (j+1)·G/U − 1``. ``first``: no earlier block wrote these
    accumulator rows (a plain write, no merge).
    """

    seg: int
    r: int
    q_heads: torch.Tensor
    offsets: torch.Tensor
    kv_heads: torch.Tensor
    kv_offsets: torch.Tensor
    q_at: int
    kv_at: int
    count: int
    q_rows: Rows
    kv_rows: Rows
    first: bool = True
    kv_unique: bool = True  # every K/V slot a different (offset, kv head)

    def _view(self, x: torch.Tensor, at: int, rows: Rows) -> torch.Tensor:
        """``x`` (``b n h …``) at this block's segments as ``b count m r h …`` (only the dilated rows ``rows``)."""
        m = self.seg // self.r
        if rows == (0, m):
            part = x[:, at:at + self.count * self.seg]
            return part.unflatten(1, (self.count, m, self.r))
        if self.count != 1:
            raise ValueError(f"a gathered block over part of its segments' rows must hold one segment, got "
                             f"count={self.count}")
        part = x[:, at + rows[0] * self.r:at + rows[1] * self.r]
        return part.unflatten(1, (1, rows[1] - rows[0], self.r))

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return self._view(x, self.q_at, self.q_rows)[:, :, :, self.offsets, self.q_heads]

    def take_q(self, x: torch.Tensor) -> torch.Tensor:
        """Dilated query rows of ``x`` (q, out or dout, ``b n h d``) as ``(b·count) m_q G d``."""
        return self._q(x).flatten(0, 1)

    def take_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Dilated key rows of ``x`` (k or v, ``b n h_kv d``) as ``(b·count) m_k U d``."""
        return self._view(x, self.kv_at, self.kv_rows)[:, :, :, self.kv_offsets, self.kv_heads].flatten(0, 1)

    def take_lse(self, x: torch.Tensor) -> torch.Tensor:
        """Dilated query rows of a ``b h n`` row statistic (lse, delta) as ``(b·count) G m_q``."""
        got = self._q(x.transpose(1, 2))
        return rearrange(got, "b s m g -> (b s) g m").contiguous()

    def put(self, acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Write (``first``) or merge (equation (M)) a block result into the accumulators' rows."""
        b = acc_out.shape[0]
        view_o = self._view(acc_out, self.q_at, self.q_rows)
        view_l = self._view(acc_lse.transpose(1, 2), self.q_at, self.q_rows)
        out = rearrange(out, "(b s) m g d -> b s m g d", b=b)
        lse = rearrange(lse, "(b s) g m -> b s m g", b=b)
        index = (slice(None),) * 3 + (self.offsets, self.q_heads)
        if not self.first:
            cur_o, cur_l = view_o[index], view_l[index]
            merge_into_torch_(cur_o.flatten(0, 1), rearrange(cur_l, "b s m g -> (b s) g m"), out.flatten(0, 1),
                              rearrange(lse, "b s m g -> (b s) g m"))
            out, lse = cur_o, cur_l  # merged in place (the views of cur_* above)
        view_o[index] = out.to(acc_out.dtype)
        view_l[index] = lse.to(acc_lse.dtype)

    def fold(self, acc: Any, out: torch.Tensor, lse: torch.Tensor) -> None:
        acc.write(functools.partial(self._put_result, out, lse))

    def _put_result(self, out, lse, acc_out, acc_lse) -> None:
        self.put(acc_out, acc_lse, out, lse)

    def add(self, grads: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
        grads.run(functools.partial(self._add_all, dq, dk, dv), dq, dk, dv)

    def _add_all(self, gq, gk, gv, dq, dk, dv) -> None:
        self.add_q(dq, gq)
        self.add_kv(dk, gk)
        self.add_kv(dv, gv)

    def shape(self, batch: int, heads: int) -> tuple[int, int, int]:
        return batch * self.count * self.q_heads.numel(), self.q_rows[1] - self.q_rows[0], \
            self.kv_rows[1] - self.kv_rows[0]

    def add_q(self, acc: torch.Tensor, grad: torch.Tensor) -> None:
        """``acc`` (dq, ``b n h d``) += a block's query gradient at its rows."""
        view = self._view(acc, self.q_at, self.q_rows)
        view[:, :, :, self.offsets, self.q_heads] += rearrange(grad, "(b s) m g d -> b s m g d", b=acc.shape[0])

    def add_kv(self, acc: torch.Tensor, grad: torch.Tensor) -> None:
        """``acc`` (dk or dv, ``b n h_kv d``) += a block's key/value gradient at its rows.

        Where K/V were gathered per q head (unequal slots) a row appears in
        several slots, and the adds accumulate.
        """
        view = self._view(acc, self.kv_at, self.kv_rows)
        grad = rearrange(grad, "(b s) m u d -> b s m u d", b=acc.shape[0])
        if self.kv_unique:
            view[:, :, :, self.kv_offsets, self.kv_heads] += grad
        else:
            view.permute(3, 4, 0, 1, 2, 5).index_put_((self.kv_offsets, self.kv_heads),
                                                      rearrange(grad, "b s m u d -> u b s m d").to(acc.dtype),
                                                      accumulate=True)


def head_slots(heads: Sequence[int], offsets: Sequence[int], kv_group: int) -> tuple[tuple, tuple, tuple, tuple]:
    """Order a block's heads by K/V slot: ``(q_heads, offsets, kv_heads, kv_offsets)`` (module docstring).

    ``kv_group = h / h_kv``. Q heads sharing an (offset, kv head) slot come
    together, slot after slot; when the slots serve unequal numbers of q
    heads every q head gets its own slot (K/V gathered per q head).
    """
    slots: dict[tuple[int, int], list[int]] = {}
    for h, o in zip(heads, offsets):
        slots.setdefault((o, h // kv_group), []).append(h)
    if len({len(hs) for hs in slots.values()}) == 1:
        q_heads = tuple(h for hs in slots.values() for h in hs)
        offs = tuple(o for (o, _), hs in slots.items() for _ in hs)
        return q_heads, offs, tuple(kv for _, kv in slots), tuple(o for o, _ in slots)
    heads, offsets = tuple(heads), tuple(offsets)
    return heads, offsets, tuple(h // kv_group for h in heads), offsets


def gather_spec(seg: int, r: int, slots: tuple, *, q_at: int, kv_at: int, count: int, q_rows: Rows, kv_rows: Rows,
                first: bool, device: torch.device | str) -> Gather:
    """A :class:`Gather` with its head indices on ``device``."""
    q_heads, offs, kv_heads, kv_offs = (torch.tensor(x, dtype=torch.long, device=device) for x in slots)
    unique = len(set(zip(slots[2], slots[3]))) == len(slots[2])
    return Gather(seg, r, q_heads, offs, kv_heads, kv_offs, q_at, kv_at, count, q_rows, kv_rows, first, unique)


def gathered_block(spec: Gather, *, causal: bool) -> Block:
    """The engine block of a gather: its dilated rows, top-left causal (a segment's diagonal) or full."""
    return Block(spec, CAUSAL if causal else FULL)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds index tensors
class Strided(Place):
    """The kept rows of one offset in one piece of a segment: every ``r``-th row, of some heads.

    A rank's piece of a spanning segment whose ends do not fall on a
    multiple of the rate (a rate that does not divide the shard length)
    keeps different dilated rows for different offsets, so one
    :class:`Gather` over its heads does not exist; one strided block per
    offset does. Queries: rows ``q_start, q_start + r, …`` (``n_q`` of them)
    of the query-side tensors, heads ``q_heads``; keys: rows ``kv_start, …``
    (``n_k``) of the K/V-side tensors, kv heads ``kv_heads`` (one per q head,
    or one per group of q heads sharing it: ``kv_heads`` then has
    ``len(q_heads) / group`` entries). ``first``: no earlier block wrote
    these accumulator rows.
    """

    r: int
    q_start: int
    n_q: int
    kv_start: int
    n_k: int
    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    first: bool = True

    def _q_rows(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        stop = self.q_start + (self.n_q - 1) * self.r + 1
        return x[:, self.q_start:stop:self.r] if dim == 1 else x[:, :, self.q_start:stop:self.r]

    def _kv_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.kv_start:self.kv_start + (self.n_k - 1) * self.r + 1:self.r]

    def take_q(self, x: torch.Tensor) -> torch.Tensor:
        return self._q_rows(x).index_select(2, self.q_heads)

    def take_kv(self, x: torch.Tensor) -> torch.Tensor:
        return self._kv_rows(x).index_select(2, self.kv_heads)

    def take_lse(self, x: torch.Tensor) -> torch.Tensor:
        return self._q_rows(x, dim=2).index_select(1, self.q_heads).contiguous()

    def fold(self, acc: Any, out: torch.Tensor, lse: torch.Tensor) -> None:
        acc.write(functools.partial(self._put, out, lse))

    def _put(self, out, lse, acc_out, acc_lse) -> None:
        view_o, view_l = self._q_rows(acc_out), self._q_rows(acc_lse, dim=2)
        out, lse = out.to(acc_out.dtype), lse.to(acc_lse.dtype)
        if not self.first:
            cur_o, cur_l = view_o.index_select(2, self.q_heads), view_l.index_select(1, self.q_heads)
            merge_into_torch_(cur_o, cur_l, out, lse)
            out, lse = cur_o, cur_l
        view_o.index_copy_(2, self.q_heads, out)
        view_l.index_copy_(1, self.q_heads, lse)

    def add(self, grads: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
        grads.run(functools.partial(self._add_all, dq, dk, dv), dq, dk, dv)

    def _add_all(self, gq, gk, gv, dq, dk, dv) -> None:
        self._q_rows(dq).index_add_(2, self.q_heads, gq.to(dq.dtype))
        self._kv_rows(dk).index_add_(2, self.kv_heads, gk.to(dk.dtype))  # repeated kv heads accumulate
        self._kv_rows(dv).index_add_(2, self.kv_heads, gv.to(dv.dtype))

    def shape(self, batch: int, heads: int) -> tuple[int, int, int]:
        return batch * self.q_heads.numel(), self.n_q, self.n_k


def box(q: Rows, kv: Rows, *, q_batch: Rows | None = ALL, kv_batch: Rows | None = ALL,
        kernel: Kernel = FULL) -> Block:
    """A block over row ranges (:class:`Box`) running ``kernel``."""
    return Block(Box(q, kv, q_batch, kv_batch), kernel)
