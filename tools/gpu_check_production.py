"""Validate and time ringbook.production_ring_attention on a CUDA GPU, in one command.

    python tools/gpu_check_production.py [--out DIR] [--quick]

(a) correctness, bf16, b1 h8 d64 (GQA: 2 k/v heads), n = 2048: forward and
    backward for ring sizes 1, 4, 8, 16 × contiguous/zigzag × causal or not,
    grouped-query heads, a gradient into lse, and dilated attention, against
    float64 references under flash-attention's 2× rule (error ≤ 2 × the error
    of the same reference computed in bf16 + rounding atol); at seq 131072,
    sampled rows against float64, next to cuDNN SDPA's own error;
(b) forward time at seq 131072, ring sizes 1/4/8/16, non-causal and causal,
    against the fastest SDPA backend on the full sequence (CUDA events,
    warm-up, median), with the merge forced to torch ops as a variant;
(c) forward+backward at seq 65536, ring 8, against SDPA forward+backward;
(d) a compact table on stdout and JSON rows in $OUT (or --out) /
    gpu_check_production.json, with the kernels ringbook chose and why.

Every check runs in its own try/except and becomes a row (status ok /
fail / error); one failure never stops the run. Meant to finish in a few
minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ringbook  # noqa: E402
from ringbook._utils import attention_flops  # noqa: E402
from ringbook.bench import check_against_reference, time_call, within_2x_rule  # noqa: E402
from ringbook.fast import engine, kernels  # noqa: E402
from ringbook.fast.tuning import Tuning  # noqa: E402

DTYPE = torch.bfloat16
B, H, HKV, D = 1, 8, 2, 64
ROWS: list[dict] = []


def record(section: str, name: str, fn) -> dict:
    """Run one check; its dict (or the exception) becomes a row."""
    t0 = time.perf_counter()
    row = {"section": section, "name": name}
    try:
        row.update(fn())
        row.setdefault("status", "ok")
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:600], traceback=traceback.format_exc(limit=6))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    ROWS.append(row)
    detail = {k: v for k, v in row.items() if k not in ("section", "name", "status", "traceback", "seconds")}
    print(f"[{row['status']:>5}] {section:<8} {name:<46} {json.dumps(detail, default=str)[:300]}", flush=True)
    if "cuda" in str(row.get("error", "")).lower() and "illegal" in str(row.get("error", "")).lower():
        raise SystemExit("CUDA context is broken (illegal memory access); stopping")
    return row


def qkv(n, hkv=H, seed=0, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, n, H, D), (B, n, hkv, D), (B, n, hkv, D)]
    return [torch.randn(*s, generator=g, device="cuda", dtype=DTYPE).requires_grad_(requires_grad) for s in shapes]


def expand(x):
    return x.repeat_interleave(H // x.shape[2], dim=2)


def two_x(got: dict, ref: dict, base: dict) -> dict:
    """Per tensor: err, the bf16 baseline's err and pass/fail of flash-attention's 2× rule (ringbook.bench.rules)."""
    out, ok = {}, True
    for key in ref:
        passed, e, eb, atol = within_2x_rule(got[key], ref[key], base[key], what=key,
                                             atol=2e-3 if key == "lse" else None)
        ok &= passed
        out[key] = f"{e:.2e} vs 2×{eb:.2e}+{atol:.1e}{'' if passed else ' FAIL'}"
    out["status"] = "ok" if ok else "fail"
    return out


def run_attention(fn, q, k, v, dout, dlse=None):
    """out, lse and gradients of ``fn`` (inputs cloned as leaves)."""
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*xs)
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:
        loss = loss + (lse.float() * dlse).sum()
    loss.backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}


def check_dense(w, layout, causal, hkv=H, with_dlse=False, n=2048, tuning=None):
    q, k, v = qkv(n, hkv, seed=w + 7 * causal)
    g = torch.Generator(device="cuda").manual_seed(99)
    dout = torch.randn(B, n, H, D, generator=g, device="cuda", dtype=DTYPE)
    dlse = torch.randn(B, H, n, generator=g, device="cuda") if with_dlse else None
    got = run_attention(lambda a, b, c: ringbook.production_ring_attention(a, b, c, ring_size=w, causal=causal,
                                                                          layout=layout, tuning=tuning),
                       q, k, v, dout, dlse)
    ref = run_attention(lambda a, b, c: ringbook.naive_attention(a.double(), expand(b).double(), expand(c).double(),
                                                                 causal=causal), q, k, v, dout, dlse)
    base = run_attention(lambda a, b, c: ringbook.naive_attention(a, expand(b), expand(c), causal=causal,
                                                                  precision="input"), q, k, v, dout, dlse)
    return two_x(got, ref, base)


def check_dilated(w, causal, n=2048):
    cfg = dict(segment_lengths=[512, 1024, 2048], dilation_rates=[1, 2, 4], heads="grouped")
    q, k, v = qkv(n, H, seed=3)
    g = torch.Generator(device="cuda").manual_seed(5)
    dout = torch.randn(B, n, H, D, generator=g, device="cuda", dtype=DTYPE)
    got = run_attention(lambda a, b, c: ringbook.production_ring_attention(a, b, c, ring_size=w, causal=causal, **cfg),
                        q, k, v, dout)
    ref = run_attention(lambda a, b, c: ringbook.dilated_attention_dense(a.double(), b.double(), c.double(),
                                                                         causal=causal, **cfg), q, k, v, dout)
    base = run_attention(lambda a, b, c: ringbook.dilated_attention_dense(a, b, c, causal=causal, precision="input",
                                                                          **cfg), q, k, v, dout)
    return two_x(got, ref, base)


def sdpa(q, k, v, causal, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, backend)):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def check_large(w, causal, n=131072):
    """Sampled rows vs float64 at full size, production next to cuDNN SDPA's own error."""
    q, k, v = qkv(n, H, seed=11)
    out, _ = ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal)
    err, rows = check_against_reference(q, k, v, out, causal=causal, budget_bytes=1e9)
    err_sdpa, _ = check_against_reference(q, k, v, sdpa(q, k, v, causal, "CUDNN_ATTENTION"), causal=causal,
                                          budget_bytes=1e9)
    ok = err <= 2 * err_sdpa + 4e-3
    return {"max_rel_err": err, "sdpa_cudnn_max_rel_err": err_sdpa, "rows": rows, "status": "ok" if ok else "fail"}


