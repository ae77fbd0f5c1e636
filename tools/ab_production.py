"""Time ringbook's production path against a baseline copy of ringbook and cuDNN SDPA, in the same run.

    python tools/ab_production.py --baseline DIR [--seq-lens 16384 131072] [--rings 1 8 16] [--out DIR]

``DIR`` holds another ringbook tree (``DIR/ringbook/__init__.py``, e.g. from
``git archive <commit> ringbook | tar -x -C DIR``); it is imported as
``ringbook_baseline``. For each (causal, ring size) the three calls — cuDNN
SDPA on the whole sequence, this tree's production_ring_attention and the
baseline's — are timed in interleaved rounds (one call each per round, CUDA
events through ringbook.bench.measure.time_once, after warm-up); the medians
and the same-run ratios (cuDNN time / production time) are reported, with
each output's error against the float64 reference on sampled rows and the
largest difference between the two trees' outputs. Forward+backward at
``--fwd-bwd-seq-len`` with 8 ranks likewise, and the dilated fast path
(the benchmark's dilated configuration, ``--dilated-seq-len``) against its
peer ``dilated_sdpa``. Each row gives ``ratio_vs_baseline`` = this tree's
time / the baseline's (1.0: the same speed). Writes ``ab_production.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import ringbook
from ringbook._utils import attention_flops
from ringbook.bench import check_against_reference, environment
from ringbook.bench.measure import time_interleaved


def load_baseline(folder: Path):
    init = folder / "ringbook" / "__init__.py"
    if not init.exists():
        raise SystemExit(f"--baseline {folder}: no ringbook/__init__.py there")
    spec = importlib.util.spec_from_file_location("ringbook_baseline", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ringbook_baseline"] = module
    spec.loader.exec_module(module)
    return module


def cudnn(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def interleaved(calls: dict, rounds: int, warmup: int = 2) -> dict:
    return time_interleaved(calls, torch.device("cuda"), rounds=rounds, warmup=warmup)


def _forward_row(calls, q, k, v, n, w, causal, rounds, b, h, d, cfg=None, peer="cudnn") -> dict:
    """Time the calls in interleaved rounds; check this tree's and the baseline's outputs; one row."""
    t = interleaved(calls, rounds)
    new_out, new_lse = calls["ringbook"]()
    old_out, old_lse = calls["baseline"]()
    if cfg is None:
        check = lambda out: check_against_reference(q, k, v, out, causal=causal, budget_bytes=5e8)  # noqa: E731
    else:  # against equation (D) in float64, each row from its own key window
        from ringbook.bench.registry import _ring_dilated_check
        check = lambda out: _ring_dilated_check(q, k, v, out, causal=causal)  # noqa: E731
    err_new, checked = check(new_out)
    err_old, _ = check(old_out)
    fin = torch.isfinite(old_lse)
    row = {"mode": "forward" if cfg is None else "forward, dilated", "seq_len": n, "ring_size": w, "causal": causal,
           **{f"{name}_ms": round(x["median_ms"], 3) for name, x in t.items()},
           "ratio_ringbook": round(t[peer]["median_ms"] / t["ringbook"]["median_ms"], 4),
           "ratio_baseline": round(t[peer]["median_ms"] / t["baseline"]["median_ms"], 4),
           "ratio_vs_baseline": round(t["ringbook"]["median_ms"] / t["baseline"]["median_ms"], 4),
           "max_rel_err_ringbook": err_new, "max_rel_err_baseline": err_old, "checked_rows": checked,
           "max_abs_diff_vs_baseline": (new_out.float() - old_out.float()).abs().max().item(),
           "max_abs_lse_diff_vs_baseline": (new_lse[fin].float() - old_lse[fin].float()).abs().max().item()
           if bool(fin.any()) else 0.0,
           "same_empty_rows": bool(torch.equal(torch.isneginf(new_lse), torch.isneginf(old_lse))), "times": t}
    if cfg is None:
        row["tflops_ringbook"] = round(attention_flops(b, h, n, n, d, causal) / t["ringbook"]["median_ms"] / 1e9, 1)
    print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "times"}), flush=True)
    return row


def _dilated_rows(base, n, rounds, gen, b, h, d, dtype) -> list:
    """The dilated fast path (the benchmark's dilated configuration) against the baseline and ``dilated_sdpa``."""
    from ringbook.bench.registry import bench_dilated_config
    from ringbook.fast.dilated import dilated_sdpa

    cfg = dict(bench_dilated_config(n), heads="grouped")
    q, k, v = (torch.randn(b, n, h, d, generator=gen, device="cuda", dtype=dtype) for _ in range(3))
    rows = []
    for causal in (False, True):
        for w in (1, 16):
            calls = {
                "dilated_sdpa": lambda: dilated_sdpa(q, k, v, causal=causal, **cfg),
                "ringbook": lambda: ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, **cfg),
                "baseline": lambda: base.production_ring_attention(q, k, v, ring_size=w, causal=causal, **cfg),
            }
            rows.append(_forward_row(calls, q, k, v, n, w, causal, rounds, b, h, d, cfg=cfg, peer="dilated_sdpa"))
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 131072])
    p.add_argument("--rings", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--fwd-bwd-seq-len", type=int, default=65536)
    p.add_argument("--dilated-seq-len", type=int, default=131072)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ab_production needs a CUDA device")
    base = load_baseline(args.baseline)
    b, h, d, dtype = 1, 8, 64, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for n in args.seq_lens:
        rounds = max(args.rounds, 40) if n <= 32768 else args.rounds  # short calls: more rounds for a steady median
        q, k, v = (torch.randn(b, n, h, d, generator=gen, device="cuda", dtype=dtype) for _ in range(3))
        for causal in (False, True):
            for w in args.rings:
                calls = {
                    "cudnn": lambda: cudnn(q, k, v, causal),
                    "ringbook": lambda: ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal),
                    "baseline": lambda: base.production_ring_attention(q, k, v, ring_size=w, causal=causal),
                }
                rows.append(_forward_row(calls, q, k, v, n, w, causal, rounds, b, h, d))
        calls = None
        torch.cuda.empty_cache()
    rows += _dilated_rows(base, args.dilated_seq_len, args.rounds, gen, b, h, d, dtype)
    n = args.fwd_bwd_seq_len
    q, k, v = (torch.randn(b, n, h, d, generator=gen, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(b, n, h, d, generator=gen, device="cuda", dtype=dtype)
    for causal in (False, True):
        def step(fn):
            def call():
                for x in (q, k, v):
                    x.grad = None
                out = fn()
                out = out[0] if isinstance(out, tuple) else out
                out.backward(dout)
            return call
        calls = {"cudnn": step(lambda: cudnn(q, k, v, causal)),
                 "ringbook": step(lambda: ringbook.production_ring_attention(q, k, v, ring_size=8, causal=causal)),
                 "baseline": step(lambda: base.production_ring_attention(q, k, v, ring_size=8, causal=causal))}
        t = interleaved(calls, max(3, args.rounds // 2))
        grads = {}
        for name in ("ringbook", "baseline"):
            calls[name]()
            grads[name] = [x.grad.float().clone() for x in (q, k, v)]
        row = {"mode": "forward+backward", "seq_len": n, "ring_size": 8, "causal": causal,
               **{f"{name}_ms": round(x["median_ms"], 3) for name, x in t.items()},
               "ratio_ringbook": round(t["cudnn"]["median_ms"] / t["ringbook"]["median_ms"], 4),
               "ratio_baseline": round(t["cudnn"]["median_ms"] / t["baseline"]["median_ms"], 4),
               "ratio_vs_baseline": round(t["ringbook"]["median_ms"] / t["baseline"]["median_ms"], 4),
               "max_abs_grad_diff_vs_baseline": max((a - c).abs().max().item()
                                                    for a, c in zip(grads["ringbook"], grads["baseline"])),
               "times": t}
        rows.append(row)
        print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "times"}), flush=True)
    from ringbook.fast import kernels

    env = environment(torch.device("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "ab_production.json"
    path.write_text(json.dumps({"env": env, "dtype": "bfloat16", "batch": b, "heads": h, "head_dim": d,
                                "baseline": str(args.baseline), "kernels": {k_: str(v_) for k_, v_ in
                                                                            kernels.STATUS.items()},
                                "rows": rows}, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
