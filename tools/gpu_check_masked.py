"""Check the fused masked blocks (documents, windows) of the production path on a CUDA GPU, and time them.

    python tools/gpu_check_masked.py [--out DIR]

(a) correctness, bf16, b=2 h=8 (2 kv heads) d=64, n = 4096: forward and
    backward of ``production_ring_attention(..., document_ids=, window=)`` at
    ring sizes 1, 4 and 8, contiguous and zigzag, causal or not, against
    ``naive_attention`` with the same mask in float64, under flash-attention's
    2× rule (the same naive path in bf16 is the baseline), with
    ``backend="auto"`` (the fused variable-length kernel on partial blocks)
    and ``backend="einops"``;
(b) forward and forward+backward time at 131,072 tokens (16 and 1,024 equal
    documents, causal; a causal window of 4,096), ring sizes 1 and 8, the
    fused path (and, forward at ring 8, the einops path) against cuDNN's dense causal
    call on the whole sequence (what not skipping costs), in interleaved
    rounds (CUDA events, warm-up, median). TFLOP/s count the pairs the mask
    leaves. Writes ``gpu_check_masked.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ringbook  # noqa: E402
from ringbook.bench import environment, within_2x_rule  # noqa: E402
from ringbook.bench.measure import time_interleaved  # noqa: E402
from ringbook.masks import visible_pairs  # noqa: E402

DTYPE, B, H, HKV, D = torch.bfloat16, 1, 8, 2, 64
B_CHECK = 2  # batch rows of the correctness cases: every row's pieces must be launched
ROWS: list[dict] = []


def record(section: str, name: str, fn) -> None:
    t0 = time.perf_counter()
    row = {"section": section, "name": name}
    try:
        row.update(fn())
        row.setdefault("status", "ok")
    except Exception as exc:  # noqa: BLE001 - every failure is a row; the run goes on
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:600], traceback=traceback.format_exc(limit=8))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    ROWS.append(row)
    print(json.dumps({k: v for k, v in row.items() if k not in ("traceback", "times_ms")}), flush=True)


def ids_of(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].cuda()


def expand(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(H // x.shape[2], dim=2)


def correctness(n: int, ring: int, layout: str, causal: bool, ids, window, backend: str) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(ring * 7 + causal)
    q = torch.randn(B_CHECK, n, H, D, generator=gen, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(B_CHECK, n, HKV, D, generator=gen, device="cuda", dtype=DTYPE) for _ in range(2))
    dout = torch.randn(B_CHECK, n, H, D, generator=gen, device="cuda", dtype=DTYPE)
    mask = {"document_ids": ids, "window": window}

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out, lse = fn(*xs)
        out.backward(dout.to(out.dtype))
        return {"out": out.detach(), "lse": lse.detach(), "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}

    def naive(q_, k_, v_):
        return ringbook.naive_attention(q_, expand(k_), expand(v_), causal=causal, **mask)

    got = grads(lambda *x: ringbook.production_ring_attention(*x, ring_size=ring, causal=causal, layout=layout,
                                                               backend=backend, **mask), q, k, v)
    ref = grads(naive, q.double(), k.double(), v.double())
    base = grads(naive, q, k, v)
    row, ok = {}, True
    for key in ("out", "dq", "dk", "dv"):
        passed, e, eb, atol = within_2x_rule(got[key], ref[key], base[key], what=key)
        row[key] = {"err": e, "naive_bf16_err": eb, "atol": atol, "ok": passed}
        ok &= passed
    fin = torch.isfinite(ref["lse"])
    same_empty = bool(torch.equal(fin, torch.isfinite(got["lse"])))
    lse_err = float((got["lse"][fin].double() - ref["lse"][fin]).abs().max()) if fin.any() else 0.0
    row.update(lse_err=lse_err, same_empty_rows=same_empty)
    ok &= same_empty and lse_err < 0.05
    return {**row, "status": "ok" if ok else "fail"}


def cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)


def timing(n: int, name: str, ids, window, rings: list[int], backward: bool, rounds: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, n, H, D, generator=gen, device="cuda", dtype=DTYPE, requires_grad=backward)
               for _ in range(3))
    dout = torch.randn(B, n, H, D, generator=gen, device="cuda", dtype=DTYPE)
    mask = {"document_ids": ids, "window": window}

    calls = {"cudnn dense causal": (lambda: torch.autograd.grad(cudnn(q, k, v), (q, k, v), dout)) if backward
             else (lambda: cudnn(q, k, v))}
    for w in rings:  # the einops path only at the largest ring size, forward (at ring 1 it is one n × n block)
        for backend in ("auto", "einops") if w == max(rings) and not backward else ("auto",):
            def f(w=w, backend=backend):
                out, _ = ringbook.production_ring_attention(q, k, v, ring_size=w, causal=True, layout="zigzag",
                                                            backend=backend, **mask)
                return torch.autograd.grad(out, (q, k, v), dout) if backward else out
            calls[f"production ring {w} {backend}"] = f
    with torch.set_grad_enabled(backward):
        t = time_interleaved(calls, torch.device("cuda"), rounds=rounds, warmup=1)
    pairs = visible_pairs(n, causal=True, document_ids=None if ids is None else ids.cpu(), window=window)
    work = 4 * B * H * D * pairs * (3.5 if backward else 1.0)
    ms = {c: x["median_ms"] for c, x in t.items()}
    return {"seq_len": n, "mask": name, "mode": "forward+backward" if backward else "forward", "ms": ms,
            "visible_pairs": int(pairs), "tflops_visible": {c: work / x / 1e9 for c, x in ms.items()},
            "speedup_fused_vs_einops": {w: ms[f"production ring {w} einops"] / ms[f"production ring {w} auto"]
                                        for w in rings if f"production ring {w} einops" in ms},
            "times_ms": {c: x["times_ms"] for c, x in t.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-timing", action="store_true", help="correctness only (tools/gpu_masked.py times the peers)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check_masked needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    n = 4096
    masks = {"docs": (ids_of([700, 1, 1395, 1000, 1000]), None), "window 300": (None, 300),
             "docs + window 300": (ids_of([2048, 1024, 1024]), 300), "1024 tiny docs": (ids_of([4] * 1024), None)}
    for name, (ids, window) in masks.items():
        for ring in (1, 4, 8):
            for layout, causal in (("contiguous", False), ("zigzag", True), ("contiguous", True)):
                for backend in ("auto", "einops") if ring == 4 else ("auto",):
                    record("correctness", f"{name} ring {ring} {layout} causal={causal} {backend}",
                           lambda: correctness(n, ring, layout, causal, ids, window, backend))
    big = args.seq_len
    timed = (("16 docs", ids_of([big // 16] * 16), None), ("1024 docs", ids_of([big // 1024] * 1024), None),
             ("window 4096", None, 4096))
    for name, ids, window in () if args.no_timing else timed:
        for backward in (False, True):
            record("timing", f"{name} {'fwd+bwd' if backward else 'fwd'}",
                   lambda: timing(big, name, ids, window, [1, 8], backward, args.rounds))
    path = args.out / "gpu_check_masked.json"
    path.write_text(json.dumps({"env": environment(torch.device("cuda")), "dtype": "bfloat16", "batch": B,
                                "batch_correctness": B_CHECK,
                                "heads": H, "kv_heads": HKV, "head_dim": D, "rows": ROWS}, indent=1, default=str))
    print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