def cuda_time(fn, warmup=2, repeats=7) -> list[float]:
    """CUDA-event milliseconds per call (ringbook.bench.measure.time_call: the benchmark's own timer)."""
    return time_call(fn, torch.device("cuda"), warmup=warmup, repeats=repeats, target_s=float("inf"))


SDPA_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")
_SDPA_BEST: dict = {}


def best_sdpa(n, causal, backward=False):
    """Median ms of each SDPA backend on the full sequence; (best name, best ms, all)."""
    key = (n, causal, backward)
    if key not in _SDPA_BEST:
        q, k, v = qkv(n, H, seed=1, requires_grad=backward)
        dout = torch.randn_like(q)
        allt = {}
        for name in SDPA_BACKENDS:
            def call():
                out = sdpa(q, k, v, causal, name)
                if backward:
                    out.backward(dout)
            try:
                allt[name] = statistics.median(cuda_time(call))
            except Exception as exc:  # noqa: BLE001 - a backend that refuses the shape is just not a peer
                allt[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
        timed = {k_: t for k_, t in allt.items() if isinstance(t, float)}
        best = min(timed, key=timed.get)
        _SDPA_BEST[key] = (best, timed[best], allt)
        del q, k, v, dout
        torch.cuda.empty_cache()
    return _SDPA_BEST[key]


def time_forward(w, causal, n=131072, merge="auto", backend="auto"):
    """merge: "auto"; "torch" (Triton merge off); "group1" (fold each step's result at once, no grouping);
    "none" (merge skipped: wrong result, measures its cost)."""
    q, k, v = qkv(n, H, seed=2)
    tuning = {"torch": Tuning(triton=False), "group1": Tuning(merge_group=1)}.get(merge, Tuning())
    saved_merge = engine.merge_boxes_into_
    if merge == "none":  # an ablation of the tool's own: the merge replaced by nothing (a wrong result, timed only)
        engine.merge_boxes_into_ = lambda *args, **kwargs: None
    try:
        ms = statistics.median(cuda_time(lambda: ringbook.production_ring_attention(
            q, k, v, ring_size=w, causal=causal, backend=backend, tuning=tuning)))
    finally:
        engine.merge_boxes_into_ = saved_merge
    best, best_ms, allt = best_sdpa(n, causal)
    flops = attention_flops(B, H, n, n, D, causal)
    return {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "sdpa_best": best, "sdpa_ms": round(best_ms, 3),
            "ratio_vs_sdpa": round(best_ms / ms, 3), "sdpa_all_ms": allt}


def time_forward_backward(w, causal, n=65536, backend="auto"):
    q, k, v = qkv(n, H, seed=4, requires_grad=True)
    dout = torch.randn_like(q)

    def call():
        out, _ = ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, backend=backend)
        out.backward(dout)

    ms = statistics.median(cuda_time(call, warmup=2, repeats=5))
    best, best_ms, allt = best_sdpa(n, causal, backward=True)
    flops = 3.5 * attention_flops(B, H, n, n, D, causal)
    return {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "sdpa_best": best, "sdpa_ms": round(best_ms, 3),
            "ratio_vs_sdpa": round(best_ms / ms, 3), "sdpa_all_ms": allt}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for the JSON (default $OUT or .)")
    parser.add_argument("--quick", action="store_true", help="fewer correctness cases and timings")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check_production needs a CUDA device")
    t_start = time.perf_counter()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "ringbook": ringbook.__version__}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"not importable: {exc}"[:100]
    print(json.dumps(env))

    rings = [1, 4, 16] if args.quick else [1, 4, 8, 16]
    # (a) correctness
    for w in rings:
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                record("correct", f"dense w={w} {layout} causal={causal}", lambda: check_dense(w, layout, causal))
    for w, layout, causal in [(4, "contiguous", False), (8, "zigzag", True), (1, "zigzag", True)]:
        record("correct", f"GQA {H}/{HKV} w={w} {layout} causal={causal}",
               lambda: check_dense(w, layout, causal, hkv=HKV))
    record("correct", "dlse gradient w=4 zigzag causal", lambda: check_dense(4, "zigzag", True, with_dlse=True))
    for w, causal in [(1, False), (4, False), (4, True)]:
        record("correct", f"dilated w={w} causal={causal}", lambda: check_dilated(w, causal))
    for causal in (False, True):
        record("correct", f"131072 w=16 causal={causal} sampled rows", lambda: check_large(16, causal))

    # (b) forward timings at 131072
    for causal in (False, True):
        for w in rings:
            record("fwd", f"131072 w={w} causal={causal}", lambda: time_forward(w, causal))
        record("fwd", f"131072 w=16 causal={causal} merge=torch", lambda: time_forward(16, causal, merge="torch"))
        if not causal:
            record("fwd", "131072 w=16 causal=False merge group 1", lambda: time_forward(16, False, merge="group1"))
        record("fwd", f"131072 w=16 causal={causal} merge skipped (cost)", lambda: time_forward(16, causal, merge="none"))
        if not args.quick:
            record("fwd", f"131072 w=16 causal={causal} backend=flash",
                   lambda: time_forward(16, causal, backend="flash"))
    # (c) forward + backward at 65536
    for causal in (True, False):
        record("fwd+bwd", f"65536 w=8 causal={causal}", lambda: time_forward_backward(8, causal))
        record("fwd+bwd", f"65536 w=8 causal={causal} backend=flash",
               lambda: time_forward_backward(8, causal, backend="flash"))

    # (d) summary
    print("\nkernels chosen:")
    for key, text in kernels.STATUS.items():
        print(f"  {key}: {text}")
    print(f"\n{'section':<8} {'check':<46} {'status':<6} result")
    for row in ROWS:
        if row["section"] == "correct":
            res = "" if row["status"] == "ok" else row.get("error", "") or "see JSON"
        else:
            res = (f"{row.get('ms', '?')} ms, {row.get('tflops', '?')} TFLOP/s, {row.get('ratio_vs_sdpa', '?')}× "
                   f"{row.get('sdpa_best', '?')} ({row.get('sdpa_ms', '?')} ms)") if "ms" in row else row.get("error", "")
        print(f"{row['section']:<8} {row['name']:<46} {row['status']:<6} {str(res)[:110]}")
    counts = {s: sum(r["status"] == s for r in ROWS) for s in ("ok", "fail", "error")}
    print(f"\n{counts} in {time.perf_counter() - t_start:.0f} s")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check_production.json"
    path.write_text(json.dumps({"env": env, "kernels": {k: str(v) for k, v in kernels.STATUS.items()},
                                "rows": ROWS}, indent=1, default=str))
    print(f"wrote {path}")
    return 0 if counts["fail"] == counts["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
