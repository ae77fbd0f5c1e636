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
# # 03 · Dilated attention
#
# > **You will learn** the (segment, rate, head) pattern and its weights $\kappa_{ij}$, equation (D); coverage across
# > heads; the work $n s / r^2$ per pair against dense $n^2$; which segments cross ring shards.
# >
# > **You need** notebooks 01 and 02.
# >
# > **Exercises** 03.1 the kept positions of one pattern, 03.2 the scores of one pair, 03.3 the dilated rows a rank
# > sends.
# >
# > **Time** 50–65 minutes working alone, at a student's pace; executing it takes 10–30 s on 2 CPU cores.
#
# Ring attention (notebook 02) makes long sequences *fit*: memory per rank is
# $O(n / w)$. It does not make them *cheap*: every query still meets every
# key, $n^2$ scores. **Dilated attention** (Ding et al., 2023, *LongNet:
# Scaling Transformers to 1,000,000,000 Tokens*) computes far fewer scores:
# it cuts the sequence into segments, keeps only every $r$-th token of each
# segment, and lets the kept tokens attend one another. Several (segment
# length, dilation rate) pairs, short segments densely and long segments
# sparsely, are merged into one output with the lse merge (M) of notebook 01.
#
# This notebook says exactly what `ringbook` means by it (sections 1–2),
# checks the fast implementation against that definition (section 3), counts
# the work it saves (section 4), puts it on a ring (section 5) and checks
# that the ring does not change the result (section 6).
#
# Shapes and letters as in notebook 01: q, k, v are `b n h d`, lse is `b h n`;
# `s` is a segment length and `r` a dilation rate; `w` stays the ring size.

# %% jupyter={"source_hidden": true}
# Setup: ROOT is the ringbook clone (None outside one, e.g. on Colab), FIGURES its committed results,
# SAVE where this notebook's figures go: build/figures/, never the committed figures/ unless asked
# ($RINGBOOK_FIGURES_OUT, which `make sync-notebooks` sets). See ringbook/_paths.py.
from ringbook._paths import notebook_paths

PATHS = notebook_paths()
ROOT, FIGURES, SAVE = PATHS

# %%
import statistics

import torch
from IPython.display import display

import ringbook
from ringbook import (
    blockwise_attention,
    dilated_attention,
    dilated_attention_dense,
    dilated_flops,
    dilated_ring_plan,
    dilated_weights,
    ring_dilated_attention,
)
from ringbook._utils import attention_flops
from ringbook.bench import bench_dilated_config, time_call
from ringbook.bench.results import load_rows
from ringbook.dilated import grouped_heads, pair_heads
from ringbook.exercises.dilated import check_kept_positions, check_pair_scores, check_rows_sent
from ringbook.viz import (
    plot_dilated_coverage,
    plot_dilated_pattern,
    plot_dilated_ring_plan,
    plot_dilated_scaling,
    plot_error_bars,
)
from ringbook.viz.widgets import dilated_pattern_explorer

torch.manual_seed(0)
torch.set_num_threads(1)  # small tensors: one thread is as fast and keeps timings steady
F64 = torch.float64  # exactness checks run in float64
TOL = 1e-10  # float64 agreement asserted throughout

print("ringbook", ringbook.__version__)

