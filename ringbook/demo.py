"""Helpers for notebook 02: a real ring's worker, and what a rank holds in memory.

:func:`ring_worker` is the function notebook 02 starts on ``w`` local
processes with :func:`ringbook.distributed.spawn` (a spawned function must be
importable, so it lives here and not in the notebook). Every rank builds the
same global inputs from a seed (:func:`global_inputs`) — only so that the
notebook can check the gathered result against
:func:`ringbook.naive_attention`; a real job would load just its shard — cuts
its own shard with :func:`ringbook.distributed.shard`, runs
:func:`ringbook.distributed.ring_attention` forward and backward, and sends
back its part of out, lse and the gradients.

:func:`ring_memory_bytes` is the memory model of one rank of
:func:`ringbook.distributed.ring_attention` (forward), term by term: the
q/k/v shard, the K/V buffers of the transfer in flight (double buffering),
the accumulators, and the score tiles of ``c × KEY_CHUNK`` keys. Every term
is linear in the shard length ``c = n / w``: memory per rank is O(n / w).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ._utils import compute_dtype
from .online_softmax import KEY_CHUNK


def global_inputs(n: int, *, batch: int = 2, heads: int = 2, head_dim: int = 8, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """Seeded ``q, k, v, dout`` (``b n h d``): the same tensors on every rank and in the notebook."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, n, heads, head_dim, generator=gen, dtype=dtype) for _ in range(4))


