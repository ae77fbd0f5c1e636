"""Measurement, in one place: the timer, peak memory, the environment record and the reference check.

Every number ringbook reports comes through here — the benchmark sweep, the
multi-process sweep, ``tools/`` and the notebooks:

* :func:`time_once` / :func:`time_call`: CUDA events on a GPU (recorded on
  the device's current stream), ``time.perf_counter`` on the CPU; warm-up,
  then repeats, and the caller reports the **median**;
* :func:`peak_memory_gb`: the CUDA allocator's peak of one call (inputs
  included); on the CPU the resident peak of that call (the high-water mark
  is reset before it) above the resident memory before it, plus the inputs;
* :func:`check_whole`: every entry of one call's results, not sampled rows —
  the output (and gradients) finite, the lse finite where a row sees a key
  and −inf exactly where it sees none; the benchmark runs it on the checked
  call and on the last timed call;
* :func:`compare` and :func:`reference_check`: the output and lse against the
  float64 reference (:class:`Reference`) on evenly spaced query rows
  (``max_rel_err`` = max |out − ref| / max |ref|); an output that is NaN or
  ±inf where the reference is finite raises :class:`WrongResult` saying
  where, so it can never pass as a small error;
* :func:`gradient_error`: dq, dk, dv against the float64 reference's
  gradients, where that reference fits in memory.

A check raises :class:`WrongResult`; the sweeps turn it into an ``error`` row.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .. import __version__
from ..naive import naive_attention
from .rules import WrongResult, finite_max_error  # WrongResult: re-exported


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
              target_s: float = 2.0, last: list | None = None) -> list[float]:
    """Warm up, then time ``repeats`` calls (fewer for slow calls, at least 3); milliseconds.

    Warm-up stops early once a call takes over a second (it is then long
    past compilation and caching effects). With ``last`` (a list), the last
    timed call's result is left in ``last[0]``, to be checked after the
    timing; each call's predecessor is dropped before it starts, so no more
    memory is held than without it.
    """
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        if time.perf_counter() - t0 > 1.0:
            break
    timed = fn if last is None else (lambda: last.append(fn()))
    times = []
    for i in range(repeats):
        if last is not None:
            last.clear()
        times.append(time_once(timed, device))
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


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``: hands memory freed by earlier calls back to the system (None elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()
CPU_PEAK_MEM_KIND = (
    "CPU resident memory: the peak during one call (VmHWM, reset before the call through /proc/self/clear_refs) "
    "minus the resident memory before it, plus the inputs' bytes; "
    + ("memory freed earlier is handed back first (glibc malloc_trim), so a call cannot reuse it unseen"
       if _TRIM is not None else
       "a lower bound: without glibc's malloc_trim, memory freed by an earlier, larger call can be reused "
       "without raising the resident peak"))


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
    if _TRIM is not None:
        _TRIM(0)  # else a larger row's freed, still resident pages are reused without being counted
    if not _reset_cpu_peak():
        return None, fn()
    before = _proc_status_kb("VmRSS")
    result = fn()
    extra = max(_proc_status_kb("VmHWM") - before, 0) * 1024
    return (extra + sum(x.nbytes for x in inputs if isinstance(x, torch.Tensor))) / 1e9, result


def _where(mask: torch.Tensor, rows: torch.Tensor | None = None, dim: int = 1) -> str:
    """How many entries of ``mask`` are set and the first one's index (dim ``dim`` mapped through ``rows``)."""
    first = [int(i) for i in mask.nonzero()[0]]
    if rows is not None:
        first[dim] = int(rows[first[dim]])
    return f"{int(mask.sum())} of {mask.numel()} checked entries (first at index {tuple(first)})"


def _non_finite(got: torch.Tensor) -> str:
    return "/".join(sorted({"NaN" if x != x else ("+inf" if x > 0 else "-inf")
                            for x in got[~torch.isfinite(got)][:1000].tolist()}))


# --------------------------------------------------------------------------- whole-tensor checks of one call

def check_finite(x: torch.Tensor, what: str, call: str = "") -> None:
    """Every entry of ``x`` finite — the whole tensor, not sampled rows — else :class:`WrongResult` saying where
    (and in which ``call``)."""
    x = x.detach()
    bad = ~torch.isfinite(x)
    if bad.any():
        raise WrongResult(f"{what} is {_non_finite(x)} at {_where(bad)}" + (f" in {call}" if call else ""))