# %% [markdown]
# ## 1 · The pattern: segments, dilation, heads
#
# A **pair** $(s, r)$ cuts the $n$ tokens into $n / s$ segments of $s$
# tokens. Inside each segment, head $h$ keeps the positions whose index
# within the segment is $\equiv o_h \pmod r$, and a kept query attends the
# kept keys **of its own segment** (queries, keys and values are dilated
# together). A head that uses several pairs merges their partial results by
# lse, and merging partials over key sets that *overlap* counts a key once per
# pair that shows it to the query. So the whole construction is dense
# attention in which key $j$ has weight $\kappa_{ij}$ for query $i$, equation (D)
# of `ringbook/dilated.py`:
#
# $$
# \kappa^h_{ij} = \#\big\{p :\ \lfloor i / s_p \rfloor = \lfloor j / s_p \rfloor,\
#            i \bmod s_p \equiv j \bmod s_p \equiv o_{h,p} \pmod{r_p}\big\}
#            \;[\,j \le i \text{ if causal}],
# \qquad
# \mathrm{lse}_i = \log \sum_j \kappa_{ij}\, e^{s_{ij}}, \quad
# O_i = \frac{\sum_j \kappa_{ij}\, e^{s_{ij}}\, v_j}{\sum_j \kappa_{ij}\, e^{s_{ij}}} .
# \tag{D}
# $$
#
# Which offset $o_{h,p}$ a head uses is the **head mode**:
#
# * `"all"` is LongNet's multi-head dilated attention (Ding et al., 2023,
#   section 2.3): every head uses every pair, head $h$ at offset
#   $o = h \bmod r_p$, so different heads see different positions and
#   together they cover the sequence.
# * `"grouped"`: the heads are cut into one contiguous group per pair, and
#   the $j$-th head of a group keeps offset $j \bmod r_p$. It exists because
#   it is the configuration the seed report benchmarked (heads split over
#   the pairs 2 : 3 : 3, `docs/seed-notes.md`): each head computes one pair
#   instead of all of them, so the work drops by the number of pairs, at a
#   price in coverage that section 2 measures.

# %% [markdown]
# `ringbook.dilated_weights` returns the integer tensor $\kappa^h_{ij}$ (`h i j`);
# `ringbook.dilated.pair_heads` says which heads use which pair at which
# offset. The configuration below is the benchmark's configuration
# scaled to 64 tokens (`ringbook.bench.bench_dilated_config`: segment
# lengths $n/8, n/4, n/2$ with rates 1, 2, 4, 8 heads grouped 2 : 3 : 3).

# %%
N, H = 64, 8
CFG = bench_dilated_config(N)  # {"segment_lengths": [8, 16, 32], "dilation_rates": [1, 2, 4]}
print("benchmark config at n = 64:", CFG)
for (hs, offs), seg, r in zip(pair_heads(H, CFG["dilation_rates"], "grouped"), *CFG.values()):
    print(f"  pair (s = {seg:2}, r = {r}): heads {list(hs)} at offsets {list(offs)}")

c_grouped = dilated_weights(N, H, heads="grouped", **CFG)
c_all = dilated_weights(N, H, heads="all", **CFG)
print("κ_ij takes the values (grouped):", sorted(c_grouped.unique().tolist()),
      "| (all):", sorted(c_all.unique().tolist()))

