"""The one distributed entry: a strategy's plan and mover, run on the ring engine over a process group.

Every multi-process attention of :mod:`ringbook.distributed` is three steps:

1. :func:`open_group` — the process group as a :class:`~ringbook.distributed.comm._Ring`
   (rank, world, the deadline every wait gets, the caller's name for errors);
2. :func:`ringbook.distributed.comm.agree` — the one agreement check: every
   rank's input and options, compared in one collective, refused on every
   rank alike;
3. :func:`run_on_group` — the strategy's plan (:mod:`ringbook.fast.plans`)
   and a mover for it, on :func:`ringbook.fast.engine.run` (forward,
   backward, the one autograd Function).

The ring (:mod:`ringbook.distributed.ring`, a :class:`~ringbook.distributed.ring.P2PMover`)
and dilated attention (:mod:`ringbook.distributed.dilated`, a
:class:`~ringbook.distributed.dilated.DilatedMover`) are written this way; a
new strategy (all-gather, Ulysses) writes its mover, its plan and, where its
layout differs from the caller's, how tensors enter and leave the engine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..fast.engine import Job, Mover, Plan, Settings, run
from .comm import _Ring, resolve_timeout


def open_group(group: torch.distributed.ProcessGroup | None, timeout: float | None, op: str) -> _Ring:
    """The process group ``group`` (None: the world) as a ring, with the deadline ``timeout`` (seconds, or the
    default of :func:`~ringbook.distributed.comm.resolve_timeout`); ``op`` names the caller in every error."""
    return _Ring.of(group, resolve_timeout(timeout), op=op)


def run_on_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, plan: Plan,
                 mover: Callable[[torch.Tensor, torch.Tensor, bool], Mover], settings: Settings,
                 enter: Callable[..., torch.Tensor] | None = None, leave: Callable[..., torch.Tensor] | None = None,
                 enter_kv: Callable[..., torch.Tensor] | None = None,
                 leave_kv: Callable[..., torch.Tensor] | None = None,
                 enter_copies: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of this rank's queries: ``plan`` run by the engine with ``mover(k, v, backward)``.

    ``enter``/``leave`` map the caller's tensors to the engine's layout and back
    (default: as they are); ``enter_copies``: ``enter`` copies (a gather or a
    collective), so a call that will be differentiated keeps the entered
    tensors rather than entering them again in the backward. ``enter_kv`` /
    ``leave_kv``: where k/v enter (and dK/dV leave) differently from q.
    """
    extra = {} if enter is None else {"enter": enter}
    if leave is not None:
        extra["leave"] = leave
    job = Job(settings=settings, start=lambda k_, v_, backward: (mover(k_, v_, backward), plan),
              enter_copies=enter_copies, enter_kv=enter_kv, leave_kv=leave_kv, **extra)
    return run(q, k, v, job)
