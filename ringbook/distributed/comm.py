"""Point-to-point plumbing shared by the multi-process rings (:mod:`ringbook.distributed`,
:mod:`ringbook.distributed.dilated`): who a rank talks to, deadlines on every wait, and
errors that name the peer and the step instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import numbers
import os
import struct
import time
import zlib

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Who this rank talks to, and how long it waits."""

    group: object
    rank: int  # rank in the group
    world: int
    next_global: int  # global rank of group rank (rank + 1) % world
    prev_global: int
    timeout_s: float
    op: str = "ring_attention"  # the caller's name, for error messages

    def describe(self, phase: str, step: int, what: str, *, hops: int = 1) -> str:
        """Words for an error: which step, which peer, what was in flight (``hops`` ranks round the ring)."""
        return (f"{phase} step {step}: receiving {what} from rank {(self.rank - hops) % self.world} "
                f"(and sending to rank {(self.rank + hops) % self.world})")

    def global_rank(self, rank: int) -> int:
        """The global rank of group rank ``rank`` (mod the group's size)."""
        rank %= self.world
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    @classmethod
    def of(cls, group, timeout_s: float, op: str = "ring_attention") -> _Ring:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"ringbook.distributed.{op} needs an initialised process group: start the "
                "processes with torchrun or ringbook.distributed.spawn and call "
                f"torch.distributed.init_process_group first (ringbook.{op} plays the ring in one process)"
            )
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        glob = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
        return cls(group, rank, world, glob((rank + 1) % world), glob((rank - 1) % world), timeout_s, op)


