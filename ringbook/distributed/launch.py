"""Start a function on ``w`` local processes that form a torch.distributed group.

For tests and notebooks (notebook 02 runs a real 4-process ring with it): a
free port on 127.0.0.1, start method "spawn", results sent back to the parent,
a failing rank's traceback raised in the parent as :class:`SpawnError`, and
a hard deadline after which every child is terminated — it never hangs.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class SpawnError(RuntimeError):
    """A spawned rank failed. ``errors[rank]`` is its traceback text, ``results[rank]`` what the others returned."""

    def __init__(self, message: str, errors: dict, results: dict):
        super().__init__(message)
        self.errors = errors
        self.results = results


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)  # tensors as bytes: no shared-memory handles outliving the child
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank, world_size, port, backend, pg_timeout_s, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=_dt.timedelta(seconds=pg_timeout_s))
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", _dumps(result)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        queue.put((rank, "error", text))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group cannot be torn down cleanly
                pass


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout: float = 120.0,
          pg_timeout: float | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new local processes; return their results.

    Each process joins a process group (``backend``, 127.0.0.1, a free port,
    ``pg_timeout`` seconds for collectives — default ``timeout``) before
    calling ``fn``, which must be importable (defined at module level).
    Results come back in rank order (anything ``torch.save`` can write). If a
    rank raises, :class:`SpawnError` is raised with every rank's error and
    the results of the others. Never hangs: after ``timeout`` seconds the
    children are terminated and ``TimeoutError`` is raised.
    """
    import queue as _queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    pg_timeout = float(pg_timeout or timeout)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, pg_timeout, fn, args, queue),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    results, errors = {}, {}
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, status, payload = queue.get(timeout=0.2)
            except _queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode is not None and r not in results and r not in errors]
                for r in dead:  # died without reporting (killed, segfault, os._exit)
                    errors[r] = f"rank {r} exited with code {procs[r].exitcode} without reporting a result"
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in results and r not in errors]
                    raise TimeoutError(f"spawn: ranks {missing} of {world_size} did not finish within "
                                       f"{timeout:g} s; terminated them"
                                       + (f"; errors from others: {errors}" if errors else ""))
                continue
            if status == "ok":
                results[rank] = _loads(payload)
            else:
                errors[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        queue.close()
    if errors:
        first = min(errors)
        raise SpawnError(f"{len(errors)} of {world_size} ranks failed; rank {first}:\n{errors[first]}",
                         errors, results)
    return [results[r] for r in range(world_size)]
