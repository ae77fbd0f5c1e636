"""The rules a result is judged by: the tolerance table, flash-attention's 2× rule and the row verdict.

One table for the whole project (:mod:`ringbook.tolerance`, below the fast path
and the benchmark; re-exported here).

* :data:`TOLERANCE`: the largest ``max_rel_err`` (against the float64
  reference) a benchmark row may have in each input dtype;
* :func:`within_2x_rule`: in low precision an implementation is right when its
  error is at most twice the error of the plain (naive) path computed in the
  same dtype, plus an atol for one rounding of the result
  (:func:`rounding_atol`) — the rule FlashAttention's tests use;
* :func:`verdict`: a row is ``ok`` only when every number in it is finite and
  its errors (output; lse and gradients where measured) are within tolerance.
"""

from __future__ import annotations

import math

import torch

from ..tolerance import TOLERANCE  # a row whose max_rel_err exceeds it is a wrong answer (status "error")


class WrongResult(ValueError):
    """A result that fails a check: non-finite where it must be finite, or unlike its reference (says where)."""


DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
}


# Errors a row may carry besides max_rel_err (None or absent where not measured), judged by the same table.
OTHER_ERRORS = {"lse_max_rel_err": "lse", "grad_max_rel_err": "dq/dk/dv"}


def verdict(row: dict, dtype: torch.dtype) -> dict:
    """Set ``row["status"]`` to ``ok`` only if every measured number is finite and every error within tolerance.

    The one place a row becomes ``ok``: a row whose time, throughput, memory
    or error is missing, NaN or infinite is an ``error`` row with the reason.
    ``max_rel_err`` (the output) is required; ``lse_max_rel_err`` and
    ``grad_max_rel_err``, where measured, are held to the same tolerance.
    """
    tol = TOLERANCE[dtype]
    numbers = {key: row.get(key) for key in ("time_ms", "tflops", "tokens_per_s", "max_rel_err")}
    for key in ("peak_mem_gb", *OTHER_ERRORS):
        if row.get(key) is not None:
            numbers[key] = row[key]
    bad = [key for key, x in numbers.items()
           if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x)]
    too_large = [] if bad else [key for key in ("max_rel_err", *OTHER_ERRORS) if key in numbers and numbers[key] > tol]
    if bad:
        row["status"] = "error"
        row["error"] = "not finite: " + ", ".join(f"{key}={numbers[key]!r}" for key in bad)
    elif too_large:
        row["status"] = "error"
        row["error"] = "wrong result: " + ", ".join(f"{key} {numbers[key]:.3g}" for key in too_large) + \
            f" exceeds {tol:g} for {row['dtype']}"
    else:
        row["status"] = "ok"
    return row


def finite_max_error(x: torch.Tensor, ref: torch.Tensor, what: str = "value") -> float:
    """max |x − ref| over the finite entries of ``ref``, in float64.

    ``x`` must have no NaN and the same ±inf entries as ``ref`` (so it works
    for an lse with -inf rows); otherwise :class:`~ringbook.bench.measure.WrongResult`.
    """

    x, ref = x.detach().double(), ref.detach().double()
    if x.shape != ref.shape:
        raise WrongResult(f"{what}: shape {tuple(x.shape)} but the reference has {tuple(ref.shape)}")
    if x.isnan().any():
        raise WrongResult(f"{what}: has NaN")
    if ref.isnan().any():
        raise WrongResult(f"{what}: the reference has NaN")
    fin = torch.isfinite(ref)
    if not (torch.equal(torch.isfinite(x), fin) and torch.equal(x[~fin], ref[~fin])):
        raise WrongResult(f"{what}: its ±inf entries differ from the reference's")
    return (x[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def rounding_atol(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """The 2× rule's atol: 2 · max |fl(fl(fl(r) + 0.3) − 0.3) − fl(r)|, with r the finite reference entries.

    fl rounds to ``dtype`` (the output's; float32 for a half-precision lse):
    the rounding noise of ``dtype`` at the reference's magnitude, as in
    flash-attention's tests. Note that it is applied to fl(r), not to r.
    """
    r = ref64.detach()
    r = r[torch.isfinite(r)].to(dtype)
    if r.numel() == 0:
        return 0.0
    return 2 * (r + 0.3 - 0.3 - r).abs().max().item()


def within_2x_rule(out: torch.Tensor, ref64: torch.Tensor, out_naive: torch.Tensor, *, atol: float | None = None,
                   factor: float = 2.0, what: str = "out") -> tuple[bool, float, float, float]:
    """Flash-attention's rule: ``err(out) ≤ factor · err(out_naive) + atol``.

    ``ref64`` is the float64 reference, ``out_naive`` the naive path computed
    in the same low precision; errors are :func:`finite_max_error`; ``atol``
    defaults to :func:`rounding_atol` in ``out``'s dtype. Returns ``(passed,
    err, err_naive, atol)``.
    """
    if atol is None:
        atol = rounding_atol(ref64, out.dtype)
    err = finite_max_error(out, ref64, what)
    err_naive = finite_max_error(out_naive, ref64, f"{what} (naive baseline)")
    passed = all(math.isfinite(x) for x in (err, err_naive, atol)) and err <= factor * err_naive + atol
    return passed, err, err_naive, atol