def check_lse(lse: torch.Tensor, no_key: torch.Tensor | None, call: str = "") -> None:
    """The whole ``lse`` (``b h n``): finite where a row sees a key, −inf exactly where it sees none.

    ``no_key``: boolean, broadcastable to ``lse``, set for the rows that see
    no key (:meth:`Reference.no_key`); None when every row sees one.
    """
    lse = lse.detach()
    in_call = f", in {call}" if call else ""
    if no_key is None:
        check_finite(lse, "lse", call)
        return
    no_key = no_key.to(lse.device).expand_as(lse)
    bad = ~no_key & ~torch.isfinite(lse)
    if bad.any():
        raise WrongResult(f"lse is {_non_finite(lse[~no_key])} at {_where(bad)} (b, h, n), where the row sees a key"
                          + in_call)
    bad = no_key & (lse != float("-inf"))
    if bad.any():
        raise WrongResult(f"lse is not -inf at {_where(bad)} (b, h, n), where the row sees no key" + in_call)


def check_whole(out: torch.Tensor, lse: torch.Tensor | None = None, *, no_key: torch.Tensor | None = None,
                grads: dict[str, torch.Tensor | None] | None = None, call: str = "") -> None:
    """Every entry of one call's results: ``out`` and each of ``grads`` (name → tensor) finite, ``lse`` as
    :func:`check_lse` (skipped when the implementation returns none). Raises :class:`WrongResult` naming ``call``."""
    check_finite(out, "output", call)
    if lse is not None:
        check_lse(lse, no_key, call)
    for name, g in (grads or {}).items():
        if g is None:
            raise WrongResult(f"{name} is missing: the backward did not reach that input" + (f" in {call}" if call else ""))
        check_finite(g, name, call)


# --------------------------------------------------------------------------- against the float64 reference

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


class Reference:
    """The float64 function a benchmarked implementation computes: here dense attention (top-left causal).

    An implementation of another function (the dilated configuration,
    :mod:`ringbook.bench.registry`) subclasses it. ``max_rows`` caps the
    rows :func:`reference_check` compares.
    """

    max_rows: int | None = None

    def rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 ``(out, lse)`` of the query rows at ``positions`` (``b m h d``, ``b h m``), a head at a time."""
        mask = (torch.arange(k.shape[1], device=q.device)[None, :] <= positions[:, None]) if causal else None
        parts = [naive_attention(q[:, positions, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1], mask=mask)
                 for h in range(q.shape[2])]
        return torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=1)

    def no_key(self, seq_len: int, heads: int, *, causal: bool) -> torch.Tensor | None:
        """Boolean ``(h, n)``: the rows that see no key (lse −inf, out 0); None when every row sees one."""
        return None

    def grads_bytes(self, batch: int, heads: int, seq_len: int) -> float:
        """Memory :meth:`grads` needs: a head at a time, float64 scores, probabilities and their gradients."""
        return 4.0 * 8 * batch * seq_len * seq_len

    def grads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, *,
              causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float64 ``(dq, dk, dv)`` of ``(out · dout).sum()``, every row, a head at a time."""
        grads = []
        for h in range(q.shape[2]):
            x = [t[:, :, h:h + 1].detach().double().requires_grad_() for t in (q, k, v)]
            out, _ = naive_attention(*x, causal=causal)
            out.backward(dout[:, :, h:h + 1].double())
            grads.append([t.grad for t in x])
        return tuple(torch.cat(g, dim=2) for g in zip(*grads))


DENSE = Reference()


@dataclasses.dataclass(frozen=True, eq=False)
class MaskedReference(Reference):
    """Dense attention under packed documents and a sliding window (:mod:`ringbook.masks`): every row sees
    at least itself, so no row is empty."""

    document_ids: torch.Tensor | None = None
    window: int | None = None

    def rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from ..masks import keep

        ids = None if self.document_ids is None else self.document_ids.to(q.device).expand(q.shape[0], -1)
        mask = keep(positions, torch.arange(k.shape[1], device=q.device), causal=causal, window=self.window,
                    q_doc=None if ids is None else ids[:, positions], k_doc=ids)
        if mask is not None and mask.dim() == 2:
            mask = mask[None, None]
        parts = [naive_attention(q[:, positions, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1], mask=mask)
                 for h in range(q.shape[2])]
        return torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=1)

    def grads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, *,
              causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grads = []
        for h in range(q.shape[2]):
            x = [t[:, :, h:h + 1].detach().double().requires_grad_() for t in (q, k, v)]
            out, _ = naive_attention(*x, causal=causal, document_ids=self.document_ids, window=self.window)
            out.backward(dout[:, :, h:h + 1].double())
            grads.append([t.grad for t in x])
        return tuple(torch.cat(g, dim=2) for g in zip(*grads))


