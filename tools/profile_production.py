"""Where does a production_ring_attention forward spend its time? One CUDA GPU, a few configurations.

    python tools/profile_production.py [--seq-lens 65536 131072] [--out DIR]

For each (seq_len, causal, ring size, layout) it times the call as
``python -m ringbook bench`` does (CUDA events around one call, median of 5
after a warm-up) next to cuDNN SDPA on the full sequence, then runs
``torch.profiler`` on one call and prints the busiest CUDA kernels and CPU
ops, and how long the GPU sat idle inside the call (event time minus the
sum of kernel times). Writes ``profile_production.json`` with the numbers.
"""

from __future__ import annotations

import argparse
import json
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


def profiled(fn, top=8):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = sorted(events, key=lambda e: e.device_time_total, reverse=True)[:top]
    cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3
    return {"gpu": [(e.key[:90], round(e.device_time_total / 1e3, 3), e.count) for e in gpu],
            "cpu": [(e.key[:90], round(e.self_cpu_time_total / 1e3, 3), e.count) for e in cpu],
            "kernel_ms": round(kernel_ms, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[65536, 131072])
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    results = []
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
            for w, layout in [(1, "contiguous"), (1, "zigzag"), (16, "contiguous"), (16, "zigzag")]:
                cases[f"production w={w} {layout}"] = (
                    lambda w=w, layout=layout: ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal,
                                                                                 layout=layout))
            for name, fn in cases.items():
                try:
                    ms, times = event_ms(fn)
                    prof = profiled(fn)
                    row = {"n": n, "causal": causal, "case": name, "ms": round(ms, 3),
                           "times": [round(t, 2) for t in times], **prof,
                           "idle_ms": round(ms - prof["kernel_ms"], 3)}
                except Exception as exc:  # noqa: BLE001
                    row = {"n": n, "causal": causal, "case": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
                results.append(row)
                print(f"n={n} causal={causal} {name:<28} {row.get('ms', '-')} ms (kernels {row.get('kernel_ms', '-')} "
                      f"ms, idle {row.get('idle_ms', '-')} ms) {row.get('times', row.get('error'))}", flush=True)
                if "gpu" in row:
                    for key, ms_, count in row["gpu"][:5]:
                        print(f"      gpu {ms_:>9.3f} ms  x{count:<4} {key}")
                    for key, ms_, count in row["cpu"][:4]:
                        print(f"      cpu {ms_:>9.3f} ms  x{count:<4} {key}")
    print({k: v for k, v in kernels.STATUS.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_production.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
