"""Checkers for the notebooks' exercises: ``check_<name>(fn)`` runs awkward cases and says what went wrong.

Each exercise is a small function the learner writes in a stub cell of
notebooks 01–03, right after the idea it needs is derived. Its checker

* runs the function on awkward cases (length 1, fully masked rows, logits
  scaled by 100, the diagonal step, the last offset);
* prints ✓ and returns True, or prints the first failing case — its inputs,
  what was expected and what came back — with a hint about the usual mistake,
  and returns False;
* prints "not attempted yet" and returns None while the stub still raises
  ``NotImplementedError``, so an unsolved notebook still runs.

The references are the library's own functions (the merge, the layouts, the
schedule, the dilated weights), so an exercise checks the learner against the
code the rest of the notebooks use. Shapes are kept small and per row: a
block's scores ``s`` are ``(i, j)``, values ``v`` ``(j, d)``, a partial ``out``
``(i, d)`` and its ``lse`` ``(i,)``. The solutions are in
``notebooks/solutions/`` (plain Python; ``python tools/teacher_build.py``
writes executed notebooks with them filled in).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .dilated import dilated_weights
from .online_softmax import merge_partials
from .schedule import layout_positions, ring_schedule

NOT_ATTEMPTED = "not attempted yet"


class _Failed(Exception):
    """A case the learner's function got wrong (or raised on)."""


def _close(got, want, atol=None) -> bool:
    if not isinstance(got, torch.Tensor):
        try:
            got = torch.as_tensor(got, dtype=want.dtype)
        except (TypeError, ValueError, RuntimeError):
            return False
    got = got.to(want.dtype)
    if got.shape != want.shape:
        return False
    same_inf = torch.equal(torch.isinf(got) & (got > 0), torch.isinf(want) & (want > 0)) and torch.equal(
        torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    atol = atol if atol is not None else (1e-9 if want.dtype == torch.float64 else 1e-4)
    rtol = 1e-7 if want.dtype == torch.float64 else 1e-4
    return bool(same_inf and not torch.isnan(got).any() and torch.allclose(got[fin], want[fin], atol=atol, rtol=rtol))


def _run(name: str, fn: Callable, cases: list, hint: Callable[[dict], str]) -> bool | None:
    """Run the cases ``[(label, args, want, compare)]``; print the verdict; True, False or None (not attempted)."""
    if not callable(fn):
        raise TypeError(f"check_{name} takes your function, got {type(fn).__name__}")
    for label, args, want, compare in cases:
        try:
            got = fn(*args)
        except NotImplementedError:
            print(f"{name}: {NOT_ATTEMPTED} (replace the `raise NotImplementedError` with your code)")
            return None
        except Exception as exc:  # noqa: BLE001 - the learner's code: report, do not crash the notebook
            got = f"{type(exc).__name__}: {exc}"
        try:
            right = not isinstance(got, str) and bool(compare(got, want))
        except Exception:  # noqa: BLE001 - an answer of the wrong type or shape is a wrong answer
            right = False
        if not right:
            shown = ", ".join(_show(a) for a in args)
            print(f"✗ {name}: fails on {label}\n  inputs:   {shown}\n  expected: {_show(want)}\n"
                  f"  got:      {_show(got)}\n  hint: {hint({'label': label, 'got': got, 'want': want})}")
            return False
    print(f"✓ {name}: all {len(cases)} cases pass")
    return True


def _show(x) -> str:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.numel() > 12:
            return f"tensor of shape {tuple(x.shape)}"
        return str((x.double().round(decimals=4) if x.is_floating_point() else x).tolist())
    if isinstance(x, tuple):
        return "(" + ", ".join(_show(a) for a in x) + ")"
    return repr(x)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- notebook 01

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


# --------------------------------------------------------------------------- notebook 02

def check_zigzag_positions(fn: Callable) -> bool | None:
    """``fn(n, world, rank) -> positions``: the token positions rank ``rank`` holds in the zigzag layout, in order."""
    cases = []
    for n, w in ((8, 2), (12, 3), (16, 4), (4, 1), (2, 1)):
        ref = layout_positions(n, w, "zigzag")
        for rank in range(w):
            cases.append((f"n={n}, world={w}, rank {rank}", (n, w, rank), ref[rank].long(),
                          lambda got, want: _close(torch.as_tensor(got).long().flatten(), want)))
    return _run("zigzag_positions", fn, cases, lambda c: (
        "cut the sequence into 2·world chunks of n/(2·world); rank r holds chunk r and chunk 2·world − 1 − r, "
        "the first then the second"))


def check_causal_skip(fn: Callable) -> bool | None:
    """``fn(rank, step, world) -> bool``: whether, causal and contiguous, rank ``rank`` skips its block at ``step``.

    At step t rank r holds the K/V shard of rank (r − t) mod w. A block is
    skipped when every key comes after every query.
    """
    cases = []
    for w in (1, 2, 3, 5):
        sched = ring_schedule(8 * w, w, layout="contiguous", causal=True)
        for t in range(w):
            for r in range(w):
                cases.append((f"world={w}, step {t}, rank {r}", (r, t, w), sched[t][r].work == 0,
                              lambda got, want: isinstance(got, (bool, int)) and bool(got) == want))
    return _run("causal_skip", fn, cases, lambda c: (
        "step 0 is the diagonal (the rank's own shard, half masked): never skipped; a later step is skipped when "
        "the shard came from a later rank, (r − t) mod w > r"))


# --------------------------------------------------------------------------- notebook 03

def check_kept_positions(fn: Callable) -> bool | None:
    """``fn(n, segment, rate, offset) -> positions``: the positions one (segment, rate) pattern keeps at ``offset``."""
    cases = []
    for n, seg, r in ((16, 8, 2), (12, 12, 3), (8, 4, 1), (24, 6, 3), (9, 9, 9)):
        for o in sorted({0, r - 1}):
            heads = r if o < r else 1
            weights = dilated_weights(n, heads, segment_lengths=[seg], dilation_rates=[r], heads="all")
            kept = torch.nonzero(weights[o].diagonal()).flatten()  # head o has offset o mod r = o
            cases.append((f"n={n}, segment {seg}, rate {r}, offset {o}", (n, seg, r, o), kept,
                          lambda got, want: _close(torch.as_tensor(got).long().flatten(), want)))
    return _run("kept_positions", fn, cases, lambda c: (
        "keep p when (p mod segment) mod rate == offset, in every segment of the sequence (the offset counts from "
        "the start of each segment)"))


CHECKERS = {name.removeprefix("check_"): f for name, f in globals().items() if name.startswith("check_")}
