"""Packed documents and sliding windows: which keys a query sees, and which blocks that leaves to compute.

Two masks join the causal one, in every attention of ringbook:

* ``document_ids`` — a ``b n`` integer tensor, non-decreasing along the
  sequence: token i belongs to document ``document_ids[:, i]``. A query sees
  only keys of its own document (and, with ``causal``, only those at or
  before it). Packed sequences are written this way rather than as
  ``cu_seqlens`` because one tensor per batch row says it for every row at
  once and is what a mask needs token by token;
  :func:`document_ids_from_cu_seqlens` converts.
* ``window`` — an int ``W ≥ 1``: with ``causal`` a query at position i sees
  keys j with ``i − W < j ≤ i`` (itself and the ``W − 1`` before it); without,
  the window is symmetric, ``|i − j| < W``.

A row that sees no key gets out 0 and lse −inf, as everywhere.

:func:`keep` is the mask of a block, by token positions; :func:`classify` says
without forming it whether a block is ``"full"`` (every pair seen),
``"empty"`` (none: never computed) or partial (``"causal"`` when only the
causal mask cuts it, ``"masked"`` when a document or window boundary does).
The schedule (:func:`ringbook.schedule.ring_schedule`) and the engine's plans
classify every block so; a step with no block left on any rank is dropped,
and a hop nobody needs is not sent.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import numpy as np
import torch
from einops import rearrange

__all__ = ["MaskSpec", "check_document_ids", "check_window", "classify", "document_ids_from_cu_seqlens", "keep",
           "mask_spec", "visible_keys", "visible_pairs"]


def check_window(window: int | None) -> int | None:
    """``window`` as an int ≥ 1, or None; refused by name otherwise."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be a positive int (tokens a query sees) or None, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be at least 1 (a query sees itself and window − 1 keys before it), got {window}")
    return int(window)


