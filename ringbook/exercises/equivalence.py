"""Exercises of notebook 04 (equivalence): the 2× rule, inputs that expose a bug, a check that catches mutants.

The mutants are plausible wrong attention kernels, each one line away from
a right one (:func:`attention_with_bug`): the notebook runs them beside the
right implementations so the 2× rule can be seen catching them, and the
checkers use them as the bugs a learner's check must catch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..bench.measure import WrongResult
from ..bench.rules import finite_max_error, rounding_atol, within_2x_rule
from ..naive import naive_attention
from ._core import _gen, _run

HALF = (torch.float16, torch.bfloat16)
BUGS = {  # name -> what the kernel gets wrong
    "statistics cast per block": "rounds the running max m and sum ℓ to the input dtype (bf16/fp16) after each "
                                 "block of keys, instead of keeping them in float32",
    "no max subtraction": "computes exp(s) without subtracting the running maximum m first",
    "scale 1/d": "scales the scores by 1/d instead of 1/√d",
    "diagonal off by one": "masks key j ≥ i instead of j > i: a query no longer sees itself",
}


def attention_with_bug(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       bug: str | None = None, block_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax attention (notebook 01), ``block_size`` keys at a time (default: one), with float32
    accumulators and at most one bug.

    ``bug``: None (right) or a key of :data:`BUGS`. ``b n h d`` in, ``(out, lse)`` out; out in the input dtype,
    lse float32 for half precision (as ringbook's functions).
    """
    if bug is not None and bug not in BUGS:
        raise ValueError(f"bug must be None or one of {list(BUGS)}, got {bug!r}")
    b, n, h, d = q.shape
    work = torch.float32 if q.dtype in HALF else q.dtype
    scale = 1 / d if bug == "scale 1/d" else d ** -0.5
    qf, kf, vf = (x.to(work).transpose(1, 2) for x in (q, k, v))  # b h n d
    m = torch.full((b, h, n), -math.inf, dtype=work)
    l = torch.zeros(b, h, n, dtype=work)
    acc = torch.zeros(b, h, n, d, dtype=work)
    i = torch.arange(n)[:, None]
    for j0 in range(0, n, block_size):
        s = qf @ kf[:, :, j0:j0 + block_size].transpose(-1, -2) * scale
        if causal:
            j = torch.arange(j0, min(j0 + block_size, n))[None, :]
            s = s.masked_fill(j >= i if bug == "diagonal off by one" else j > i, -math.inf)
        if bug == "no max subtraction":
            p = torch.exp(s)
            l, acc = l + p.sum(-1), acc + p @ vf[:, :, j0:j0 + block_size]
            continue
        m_new = torch.maximum(m, s.amax(-1))
        safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
        alpha, p = torch.exp(m - safe), torch.exp(s - safe[..., None])
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p @ vf[:, :, j0:j0 + block_size]
        m = m_new
        if bug == "statistics cast per block":
            m, l = m.to(q.dtype).to(work), l.to(q.dtype).to(work)
    out = torch.where(l[..., None] > 0, acc / l[..., None], 0.0)
    m = torch.zeros_like(m) if bug == "no max subtraction" else m
    lse = torch.where(l > 0, m + torch.log(l), -math.inf)
    return out.transpose(1, 2).to(q.dtype), lse


