"""The README's headline table and docs/results.md's tables, generated from the committed results files.

    python tools/readme_results.py readme    # print the README's block (the headline, at most six rows)
    python tools/readme_results.py docs      # print docs/results.md's block (every table, the profile)
    python tools/readme_results.py --write   # replace the block between the markers of both files

tests/test_readme.py fails when either block differs from what this prints,
so every number in the README and docs/results.md comes from a file under figures/.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ringbook.bench.published import TARGETS  # noqa: E402
from ringbook.bench.results import load_rows  # noqa: E402
from ringbook.viz.masks import masked_timings  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
ONE_GPU = "figures/bench-nvidia-h100-80gb-hbm3-bfloat16.json"
FWD_BWD = "figures/bench-nvidia-h100-80gb-hbm3-bfloat16-fwd-bwd.json"
TWO_GPU = "figures/dist-bench-nvidia-h100-80gb-hbm3-bfloat16-w2.json"
TWO_GPU_FUSED = "figures/dist-bench-nvidia-h100-80gb-hbm3-bfloat16-w2-auto.json"
CHECK = "figures/production/gpu-check-h100.json"
LONG = "figures/bench-h100-long-4m.json"
ENGINE_AB = ("figures/production/engine-ab-h200.json", "figures/production/engine-ab-h200-16k.json")
FWD, FWD_BWD_T, TWO = (TARGETS[k]["ratio"] for k in ("fwd", "fwd+bwd", "two_gpus"))
SEQ = 131072
SHOW = [  # (file, impl, ring_size, what it is)
    (ONE_GPU, "sdpa_cudnn", 1, "PyTorch SDPA, cuDNN backend (the peer)"),
    (ONE_GPU, "sdpa_flash", 1, "PyTorch SDPA, flash backend"),
    (ONE_GPU, "production", 1, "ringbook production, 1 rank"),
    (ONE_GPU, "production", 16, "ringbook production, one process playing 16 ranks"),
    (ONE_GPU, "blockwise", 1, "ringbook blockwise (einops online softmax)"),
    (ONE_GPU, "ring", 16, "ringbook ring, one process playing 16 ranks (einops)"),
    (ONE_GPU, "ring_dilated", 8, "ringbook dilated V2, 8 ranks, seed config (dilated work)"),
    (ONE_GPU, "production_dilated", 8, "ringbook production, dilated, 8 ranks, seed config (dilated work)"),
    (TWO_GPU, "ring_dist", 2, "ringbook ring over NCCL, 2 GPUs (einops); memory per GPU"),
    (TWO_GPU_FUSED, "production_dist", 2, "ringbook production over NCCL, 2 GPUs; memory per GPU"),
    (TWO_GPU_FUSED, "context_parallel", 2, "PyTorch context_parallel (cuDNN), 2 GPUs; memory per GPU"),
]


def _cell(row):
    if row is None:
        return "not measured"
    if row["status"] != "ok":
        return row["status"]
    return f"{row['time_ms']:,.1f} ms · {row['tflops']:.3g} TFLOP/s · {row['peak_mem_gb']:.2f} GB"


def _rows(path, cache={}):  # noqa: B006 - a per-process cache of loaded files
    if path not in cache:
        cache[path] = load_rows(ROOT / path)
    return cache[path]


def _pick(path, impl, ring, causal, seq=SEQ, **extra):
    return next((r for r in _rows(path) if r["impl"] == impl and r["ring_size"] == ring and r["causal"] == causal
                 and r["seq_len"] == seq and all(r.get(k) == v for k, v in extra.items())), None)


HEADLINE = [  # (file, impl, ring_size, what it is): at most six rows
    (ONE_GPU, "sdpa_cudnn", 1, "PyTorch SDPA, cuDNN backend (the peer), one GPU"),
    (ONE_GPU, "production", 16, "`production_ring_attention`, one GPU playing 16 ranks"),
    (ONE_GPU, "ring", 16, "`ring_attention` (einops, for reading), one GPU playing 16 ranks"),
    (ONE_GPU, "production_dilated", 8, "`production_ring_attention`, the seed's dilated config, 8 ranks "
                                       "(dilated work)"),
    (TWO_GPU_FUSED, "production_dist", 2, "`distributed.production_ring_attention`, 2 GPUs (NCCL); memory per GPU"),
    (TWO_GPU_FUSED, "context_parallel", 2, "PyTorch `context_parallel` (cuDNN), 2 GPUs; memory per GPU"),
]
CPU = "figures/bench-cpu-float32.json"


def headline() -> str:
    """The README's table: six rows at the seed report's longest sequence, and the CPU sweep's duration."""
    lines = [f"| seq {SEQ:,}, bf16, b=1 h=8 d=64 | non-causal | causal |", "|---|---|---|"]
    for path, impl, ring, what in HEADLINE:
        extra = {"sdpa_backend": "cudnn"} if impl == "context_parallel" else {}
        pick = {c: _pick(path, impl, ring, c, **extra) for c in (False, True)}
        lines.append(f"| {what} | {_cell(pick[False])} | {_cell(pick[True])} |")
    first = _rows(ONE_GPU)[0]
    cpu = json.loads((ROOT / CPU).read_text())
    lines += ["", f"{first['device']}, PyTorch {first['torch_version']}: the median of timed calls (CUDA events), "
              "peak memory from `max_memory_allocated`, every row checked against the float64 reference; from "
              f"`{Path(ONE_GPU).name}` and `{Path(TWO_GPU_FUSED).name}` in `figures/`. The CPU sweep "
              f"(`{CPU}`, `{cpu['meta']['command']}`): {len(cpu['rows'])} rows in "
              f"{cpu['meta']['sweep_seconds']:.1f} s on {cpu['rows'][0]['device']}."]
    return "\n".join(lines)


