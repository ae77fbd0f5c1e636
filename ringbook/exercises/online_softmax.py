"""Exercises of notebook 01 (the online softmax): the lse from (m, l), the merge, one online step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..online_softmax import merge_partials
from ._core import _close, _gen, _run


def check_lse_from_m_l(fn: Callable) -> bool | None:
    """``fn(m, l) -> lse`` for one block: ``m`` the row maxima ``(i,)``, ``l = Σ_j e^{s_ij − m_i}`` ``(i,)``."""
    g = _gen(0)
    cases = []
    for label, s in (("a 3×5 block", torch.randn(3, 5, generator=g, dtype=torch.float64)),
                     ("a block of one key (length 1)", torch.randn(4, 1, generator=g, dtype=torch.float64)),
                     ("logits scaled by 100", 100 * torch.randn(3, 6, generator=g, dtype=torch.float64))):
        m = s.amax(dim=1)
        cases.append((label, (m, torch.exp(s - m[:, None]).sum(dim=1)), torch.logsumexp(s, dim=1), _close))
    m = torch.tensor([float("-inf"), 0.5], dtype=torch.float64)
    cases.append(("a fully masked row (m = -inf, l = 0)", (m, torch.tensor([0.0, 2.0], dtype=torch.float64)),
                  torch.tensor([float("-inf"), 0.5 + math.log(2.0)], dtype=torch.float64), _close))
    return _run("lse_from_m_l", fn, cases, lambda c: (
        "a fully masked row has l = 0: its lse is -inf (log 0), not NaN" if "masked" in c["label"] else
        "lse = m + log l: the maximum was subtracted inside l, so it must be added back"))


def _merge_cases():
    g = _gen(1)
    cases = []

    def partial(n, d, scale):  # float32, where e^{100·x} overflows as it would in a real kernel
        s = scale * torch.randn(n, 5, generator=g)
        v = torch.randn(5, d, generator=g)
        return torch.softmax(s, dim=1) @ v, torch.logsumexp(s, dim=1)

    for label, scale in (("two random partials", 1.0), ("logits scaled by 100", 100.0)):
        (oa, la), (ob, lb) = partial(3, 4, scale), partial(3, 4, scale)
        cases.append((label, (oa, la, ob, lb)))
    oa, la = partial(1, 2, 1.0)
    cases.append(("one row (length 1)", (oa, la, *partial(1, 2, 1.0))))
    ob, lb = torch.zeros(2, 3), torch.full((2,), float("-inf"))
    oa, la = partial(2, 3, 1.0)
    cases.append(("an empty partial (0, -inf) on one side: the identity", (oa, la, ob, lb)))
    cases.append(("both sides empty", (ob.clone(), lb.clone(), ob, lb)))
    out = []
    for label, (oa, la, ob, lb) in cases:
        o, l = merge_partials(oa[None, :, None], la[None, None], ob[None, :, None], lb[None, None])
        out.append((label, (oa, la, ob, lb), (o[0, :, 0], l[0, 0]),
                    lambda got, want: isinstance(got, tuple) and len(got) == 2 and _close(got[0], want[0])
                    and _close(got[1], want[1])))
    return out


def check_merge_partials(fn: Callable) -> bool | None:
    """``fn(out_a, lse_a, out_b, lse_b) -> (out, lse)``: equation (M) for two partials over disjoint keys."""
    def hint(c):
        if "empty" in c["label"]:
            return ("an empty side has lse -inf: give it weight 0 (e^{-inf - lse}); with both sides empty avoid "
                    "-inf - (-inf) = NaN and return out 0, lse -inf")
        if "100" in c["label"]:
            return "subtract the larger lse before exponentiating (e^{lse_a} overflows), or use torch.logaddexp"
        return ("weight each side by its share of the softmax denominator, e^{lse_a - lse} and e^{lse_b - lse} with "
                "lse = log(e^{lse_a} + e^{lse_b}); a plain average of the two outs is not attention")
    return _run("merge_partials", fn, _merge_cases(), hint)


def check_online_step(fn: Callable) -> bool | None:
    """``fn(m, l, acc, s, v) -> (m, l, acc)``: fold one key block into the running max, sum and unnormalised output.

    ``m``, ``l`` are ``(i,)``, ``acc`` ``(i, d)`` (``Σ_j e^{s_ij − m_i} v_j``), the
    block's scores ``s`` ``(i, j)`` and values ``v`` ``(j, d)``. The checker runs
    the whole loop from ``(−inf, 0, 0)`` and compares ``acc / l`` with softmax.
    """
    g = _gen(2)
    cases = []
    for label, scale, blocks, masked in (("three blocks of 4 keys", 1.0, [4, 4, 4], False),
                                         ("logits scaled by 100", 100.0, [3, 5], False),
                                         ("blocks of one key (length 1)", 1.0, [1, 1, 1], False),
                                         ("a first block fully masked for row 0", 1.0, [3, 4], True)):
        s = scale * torch.randn(2, sum(blocks), generator=g)  # float32: e^{100·x} overflows, as in a kernel
        if masked:
            s[0, :blocks[0]] = float("-inf")
        v = torch.randn(sum(blocks), 3, generator=g)
        cases.append((label, (s, v, tuple(blocks)), torch.softmax(s, dim=1) @ v))

    def loop(s, v, blocks):
        m = torch.full((s.shape[0],), float("-inf"), dtype=s.dtype)
        l, acc = torch.zeros(s.shape[0], dtype=s.dtype), torch.zeros(s.shape[0], v.shape[1], dtype=s.dtype)
        start = 0
        for size in blocks:
            m, l, acc = fn(m, l, acc, s[:, start:start + size], v[start:start + size])
            start += size
        return acc / l[:, None]

    def hint(c):
        if "masked" in c["label"]:
            return ("a row whose block is all -inf keeps m = -inf: guard the rescale e^{m_old − m_new} (−inf − (−inf) "
                    "is NaN) with torch.where, or take m_new = max(m_old, max_j s_ij) and use 0 where it is -inf")
        if "100" in c["label"]:
            return "exponentiate s − m_new, never s itself; rescale l and acc by e^{m_old − m_new}"
        return "m_new = max(m, rowmax(s)); l and acc are rescaled by e^{m − m_new}, then the block's terms are added"
    return _run("online_step", loop, [(lab, args, want, _close) for lab, args, want in cases], hint)