# (D) by hand for head 6 (pair (32, 4), offset 1): keep i ≡ j ≡ 1 (mod 4), same segment of 32
i, j = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
by_hand = ((i // 32 == j // 32) & (i % 32 % 4 == 1) & (j % 32 % 4 == 1)).long()
print("head 6 equals the rule written out by hand:", torch.equal(c_grouped[6], by_hand))
# in mode "all", head 1 sees (8, 1) everywhere, (16, 2) and (32, 4) at offset 1: up to 3 times the same key
print("mode all, head 1: keys counted 3 times:", int((c_all[1] == 3).sum()), "cells")
assert c_grouped.max() == 1 and c_all.max() == 3
assert torch.equal(c_grouped[6], by_hand)
assert torch.equal(c_grouped[0], torch.block_diag(*[torch.ones(8, 8, dtype=torch.long)] * 8))  # (8, 1): dense blocks

# %% [markdown]
# Head 6 of the benchmark's configuration: its group's pair is $(32, 4)$ and its
# offset 1, so it keeps every 4th token of each half of the sequence. On the
# right, for every head, how many pairs keep each position ($\kappa_{ii}$); red
# positions are kept by none. The figure is saved to
# `figures/03_dilated_attention.png`.

# %%
fig = plot_dilated_pattern(N, H, head=6, heads="grouped", **CFG)
fig

# %% tags=["remove-cell"] jupyter={"source_hidden": true}
fig.savefig(SAVE / "03_dilated_attention.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** a head sees only the positions its pair keeps; a position no
# pair keeps gets no output.

# %% [markdown]
# **Exercise 03.1 · The kept positions of one pattern.** The figure shows
# the positions one head keeps. Write them for one pair: the positions
# $p < n$ whose index within its segment is $\equiv o \pmod r$. The
# checker compares with the diagonal of `ringbook.dilated_weights` (a query
# keeps itself exactly when its position is kept).

# %%
def kept_positions(n, segment, rate, offset):
    """Sorted positions kept by the pattern (segment, rate) at `offset`, e.g. (8, 4, 2, 1) -> [1, 3, 5, 7]."""
    raise NotImplementedError


_ = check_kept_positions(kept_positions)

# %% [markdown]
# Explore: the pairs are geometric as in LongNet, $(s, r), (2s, 2r), (4s, 4r)$.
# With one pair the two head modes agree; with `all` and $r = 1$ the first pair
# keeps everything; with rates above 1 in every pair, some positions of every
# head are lost.

# %% tags=["nbval-ignore-output"]
explorer = dilated_pattern_explorer(N, H, segment_length=8, dilation_rate=1, num_pairs=3, head=6, heads="grouped")
_ = display(explorer)

# %% [markdown]
# ## 2 · Coverage: what each head never sees
#
# A head keeps a position only if one of its pairs has the right offset
# there. A position kept by no pair of head $h$ has an empty key set in (D):
# its output is 0 and its lse is $-\infty$, the identity partial of notebook
# 01. In the benchmark's grouped configuration the pair $(32, 4)$ has 3 heads for
# 4 offsets, so the positions $\equiv 3 \pmod 4$ of every segment are seen by
# **no head of that group**: a quarter of the sequence is invisible to it,
# and each of its heads drops three quarters. The check runs the fast
# implementation, not the weights.

# %%
q, k, v = (torch.randn(1, N, H, 16, dtype=F64) for _ in range(3))
out, lse = dilated_attention(q, k, v, heads="grouped", **CFG)
lost = torch.isneginf(lse[0])  # h n: positions kept by no pair
groups = grouped_heads(H, len(CFG["segment_lengths"]))
print("share of positions with lse = -inf, per head:", [f"{x:.2f}" for x in lost.double().mean(1).tolist()])
for g, hs in enumerate(groups):
    unseen = lost[list(hs)].all(0)
    residues = sorted(set((torch.nonzero(unseen)[:, 0] % 4).tolist()))
    print(f"group {g} (heads {list(hs)}): positions seen by no head of the group: {int(unseen.sum())} of {N}"
          + (f" = the positions ≡ {residues} (mod 4)" if unseen.any() else ""))
print("out is exactly 0 where lse is -inf:", bool((out[0].transpose(0, 1)[lost] == 0).all()))
print("and lse -inf exactly where c_ii = 0:", torch.equal(lost, c_grouped.diagonal(dim1=1, dim2=2) == 0))
assert lost.double().mean(1).tolist() == [0, 0, 0.5, 0.5, 0.5, 0.75, 0.75, 0.75]
assert lost[list(groups[2])].all(0).double().mean() == 0.25  # a quarter of the positions: no head of the group
assert not lost[list(groups[1])].all(0).any()  # (16, 2): 3 heads cover both offsets
assert (out[0].transpose(0, 1)[lost] == 0).all() and torch.equal(lost, c_grouped.diagonal(dim1=1, dim2=2) == 0)
# mode "all" with a rate-1 pair keeps every position of every head
assert torch.isfinite(dilated_attention(q, k, v, heads="all", **CFG)[1]).all()

# %% [markdown]
# Per head (bars) and per group (black line: the share that no head of the
# group keeps). Heads 0 and 1 see everything, inside segments of 8.

# %%
fig_cov = plot_dilated_coverage(N, H, heads="grouped", **CFG)
fig_cov

# %% tags=["remove-cell"] jupyter={"source_hidden": true}
fig_cov.savefig(SAVE / "03_coverage.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** only the rate-1 group sees every token; the rate-4 group
# leaves a quarter of the positions unseen by all of its heads.

# %% [markdown]
# ## 3 · The fast path equals the definition
#
# `ringbook.dilated_attention` never scores a dropped position. For each pair
# it gathers the kept tokens of every segment into a short dense sequence of
# $s / r$ tokens (`gather_dilated`: `b (s m r) h d -> (b s) m h d`), attends
# all segments as one batch (`attend_segments`), scatters the result back
# with 0 / $-\infty$ at the dropped positions (`scatter_dilated`), and merges
# the pairs with (M). `ringbook.dilated_attention_dense` is (D) itself, with
# the $n \times n$ weights $\kappa_{ij}$ materialised. They must agree, in
# float64, for every configuration: both head modes, causal or not, one pair
# or several, rates up to the segment length, and sequence lengths that are
# not powers of two.

# %%
CONFIGS = {
    "benchmark, n = 64": (64, CFG),
    "one pair (12, 3), n = 48": (48, {"segment_lengths": [12], "dilation_rates": [3]}),
    "(6, 1) (12, 2) (24, 4), n = 48": (48, {"segment_lengths": [6, 12, 24], "dilation_rates": [1, 2, 4]}),
    "(10, 5) (20, 2), n = 60": (60, {"segment_lengths": [10, 20], "dilation_rates": [5, 2]}),
    "(8, 8) (16, 16), n = 32": (32, {"segment_lengths": [8, 16], "dilation_rates": [8, 16]}),
}


def max_error(got, ref):
    """max |Δout|, |Δlse| over finite lse; the -inf positions must match exactly."""
    (out, lse), (ref_out, ref_lse) = got, ref
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    return max((out - ref_out).abs().max().item(), (lse[fin] - ref_lse[fin]).abs().max().item())


errors = {}
print("configuration                    heads    causal  max |Δout|, |Δlse| < 1e-10")
for name, (n, cfg) in CONFIGS.items():
    q, k, v = (torch.randn(2, n, 5, 8, dtype=F64) for _ in range(3))
    for heads in ("all", "grouped"):
        for causal in (False, True):
            err = max_error(dilated_attention(q, k, v, causal=causal, heads=heads, **cfg),
                            dilated_attention_dense(q, k, v, causal=causal, heads=heads, **cfg))
            errors[f"{name}, {heads}{', causal' if causal else ''}"] = err
            print(f"{name:32} {heads:8} {causal!s:6}  {err < TOL}")
assert all(e < TOL for e in errors.values())

# %%
plot_error_bars(errors, title="dilated_attention vs equation (D), float64", tolerance=TOL)

# %% [markdown]
# **Takeaway:** the gathered fast path and the $n \times n$ definition agree
# to float64 rounding.

# %% [markdown]
# ## 4 · The work: linear in n, not quadratic
#
# A pair $(s, r)$ has $n / s$ segments of $s / r$ kept tokens each, so a head
# that uses it computes
#
# $$
# \frac{n}{s} \cdot \Big(\frac{s}{r}\Big)^2 = \frac{n\, s}{r^2}
# \qquad\text{scores, against } n^2 \text{ for dense attention.}
# $$
#
# For fixed pairs that is **linear** in $n$. `ringbook.dilated_flops` counts
# $4 d$ FLOPs per score, summed over heads and pairs (halved if causal, like
# `attention_flops` for dense attention); dividing by $4 d$ gives scores. The
# benchmark's configuration is *not* fixed, though: below 16K its segments are
# $n/8, n/4, n/2$ (quadratic, about $1/15$ of dense), and above 16K they
# double at 32K and at 128K, so its work is linear between those steps
# and jumps $2\times$ at each. Its 4K pairs $(512, 1), (1024, 2),
# (2048, 4)$ kept fixed show the pure linear law.
#
# **Exercise 03.2 · The scores of one pair.** Count the scores one head
# computes for one pair, $\sum_{ij} \kappa_{ij}$, without the mask and with
# it. With the mask a kept query scores the kept keys up to and including
# itself (`dilated_flops` halves the unmasked count instead, the convention
# of dense attention: count exactly here).

# %%
def pair_scores(n, segment, rate, causal):
    """Scores one head computes for the pair (segment, rate) over n tokens, e.g. (16, 8, 2, False) -> 32."""
    raise NotImplementedError


_ = check_pair_scores(pair_scores)

# %%
B, D = 1, 64  # the GPU benchmark's shape: b = 1, h = 8, d = 64
seq_lens = [2**p for p in range(12, 20)]  # 4K … 512K, the benchmark's sweep
fixed = bench_dilated_config(4096)  # [512, 1024, 2048], rates [1, 2, 4]
scores = {
    "dense attention": [attention_flops(B, H, n, n, D) / (4 * D) for n in seq_lens],
    "dilated, the benchmark's config": [dilated_flops(B, H, n, D, heads="grouped", **bench_dilated_config(n)) / (4 * D)
                                   for n in seq_lens],
    "dilated, the 4K pairs kept fixed": [dilated_flops(B, H, n, D, heads="grouped", **fixed) / (4 * D)
                                          for n in seq_lens],
}
print(f"fixed pairs: {fixed}")
dense, bench_work, lin = (scores[k] for k in scores)
print("n (tokens)   dense scores    bench dilated   fixed pairs  dense / bench")
for i, n in enumerate(seq_lens):
    print(f"{n:>10} {dense[i]:>14.4g} {bench_work[i]:>16.4g} {lin[i]:>13.4g} {dense[i] / bench_work[i]:>14.0f}")

assert all(b == 4 * a for a, b in zip(dense, dense[1:]))  # quadratic
assert all(b == 2 * a for a, b in zip(lin, lin[1:]))  # linear
assert all(b > a for a, b in zip(bench_work, bench_work[1:]))  # monotonic
assert [round(b / a) for a, b in zip(bench_work, bench_work[1:])] == [4, 4, 4, 2, 4, 2, 2]  # steps: 32K, 128K
assert dilated_flops(B, H, 4096, D, causal=True, heads="grouped", **bench_dilated_config(4096)) * 2 == \
    dilated_flops(B, H, 4096, D, heads="grouped", **bench_dilated_config(4096))

# %% [markdown]
# **Measured on this machine.** A small live timing on the CPU (b = 1,
# h = 8, d = 32, float32, one thread): `dilated_attention` with pairs
# $(64, 1), (128, 2), (256, 4)$ against `blockwise_attention` (dense, blocks
# of 512). The numbers vary from run to run; the FLOP counts do not.

# %% tags=["nbval-ignore-output"]
LIVE = {"segment_lengths": [64, 128, 256], "dilation_rates": [1, 2, 4]}
live_lens = [256, 512, 1024, 2048]


def median_ms(fn, repeats=3):
    """The benchmark's own timer (ringbook.bench.measure.time_call), median of ``repeats`` calls."""
    return statistics.median(time_call(fn, torch.device("cpu"), warmup=0, repeats=repeats))


DILATED, DENSE = "dilated (64, 1) (128, 2) (256, 4)", "dense: blockwise_attention"
live = {DILATED: [], DENSE: []}
for n in live_lens:
    q, k, v = (torch.randn(1, n, H, 32) for _ in range(3))
    if n == live_lens[0]:  # warm-up
        dilated_attention(q, k, v, heads="grouped", **LIVE), blockwise_attention(q, k, v, block_size=512)
    live[DILATED].append(median_ms(lambda: dilated_attention(q, k, v, heads="grouped", **LIVE)))
    live[DENSE].append(median_ms(lambda: blockwise_attention(q, k, v, block_size=512)))
live_flops = [dilated_flops(1, H, n, 32, heads="grouped", **LIVE) for n in live_lens]
print("n      dilated ms   dense ms   dilated GFLOP   dense GFLOP")
for i, n in enumerate(live_lens):
    print(f"{n:>5} {live[DILATED][i]:>12.2f} {live[DENSE][i]:>10.2f}"
          f" {live_flops[i] / 1e9:>15.4f} {attention_flops(1, H, n, n, 32) / 1e9:>13.3f}")
assert all(b == 2 * a for a, b in zip(live_flops, live_flops[1:]))  # linear work
assert all(t > 0 for ts in live.values() for t in ts)
live_scores = {"dense attention": [attention_flops(1, H, n, n, 32) / 128 for n in live_lens],
               "dilated": [f / 128 for f in live_flops]}
fig_live = plot_dilated_scaling(live_lens, live_scores,
                                measured={k.replace("dense: ", "dense, "): (live_lens, ts) for k, ts in live.items()},
                                measured_title="this CPU, one thread (varies run to run)")
fig_live

# %% [markdown]
# **Takeaway:** per doubling of $n$ the dilated work doubles and the dense
# work quadruples; the CPU times follow the counts roughly.

# %% [markdown]
# **Measured on an H100.** The committed benchmark
# (`figures/bench-nvidia-h100-80gb-hbm3-bfloat16.json`, written by
# `python -m ringbook bench`, one H100, one run) has the benchmark's dilated
# configuration run by ringbook's einops `ring_dilated_attention` at ring
# size 1 (`ring_dilated`), and dense peers in the same run: cuDNN's fused
# attention (`sdpa_cudnn`), ringbook's einops `blockwise` and `ring`.
# Non-causal:

# %%
PEERS = {"ring_dilated": "dilated: ring_dilated (einops)", "sdpa_cudnn": "dense: sdpa_cudnn (fused kernel)",
         "blockwise": "dense: blockwise (einops)", "ring": "dense: ring (einops)"}
bench_file = PATHS.result("bench-nvidia-h100-80gb-hbm3-bfloat16.json")
if bench_file is not None:
    bench = [r for r in load_rows(bench_file) if r["ring_size"] == 1 and not r["causal"]]
    measured = {}
    print(f"{bench[0]['device']}, torch {bench[0]['torch_version']}, {bench[0]['dtype']}")
    print(f"{'impl':13}" + "".join(f"{n // 1024:>8}K" for n in seq_lens) + "   (time ms; - = not ok)")
    for impl, label in PEERS.items():
        rows = {r["seq_len"]: r for r in bench if r["impl"] == impl}
        ok = [n for n in seq_lens if n in rows and rows[n]["status"] == "ok"]
        measured[label] = (ok, [rows[n]["time_ms"] for n in ok])
        print(f"{impl:13}" + "".join(f"{rows[n]['time_ms']:>9.1f}" if n in ok else f"{'-':>9}" for n in seq_lens))
    dil = dict(zip(*measured[PEERS["ring_dilated"]]))
    cud = dict(zip(*measured[PEERS["sdpa_cudnn"]]))
    blk = dict(zip(*measured[PEERS["blockwise"]]))
    print(f"\nat 512K: ring_dilated {dil[524288]:.0f} ms, sdpa_cudnn {cud[524288]:.0f} ms "
          f"({cud[524288] / dil[524288]:.1f}× slower, for {dense[-1] / bench_work[-1]:.0f}× the scores)")
    print(f"at 128K: blockwise {blk[131072]:.0f} ms vs ring_dilated {dil[131072]:.0f} ms "
          f"({blk[131072] / dil[131072]:.0f}×, the same einops arithmetic)")

# %% [markdown]
# Dense attention's time grows $4\times$ per doubling, dilated attention's
# follows its (piecewise linear) work. cuDNN's fused kernel runs at ~450
# TFLOP/s while ringbook's einops code reaches ~10 (notebook 05, section 3),
# so the fused dense kernel is faster up to 128K although it computes 15–30×
# more scores; from 256K on (60× and 120× more scores) the quadratic term
# wins. Against the same einops arithmetic (`blockwise`), the dilated path is
# faster at every length. Left, the scores each method computes; right, the
# milliseconds, one GPU and one run.

# %%
if bench_file is not None:
    fig_cost = plot_dilated_scaling(seq_lens, scores, measured=measured,
                                    measured_title=f"{bench[0]['device']}, bf16, b 1, h 8, d 64, non-causal")
    display(fig_cost)

# %% tags=["remove-cell"] jupyter={"source_hidden": true}
if bench_file is not None:
    fig_cost.savefig(SAVE / "03_work.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** on one H100 the linear work of dilated attention overtakes
# cuDNN's fused dense kernel from 256K tokens on, even in ringbook's slow
# einops code. The fused dilated path, which runs the same work on fused
# kernels, is measured in notebook 05 (section 5).

# %% [markdown]
# ## 5 · On a ring: local and exchanged segments
#
# `ringbook.ring_dilated_attention` shards the sequence contiguously over
# `ring_size` ranks, $c = n / \text{ring\_size}$ tokens each. For each pair,
# a segment that lies inside one shard is **local**: its rank computes it
# alone. A segment that spans several shards is **exchanged**: each spanned
# rank sends the *dilated* K/V of its piece, $s / r$ rows for the whole
# segment rather than $s$, to the other spanned ranks (an all-gather among
# them; with a causal mask only to the later ones). This is LongNet's own
# distributed algorithm (Ding et al., 2023, section 3.1 and its figure 4):
# each device dilates its local piece first, and only the segments longer
# than a device's piece all-gather their sparsified keys and values, so the
# traffic per device does not grow with the sequence. Per segment spanning
# the ranks $R$, for a head at offset $o$:
#
# $$
# \text{elements sent} = \sum_{k \in R} 2\, b\, d\ \big|\{t \in \text{piece}_k : t \equiv o \!\!\pmod r\}\big|
# \cdot \begin{cases} |R| - 1 & \\ \text{(number of later ranks in } R) & \text{causal} \end{cases}
# $$
#
# `ringbook.dilated_ring_plan` is this plan as plain data, and the compute
# loop consumes it. Here $n = 48$ with pairs $(6, 1), (12, 2), (24, 4)$, heads
# grouped, on 3 ranks of 16 tokens: segments of 6 and 12 that straddle 16 or
# 32 are exchanged, the others stay local.

# %%
N5, H5, D5 = 48, 8, 16
CFG5 = {"segment_lengths": [6, 12, 24], "dilation_rates": [1, 2, 4]}
q, k, v = (torch.randn(1, N5, H5, D5, dtype=F64) for _ in range(3))
lines = ["ring  causal  segments local / exchanged   elements sent per rank (plan)   measured = plan"]
for ring_size in (1, 2, 3, 4, 6, 8):
    for causal in (False, True):
        plan = dilated_ring_plan(N5, ring_size, **CFG5, num_heads=H5, heads="grouped", causal=causal)
        comm = {}
        ring_dilated_attention(q, k, v, ring_size=ring_size, causal=causal, heads="grouped", comm=comm, **CFG5)
        kinds = [s.kind for s in plan.segments]
        same = comm["sent_elements"] == plan.sent_elements(1, D5)
        lines.append(f"{ring_size:>4}  {causal!s:6}  {kinds.count('local'):>8} / {kinds.count('exchanged'):<10}"
                     f"         {str(plan.sent_elements(1, D5)):32} {same}")
        assert same
        crossing = sum(s.start // plan.shard_len != (s.stop - 1) // plan.shard_len for s in plan.segments)
        assert kinds.count("exchanged") == crossing  # exchanged = crosses a shard boundary

print("\n".join(lines))
plan3 = dilated_ring_plan(N5, 3, **CFG5, num_heads=H5, heads="grouped")
print("\nring of 3: each segment and the ranks it spans")
for p, (seg, r) in enumerate(plan3.pairs):
    segs = [s for s in plan3.segments if s.pair == p]
    print(f"pair ({seg:2}, {r}): " + "  ".join(f"[{s.start},{s.stop}) {'→'.join(map(str, s.ranks))}" for s in segs))
plan3c = dilated_ring_plan(N5, 3, **CFG5, num_heads=H5, heads="grouped", causal=True)
assert [s.kind for s in plan3.segments if s.pair == 0] == ["local", "local", "exchanged", "local", "local", "exchanged",
                                                             "local", "local"]  # [12, 18) and [30, 36) straddle 16, 32
assert sum(plan3c.sent_elements(1, D5)) * 2 == sum(plan3.sent_elements(1, D5))  # 2 ranks a segment: causal halves it

# %% [markdown]
# Each band is one pair along the token axis, each box one segment (green:
# local, orange: exchanged, labelled with the ranks it spans); dashed lines
# are shard boundaries. On the right, what each rank sends in the whole call
# (b = 1, d = 16), by pair. The middle rank shares a segment with both of its
# neighbours, so it sends the most.

# %%
fig_plan = plot_dilated_ring_plan(plan3, batch=1, head_dim=D5)
fig_plan

# %% tags=["remove-cell"] jupyter={"source_hidden": true}
fig_plan.savefig(SAVE / "03_ring_plan.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** only segments that cross a shard boundary cost communication,
# and only their dilated rows travel.
#
# **Exercise 03.3 · The dilated rows a rank sends.** For one pair and one
# head at `offset`, return for every rank the number of dilated K rows it
# sends over the whole call, counting each receiver (V sends as many).
# Contiguous shards of $n / w$ tokens; without the mask a piece goes to
# every other rank its segment spans, with the mask only to the later ones.

# %%
def rows_sent(n, ring_size, segment, rate, offset, causal):
    """Per rank: dilated K rows sent (one head at `offset`), e.g. (16, 4, 8, 2, 0, False) -> [2, 2, 2, 2]."""
    raise NotImplementedError


_ = check_rows_sent(rows_sent)

# %% [markdown]
# ## 6 · The ring does not change the result
#
# A tempting shortcut attends each shard only to itself and drops the head
# groups whose segment does not fit a shard; that is a different function.
# The ring here computes
# (D) exactly, whatever the ring size: for every divisor of $n$ (even shards
# of 1 token, where every segment longer than 1 is exchanged), both head
# modes, causal and not, `ring_dilated_attention` equals `dilated_attention`
# in float64.

# %%
divisors = [x for x in range(1, N5 + 1) if N5 % x == 0]
ring_errors = {}
lines = [f"ring sizes: {divisors}", "heads    causal  max |Δout|, |Δlse| < 1e-10 over every ring size"]
for heads in ("all", "grouped"):
    for causal in (False, True):
        ref = dilated_attention(q, k, v, causal=causal, heads=heads, **CFG5)
        worst = max(max_error(ring_dilated_attention(q, k, v, ring_size=rs, causal=causal, heads=heads, **CFG5), ref)
                    for rs in divisors)
        ring_errors[f"heads {heads}, {'causal' if causal else 'no mask'}"] = worst
        lines.append(f"{heads:8} {causal!s:6}  {worst < TOL}")
print("\n".join(lines))
assert all(e < TOL for e in ring_errors.values())

# %%
plot_error_bars(ring_errors, title=f"ring_dilated_attention vs dilated_attention (float64, worst over ring sizes "
                                   f"{', '.join(map(str, divisors))})", tolerance=TOL)

# %% [markdown]
# **Summary.** Dilated attention is dense attention with integer weights
# $\kappa_{ij}$ (D): a key counts once per pair that shows it to the query, and a
# position no pair keeps gets out 0 and lse $-\infty$ (a quarter of the
# sequence for the last head group of the benchmark's configuration). It costs
# $n s / r^2$ scores per pair, linear in $n$; on a ring only the segments
# that straddle a shard boundary move, as dilated K/V, and the result is the
# same for every ring size.

# %% [markdown]
# **References.** Ding et al. (2023), [LongNet: Scaling Transformers to
# 1,000,000,000 Tokens](https://arxiv.org/abs/2307.02486).

# %% [markdown]
# > **What to remember**
# >
# > * Dilated attention is dense attention with integer weights $\kappa_{ij}$ (equation (D)): each pair a key shares with
# >   a query counts once.
# > * A pair $(s, r)$ costs $(n/s)(s/r)^2$ scores per head: linear in $n$, not quadratic.
# > * On a ring only segments that span shards communicate, and only their dilated rows.
