"""The benchmark sweep: one JSON row per (implementation, sequence length, ring size, causal) measurement.

Every row is measured the same way (:mod:`ringbook.bench.measure`):

* fresh random inputs (``torch.randn``, seeded), never zeros;
* warm-up calls, then timed repeats, and the **median** is reported;
* peak memory of one call (inputs included);
* work counted as 4·b·h·n_q·n_k·d FLOPs (half for causal) → TFLOP/s, and
  tokens/s = b·n / time;
* the output checked against the float64 reference;
* a status: ``ok``, ``oom`` (the sweep goes on) or ``error`` with the
  message. A row that is not run says so and why in ``error``. A row is
  ``ok`` only through :func:`ringbook.bench.rules.verdict`: every number
  finite, the error within tolerance.

Implementations are registered in :data:`ringbook.bench.registry.IMPLS`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import statistics
import traceback
from collections.abc import Callable
from contextlib import nullcontext

import torch

from .._utils import available_bytes
from .measure import WrongResult, check_against_reference, environment, free, is_oom, peak_memory_gb, time_call
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
        row["status"] = "oom" if is_oom(exc) else "error"
        row["error"] = f"{type(exc).__name__}: {exc}".strip()[:500]
        if row["status"] == "error" and not str(exc).startswith("not run"):
            row["traceback"] = traceback.format_exc(limit=4)
    finally:
        q = k = v = out = dout = None
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


def _growth(impl: Impl, prev: dict, seq_len: int) -> float:
    """How much longer a call at ``seq_len`` should take than ``prev``'s: the ratio of their work counts.

    Quadratic for dense attention, about linear for dilated; ``(n / n_prev)²``
    where the work cannot be counted.
    """
    args = (prev["batch"], prev["heads"])
    try:
        new = impl.flops(*args, seq_len, seq_len, prev["head_dim"], prev["causal"])
        old = impl.flops(*args, prev["seq_len"], prev["seq_len"], prev["head_dim"], prev["causal"])
    except (TypeError, ValueError):
        new = old = None
    if not new or not old:
        return (seq_len / prev["seq_len"]) ** 2
    return new / old


def run_sweep(config: SweepConfig, *, progress: bool = True,
              on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Measure every planned row; an OOM or error never stops the sweep.

    ``on_row(rows)`` is called after each row with every row so far (the CLI
    saves the JSON there, so an interrupted sweep keeps what it measured).

    Within one (impl, causal, ring_size) series, once a length ran out of
    memory the longer ones are recorded as ``oom`` without running, and a
    length whose call is predicted (the last row's time scaled by the ratio of
    the work counts: quadratic for dense attention, about linear for dilated)
    to exceed ``max_row_seconds`` is recorded as ``skipped`` "not run: …" (not an
    error: nothing failed; the row says why it was not measured).
    """
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    env = environment(device)
    specs = planned_rows(config)
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
            predicted = prev["time_ms"] / 1e3 * _growth(IMPLS[spec["impl"]], prev, spec["seq_len"])
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
            row = run_row(IMPLS[spec["impl"]], seq_len=spec["seq_len"], ring_size=spec["ring_size"],
                          causal=spec["causal"], dtype=config.dtype, batch=config.batch, heads=config.heads,
                          head_dim=config.head_dim, device=device, warmup=config.warmup,
                          repeats=config.repeats, options=config.options, env=env, backward=config.backward)
            last_run[series] = row
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows
