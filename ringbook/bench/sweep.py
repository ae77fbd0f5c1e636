"""The benchmark sweep: one JSON row per (implementation, sequence length, ring size, causal) measurement.

Every row is measured the same way (:mod:`ringbook.bench.measure`):

* fresh random inputs (``torch.randn``, seeded), never zeros;
* warm-up calls, then timed repeats, and the **median** is reported;
* peak memory of one call (inputs included);
* work counted as 4·b·h·n_q·n_k·d FLOPs (half for causal) → TFLOP/s, and
  tokens/s = b·n / time;
* checks (:mod:`ringbook.bench.measure`), none of them timed: the whole
  output, lse and (with a backward) dq/dk/dv of the first call and of the
  last timed call are finite (the lse −inf exactly where a row sees no key);
  the first call's output and lse are compared with the float64 reference
  on evenly spaced rows, its gradients on every row where that reference
  fits; the row's ``check`` says what was done;
* a status: ``ok``, ``oom`` (the sweep goes on) or ``error`` with the
  message. A row that is not run says so and why in ``error``. A row is
  ``ok`` only through :func:`ringbook.bench.rules.verdict`: every number
  finite, the error within tolerance.

Implementations are registered in :data:`ringbook.bench.registry.IMPLS`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import math
import statistics
import traceback
from collections.abc import Callable
from contextlib import nullcontext

import torch

from .._utils import available_bytes
from .measure import (
    DENSE,
    WrongResult,
    check_whole,
    environment,
    free,
    gradient_error,
    is_oom,
    peak_memory_gb,
    reference_check,
    time_call,
)
from .registry import IMPLS, Impl
from .rules import verdict


def new_row(env: dict, impl_name: str, *, seq_len: int, ring_size: int, causal: bool, dtype: torch.dtype,
            batch: int, heads: int, head_dim: int, flops: float, mode: str = "forward") -> dict:
    """A row before measurement (status "error" until it succeeds); every benchmark fills these fields."""
    return {
        **env,
        "impl": impl_name, "mode": mode, "seq_len": seq_len, "ring_size": ring_size, "causal": causal,
        "dtype": str(dtype).replace("torch.", ""), "batch": batch, "heads": heads, "head_dim": head_dim,
        "flops": flops,
        "time_ms": None, "times_ms": [], "tflops": None, "tokens_per_s": None, "peak_mem_gb": None,
        "max_rel_err": None, "checked_rows": None, "lse_max_rel_err": None, "check": None,
        "status": "error", "error": None,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


BACKWARD_FLOPS_FACTOR = 3.5  # forward + backward ≈ 1 + 2.5 forwards (FlashAttention's count)


def run_row(impl: Impl, *, seq_len: int, ring_size: int, causal: bool, dtype: torch.dtype, batch: int,
            heads: int, head_dim: int, device: torch.device, warmup: int, repeats: int,
            options: dict | None = None, seed: int = 0, env: dict | None = None, backward: bool = False) -> dict:
    """Measure one configuration; never raises (failures become the row's status).

    With ``backward`` a call is the forward and ``out.backward(dout)`` (q, k, v
    require grad; ``dout`` random), its flops ``BACKWARD_FLOPS_FACTOR`` × the
    forward's, and dq/dk/dv are checked too (``grad_max_rel_err``,
    ``grad_checked_rows``: 0 where the float64 reference does not fit). On
    CUDA ``device`` is made the current device for the row (kernels, events
    and Triton follow it).
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
    if backward:
        row.update(grad_max_rel_err=None, grad_checked_rows=None)
    options = dict(options or {})
    q = k = v = out = lse = dout = None
    reference = impl.reference or DENSE
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
            return out.detach(), lse if lse is None else lse.detach()

        def grads():
            return {"dq": q.grad, "dk": k.grad, "dv": v.grad} if backward else None

        # The first call doubles as a warm-up: its peak memory is recorded and it is the call checked
        # against the reference, before the timing (the checks are never timed).
        row["peak_mem_gb"], (out, lse) = peak_memory_gb(call, device, inputs=(q, k, v, dout))
        no_key = reference.no_key(seq_len, heads, causal=causal)
        check_whole(out, lse, no_key=no_key, grads=grads(), call="the first call")
        qkv = [x.detach() for x in (q, k, v)]
        c = reference_check(*qkv, out, lse, causal=causal, reference=reference)
        row.update(max_rel_err=c.max_rel_err, checked_rows=c.rows, lse_max_rel_err=c.lse_max_rel_err)
        whole = "out" + ("" if lse is None else ", lse") + (", dq, dk, dv" if backward else "")
        check = [f"every entry of {whole} finite on the first and on the last timed call"
                 + (" (lse -inf exactly where a row sees no key)" if lse is not None and no_key is not None else ""),
                 f"the first call's out{'' if lse is None else ' and lse'} against float64 on {c.rows} of "
                 f"{seq_len} query rows" + (" (no lse returned)" if lse is None else "")]
        if backward:
            g = gradient_error(*qkv, dout, (q.grad, k.grad, v.grad), causal=causal, reference=reference)
            row["grad_max_rel_err"], row["grad_checked_rows"] = g if g is not None else (None, 0)
            check.append(f"its dq, dk, dv against float64 on all {seq_len} rows" if g is not None else
                         "its dq, dk, dv not compared with float64 (the reference does not fit in memory)")
        row["check"] = "; ".join(check)
        out = lse = qkv = None
        free(device)
        last: list = []
        times = time_call(call, device, warmup=max(warmup - 1, 0), repeats=repeats, last=last)
        check_whole(*last[0], no_key=no_key, grads=grads(), call="the last timed call")
        last.clear()
        t = statistics.median(times)
        row.update(time_ms=t, times_ms=times, tflops=None if row["flops"] is None else row["flops"] / (t * 1e-3) / 1e12,
                   tokens_per_s=batch * seq_len / (t * 1e-3))
        verdict(row, dtype)
    except WrongResult as exc:
        row["status"], row["error"] = "error", f"wrong result: {exc}"
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        row["status"] = "oom" if is_oom(exc) else "error"
        row["error"] = f"{type(exc).__name__}: {exc}".strip()[:500]
        if row["status"] == "error" and not str(exc).startswith("not run"):
            row["traceback"] = traceback.format_exc(limit=4)
    finally:
        q = k = v = out = lse = dout = None
        free(device)
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
    and 16, and dilated_sdpa (the batched-call peer of production_dilated).
    CPU: float32, 256…2048 tokens, ring sizes 1 and 4, done in about two minutes
    on 2 cores.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return SweepConfig(
            impls=["naive", "blockwise", "ring", "production", "ring_dilated", "production_dilated", "dilated_sdpa",
                   "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"],
            seq_lens=[2 ** p for p in range(12, 20)], ring_sizes=[1, 4, 8, 16], dtype=torch.bfloat16,
            warmup=2, repeats=10, max_row_seconds=10.0, device=str(device),
        )
    return SweepConfig(impls=["naive", "blockwise", "ring", "production", "ring_dilated", "production_dilated", "sdpa"],
                       seq_lens=[256, 512, 1024, 2048],
                       ring_sizes=[1, 4], dtype=torch.float32, warmup=1, repeats=5, device=str(device))