def resolve_timeout(timeout: float | _dt.timedelta | None) -> float:
    """Seconds to wait for a peer: ``timeout``, else ``$RINGBOOK_P2P_TIMEOUT``, else 60."""
    if timeout is None:
        env = os.environ.get("RINGBOOK_P2P_TIMEOUT")
        try:
            timeout = float(env) if env else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"RINGBOOK_P2P_TIMEOUT must be a number of seconds, got {env!r}") from None
    if isinstance(timeout, _dt.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _peer_error(ring: _Ring, what: str, exc: BaseException) -> Exception:
    """The error a rank raises when the network fails it: who, where, and what to do."""
    text = str(exc).strip()
    timed_out = isinstance(exc, TimeoutError) or "timed out" in text.lower() or "timeout" in text.lower()
    kind = TimeoutError if timed_out else RuntimeError
    return kind(
        f"{ring.op} on rank {ring.rank} of {ring.world}: {what} "
        f"{'did not complete within' if timed_out else 'failed before'} the {ring.timeout_s:g} s timeout "
        f"({type(exc).__name__}: {text[:300]}). The peer probably died, raised or stopped taking part — "
        "look at its own error; if the ring is just slow, pass a larger timeout= or set RINGBOOK_P2P_TIMEOUT."
    )


def _wait(works, ring: _Ring, what: str) -> None:
    """Wait for ``works`` for at most ``ring.timeout_s``; raise naming the peers and ``what``.

    gloo takes a deadline in ``work.wait(timeout=...)``; other backends (NCCL)
    are polled with ``is_completed()`` until the deadline, then waited on
    (which only orders the streams).
    """
    deadline = time.monotonic() + ring.timeout_s
    backend = dist.get_backend(ring.group)
    for work in works:
        try:
            if backend == "gloo":
                work.wait(timeout=_dt.timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
            else:
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError("deadline passed")
                    time.sleep(1e-4)
                work.wait()
        except Exception as exc:  # noqa: BLE001 - re-raised with who and where
            raise _peer_error(ring, what, exc) from exc


def _exchange(send: list[torch.Tensor], recv: list[torch.Tensor], ring: _Ring, tag: int, what: str, *,
              hops: int = 1):
    """Post sends of ``send`` to the rank ``hops`` ahead (the next one) and receives into ``recv`` from the rank
    ``hops`` behind."""
    to, frm = (ring.next_global, ring.prev_global) if hops == 1 else (
        ring.global_rank(ring.rank + hops), ring.global_rank(ring.rank - hops))
    ops = [dist.P2POp(dist.isend, t, to, ring.group, tag + i) for i, t in enumerate(send)]
    ops += [dist.P2POp(dist.irecv, t, frm, ring.group, tag + i) for i, t in enumerate(recv)]
    try:
        return dist.batch_isend_irecv(ops)
    except Exception as exc:  # noqa: BLE001 - a closed connection fails already here
        raise _peer_error(ring, what, exc) from exc


def agree_on_shards(ring: _Ring, info: list[int], problem: Exception | None, what: str,
                    how_to_shard: str) -> list[list[int]]:
    """Every rank shares a few ints about its input; all raise the same error or all go on.

    ``info[0]`` is 1 when this rank's own input passed its checks (else 0),
    ``info[1]`` its shard length, the rest whatever must agree across ranks.
    A rank whose input failed raises its own ``problem``; the others name it.
    Unequal shard lengths are refused on every rank, with ``how_to_shard``.
    Returns the table ``[rank][field]`` for further agreement checks.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(ring.group) == "nccl" \
        else torch.device("cpu")
    mine = torch.tensor(info, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(ring.world)]
    try:
        work = dist.all_gather(every, mine, group=ring.group, async_op=True)
    except Exception as exc:  # noqa: BLE001 - a closed connection fails already here
        raise _peer_error(ring, what, exc) from exc
    _wait([work], ring, what)
    table = torch.stack(every).cpu().tolist()
    if problem is not None:
        raise problem
    bad = [r for r, row in enumerate(table) if row[0] == 0]
    if bad:
        raise ValueError(f"rank(s) {bad} refused their input to {ring.op} (see their errors); every rank stops")
    lengths = [row[1] for row in table]
    if len(set(lengths)) != 1:
        raise ValueError(
            f"{ring.op} needs shards of equal length on every rank, got lengths {lengths} on ranks "
            f"0..{ring.world - 1}; {how_to_shard}")
    return table


def _encode(value, choices) -> int:
    """An option as one int64 that is equal across ranks exactly when the option is."""
    if choices is not None and value in choices:
        return list(choices).index(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and -(1 << 62) < value < (1 << 62):
        return value
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]  # exact: its bits
    return zlib.crc32(repr(list(value) if isinstance(value, tuple) else value).encode()) & 0x7FFFFFFF


def _decode(x: int, value, choices):
    if choices is not None and value in choices:
        return list(choices)[x]
    if isinstance(value, bool):
        return bool(x)
    if isinstance(value, float):
        return struct.unpack("<d", struct.pack("<q", x))[0]
    return x


def agree(ring: _Ring, problem: Exception | None, shard_len: int, fields: list[tuple[str, object]], *,
          how_to_shard: str, choices: dict | None = None, hints: dict | None = None) -> None:
    """The one agreement check of every distributed function: all ranks go on, or all raise the same error.

    Every rank all-gathers whether its own input passed its checks
    (``problem`` None), its shard length and one int per field (``fields``:
    ``[(name, value)]``, the same names on every rank, values None where
    ``problem`` is set; the options that must be the same on every rank: a
    bool or int as itself, a float by its bits, an enum by its index in
    ``choices[name]``, anything else by a digest of its ``repr``). Then a rank
    with a ``problem`` raises it and the others name that rank; unequal shard
    lengths are refused with ``how_to_shard``; a field that differs is refused
    naming it and the values on each rank (or, for a digest, which ranks
    agree and this rank's value), plus ``hints[name]``. One collective, with
    the ring's deadline, before any message of the call.
    """
    choices, hints = choices or {}, hints or {}
    if problem is None:
        info = [1, shard_len] + [_encode(value, choices.get(name)) for name, value in fields]
    else:
        info = [0] + [-1] * (1 + len(fields))
    table = agree_on_shards(ring, info, problem,
                            "checking the shards and options with all ranks before the first message (all_gather)",
                            how_to_shard)
    for col, (name, value) in enumerate(fields, start=2):
        values = [row[col] for row in table]
        if len(set(values)) == 1:
            continue
        readable = isinstance(value, (bool, int, float)) or value in choices.get(name, ())
        if readable:
            got = f"got {[_decode(x, value, choices.get(name)) for x in values]} on ranks 0..{ring.world - 1}"
        else:
            groups = [[r for r, x in enumerate(values) if x == y] for y in dict.fromkeys(values)]
            got = f"ranks agree only in groups {groups}; this rank (rank {ring.rank}) has {value!r}"
        raise ValueError(f"every rank must call {ring.op} with the same {name}, {got}{hints.get(name, '')}")


# --------------------------------------------------------------------------- collectives, each with the ring's deadline

# torch 2.13 renames the tensor collectives (all_gather_single, reduce_scatter_single); older releases have only
# the *_into_tensor / *_tensor names. The same operation either way.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _collective(fn, ring: _Ring, what: str, *args, **kwargs):
    """Start ``fn(*args, group=ring.group, async_op=True)``; a connection that fails at once is named like a wait."""
    try:
        return [fn(*args, group=ring.group, async_op=True, **kwargs)]
    except Exception as exc:  # noqa: BLE001 - re-raised with who and where
        raise _peer_error(ring, what, exc) from exc


def all_gather(out: torch.Tensor, x: torch.Tensor, ring: _Ring, what: str) -> list:
    """Start gathering every rank's ``x`` into ``out`` (rank r's at rows ``r·len(x)`` of dim 0); wait with :func:`_wait`."""
    return _collective(_ALL_GATHER, ring, what, out, x.contiguous())


def reduce_scatter(out: torch.Tensor, x: torch.Tensor, ring: _Ring, what: str) -> list:
    """Start summing ``x`` over the ranks and keeping chunk ``rank`` (of dim 0) in ``out``; wait with :func:`_wait`."""
    return _collective(_REDUCE_SCATTER, ring, what, out, x.contiguous())


def all_to_all(out: torch.Tensor, x: torch.Tensor, ring: _Ring, what: str) -> list:
    """Start sending chunk ``i`` (of dim 0) of ``x`` to rank ``i`` and receiving rank ``i``'s into chunk ``i`` of
    ``out``; wait with :func:`_wait`."""
    return _collective(dist.all_to_all_single, ring, what, out, x.contiguous())
