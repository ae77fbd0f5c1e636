"""The strategies with every rank on one GPU, against one cuDNN SDPA call, in the same run (the strategies issue).

    python tools/gpu_strategies.py [--seq-lens 16384 131072] [--rings 8 16] [--rounds 8] [--out DIR]

With no network, a strategy's time beside cuDNN on the whole sequence is its
engine overhead alone. For each sequence length, causal setting and ring
size, the calls — cuDNN SDPA on the whole sequence, and
``production_ring_attention(strategy=...)`` for the ring, all-gather and
Ulysses — are timed in interleaved rounds (CUDA events, warm-up, median:
``ringbook.bench.measure.time_interleaved``); every output is checked against
the float64 reference on sampled rows (``check_against_reference``) before it
is timed. Ratios are cuDNN time / strategy time (1.0: as fast as cuDNN; the
issue's bar for all-gather and Ulysses is ≥ 0.95). bf16, b=1 h=8 d=64.
Writes ``gpu_strategies.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ringbook  # noqa: E402
from ringbook._utils import attention_flops  # noqa: E402
from ringbook.bench import check_against_reference, environment  # noqa: E402
from ringbook.bench.measure import time_interleaved  # noqa: E402
from ringbook.tolerance import TOLERANCE  # noqa: E402

B, H, D, DTYPE = 1, 8, 64, torch.bfloat16


def cudnn(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 131072])
    p.add_argument("--rings", type=int, nargs="+", default=[8, 16])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_strategies needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for n in args.seq_lens:
        q, k, v = (torch.randn(B, n, H, D, generator=gen, device="cuda", dtype=DTYPE) for _ in range(3))
        rounds = max(args.rounds, 40) if n <= 32768 else args.rounds
        for causal in (False, True):
            layout = "zigzag" if causal else "contiguous"
            for w in args.rings:
                calls = {"cudnn": lambda: cudnn(q, k, v, causal)}
                # Ulysses deals whole heads to ranks: where the ring size does not divide
                # the heads it is refused (check_strategy), and the row says so.
                strategies = ("ring", "allgather", "ulysses") if H % w == 0 else ("ring", "allgather")
                for strategy in strategies:
                    calls[strategy] = (lambda s: lambda: ringbook.production_ring_attention(
                        q, k, v, ring_size=w, causal=causal, layout=layout, strategy=s))(strategy)
                checks = {}
                with torch.no_grad():
                    for name, fn in calls.items():
                        if name == "cudnn":
                            continue
                        for _ in range(3):  # eager, then the CUDA graph's capture and replay
                            out = fn()
                        err, checked = check_against_reference(q, k, v, out[0], causal=causal, budget_bytes=5e8)
                        checks[name] = {"max_rel_err": err, "checked_rows": checked,
                                        "ok": math.isfinite(err) and err <= TOLERANCE[DTYPE]}
                    t = time_interleaved(calls, torch.device("cuda"), rounds=rounds, warmup=2)
                ms = {name: x["median_ms"] for name, x in t.items()}
                row = {"seq_len": n, "ring_size": w, "causal": causal, "layout": layout, "ms": ms,
                       "ratio_vs_cudnn": {s: ms["cudnn"] / ms[s] for s in ms if s != "cudnn"},
                       "tflops": {s: attention_flops(B, H, n, n, D, causal) / x / 1e9 for s, x in ms.items()},
                       "not_run": {} if "ulysses" in strategies else
                       {"ulysses": f"{H} heads do not divide into ring size {w}"},
                       "checks": checks, "status": "ok" if all(c["ok"] for c in checks.values()) else "error",
                       "times_ms": {name: x["times_ms"] for name, x in t.items()}}
                rows.append(row)
                print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "times_ms"}), flush=True)
        q = k = v = None
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_strategies.json"
    path.write_text(json.dumps({"env": environment(torch.device("cuda")), "dtype": "bfloat16", "batch": B,
                                "heads": H, "head_dim": D, "rows": rows}, indent=1, default=str))
    print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