def table() -> str:
    lines = [
        f"| seq {SEQ:,}, bf16, b=1 h=8 d=64 | non-causal | causal | file |",
        "|---|---|---|---|",
    ]
    for path, impl, ring, what in SHOW:
        extra = {"sdpa_backend": "cudnn"} if impl == "context_parallel" else {}
        pick = {c: _pick(path, impl, ring, c, **extra) for c in (False, True)}
        lines.append(f"| {what} | {_cell(pick[False])} | {_cell(pick[True])} | `{Path(path).name}` |")
    first = _rows(ONE_GPU)[0]
    lines.append("")
    lines.append(f"Measured on {first['device']}, PyTorch {first['torch_version']}; median of timed calls "
                 "(CUDA events), peak memory from `max_memory_allocated`, every row checked against the "
                 "float64 reference. Rows of one file come from one run.")
    return "\n".join(lines)


def _verdict(value, target, above=True):
    return "met" if (value >= target if above else value <= target) else "**not met**"


def production_table() -> str:
    """The issue's targets, each a ratio against the peer measured in the same run."""
    check = {(r["section"], r["name"]): r for r in json.loads((ROOT / CHECK).read_text())["rows"]}
    lines = [
        "| target (H100, bf16, b=1 h=8 d=64) | `python -m ringbook bench` (same run) | "
        "`tools/gpu_check_production.py` (same run) | verdict |",
        "|---|---|---|---|",
    ]
    for causal, what in ((False, f"forward 131K, 16 ranks ≥ {FWD}× fastest SDPA"),
                         (True, f"forward 131K, 16 ranks, causal zigzag ≥ {FWD}×")):
        ours, peer = _pick(ONE_GPU, "production", 16, causal), _pick(ONE_GPU, "sdpa_cudnn", 1, causal)
        ratio = peer["time_ms"] / ours["time_ms"]
        c = check[("fwd", f"131072 w=16 causal={causal}")]
        lines.append(f"| {what} | {ours['time_ms']:.1f} ms vs cuDNN {peer['time_ms']:.1f} ms: {ratio:.4f}× | "
                     f"{c['ratio_vs_sdpa']:.4f}× | {_verdict(ratio, FWD)} / {_verdict(c['ratio_vs_sdpa'], FWD)} |")
    for causal in (False, True):
        ours = _pick(FWD_BWD, "production", 8, causal, seq=65536)
        peer = _pick(FWD_BWD, "sdpa_cudnn", 1, causal, seq=65536)
        ratio = peer["time_ms"] / ours["time_ms"]
        c = check[("fwd+bwd", f"65536 w=8 causal={causal}")]
        lines.append(f"| forward+backward 64K, 8 ranks{', causal' if causal else ''} ≥ {FWD_BWD_T}× | "
                     f"{ours['time_ms']:.1f} ms vs cuDNN {peer['time_ms']:.1f} ms: {ratio:.4f}× | "
                     f"{c['ratio_vs_sdpa']:.4f}× | {_verdict(ratio, FWD_BWD_T)} / {_verdict(c['ratio_vs_sdpa'], FWD_BWD_T)} |")
    scaling = {s["causal"]: s for s in json.loads((ROOT / TWO_GPU_FUSED).read_text())["meta"]["scaling"]}
    s = scaling[False]
    lines.append(f"| 2 GPUs, 131K ≥ {TWO}× one GPU | {s['time_ms']:.2f} ms vs {s['one_gpu_impl']} on one GPU "
                 f"{s['one_gpu_time_ms']:.2f} ms: {s['speedup_vs_one_gpu']:.2f}× | – | "
                 f"{_verdict(s['speedup_vs_one_gpu'], TWO)} |")
    s = scaling[True]
    lines.append(f"| 2 GPUs, 131K, causal: faster than context_parallel | {s['time_ms']:.2f} ms vs "
                 f"context_parallel ({s['cp_sdpa_backend']}) {s['cp_time_ms']:.2f} ms: CP/ours "
                 f"{s['cp_time_over_ours']:.2f}× | – | {_verdict(s['cp_time_over_ours'], 1.0)} |")
    gb = "/".join(f"{x:.2f}" for x in s["per_rank_peak_mem_gb"])
    cp_gb = "/".join(f"{x:.2f}" for x in s["cp_per_rank_peak_mem_gb"])
    lines.append(f"| 2 GPUs, 131K, causal: per-GPU peak memory | {gb} GB (context_parallel {cp_gb} GB) | – | "
                 "reported |")
    for r in sorted(_rows(LONG), key=lambda r: (r["impl"] != "production", r["causal"])):
        ranks = f", {r['ring_size']} ranks" if r["ring_size"] > 1 else ""
        lines.append(f"| forward at {r['seq_len']:,} tokens: {r['impl']}{ranks}"
                     f"{', causal' if r['causal'] else ''} (one timed call) | {r['time_ms'] / 1e3:,.1f} s, "
                     f"{r['tflops']:.0f} TFLOP/s, {r['peak_mem_gb']:.1f} GB peak | – | reported |")
    env = json.loads((ROOT / CHECK).read_text())["env"]
    lines += ["", f"Files: `{Path(ONE_GPU).name}`, `{Path(FWD_BWD).name}`, `{Path(CHECK).name}`, "
              f"`{Path(TWO_GPU_FUSED).name}`, `{Path(LONG).name}` ({env['device']}, PyTorch {env['torch']}, "
              f"cuDNN {env['cudnn']}, Triton {env['triton']}). The two one-GPU measurements ran at the same time "
              "on the two GPUs of one host; the 4M cuDNN row is from an earlier session."]
    return "\n".join(lines)


