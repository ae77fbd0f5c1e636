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
# > **You will learn** how to time and check a benchmark row honestly (CUDA events, warm-up, median, a reference
# > check, work counts); how to read a ratio against a peer, a ring size in one process, and one GPU against two.
# >
# > **You need** notebook 02.
# >
# > **Exercises** 05.1 recompute a row's TFLOP/s, 05.2 spot a row that is not a result, 05.3 the speed-up a ring's
# > work allows; section 2 measures a row live.
# >
# > **Time** 45–60 minutes working alone, at a student's pace; executing it takes 10–30 s on 2 CPU cores.
#
# A benchmark number means something only if it says what was counted, how
# it was timed, on which device and code, and that the answer was right.
# The report this project started from (`docs/seed-report.md`, "the seed
# report") claimed 131,072 tokens at 41,468 tok/s for a "ring attention"
# that never moved a key between ranks: the timing was real, the function
# was not. This notebook is a lesson in measuring: how `ringbook.bench`
# times and checks a row (section 1), one row measured live on this
# machine (section 2), and how to read the committed GPU results: one GPU
# against sequence length (section 3), a ratio against the strongest peer
# (section 4), what "ring size" means when one process plays every rank
# (section 5), and one GPU against two (section 6). Every number below
# section 2 is read from a committed file that says which device and
# library versions produced it; files of different devices or code
# versions are never drawn on one axis.
#
# **Words used below.**
#
# * **row**: one measurement (implementation, sequence length $n$, ring
#   size $w$, mask, dtype) as one JSON record.
# * **peer**: the implementation a row is compared with, computing the same
#   function in the plainest fast way: PyTorch's fused attention
#   (`scaled_dot_product_attention`, "SDPA", with its cuDNN or flash
#   backend) for dense attention, `dilated_sdpa` (one fused call per
#   pattern) for dilated attention.
# * **fused path**: `production_ring_attention`, the ring's schedule run on
#   those fused kernels (notebook 02), as opposed to ringbook's readable
#   einops code (`ring_attention`, `ring_dilated_attention`).
# * **one-process ring**: one GPU plays all $w$ ranks of a ring, one after
#   another; a **multi-process ring** runs one process per GPU and really
#   exchanges K/V (over NCCL).
# * **interleaved rounds**: the implementations of a comparison are timed in
#   turn, A B C A B C …, and each reports its median over the rounds, so a
#   drift of the GPU's clock or temperature hits all of them alike.
#
# Shapes as in notebook 01: q, k, v are `b n h d`; `w` is the ring size.

# %% jupyter={"source_hidden": true}
# Setup: ROOT is the ringbook clone (None outside one, e.g. on Colab), FIGURES its committed results,
# SAVE where this notebook's figures go: build/figures/, never the committed figures/ unless asked
# ($RINGBOOK_FIGURES_OUT, which `make sync-notebooks` sets). See ringbook/_paths.py.
from ringbook._paths import notebook_paths

PATHS = notebook_paths()
ROOT, FIGURES, SAVE = PATHS

# %%
import json
import statistics

import torch
from IPython.display import Markdown, display
from ipywidgets import Dropdown, interactive

import ringbook
from ringbook import dilated_ring_plan, work_per_rank
from ringbook.bench import DTYPES, IMPLS, TOLERANCE, bench_dilated_config, run_row
from ringbook.bench.published import SEED_FLAWS, SEED_ROWS
from ringbook.bench.report import scaling_rows, summary_markdown
from ringbook.bench.results import load_rows
from ringbook.exercises.measuring import check_counts_as_result, check_ideal_speedup, check_row_tflops
from ringbook.viz import new_figure, plot_dilated_ring_sizes, plot_gpu_bars, plot_ratios, plot_scaling, plot_sweep
from ringbook.viz.widgets import bench_row_explorer

