"""Measurement, in one place: the timer, peak memory, the environment record and the reference check.

Every number ringbook reports comes through here — the benchmark sweep, the
multi-process sweep, ``tools/`` and the notebooks:

* :func:`time_once` / :func:`time_call`: CUDA events on a GPU (recorded on
  the device's current stream), ``time.perf_counter`` on the CPU; warm-up,
  then repeats, and the caller reports the **median**;
* :func:`peak_memory_gb`: the CUDA allocator's peak of one call (inputs
  included); on the CPU the resident peak of that call (the high-water mark
  is reset before it) above the resident memory before it, plus the inputs;
* :func:`compare` and :func:`reference_error`: the output against the float64
  reference on evenly spaced query rows (``max_rel_err`` = max |out − ref| /
  max |ref|); an output that is NaN or ±inf where the reference is finite
  raises :class:`WrongResult` saying where, so it can never pass as a small
  error.
"""

from __future__ import annotations

import functools
import gc
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .. import __version__
from ..naive import naive_attention


def environment(device: torch.device) -> dict:
    """Device name, versions and the timing/memory method, recorded in every row."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mem_kind = "cuda max_memory_allocated (one call, inputs included)"
        timer = "CUDA events"
    else:
        name = _cpu_name()
        mem_kind = CPU_PEAK_MEM_KIND
        timer = "time.perf_counter"
    return {
        "device": name,
        "device_type": device.type,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "ringbook_version": __version__,
        "python_version": platform.python_version(),
        "timer": timer,
        "peak_mem_kind": mem_kind,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU ({line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
              target_s: float = 2.0) -> list[float]:
    """Warm up, then time ``repeats`` calls (fewer for slow calls, at least 3); milliseconds.

    Warm-up stops early once a call takes over a second (it is then long
    past compilation and caching effects).
    """
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        if time.perf_counter() - t0 > 1.0:
            break
    times = []
    for i in range(repeats):
        times.append(time_once(fn, device))
        if i >= 2 and sum(times) / 1e3 > target_s:
            break
    return times


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU, ``time.perf_counter`` on the CPU.

    The events are recorded on ``device``'s current stream with ``device``
    made current, so ``--device cuda:1`` times the GPU that does the work.
    """
    if device.type == "cuda":
        with torch.cuda.device(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))
            fn()
            end.record(torch.cuda.current_stream(device))
            end.synchronize()
            return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(calls: dict[str, Callable[[], object]], device: torch.device, *, rounds: int,
                     warmup: int = 2) -> dict[str, dict]:
    """Time several calls in interleaved rounds (one call of each per round, :func:`time_once`), after warm-up.

    Interleaving spreads clock and thermal drift over every call alike, so
    the ratios of the medians are same-run ratios. Returns
    ``{name: {"median_ms", "times_ms"}}``.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(time_once(fn, device))
    return {name: {"median_ms": statistics.median(ts), "times_ms": [round(t, 4) for t in ts]}
            for name, ts in times.items()}


CPU_PEAK_MEM_KIND = ("CPU resident memory: the peak during one call (VmHWM, reset before the call through "
                     "/proc/self/clear_refs) minus the resident memory before it, plus the inputs' bytes")


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_cpu_peak() -> bool:
    """Reset the process's resident high-water mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kb("VmHWM")
        return True
    except OSError:
        return False


def peak_memory_gb(fn: Callable[[], object], device: torch.device, *,
                   inputs: Iterable[object] = ()) -> tuple[float | None, Any]:
    """Run ``fn`` once; return (peak memory of that call in GB, its result).

    CUDA: the allocator's peak during the call (everything live, inputs
    included). CPU: the process's resident peak during the call minus its
    resident memory before it, plus the bytes of ``inputs`` (so the figure is
    per call, like CUDA's); ``None`` where the resident peak cannot be reset
    (not Linux), never the process's all-time high-water mark.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 1e9, result
    gc.collect()
    if not _reset_cpu_peak():
        return None, fn()
    before = _proc_status_kb("VmRSS")
    result = fn()
    extra = max(_proc_status_kb("VmHWM") - before, 0) * 1024
    return (extra + sum(x.nbytes for x in inputs if isinstance(x, torch.Tensor))) / 1e9, result


class WrongResult(ValueError):
    """An output that cannot be held against its reference (non-finite where the reference is finite)."""


def _where(mask: torch.Tensor, rows: torch.Tensor | None = None) -> str:
    """How many entries of ``mask`` are set and the first one's index (dim 1 mapped through ``rows``)."""
    first = [int(i) for i in mask.nonzero()[0]]
    if rows is not None:
        first[1] = int(rows[first[1]])
    return f"{int(mask.sum())} of {mask.numel()} checked entries (first at index {tuple(first)})"


