"""The benchmark harness: one JSON row per (implementation, sequence length,
ring size, causal) measurement.

Every row is measured the same way:

* fresh random inputs (``torch.randn``, seeded), never zeros;
* warm-up calls, then timed repeats — CUDA events on a GPU, a monotonic
  clock on the CPU — and the **median** is reported;
* peak memory of one call: ``reset_peak_memory_stats`` /
  ``max_memory_allocated`` on CUDA (inputs included); on the CPU the
  resident peak of that call (the high-water mark is reset before it) above
  the resident memory before it, plus the inputs;
* work counted as 4·b·h·n_q·n_k·d FLOPs (half for causal) → TFLOP/s, and
  tokens/s = b·n / time;
* the output checked against :func:`ringbook.naive_attention` in float64,
  on a slice of evenly spaced query rows where the full reference would not
  fit (``max_rel_err`` = max |out − ref| / max |ref| over the checked rows);
* a status: ``ok``, ``oom`` (the sweep goes on) or ``error`` with the
  message. A row that is not run says so and why in ``error``. A row is
  ``ok`` only when every number in it is finite and its error is within
  :data:`TOLERANCE` (:func:`verdict`); an output that is NaN or ±inf where
  the reference is finite is an ``error`` row that says where
  (:func:`compare`).

Implementations are registered in :data:`IMPLS`; later features add rows by
registering more.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import math
import platform
import resource
import statistics
import time
import traceback
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from . import __version__
from ._utils import attention_flops, available_bytes
from .dilated import SCORE_BUDGET, dilated_flops, dilated_reference_rows
from .naive import naive_attention
from .online_softmax import KEY_CHUNK, blockwise_attention
from .production import production_ring_attention
from .ring import ring_attention
from .ring_dilated import ring_dilated_attention

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
}
# A row whose max_rel_err exceeds this is a wrong answer: status "error".
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-9}


@dataclasses.dataclass(frozen=True)
class Impl:
    """A benchmarked implementation: ``fn(q, k, v, *, causal, ring_size, **options) -> (out, lse)``."""

    name: str
    fn: Callable
    description: str
    ring: bool = False  # takes ring_size > 1
    cuda_only: bool = False
    # bytes of transient memory it needs beyond inputs/outputs (for the CPU guard)
    extra_bytes: Callable[[int, int, int, int, int], float] | None = None
    flops: Callable[..., float] = attention_flops
    # (q, k, v, out, *, causal) -> (max_rel_err, rows checked); None: check_against_reference (dense attention)
    reference: Callable[..., tuple[float, int]] | None = None


def _naive(q, k, v, *, causal, ring_size, **_):
    return naive_attention(q, k, v, causal=causal, precision="input")


def _blockwise(q, k, v, *, causal, ring_size, block_size=None, **_):
    return blockwise_attention(q, k, v, block_size=block_size or 1024, causal=causal)


def _ring(q, k, v, *, causal, ring_size, layout=None, **_):
    layout = layout or ("zigzag" if causal else "contiguous")
    return ring_attention(q, k, v, ring_size=ring_size, causal=causal, layout=layout)


def _sdpa(backend_name: str | None):
    def fn(q, k, v, *, causal, ring_size, **_):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(getattr(SDPBackend, backend_name)) if backend_name else nullcontext()
        qt, kt, vt = (rearrange(x, "b n h d -> b h n d") for x in (q, k, v))
        with ctx:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        return rearrange(out, "b h n d -> b n h d"), None

    return fn


def _scores_bytes(b, h, n_q, n_k, itemsize):
    return 3.0 * b * h * n_q * n_k * max(itemsize, 4)


IMPLS: dict[str, Impl] = {}


def register(impl: Impl) -> Impl:
    """Add an implementation to the benchmark (later modules add their rows)."""
    IMPLS[impl.name] = impl
    return impl


register(Impl("naive", _naive, "materialised seq×seq scores in the input dtype", extra_bytes=_scores_bytes))
register(Impl(
    "blockwise", _blockwise, "ringbook.blockwise_attention (einops online softmax, block 1024)",
    extra_bytes=lambda b, h, n_q, n_k, s: 3.0 * b * h * n_q * min(n_k, 1024) * 4,
))
register(Impl(
    "ring", _ring, "ringbook.ring_attention, all ranks in one process (layout option; "
    "default zigzag when causal, else contiguous)", ring=True,
    # the largest score tile is one shard pair; at ring_size 1 that is the whole matrix (upper bound)
    extra_bytes=_scores_bytes,
))


def _production(q, k, v, *, causal, ring_size, layout=None, **_):
    return production_ring_attention(q, k, v, ring_size=ring_size, causal=causal, layout=layout)


register(Impl(
    "production", _production, "ringbook.production_ring_attention, all ranks in one process stacked in the "
    "batch (one batched kernel call per ring step; cuDNN/flash/efficient SDPA per block on CUDA, einops on CPU; "
    "fused float32 merge; layout option, default zigzag when causal, else contiguous)", ring=True,
    # einops path: a (shard × KEY_CHUNK) fp32 score tile per rank, scores + probabilities + mask
    extra_bytes=lambda b, h, n_q, n_k, s: 3.0 * b * h * n_q * min(n_k, KEY_CHUNK) * 4,
))
register(Impl("sdpa", _sdpa(None), "torch scaled_dot_product_attention, default dispatch"))
for _backend, _label in (("FLASH_ATTENTION", "flash"), ("CUDNN_ATTENTION", "cudnn"), ("EFFICIENT_ATTENTION", "efficient")):
    register(Impl(f"sdpa_{_label}", _sdpa(_backend), f"torch SDPA, {_label} backend only", cuda_only=True))


def seed_dilated_config(n: int) -> dict:
    """The seed's (segment length, dilation rate) pairs for sequence length ``n``, heads grouped 2:3:3.

    Segment lengths 2048/4096/8192 up to 16K, 4096/8192/16384 up to 64K,
    8192/16384/32768 beyond (seed/NOTES.md). The seed did not state its rates;
    ringbook assumes [1, 2, 4]. Below 16K the seed's 16K pairs are scaled
    with ``n``: segment lengths n/8, n/4, n/2 (n must be a multiple of 8).
    """
    if n < 16384:
        if n % 8:
            raise ValueError(f"ring_dilated uses segment lengths n/8, n/4, n/2 below 16K: "
                             f"seq_len={n} must be a multiple of 8")
        seg = [n // 8, n // 4, n // 2]
    else:
        seg = [2048, 4096, 8192] if n <= 16384 else [4096, 8192, 16384] if n <= 65536 else [8192, 16384, 32768]
    return {"segment_lengths": seg, "dilation_rates": [1, 2, 4]}


def _ring_dilated(q, k, v, *, causal, ring_size, **_):
    return ring_dilated_attention(q, k, v, ring_size=ring_size, causal=causal, heads="grouped",
                                  **seed_dilated_config(q.shape[1]))


def _ring_dilated_flops(batch, heads, n_q, n_k, head_dim, causal):
    """The dilated work actually required (None where the configuration is refused: the row says why)."""
    try:
        return dilated_flops(batch, heads, n_q, head_dim, causal=causal, heads="grouped", **seed_dilated_config(n_q))
    except ValueError:
        return None


def _dilated_extra_bytes(b, h, n_q, n_k, itemsize):
    """Score tiles are chunked to at most SCORE_BUDGET elements (fp32 scores, probabilities, mask)."""
    return 12 * min(SCORE_BUDGET, (_ring_dilated_flops(b, h, n_q, n_k, 1, 0) or 0) / 4)


def _ring_dilated_check(q, k, v, out, *, causal, max_rows=128):
    """Like :func:`check_against_reference`, against equation (D): each row from its own key window, no n×n."""
    n = q.shape[1]
    idx = torch.linspace(0, n - 1, min(n, max_rows), device=q.device).round().long().unique()
    ref, _ = dilated_reference_rows(q, k, v, idx, causal=causal, heads="grouped", **seed_dilated_config(n))
    return relative_error(*compare(out[:, idx], ref)), int(idx.numel())


def _production_dilated(q, k, v, *, causal, ring_size, **_):
    return production_ring_attention(q, k, v, ring_size=ring_size, causal=causal, heads="grouped",
                                     **seed_dilated_config(q.shape[1]))


register(Impl(
    "ring_dilated", _ring_dilated, "ringbook.ring_dilated_attention, all ranks in one process: the seed's "
    "RingDilatedV2 config (heads grouped 2:3:3 over segment lengths 2048/4096/8192 to 16K, 4096/8192/16384 "
    "to 64K, 8192/16384/32768 beyond; n/8, n/4, n/2 below 16K), dilation rates [1, 2, 4] (assumed: the seed "
    "did not state them); TFLOP/s counts the dilated work", ring=True,
    flops=_ring_dilated_flops, reference=_ring_dilated_check,
    extra_bytes=_dilated_extra_bytes,
))
register(Impl(
    "production_dilated", _production_dilated, "ringbook.production_ring_attention with the seed's configuration "
    "(as ring_dilated: heads grouped 2:3:3, its segment lengths, rates [1, 2, 4]): the same ring-dilated plan "
    "with each batch of segments in one fused SDPA call on CUDA (einops on CPU); TFLOP/s counts the dilated work",
    ring=True, flops=_ring_dilated_flops, reference=_ring_dilated_check,
    extra_bytes=_dilated_extra_bytes,
))


# --------------------------------------------------------------------------- environment

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


# --------------------------------------------------------------------------- measurement

def _sync(device):
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
        _sync(device)
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


def peak_memory_gb(fn: Callable[[], object], device: torch.device, *, inputs=()):
    """Run ``fn`` once; return (peak memory of that call in GB, its result).

    CUDA: the allocator's peak during the call (everything live, inputs
    included). CPU: the process's resident peak during the call minus its
    resident memory before it, plus the bytes of ``inputs`` (so the figure is
    per call, like CUDA's); ``None`` where the resident peak cannot be reset
    (not Linux), never the process's all-time high-water mark.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        _sync(device)
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


def verdict(row: dict, dtype: torch.dtype) -> dict:
    """Set ``row["status"]`` to ``ok`` only if every measured number is finite and the error is within tolerance.

    The one place a row becomes ``ok``: a row whose time, throughput, memory
    or error is missing, NaN or infinite is an ``error`` row with the reason.
    """
    tol = TOLERANCE[dtype]
    numbers = {key: row.get(key) for key in ("time_ms", "tflops", "tokens_per_s", "max_rel_err")}
    if row.get("peak_mem_gb") is not None:
        numbers["peak_mem_gb"] = row["peak_mem_gb"]
    bad = [key for key, x in numbers.items()
           if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x)]
    if bad:
        row["status"] = "error"
        row["error"] = "not finite: " + ", ".join(f"{key}={numbers[key]!r}" for key in bad)
    elif row["max_rel_err"] > tol:
        row["status"] = "error"
        row["error"] = f"wrong result: max_rel_err {row['max_rel_err']:.3g} exceeds {tol:g} for {row['dtype']}"
    else:
        row["status"] = "ok"
    return row


