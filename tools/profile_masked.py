"""Where the time of a masked production call goes on a CUDA GPU: wall time, GPU kernel time, and the top ops.

    python tools/profile_masked.py [--out DIR]

Profiles ``production_ring_attention(document_ids=...)`` (16 documents shifted
by half a document, so boundaries cut blocks; 1,024 documents; a 4,096 window)
at 131,072 tokens, ring sizes 1 and 8, forward, under ``torch.profiler``, and
writes ``profile_masked.json`` (per case: median wall ms of 5 calls, the sum
of CUDA kernel time, the top ops by CUDA and by CPU time). Also checks the
einops backend on CUDA against float64 without documents (a bf16 failure seen
with documents), with and without the Triton merge.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import ringbook  # noqa: E402
from ringbook.bench import environment  # noqa: E402
from ringbook.fast.tuning import Tuning  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = p.parse_args(argv)
    n, h, d = 131072, 8, 64
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cases = {"docs16 shifted": (((torch.arange(n) + n // 32) // (n // 16))[None].cuda(), None),
             "docs1024": ((torch.arange(n) // 128)[None].cuda(), None), "window4096": (None, 4096)}
    rows = []
    for name, (ids, window) in cases.items():
        for w in (1, 8):
            def call():
                return ringbook.production_ring_attention(q, k, v, ring_size=w, causal=True, layout="zigzag",
                                                          document_ids=ids, window=window)
            with torch.no_grad():
                for _ in range(2):
                    call()
                torch.cuda.synchronize()
                walls = []
                for _ in range(5):
                    t = time.perf_counter()
                    call()
                    torch.cuda.synchronize()
                    walls.append((time.perf_counter() - t) * 1e3)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    call()
                    torch.cuda.synchronize()
            ev = prof.key_averages()
            cuda_total = sum(e.self_device_time_total for e in ev) / 1e3
            top_cuda = sorted(ev, key=lambda e: -e.self_device_time_total)[:12]
            top_cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
            row = {"case": name, "ring_size": w, "wall_ms": statistics.median(walls), "cuda_kernel_ms": cuda_total,
                   "top_cuda": [(e.key, e.count, round(e.self_device_time_total / 1e3, 3)) for e in top_cuda],
                   "top_cpu": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 3)) for e in top_cpu]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    # the einops backend on CUDA: the same call three times in a row (is only the first one wrong?), then with
    # every Triton merge checked against the torch merge on copies of its accumulators (which fold goes wrong?)
    checks = []
    g = torch.Generator(device="cuda").manual_seed(0)
    qs, ks, vs = (torch.randn(1, 4096, 8, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor([700, 1, 1395, 1000, 1000]))[None].cuda()
    ref_d, _ = ringbook.naive_attention(qs.double(), ks.double(), vs.double(), document_ids=ids)
    from ringbook.fast import merge as merge_mod
    from ringbook.fast import triton_merge

    real = triton_merge.merge_boxes_into_triton_
    folds = []

    def probed(acc_out, acc_lse, items, *, initialise=False, launch=(1024, 2)):
        want_o, want_l = acc_out.clone(), acc_lse.clone()
        merge_mod._torch_boxes(want_o, want_l, items, initialise=initialise)
        real(acc_out, acc_lse, items, initialise=initialise, launch=launch)
        bad = float((acc_out - want_o).abs().nan_to_num(1e9).max())
        folds.append({"initialise": initialise, "max_abs_diff_vs_torch": bad,
                      "acc_nan": int(acc_out.isnan().sum()), "want_nan": int(want_o.isnan().sum()),
                      "items": [{"box": list(bx), "out": [list(o.shape), list(o.stride()), str(o.dtype)],
                                 "lse": [list(lv.shape), list(lv.stride()), str(lv.dtype)],
                                 "out_nan": int(o.isnan().sum()), "lse_neginf": int(lv.isneginf().sum()),
                                 "lse_nan": int(lv.isnan().sum())} for bx, o, lv in items]})

    for probe in (True, False):  # the probe first: if only a first call goes wrong, the probe sees it
        triton_merge.merge_boxes_into_triton_ = probed if probe else real
        for call in range(3):
            folds.clear()
            with torch.no_grad():
                out, _ = ringbook.production_ring_attention(qs, ks, vs, ring_size=4, backend="einops",
                                                            tuning=Tuning(triton=True), graph=False,
                                                            document_ids=ids)
            err = float((out.double() - ref_d).abs().nan_to_num(1e9).max())
            checks.append({"probe": probe, "call": call, "max_abs_err": err, "folds": list(folds)})
            print(json.dumps({k: v for k, v in checks[-1].items() if k != "folds"}),
                  [f["max_abs_diff_vs_torch"] for f in folds], flush=True)
    triton_merge.merge_boxes_into_triton_ = real
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_masked.json").write_text(json.dumps({"env": environment(torch.device("cuda")),
                                                              "rows": rows, "einops_checks": checks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
