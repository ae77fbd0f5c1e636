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

Input rules, checked once in :func:`check_qkv` so that every attention
function (naive, blockwise, ring, dilated, ring dilated, production and the
multi-process ones) follows them:

* **No zero-size dimension.** A q, k or v with batch, seq, heads or
  head_dim equal to 0 is refused with a ValueError naming the tensor, the
  dimension and the shape (``q has seq=0 (shape (1, 0, 2, 8)); attention
  needs at least one token``); an empty input is a bug upstream far more
  often than a request for an empty output, and an empty softmax has no
  value to return.
* **Non-finite values** (NaN, +inf, -inf in q, k or v) are refused with a
  ValueError naming the tensor, the first offending index and what it is,
  while :func:`check_finite` is on (off by default; ``RINGBOOK_CHECK_FINITE=1``
  turns it on at import). Without the check a NaN/inf reaches at least every
  output row that sees it and may reach other rows too (implementation-defined);
  :func:`check_finite` states the contract exactly.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_tensor(x: Any, name: str, ndim: int | None = None) -> None:
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


_ZERO_SIZE_NEEDS = ("at least one sequence in the batch", "at least one token", "at least one head",
                    "head_dim >= 1 (at least one feature per head)")


def _check_not_empty(x, name: str) -> None:
    """The zero-size rule of the module docstring, for one ``b n h d`` tensor."""
    for axis, what in enumerate(("batch", "seq", "heads", "head_dim")):
        if x.shape[axis] == 0:
            raise ValueError(f"{name} has {what}=0 (shape {tuple(x.shape)}); attention needs {_ZERO_SIZE_NEEDS[axis]}")


def _check_values_finite(x, name: str) -> None:
    """Raise ValueError at the first NaN/inf of ``x`` (one device sync; nothing to read on the meta device)."""
    if x.device.type == "meta":
        return
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    index = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
    value = x[index].item()
    kind = "NaN" if math.isnan(value) else ("+inf" if value > 0 else "-inf")
    count = int(bad.sum())
    raise ValueError(
        f"{name} has {kind} at index {index} (shape {tuple(x.shape)}; {count} non-finite "
        f"value{'s' * (count > 1)} in all); non-finite input is refused while ringbook.check_finite is on"
    )


