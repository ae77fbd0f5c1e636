"""The implementations the benchmark measures, by name: :data:`IMPLS`.

Each :class:`Impl` is a function ``fn(q, k, v, *, causal, ring_size, **options)
-> (out, lse)`` with what the sweep needs to know about it: whether it takes a
ring size, whether it needs CUDA, its work count and the float64 function it
is held against (:class:`~ringbook.bench.measure.Reference`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from einops import rearrange

from .._utils import attention_flops
from ..dilated import (
    SCORE_BUDGET,
    check_dilated_config,
    dilated_attention_dense,
    dilated_flops,
    dilated_reference_rows,
    pair_heads,
)
from ..fast.dilated import dilated_sdpa
from ..fast.stacked import production_ring_attention
from ..naive import naive_attention
from ..online_softmax import KEY_CHUNK, blockwise_attention
from ..ring import ring_attention
from ..ring_dilated import ring_dilated_attention
from .measure import Reference, reference_check


@dataclasses.dataclass(frozen=True)
class Impl:
    """A benchmarked implementation: ``fn(q, k, v, *, causal, ring_size, **options) -> (out, lse)``."""

    name: str
    fn: Callable
    description: str
    ring: bool = False  # takes ring_size > 1
    cuda_only: bool = False
    # bytes of transient memory it needs beyond inputs/outputs (for the CPU guard)
    extra_bytes: Callable[[int, int, int, int, int], float] | None = None
    flops: Callable[..., float] = attention_flops
    # the float64 function it computes; None: dense attention (ringbook.bench.measure.DENSE)
    reference: Reference | None = None


def _naive(q, k, v, *, causal, ring_size, **_):
    return naive_attention(q, k, v, causal=causal, precision="input")


def _blockwise(q, k, v, *, causal, ring_size, block_size=None, **_):
    return blockwise_attention(q, k, v, block_size=block_size or 1024, causal=causal)


def _ring(q, k, v, *, causal, ring_size, layout=None, **_):
    layout = layout or ("zigzag" if causal else "contiguous")
    return ring_attention(q, k, v, ring_size=ring_size, causal=causal, layout=layout)


def _sdpa(backend_name: str | None):
    def fn(q, k, v, *, causal, ring_size, **_):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(getattr(SDPBackend, backend_name)) if backend_name else nullcontext()
        qt, kt, vt = (rearrange(x, "b n h d -> b h n d") for x in (q, k, v))
        with ctx:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        return rearrange(out, "b h n d -> b n h d"), None

    return fn


def _scores_bytes(b, h, n_q, n_k, itemsize):
    return 3.0 * b * h * n_q * n_k * max(itemsize, 4)


IMPLS: dict[str, Impl] = {}


def register(impl: Impl) -> Impl:
    """Add an implementation to the benchmark (later modules add their rows)."""
    IMPLS[impl.name] = impl
    return impl


register(Impl("naive", _naive, "materialised seq×seq scores in the input dtype", extra_bytes=_scores_bytes))
register(Impl(
    "blockwise", _blockwise, "ringbook.blockwise_attention (einops online softmax, block 1024)",
    extra_bytes=lambda b, h, n_q, n_k, s: 3.0 * b * h * n_q * min(n_k, 1024) * 4,
))
register(Impl(
    "ring", _ring, "ringbook.ring_attention, all ranks in one process (layout option; "
    "default zigzag when causal, else contiguous)", ring=True,
    # the largest score tile is one shard pair; at ring_size 1 that is the whole matrix (upper bound)
    extra_bytes=_scores_bytes,
))


def _production(q, k, v, *, causal, ring_size, layout=None, **_):
    return production_ring_attention(q, k, v, ring_size=ring_size, causal=causal, layout=layout)


register(Impl(
    "production", _production, "ringbook.production_ring_attention, all ranks in one process stacked in the "
    "batch (one batched kernel call per ring step; cuDNN/flash/efficient SDPA per block on CUDA, einops on CPU; "
    "fused float32 merge; layout option, default zigzag when causal, else contiguous)", ring=True,
    # einops path: a (shard × KEY_CHUNK) fp32 score tile per rank, scores + probabilities + mask
    extra_bytes=lambda b, h, n_q, n_k, s: 3.0 * b * h * n_q * min(n_k, KEY_CHUNK) * 4,
))
register(Impl("sdpa", _sdpa(None), "torch scaled_dot_product_attention, default dispatch"))
for _backend, _label in (("FLASH_ATTENTION", "flash"), ("CUDNN_ATTENTION", "cudnn"), ("EFFICIENT_ATTENTION", "efficient")):
    register(Impl(f"sdpa_{_label}", _sdpa(_backend), f"torch SDPA, {_label} backend only", cuda_only=True))


def bench_dilated_config(n: int) -> dict:
    """The seed's (segment length, dilation rate) pairs for sequence length ``n``, heads grouped 2:3:3.

    Segment lengths 2048/4096/8192 up to 16K, 4096/8192/16384 up to 64K,
    8192/16384/32768 beyond (docs/seed-notes.md). The seed did not state its rates;
    ringbook assumes [1, 2, 4]. Below 16K the seed's 16K pairs are scaled
    with ``n``: segment lengths n/8, n/4, n/2 (n must be a multiple of 8).
    """
    if n < 16384:
        if n % 8:
            raise ValueError(f"ring_dilated uses segment lengths n/8, n/4, n/2 below 16K: "
                             f"seq_len={n} must be a multiple of 8")
        seg = [n // 8, n // 4, n // 2]
    else:
        seg = [2048, 4096, 8192] if n <= 16384 else [4096, 8192, 16384] if n <= 65536 else [8192, 16384, 32768]
    return {"segment_lengths": seg, "dilation_rates": [1, 2, 4]}


def _ring_dilated(q, k, v, *, causal, ring_size, **_):
    return ring_dilated_attention(q, k, v, ring_size=ring_size, causal=causal, heads="grouped",
                                  **bench_dilated_config(q.shape[1]))


def _ring_dilated_flops(batch, heads, n_q, n_k, head_dim, causal):
    """The dilated work actually required (None where the configuration is refused: the row says why)."""
    try:
        return dilated_flops(batch, heads, n_q, head_dim, causal=causal, heads="grouped", **bench_dilated_config(n_q))
    except ValueError:
        return None


def _dilated_extra_bytes(b, h, n_q, n_k, itemsize):
    """Score tiles are chunked to at most SCORE_BUDGET elements (fp32 scores, probabilities, mask)."""
    return 12 * min(SCORE_BUDGET, (_ring_dilated_flops(b, h, n_q, n_k, 1, False) or 0) / 4)


class DilatedReference(Reference):
    """Equation (D) with the benchmark's configuration (:func:`bench_dilated_config`, heads grouped) in float64:
    each row from its own key window (no n×n), 128 rows; the gradients from the dense form where it fits."""

    max_rows = 128

    def rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return dilated_reference_rows(q, k, v, positions, causal=causal, heads="grouped",
                                      **bench_dilated_config(q.shape[1]))

    def no_key(self, seq_len: int, heads: int, *, causal: bool) -> torch.Tensor:
        """The positions no pattern of a head keeps (a kept query always sees itself, causal or not)."""
        cfg = bench_dilated_config(seq_len)
        pairs = check_dilated_config(seq_len, cfg["segment_lengths"], cfg["dilation_rates"], heads="grouped",
                                     num_heads=heads)
        pos = torch.arange(seq_len)
        seen = torch.zeros(heads, seq_len, dtype=torch.bool)
        for (seg, r), (hs, offs) in zip(pairs, pair_heads(heads, cfg["dilation_rates"], "grouped")):
            for h, o in zip(hs, offs):
                seen[h] |= pos % seg % r == o
        return ~seen

    def grads_bytes(self, batch: int, heads: int, seq_len: int) -> float:
        """:func:`~ringbook.dilated.dilated_attention_dense`: every head at once, int64 weights and float64 scores."""
        return 8.0 * 8 * batch * heads * seq_len * seq_len

    def grads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, *,
              causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = [t.detach().double().requires_grad_() for t in (q, k, v)]
        out, _ = dilated_attention_dense(*x, causal=causal, heads="grouped", **bench_dilated_config(q.shape[1]))
        out.backward(dout.double())
        return tuple(t.grad for t in x)


DILATED = DilatedReference()


def _ring_dilated_check(q, k, v, out, *, causal, max_rows=128):
    """``(max_rel_err, rows checked)`` of an output of the benchmark's dilated configuration (:data:`DILATED`)."""
    c = reference_check(q, k, v, out, causal=causal, reference=DILATED, max_rows=max_rows)
    return c.max_rel_err, c.rows


