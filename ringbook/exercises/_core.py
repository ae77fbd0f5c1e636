"""What every checker shares: run the cases, compare, show a failing case, say "not attempted yet"."""

from __future__ import annotations

from collections.abc import Callable

import torch

NOT_ATTEMPTED = "not attempted yet"


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


class _Raised(str):
    """What the learner's function raised, shown in place of a result."""


def _run(name: str, fn: Callable, cases: list, hint: Callable[[dict], str]) -> bool | None:
    """Run the cases ``[(label, args, want, compare)]``; print the verdict; True, False or None (not attempted).

    ``NotImplementedError`` on the first case is the untouched stub ("not
    attempted yet"); on a later case, after earlier cases ran, it is a branch
    still unwritten, and a failure.
    """
    if not callable(fn):
        raise TypeError(f"check_{name} takes your function, got {type(fn).__name__}")
    for index, (label, args, want, compare) in enumerate(cases):
        try:
            got = fn(*args)
        except NotImplementedError as exc:
            if index == 0:
                print(f"{name}: {NOT_ATTEMPTED} (replace the `raise NotImplementedError` with your code)")
                return None
            got = _Raised(f"NotImplementedError {exc}".strip() + f" (after {index} case(s) ran: a branch is unwritten)")
        except Exception as exc:  # noqa: BLE001 - the learner's code: report, do not crash the notebook
            got = _Raised(f"{type(exc).__name__}: {exc}")
        try:
            right = not isinstance(got, _Raised) and bool(compare(got, want))
        except Exception:  # noqa: BLE001 - an answer of the wrong type or shape is a wrong answer
            right = False
        if not right:
            shown = ", ".join(_show(a) for a in args)
            want_text, got_text = _show(want), str(got) if isinstance(got, _Raised) else _show(got)
            if got_text == want_text:  # the same printout: say what differs
                got_text += _difference(got, want)
            print(f"✗ {name}: fails on {label}\n  inputs:   {shown}\n  expected: {want_text}\n"
                  f"  got:      {got_text}\n  hint: {hint({'label': label, 'got': got, 'want': want, 'args': args})}")
            return False
    print(f"✓ {name}: all {len(cases)} cases pass")
    return True


def _as_bool(got) -> bool | None:
    """A yes/no answer in any common form (bool, 0/1, numpy or one-element torch bool), else None."""
    if isinstance(got, torch.Tensor):
        return bool(got.item()) if got.numel() == 1 and got.dtype in (torch.bool, torch.int64, torch.int32) else None
    if type(got).__module__ == "numpy" and getattr(got, "shape", None) in ((), (1,)) and got.dtype.kind in "bi":
        return bool(got.item() if got.shape == () else got[0])
    if isinstance(got, (bool, int)) and got in (0, 1):
        return bool(got)
    return None


def _same_bool(got, want: bool) -> bool:
    return _as_bool(got) is not None and _as_bool(got) == want


def _pair(got):
    """``(a, b)`` from a tuple or list of two, else None (a list ``[out, lse]`` is as good as a tuple)."""
    return tuple(got) if isinstance(got, (tuple, list)) and len(got) == 2 else None


def _same_integers(got, want: torch.Tensor) -> bool:
    """Exactly the integers ``want`` (in order), from a list, range, generator, numpy array or tensor; 2.5 is not 2,
    True is not 1, and a set or dict (no order) is never right."""
    if isinstance(got, (set, frozenset, dict)):
        return False
    try:
        got = torch.as_tensor(got)
    except (TypeError, ValueError, RuntimeError):
        try:
            got = torch.as_tensor(list(got))  # a generator
        except (TypeError, ValueError, RuntimeError):
            return False
    if got.dtype == torch.bool or got.is_complex():
        return False
    got = got.flatten()
    if got.shape != want.flatten().shape:
        return False
    return bool(torch.equal(got.double(), want.flatten().double()))  # no .long(): a fraction never rounds to right


def _difference(got, want) -> str:
    """Why two answers that print the same differ: their type, or where their values part."""
    if type(got) is not type(want):
        return f"  (a {type(got).__module__}.{type(got).__qualname__}, not a {type(want).__name__})"
    parts = list(zip(got, want)) if isinstance(want, (tuple, list)) else [(got, want)]
    notes = []
    for i, (a, b) in enumerate(parts):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            gap = (a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max().item()
            if gap > 0:
                notes.append(f"item {i}: off by up to {gap:.3g}" if len(parts) > 1 else f"off by up to {gap:.3g}")
    return f"  ({'; '.join(notes)})" if notes else ""


def _show(x) -> str:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.numel() > 12:
            return f"tensor of shape {tuple(x.shape)}"
        return str((x.double().round(decimals=4) if x.is_floating_point() else x).tolist())
    if isinstance(x, tuple):
        return "(" + ", ".join(_show(a) for a in x) + ")"
    if isinstance(x, list) and any(isinstance(a, torch.Tensor) for a in x):
        return "[" + ", ".join(_show(a) for a in x) + "]"
    return repr(x)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
