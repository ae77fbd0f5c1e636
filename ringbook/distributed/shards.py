"""Cutting a sequence into the shards each rank holds, and putting the shards back (any layout)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch

from .._utils import check_positive_int
from ..schedule import DOC_HEADTAIL, LAYOUTS, usp_positions


def _check_dim(dim, ndim: int, what: str) -> int:
    """``dim`` as a non-negative axis of a ``ndim``-dimensional tensor, else raise naming ``dim``."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for {what} with {ndim} dimensions "
                         f"(valid: {-ndim}..{ndim - 1}; 1 for b n h d, 2 for an lse b h n)")
    return int(dim) % ndim


def _check_layout_name(layout: str, document_ids: torch.Tensor | None) -> None:
    if layout == DOC_HEADTAIL and document_ids is None:
        raise ValueError(f"layout={DOC_HEADTAIL!r} is dealt from the documents: pass document_ids= (the (n,) ids "
                         "of the whole sequence, the same on every rank)")
    if layout not in LAYOUTS and layout != DOC_HEADTAIL:
        raise ValueError(f"layout must be one of {LAYOUTS} or {DOC_HEADTAIL!r} (with document_ids), got {layout!r}")


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "contiguous", dim: int = 1, *,
          ulysses_size: int = 1, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rank ``rank``'s shard of ``x`` along ``dim`` (1 for ``b n h d``, 2 for an lse ``b h n``).

    ``ulysses_size``: for :func:`ringbook.distributed.usp_attention`, the shards
    of :func:`ringbook.schedule.usp_positions` (the same as ``layout``'s for 1,
    and for ``"contiguous"`` whatever the size).

    ``document_ids``: the whole sequence's ``(n,)`` ids, for
    ``layout="doc_headtail"`` (:func:`ringbook.schedule.head_tail_positions`),
    which :func:`ringbook.distributed.ring_attention` and
    :func:`~ringbook.distributed.production_ring_attention` take with the same
    ``document_ids`` (the other strategies take :data:`ringbook.LAYOUTS`).

    Raises TypeError/ValueError naming the argument: ``x`` not a tensor,
    ``rank`` not an int in ``0..world_size-1``, ``world_size`` not a positive
    int, ``dim`` not an axis of ``x``, a layout that cannot deal ``x``'s
    length to ``world_size`` ranks.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    world_size = check_positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int in 0..{world_size - 1}, got {type(rank).__name__} {rank!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    dim = _check_dim(dim, x.dim(), f"x of shape {tuple(x.shape)}")
    _check_layout_name(layout, document_ids)
    if layout == DOC_HEADTAIL:
        positions = usp_positions(x.shape[dim], world_size, ulysses_size, layout, document_ids)
        return x.index_select(dim, positions[int(rank)].to(x.device))
    n, parts = x.shape[dim], 2 * world_size if layout == "zigzag" else world_size
    if n % parts:
        need = f"2·world_size = {parts}" if layout == "zigzag" else f"world_size = {parts}"
        raise ValueError(f"world_size={world_size} does not fit length {n} (dim {dim} of shape {tuple(x.shape)}) with "
                         f"layout={layout!r}: {need} must divide {n}")
    positions = usp_positions(n, world_size, ulysses_size, layout)
    return x.index_select(dim, positions[int(rank)].to(x.device))


def unshard(shards: Iterable[torch.Tensor], layout: str = "contiguous", dim: int = 1, *,
            ulysses_size: int = 1, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Put per-rank shards (a list, rank order) back into token order along ``dim`` (``ulysses_size`` and
    ``document_ids`` as for :func:`shard`).

    Raises TypeError/ValueError naming the argument: ``shards`` not a
    sequence of tensors (``shards[i]`` named), shards of different
    dimensions, dtype, device or shape (apart from their common length along
    ``dim``), ``dim`` not an axis, a layout they cannot come from.
    """
    if isinstance(shards, (str, bytes)) or not isinstance(shards, Iterable) or (
            isinstance(shards, torch.Tensor) and shards.dim() == 0):
        raise TypeError(f"shards must be a list of tensors (one per rank, in rank order), got {type(shards).__name__}")
    shards = list(shards)
    if not shards:
        raise ValueError("unshard needs at least one shard")
    for i, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"shards[{i}] must be a torch.Tensor, got {type(s).__name__}")
    first = shards[0]
    dim = _check_dim(dim, first.dim(), f"shards[0] of shape {tuple(first.shape)}")
    for i, s in enumerate(shards[1:], start=1):
        if s.dim() != first.dim() or s.dtype != first.dtype or s.device != first.device:
            raise ValueError(f"shards[{i}] ({tuple(s.shape)}, {s.dtype}, {s.device}) does not match shards[0] "
                             f"({tuple(first.shape)}, {first.dtype}, {first.device}): shards must share dimensions, "
                             "dtype and device")
    lengths = {s.shape[dim] for s in shards}
    if len(lengths) != 1:
        raise ValueError(f"shards must have equal length along dim {dim}, got {[s.shape[dim] for s in shards]}")
    others = {tuple(x for a, x in enumerate(s.shape) if a != dim) for s in shards}
    if len(others) != 1:
        raise ValueError(f"shards must have the same shape apart from dim {dim}, got {[tuple(s.shape) for s in shards]}")
    w, c = len(shards), lengths.pop()
    _check_layout_name(layout, document_ids)
    if layout == "zigzag" and c % 2:
        raise ValueError(f"layout='zigzag' gives each rank two chunks of equal length, so shards must have an even "
                         f"length along dim {dim}, got {c}; pass the layout the shards were cut with")
    positions = usp_positions(w * c, w, ulysses_size, layout, document_ids).reshape(-1)  # where each row of the cat goes
    inverse = torch.argsort(positions).to(first.device)
    return torch.cat(shards, dim=dim).index_select(dim, inverse)