@dataclasses.dataclass(frozen=True)
class Checked:
    """What :func:`reference_check` compared: max |out − ref|, max |ref|, the same for the lse (None without
    one), and how many query rows."""

    err: float
    scale: float
    rows: int
    lse_err: float | None = None
    lse_scale: float | None = None

    @property
    def max_rel_err(self) -> float:
        return relative_error(self.err, self.scale)

    @property
    def lse_max_rel_err(self) -> float | None:
        return None if self.lse_err is None else relative_error(self.lse_err, self.lse_scale)


def reference_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor | None = None, *, causal: bool, positions: torch.Tensor | None = None,
                    reference: Reference | None = None, budget_bytes: float = 2e9,
                    max_rows: int | None = None) -> Checked:
    """The one reference check: ``out`` (and ``lse``) against float64 on evenly spaced query rows.

    ``q, k, v`` hold the whole sequence (``b n h d``). ``out`` holds the output
    rows at global ``positions`` (default: every row, in order), ``lse`` the
    same rows (``b h n``), so one rank can check its own shard. As many rows
    are checked as fit in ``budget_bytes`` (and ``max_rows``,
    ``reference.max_rows``). Raises :class:`WrongResult` for an output that is
    NaN or ±inf where the reference is finite, or an lse whose NaN or ±inf
    entries differ from the reference's.
    """
    reference = reference or DENSE
    b, rows_out = out.shape[0], out.shape[1]
    if positions is None:
        positions = torch.arange(rows_out, device=out.device)
    m = int(max(8, min(rows_out, budget_bytes // (3.0 * 8 * b * k.shape[1]))))
    for cap in (max_rows, reference.max_rows):
        if cap is not None:
            m = min(m, cap)
    local = torch.linspace(0, rows_out - 1, m, device=out.device).round().long().unique()
    pos = positions.to(out.device)[local]
    checked = out[:, local]
    bad = ~torch.isfinite(checked)
    if bad.any() and all(torch.isfinite(x).all() for x in (q, k, v)):  # then every reference row is finite
        raise WrongResult(f"output is {_non_finite(checked)} at {_where(bad, pos)} (b, n, h, d) where the float64 "
                          f"reference is finite")
    ref_out, ref_lse = reference.rows(q, k, v, pos, causal=causal)
    err, scale = compare(checked, ref_out)
    if lse is None:
        return Checked(err, scale, int(local.numel()))
    lse_err = finite_max_error(lse[:, :, local.to(lse.device)], ref_lse, "lse")
    finite = ref_lse[torch.isfinite(ref_lse)]
    return Checked(err, scale, int(local.numel()), lse_err, finite.abs().max().item() if finite.numel() else 0.0)


def reference_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *, causal: bool,
                    positions: torch.Tensor | None = None, reference: Reference | None = None,
                    budget_bytes: float = 2e9, max_rows: int | None = None) -> tuple[float, float, int]:
    """:func:`reference_check` of the output alone: ``(max |out − ref|, max |ref|, rows checked)``."""
    c = reference_check(q, k, v, out, causal=causal, positions=positions, reference=reference,
                        budget_bytes=budget_bytes, max_rows=max_rows)
    return c.err, c.scale, c.rows


def check_against_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *, causal: bool,
                            budget_bytes: float = 2e9) -> tuple[float, int]:
    """``(max_rel_err, rows checked)`` of a whole output against float64 attention (:func:`reference_check`)."""
    c = reference_check(q, k, v, out, causal=causal, budget_bytes=budget_bytes)
    return c.max_rel_err, c.rows


def gradient_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                   grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, causal: bool,
                   reference: Reference | None = None, budget_bytes: float = 2e9) -> tuple[float, int] | None:
    """``(max_rel_err, rows)`` of ``grads`` = (dq, dk, dv) against the float64 reference's, every row; None where
    that reference would need more than ``budget_bytes`` (:meth:`Reference.grads_bytes`).

    ``dout`` is the upstream gradient of the output. ``max_rel_err`` is the
    largest max |g − ref| / max |ref| of the three; a gradient that is NaN or
    ±inf raises :class:`WrongResult` naming it.
    """
    reference = reference or DENSE
    b, n, h, _ = q.shape
    if reference.grads_bytes(b, h, n) > budget_bytes:
        return None
    worst = 0.0
    refs = reference.grads(q.detach(), k.detach(), v.detach(), dout.detach(), causal=causal)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, refs):
        try:
            err, scale = compare(got, ref)
        except WrongResult as exc:
            raise WrongResult(f"{name}: {exc}") from None
        worst = max(worst, relative_error(err, scale))
    return worst, n


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
