# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Benchmarks
#
# A benchmark number means something only if it says what was counted, how
# it was timed, and that the answer was right. The seed's report claimed
# 131,072 tokens at 41,468 tok/s for a "ring attention" that never moved a
# key between ranks; the number was real, the function was not. This
# notebook shows how `ringbook.bench` measures (section 1), lets you measure
# a row live on this machine (section 2), and reads the committed GPU results
# (`figures/*.json`): throughput and memory on one H100 (section 3), the
# production path against PyTorch's fastest fused kernel (section 4), and one
# GPU against two (section 5). Every number below the live section is read
# from a committed file, never typed in.
#
# Shapes as in notebook 01: q, k, v are `b n h d`; `w` is the ring size.

# %%
import statistics
from pathlib import Path

import torch
from IPython.display import Markdown, display

import ringbook
from ringbook import work_per_rank
from ringbook._utils import attention_flops
from ringbook.bench import DTYPES, IMPLS, TOLERANCE, run_row
from ringbook.report import (
    SEED_FLAWS,
    SEED_ROWS,
    load_rows,
    plot_ratios,
    plot_scaling,
    plot_sweep,
    scaling_rows,
    seed_section,
    summary_markdown,
    summary_rows,
)
from ringbook.widgets import bench_row_explorer

torch.manual_seed(0)
torch.set_num_threads(1)  # small live rows: one thread is as fast and keeps timings steady

# The notebook runs with cwd = notebooks/; figures go to <repo root>/figures.
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "pyproject.toml").exists())
FIGURES = ROOT / "figures"
FIGURES.mkdir(exist_ok=True)
print("ringbook", ringbook.__version__)

# %% [markdown]
# ## 1 · How the benchmark measures
#
# `ringbook.bench.run_row` measures one configuration (implementation,
# sequence length $n$, ring size $w$, causal or not, dtype) and writes one
# JSON row. Every row is measured the same way:
#
# * **Inputs**: fresh `torch.randn` q, k, v of shape `b n h d` from a seeded
#   generator, never zeros.
# * **Time**: warm-up calls, then up to `repeats` timed calls; on a GPU each
#   is timed with CUDA events (`start.record()`, the call, `end.record()`,
#   `end.synchronize()`, `start.elapsed_time(end)`), on a CPU with
#   `time.perf_counter`. The row reports the **median** $t$ and keeps every
#   repeat in `times_ms`.
# * **Peak memory** of one call: `torch.cuda.reset_peak_memory_stats()`
#   before, `torch.cuda.max_memory_allocated()` after, inputs included. On a
#   CPU the process's resident high-water mark (it never falls, so it is an
#   upper bound, labelled as such in every row).
# * **Work**: dense attention multiplies $QK^\top$ and $PV$, two
#   $n_q \times n_k \times d$ products of 2 FLOPs per multiply-add, per batch
#   and head:
#
# $$
# F = 4\, b\, h\, n_q\, n_k\, d \quad(\tfrac12 F \text{ if causal}), \qquad
# \text{TFLOP/s} = \frac{F}{t \cdot 10^{12}}, \qquad
# \text{tokens/s} = \frac{b\, n}{t}.
# $$
#
#   For `ring_dilated` $F$ counts the dilated work actually required
#   (`ringbook.dilated_flops`, notebook 03), not dense work.
# * **The answer**: the output of the first (warm-up) call is compared with
#   `naive_attention` in float64, one head at a time, on evenly spaced query
#   rows where the full reference would not fit:
#
# $$
# \varepsilon = \frac{\max_{\text{checked } i} |O_i - O^{\text{ref}}_i|}{\max_{\text{checked } i} |O^{\text{ref}}_i|}
# \le \text{tol(dtype)} .
# $$
#
#   A row above its dtype's tolerance is `status: "error"`, not a result.
#   Other statuses: `ok`, or `oom`; a row the sweep chose not to run (a shorter
#   length already ran out of memory, or a call predicted to take longer
#   than `max_row_seconds`) says so in `error`.
#
# The check below holds the committed H100 file to these rules: every ok row's
# time is the median of its repeats, its TFLOP/s follows from its FLOPs and
# time, its FLOPs from the formula, and its error is within tolerance.