def engine_table() -> str:
    """The one ring engine against the tree before it, same run on one H200 (tools/ab_production.py)."""
    lines = ["| H200, bf16, b=1 h=8 d=64 | cuDNN | ringbook (the engine) | before the engine | "
             "ratio vs cuDNN: engine / before | largest difference between the two |", "|---|---|---|---|---|---|"]
    for path in ENGINE_AB:
        data = json.loads((ROOT / path).read_text())
        for r in data["rows"]:
            what = (f"{r['mode']} {r['seq_len']:,}, {r['ring_size']} rank{'s' if r['ring_size'] > 1 else ''}"
                    f"{', causal' if r['causal'] else ''}")
            diff = r.get("max_abs_diff_vs_baseline", r.get("max_abs_grad_diff_vs_baseline"))
            lines.append(f"| {what} | {r['cudnn_ms']:.2f} ms | {r['ringbook_ms']:.2f} ms | {r['baseline_ms']:.2f} ms | "
                         f"{r['ratio_ringbook']:.3f}× / {r['ratio_baseline']:.3f}× | {diff:.2g} |")
    env = json.loads((ROOT / ENGINE_AB[0]).read_text())["env"]
    lines += ["", f"`{ENGINE_AB[0]}` and `{Path(ENGINE_AB[1]).name}`: {env['device']}, PyTorch {env['torch_version']}, "
              f"cuDNN {env['cudnn_version']}; the three calls timed in interleaved rounds (CUDA events; median of 10 "
              "rounds at 131,072 and of 30 at 16,384, half that for forward+backward); the last column is the largest "
              "absolute difference of out (forward) or dq/dk/dv (forward+backward). At 16,384 tokens the calls are "
              "bound by launch and Python overhead, and the two trees differ by a few percent either way."]
    return "\n".join(lines)