def check_against_reference(q, k, v, out, *, causal: bool, budget_bytes: float = 2e9):
    """max |out − ref| / max |ref| over evenly spaced query rows; returns (err, rows checked).

    The float64 reference runs one head at a time on as many query rows as
    fit in ``budget_bytes`` (all rows when they fit).
    """
    b, n_q, h, _ = q.shape
    n_k = k.shape[1]
    per_row = 3.0 * 8 * b * n_k
    m = int(max(8, min(n_q, budget_bytes // per_row)))
    idx = torch.linspace(0, n_q - 1, m, device=q.device).round().long().unique()
    mask = (torch.arange(n_k, device=q.device)[None, :] <= idx[:, None]) if causal else None
    checked = out[:, idx]
    bad = ~torch.isfinite(checked)
    if bad.any() and all(torch.isfinite(x).all() for x in (q, k, v)):  # then every reference row is finite
        raise WrongResult(f"output is {_non_finite(checked)} at {_where(bad, idx)} (b, n, h, d) where the float64 "
                          f"reference is finite")
    err, scale = 0.0, 0.0
    for head in range(h):
        sl = slice(head, head + 1)
        ref, _ = naive_attention(q[:, idx, sl], k[:, :, sl], v[:, :, sl], mask=mask)
        head_err, head_scale = compare(out[:, idx, sl], ref)
        err, scale = max(err, head_err), max(scale, head_scale)
    return relative_error(err, scale), int(idx.numel())


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def new_row(env: dict, impl_name: str, *, seq_len: int, ring_size: int, causal: bool, dtype: torch.dtype,
            batch: int, heads: int, head_dim: int, flops: float, mode: str = "forward") -> dict:
    """A row before measurement (status "error" until it succeeds); every benchmark fills these fields."""
    return {
        **env,
        "impl": impl_name, "mode": mode, "seq_len": seq_len, "ring_size": ring_size, "causal": causal,
        "dtype": str(dtype).replace("torch.", ""), "batch": batch, "heads": heads, "head_dim": head_dim,
        "flops": flops,
        "time_ms": None, "times_ms": [], "tflops": None, "tokens_per_s": None, "peak_mem_gb": None,
        "max_rel_err": None, "checked_rows": None, "status": "error", "error": None,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


BACKWARD_FLOPS_FACTOR = 3.5  # forward + backward ≈ 1 + 2.5 forwards (FlashAttention's count)


def run_row(impl: Impl, *, seq_len: int, ring_size: int, causal: bool, dtype: torch.dtype, batch: int,
            heads: int, head_dim: int, device: torch.device, warmup: int, repeats: int,
            options: dict | None = None, seed: int = 0, env: dict | None = None, backward: bool = False) -> dict:
    """Measure one configuration; never raises (failures become the row's status).

    With ``backward`` a call is the forward and ``out.backward(dout)`` (q, k, v
    require grad; ``dout`` random), its flops ``BACKWARD_FLOPS_FACTOR`` × the
    forward's; the forward output is the one checked. On CUDA ``device`` is
    made the current device for the row (kernels, events and Triton follow it).
    """
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        return _run_row(impl, seq_len=seq_len, ring_size=ring_size, causal=causal, dtype=dtype, batch=batch,
                        heads=heads, head_dim=head_dim, device=device, warmup=warmup, repeats=repeats,
                        options=options, seed=seed, env=env, backward=backward)


def _run_row(impl: Impl, *, seq_len, ring_size, causal, dtype, batch, heads, head_dim, device, warmup, repeats,
             options, seed, env, backward) -> dict:
    flops = impl.flops(batch, heads, seq_len, seq_len, head_dim, causal)
    if backward and flops is not None:
        flops *= BACKWARD_FLOPS_FACTOR
    row = new_row(env or environment(device), impl.name, seq_len=seq_len, ring_size=ring_size, causal=causal,
                  dtype=dtype, batch=batch, heads=heads, head_dim=head_dim, flops=flops,
                  mode="forward+backward" if backward else "forward")
    options = dict(options or {})
    q = k = v = out = None
    try:
        if impl.cuda_only and device.type != "cuda":
            raise RuntimeError(f"not run: {impl.name} needs a CUDA device")
        itemsize = torch.empty((), dtype=dtype).element_size()
        need = 4.0 * batch * seq_len * heads * head_dim * itemsize
        if impl.extra_bytes is not None:
            need += impl.extra_bytes(batch, heads, seq_len, seq_len, itemsize)
        if device.type == "cpu" and need > 0.7 * available_bytes(device):
            row["status"] = "oom"
            row["error"] = (f"not run: needs about {need / 1e9:.1f} GB by estimate, "
                            f"more than 70% of the {available_bytes(device) / 1e9:.1f} GB available")
            return row
        gen = torch.Generator(device=device).manual_seed(seed)
        q, k, v = (torch.randn(batch, seq_len, heads, head_dim, generator=gen, device=device, dtype=dtype)
                   .requires_grad_(backward) for _ in range(3))
        dout = torch.randn(q.shape, generator=gen, device=device, dtype=dtype) if backward else None

        def call():
            if not backward:
                return impl.fn(q, k, v, causal=causal, ring_size=ring_size, **options)
            for x in (q, k, v):
                x.grad = None
            out, lse = impl.fn(q, k, v, causal=causal, ring_size=ring_size, **options)
            out.backward(dout)
            return out.detach(), lse

        # The first call doubles as a warm-up: its peak memory is recorded and
        # its output is the one checked against the reference.
        row["peak_mem_gb"], (out, _) = peak_memory_gb(call, device, inputs=(q, k, v, dout))
        times = time_call(call, device, warmup=max(warmup - 1, 0), repeats=repeats)
        check = impl.reference or check_against_reference
        row["max_rel_err"], row["checked_rows"] = check(*(x.detach() for x in (q, k, v)), out, causal=causal)
        t = statistics.median(times)
        row.update(time_ms=t, times_ms=times, tflops=None if row["flops"] is None else row["flops"] / (t * 1e-3) / 1e12,
                   tokens_per_s=batch * seq_len / (t * 1e-3))
        verdict(row, dtype)
    except WrongResult as exc:
        row["status"], row["error"] = "error", f"wrong result: {exc}"
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        row["status"] = "oom" if _is_oom(exc) else "error"
        row["error"] = f"{type(exc).__name__}: {exc}".strip()[:500]
        if row["status"] == "error" and not str(exc).startswith("not run"):
            row["traceback"] = traceback.format_exc(limit=4)
    finally:
        del q, k, v, out
        dout = None
        _free(device)
    return row


# --------------------------------------------------------------------------- the sweep

@dataclasses.dataclass
class SweepConfig:
    """What one ``python -m ringbook bench`` measures."""

    impls: list[str]
    seq_lens: list[int]
    ring_sizes: list[int] = dataclasses.field(default_factory=lambda: [1])
    causal: list[bool] = dataclasses.field(default_factory=lambda: [False, True])
    dtype: torch.dtype = torch.float32
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    warmup: int = 1
    repeats: int = 5
    max_row_seconds: float = 20.0  # a call predicted to take longer is not run (and says so)
    device: str = "cpu"
    options: dict = dataclasses.field(default_factory=dict)
    backward: bool = False  # time forward + backward instead of the forward


def default_config(device: str | torch.device | None = None) -> SweepConfig:
    """The embedded default, sized to the device.

    GPU: bf16, sequence lengths 4K…512K (each implementation stops where it runs
    out of memory or a call would exceed 10 s), every SDPA backend as a peer,
    the one-process rings (ring, production, ring_dilated, production_dilated) at ring sizes 1, 4, 8
    and 16.
    CPU: float32, 256…2048 tokens, ring sizes 1 and 4, done in about a minute and a half
    on 2 cores.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return SweepConfig(
            impls=["naive", "blockwise", "ring", "production", "ring_dilated", "production_dilated", "sdpa",
                   "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"],
            seq_lens=[2 ** p for p in range(12, 20)], ring_sizes=[1, 4, 8, 16], dtype=torch.bfloat16,
            warmup=2, repeats=10, max_row_seconds=10.0, device=str(device),
        )
    return SweepConfig(impls=["naive", "blockwise", "ring", "production", "ring_dilated", "production_dilated", "sdpa"],
                       seq_lens=[256, 512, 1024, 2048],
                       ring_sizes=[1, 4], dtype=torch.float32, warmup=1, repeats=5, device=str(device))


def plan(config: SweepConfig) -> list[dict]:
    """The rows a sweep will measure, in order (plain dicts; ring sizes only for ring impls)."""
    unknown = [name for name in config.impls if name not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {sorted(IMPLS)}")
    specs = []
    for name in config.impls:
        rings = config.ring_sizes if IMPLS[name].ring else [1]
        for causal in config.causal:
            for ring_size in rings:
                for n in sorted(config.seq_lens):
                    specs.append({"impl": name, "causal": causal, "ring_size": ring_size, "seq_len": n})
    return specs


def run_sweep(config: SweepConfig, *, progress: bool = True,
              on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Measure every planned row; an OOM or error never stops the sweep.

    ``on_row(rows)`` is called after each row with every row so far (the CLI
    saves the JSON there, so an interrupted sweep keeps what it measured).

    Within one (impl, causal, ring_size) series, once a length ran out of
    memory the longer ones are recorded as ``oom`` without running, and a
    length whose call is predicted (quadratic growth from the last row) to
    exceed ``max_row_seconds`` is recorded as ``error`` "not run: …".
    """
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    env = environment(device)
    specs = plan(config)
    rows, last_run = [], {}  # last row of each series that was actually measured
    bar = tqdm(specs, desc="bench", unit="row", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(f"{spec['impl']} n={spec['seq_len']} r={spec['ring_size']} causal={spec['causal']}")
        series = (spec["impl"], spec["causal"], spec["ring_size"])
        prev = last_run.get(series)
        skip = None
        if prev is not None and prev["status"] == "oom":
            skip = ("oom", f"not run: seq_len {prev['seq_len']:,} already ran out of memory")
        elif prev is not None and prev["status"] == "ok":
            predicted = prev["time_ms"] / 1e3 * (spec["seq_len"] / prev["seq_len"]) ** 2
            if predicted > config.max_row_seconds:
                skip = ("error", f"not run: a call is predicted to take {predicted:.0f} s "
                                 f"(> max_row_seconds={config.max_row_seconds:g}), from "
                                 f"{prev['time_ms'] / 1e3:.2g} s at seq_len {prev['seq_len']:,}")
        if skip:
            row = {**env, **spec, "mode": "forward+backward" if config.backward else "forward",
                   "dtype": str(config.dtype).replace("torch.", ""), "batch": config.batch,
                   "heads": config.heads, "head_dim": config.head_dim, "status": skip[0], "error": skip[1],
                   "time_ms": None, "tflops": None, "tokens_per_s": None, "peak_mem_gb": None,
                   "max_rel_err": None}
        else:
            row = run_row(IMPLS[spec["impl"]], seq_len=spec["seq_len"], ring_size=spec["ring_size"],
                          causal=spec["causal"], dtype=config.dtype, batch=config.batch, heads=config.heads,
                          head_dim=config.head_dim, device=device, warmup=config.warmup,
                          repeats=config.repeats, options=config.options, env=env, backward=config.backward)
            last_run[series] = row
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows
