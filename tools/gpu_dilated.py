"""The dilated fast path on one GPU: exact, and timed against the batched-call peer in the same run.

    python tools/gpu_dilated.py [--out DIR] [--seq-lens 16384 131072 524288] [--rings 1 4 8 16]

For the seed's configuration (``ringbook.bench.registry.bench_dilated_config``,
heads grouped 2:3:3, bf16, b=1 h=8 d=64) and each sequence length and causal
setting, it runs

* the batched-call peer ``dilated_sdpa`` (one fused SDPA call per head group
  on gathered rows, scattered back) and ``production_ring_attention`` with the dilated configuration at each ring
  size, timed in interleaved rounds (``ringbook.bench.measure.time_interleaved``:
  CUDA events, warm-up, median);
* the check of every output against equation (D) in float64 on sampled rows
  (the benchmark's reference check and tolerance), and the largest
  difference from the peer's out and lse (with the same uncovered rows).

Then ``heads="all"`` with the same pairs against its own peer, forward+backward
at 131K and ring 8 against the peer's forward+backward, gradients against the
float64 dense reference at 4K (the 2x rule against the peer in bf16), and the
CUDA kernel launches of one call (torch.profiler). Writes ``gpu_dilated.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ringbook import production_ring_attention
from ringbook.bench import environment
from ringbook.bench.measure import time_interleaved
from ringbook.bench.registry import _ring_dilated_check, _ring_dilated_flops, bench_dilated_config
from ringbook.bench.rules import TOLERANCE, within_2x_rule
from ringbook.dilated import dilated_attention_dense
from ringbook.fast import kernels
from ringbook.fast.dilated import dilated_sdpa

DTYPE = torch.bfloat16


def qkv(n, h=8, d=64, seed=0, grad=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, n, h, d, generator=gen, device="cuda", dtype=DTYPE).requires_grad_(grad) for _ in range(3)]


def calls_for(n, causal, rings, heads="grouped"):
    cfg = dict(bench_dilated_config(n), causal=causal, heads=heads)
    calls = {"dilated_sdpa": lambda q, k, v: dilated_sdpa(q, k, v, **cfg)}
    for w in rings:
        calls[f"production_dilated r{w}"] = (lambda w: lambda q, k, v: production_ring_attention(
            q, k, v, ring_size=w, **cfg))(w)
    return cfg, calls


def agreement(got, ref):
    (o, l), (ro, rl) = got, ref
    same_holes = bool(torch.equal(torch.isneginf(l), torch.isneginf(rl)))
    finite = torch.isfinite(rl)
    return {"max_abs_out_vs_peer": float((o.float() - ro.float()).abs().max()),
            "max_abs_lse_vs_peer": float((l - rl)[finite].abs().max()) if finite.any() else 0.0,
            "same_uncovered_rows": same_holes}


def forward_section(n, causal, rings, rounds, heads="grouped"):
    q, k, v = qkv(n, seed=n + causal)
    cfg, calls = calls_for(n, causal, rings, heads=heads)
    rows = {}
    with torch.no_grad():
        peer = calls["dilated_sdpa"](q, k, v)
        for name, fn in calls.items():
            got = fn(q, k, v)
            row = {}
            if heads == "grouped":
                err, checked = _ring_dilated_check(q, k, v, got[0], causal=causal)
                row.update(rel_err=err, rows_checked=checked, ok=bool(math.isfinite(err) and err <= TOLERANCE[DTYPE]))
            row.update(agreement(got, peer))
            rows[name] = row
            del got
        timing = time_interleaved({name: (lambda fn: lambda: fn(q, k, v))(fn) for name, fn in calls.items()},
                                  torch.device("cuda"), rounds=rounds)
    flops = _ring_dilated_flops(1, 8, n, n, 64, causal) if heads == "grouped" else None
    for name, t in timing.items():
        rows[name].update(t)
        rows[name]["vs_peer"] = t["median_ms"] / timing["dilated_sdpa"]["median_ms"]
        if flops:
            rows[name]["tflops"] = flops / t["median_ms"] / 1e9
    print(f"n={n} causal={causal} heads={heads}: " + ", ".join(
        f"{name} {r['median_ms']:.3f} ms ({r['vs_peer']:.2f}x)" for name, r in rows.items()), flush=True)
    return {"seq_len": n, "causal": causal, "heads": heads, "config": {k: v for k, v in cfg.items()}, "rows": rows}


def fwd_bwd_section(n, causal, rings, rounds):
    q, k, v = qkv(n, seed=7 + causal, grad=True)
    cfg, calls = calls_for(n, causal, rings)
    dout = torch.randn_like(q)

    def step(fn):
        def go():
            out, _ = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)
        return go

    grads = {}
    for name, fn in calls.items():
        out, _ = fn(q, k, v)
        grads[name] = torch.autograd.grad(out, (q, k, v), dout)
    peer = grads["dilated_sdpa"]
    rows = {name: {"max_rel_grad_vs_peer": max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                                                for a, b in zip(g, peer))} for name, g in grads.items()}
    del grads
    timing = time_interleaved({name: step(fn) for name, fn in calls.items()}, torch.device("cuda"), rounds=rounds)
    for name, t in timing.items():
        rows[name].update(t, vs_peer=t["median_ms"] / timing["dilated_sdpa"]["median_ms"])
    print(f"fwd+bwd n={n} causal={causal}: " + ", ".join(
        f"{name} {r['median_ms']:.3f} ms ({r['vs_peer']:.2f}x)" for name, r in rows.items()), flush=True)
    return {"seq_len": n, "causal": causal, "rows": rows}


def gradient_check(n=4096, rings=(1, 4, 8)):
    """Gradients against equation (D) in float64 (dense weights), the 2x rule against the peer in bf16."""
    out = []
    for heads in ("grouped", "all"):
        for causal in (False, True):
            q, k, v = qkv(n, seed=3, grad=True)
            cfg = dict(bench_dilated_config(n), causal=causal, heads=heads)
            dout = torch.randn_like(q)
            q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
            o64, _ = dilated_attention_dense(q64, k64, v64, **cfg)
            ref = (o64.detach(), *torch.autograd.grad(o64, (q64, k64, v64), dout.double()))
            o_p, _ = dilated_sdpa(q, k, v, **cfg)
            peer = (o_p.detach(), *torch.autograd.grad(o_p, (q, k, v), dout))
            for w in rings:
                o, _ = production_ring_attention(q, k, v, ring_size=w, **cfg)
                got = (o.detach(), *torch.autograd.grad(o, (q, k, v), dout))
                checks = {}
                for what, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, peer):
                    passed, err, err_peer, atol = within_2x_rule(g, r, p, what=what)
                    checks[what] = {"ok": passed, "err": err, "err_peer_bf16": err_peer, "atol": atol}
                out.append({"seq_len": n, "heads": heads, "causal": causal, "ring_size": w, "checks": checks,
                            "ok": all(c["ok"] for c in checks.values())})
                print(f"grad check n={n} heads={heads} causal={causal} r{w}: ok={out[-1]['ok']}", flush=True)
    return out


def rank_plans_on_gpu(n=32768, worlds=(2, 4, 8), kv_heads=(8, 2)):
    """The multi-process form's per-rank plans (:func:`ringbook.fast.plans.rank_dilated_plan`) on the GPU.

    One GPU cannot hold a two-rank NCCL group, so the exchange is played
    here: each rank's K/V window is cut from the whole K/V (a superset of
    the rows its mover would receive; the blocks read only those). The ranks'
    outputs and the windows' gradients, put back together, must equal the
    one-process production path (fused kernels, the same blocks merged in one
    plan) to rounding.
    """
    from ringbook.fast.engine import Job, Settings, StackedMover, run
    from ringbook.fast.plans import dilated_window as _window
    from ringbook.fast.plans import rank_dilated_plan
    from ringbook.ring_dilated import dilated_ring_plan

    out = []
    for hk in kv_heads:
        for causal in (False, True):
            for heads in ("grouped", "all"):
                gen = torch.Generator(device="cuda").manual_seed(5)
                q, k, v = (torch.randn(1, n, h, 64, generator=gen, device="cuda", dtype=DTYPE) for h in (8, hk, hk))
                dout = torch.randn(q.shape, generator=gen, device="cuda", dtype=DTYPE)
                cfg = dict(bench_dilated_config(n), causal=causal, heads=heads)
                xs = [x.clone().requires_grad_() for x in (q, k, v)]
                ref_o, ref_l = production_ring_attention(*xs, **cfg)
                ref_g = torch.autograd.grad(ref_o, xs, dout)
                for w in worlds:
                    plan = dilated_ring_plan(n, w, cfg["segment_lengths"], cfg["dilation_rates"], num_heads=8,
                                             heads=heads, causal=causal)
                    c = n // w
                    outs, lses = [], []
                    dq = torch.zeros_like(q, dtype=torch.float32)
                    dk, dv = (torch.zeros_like(k, dtype=torch.float32) for _ in range(2))
                    for rank in range(w):
                        lo, hi = _window(plan, rank)
                        blocks = rank_dilated_plan(plan, rank, 8 // hk, "cuda")
                        job = Job(settings=Settings(1 / 8, "auto"), start=lambda k_, v_, backward, blocks=blocks: (
                            StackedMover(k_, v_, backward=backward), blocks))
                        qs = q[:, rank * c:(rank + 1) * c].clone().requires_grad_()
                        kk, vv = (x[:, lo:hi].clone().requires_grad_() for x in (k, v))
                        o, l = run(qs, kk, vv, job)
                        g = torch.autograd.grad(o, (qs, kk, vv), dout[:, rank * c:(rank + 1) * c])
                        outs.append(o.detach())
                        lses.append(l.detach())
                        dq[:, rank * c:(rank + 1) * c] += g[0]
                        dk[:, lo:hi] += g[1]
                        dv[:, lo:hi] += g[2]
                    got_o, got_l = torch.cat(outs, 1), torch.cat(lses, 2)
                    fin = torch.isfinite(ref_l)
                    row = {"seq_len": n, "world": w, "kv_heads": hk, "causal": causal, "heads": heads,
                           "max_abs_out": float((got_o.float() - ref_o.float()).abs().max()),
                           "max_abs_lse": float((got_l - ref_l)[fin].abs().max()),
                           "same_uncovered_rows": bool(torch.equal(torch.isneginf(got_l), torch.isneginf(ref_l))),
                           "max_rel_grad": max(float((a - b.float()).abs().max() / b.float().abs().max())
                                               for a, b in zip((dq, dk, dv), ref_g))}
                    row["ok"] = (row["same_uncovered_rows"] and row["max_abs_out"] <= 1e-2 and row["max_abs_lse"] <= 1e-3
                                 and row["max_rel_grad"] <= 1e-2)
                    out.append(row)
                    print(f"rank plans on GPU: {row}", flush=True)
    return out


def launches(n, causal, rings):
    """CUDA kernels launched by one forward call (after warm-up), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = qkv(n, seed=11)
    _, calls = calls_for(n, causal, rings)
    result = {}
    with torch.no_grad():
        for name, fn in calls.items():
            fn(q, k, v)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(q, k, v)
                torch.cuda.synchronize()
            kernels_run = [e for e in prof.events() if e.device_type.name == "CUDA"]
            attention = [e for e in kernels_run if "attention" in e.name.lower() or "fmha" in e.name.lower()
                         or "cudnn" in e.name.lower() or "sm90" in e.name.lower()]
            result[name] = {"kernels": len(kernels_run), "attention_kernels": len(attention),
                            "attention_cuda_ms": sum(e.device_time_total for e in attention) / 1e3,
                            "all_cuda_ms": sum(e.device_time_total for e in kernels_run) / 1e3}
    print(f"launches n={n} causal={causal}: {result}", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 131072, 524288])
    p.add_argument("--rings", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--only-checks", action="store_true", help="the gradient and rank-plan checks, no timing")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tools/gpu_dilated.py needs a CUDA GPU")
    result = {"environment": environment(torch.device("cuda")), "dtype": str(DTYPE), "shape": "b=1 h=8 d=64",
              "forward": [], "heads_all": [], "fwd_bwd": [], "grad_check": [], "rank_plans": [], "launches": {}}
    path = args.out / "gpu_dilated.json"

    def save():
        result["kernel_status"] = dict(kernels.STATUS)
        path.write_text(json.dumps(result, indent=1, default=str))

    result["grad_check"] = gradient_check()
    result["rank_plans"] = rank_plans_on_gpu()
    save()
    if args.only_checks:
        print(f"wrote {path}")
        return 0
    for n in args.seq_lens:
        for causal in (False, True):
            result["forward"].append(forward_section(n, causal, args.rings, args.rounds if n <= 131072 else 5))
            save()
    for causal in (False, True):
        result["heads_all"].append(forward_section(131072, causal, [1, 8, 16], args.rounds, heads="all"))
        result["fwd_bwd"].append(fwd_bwd_section(131072, causal, [1, 8], args.rounds))
        result["launches"][f"131072 causal={causal}"] = launches(131072, causal, [1, 16])
        save()
    save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