DILATED = "figures/dilated/gpu-dilated-h200.json"


def dilated_table() -> str:
    """The seed's dilated system on the engine against the batched-call peer, same run on one H200 (tools/gpu_dilated.py)."""
    data = json.loads((ROOT / DILATED).read_text())
    lines = ["| H200, seed's dilated config (heads 2:3:3) | dilated_sdpa (peer) | production_dilated, per ring size "
             "| ratio to the peer | agreement with the peer |", "|---|---|---|---|---|"]
    sections = [(s, "forward") for s in data["forward"] + data["heads_all"]] + [(s, "forward+backward")
                                                                                for s in data["fwd_bwd"]]
    for sec, mode in sections:
        rows = sec["rows"]
        prods = {name.split()[-1]: r for name, r in rows.items() if name.startswith("production_dilated")}
        heads = sec.get("heads", "grouped")
        what = (f"{mode} {sec['seq_len']:,}{', causal' if sec['causal'] else ''}"
                f"{', heads=all' if heads == 'all' else ''}")
        if mode == "forward+backward":
            exact = f"largest relative gradient difference {max(r['max_rel_grad_vs_peer'] for r in prods.values()):.2g}"
        elif all(r["max_abs_out_vs_peer"] == 0 for r in prods.values()):
            exact = "identical out and lse"
        else:
            exact = f"largest out difference {max(r['max_abs_out_vs_peer'] for r in prods.values()):.2g} (merge order)"
        lines.append(f"| {what} | {rows['dilated_sdpa']['median_ms']:.2f} ms | "
                     + ", ".join(f"{w} {r['median_ms']:.2f}" for w, r in prods.items()) + " ms | "
                     + ", ".join(f"{w} {r['vs_peer']:.2f}×" for w, r in prods.items()) + f" | {exact} |")
    env = data["environment"]
    lines += ["", f"`{DILATED}`: {env['device']}, PyTorch {env['torch_version']}, cuDNN {env['cudnn_version']}, bf16, "
              "b=1 h=8 d=64; the calls timed in interleaved rounds (CUDA events, median of 10 rounds, 5 at 524,288; "
              "forward+backward at 131,072 with ring sizes 1 and 8). Ratio = production time / peer time (≤ 1.25× is "
              "the target forward, ≤ 1.3× forward+backward). Every forward output was also checked against equation "
              "(D) in float64 on sampled rows, and gradients at 4,096 tokens against the dense float64 reference "
              "(`grad_check` in the file)."]
    return "\n".join(lines)