torch.manual_seed(0)
torch.set_num_threads(1)  # small live rows: one thread is as fast and keeps timings steady

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
#   CPU the resident peak of that one call above the resident memory before
#   it, plus the inputs; labelled in every row.
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
#   Dilated rows count the dilated work actually required
#   (`ringbook.dilated_flops`, notebook 03), not dense work, so their
#   TFLOP/s are never drawn beside dense ones. Forward+backward rows
#   (`mode: "forward+backward"`) count $3.5\,F$: the backward pass does 2.5
#   times the forward's products.
# * **The answer**: the output of the first (warm-up) call is compared with
#   `naive_attention` in float64, one head at a time, on evenly spaced query
#   rows where the full reference would not fit:
#
# $$
# \varepsilon = \frac{\max_{\text{checked } i} |O_i - O^{\text{ref}}_i|}{\max_{\text{checked } i} |O^{\text{ref}}_i|}
# \le \text{tol(dtype)} .
# $$
#
#   A fixed relative tolerance per dtype, not notebook 04's 2× rule: at
#   benchmark sizes the naive path in the same dtype would need the whole
#   $n \times n$ score matrix, which does not fit (at 131K tokens, 8 heads
#   and bf16 it is 275 GB), so there is no same-dtype baseline to take twice
#   of. The tolerance is loose enough for bf16 rounding and tight enough to
#   catch a dropped block or a wrong mask.
#
#   A row above its dtype's tolerance is `status: "error"`, not a result.
#   Other statuses: `ok`; `oom` (it ran out of memory, or a shorter length
#   already did, so it was not run); `skipped`, a row the sweep chose not to
#   run because its call was predicted to take longer than
#   `max_row_seconds`. Each says why in `error`.
#
# The committed one-GPU sweep (`figures/bench-nvidia-h100-80gb-hbm3-bfloat16.json`,
# one H100) holds to these rules; the cell below checks every row of it the
# way exercise 05.2 asks you to.

# %%
TOL = {name: TOLERANCE[dtype] for name, dtype in DTYPES.items()}  # by dtype name, e.g. "bfloat16"
print("tolerance per dtype:", {name: TOL[name] for name in ("float64", "float32", "float16", "bfloat16")})
BENCH = PATHS.result("bench-nvidia-h100-80gb-hbm3-bfloat16.json")


def consistent(r):
    """An ok row's own numbers agree: median time, TFLOP/s = F / t, error within its dtype's tolerance."""
    return (r["time_ms"] == statistics.median(r["times_ms"])
            and abs(r["tflops"] - r["flops"] / (r["time_ms"] * 1e-3) / 1e12) <= 1e-9 * r["tflops"]
            and r["max_rel_err"] <= TOL[r["dtype"]])


if BENCH is not None:
    bench_meta = json.loads(BENCH.read_text())["meta"]
    bench = load_rows(BENCH)
    statuses = {s: sum(r["status"] == s for r in bench) for s in ("ok", "oom", "error", "skipped")}
    print(f"{BENCH.name}: {bench[0]['device']}, torch {bench[0]['torch_version']}, written {bench_meta['generated'][:10]}")
    print(f"{len(bench)} rows: {statuses}")
    print("every ok row consistent:", all(consistent(r) for r in bench if r["status"] == "ok"))

# %% [markdown]
# **Exercise 05.1 · Recompute a row's TFLOP/s.** A row stores its work and
# throughput, but a reader should be able to recompute them. Write
# `row_tflops(row)` from the row's `batch`, `heads`, `seq_len`, `head_dim`,
# `causal`, `mode` and `time_ms` alone (the checker hides `flops` and
# `tflops`).

# %%
def row_tflops(row):
    """TFLOP/s of a benchmark row, from its shape, mask, mode and median time in milliseconds."""
    raise NotImplementedError


_ = check_row_tflops(row_tflops)

# %% [markdown]
# **Exercise 05.2 · Spot the row that is not a result.** Write
# `counts_as_result(row) -> bool`: True only if the row may be quoted, by
# the four rules above (status `ok`; error within `TOLERANCE[DTYPES[row["dtype"]]]`;
# `time_ms` the median of `times_ms`; `tflops` the work of the row's shape,
# mask and mode over `time_ms`). The checker's rows each break at most one
# rule.

# %%
def counts_as_result(row):
    """Whether a benchmark row may be quoted as a result."""
    raise NotImplementedError


_ = check_counts_as_result(counts_as_result)

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
# fused SDPA backends are not offered and TFLOP/s are tiny: there is no
# fused kernel, and one thread.

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

# %% tags=["nbval-ignore-output"]
explorer = bench_row_explorer(run_live, seq_lens=LIVE["seq_lens"], ring_sizes=LIVE["ring_sizes"], impls=LIVE_IMPLS,
                              dtypes=LIVE["dtypes"], seq_len=LIVE["start"], ring_size=4, impl="ring")
_ = display(explorer)

# %% [markdown]
# **Takeaway:** a row is a time *and* a work count *and* a checked answer;
# on a CPU the times move from run to run, the work and the check do not.