def planned_rows(config: SweepConfig) -> list[dict]:
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


def _work(impl: Impl, batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> float | None:
    """The work count of one call (None where it cannot be counted, e.g. a refused configuration)."""
    try:
        return impl.flops(batch, heads, seq_len, seq_len, head_dim, causal) or None
    except (TypeError, ValueError):
        return None


def _growth(impl: Impl, prev: dict, seq_len: int) -> float:
    """How much longer a call at ``seq_len`` should take than ``prev``'s: the ratio of their work counts.

    Quadratic for dense attention, about linear for dilated; ``(n / n_prev)²``
    where the work cannot be counted.
    """
    args = (prev["batch"], prev["heads"])
    new = _work(impl, *args, seq_len, prev["head_dim"], prev["causal"])
    old = _work(impl, *args, prev["seq_len"], prev["head_dim"], prev["causal"])
    if not new or not old:
        return (seq_len / prev["seq_len"]) ** 2
    return new / old


# A series' first row with more work than this is bounded first by a call this small of the same implementation.
CALIBRATION_FLOPS = 2e8


def calibration_length(impl: Impl, config: SweepConfig, spec: dict) -> int | None:
    """The length of the small call that bounds the first row of a series: ``seq_len`` halved (to a multiple of
    16 and of twice the ring size: zigzag chunks, the dilated configuration's n/8) until its work is at most
    :data:`CALIBRATION_FLOPS`; None when the row is that small already or its work cannot be counted."""
    n, causal = spec["seq_len"], spec["causal"]
    args = (config.batch, config.heads)
    work = _work(impl, *args, n, config.head_dim, causal)
    if work is None or work <= CALIBRATION_FLOPS:
        return None
    unit = math.lcm(16, 2 * spec["ring_size"])
    m = n
    while _work(impl, *args, m, config.head_dim, causal) > CALIBRATION_FLOPS:
        half = m // 2 // unit * unit
        if half < unit or _work(impl, *args, half, config.head_dim, causal) is None:
            break
        m = half
    return m if m < n else None


def calibrate(measure_row: Callable[..., dict], impl: Impl, config: SweepConfig, spec: dict, m: int) -> dict:
    """The calibration row for a series' first row: a call at ``m`` tokens, then at 4×, 16×, … the length while
    the row's predicted time is over ``max_row_seconds`` and the next call's is not.

    A short call is bound by launches, not by the work, so scaling its time by
    the work count overstates a long call (a 3.6 ms ring call of 8 ranks at 256
    tokens "predicted" 15 s at 16K, where the call takes 36 ms). Each rung is
    itself bounded by the one below it, so no call runs that is predicted to
    take longer than the limit.
    """
    unit = math.lcm(16, 2 * spec["ring_size"])
    row = measure_row(seq_len=m, warmup=1, repeats=3)
    while row["status"] == "ok":
        if row["time_ms"] / 1e3 * _growth(impl, row, spec["seq_len"]) <= config.max_row_seconds:
            break
        nxt = m * 4 // unit * unit
        if nxt >= spec["seq_len"] or row["time_ms"] / 1e3 * _growth(impl, row, nxt) > config.max_row_seconds:
            break
        m, row = nxt, measure_row(seq_len=nxt, warmup=1, repeats=3)
    return row


def _first_row_bound(config: SweepConfig, spec: dict, calibration: dict | None) -> tuple | None:
    """``(status, reason)`` for a series' first row that is not to be run, judged by ``calibration`` (the row
    of a small call of the same implementation, or None: no bound needed); None to run it.

    A wrong result at the short length leaves the long call without a bound (skipped, saying so); any other
    failure there (a refused configuration, CUDA only) is left to the row itself to report.
    """
    if calibration is None:
        return None
    m, error = calibration["seq_len"], str(calibration.get("error") or "")
    if calibration["status"] == "ok":
        predicted = calibration["time_ms"] / 1e3 * _growth(IMPLS[spec["impl"]], calibration, spec["seq_len"])
        if predicted > config.max_row_seconds:
            return ("skipped", f"not run: a call is predicted to take {predicted:.0f} s "
                               f"(> max_row_seconds={config.max_row_seconds:g}), from "
                               f"{calibration['time_ms'] / 1e3:.2g} s at seq_len {m:,} (a calibration call, "
                               f"scaled by the work count)")
    elif calibration["status"] == "oom" and "not run" not in error:
        return ("oom", f"not run: a calibration call at seq_len {m:,} already ran out of memory")
    elif error.startswith("wrong result"):
        return ("skipped", f"not run: its time cannot be bounded: a calibration call at seq_len {m:,} gave a "
                           f"{error[:300]}")
    return None


def run_sweep(config: SweepConfig, *, progress: bool = True,
              on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Measure every planned row; an OOM or error never stops the sweep.

    ``on_row(rows)`` is called after each row with every row so far (the CLI
    saves the JSON there, so an interrupted sweep keeps what it measured).

    Within one (impl, causal, ring_size) series, once a length ran out of
    memory the longer ones are recorded as ``oom`` without running, and a
    length whose call is predicted to exceed ``max_row_seconds`` is recorded
    as ``skipped`` "not run: …" (not an error: nothing failed; the row says
    why it was not measured). The prediction scales a measured time by the
    ratio of the work counts (quadratic for dense attention, about linear for
    dilated): the last row of the series, or for its first row a small call
    of the same implementation (:func:`calibration_length`, lengthened by
    :func:`calibrate` while it is too short to tell; not recorded as a row; a
    first row that small already is run as it is).
    """
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    env = environment(device)
    specs = planned_rows(config)
    rows, last_run, calibrations = [], {}, {}  # last row of each series that was actually measured
    bar = tqdm(specs, desc="bench", unit="row", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(f"{spec['impl']} n={spec['seq_len']} r={spec['ring_size']} causal={spec['causal']}")
        series = (spec["impl"], spec["causal"], spec["ring_size"])
        impl = IMPLS[spec["impl"]]
        prev = last_run.get(series)
        skip = None
        measure_row = functools.partial(run_row, impl, ring_size=spec["ring_size"], causal=spec["causal"],
                                        dtype=config.dtype, batch=config.batch, heads=config.heads,
                                        head_dim=config.head_dim, device=device, options=config.options, env=env,
                                        backward=config.backward)
        if prev is None:
            m = calibration_length(impl, config, spec)
            if m is not None and (series not in calibrations or calibrations[series]["seq_len"] > m):
                calibrations[series] = calibrate(measure_row, impl, config, spec, m)
            skip = _first_row_bound(config, spec, calibrations.get(series) if m is not None else None)
        elif prev["status"] == "oom":
            skip = ("oom", f"not run: seq_len {prev['seq_len']:,} already ran out of memory")
        elif prev["status"] == "ok":
            predicted = prev["time_ms"] / 1e3 * _growth(impl, prev, spec["seq_len"])
            if predicted > config.max_row_seconds:
                skip = ("skipped", f"not run: a call is predicted to take {predicted:.0f} s "
                                 f"(> max_row_seconds={config.max_row_seconds:g}), from "
                                 f"{prev['time_ms'] / 1e3:.2g} s at seq_len {prev['seq_len']:,}")
        if skip:
            row = {**env, **spec, "mode": "forward+backward" if config.backward else "forward",
                   "dtype": str(config.dtype).replace("torch.", ""), "batch": config.batch,
                   "heads": config.heads, "head_dim": config.head_dim, "status": skip[0], "error": skip[1],
                   "time_ms": None, "tflops": None, "tokens_per_s": None, "peak_mem_gb": None,
                   "max_rel_err": None}
        else:
            row = measure_row(seq_len=spec["seq_len"], warmup=config.warmup, repeats=config.repeats)
            last_run[series] = row
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows
