"""Shared helpers: input checks, the default scale, dtypes and work counts.

Shape glossary (used in every module and notebook):

==========  =====================================================
letter      meaning
==========  =====================================================
``b``       batch
``n``       sequence length (``i`` for query, ``j`` for key positions)
``h``       heads
``d``       head dimension
``w``       world size (ring size)
``c``       chunk (shard) length
``s``       segment, ``r`` dilation rate
==========  =====================================================

q, k, v are ``b n h d``; the log-sum-exp ``lse`` is ``b h n``.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_tensor(x, name: str, ndim: int | None = None) -> None:
    """Raise TypeError/ValueError unless ``x`` is a floating tensor of ``ndim`` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions (batch, seq, heads, head_dim = 'b n h d'), "
            f"got {x.dim()} with shape {tuple(x.shape)}"
        )


def check_qkv(q, k, v, *, allow_gqa: bool = False) -> None:
    """Validate attention inputs in the ``b n h d`` layout.

    Checks types, dimensions, dtype and device agreement, and that batch, heads
    and head_dim agree and k/v have the same length. With ``allow_gqa``
    (grouped-query attention) k and v may have fewer heads than q, as long as
    they have the same number and it divides q's: q head i then reads k/v
    head ``i // (heads_q / heads_kv)``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name, ndim=4)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k and v must share one dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; q, k and v must be on one device")
    names = ("batch", "seq", "heads", "head_dim")
    if allow_gqa:
        if k.shape[2] != v.shape[2] or k.shape[2] == 0 or q.shape[2] % k.shape[2]:
            raise ValueError(
                f"grouped-query attention needs k and v with the same number of heads dividing q's heads, got "
                f"q {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]} heads (shapes q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, v {tuple(v.shape)}); choose heads_kv among "
                f"{[x for x in range(1, q.shape[2] + 1) if q.shape[2] % x == 0]}"
            )
    for axis in (0, 2, 3):
        if axis == 2 and allow_gqa:
            continue
        for name, x in (("k", k), ("v", v)):
            if x.shape[axis] != q.shape[axis]:
                raise ValueError(
                    f"{name} has {names[axis]}={x.shape[axis]} but q has {names[axis]}={q.shape[axis]} "
                    f"(shapes q {tuple(q.shape)}, {name} {tuple(x.shape)})"
                )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same sequence length, got k {k.shape[1]} and v {v.shape[1]}")


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``1/sqrt(head_dim)`` by default, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_positive_int(value, name: str) -> int:
    """Return ``value`` if it is a positive int, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype: float32 for float16/bfloat16 input, else the input dtype."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the returned lse: float32 for low precision, else the input dtype."""
    return compute_dtype(dtype)


def attention_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, causal: bool = False) -> float:
    """Forward FLOPs of dense attention: two matmuls of 2·n_q·n_k·d each, per (b, h).

    Causal attention does half the work (the usual convention, exact as n → ∞).
    """
    flops = 4.0 * batch * heads * n_q * n_k * head_dim
    return flops / 2 if causal else flops


def available_bytes(device: torch.device) -> float:
    """Free memory of ``device``: the CUDA allocator's free bytes, or the host's MemAvailable (8 GB if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8e9