# %%
print("tolerance per dtype:", {str(d).removeprefix("torch."): t for d, t in TOLERANCE.items()})
assert attention_flops(1, 8, 131072, 131072, 64) == 4 * 8 * 131072**2 * 64
assert attention_flops(1, 8, 131072, 131072, 64, causal=True) * 2 == attention_flops(1, 8, 131072, 131072, 64)

BENCH = FIGURES / "bench-nvidia-h100-80gb-hbm3-bfloat16.json"
LONG = FIGURES / "bench-h100-long-4m.json"
DIST = FIGURES / "dist-bench-nvidia-h100-80gb-hbm3-bfloat16-w2.json"
CHECK = FIGURES / "production" / "gpu-check-h100.json"
for f in (BENCH, LONG, DIST, CHECK):
    assert f.exists(), f"{f.relative_to(ROOT)} is missing: it is written by a GPU run (see the README)"
bench = load_rows(BENCH)
ok = [r for r in bench if r["status"] == "ok"]
for r in ok:
    assert r["time_ms"] == statistics.median(r["times_ms"])
    assert abs(r["tflops"] - r["flops"] / (r["time_ms"] * 1e-3) / 1e12) <= 1e-9 * r["tflops"]
    assert abs(r["tokens_per_s"] - r["batch"] * r["seq_len"] / (r["time_ms"] * 1e-3)) <= 1e-6 * r["tokens_per_s"]
    if r["impl"] != "ring_dilated":
        assert r["flops"] == attention_flops(r["batch"], r["heads"], r["seq_len"], r["seq_len"], r["head_dim"],
                                             r["causal"])
    assert r["max_rel_err"] <= TOLERANCE[DTYPES[r["dtype"]]]
statuses = {s: sum(r["status"] == s for r in bench) for s in ("ok", "oom", "error")}
print(f"{BENCH.name}: {len(bench)} rows {statuses}; every ok row: median time, TFLOP/s = F / t, "
      f"F = 4·b·h·n²·d (dense), error within tolerance: True")
reasons = {"ran out of memory": 0, "not run: a shorter length ran out of memory": 0,
           "not run: predicted to exceed max_row_seconds": 0}
for r in bench:
    if r["status"] != "ok":
        error = str(r["error"])
        key = ("not run: predicted to exceed max_row_seconds" if "max_row_seconds" in error else
               "not run: a shorter length ran out of memory" if "already ran out of memory" in error else
               "ran out of memory" if r["status"] == "oom" else error)
        reasons[key] = reasons.get(key, 0) + 1
print("rows not ok, by reason:", reasons)
assert sum(reasons.values()) == len(bench) - len(ok) and len(reasons) == 3  # no wrong answers, no crashes

# %% [markdown]
# ## 2 · Measure a row on this machine
#
# The controls below run `run_row` live on the current device: pick the
# sequence length, ring size (used by the ring implementations, 1 for the
# others), implementation, dtype and mask, then press **run**. Each row
# appears in the table (time, TFLOP/s, error against its tolerance, status)
# and as a bar; the last eight rows stay, so implementations can be compared.
# The sizes are decided in one place from `torch.cuda.is_available()`: small
# on a CPU (so the notebook runs in CI), GPU-sized otherwise. On a CPU the
# fused SDPA backends (`cuda_only`) are not offered and TFLOP/s are tiny:
# there is no fused kernel, and one thread.

# %%
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LIVE = {  # everything the live rows depend on, per device
    "cpu": {"seq_lens": [128, 256, 512, 1024], "ring_sizes": [1, 2, 4, 8], "dtypes": ["float32", "bfloat16", "float64"],
            "shape": {"batch": 1, "heads": 4, "head_dim": 32}, "warmup": 1, "repeats": 3, "start": 512},
    "cuda": {"seq_lens": [4096, 8192, 16384, 32768, 65536], "ring_sizes": [1, 2, 4, 8, 16],
             "dtypes": ["bfloat16", "float16", "float32"], "shape": {"batch": 1, "heads": 8, "head_dim": 64},
             "warmup": 2, "repeats": 10, "start": 16384},
}[DEVICE.type]
LIVE_IMPLS = [name for name, impl in IMPLS.items() if DEVICE.type == "cuda" or not impl.cuda_only]


