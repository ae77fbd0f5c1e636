"""The dense production ring on one GPU, issue 14: exact, and timed against cuDNN in the same run, short to 8M tokens.

    python tools/gpu_dense.py [--out DIR] [--sections tune checks timing fwd_bwd launches long]
                              [--long-seq-lens 4194304 8388608] [--long-peers 4194304]

Sections (each writes its part of ``gpu_dense.json`` as soon as it is done):

* ``tune``: the Triton merge and gradient-sum kernels at each launch shape
  (elements per program, warps) on 131K-sized blocks; the fastest is kept
  for the sections after it (and recorded, to become the default).

* ``checks``: out, lse and gradients against the float64 reference (flash
  attention's 2× rule against naive bf16, as ``tools/gpu_check_production.py``)
  for the eager path, with the folds in line (no second stream), and the
  forward in parts (forced); the graphed forward against the eager one (the
  third call of a shape is a replay).
* ``timing``: forward at 16K and 131K, non-causal (contiguous) and causal
  (zigzag), ring sizes 4/8/16: cuDNN SDPA, the production path as it runs by
  default, and its ablations (no CUDA graph; the merge left out, for its cost), in
  interleaved rounds (``ringbook.bench.measure.time_interleaved``: CUDA
  events, warm-up, median); every output checked on sampled rows.
* ``fwd_bwd``: forward+backward at 64K with 8 ranks against cuDNN's, with
  and without the backward's second stream.
* ``launches``: one call under torch.profiler at 16K, ring 16: kernels
  launched, GPU busy time (the union of kernel intervals), and the wall time.
* ``long``: causal, ring 16, one timed call each at the long lengths, with
  the peak memory of the call (CUDA allocator) and a sampled-row check; cuDNN
  SDPA beside it at the ``--long-peers`` lengths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from profile_production import busy_ms  # noqa: E402 - tools/ is this script's folder
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import ringbook  # noqa: E402
from ringbook._utils import attention_flops  # noqa: E402
from ringbook.bench import check_against_reference, environment  # noqa: E402
from ringbook.bench.measure import peak_memory_gb, time_interleaved, time_once  # noqa: E402
from ringbook.bench.rules import TOLERANCE  # noqa: E402
from ringbook.fast import engine, kernels  # noqa: E402
from ringbook.fast.tuning import Tuning  # noqa: E402

DTYPE = torch.bfloat16
B, H, D = 1, 8, 64
CUDA = torch.device("cuda")
RESULT: dict = {}


def save(out: Path) -> None:
    RESULT["kernels"] = {k: str(v) for k, v in kernels.STATUS.items()}
    RESULT["graphs"] = {str(k[0][:6]): (v if isinstance(v, str) else "captured") for k, v in engine.GRAPHS.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_dense.json").write_text(json.dumps(RESULT, indent=1, default=str))


def qkv(n, hkv=H, seed=0, grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, n, H, D), (B, n, hkv, D), (B, n, hkv, D)]
    return [torch.randn(*s, generator=g, device="cuda", dtype=DTYPE).requires_grad_(grad) for s in shapes]


def cudnn(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def switch(overlap=True, parts=False) -> Tuning:
    """The engine's ablation switches as tuning data: the second stream off, or the forward forced into parts."""
    return Tuning(overlap=overlap, **({"parts_min_extra_bytes": 0, "parts_extra_fraction": 1e-9} if parts else {}))