DENSE, DENSE_LONG, PROFILE = ("figures/production/gpu-dense-h200.json", "figures/production/gpu-dense-long-h200.json",
                              "figures/production/profile-h200.json")


def dense_rows() -> list[dict]:
    """Issue 14's targets (``TARGETS["dense_h200"]``), each with what was measured and whether it was met."""
    data, long = (json.loads((ROOT / f).read_text()) for f in (DENSE, DENSE_LONG))
    timing = {(r["seq_len"], r["ring_size"], r["causal"]): r for r in data["timing"]}
    fwd_bwd = {(r["seq_len"], r["ring_size"], r["causal"]): r for r in data["fwd_bwd"]}
    longs = {(r["seq_len"], r["name"].split()[-1]): r for r in long["long"]}
    out = []
    for t in TARGETS["dense_h200"]["rows"]:
        key = (t["seq_len"], t["ring_size"], t["causal"])
        if t["mode"] in ("forward", "fwd+bwd"):
            r = (timing if t["mode"] == "forward" else fwd_bwd)[key]
            value = r["ratio_vs_cudnn"]["production"]
            got = (f"{r['ms']['production']:.2f} ms vs cuDNN {r['ms']['cudnn']:.2f} ms: {value:.3f}×")
            if t["mode"] == "forward":
                got += (f" (eager, no CUDA graph: {r['ratio_vs_cudnn']['production graph=False']:.3f}×, and with the "
                        f"merge left out {r['ratio_vs_cudnn']['production merge skipped (cost)']:.3f}×)")
            else:
                got += f" (gradient sums in line {r['ratio_vs_cudnn']['production overlap=False']:.3f}×)"
            met = value >= t["ratio"]
        else:
            ours, peer = longs[(t["seq_len"], "production")], longs[(t["seq_len"], "cudnn")]
            if t["mode"] == "memory":
                value = ours["peak_mem_gb"] / peer["peak_mem_gb"]
                got = f"{ours['peak_mem_gb']:.1f} GB vs cuDNN {peer['peak_mem_gb']:.1f} GB: {value:.2f}×"
            else:
                value = ours["time_ms"] / peer["time_ms"]
                got = f"{ours['time_ms'] / 1e3:.1f} s vs cuDNN {peer['time_ms'] / 1e3:.1f} s: {value:.2f}×"
            met = value <= t["ratio"]
        out.append({**t, "value": value, "got": got, "met": met})
    return out


def dense_table() -> str:
    """The dense fast path on one H200 against cuDNN in the same run (tools/gpu_dense.py), issue 14's targets."""
    lines = ["| target (H200, bf16, b=1 h=8 d=64) | measured (same run) | verdict |", "|---|---|---|"]
    for r in dense_rows():
        bound = "≥" if r["mode"] in ("forward", "fwd+bwd") else "≤"
        lines.append(f"| {r['what']} ({bound} {r['ratio']}×) | {r['got']} | {'met' if r['met'] else '**not met**'} |")
    long = json.loads((ROOT / DENSE_LONG).read_text())
    for r in long["long"]:
        if r["seq_len"] > 4194304:
            who = "production, 16 ranks" if r["name"].endswith("production") else "cuDNN SDPA"
            lines.append(f"| forward {r['seq_len']:,} tokens, causal: {who} (one timed call) | "
                         f"{r['time_ms'] / 1e3:.1f} s, {r['tflops']:.0f} TFLOP/s, {r['peak_mem_gb']:.1f} GB peak | "
                         "recorded |")
    env = json.loads((ROOT / DENSE).read_text())["environment"]
    lines += ["", f"`{DENSE}`, `{Path(DENSE_LONG).name}` and the profile `{Path(PROFILE).name}` "
              f"(`tools/profile_production.py`): {env['device']}, PyTorch {env['torch_version']}, cuDNN "
              f"{env['cudnn_version']}. Forward rows: the calls timed in interleaved rounds (CUDA events, median of 40 "
              "rounds at 16K, 8 at 131K, 6 forward+backward); every output checked against float64 attention on sampled "
              "rows. Long rows: one timed call each, peak memory from the CUDA allocator; they ran before the Triton "
              "kernels' launch shapes were tuned (`gpu-dense-tune-h200.json`), which changes only the merges, well "
              "under 1% of a call at these lengths."]
    return "\n".join(lines + ["", limits()])


def _gpu_ms(row, prefix) -> float:
    return sum(ms for key, ms, _ in row["gpu"] if key.startswith(prefix))


def limits() -> str:
    """What limits the missed targets, from the profile (GPU kernel times of one call, and the idle time)."""
    prof = {(r["n"], r["causal"], r["case"]): r for r in json.loads((ROOT / PROFILE).read_text())}
    fprop = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"
    parts = []
    for n in (16384, 131072):
        for causal in (False, True):
            one, zz, cont = (prof[(n, causal, case)] for case in
                             ("sdpa_cudnn", "production w=16 zigzag", "production w=16 contiguous"))
            ours = zz if causal else cont
            parts.append(f"{n:,} tokens {'causal' if causal else 'non-causal'}: the 16 ranks' block calls take "
                         f"{_gpu_ms(ours, fprop):.2f} ms of GPU time against {_gpu_ms(one, fprop):.2f} ms for "
                         f"cuDNN's one call, the merges {_gpu_ms(ours, '_merge_kernel'):.2f} ms, and the GPU idles "
                         f"{ours['idle_ms']:.2f} ms of the call"
                         + (f" (the contiguous schedule, one full-size call per step: {cont['ms']:.2f} ms against "
                            f"zigzag's {zz['ms']:.2f} ms)" if causal else ""))
    fb = {c: prof[(65536, c, "fwd+bwd production w=8")] for c in (False, True)}
    fb_one = {c: prof[(65536, c, "fwd+bwd sdpa_cudnn")] for c in (False, True)}
    parts.append("forward+backward 64K, 8 ranks: the backward kernels take "
                 + " / ".join(f"{_gpu_ms(fb[c], 'aten::_cudnn_attention_backward'):.1f}" for c in (False, True))
                 + " ms (non-causal / causal) against cuDNN's "
                 + " / ".join(f"{_gpu_ms(fb_one[c], 'aten::_cudnn_attention_backward'):.1f}" for c in (False, True))
                 + " ms; the rest of the gap was then the float32 gradient sums, one pass per block (this profile "
                 "ran before they were grouped eight blocks per pass, which the timing above includes), and the "
                 "forward's")
    return ("What limits the missed targets (`" + PROFILE + "`, one call under torch.profiler, the production "
            "path as it runs by default): " + "; ".join(parts) + ". The block calls are the kernel cuDNN uses for the "
            "whole sequence, cut into 16 (31 for a causal zigzag ring): each call has its own ramp-up and tail, which "
            "at 16K tokens costs more than the merges do.")


ENGINE_KINDS_AB = "figures/production/engine-kinds-ab-h100.json"