def _non_finite(got: torch.Tensor) -> str:
    return "/".join(sorted({"NaN" if x != x else ("+inf" if x > 0 else "-inf")
                            for x in got[~torch.isfinite(got)][:1000].tolist()}))


def compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(max |got − ref|, max |ref|)`` in float64: the one comparison every check uses.

    Raises :class:`WrongResult` when the error cannot be computed honestly:
    the reference is not finite, or ``got`` is NaN or ±inf where the
    reference is finite (``max`` over a NaN would otherwise hide it).
    """
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        raise WrongResult(f"output rows have shape {tuple(got.shape)} but the reference has {tuple(ref.shape)}")
    bad_ref = ~torch.isfinite(ref)
    if bad_ref.any():
        raise WrongResult(f"the float64 reference is not finite at {_where(bad_ref)}: the error cannot be computed")
    bad = ~torch.isfinite(got)
    if bad.any():
        raise WrongResult(f"output is {_non_finite(got)} at {_where(bad)} where the float64 reference is finite")
    if got.numel() == 0:
        raise WrongResult("no output rows to check")
    return (got - ref).abs().max().item(), ref.abs().max().item()


def relative_error(err: float, scale: float) -> float:
    """``err / scale``: max |out − ref| / max |ref| (a reference of all zeros compares absolutely)."""
    return err / max(scale, 1e-300)


def dense_reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
                         causal: bool) -> torch.Tensor:
    """Float64 naive attention for the query rows at ``positions`` (``b len(positions) h d``), a head at a time."""
    mask = (torch.arange(k.shape[1], device=q.device)[None, :] <= positions[:, None]) if causal else None
    return torch.cat([naive_attention(q[:, positions, head:head + 1], k[:, :, head:head + 1],
                                      v[:, :, head:head + 1], mask=mask)[0] for head in range(q.shape[2])], dim=2)


def reference_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *, causal: bool,
                    positions: torch.Tensor | None = None, reference: Callable | None = None,
                    budget_bytes: float = 2e9, max_rows: int | None = None) -> tuple[float, float, int]:
    """The one reference check: ``(max |out − ref|, max |ref|, rows checked)`` on evenly spaced rows of ``out``.

    ``q, k, v`` hold the whole sequence (``b n h d``). ``out`` holds the output
    rows at global ``positions`` (default: every row, in order), so one rank can
    check its own shard. ``reference(q, k, v, positions) -> rows`` computes
    the float64 reference rows (default :func:`dense_reference_rows`); as many
    rows are checked as fit in ``budget_bytes`` (and ``max_rows``). Raises
    :class:`WrongResult` for an output that is NaN or ±inf where the
    reference is finite.
    """
    b, rows_out = out.shape[0], out.shape[1]
    if positions is None:
        positions = torch.arange(rows_out, device=out.device)
    m = int(max(8, min(rows_out, budget_bytes // (3.0 * 8 * b * k.shape[1]))))
    if max_rows is not None:
        m = min(m, max_rows)
    local = torch.linspace(0, rows_out - 1, m, device=out.device).round().long().unique()
    pos = positions.to(out.device)[local]
    checked = out[:, local]
    bad = ~torch.isfinite(checked)
    if bad.any() and all(torch.isfinite(x).all() for x in (q, k, v)):  # then every reference row is finite
        raise WrongResult(f"output is {_non_finite(checked)} at {_where(bad, pos)} (b, n, h, d) where the float64 "
                          f"reference is finite")
    ref = (reference or functools.partial(dense_reference_rows, causal=causal))(q, k, v, pos)
    err, scale = compare(checked, ref)
    return err, scale, int(local.numel())


def check_against_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *, causal: bool,
                            budget_bytes: float = 2e9) -> tuple[float, int]:
    """``(max_rel_err, rows checked)`` of a whole output against float64 attention (:func:`reference_error`)."""
    err, scale, rows = reference_error(q, k, v, out, causal=causal, budget_bytes=budget_bytes)
    return relative_error(err, scale), rows


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory failure (CUDA's, the host's, or one reported in a RuntimeError's text)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def free(device: torch.device) -> None:
    """Collect garbage and return cached CUDA memory: between rows, so one row's tensors never count in the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