def attempt(rows: list, name: str, fn) -> dict:
    t0 = time.perf_counter()
    try:
        row = {"name": name, **fn()}
        row.setdefault("status", "ok")
    except Exception as exc:  # noqa: BLE001 - a failing case is a row, the others still run
        row = {"name": name, "status": "error", "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    rows.append(row)
    print(f"[{row['status']:>5}] {name}: {json.dumps({k: v for k, v in row.items() if k != 'name'}, default=str)[:400]}",
          flush=True)
    return row


# --------------------------------------------------------------------------- checks

def section_checks() -> list:
    from gpu_check_production import check_dense  # the 2× rule on out, lse, dq, dk, dv

    rows: list = []
    for w, layout, causal in ((4, "contiguous", False), (16, "contiguous", False), (4, "zigzag", True),
                              (16, "zigzag", True), (8, "contiguous", True)):
        for label, tuning in (("eager", switch()), ("folds in line", switch(overlap=False)),
                              ("forward in parts", switch(parts=True))):
            def case(w=w, layout=layout, causal=causal, tuning=tuning):
                return check_dense(w, layout, causal, n=4096, tuning=tuning)
            attempt(rows, f"2x rule w={w} {layout} causal={causal} {label}", case)
    attempt(rows, "2x rule GQA 8/2 w=8 zigzag causal, in parts", lambda: _gqa_parts())
    for n, w, causal in ((16384, 16, False), (16384, 16, True), (4096, 4, True)):
        attempt(rows, f"graph replay vs eager n={n} w={w} causal={causal}", lambda n=n, w=w, causal=causal:
                _graph_check(n, w, causal))
    return rows


def _gqa_parts():
    from gpu_check_production import check_dense

    return check_dense(8, "zigzag", True, hkv=2, n=4096, tuning=switch(parts=True))


def _graph_check(n, w, causal):
    q, k, v = qkv(n, seed=n + w)
    with torch.no_grad():
        eager = ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, graph=False)
        outs = [ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal) for _ in range(3)]
        q2 = torch.randn_like(q)  # new data in the same shape: the replay must follow the inputs
        eager2 = ringbook.production_ring_attention(q2, k, v, ring_size=w, causal=causal, graph=False)
        replay2 = ringbook.production_ring_attention(q2, k, v, ring_size=w, causal=causal)
    captured = [isinstance(e, engine._Graph) for key, e in engine.GRAPHS.items() if key[0][1:3] == (n, w)]
    diffs = [max((a.float() - b.float()).abs().max().item() for a, b in zip(o, eager)) for o in outs]
    diff2 = max((a.float() - b.float()).abs().max().item() for a, b in zip(replay2, eager2))
    err, rows = check_against_reference(q2, k, v, replay2[0], causal=causal, budget_bytes=5e8)
    ok = any(captured) and max(diffs + [diff2]) <= TOLERANCE[DTYPE] and err <= TOLERANCE[DTYPE]
    return {"status": "ok" if ok else "fail", "captured": any(captured), "max_abs_diff_calls_1_2_3": diffs,
            "max_abs_diff_replay_new_inputs": diff2, "rel_err_replay": err, "rows_checked": rows}


# --------------------------------------------------------------------------- tune

def section_tune(c=8192, w=16, rounds=10) -> dict:
    """Time the Triton merge and gradient-sum kernels at each launch shape on 131K-sized blocks; keep the fastest."""
    from ringbook.fast import triton_merge as tm
    from ringbook.fast.kernels import forward_block

    g = torch.Generator(device="cuda").manual_seed(9)
    q, k, v = (torch.randn(w, c, H, D, generator=g, device="cuda", dtype=DTYPE) for _ in range(3))
    with torch.no_grad():
        blocks = [forward_block(q, k.roll(i, 0), v.roll(i, 0), scale=D ** -0.5) for i in range(tm.MAX_BLOCKS)]
    box = (0, w, 0, c)
    items = [(box, o, lse) for o, lse in blocks]
    acc, acc_lse = torch.empty(w, c, H, D, device="cuda"), torch.empty(w, H, c, device="cuda")
    tm.merge_boxes_into_triton_(acc, acc_lse, items, initialise=True)
    gbytes = {"merge": (2 * acc.nbytes + sum(o.nbytes for o, _ in blocks)) / 1e9,
              "add": (2 * acc.nbytes + sum(o.nbytes for o, _ in blocks)) / 1e9}
    calls = {"merge": lambda: tm.merge_boxes_into_triton_(acc, acc_lse, items, launch=launch["merge"]),
             "add": lambda: tm.add_boxes_into_triton_(acc, [(box, o) for o, _ in blocks], launch=launch["add"])}
    default = Tuning()
    launch = {"merge": default.merge_launch, "add": default.add_launch}
    out = {"default": dict(launch), "gb_per_pass": gbytes, "configs": {}}
    for kernel, fn in calls.items():
        best = None
        for elements in (1024, 2048, 4096, 8192):
            for warps in (2, 4, 8):
                launch[kernel] = (elements, warps)
                for _ in range(2):
                    fn()
                torch.cuda.synchronize()
                ms = sorted(time_once(fn, CUDA) for _ in range(rounds))[rounds // 2]
                out["configs"][f"{kernel} {elements}x{warps}"] = {"ms": ms, "tb_per_s": gbytes[kernel] / ms}
                if best is None or ms < best[0]:
                    best = (ms, (elements, warps))
        launch[kernel] = best[1]
        print(f"{kernel}: best {best[1]} at {best[0]:.3f} ms ({gbytes[kernel] / best[0]:.2f} TB/s)", flush=True)
    out["chosen"] = dict(launch)  # set them as Tuning(merge_launch=..., add_launch=...) defaults
    return out


# --------------------------------------------------------------------------- timing

def forward_calls(q, k, v, w, causal):
    layout = "zigzag" if causal else "contiguous"

    def prod(graph=True, overlap=True):
        def call():
            return ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, layout=layout,
                                                      graph="auto" if graph else False, tuning=switch(overlap=overlap))
        return call

    def no_merge():  # the merge left out (a wrong result, timed only for the merge's cost)
        real = engine.merge_boxes_into_
        engine.merge_boxes_into_ = lambda *args, **kwargs: None
        try:
            return ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, layout=layout, graph=False)
        finally:
            engine.merge_boxes_into_ = real

    return {"cudnn": lambda: cudnn(q, k, v, causal), "production": prod(),
            "production graph=False": prod(graph=False), "production merge skipped (cost)": no_merge}