def run_live(impl, seq_len, ring_size, dtype, causal):
    """One benchmark row on this device (ring_size applies to the ring implementations only)."""
    return run_row(IMPLS[impl], seq_len=seq_len, ring_size=ring_size if IMPLS[impl].ring else 1, causal=causal,
                   dtype=DTYPES[dtype], device=DEVICE, warmup=LIVE["warmup"], repeats=LIVE["repeats"],
                   **LIVE["shape"])


print(f"device: {DEVICE.type}; implementations: {LIVE_IMPLS}")
print(f"sequence lengths {LIVE['seq_lens']}, ring sizes {LIVE['ring_sizes']}, dtypes {LIVE['dtypes']}")

# %%
# NBVAL_IGNORE_OUTPUT
explorer = bench_row_explorer(run_live, seq_lens=LIVE["seq_lens"], ring_sizes=LIVE["ring_sizes"], impls=LIVE_IMPLS,
                              dtypes=LIVE["dtypes"], seq_len=LIVE["start"], ring_size=4, impl="ring")
controls = {w.description: w for w in explorer.kwargs_widgets}
for impl, dtype, causal in (("production", LIVE["dtypes"][1], True), ("ring_dilated", LIVE["dtypes"][0], True)):
    controls["implementation"].value, controls["dtype"].value, controls["causal"].value = impl, dtype, causal
    explorer.manual_button.click()  # what pressing "run" does
assert [r["impl"] for r in explorer.rows] == ["ring", "production", "ring_dilated"]
for row in explorer.rows:
    assert row["status"] == "ok", row["error"]
    assert row["max_rel_err"] <= TOLERANCE[DTYPES[row["dtype"]]] and row["time_ms"] > 0
assert len(explorer.result.axes) == 2 and len(explorer.result.axes[0].patches) == 3  # one bar per row
_ = display(explorer)

# %% [markdown]
# ## 3 · One H100: throughput and memory against sequence length
#
# The committed sweep (`python -m ringbook bench` on one H100 80GB, bf16,
# b = 1, h = 8, d = 64, 4K to 512K tokens) measured ringbook's one-process
# rings at ring sizes 1, 4, 8 and 16, and PyTorch's fused SDPA backends as
# the peers. The production path's rows there are a separate run at 4M
# tokens (`bench-h100-long-4m.json`, one timed call, causal, ring size 16),
# drawn as single points. Colour is the implementation, line style the ring
# size; top TFLOP/s, bottom peak memory.
#
# One caveat on the bottom row: a one-process ring plays all $w$ ranks on
# one GPU, so its peak holds the *whole* sequence's q, k, v and out plus one
# block's working set. It falls with $w$ because the block shrinks, but it is
# not the memory of one rank of a real ring: that was measured over NCCL on
# two GPUs and is in section 5.

# %%
long_rows = load_rows(LONG)
rows = bench + long_rows
assert all(r["status"] == "ok" for r in long_rows)
assert {(r["device"], r["dtype"], r["batch"], r["heads"], r["head_dim"]) for r in rows} == {
    (bench[0]["device"], "bfloat16", 1, 8, 64)}  # one device, one shape: the two files can share a plot
OURS = ["ring", "ring_dilated", "production"]
PEERS = ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa"]
fig = plot_sweep(rows, impls=OURS + PEERS)
fig.savefig(FIGURES / "05_benchmarks.png", dpi=110, metadata={"Software": None})
fig

# %% [markdown]
# The seed report's summary table, for the same measurements: for each
# implementation and ring size its longest sequence with an ok row, the
# memory and throughput there, and **why the series stops**. Ringbook's
# einops `ring` stops at 128K by the sweep's time limit (a 256K call was
# predicted to take over 4 s), not by memory; `ring_dilated` and the fused
# peers reach the end of the sweep. TFLOP/s are not comparable between
# `ring_dilated` (dilated work) and the others (dense work).