# %% [markdown]
# ## 3 · One GPU against sequence length
#
# The committed sweep (`python -m ringbook bench` on one H100 80GB, bf16,
# b = 1, h = 8, d = 64, 4K to 512K tokens) measured ringbook's
# one-process rings at ring sizes 1, 4, 8 and 16 beside PyTorch's fused
# SDPA backends. The figure shows dense attention only, one device and one
# run of the code (the cell prints which): the einops `ring`, the fused
# path `production`, and the two fastest peers, at ring sizes 1 and 16;
# the points at 4M tokens are separate one-call runs of the same code
# (`figures/bench-h100-long-4m.json`). The fused path has changed since this
# sweep; section 4 reads a later measurement of it on another GPU, never on
# this axis. Top TFLOP/s, bottom peak memory.
#
# One caveat on the bottom row: a one-process ring plays all $w$ ranks on
# one GPU, so its peak holds the *whole* sequence's q, k, v and out plus the
# working set of the blocks it computes at once. It is not the memory of one
# rank of a real ring: that was measured over NCCL on two GPUs (section 6).

# %%
LONG = PATHS.result("bench-h100-long-4m.json")
DENSE_IMPLS = ["ring", "production", "sdpa_cudnn", "sdpa_flash"]
if BENCH is not None and LONG is not None:
    rows = [r for r in bench + load_rows(LONG) if r["impl"] in DENSE_IMPLS]
    print(f"{BENCH.name} (written {bench_meta['generated'][:10]}) and {LONG.name}: "
          f"devices {sorted({r['device'] for r in rows})}, torch {sorted({r['torch_version'] for r in rows})}")
    title = f"{rows[0]['device']}, bf16, b=1 h=8 d=64, dense attention, ringbook as of {bench_meta['generated'][:10]}"
    fig_sweep = plot_sweep([r for r in rows if r["ring_size"] in (1, 16)], impls=DENSE_IMPLS, title=title)
    display(fig_sweep)

