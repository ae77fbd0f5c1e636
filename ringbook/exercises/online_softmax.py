"""Exercises of notebook 01 (the online softmax): the lse from (m, l), the merge, one online step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..online_softmax import merge_partials
from ._core import _close, _gen, _pair, _run


def check_lse_from_m_l(fn: Callable) -> bool | None:
    """``fn(m, l) -> lse`` for one block: ``m`` the row maxima ``(i,)``, ``l = Σ_j e^{s_ij − m_i}`` ``(i,)``.

    In float32, as a kernel computes it: with logits scaled by 100, ``m`` is a
    few hundred and ``e^m`` overflows (float32 stops at e^88), so the unsafe
    ``log(l·e^m)`` fails where ``m + log l`` does not.
    """
    g = _gen(0)
    cases = []
    for label, s in (("a 3×5 block", torch.randn(3, 5, generator=g)),
                     ("a block of one key (length 1)", torch.randn(4, 1, generator=g)),
                     ("logits scaled by 100 (float32: e^m overflows)", 100 * torch.randn(3, 6, generator=g))):
        m = s.amax(dim=1)
        cases.append((label, (m, torch.exp(s - m[:, None]).sum(dim=1)), torch.logsumexp(s.double(), dim=1).float(),
                      _close))
    m = torch.tensor([float("-inf"), 0.5])
    cases.append(("a fully masked row (m = -inf, l = 0)", (m, torch.tensor([0.0, 2.0])),
                  torch.tensor([float("-inf"), 0.5 + math.log(2.0)]), _close))

    def hint(c):
        if "masked" in c["label"]:
            return "a fully masked row has l = 0: its lse is log 0 = -inf, not NaN and not a large finite number"
        if "100" in c["label"]:
            return ("e^m overflows float32 here (m > 88): stay in log space, where the pieces of lse are added, never "
                    "exponentiated")
        return "l was summed after m was subtracted from every score: that m has to be added back, in log space"
    return _run("lse_from_m_l", fn, cases, hint)


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
                    lambda got, want: _pair(got) is not None and _close(_pair(got)[0], want[0])
                    and _close(_pair(got)[1], want[1])))
    return out


def check_merge_partials(fn: Callable) -> bool | None:
    """``fn(out_a, lse_a, out_b, lse_b) -> (out, lse)``: equation (M) for two partials over disjoint keys."""
    def hint(c):
        if _pair(c["got"]) is None:
            return "return two things, the merged out (i, d) and the merged lse (i,): `return out, lse`"
        if "empty" in c["label"]:
            return ("an empty side has lse -inf and must weigh 0; when both sides are empty, -inf − (-inf) is NaN: "
                    "what should the merge of two empty partials be? (the identity of (M))")
        if "100" in c["label"]:
            return "e^{lse} overflows float32 when lse > 88: never exponentiate an lse on its own, only differences"
        return ("a plain average of the two outs is not attention: each side counts in proportion to its share of "
                "the softmax denominator; what is each side's share, from the two lse?")
    return _run("merge_partials", fn, _merge_cases(), hint)


def _online_reference(m, l, acc, s, v):
    """One step of the online softmax, the library's convention: m = -inf rows rescale by 1, add e^{-inf} = 0."""
    m_new = torch.maximum(m, s.amax(dim=1))
    m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    scale = torch.exp(m - m_safe)
    p = torch.exp(s - m_safe[:, None])
    return m_new, l * scale + p.sum(dim=1), acc * scale[:, None] + p @ v


def check_online_step(fn: Callable) -> bool | None:
    """``fn(m, l, acc, s, v) -> (m, l, acc)``: fold one key block into the running max, sum and unnormalised output.

    ``m``, ``l`` are ``(i,)``, ``acc`` ``(i, d)``, the block's scores ``s``
    ``(i, j)`` and values ``v`` ``(j, d)``, all float32. The state after the
    step is checked *as defined*, not only the final ``acc / l``: ``m`` is the
    running maximum of every score seen, ``l = Σ_j e^{s_ij − m_i}`` and
    ``acc = Σ_j e^{s_ij − m_i} v_j`` over every key seen, both relative to
    the new ``m``. So a step that skips the max subtraction fails even if it
    computes in float64, where e^{100·x} would not overflow. Each step is
    called with the correct state before it, and a failure shows that call.
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
        m, l, acc = torch.full((2,), float("-inf")), torch.zeros(2), torch.zeros(2, 3)
        start = 0
        for i, size in enumerate(blocks):
            args = (m, l, acc, s[:, start:start + size], v[start:start + size])
            want = _online_reference(*args)
            cases.append((f"{label}, block {i + 1} of {len(blocks)}", args, want,
                          lambda got, want: isinstance(got, (tuple, list)) and len(got) == 3
                          and all(_close(a, b) for a, b in zip(got, want))))
            m, l, acc = want
            start += size

    def hint(c):
        got, want = c["got"], c["want"]
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            return "return the new state, three tensors: `return m_new, l_new, acc_new`"
        if "masked" in c["label"]:
            return ("a row that has seen only -inf keeps m = -inf, and −inf − (−inf) is NaN: use the convention of §3 "
                    "(such a row's old l and acc are 0, so any finite factor will do)")
        if not _close(got[0], want[0]):
            return "m is the running maximum: of the old m and of every score of this block"
        if "100" in c["label"] or not _close(got[1], want[1]):
            return ("l and acc are sums of e^{s − m} for the *new* m: exponentiate only differences to the maximum, "
                    "never s itself; the old l and acc were relative to the old m")
        return "acc is rescaled like l, then the block's weighted values are added"
    return _run("online_step", fn, cases, hint)