# %%
LABELS = {"ring": "ring (ringbook, einops)", "ring_dilated": "ring_dilated (ringbook, seed config)",
          "production": "production (ringbook, fused; the 4M run only)", "sdpa_cudnn": "SDPA cuDNN (peer)",
          "sdpa_flash": "SDPA flash (peer)", "sdpa_efficient": "SDPA efficient (peer)", "sdpa": "SDPA default (peer)"}
for causal in (False, True):
    display(Markdown(f"**{'Causal' if causal else 'Non-causal'}**, {bench[0]['device']}, bf16\n\n"
                     + summary_markdown(rows, impls=OURS + PEERS, causal=causal, labels=LABELS)))
summary = {(s["impl"], s["ring_size"], c): s for c in (False, True)
           for s in summary_rows(rows, impls=OURS + PEERS, causal=c)}
assert all(summary[(i, 1, c)]["best"]["seq_len"] >= 524288 for i in PEERS for c in (False, True))  # cuDNN: 4M
assert all(summary[("ring_dilated", w, c)]["best"]["seq_len"] == 524288 for w in (1, 4, 8, 16) for c in (False, True))
assert all(summary[("ring", w, c)]["best"]["seq_len"] == 131072 and "time limit" in summary[("ring", w, c)]["stopped"]
           for w in (1, 4, 8, 16) for c in (False, True))
assert summary[("production", 16, True)]["best"]["seq_len"] == 4194304

# %% [markdown]
# And the seed's own rows beside what ringbook measured for the same
# implementation and ring size (the longest ok row, causal or not). The
# seed's numbers are kept only to be replaced: they do not measure ring
# attention (`ringbook.report.SEED_FLAWS`).

# %%
display(Markdown("\n".join(seed_section(rows)[2:])))  # the table and its reason, without the report's heading
print(f"{len(SEED_ROWS)} seed rows; why they are invalid: {SEED_FLAWS}.")
measured = [name for name, impl, w, *_ in SEED_ROWS if any(
    r["impl"] == impl and r["ring_size"] == w and r["status"] == "ok" for r in rows)]
print("measured by ringbook (exact function) at the same ring size:", measured)
print("not measured at that ring size:", [name for name, *_ in SEED_ROWS if name not in measured])

# %% [markdown]
# ## 4 · The production path against the fastest SDPA
#
# `production_ring_attention` runs the ring's schedule on PyTorch's fused
# kernels (cuDNN, flash) that return the lse of each block, with all ranks
# stacked in the batch and a Triton merge. The targets: **at least 0.95×**
# the speed of the fastest SDPA backend for the forward pass, and **0.85×**
# for forward+backward. `tools/gpu_check_production.py` timed it against every
# SDPA backend in the same run on one H100 (`figures/production/gpu-check-h100.json`);
# `ratio_vs_sdpa` = fastest SDPA time / production time, so above 1 is faster.
# The plain rows are the production path; rows with `merge=`, `backend=` or
# `merge skipped` are diagnostics (a torch merge, flash forced, and the merge
# left out to measure its cost).

# %%
TARGETS = {"fwd": 0.95, "fwd+bwd": 0.85}
check = load_rows(CHECK)
timed = [r for r in check if r["section"] in TARGETS]
assert timed and all(r["status"] == "ok" for r in timed)
print(f"{'':8}{'configuration':46}{'ms':>8}{'TFLOP/s':>9}{'fastest SDPA':>20}{'ratio':>8}  target")
met, missed = [], []
for r in timed:
    diagnostic = any(word in r["name"] for word in ("merge", "backend"))
    verdict = "(diagnostic)" if diagnostic else ("met" if r["ratio_vs_sdpa"] >= TARGETS[r["section"]] else "NOT met")
    if not diagnostic:
        (met if verdict == "met" else missed).append(f"{r['section']} {r['name']}")
    print(f"{r['section']:8}{r['name']:46}{r['ms']:8.1f}{r['tflops']:9.1f}"
          f"{r['sdpa_best'].removesuffix('_ATTENTION').lower():>11} {r['sdpa_ms']:6.1f} ms{r['ratio_vs_sdpa']:7.3f}×"
          f"  ≥ {TARGETS[r['section']]}: {verdict}")