def rule_ratio(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> float:
    """The worst ratio err / bound of ``fn``'s out and lse on these (rounded) inputs: ≤ 1 passes.

    float64 inputs: bound 1e-10; float32: 1e-5; half precision: the 2× rule against
    ``naive_attention(precision="input")``. A NaN, or ±inf where the reference is finite, is ``inf``.
    """
    ref = naive_attention(q.double(), k.double(), v.double(), causal=causal)
    got = fn(q, k, v, causal=causal)
    base = naive_attention(q, k, v, causal=causal, precision="input") if q.dtype in HALF else None
    worst = 0.0
    for x, (g, r) in enumerate(zip(got, ref)):
        try:
            err = finite_max_error(g, r)
            if base is None:
                bound = 1e-10 if q.dtype == torch.float64 else 1e-5
            else:
                bound = 2 * finite_max_error(base[x], r) + rounding_atol(r, g.dtype)
        except WrongResult:
            return math.inf
        worst = max(worst, err / bound)
    return worst


def check_passes_2x_rule(fn: Callable) -> bool | None:
    """``fn(out, ref64, out_naive, atol) -> bool``: flash-attention's 2× rule on one quantity."""
    gen = _gen(4)
    ref = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    naive = (ref + 1e-3 * torch.randn(6, 3, generator=gen, dtype=torch.float64)).to(torch.float16)
    err_naive = (naive.double() - ref).abs().max().item()
    atol = rounding_atol(ref, torch.float16)
    lse = torch.tensor([0.5, -math.inf, 2.0], dtype=torch.float64)

    def shifted(delta):
        out = ref.clone()
        out[2, 1] += delta
        return out.to(torch.float16)

    bound = 2 * err_naive + atol
    cases = [("the naive path itself", (naive, ref, naive, atol)),
             ("an error just under 2·err_naive + atol", (shifted(0.95 * bound), ref, naive, atol)),
             ("an error 3× err_naive", (shifted(3 * err_naive + atol), ref, naive, atol)),
             ("a NaN", (torch.where(torch.arange(18).view(6, 3) == 7, torch.nan, ref).to(torch.float16), ref, naive,
                        atol)),
             ("an lse with a -inf row, matched", (lse.float(), lse, lse.float(), 1e-6)),
             ("an lse whose -inf row became finite", (torch.tensor([0.5, -1e30, 2.0]), lse, lse.float(), 1e-6)),
             ("atol alone allows it (err_naive = 0)", (shifted(0.5 * atol), ref, ref.to(torch.float16), atol))]
    right = []
    for label, args in cases:
        try:
            want = within_2x_rule(*args[:2], args[2], atol=args[3])[0]
        except WrongResult:
            want = False
        right.append((label, args, want, lambda got, want: _bool(got) is want))
    return _run("passes_2x_rule", fn, right, lambda c: (
        "a bool" if _bool(c["got"]) is None else
        "err = max |out − ref| over the entries where ref is finite (in float64); ±inf must sit where ref has them "
        "and NaN never passes; pass when err ≤ 2 · err(out_naive) + atol"))


def _bool(got) -> bool | None:
    from .measuring import _as_bool

    return _as_bool(got)


def check_overflow_inputs(fn: Callable) -> bool | None:
    """``fn(q, k, v) -> (q, k, v)``: float16 inputs on which the "no max subtraction" mutant fails the 2× rule
    while the right kernel passes, every entry finite in float16."""
    cases = []
    for seed, (n, h, d), causal in ((0, (16, 2, 8), False), (1, (32, 1, 16), True), (2, (8, 3, 4), False)):
        gen = _gen(seed)
        q, k, v = (torch.randn(1, n, h, d, generator=gen).to(torch.float16) for _ in range(3))
        cases.append((f"n={n}, h={h}, d={d}, causal={causal}", (q, k, v), causal, None))

    def judge(got, causal):
        if not (isinstance(got, tuple | list) and len(got) == 3 and all(isinstance(x, torch.Tensor) for x in got)):
            return "not three tensors"
        q, k, v = got
        if any(x.dtype != torch.float16 or not torch.isfinite(x).all() for x in got):
            return "not finite float16 tensors"
        if q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3]:
            return "shapes that do not fit attention"
        if rule_ratio(attention_with_bug, q, k, v, causal=causal) > 1:
            return "inputs on which even the right kernel fails"
        if rule_ratio(lambda *a, **kw: attention_with_bug(*a, bug="no max subtraction", **kw), q, k, v,
                      causal=causal) <= 1:
            return "inputs on which the mutant passes"
        return "ok"

    mask = {label: causal for label, _, causal, _ in cases}
    runs = [(label, args, "inputs on which the right kernel passes and the mutant fails",
             lambda got, want, causal=causal: judge(got, causal) == "ok") for label, args, causal, _ in cases]
    return _run("overflow_inputs", fn, runs, lambda c: (
        f"you returned {judge(c['got'], mask[c['label']])}. exp(s) overflows float32 above s ≈ 88: make some scores "
        "that large (scale q or k up) while every input stays a finite float16 (below 65504)"))


def check_catches_bugs(fn: Callable) -> bool | None:
    """``fn(attention) -> bool``: True for a right attention, False for each of :data:`BUGS` (attention takes
    ``(q, k, v, *, causal)`` and returns ``(out, lse)``)."""
    import functools

    from ..ring import ring_attention

    suspects = [("naive_attention in the input dtype", functools.partial(naive_attention, precision="input"), True),
                ("blockwise, right", attention_with_bug, True),
                ("ring_attention, 4 ranks, zigzag", functools.partial(ring_attention, ring_size=4, layout="zigzag"),
                 True)]
    suspects += [(f"mutant: {name}", functools.partial(attention_with_bug, bug=name), False) for name in BUGS]
    return _run("catches_bugs", fn, [(label, (f,), want, lambda got, want: _bool(got) is want)
                                     for label, f, want in suspects], lambda c: (
        "a bool" if _bool(c["got"]) is None else
        "run it the way the matrix does: half precision (a rounding bug hides in float32), with and without the mask "
        "(a diagonal bug needs the mask), and on logits large enough to overflow exp (exercise 04.2's inputs)"))