def _production_dilated(q, k, v, *, causal, ring_size, **_):
    return production_ring_attention(q, k, v, ring_size=ring_size, causal=causal, heads="grouped",
                                     **bench_dilated_config(q.shape[1]))


register(Impl(
    "ring_dilated", _ring_dilated, "ringbook.ring_dilated_attention, all ranks in one process: the seed's "
    "RingDilatedV2 config (heads grouped 2:3:3 over segment lengths 2048/4096/8192 to 16K, 4096/8192/16384 "
    "to 64K, 8192/16384/32768 beyond; n/8, n/4, n/2 below 16K), dilation rates [1, 2, 4] (assumed: the seed "
    "did not state them); TFLOP/s counts the dilated work", ring=True,
    flops=_ring_dilated_flops, reference=DILATED,
    extra_bytes=_dilated_extra_bytes,
))
def _dilated_sdpa(q, k, v, *, causal, ring_size, **_):
    return dilated_sdpa(q, k, v, causal=causal, heads="grouped", **bench_dilated_config(q.shape[1]))


register(Impl(
    "dilated_sdpa", _dilated_sdpa, "the batched-call peer of production_dilated: the same configuration, one fused "
    "SDPA call per (segment length, rate) head group on the gathered rows of every segment at once, out and lse "
    "scattered back (ringbook.fast.dilated.dilated_sdpa; einops kernel on CPU); no ring, no engine; TFLOP/s "
    "counts the dilated work", flops=_ring_dilated_flops, reference=DILATED, extra_bytes=_dilated_extra_bytes,
))
register(Impl(
    "production_dilated", _production_dilated, "ringbook.production_ring_attention with the seed's configuration "
    "(as ring_dilated: heads grouped 2:3:3, its segment lengths, rates [1, 2, 4]) on the ring engine: one "
    "gathered block per (pair, head group) over every rank's segments, fused SDPA on CUDA (einops on CPU); "
    "TFLOP/s counts the dilated work",
    ring=True, flops=_ring_dilated_flops, reference=DILATED,
    extra_bytes=_dilated_extra_bytes,
))