print(f"\ntargets met ({len(met)}):", met)
print(f"targets not met ({len(missed)}):", missed)
print("forward+backward was timed at 65,536 tokens only (no 131K row is committed)")
assert not any(r["section"] == "fwd+bwd" and r["name"].startswith("131072") for r in timed)

# %% [markdown]
# So, honestly: in the forward pass without a mask the production path is
# as fast as cuDNN up to 8 ranks and misses the target at 16; with a causal
# mask it misses it at every ring size, narrowly at 4 ranks and by most at
# one rank (a single zigzag rank computes its diagonal blocks in full).
# The diagnostics at 16 ranks show where time goes: leaving the merge out
# gains about 3 points, a torch merge instead of the Triton one loses 6
# (non-causal) to 14 (causal), and forcing the flash backend loses about 30.
# Forward+backward runs at about two thirds of cuDNN, well short of 0.85×.
# At 4M tokens (one timed call each) the production path is faster than
# cuDNN, whose throughput there is below its best:

# %%
prod4m, cudnn4m = (next(r for r in long_rows if r["impl"] == i) for i in ("production", "sdpa_cudnn"))
print(f"{prod4m['seq_len']:,} tokens, causal: production (16 ranks) {prod4m['time_ms'] / 1e3:.1f} s, "
      f"{prod4m['tflops']:.0f} TFLOP/s, {prod4m['peak_mem_gb']:.1f} GB | sdpa_cudnn {cudnn4m['time_ms'] / 1e3:.1f} s, "
      f"{cudnn4m['tflops']:.0f} TFLOP/s, {cudnn4m['peak_mem_gb']:.1f} GB | "
      f"ratio {cudnn4m['time_ms'] / prod4m['time_ms']:.2f}×")
correct = [r for r in check if r["section"] == "correct"]
fails = [r for r in correct if r["status"] != "ok"]
print(f"\ncorrectness rows in the same check: {len(correct) - len(fails)} ok, {len(fails)} fail:",
      [r["name"] for r in fails])
# the 3 failures compare the lse of dilated patterns, whose uncovered positions are -inf in both:
# -inf - (-inf) = nan. out, dq, dk, dv are within bounds; the check was fixed after this run (-inf == -inf).
assert all("FAIL" in r["lse"] and "nan" in r["lse"] and not any("FAIL" in r[g] for g in ("out", "dq", "dk", "dv"))
           for r in fails)
print("in each, only the lse comparison failed: nan from -inf − (-inf) at positions no dilated pattern keeps;\n"
      "the check now treats equal -inf as equal, but has not been re-run on a GPU since")

# %%
fig_ratio = plot_ratios(timed, TARGETS)
fig_ratio.savefig(FIGURES / "05_production.png", dpi=110, metadata={"Software": None})
fig_ratio

# %% [markdown]
# ## 5 · From one GPU to two
#
# `ringbook.dist_bench` ran the ring over NCCL with one process per GPU on
# two H100s (`dist-bench-…-w2.json`). Its time is the median over repeats of
# the slowest rank, and its memory is measured on **each** rank
# (`per_rank_peak_mem_gb`). That run used the einops block kernel
# (`impl: ring_dist`), not the fused production path, so the fair one-GPU
# baseline is the einops `ring` of the same sweep: the same kernel, playing
# one rank with the whole sequence (ring size 1), and, as a second baseline,
# the fastest one-process ring at any ring size. Layouts match: contiguous
# without a mask, zigzag with one.
#
# The ideal speed-up on two GPUs is 2× for equal work. With a causal mask
# the work is not equal: at ring size 1 the one zigzag rank computes its two
# diagonal blocks in full and masks them, $\tfrac34 n^2$ scores, while each
# of two zigzag ranks computes $\tfrac{5}{16} n^2$
# (`ringbook.work_per_rank`, notebook 02), so the work alone allows
# $2.4\times$.

# %%
dist = load_rows(DIST)
assert dist and all(r["status"] == "ok" and r["impl"] == "ring_dist" for r in dist)
assert {(r["causal"], r["layout"]) for r in dist} == {(False, "contiguous"), (True, "zigzag")}
print(f"{dist[0]['device']} × {dist[0]['ring_size']}, {dist[0]['backend']}, {dist[0]['dtype']}; "
      f"check: {dist[0]['check']}")