# %% tags=["remove-cell"] jupyter={"source_hidden": true}
if BENCH is not None and LONG is not None:
    fig_sweep.savefig(SAVE / "05_benchmarks.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** on one H100, from 64K tokens on, the fused path tracks
# cuDNN's throughput at ring sizes 1 and 16; below that, sixteen small
# block calls cost far more than one (each pays its own launch), and the
# einops ring runs more than ten times slower throughout and stops at 128K.
#
# Pick a ring size: the same figure for ring sizes 4 and 8.

# %% tags=["nbval-ignore-output"]
if BENCH is not None and LONG is not None:
    sweep_view = interactive(lambda ring_size: plot_sweep([r for r in rows if r["ring_size"] in (1, ring_size)],
                                                          impls=DENSE_IMPLS, title=title),
                             ring_size=Dropdown(options=[16, 8, 4], value=16, description="ring size"))
    _ = display(sweep_view)

# %% [markdown]
# Where each series stops, and why: for each implementation and ring size its
# longest sequence with an ok row, the memory and throughput there. The
# einops `ring` stops at 128K by the sweep's time limit (a 256K call was
# predicted to take over 4 s), not by memory.

# %%
if BENCH is not None and LONG is not None:
    for causal in (False, True):
        display(Markdown(f"**{'Causal' if causal else 'Non-causal'}**, {rows[0]['device']}, bf16\n\n"
                         + summary_markdown(rows, impls=DENSE_IMPLS, causal=causal)))

# %% [markdown]
# And the seed report's rows, each beside the exact implementation of the
# same configuration that ringbook measured at the same length and ring
# size (the seed's own functions computed something else: they are kept
# only to be replaced).

# %%
DIL_FILE = PATHS.result("dilated/gpu-dilated-h200.json")
dil_run = None if DIL_FILE is None else json.loads(DIL_FILE.read_text())
if BENCH is not None and dil_run is not None:
    fused_ms = {(s["seq_len"], int(name.split(" r")[-1])): r["median_ms"] for s in dil_run["forward"]
                if s["heads"] == "grouped" and not s["causal"] for name, r in s["rows"].items()
                if name.startswith("production_dilated")}
    lines = ["| seed row | seed: tokens, tok/s | ringbook, same length and ring size: tok/s | measured by |", "|---|---|---|---|"]
    for name, impl, w, n, tps in SEED_ROWS:
        if impl == "ring_dilated":
            r = next(r for r in bench if (r["impl"], r["ring_size"], r["seq_len"], r["causal"]) == (impl, w, n, False))
            ours, where = f"{r['tokens_per_s']:,.0f}", f"`ring_dilated` (einops), {r['device']}"
        elif (n, w) in fused_ms:
            ours = f"{n / (fused_ms[n, w] * 1e-3):,.0f}"
            where = f"`production_dilated` (fused), {dil_run['environment']['device']}"
        else:
            ours, where = "–", "not measured at this length"
        lines.append(f"| {name} | {n:,}, {tps:,} | {ours} | {where} |")
    display(Markdown("\n".join(lines)))
print("why the seed's rows are not results:", SEED_FLAWS)

# %% [markdown]
# ## 4 · Ours against the strongest peer: reading a ratio
#
# `production_ring_attention` runs the ring's schedule on PyTorch's fused
# kernels, which return the lse of each block, and merges the blocks with
# equation (M) of notebook 01. Its natural peer is the fastest SDPA backend
# computing the same attention in one call, with no ring at all: whatever
# the ring costs above that call is the price of cutting the work into
# blocks and merging them. Three rules make such a comparison honest:
#
# 1. **The same run.** A GPU's clock and temperature drift between runs, so
#    a ratio is formed from two medians timed in the *same* process, in
#    interleaved rounds: ratio = peer time / our time (above 1: ours is
#    faster).
# 2. **Two measurements.** The same ratio measured twice, here by the sweep
#    of section 3 and by a separate check on the other GPU of the same host
#    (`figures/production/gpu-check-h100.json`, the same code), tells how far
#    a ratio moves between runs: a difference smaller than that is not a
#    finding.
# 3. **An ablation for every shortfall.** Where ours is slower, time it again
#    with one piece changed (the merge left out, which gives a wrong answer
#    and is timed only for its cost; a plain-torch merge instead of the
#    Triton kernel; the flash kernel instead of cuDNN's; one block per merge
#    pass instead of several). The change that recovers the most time is
#    what limits the path.

# %%
CHECK = PATHS.result("production/gpu-check-h100.json")
if BENCH is not None and CHECK is not None:
    check = load_rows(CHECK)
    timed = [r for r in check if r["section"] in ("fwd", "fwd+bwd")]
    at_131k = {(r["impl"], r["ring_size"], r["causal"]): r["time_ms"] for r in bench
               if r["status"] == "ok" and r["seq_len"] == 131072}
    print(f"{check[0].get('device', bench[0]['device'])}: 131K tokens forward, ratio = cuDNN time / production time")
    print(f"{'configuration':44}{'ms':>7}{'ratio':>8}")
    for r in timed:
        print(f"{r['section']:8}{r['name']:36}{r['ms']:7.1f}{r['ratio_vs_sdpa']:7.3f}×")
    print("\nthe same ratio measured twice (sweep | check):")
    for causal in (False, True):
        sweep_ratio = at_131k["sdpa_cudnn", 1, causal] / at_131k["production", 16, causal]
        check_ratio = next(r for r in timed if r["name"] == f"131072 w=16 causal={causal}")["ratio_vs_sdpa"]
        print(f"  w=16 causal={causal!s:5}: {sweep_ratio:.3f}× | {check_ratio:.3f}×  (moves by "
              f"{abs(sweep_ratio - check_ratio):.3f})")

# %% [markdown]
# What the numbers teach:
#
# * With one rank the ring *is* one cuDNN call plus a copy, and runs within
#   a few per cent of it. The ratio falls as the ring grows: more, smaller
#   blocks, and one more merge per step. With a causal mask it falls faster,
#   since a causal zigzag step is two half-size calls.
# * The two measurements of one ratio differ by up to a few points: that is
#   the resolution of any claim made from them.
# * The ablations at 16 ranks: leaving the merge out recovers about half
#   the gap to cuDNN, so the merge is the largest single cost and the rest
#   is the blocks themselves (sixteen smaller calls instead of one, each
#   with its own ramp-up and tail). How the merge is written matters a lot
#   (the plain-torch merge, several passes over the float32 accumulator, is
#   far slower) and the kernel matters more (flash instead of cuDNN). One
#   block per merge pass instead of several moves the ratio by less than
#   the resolution (compare the `merge group 1` row with the row above it):
#   the number of merge passes is *not* what limits this path.

# %%
def kind(r):
    return "ablation" if any(word in r["name"] for word in ("merge", "backend")) else "as run"


if BENCH is not None and CHECK is not None:
    fig_ratio = plot_ratios([dict(r, section=f"{r['section']}, {kind(r)}") for r in timed], peer="cuDNN SDPA",
                            ours="production")
    display(fig_ratio)

# %% tags=["remove-cell"] jupyter={"source_hidden": true}
if BENCH is not None and CHECK is not None:
    fig_ratio.savefig(SAVE / "05_production.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** on one H100 the ring costs a few per cent over one cuDNN
# call, more as the ring grows and with a mask; the merge is the largest
# single part of it.
#
# **The same ratio, later code, another GPU.** The fused path changed after
# that H100 run; `tools/gpu_dense.py` measured the current form on one H200
# (`figures/production/gpu-dense-h200.json`, interleaved rounds, every output
# checked against float64 attention). A separate table, not a common axis:
# different GPU, different code.

# %%
DENSE_FILE = PATHS.result("production/gpu-dense-h200.json")
if DENSE_FILE is not None:
    DENSE = json.loads(DENSE_FILE.read_text())
    env = DENSE["environment"]
    print(f"{env['device']}, torch {env['torch_version']}, cuDNN {env['cudnn_version']}, {DENSE['dtype']}, {DENSE['shape']}")
    print(f"{'':26}{'cuDNN ms':>9}{'ours ms':>9}{'ratio':>8}")
    for r in DENSE["timing"]:
        ms, ratio = r["ms"], r["ratio_vs_cudnn"]
        print(f"{r['seq_len']:>8,} w={r['ring_size']:<2} causal={r['causal']!s:<5}{ms['cudnn']:9.2f}{ms['production']:9.2f}"
              f"{ratio['production']:7.3f}×")
    busy = {r["name"].split("causal=")[1]: r for r in DENSE["launches"] if "graph=False" not in r["name"]}
    print("\none call at 16K, 16 ranks (torch.profiler): GPU busy time / wall time")
    for name, r in busy.items():
        print(f"  causal={name:32} {r['gpu_busy_ms']:.2f} / {r['wall_ms']:.2f} ms")

# %% [markdown]
# At 131K the picture is the H100's: a few per cent, more with a mask. At
# 16K the ring falls further behind. The profile of one call says why, in
# two parts: the ring's sixteen block calls keep the GPU busy longer than
# cuDNN's one call (each small call has its own ramp-up and tail), and every
# call, cuDNN's included, takes longer on the wall clock than the GPU is
# busy: a call of a millisecond measures the host (Python, kernel launches)
# as well as the GPU. Compare busy time with wall time before blaming a
# kernel. (How ringbook's fused path works around the host, and
# other engineering details, are in `docs/engineering.md`.)
#
# ## 5 · A ring size in one process: what a dilated row measures
#
# The dilated configuration of the benchmark (notebook 03) on the fused
# path is `production_ring_attention(..., segment_lengths=...,
# dilation_rates=...)`, compared with its peer `dilated_sdpa`, the same
# fused calls written as plainly as possible
# (`figures/dilated/gpu-dilated-h200.json`, one H200, interleaved rounds).
# Read carefully what its ring size means. In one process the dilated path
# checks that $w$ divides $n$ and then computes **the same batched calls for
# every $w$**: every segment of a pair is gathered into one call, whatever
# rank would hold it. So the rows `r1`, `r4`, `r8`, `r16` below are one
# computation timed four times, and their spread is the noise of the
# measurement.

# %%
dil_ms = {}  # (n, causal) -> {ring size: ms}
if dil_run is not None:
    print(f"{dil_run['environment']['device']}, torch {dil_run['environment']['torch_version']}, {dil_run['dtype']}, "
          f"{dil_run['shape']}, heads grouped")
    print(f"{'n':>8} {'causal':>6} {'peer ms':>8}   production_dilated ms at r1, r4, r8, r16   spread of the four")
    for sec in dil_run["forward"]:
        prods = {int(name.split(" r")[-1]): r["median_ms"] for name, r in sec["rows"].items()
                 if name.startswith("production_dilated")}
        dil_ms[sec["seq_len"], sec["causal"]] = prods
        spread = max(prods.values()) / min(prods.values()) - 1
        print(f"{sec['seq_len']:>8,} {sec['causal']!s:>6} {sec['rows']['dilated_sdpa']['median_ms']:8.2f}   "
              + ", ".join(f"{ms:6.2f}" for ms in prods.values()) + f"{spread:>14.0%}")

# %% [markdown]
# At 16K the same computation's four timings spread by 17–18% (a
# millisecond call is bound by launches and the host), at 131K and 512K by
# about 1%: at 16K no difference between ring sizes, or with the peer, is a
# finding. At 131K and 512K the fused dilated path takes a few per cent
# longer than its peer (up to 8%, causal at 512K).
#
# What the ring size *does* change shows only on a real ring, one process
# per GPU: which segments cross a shard boundary and so must be exchanged,
# how many bytes each rank sends, and how evenly the work is spread. All
# three are in the plan, `ringbook.dilated_ring_plan` (notebook 03, section
# 5), which the multi-process form executes. The plan stores, for each
# segment, the ranks it spans and the dilated rows each sends; the scores a
# rank computes are a small count over the same segments, written out here:
# every kept query of a rank's piece of a segment scores every kept key of
# the segment (with a mask, the keys up to itself).

# %%
def kept_count(lo, hi, o, r):
    """How many positions t in [lo, hi) of a segment have t ≡ o (mod r)."""
    return len(range(lo + (o - lo) % r, hi, r))


def scores_per_rank(plan):
    """The scores each rank computes in the plan's dilated ring (every head, every pair)."""
    work = [0] * plan.ring_size
    for seg in plan.segments:
        s, r = plan.pairs[seg.pair]
        for o in plan.patterns[seg.pair][1]:  # one offset per head of the pair
            for rank in seg.ranks:
                a, b = (x - seg.start for x in seg.piece(rank, plan.shard_len))
                before, mine = kept_count(0, a, o, r), kept_count(a, b, o, r)
                work[rank] += sum(before + i + 1 for i in range(mine)) if plan.causal else mine * kept_count(0, s, o, r)
    return work


B, H, D = 1, 8, 64  # the benchmark's shape; bf16: 2 bytes an element
plan_rows = []
print(f"{'n':>8} {'w':>3} {'causal':>6}  exchanged segments  MB sent (busiest rank)  scores: busiest / mean  "
      f"one-process ms")
for n in (16384, 131072):
    for causal in (False, True):
        for w in (1, 4, 8, 16):
            plan = dilated_ring_plan(n, w, **bench_dilated_config(n), num_heads=H, heads="grouped", causal=causal)
            work = scores_per_rank(plan)
            time_ms = dil_ms[n, causal][w] if dil_ms else None  # measured in one process (the file above)
            row = {"seq_len": n, "ring_size": w, "causal": causal, "time_ms": time_ms,
                   "sent_mb": 2 * max(plan.sent_elements(B, D)) / 1e6, "imbalance": max(work) * w / sum(work),
                   "exchanged": sum(seg.kind == "exchanged" for seg in plan.segments)}
            plan_rows.append(row)
            shown_ms = "–" if time_ms is None else f"{time_ms:.2f}"
            print(f"{n:>8,} {w:>3} {causal!s:>6}  {row['exchanged']:>18}  {row['sent_mb']:>22.2f}  "
                  f"{row['imbalance']:>22.2f}  {shown_ms:>14}")
print("\nthe plan's scores add up to the dilated work (dilated_flops / 4d), every n, w, mask:",
      all(sum(scores_per_rank(dilated_ring_plan(n, w, **bench_dilated_config(n), num_heads=H, heads="grouped")))
          == ringbook.dilated_flops(B, H, n, D, heads="grouped", **bench_dilated_config(n)) // (4 * D)
          for n in (16384, 131072) for w in (1, 4, 8, 16)))

# %% [markdown]
# At 131K the benchmark's longest segment is 32K tokens: on 4 ranks
# (shards of 32K) no segment crosses a boundary and nothing moves; on 16
# ranks 12 segments are exchanged, about 8 MB from the busiest rank. Without
# a mask every rank computes the same scores; with one, the later ranks of an
# exchanged segment see more keys than the earlier ones, and the busiest rank
# does about 1.3× the mean at 16 ranks: on a real ring it sets the pace.

# %%
if dil_run is not None:
    fig_dil = plot_dilated_ring_sizes([r for r in plan_rows if r["seq_len"] == 131072],
                                      title=f"dilated ring, 131,072 tokens, benchmark configuration, b=1 h=8 d=64, "
                                            f"bf16 (time: {dil_run['environment']['device']}, one process)")
    display(fig_dil)

# %% tags=["remove-cell"] jupyter={"source_hidden": true}
if dil_run is not None:
    fig_dil.savefig(SAVE / "05_dilated.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** in one process the ring size changes nothing that is
# computed, so the time is flat; on a real ring it decides the bytes each
# rank sends and, with a mask, how uneven the work is.
#
# ## 6 · From one GPU to two
#
# `ringbook.bench.dist_sweep` ran the ring over NCCL with one process per GPU on
# two H100s (`dist-bench-…-w2.json`). Its time is the median over repeats of
# the slowest rank, and its memory is measured on **each** rank
# (`per_rank_peak_mem_gb`). That run used the einops block kernel
# (`impl: ring_dist`), not the fused path, so the fair one-GPU baseline is
# the einops `ring` of the section 3 sweep at ring size 1: the same kernel,
# one rank with the whole sequence. Layouts match: contiguous without a
# mask, zigzag with one.
#
# What speed-up to expect? For equal work, the number of GPUs. With a
# causal mask the work is not equal: at ring size 1 the one zigzag rank
# computes its two diagonal blocks in full and masks them, $\tfrac34 n^2$
# scores, while each of two zigzag ranks computes $\tfrac{5}{16} n^2$
# (`ringbook.work_per_rank`, notebook 02), so the work alone allows
# $\tfrac34 / \tfrac5{16} = 2.4\times$.
#
# **Exercise 05.3 · The speed-up the work allows.** Write
# `ideal_speedup(n, world, causal)`: the scores one rank computes alone
# (ring size 1) over the scores of the *busiest* rank of a ring of `world`
# ranks; contiguous without a mask, zigzag with one.

# %%
def ideal_speedup(n, world, causal):
    """The speed-up the work allows, from one rank to `world` ranks (ringbook.work_per_rank counts scores)."""
    raise NotImplementedError


_ = check_ideal_speedup(ideal_speedup)

# %%
allows = {c: sum(work_per_rank(1024, 1, layout="zigzag" if c else "contiguous", causal=c))
          / max(work_per_rank(1024, 2, layout="zigzag" if c else "contiguous", causal=c)) for c in (False, True)}
DIST = PATHS.result("dist-bench-nvidia-h100-80gb-hbm3-bfloat16-w2.json")
if BENCH is not None and DIST is not None:
    dist = load_rows(DIST)
    print(f"{dist[0]['device']} × {dist[0]['ring_size']}, {dist[0]['backend']}, {dist[0]['dtype']}; check: {dist[0]['check']}")
    one_ring = [r for r in bench if r["impl"] == "ring" and r["ring_size"] == 1]
    pairs = scaling_rows(one_ring, dist)
    print(f"\n{'causal':7}{'n':>8}  1 GPU (ms)  2 GPUs (ms)  speed-up (work allows)  2 GPUs − ideal (ms)  "
          f"GB: 1 GPU → per GPU")
    for p in pairs:
        extra = p["time_multi_ms"] - p["time_one_ms"] / allows[p["causal"]]
        print(f"{p['causal']!s:7}{p['seq_len']:>8,}{p['time_one_ms']:>11.1f}{p['time_multi_ms']:>13.1f}"
              f"{p['speedup']:>9.2f}× ({allows[p['causal']]:.1f}×){extra:>20.1f}"
              f"{p['mem_one_gb']:>12.2f} → {p['mem_per_rank_gb']:.2f}")

# %% [markdown]
# Without a mask the einops two-GPU ring reaches the ideal 2× from 64K on.
# At 16K and 32K it falls short by two to three milliseconds over the ideal
# time (the column "2 GPUs − ideal"): a fixed cost of the call
# (starting the exchange, synchronising the two processes), not the
# exchange itself, which notebook 02's overlap model hides entirely (a 16K
# step computes for about 10 ms here; its K/V move in about 0.04 ms over
# NVLink). A fixed cost shows only where the call is short. With a mask the
# speed-up passes 2× from 32K on and even the 2.4× of the score count, which
# leaves out the cost of applying the mask that ring size 1 pays on bigger
# tiles (not measured separately here). Each GPU holds about half the
# memory of the single GPU.
#
# **The fused path on two GPUs.** The second two-GPU run
# (`dist-bench-…-w2-auto.json`) is the fused path over NCCL
# (`production_dist`, zigzag with a mask), and in the same run its peers:
# cuDNN and the fused path on one GPU, and PyTorch's `context_parallel` on
# the same two GPUs with the cuDNN and the flash SDPA backend. Here the
# one-GPU baseline is cuDNN, which skips masked blocks itself: both two-GPU
# ranks do a quarter of the dense work each, so the ideal is 2× with and
# without a mask.

# %%
DIST_AUTO = PATHS.result("dist-bench-nvidia-h100-80gb-hbm3-bfloat16-w2-auto.json")
if DIST_AUTO is not None:
    auto = load_rows(DIST_AUTO)
    print(f"{auto[0]['device']}, {auto[0]['backend']}, {auto[0]['dtype']}, {auto[0]['seq_len']:,} tokens")
    picks = {}
    for causal in (False, True):
        rs = [r for r in auto if r["causal"] == causal]
        one = {r["impl"]: r for r in rs if r.get("peer_of") == "dist"}
        picks[causal] = [("1 GPU: sdpa_cudnn", one["sdpa_cudnn"]), ("1 GPU: production", one["production"]),
                         ("2 GPUs: production_dist", next(r for r in rs if r["impl"] == "production_dist"))] + [
            (f"2 GPUs: context_parallel ({r['sdpa_backend']})", r) for r in rs if r["impl"] == "context_parallel"]
        base = picks[causal][0][1]["time_ms"]
        print(f"\n{'causal' if causal else 'non-causal'}:{'':30}{'ms':>8}{'speed-up':>10}{'peak GB per GPU':>20}")
        for label, r in picks[causal]:
            per_gpu = r.get("per_rank_peak_mem_gb") or [r["peak_mem_gb"]]
            print(f"  {label:38}{r['time_ms']:8.2f}{base / r['time_ms']:9.2f}×{' / '.join(f'{m:.2f}' for m in per_gpu):>20}")

# %% [markdown]
# Without a mask two GPUs run the fused ring at about 1.9× one GPU (a
# parallel efficiency, speed-up / GPUs, of about 94%), level with
# `context_parallel` on cuDNN; with a mask `context_parallel` edges it out
# by a little, and against CP with the flash backend ours is clearly faster
# in both. The clearest gain is memory: each GPU of the ring peaks well
# below a `context_parallel` rank, because CP's SDPA call gathers the whole
# K/V while the ring holds one remote block at a time.

# %%
if BENCH is not None and DIST is not None and DIST_AUTO is not None:
    fig_scale, axes = new_figure(2, 2, figsize=(12.0, 8.6))
    plot_scaling(pairs, one_label="one GPU (ring, w = 1)", multi_label="each of 2 GPUs (NCCL)", axes=axes[0], ideal=allows)
    axes[0, 0].set_title("einops ring: speed-up, one GPU → 2 GPUs", fontsize=10)
    axes[0, 1].set_title("einops ring: peak memory, one GPU vs each GPU", fontsize=10)
    plot_gpu_bars(picks, ideal={False: 2.0, True: 2.0}, axes=axes[1], title=f", fused path, {auto[0]['seq_len'] // 1024}K tokens")
    fig_scale.suptitle(f"{auto[0]['device']} × 2, NCCL, bf16, b=1 h=8 d=64", fontsize=10)
    display(fig_scale)

# %% tags=["remove-cell"] jupyter={"source_hidden": true}
if BENCH is not None and DIST is not None and DIST_AUTO is not None:
    fig_scale.savefig(SAVE / "05_scaling.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** measured against what the work allows (2× for equal work,
# 2.4× for the causal einops baseline), two GPUs reach it from 64K tokens
# on, and each GPU holds about half the memory.

# %% [markdown]
# **Summary.** Every committed row was timed by the median of CUDA-event
# repeats, had its peak memory measured around one call, and was checked
# against the float64 reference before it counted. A ratio is read from two
# medians of the same run, against the resolution that a second measurement
# gives, and explained by ablations. A ring size in one process is a label,
# not a cost: the bytes and the imbalance of a real ring come from its plan.
# A speed-up is read against what the work allows, and a shortfall at short
# lengths is a fixed cost, not the exchange.

# %% [markdown]
# > **What to remember**
# >
# > * A number counts only with its work count, its timer, its device and code, and its reference check; a row that is
# >   not within tolerance is an error, not a result.
# > * Compare against the strongest peer timed in the same run; a difference smaller than two measurements' spread is
# >   not a finding.
# > * Ask what a parameter changes in the computation you timed: a ring size in one process changes nothing.
