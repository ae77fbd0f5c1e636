"""Where does a production_ring_attention forward spend its time? One CUDA GPU, a few configurations.

    python tools/profile_production.py [--seq-lens 65536 131072] [--rings 1 16] [--fwd-bwd 65536] [--out DIR]

For each (seq_len, causal, ring size, layout) it times the call as
``python -m ringbook bench`` does (CUDA events around one call, median of 5
after a warm-up) next to cuDNN SDPA on the full sequence, then runs
``torch.profiler`` on one call and prints the busiest CUDA kernels and CPU
ops, and how long the GPU sat idle inside the call: the event time minus
the time some GPU activity was running (the union of the activities'
intervals, so nested profiler events and kernels on two streams are not
counted twice). Writes ``profile_production.json`` with the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import ringbook  # noqa: E402
from ringbook.bench.measure import time_once  # noqa: E402
from ringbook.fast import kernels  # noqa: E402


def event_ms(fn, repeats=5):
    """Median and all of ``repeats`` CUDA-event timings after one warm-up call (as the bench times a call)."""
    fn()
    torch.cuda.synchronize()
    times = [time_once(fn, torch.device("cuda")) for _ in range(repeats)]
    return statistics.median(times), times


def busy_ms(prof) -> tuple[int, float, float]:
    """``(GPU activities, the union of their intervals in ms, their sum in ms)`` of a profile."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    union, end = 0.0, -math.inf
    for a, b in spans:
        if b > end:
            union += b - max(a, end)
            end = b
    return len(spans), union / 1e3, sum(b - a for a, b in spans) / 1e3


def profiled(fn, top=8):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    activities, busy, total = busy_ms(prof)
    return {"gpu": [(e.key[:90], round(e.self_device_time_total / 1e3, 3), e.count) for e in gpu],
            "cpu": [(e.key[:90], round(e.self_cpu_time_total / 1e3, 3), e.count) for e in cpu],
            "gpu_activities": activities, "gpu_busy_ms": round(busy, 3), "gpu_activity_sum_ms": round(total, 3)}


def _profile_case(n, causal, name, fn) -> dict:
    try:
        ms, times = event_ms(fn)
        prof = profiled(fn)
        row = {"n": n, "causal": causal, "case": name, "ms": round(ms, 3), "times": [round(t, 2) for t in times],
               **prof, "idle_ms": round(ms - prof["gpu_busy_ms"], 3)}
    except Exception as exc:  # noqa: BLE001
        row = {"n": n, "causal": causal, "case": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
    print(f"n={n} causal={causal} {name:<28} {row.get('ms', '-')} ms (GPU busy {row.get('gpu_busy_ms', '-')} "
          f"ms, idle {row.get('idle_ms', '-')} ms) {row.get('times', row.get('error'))}", flush=True)
    for key, ms_, count in row.get("gpu", [])[:5]:
        print(f"      gpu {ms_:>9.3f} ms  x{count:<4} {key}")
    for key, ms_, count in row.get("cpu", [])[:4]:
        print(f"      cpu {ms_:>9.3f} ms  x{count:<4} {key}")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[65536, 131072])
    p.add_argument("--rings", nargs="+", type=int, default=[1, 16])
    p.add_argument("--fwd-bwd", type=int, nargs="*", default=[],
                   help="also profile forward+backward at these lengths (ring 8, against cuDNN's)")
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    results = []
    for n in args.fwd_bwd:
        g = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(1, n, 8, 64, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        dout = torch.randn_like(q)
        for causal in (True, False):
            def sdpa(causal=causal):
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)

            def step(fn):
                def call():
                    out = fn()
                    (out[0] if isinstance(out, tuple) else out).backward(dout)
                return call
            cases = {"fwd+bwd sdpa_cudnn": step(sdpa), "fwd+bwd production w=8": step(
                lambda causal=causal: ringbook.production_ring_attention(q, k, v, ring_size=8, causal=causal))}
            for name, fn in cases.items():
                results.append(_profile_case(n, causal, name, fn))
    for n in args.seq_lens:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, n, 8, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        for causal in (True, False):
            cases = {
                "sdpa_cudnn": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                "cudnn op with lse": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                    qt, kt, vt, None, True, 0.0, causal, False, scale=0.125),
            }
            for w in args.rings:
                for layout in ("contiguous", "zigzag"):
                    cases[f"production w={w} {layout}"] = (
                        lambda w=w, layout=layout: ringbook.production_ring_attention(q, k, v, ring_size=w,
                                                                                     causal=causal, layout=layout))
            for name, fn in cases.items():
                results.append(_profile_case(n, causal, name, fn))
    print({k: v for k, v in kernels.STATUS.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_production.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