one_ring = [r for r in bench if r["impl"] == "ring" and r["ring_size"] == 1]
fastest = {}  # the fastest one-process ring row at each (seq_len, causal), any ring size
for r in bench:
    if r["impl"] == "ring" and r["status"] == "ok":
        key = (r["seq_len"], r["causal"])
        if key not in fastest or r["time_ms"] < fastest[key]["time_ms"]:
            fastest[key] = r
pairs = scaling_rows(one_ring, dist)
best_pairs = {(p["seq_len"], p["causal"]): p for p in scaling_rows(list(fastest.values()), dist)}
by_work = {c: sum(work_per_rank(1024, 1, layout="zigzag" if c else "contiguous", causal=c))
           / max(work_per_rank(1024, 2, layout="zigzag" if c else "contiguous", causal=c)) for c in (False, True)}
print(f"\n{'causal':7}{'n':>8}  1 GPU, w=1 (ms)  2 GPUs (ms)  speed-up (work allows)  "
      f"vs fastest 1-GPU ring   GB: 1 GPU → per GPU")
for p in pairs:
    b = best_pairs[(p["seq_len"], p["causal"])]
    print(f"{p['causal']!s:7}{p['seq_len']:>8,}{p['time_one_ms']:>15.1f}{p['time_multi_ms']:>13.1f}"
          f"{p['speedup']:>9.2f}× ({by_work[p['causal']]:.1f}×)"
          f"{b['speedup']:>15.2f}× (w={fastest[(p['seq_len'], p['causal'])]['ring_size']})"
          f"{p['mem_one_gb']:>11.2f} → {p['mem_per_rank_gb']:.2f}")
assert len(pairs) == len(dist) == 8
assert by_work == {False: 2.0, True: 2.4}
assert all(p["mem_per_rank_gb"] < 0.55 * p["mem_one_gb"] for p in pairs)  # each GPU holds about half

# %% [markdown]
# Without a mask the two-GPU ring reaches the ideal 2× from 64K on; at 16K
# and 32K the exchange is not yet fully hidden behind the compute. With a
# mask it is above 2× from 32K on, and slightly above the 2.4× that the
# count of scores allows; that count leaves out the cost of applying the
# mask, which ring size 1 pays on bigger tiles (not measured separately
# here). Against the fastest one-process ring, which already trims the causal
# waste by using more, smaller blocks, the causal speed-up is 1.6–1.8×. Each
# GPU holds about half the memory of the single GPU. These are the einops
# kernel's numbers (13–28 TFLOP/s on two GPUs); the production path over two GPUs has
# not been measured:

# %%
multi_gpu_production = [r for f in sorted(FIGURES.glob("dist-bench-*.json")) for r in load_rows(f)
                        if "production" in r["impl"]]
if multi_gpu_production:
    print(f"committed: {len(multi_gpu_production)} multi-GPU production rows")
else:
    print("Not committed yet: the production path on two GPUs (target: at least 1.9× one GPU at 131K, "
          "and compared with PyTorch's context_parallel in the same run). The only committed multi-GPU rows "
          "are the einops ring above.")

# %%
fig_scale = plot_scaling(pairs, target=1.9, target_label="the production path's target",
                         one_label="one GPU (ring, w = 1)", multi_label="each of 2 GPUs (NCCL)")
fig_scale.savefig(FIGURES / "05_scaling.png", dpi=110, metadata={"Software": None})
fig_scale

# %% [markdown]
# **Summary.** Every committed row was timed by the median of CUDA-event
# repeats, had its peak memory measured around one call, and was checked
# against the float64 reference before it counted. On one H100 the fused
# SDPA kernels run at ~450 TFLOP/s and ringbook's einops rings at ~14; the
# production path reaches cuDNN's forward speed up to 8 ranks (non-causal)
# but not yet at 16 ranks, causal, or forward+backward. Over two GPUs the
# ring splits memory in half and time by two or more; the same measurement
# for the production path, and against PyTorch's context parallelism, is
# still to be committed.