def check_document_ids(document_ids: torch.Tensor | None, batch: int, n: int) -> torch.Tensor | None:
    """``document_ids`` as a ``(batch, n)`` int64 CPU tensor (a ``(n,)`` one is broadcast), or None.

    Refused by name: not a tensor, not an integer dtype, the wrong shape, or
    ids that decrease along the sequence (documents are packed one after the
    other).
    """
    if document_ids is None:
        return None
    if not isinstance(document_ids, torch.Tensor):
        raise TypeError(f"document_ids must be an integer torch.Tensor of shape (batch, n) or None, got "
                        f"{type(document_ids).__name__}")
    if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
        raise TypeError(f"document_ids must have an integer dtype, got {document_ids.dtype}")
    ids = document_ids.detach().to("cpu", torch.int64)
    if ids.dim() == 1:
        ids = ids.expand(batch, -1)
    if tuple(ids.shape) != (batch, n):
        raise ValueError(f"document_ids must have shape (batch, n) = ({batch}, {n}) (or (n,)), got "
                         f"{tuple(document_ids.shape)}")
    ids = ids.contiguous()
    # numpy, not torch, for the scan: one thread over the host copy (torch's CPU ops on a long tensor wake its
    # whole thread pool, milliseconds per op on a busy many-core host; the GPU profile showed ~20 ms a call)
    drops = np.argwhere(np.diff(ids.numpy(), axis=1) < 0)
    if len(drops):
        b, i = (int(x) for x in drops[0])
        raise ValueError(f"document_ids must be non-decreasing along the sequence (documents packed one after the "
                         f"other), but batch row {b} goes from {int(ids[b, i])} at token {i} to "
                         f"{int(ids[b, i + 1])} at token {i + 1}")
    return ids


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor | list[int]) -> torch.Tensor:
    """``(n,)`` document ids from cumulative lengths ``[0, l0, l0 + l1, …, n]`` (varlen kernels' ``cu_seqlens``)."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).flatten()
    if cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {cu.tolist()}")
    return torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """A mask as plain, hashable data (for cached plans): causal, the window, and per batch row the documents'
    first token positions (``starts[b]``, increasing, ``starts[b][0] == 0``)."""

    causal: bool
    window: int | None = None
    starts: tuple[tuple[int, ...], ...] | None = None
    n: int = 0  # the sequence length (with documents)

    @property
    def plain(self) -> bool:
        """No document or window: only the causal mask (or none)."""
        return self.window is None and self.starts is None

    @functools.cached_property
    def _ids(self) -> torch.Tensor | None:
        if self.starts is None:
            return None
        return torch.stack([torch.cumsum(torch.zeros(self.n, dtype=torch.int64).index_fill_(
            0, torch.tensor(s[1:], dtype=torch.int64), 1), 0) for s in self.starts])

    def ids(self) -> torch.Tensor | None:
        """The ``(b, n)`` document ids (CPU), or None."""
        return self._ids


def mask_spec(causal: bool, document_ids: torch.Tensor | None = None, window: int | None = None) -> MaskSpec:
    """The :class:`MaskSpec` of checked arguments (``document_ids`` from :func:`check_document_ids`)."""
    if document_ids is None:
        return MaskSpec(bool(causal), window)
    b, n = document_ids.shape
    starts = tuple(tuple([0] + (np.flatnonzero(np.diff(row)) + 1).tolist()) for row in document_ids.numpy())
    return MaskSpec(bool(causal), window, starts, n)


def keep(q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool, q_doc: torch.Tensor | None = None,
         k_doc: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor | None:
    """Which (query, key) pairs of a block are seen: ``(i, j)``, or ``(b, 1, i, j)`` with documents; None: all.

    ``q_pos``/``k_pos``: the rows' token positions; ``q_doc``/``k_doc``: their
    document ids (``b i`` and ``b j``).
    """
    i, j = rearrange(q_pos, "i -> i 1"), rearrange(k_pos, "j -> 1 j")
    out = None
    if causal:
        out = j <= i
    if window is not None:
        w = (i - j < window) if causal else ((i - j).abs() < window)
        out = w if out is None else out & w
    if q_doc is not None:
        same = rearrange(q_doc, "b i -> b 1 i 1") == rearrange(k_doc, "b j -> b 1 1 j")
        out = same if out is None else same & out
    return out


def _span(positions: torch.Tensor) -> tuple[int, int]:
    return int(positions.min()), int(positions.max())


def classify(q_pos: torch.Tensor, k_pos: torch.Tensor, spec: MaskSpec) -> str:
    """``"full"``, ``"causal"`` (only the causal mask cuts it), ``"masked"`` (a document or window cuts it) or
    ``"empty"``, from the rows' position ranges, without forming the mask (a conservative answer: a block
    called partial may still be full for some rows, never the other way round)."""
    q0, q1 = _span(q_pos)
    k0, k1 = _span(k_pos)
    if spec.causal and k0 > q1:
        return "empty"
    window = spec.window
    if window is not None:
        if spec.causal and q0 - k1 >= window:
            return "empty"
        if not spec.causal and max(q0 - k1, k0 - q1) >= window:
            return "empty"
    ids = spec.ids()
    same_doc = True
    if ids is not None:
        dq0, dq1, dk0, dk1 = ids[:, q0], ids[:, q1], ids[:, k0], ids[:, k1]
        if bool(((dk0 > dq1) | (dq0 > dk1)).all()):
            return "empty"
        same_doc = bool(((dq0 == dq1) & (dk0 == dk1) & (dq0 == dk0)).all())
    full_window = window is None or (q1 - k0 < window if spec.causal else max(q1 - k0, k1 - q0) < window)
    if not same_doc or not full_window:
        return "masked"
    if spec.causal and k1 > q0:
        return "causal"
    return "full"


def visible_keys(n: int, *, causal: bool, document_ids: torch.Tensor | None = None,
                 window: int | None = None) -> torch.Tensor:
    """``(n,)`` LongTensor: how many keys each query sees under the mask, summed over batch rows (the work of
    each query; a rank's work is the sum over the queries it holds), without forming the ``n × n`` mask."""
    ids = check_document_ids(document_ids, 1 if document_ids is None or document_ids.dim() == 1
                             else document_ids.shape[0], n)
    window = check_window(window)
    rows = ids if ids is not None else torch.zeros(1, n, dtype=torch.int64)
    total = torch.zeros(n, dtype=torch.int64)
    i = torch.arange(n)
    for row in rows:
        first = torch.searchsorted(row, row, right=False)  # each token's document start
        last = torch.searchsorted(row, row, right=True) - 1  # and end (inclusive)
        before, after = i - first, last - i  # same-document tokens before and after each query
        if window is not None:
            before, after = before.clamp(max=window - 1), after.clamp(max=window - 1)
        total += before + 1 + (0 if causal else after)
    return total


def visible_pairs(n: int, *, causal: bool, document_ids: torch.Tensor | None = None,
                  window: int | None = None) -> int:
    """The (query, key) pairs the mask leaves over ``n`` tokens, summed over batch rows: the work to count
    (4·h·d FLOPs each, forward), without forming the ``n × n`` mask."""
    return int(visible_keys(n, causal=causal, document_ids=document_ids, window=window).sum())