def engine_kinds_table() -> str:
    """The engine with block kinds and one home for plans against the tree before them (e53fd45), same run on one
    H100 (tools/ab_production.py)."""
    data = json.loads((ROOT / ENGINE_KINDS_AB).read_text())
    lines = ["| H100, bf16, b=1 h=8 d=64 | peer | block kinds | before (e53fd45) | time: kinds / before | "
             "largest difference between the two |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        peer = "dilated_sdpa" if "dilated" in r["mode"] else "cuDNN"
        what = (f"{r['mode']} {r['seq_len']:,}, {r['ring_size']} rank{'s' if r['ring_size'] > 1 else ''}"
                f"{', causal' if r['causal'] else ''}")
        diff = r.get("max_abs_diff_vs_baseline", r.get("max_abs_grad_diff_vs_baseline"))
        lines.append(f"| {what} | {peer} {r.get('cudnn_ms', r.get('dilated_sdpa_ms')):.2f} ms | {r['ringbook_ms']:.2f} ms | "
                     f"{r['baseline_ms']:.2f} ms | {r['ratio_vs_baseline']:.3f} | {diff:.2g} |")
    env = data["env"]
    worst = max(r["ratio_vs_baseline"] for r in data["rows"])
    lines += ["", f"`{ENGINE_KINDS_AB}`: {env['device']}, PyTorch {env['torch_version']}, cuDNN {env['cudnn_version']}; "
              "the engine after the block-kinds change (issue 21: block kinds, plans lowered from the one schedule, "
              "tuning as data) against the tree at commit e53fd45, the three calls timed in interleaved rounds "
              f"(CUDA events, median). The slowest row takes {worst:.3f}× the time it took before; outputs agree "
              "exactly where the merge order is unchanged and to bf16 rounding where the plans now merge blocks in "
              "another order."]
    return "\n".join(lines)


STRATEGIES = "figures/strategies/gpu-strategies-h100.json"
STRATEGIES_RANK_ORDER = "figures/strategies/gpu-strategies-h100-rank-order.json"
MASKS, MASKS_CHECK = "figures/masks/gpu-masked-peers-h100.json", "figures/masks/gpu-check-masked-h100.json"


def strategies_table() -> str:
    """The strategies with every rank on one GPU against one cuDNN call (tools/gpu_strategies.py)."""
    data = json.loads((ROOT / STRATEGIES).read_text())
    old = json.loads((ROOT / STRATEGIES_RANK_ORDER).read_text())
    lines = ["| H100, bf16, b=1 h=8 d=64, forward | cuDNN | ring | all-gather | Ulysses |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        cells = [f"{r['ms'][s]:.2f} ms ({r['ratio_vs_cudnn'][s]:.2f}×)" if s in r["ms"] else
                 f"not run: {r['not_run'][s]}" for s in ("ring", "allgather", "ulysses")]
        lines.append(f"| {r['seq_len']:,}, {r['ring_size']} ranks{', causal (zigzag)' if r['causal'] else ''} | "
                     f"{r['ms']['cudnn']:.2f} ms | " + " | ".join(cells) + " |")
    env, code = data["env"], data["code"]
    lines += ["", f"`{STRATEGIES}`: {env['device']}, PyTorch {env['torch_version']}, ringbook at {code['ringbook_commit']} "
              f"({code['note']}). With no network a strategy's time beside cuDNN on the whole sequence is its engine "
              "overhead (ratio = cuDNN time / strategy time; the strategies issue asks ≥ 0.95 for all-gather and "
              "Ulysses at 131K). Every output checked against float64 on sampled rows before timing. The all-gather "
              "reads the gathered K/V in token order, one call per rank; the run before it "
              f"(`{STRATEGIES_RANK_ORDER}`, ringbook at {old['code']['ringbook_commit']}) read them in rank order, "
              "one call per earlier shard: " + "; ".join(
                  f"{r['seq_len'] // 1024}K, {r['ring_size']} ranks{', causal' if r['causal'] else ''}: "
                  f"{r['ratio_vs_cudnn']['allgather']:.2f}× then" for r in old["rows"] if r["seq_len"] >= 131072)
              + "."]
    return "\n".join(lines)


def masks_table() -> str:
    """Documents and a window: production at several ring sizes against flex_attention and varlen_attn
    (tools/gpu_masked.py), each row's times from one run."""
    data = json.loads((ROOT / MASKS).read_text())
    check = json.loads((ROOT / MASKS_CHECK).read_text())
    table = masked_timings(data)
    rings = sorted({int(c.split()[1]) for slot in table.values() for c in slot if c.startswith("ring ")})
    gpu = "H100" if "H100" in data["env"]["device"] else "H200" if "H200" in data["env"]["device"] else "GPU"
    lines = [f"| {gpu}, bf16, causal | " + " | ".join(f"production, ring {w} (/ faster peer)" for w in rings)
             + " | flex_attention | varlen_attn | cuDNN dense causal |", "|---|" + "---|" * (len(rings) + 3)]
    for (mask, n, mode), ms in table.items():
        peer = min(ms[p] for p in ("flex", "varlen") if p in ms) if any(p in ms for p in ("flex", "varlen")) else None
        cells = [f"{ms[f'ring {w}']:.2f} ms ({ms[f'ring {w}'] / peer:.2f}×)" if f"ring {w}" in ms and peer else
                 (f"{ms[f'ring {w}']:.2f} ms" if f"ring {w}" in ms else "–") for w in rings]
        cells += [f"{ms[p]:.2f} ms" if p in ms else "–" for p in ("flex", "varlen", "dense_upper_bound")]
        lines.append(f"| {mask}, {n:,}, {mode} | " + " | ".join(cells) + " |")
    auto = [r for r in check["rows"] if r["section"] == "correctness" and r["name"].endswith("auto")]
    einops = [r for r in check["rows"] if r["section"] == "correctness" and r["name"].endswith("einops")]
    code = data.get("code", {})
    lines += ["", f"`{MASKS}`: {data['env']['device']}, PyTorch {data['env']['torch_version']}, ringbook at "
              f"{code.get('ringbook_commit', '?')} ({code.get('note', '')}); documents 16 and 1,024 (equal, shifted "
              "half a document, so their boundaries cut blocks) and a causal window of 4,096; flex_attention is the "
              "faster of two BlockMask constructions. Production runs the blocks a boundary cuts on FlashAttention's "
              f"variable-length kernel (`ringbook.fast.varlen`). `{MASKS_CHECK}` ({check['env']['device']}) checks it "
              "against float64 forward and backward: "
              f"{sum(r['status'] == 'ok' for r in auto)} of {len(auto)} cases within the 2× rule; the einops backend "
              f"on CUDA {sum(r['status'] == 'ok' for r in einops)} of {len(einops)}. The issue's target is within "
              "1.1× of the faster peer."]
    if code.get("ringbook_commit") == "782f30f":
        lines[-1] += (" The masked path has changed since that run and is not re-measured yet: the document ids are "
                      "scanned on the host with numpy (the H100 profile `figures/masks/profile-masked-h100.json` "
                      "found 17–32 ms a call in torch CPU ops there), cut blocks read and write slices instead of "
                      "gathers, the cut blocks of a step's ranks are one launch, the Triton merge touches only the "
                      "rows a block covers, and ring size 1 runs without the layout's permutation.")
    return "\n".join(lines)


def docs_block() -> str:
    return (table() + "\n\n" + production_table() + "\n\n" + engine_table() + "\n\n" + engine_kinds_table()
            + "\n\n" + dilated_table() + "\n\n" + dense_table() + "\n\n" + strategies_table() + "\n\n"
            + masks_table())


BLOCKS = {"readme": ("README.md", headline), "docs": ("docs/results.md", docs_block)}


def main(argv):
    if "--write" not in argv:
        if len(argv) != 1 or argv[0] not in BLOCKS:
            sys.exit(f"usage: python tools/readme_results.py {{{','.join(BLOCKS)}}} | --write")
        print(BLOCKS[argv[0]][1]())
        return
    for name, make in BLOCKS.values():
        path = ROOT / name
        text = path.read_text()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        path.write_text(f"{head}{START}\n{make()}\n{END}{tail}")
        print(f"updated {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