def section_timing(seq_lens, rings, rounds_for) -> list:
    rows = []
    for n in seq_lens:
        q, k, v = qkv(n, seed=n)
        for causal in (False, True):
            for w in rings:
                def case(n=n, causal=causal, w=w):
                    calls = forward_calls(q, k, v, w, causal)
                    with torch.no_grad():
                        checks = {}
                        for name, fn in calls.items():
                            if name == "cudnn" or "skipped" in name:
                                continue
                            for _ in range(3):  # the graphed call: eager, capture, replay
                                out = fn()
                            err, checked = check_against_reference(q, k, v, out[0], causal=causal, budget_bytes=5e8)
                            checks[name] = err
                            del out
                        t = time_interleaved(calls, CUDA, rounds=rounds_for(n))
                    ms = {name: x["median_ms"] for name, x in t.items()}
                    flops = attention_flops(B, H, n, n, D, causal)
                    ok = all(math.isfinite(e) and e <= TOLERANCE[DTYPE] for e in checks.values())
                    return {"status": "ok" if ok else "fail", "seq_len": n, "ring_size": w, "causal": causal,
                            "layout": "zigzag" if causal else "contiguous", "ms": ms,
                            "ratio_vs_cudnn": {name: ms["cudnn"] / x for name, x in ms.items() if name != "cudnn"},
                            "tflops": {name: flops / x / 1e9 for name, x in ms.items()}, "rel_err": checks,
                            "times_ms": {name: x["times_ms"] for name, x in t.items()}}
                attempt(rows, f"forward n={n} w={w} causal={causal}", case)
        q = k = v = None  # free before the next length
        torch.cuda.empty_cache()
    return rows


def section_fwd_bwd(n=65536, w=8, rounds=6) -> list:
    rows = []
    q, k, v = qkv(n, seed=5, grad=True)
    g = torch.Generator(device="cuda").manual_seed(6)
    dout = torch.randn(B, n, H, D, generator=g, device="cuda", dtype=DTYPE)
    for causal in (False, True):
        def step(fn):
            def call():
                for x in (q, k, v):
                    x.grad = None
                out = fn()
                out = out[0] if isinstance(out, tuple) else out
                out.backward(dout)
            return call

        def case(causal=causal):
            def prod(overlap=True):
                return lambda: ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal,
                                                                  tuning=switch(overlap=overlap))
            calls = {"cudnn": step(lambda: cudnn(q, k, v, causal)), "production": step(prod()),
                     "production overlap=False": step(prod(overlap=False))}
            t = time_interleaved(calls, CUDA, rounds=rounds)
            grads = {}
            for name in ("cudnn", "production"):
                calls[name]()
                grads[name] = [x.grad.float().clone() for x in (q, k, v)]
            ms = {name: x["median_ms"] for name, x in t.items()}
            rel = [((a - c).abs().max() / c.abs().max()).item() for a, c in zip(grads["production"], grads["cudnn"])]
            return {"seq_len": n, "ring_size": w, "causal": causal, "ms": ms,
                    "ratio_vs_cudnn": {name: ms["cudnn"] / x for name, x in ms.items() if name != "cudnn"},
                    "grad_rel_diff_vs_cudnn": rel, "times_ms": {name: x["times_ms"] for name, x in t.items()}}
        attempt(rows, f"forward+backward n={n} w={w} causal={causal}", case)
    return rows