def check_qkv(q: Any, k: Any, v: Any, *, allow_gqa: bool = False) -> None:
    """Validate attention inputs in the ``b n h d`` layout; the one input check of every attention function.

    Checks types, dimensions, dtype and device agreement, that no dimension
    has size 0, that batch, heads and head_dim agree and that k/v have the
    same length. With ``allow_gqa`` (grouped-query attention) k and v may
    have fewer heads than q, as long as they have the same number and it
    divides q's: q head i then reads k/v head ``i // (heads_q / heads_kv)``.
    While :func:`check_finite` is on, also that every value is finite.

    Zero-size rule: a q, k or v with a zero-size batch, seq, heads or
    head_dim dimension is refused with a ValueError naming the tensor, that
    dimension and the shape, e.g. ``q has seq=0 (shape (1, 0, 2, 8));
    attention needs at least one token`` (q first, then k, then v). No
    implementation returns an empty output.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name, ndim=4)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k and v must share one dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; q, k and v must be on one device")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_not_empty(x, name)
    names = ("batch", "seq", "heads", "head_dim")
    if allow_gqa:
        if k.shape[2] != v.shape[2] or q.shape[2] % k.shape[2]:
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
    if _CHECK_FINITE:
        for name, x in (("q", q), ("k", k), ("v", v)):
            _check_values_finite(x, name)


# --------------------------------------------------------------------------- the finite-input switch

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _finite_from_environment() -> bool:
    value = os.environ.get("RINGBOOK_CHECK_FINITE", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"RINGBOOK_CHECK_FINITE must be 1 (check) or 0 (do not), got {os.environ['RINGBOOK_CHECK_FINITE']!r}")


_CHECK_FINITE = _finite_from_environment()


def finite_check_enabled() -> bool:
    """Whether :func:`check_finite` is on (non-finite q, k, v are refused)."""
    return _CHECK_FINITE


class check_finite:
    """Refuse non-finite input (NaN, +inf, -inf in q, k or v) while on; a call or a context manager.

    ``ringbook.check_finite()`` (or ``check_finite(True)``) turns the check on
    for the whole process, ``check_finite(False)`` turns it off;
    ``with ringbook.check_finite(): ...`` turns it on for the block and
    restores the previous state on exit, even on an exception (as
    ``torch.autograd.set_detect_anomaly`` does). The environment variable
    ``RINGBOOK_CHECK_FINITE=1`` turns it on at import. Off by default: the
    check reads every value of q, k and v (one pass and, on a GPU, one
    synchronisation per tensor and call).

    The contract for non-finite input, every implementation:

    * with the check on, :func:`check_qkv` raises ValueError naming the
      tensor (q, k or v), the first offending index and whether it is NaN,
      +inf or -inf, before any work;
    * with it off, a NaN/inf reaches at least every output row that sees
      it, and may reach other rows too. "Sees": the query row itself, or a
      query whose visible keys (after the causal mask or dilation pattern)
      include the key. In detail: a NaN in q or k makes out NaN and lse
      non-finite (NaN; +inf from the flash kernel) in every row that sees
      it; a NaN in v makes out NaN there (v's NaN features: features do not
      mix); an inf in v makes those features of out inf or NaN; an inf in q
      or k makes scores ±inf or NaN, and as in any softmax a score of -inf
      is a key with weight 0, so a row whose only infinite scores are -inf
      stays finite (or, if every score is -inf, is a row that sees no key:
      out 0, lse -inf).
      Known gap: on CUDA, the fused Triton merge of
      :func:`ringbook.production_ring_attention` (``ringbook/fast/triton_merge.py``)
      can turn the lse of a NaN row into -inf, and a later merge into a
      finite value; its out stays NaN (seen on an H200; the einops paths and
      the torch merge keep it NaN).
    * which *other* rows a NaN/inf reaches is implementation-defined, not
      part of the contract: e.g. causal, a NaN in v at key j (which the
      queries before j cannot see) makes every row NaN in
      ``naive_attention`` (a masked weight 0 times NaN), only the rows from
      j's block on in ``blockwise_attention`` (earlier blocks are skipped),
      and a layout-dependent set of rows in ``ring_attention``.

    The switch is process-wide (not per thread) and read at each call.
    """

    def __init__(self, mode: bool = True):
        global _CHECK_FINITE
        self.mode = check_bool(mode, "mode")
        self.prev = _CHECK_FINITE
        _CHECK_FINITE = self.mode

    def __enter__(self) -> check_finite:
        return self

    def __exit__(self, *exc) -> bool:
        global _CHECK_FINITE
        _CHECK_FINITE = self.prev
        return False

    def __repr__(self) -> str:
        return f"ringbook.check_finite({self.mode})"


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: ``1/sqrt(head_dim)`` by default, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is a positive int, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` as a bool if it is True/False or a ``numpy.bool_``, else raise TypeError naming ``name``.

    Nothing else is taken for a bool (not 0/1, strings, None or tensors): a
    flag given as a number is more likely a mistake than a choice.
    """
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):  # numpy.bool_, no import
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def refuse_double_backward(op: str, why: str, instead: str) -> None:
    """Called first in the ``backward`` of a once-differentiable autograd Function: raise under ``create_graph``.

    Inside ``backward`` grad mode is on exactly when the caller asked for
    ``create_graph=True`` (double backward: Hessian-vector products, gradient
    penalties, meta-learning). Such a backward computes its gradients with
    operations that have no derivative, or none that autograd can see (a
    fused kernel's backward op, the network), so the second derivatives
    would come out NaN or silently wrong; refuse instead. ``op`` names the
    public function, ``why`` says what its backward does, ``instead`` what
    to use for second derivatives.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op} is once differentiable: its backward ({why}) does not support create_graph=True (double "
            "backward: Hessian-vector products, gradient penalties), which is refused rather than returning NaN "
            f"or wrong second derivatives. {instead}"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype, and the dtype of every returned lse: float32 for float16/bfloat16 input, else the input dtype."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


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
