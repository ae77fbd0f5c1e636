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