def ring_worker(rank: int, world_size: int, n: int, cases: Iterable[tuple[str, bool]], seed: int = 0,
                batch: int = 2, heads: int = 2, head_dim: int = 8) -> dict:
    """Run :func:`ringbook.distributed.ring_attention` on this rank for each ``(layout, causal)`` in ``cases``.

    Meant for :func:`ringbook.distributed.spawn`: ``spawn(ring_worker, w, n, cases)``.
    Returns ``{"cases": {(layout, causal): {"out", "lse", "dq", "dk", "dv"}}, "bytes": {...}}``:
    this rank's shards (``b c h d``, lse ``b h c``) and the bytes of its
    q/k/v shard next to those of the whole q/k/v.
    """
    from . import distributed as rd  # torch.distributed only in the worker

    torch.set_num_threads(1)
    q, k, v, dout = global_inputs(n, batch=batch, heads=heads, head_dim=head_dim, seed=seed)
    results = {}
    for layout, causal in cases:
        qs, ks, vs = (rd.shard(x, rank, world_size, layout).requires_grad_() for x in (q, k, v))
        out, lse = rd.ring_attention(qs, ks, vs, causal=causal, layout=layout)
        (out * rd.shard(dout, rank, world_size, layout)).sum().backward()
        results[(layout, causal)] = {"out": out.detach(), "lse": lse.detach(),
                                     "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}
    held = sum(x.nbytes for x in (qs, ks, vs))
    return {"cases": results, "bytes": {"q, k, v shard": held, "whole q, k, v": q.nbytes + k.nbytes + v.nbytes}}


def fused_memory_bytes(n: int, world_size: int, *, batch: int = 1, heads: int = 8, head_dim: int = 64,
                       dtype: torch.dtype = torch.bfloat16, backward: bool = False) -> dict[str, int]:
    """Bytes one rank holds at its peak with a fused attention kernel (FlashAttention, cuDNN), term by term.

    With ``c = n / w``, ``S = b·c·h·d`` elements in a shard, ``e`` bytes per
    input element and ``a`` per accumulator element (float32 for bf16/fp16):

    * its three shards q, k, v: ``3·S·e``;
    * two K/V buffers in flight (double buffering): the one being attended and
      sent on, and the one the next shard arrives in: ``2·2·S·e``;
    * the running O and lse, and one block's partial before the merge:
      ``2·(S + b·h·c)·a``;
    * backward, in addition: out and dout (``2·S·e``), dQ (``S·a``) and the
      dK/dV partial sums, which travel like K/V in two buffers (``2·2·S·a``).

    The fused kernel tiles scores on chip, so no score tile appears: every
    term is linear in ``c``.
    """
    if n % world_size:
        raise ValueError(f"world_size={world_size} does not divide n={n}")
    c = n // world_size
    e = torch.empty((), dtype=dtype).element_size()
    a = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    s = batch * c * heads * head_dim
    terms = {"q, k, v shards": 3 * s * e, "K/V buffers in flight": 4 * s * e,
             "O, lse accumulators": 2 * (s + batch * heads * c) * a}
    if backward:
        terms.update({"out, dout": 2 * s * e, "dQ": s * a, "dK/dV in flight": 4 * s * a})
    return terms


def ring_memory_bytes(n: int, world_size: int, *, batch: int = 1, heads: int = 8, head_dim: int = 64,
                      dtype: torch.dtype = torch.bfloat16, causal: bool = True,
                      key_chunk: int = KEY_CHUNK) -> dict[str, int]:
    """Bytes one rank of the distributed ring holds at its peak (forward), term by term.

    With ``c = n / w`` tokens a rank, ``S = b·c·h·d`` elements in a shard,
    ``e`` bytes per input element and ``a`` per accumulator element (float32
    for float16/bfloat16 input), and a score tile of ``T = b·h·c·min(c, key_chunk)``:

    * q, k, v shards: ``3·S·e``;
    * the K/V in flight: the stacked K/V message being attended and sent,
      and the buffer the next one is received into (double buffering): ``4·S·e``;
    * accumulators: out and lse, plus the partials and temporaries of the
      merge (M), at most ``8·S·a + 8·b·h·c·a``;
    * score tiles: inside :func:`~ringbook.online_softmax.attend_block` at
      most three float tiles are alive at once (scores, scores − m, their
      exp) and, when causal, a boolean mask: ``T·(3·a + causal)``.

    The sum is an upper bound on what the rank allocates (and so on a
    measured CUDA allocator peak); every term is linear in ``c``.
    """
    if n % world_size:
        raise ValueError(f"world_size={world_size} does not divide n={n}")
    c = n // world_size
    e = torch.empty((), dtype=dtype).element_size()
    a = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    s = batch * c * heads * head_dim
    tile = batch * heads * c * min(c, key_chunk)
    return {
        "q, k, v shards": 3 * s * e,
        "K/V in flight (double buffer)": 4 * s * e,
        "accumulators": 8 * s * a + 8 * batch * heads * c * a,
        "score tiles": tile * (3 * a + int(causal)),
    }


def ring_step_seconds(shard_len: int, *, flops_per_s: float, bytes_per_s: float, batch: int = 1, heads: int = 8,
                      head_dim: int = 64, dtype: torch.dtype = torch.bfloat16, causal: bool = False,
                      backward: bool = False, grad_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """One ring step of one rank: the block's compute time and the transfer time of what travels.

    Forward, no mask: a step attends ``c`` queries to ``c`` keys, ``4·b·h·c²·d``
    FLOPs at ``flops_per_s``, while the next K/V shard, ``2·b·c·h·d`` elements
    of ``e`` bytes, crosses the link at ``bytes_per_s``. With double
    buffering the step takes the larger of the two: the transfer hides when
    ``c ≥ e·F / (2·B)`` (``threshold`` below), which for bf16 (e = 2) is the
    ``c ≥ F / B`` of Liu et al. (2023).

    ``causal`` (zigzag, every step after the first): a step computes two
    blocks of ``(c/2)²``, half the FLOPs, for the same bytes: the threshold
    doubles. ``backward``: 2.5× the forward FLOPs, and the dK/dV partial sums
    (``2·b·c·h·d`` elements of ``grad_dtype``) travel with the K/V shard:
    ``c ≥ (e + g)·F / (2·2.5·B)``, with a factor 2 more when causal.

    Returns ``{"compute", "transfer", "step", "threshold"}`` (seconds,
    seconds, seconds, tokens).
    """
    for value, name in ((shard_len, "shard_len"), (batch, "batch"), (heads, "heads"), (head_dim, "head_dim")):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for value, name in ((flops_per_s, "flops_per_s"), (bytes_per_s, "bytes_per_s")):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    e = torch.empty((), dtype=dtype).element_size()
    g = torch.empty((), dtype=grad_dtype).element_size() if backward else 0
    work = (0.5 if causal else 1.0) * (2.5 if backward else 1.0)  # FLOPs of the step, in units of a full forward block
    compute = work * 4.0 * batch * heads * shard_len ** 2 * head_dim / flops_per_s
    transfer = 2.0 * batch * shard_len * heads * head_dim * (e + g) / bytes_per_s
    return {"compute": compute, "transfer": transfer, "step": max(compute, transfer),
            "threshold": (e + g) * flops_per_s / (2.0 * work * bytes_per_s)}


def run_source(rank: int, world_size: int, source: str, name: str, *args: Any) -> Any:
    """Run function ``name`` defined by ``source`` as ``fn(rank, world_size, *args)``: a notebook cell's loop, spawned.

    :func:`ringbook.distributed.spawn` starts fresh processes, which can only
    import their function, and a function defined in a notebook cell cannot
    be imported. Passing its source text (``inspect.getsource(fn)``) lets the
    loop the reader sees be the loop that runs on every rank.
    """
    import math

    import torch.distributed as dist

    from . import online_softmax

    scope = {"torch": torch, "dist": dist, "math": math, "online_softmax": online_softmax,
             "attend_block": online_softmax.attend_block, "merge_partials": online_softmax.merge_partials,
             "attend_block_backward": online_softmax.attend_block_backward}
    exec(compile(source, f"<notebook cell: {name}>", "exec"), scope)
    return scope[name](rank, world_size, *args)
