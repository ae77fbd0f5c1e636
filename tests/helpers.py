"""Shared test helpers: seeded random inputs and the error rules.

Every attention test in this directory (and the ring-attention tests that
build on them) compares against the float64 reference ``naive_attention``:

* float64: :func:`assert_matches_reference` (exact to ~1e-10);
* float16/bfloat16/float32: :func:`assert_within_2x_rule`, flash-attention's
  rule — the error of the implementation against the float64 reference is at
  most ``factor`` (2) times the error of ``naive_attention(...,
  precision="input")`` in the same dtype, plus a small ``atol``.

Shapes follow the package: q/k/v are ``b n h d``, lse is ``b h n``.
"""

from __future__ import annotations

import torch

import ringbook
from ringbook.bench import rules
from ringbook.bench.measure import WrongResult

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def randn(*shape, dtype=torch.float64, seed=0, std=1.0, device="cpu", requires_grad=False) -> torch.Tensor:
    """Fresh standard-normal tensor, drawn in float64 from ``seed`` then cast.

    Drawing in float64 first means the same seed gives the same values (up to
    rounding) in every dtype, so a low-precision run and its float64 reference
    see the same numbers.
    """
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype=dtype, device=device)
    return x.requires_grad_(requires_grad)


def make_qkv(b=2, n_q=7, h=2, d=8, n_k=None, *, dtype=torch.float64, seed=0, std=1.0, requires_grad=False):
    """Random ``b n h d`` q, k, v (k/v of length ``n_k``, default ``n_q``).

    ``std`` scales q and k (not v) to make large logits.
    """
    n_k = n_q if n_k is None else n_k
    q = randn(b, n_q, h, d, dtype=dtype, seed=seed, std=std, requires_grad=requires_grad)
    k = randn(b, n_k, h, d, dtype=dtype, seed=seed + 1, std=std, requires_grad=requires_grad)
    v = randn(b, n_k, h, d, dtype=dtype, seed=seed + 2, requires_grad=requires_grad)
    return q, k, v


def to64(*xs):
    """Detached float64 copies (the reference input for a low-precision run)."""
    return tuple(x.detach().to(torch.float64) for x in xs)


def expected_lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The spec: lse is float32 for float16/bfloat16 input, else the input dtype."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _split_finite(x: torch.Tensor, ref: torch.Tensor, what: str):
    """Check x has no NaN and the same ±inf pattern as ref; return finite parts as float64."""
    try:
        rules.finite_max_error(x, ref, what)
    except WrongResult as exc:
        raise AssertionError(str(exc)) from None
    x, ref = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    fin = torch.isfinite(ref)
    return x[fin], ref[fin]


def max_err(x: torch.Tensor, ref: torch.Tensor, what: str = "value") -> float:
    """Max absolute error over the finite entries of ``ref`` (after checking ±inf agree)."""
    try:
        return rules.finite_max_error(x, ref, what)
    except WrongResult as exc:
        raise AssertionError(str(exc)) from None


rounding_atol = rules.rounding_atol


def assert_within_2x_rule(out, ref64, out_naive_lowp, atol=None, *, factor=2.0, what="out"):
    """flash-attention's rule (:func:`ringbook.bench.rules.within_2x_rule`) as an assertion.

    Returns ``(err, err_naive)`` for further checks.
    """
    try:
        passed, err, err_naive, atol = rules.within_2x_rule(out, ref64, out_naive_lowp, atol=atol, factor=factor,
                                                            what=what)
    except WrongResult as exc:
        raise AssertionError(str(exc)) from None
    assert passed, f"{what}: error {err:.3g} > {factor} x naive error {err_naive:.3g} + atol {atol:.3g} ({out.dtype})"
    return err, err_naive


def assert_matches_reference(out, lse, ref_out, ref_lse, atol=1e-10, rtol=1e-10, what=""):
    """Exact comparison (float64): same shapes, same -inf rows, no NaN, allclose."""
    for x, ref, name in ((out, ref_out, "out"), (lse, ref_lse, "lse")):
        name = f"{what} {name}".strip()
        xf, rf = _split_finite(x, ref, name)
        if xf.numel():
            err = (xf - rf).abs().max().item()
            assert torch.allclose(xf, rf, atol=atol, rtol=rtol), f"{name}: max error {err:.3g}"


def check_attention(fn, q, k, v, *, causal=False, scale=None, atol64=1e-10, factor=2.0, **kwargs):
    """Run ``fn(q, k, v, causal=..., scale=..., **kwargs)`` and check it against the reference.

    float64 input: exact against ``naive_attention``. Other dtypes: output
    and lse dtypes follow the spec, and both pass :func:`assert_within_2x_rule`
    against the float64 reference with ``naive_attention(precision="input")``
    as the baseline (the lse baseline is float32 for low precision, as
    computed by the naive path). Returns ``(out, lse)``.
    """
    out, lse = fn(q, k, v, causal=causal, scale=scale, **kwargs)
    assert out.dtype == q.dtype, f"out dtype {out.dtype} != input dtype {q.dtype}"
    assert lse.dtype == expected_lse_dtype(q.dtype), f"lse dtype {lse.dtype} for {q.dtype} input"
    b, n_q, h, d = q.shape
    assert out.shape == (b, n_q, h, d) and lse.shape == (b, h, n_q)
    ref_out, ref_lse = ringbook.naive_attention(*to64(q, k, v), causal=causal, scale=scale)
    if q.dtype == torch.float64:
        assert_matches_reference(out, lse, ref_out, ref_lse, atol=atol64, rtol=atol64)
    else:
        base_out, base_lse = ringbook.naive_attention(q, k, v, causal=causal, scale=scale, precision="input")
        assert_within_2x_rule(out, ref_out, base_out, factor=factor, what="out")
        assert_within_2x_rule(lse, ref_lse, base_lse, atol=rounding_atol(ref_lse, torch.float32),
                              factor=factor, what="lse")
    return out, lse


# --------------------------------------------------------------------------- multi-process tests

def refusal(fn):
    """Run ``fn`` (on a spawned rank) and describe how it failed: type, message, seconds taken."""
    import time

    t0 = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return {"type": type(exc).__name__, "msg": str(exc), "elapsed": time.monotonic() - t0}
    return {"type": None, "msg": "no error", "elapsed": time.monotonic() - t0}


def load_rank_results(save_dir, world):
    """The ``rank<r>.pt`` files that each spawned rank saved in ``save_dir``."""
    from pathlib import Path

    return [torch.load(Path(save_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