# --------------------------------------------------------------------------- launches

def section_launches(n=16384, w=16) -> list:
    rows = []
    q, k, v = qkv(n, seed=1)
    for causal in (False, True):
        calls = forward_calls(q, k, v, w, causal)
        for name in ("cudnn", "production", "production graph=False"):
            def case(name=name, causal=causal):
                fn = calls[name]
                with torch.no_grad():
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                    wall = time_once(fn, CUDA)
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        fn()
                        torch.cuda.synchronize()
                kernels_, union, total = busy_ms(prof)
                try:
                    top = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                                 key=lambda e: e.self_device_time_total, reverse=True)[:8]
                except Exception:  # noqa: BLE001 - the table is a diagnostic; the counts above are the result
                    top = []
                return {"seq_len": n, "ring_size": w, "causal": causal, "wall_ms": wall, "gpu_activities": kernels_,
                        "gpu_busy_ms": union, "gpu_kernel_sum_ms": total, "gpu_idle_ms": wall - union,
                        "top": [(e.key[:80], e.count, round(e.self_device_time_total / 1e3, 4)) for e in top]}
            attempt(rows, f"launches n={n} w={w} causal={causal} {name}", case)
    return rows


# --------------------------------------------------------------------------- long sequences

def section_long(seq_lens, peers, out_dir) -> list:
    rows = RESULT.setdefault("long", [])
    for n in seq_lens:
        q, k, v = qkv(n, seed=3)
        inputs_gb = 3 * q.nbytes / 1e9
        cases = {"production": lambda: ringbook.production_ring_attention(q, k, v, ring_size=16, causal=True)}
        if n in peers:
            cases["cudnn"] = lambda: cudnn(q, k, v, True)
        for name, fn in cases.items():
            def case(fn=fn, ours=name == "production"):
                with torch.no_grad():
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

                    def timed():
                        start.record()
                        res = fn()
                        end.record()
                        return res
                    peak, res = peak_memory_gb(timed, CUDA)
                    ms = start.elapsed_time(end)
                    out = res[0] if isinstance(res, tuple) else res
                    err, checked = check_against_reference(q, k, v, out, causal=True, budget_bytes=1e9)
                    del res, out
                ok = math.isfinite(err) and err <= TOLERANCE[DTYPE]
                return {"status": "ok" if ok else "fail", "seq_len": n, "ring_size": 16 if ours else None,
                        "causal": True, "layout": "zigzag" if ours else None, "time_ms": ms, "peak_mem_gb": peak,
                        "inputs_gb": inputs_gb,
                        "tflops": attention_flops(B, H, n, n, D, True) / ms / 1e9, "rel_err": err,
                        "rows_checked": checked}
            attempt(rows, f"long n={n} causal ring 16 {name}", case)
            torch.cuda.empty_cache()
            save(out_dir)
        q = k = v = None  # free before the next length
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--sections", nargs="+", default=["checks", "timing", "fwd_bwd", "launches"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[16384, 131072])
    p.add_argument("--rings", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--long-seq-lens", nargs="+", type=int, default=[4194304, 8388608])
    p.add_argument("--long-peers", nargs="+", type=int, default=[4194304])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_dense needs a CUDA device")
    RESULT.update(environment=environment(CUDA), dtype="bfloat16", shape={"batch": B, "heads": H, "head_dim": D},
                  command="python tools/gpu_dense.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    for section in args.sections:
        t0 = time.perf_counter()
        if section == "tune":
            RESULT["tune"] = section_tune()
        elif section == "checks":
            RESULT["checks"] = section_checks()
        elif section == "timing":
            RESULT["timing"] = section_timing(args.seq_lens, args.rings, lambda n: 40 if n <= 32768 else 8)
        elif section == "fwd_bwd":
            RESULT["fwd_bwd"] = section_fwd_bwd()
        elif section == "launches":
            RESULT["launches"] = section_launches()
        elif section == "long":
            section_long(args.long_seq_lens, set(args.long_peers), args.out)
        else:
            raise SystemExit(f"unknown section {section!r}")
        print(f"== {section} done in {time.perf_counter() - t0:.0f} s", flush=True)
        save(args.out)
    print(f"wrote {args.out / 'gpu_dense.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
