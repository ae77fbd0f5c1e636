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
# # 02 · Ring attention
#
# > **You will learn** why the ring is exact; the schedule $(r - t) \bmod w$ as data; causal work per rank in the
# > contiguous, zigzag and striped layouts; memory per rank $O(n/w)$; a real ring over 4 processes.
# >
# > **You need** notebook 01 (the merge (M)).
# >
# > **Exercises** exercises 4–5 (zigzag positions, which causal blocks are skipped).
# >
# > **Time** 75–100 minutes working alone, at a student's pace; executing it takes 10–30 s on 2 CPU cores.
#
# Attention over $n$ tokens needs every query to meet every key: $n^2$
# scores. Blockwise attention (notebook 01) stops that from costing $n^2$
# *memory* on one device, but the activations of a long sequence still have
# to fit somewhere. **Ring attention** (Liu, Zaharia & Abbeel, 2023, *Ring
# Attention with Blockwise Transformers for Near-Infinite Context*) spreads
# the sequence over $w$ devices arranged in a ring:
#
# * rank $r$ keeps one shard of $c = n / w$ queries for the whole
#   computation, and starts with the key/value shard of the same tokens;
# * at each of $w$ steps every rank attends its queries to the K/V shard it
#   holds and folds the result into its running $(O, \mathrm{lse})$; then
#   every K/V shard moves one rank along the ring, $r \to r+1$, while (with
#   double buffering) the next step's shard is already in flight;
# * after $w$ steps every rank has met every K/V shard exactly once.
#
# No rank ever holds more than a couple of shards, so memory per rank is
# $O(n/w)$, and the sequence a ring can handle grows with the number of
# devices. This notebook shows why the result is **exact** (section 1), what
# each rank computes at each step (section 2), why the way tokens are dealt to
# ranks matters under a causal mask (section 3), what a rank holds in memory
# (section 4), and runs a real ring of 4 processes (section 5).
#
# Shapes as in notebook 01: q, k, v are `b n h d`, lse is `b h n`; a shard
# is `b c h d`; `w` is the ring size.

# %% jupyter={"source_hidden": true}
# Setup: ROOT is the ringbook clone (None outside one, e.g. on Colab), FIGURES its committed results,
# SAVE where this notebook's figures go: build/figures/, never the committed figures/ unless asked
# ($RINGBOOK_FIGURES_OUT, which `make sync-notebooks` sets). See ringbook/_paths.py.
from ringbook._paths import notebook_paths

PATHS = notebook_paths()
ROOT, FIGURES, SAVE = PATHS

# %%

import math

import torch
from IPython.display import display

import ringbook
from ringbook import LAYOUTS, layout_positions, naive_attention, ring_attention, ring_schedule, work_per_rank
from ringbook.bench.results import load_rows
from ringbook.demo import global_inputs, ring_memory_bytes, ring_step_seconds, ring_worker
from ringbook.distributed import spawn, unshard
from ringbook.exercises import check_causal_skip, check_zigzag_positions
from ringbook.online_softmax import KEY_CHUNK
from ringbook.viz import plot_causal_work, plot_error_bars, plot_memory_per_rank, plot_ring_step, plot_ring_timeline
from ringbook.viz.widgets import ring_step_explorer

torch.manual_seed(0)
torch.set_num_threads(1)  # small tensors; the 4-process ring below shares 2 cores
F64 = torch.float64  # exactness checks run in float64
TOL = 1e-10  # float64 agreement asserted throughout

print("ringbook", ringbook.__version__)

# %% [markdown]
# ## 1 · Why the ring is exact
#
# Cut the keys into the $w$ shards $K_0, \dots, K_{w-1}$ that start on the
# ranks. For the queries of rank $r$, attention over all keys is the merge
# (M) of notebook 01 of the partials over each shard,
#
# $$
# (O, \mathrm{lse}) = M\big(P_{K_{r}},\ P_{K_{r-1}},\ \dots,\ P_{K_{r-w+1}}\big), \qquad
# P_{K_s} = \texttt{attend\_block}(q_r, k_{K_s}, v_{K_s}),
# $$
#
# indices mod $w$: at step $t$ rank $r$ holds the shard that started on rank
# $(r - t) \bmod w$, so each rank meets the shards in **its own order**.
# Because (M) is associative and commutative, with the empty partial
# $(0, -\infty)$ as identity, the order and grouping do not matter: every
# rank ends with exact attention over all $n$ keys. A block that the causal
# mask hides completely contributes the identity, so the ring may skip it
# without computing it.
#
# **The loop, in plain torch.** Before the library, the whole idea in 25
# lines: $w$ ranks played in turn, one head, no mask. Each rank keeps its
# query shard and a running $(O, \mathrm{lse})$; at every step it attends to
# the K/V shard it holds and merges by (M); then every shard moves one rank
# along the ring.

# %%
def toy_ring_attention(q, k, v, w):
    """q, k, v: (n, d), one head, no mask. Returns (out, lse) after w steps of a w-rank ring."""
    c, scale = q.shape[0] // w, q.shape[1] ** -0.5
    queries = q.split(c)  # rank r keeps queries r·c … (r+1)·c − 1 for the whole call
    held = list(zip(k.split(c), v.split(c)))  # the K/V shard each rank holds; at step 0 its own
    out = [torch.zeros_like(x) for x in queries]
    lse = [torch.full((c,), -math.inf, dtype=q.dtype) for _ in queries]
    for t in range(w):
        for r in range(w):  # every rank, one block each
            k_b, v_b = held[r]
            s_b = queries[r] @ k_b.T * scale
            lse_b, out_b = torch.logsumexp(s_b, dim=1), torch.softmax(s_b, dim=1) @ v_b
            merged = torch.logaddexp(lse[r], lse_b)  # equation (M)
            out[r] = torch.exp(lse[r] - merged)[:, None] * out[r] + torch.exp(lse_b - merged)[:, None] * out_b
            lse[r] = merged
        held = held[-1:] + held[:-1]  # the send: the shard held by rank r moves to rank r + 1
    return torch.cat(out), torch.cat(lse)


q_toy, k_toy, v_toy = (torch.randn(24, 8, dtype=F64) for _ in range(3))
toy_out, toy_lse = toy_ring_attention(q_toy, k_toy, v_toy, w=4)
ref_toy = naive_attention(*(x[None, :, None] for x in (q_toy, k_toy, v_toy)))
lib_toy = ring_attention(*(x[None, :, None] for x in (q_toy, k_toy, v_toy)), ring_size=4)
print("toy ring == naive_attention:", torch.allclose(toy_out, ref_toy[0][0, :, 0], atol=1e-12),
      "| == ringbook.ring_attention:", torch.allclose(toy_out, lib_toy[0][0, :, 0], atol=1e-12)
      and torch.allclose(toy_lse, lib_toy[1][0, 0], atol=1e-12))
assert torch.allclose(toy_out, ref_toy[0][0, :, 0], atol=1e-12) and torch.allclose(toy_lse, ref_toy[1][0, 0], atol=1e-12)

# %% [markdown]
# `ringbook.ring_attention` is the same loop made general and robust: batch
# and heads, the causal mask with its skipped blocks, the three layouts, keys
# visited in chunks, grouped-query attention; it plays the $w$ ranks in turn
# in one process, and the schedule (who holds what, which blocks are
# computed) is data, read from `ringbook.ring_schedule`. First the arrival
# order at each rank:

# %%
W = 4
schedule = ring_schedule(8 * W, W, layout="contiguous")
for r in range(W):
    order = [schedule[t][r].kv_rank for t in range(W)]
    print(f"rank {r} meets the K/V shards in the order {order}")
    assert sorted(order) == list(range(W))  # every shard exactly once
assert all(schedule[t][r].kv_rank == (r - t) % W for t in range(W) for r in range(W))

# %% [markdown]
# Then the check: for every layout, causal and not, and several ring sizes,
# the one-process ring against `naive_attention` in float64. The sequence
# length 120 is divisible by $2w$ for every $w$ below, so every layout fits.

# %%
n_check = 120
q, k, v = (torch.randn(2, n_check, 3, 8, dtype=F64) for _ in range(3))
errors = {}
print("layout      causal  ring sizes          max |Δout|, |Δlse| < 1e-10")
for layout in LAYOUTS:
    for causal in (False, True):
        ref_out, ref_lse = naive_attention(q, k, v, causal=causal)
        worst = 0.0
        for w in (1, 2, 3, 4, 6):
            out, lse = ring_attention(q, k, v, ring_size=w, causal=causal, layout=layout)
            worst = max(worst, (out - ref_out).abs().max().item(), (lse - ref_lse).abs().max().item())
        errors[f"{layout}, {'causal' if causal else 'no mask'}"] = worst
        print(f"{layout:11} {causal!s:6}  1, 2, 3, 4, 6        {worst < TOL}")
assert all(e < TOL for e in errors.values())

# %% [markdown]
# Every layout, every ring size, lands on the reference to float64 rounding
# (the worst error over the five ring sizes is shown):

# %%
plot_error_bars(errors, title="ring_attention vs naive_attention (float64, worst over w = 1, 2, 3, 4, 6)",
                tolerance=TOL)

# %% [markdown]
# ## 2 · The schedule, step by step
#
# How the $n$ tokens are dealt to the ranks is the **layout**
# (`ringbook.schedule`):
#
# * `contiguous`: rank $r$ holds tokens $[rc, (r+1)c)$;
# * `zigzag`: the sequence is cut into $2w$ chunks and rank $r$ holds chunks
#   $r$ and $2w-1-r$, one early and one late;
# * `striped`: rank $r$ holds tokens $r, r+w, r+2w, \dots$ (Brandon et al., 2023).
#
# A rank's shard is made of contiguous pieces (one for contiguous, two for
# zigzag; striped counts as one). At step $t$, each pair (query piece of rank
# $r$, key piece of the shard it holds) is a **block** of the schedule: `full`
# (every key at or before every query), `causal` (needs the position mask:
# a full tile is computed, then the entries with $j > i$ are masked away) or
# skipped (every key after every query: never computed). Without a causal
# mask every block is full.
#
# **Exercise 4 · The zigzag positions.** Write the token positions rank
# `rank` holds in the zigzag layout, in the order it holds them (a list or a
# tensor). The checker compares with `ringbook.layout_positions` for several
# sizes, one rank included.

# %%
def zigzag_positions(n, world, rank):
    """The positions of rank `rank`'s zigzag shard, e.g. (8, 2, 0) -> [0, 1, 6, 7]."""
    raise NotImplementedError


_ = check_zigzag_positions(zigzag_positions)

# %% [markdown]
# **Exercise 5 · Which causal blocks are skipped.** With the contiguous
# layout and a causal mask, rank $r$ holds at step $t$ the K/V shard of rank
# $(r - t) \bmod w$. Return whether its block at that step is skipped
# (every key after every query). The checker compares with
# `ringbook.ring_schedule` for every rank and step of several ring sizes.

# %%
def causal_skip(rank, step, world):
    """True if rank `rank` has nothing to compute at step `step` (contiguous, causal)."""
    raise NotImplementedError


_ = check_causal_skip(causal_skip)

# %% [markdown]
# Every score cell $(i, j)$ belongs to exactly one block of one step; the
# blocks of the schedule tile the $n \times n$ matrix:

# %%
n_pic = 32
for layout in LAYOUTS:
    for causal in (False, True):
        sched = ring_schedule(n_pic, W, layout=layout, causal=causal)
        covered = sum(b.area for row in sched for s in row for b in (*s.blocks, *s.skipped))
        computed = sum(s.work for row in sched for s in row)
        skipped = sum(b.area for row in sched for s in row for b in s.skipped)
        print(f"{layout:11} causal={causal!s:5}: blocks cover {covered} = n² cells; "
              f"computed {computed:4}, skipped {skipped:3}")
        assert covered == n_pic**2
        assert computed + skipped == n_pic**2
        assert causal or skipped == 0

# %% [markdown]
# The picture for zigzag with a causal mask at step 1 (saved to
# `figures/02_ring_attention.png`). On the left, the score matrix: a cell is
# drawn in the colour of the rank that computes it, bright if it is
# computed at this step, pale if at another. The strip on the left says which
# rank holds each query (that never changes), the strip below which rank
# holds each key's K/V at this step, labelled with the shard's home rank.
# Hatched cells are skipped blocks. On the right, the ring: each rank, the
# shard it holds and how many scores it computes now. At step 1 every rank
# computes the same number of scores: that is the point of zigzag (section 3).

# %%
fig = plot_ring_step(n_pic, W, 1, layout="zigzag", causal=True)
fig

# %% jupyter={"source_hidden": true}
# Saved for the README and the docs (hidden in JupyterLab).
fig.savefig(SAVE / "02_ring_attention.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** with zigzag, every rank computes the same number of scores at
# every step after the first.

# %% [markdown]
# Move the slider through the steps, and switch the layout and the mask. With
# `contiguous` and a causal mask, rank 0 has nothing to do after step 0 and
# rank 3 works at every step; with `striped`, every block of every step needs
# the mask, and the × marks the scores computed only to be masked away.

# %%
# NBVAL_IGNORE_OUTPUT
explorer = ring_step_explorer(n_pic, W, step=0, layout="zigzag", causal=True)
_ = display(explorer)

# %% jupyter={"source_hidden": true}
# Check (hidden in JupyterLab): changing a control redraws the figure; then the controls go back.
# NBVAL_IGNORE_OUTPUT
assert len(explorer.result.axes) == 2
explorer.children[1].value = "contiguous"
explorer.children[0].value = 2
assert explorer.result.axes[0].get_title() == f"step 2 of {W} · layout contiguous · causal (n = {n_pic}, w = {W})"
explorer.children[1].value, explorer.children[0].value = "zigzag", 0

# %% [markdown]
# ## 3 · Causal work per rank: contiguous, zigzag, striped
#
# With a causal mask, query $i$ needs only keys $j \le i$. The scores a rank
# *needs* are $\sum_{i \in \text{rank}} (i + 1)$; the scores it *computes*
# are the areas of its tiles, `Step.work` summed by `ringbook.work_per_rank`.
# With $c = n / w$:
#
# * **contiguous**: rank $r$ computes $r$ full tiles and one diagonal tile,
#   $(r + 1)\,c^2$ scores: rank $w-1$ does $w$ times the work of rank 0.
#   Worse, at every step $t \ge 1$ some rank has a full tile to compute, so
#   the ring still takes $w$ tile-times, as without the mask: nothing is
#   saved.
# * **zigzag**: every rank holds an early and a late chunk. At step 0 it
#   computes three blocks of $(c/2)^2$, at every later step exactly two:
#   $c^2 (2w + 1)/4$ scores per rank, the same on every rank and close to
#   half of the unmasked work.
# * **striped**: every rank holds every $w$-th token, so every block mixes
#   earlier and later keys and none can be skipped: each rank computes
#   $w\,c^2 = n c$ scores, all of them, and masks about half. Balanced, but
#   the mask saves nothing unless the kernel skips the masked half of each
#   tile itself (as striped attention's kernels do).
#
# The ring's time is set by the slowest rank at each step (a step waits for
# the shard of the previous rank): the **critical path** is
# $\sum_t \max_r \mathrm{work}_{t,r}$.

# %%
n_work, w_work = 1024, 4
computed, needed, critical = {}, {}, {}
for layout in LAYOUTS:
    computed[layout] = work_per_rank(n_work, w_work, layout=layout, causal=True)
    needed[layout] = (layout_positions(n_work, w_work, layout) + 1).sum(dim=1).tolist()  # Σ (i + 1) per rank
    sched = ring_schedule(n_work, w_work, layout=layout, causal=True)
    critical[layout] = sum(max(s.work for s in row) for row in sched)

c_work = n_work // w_work
ideal = n_work * (n_work + 1) // 2 // w_work
print(f"n = {n_work}, w = {w_work}, c = {c_work}; needed in total n(n+1)/2 = {n_work * (n_work + 1) // 2}")
print(f"{'layout':11} {'computed per rank':34} {'needed per rank':34} busiest/mean  critical path / ideal")
for layout in LAYOUTS:
    comp = computed[layout]
    print(f"{layout:11} {str(comp):34} {str(needed[layout]):34} {max(comp) / (sum(comp) / w_work):12.2f}"
          f"  {critical[layout] / ideal:21.3f}")

assert computed["contiguous"] == [(r + 1) * c_work**2 for r in range(w_work)]
assert critical["contiguous"] == w_work * c_work**2  # = the unmasked ring: the mask saves no time
assert len(set(computed["zigzag"])) == 1 and computed["zigzag"][0] == c_work**2 * (2 * w_work + 1) // 4
assert critical["zigzag"] == computed["zigzag"][0]  # every step is balanced
assert computed["striped"] == [n_work * c_work] * w_work  # every score of the rank's rows, masked or not
assert sum(needed["contiguous"]) == sum(needed["zigzag"]) == sum(needed["striped"]) == n_work * (n_work + 1) // 2

# %% [markdown]
# The pale part of each bar is work computed and then masked away; the
# dashed line is perfect balance. Contiguous is unbalanced, zigzag is
# balanced and computes little beyond what is needed, striped is balanced
# but computes every score. The last panel is the ring's time in scores on
# the critical path, against the ideal $n(n+1)/(2w)$.

# %%
fig_work = plot_causal_work(computed, needed, critical=critical)
fig_work

# %% jupyter={"source_hidden": true}
# Saved for the README and the docs (hidden in JupyterLab).
fig_work.savefig(SAVE / "02_causal_work.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** zigzag balances causal work at almost no extra cost;
# contiguous leaves ranks idle, striped computes scores only to mask them.

# %% [markdown]
# ## 4 · Memory per rank: O(n / w)
#
# A rank never holds the whole sequence. At its peak in the forward pass of
# `ringbook.distributed.ring_attention` it holds, with $S = b\,c\,h\,d$
# elements in a shard, $e$ bytes per input element and $a$ bytes per
# accumulator element ($a = 4$ for bfloat16/float16 input):
#
# * its q, k, v shard: $3 S e$;
# * the K/V in flight: the stacked K/V message it attends and sends on, and
#   the buffer the next one is received into (double buffering): $4 S e$;
# * the accumulators $O$ and lse, and the partials and temporaries of the
#   merge (M): at most $8 S a + 8\,b h c\, a$;
# * the score tile. `attend_block` visits a shard's keys `KEY_CHUNK` at a
#   time, so a tile is $T = b\,h\,c \cdot \min(c, \texttt{KEY\_CHUNK})$ scores,
#   and at most three float tiles (scores, scores − max, their exp) plus a
#   boolean mask are alive at once: $T(3a + [\text{causal}])$.
#
# $$
# \text{bytes per rank} \le 7 S e + 8 S a + 8\,b h c\,a + b h c \min(c, \texttt{KEY\_CHUNK})\,(3a + 1),
# \qquad c = n / w .
# $$
#
# Every term is linear in $c = n/w$ (once $c \ge$ `KEY_CHUNK`): doubling the
# sequence and the ring leaves the memory per rank unchanged.
# `ringbook.demo.ring_memory_bytes` is this formula. The table is for the
# configuration of the GPU benchmark (bfloat16, $b = 1$, $h = 8$, $d = 64$,
# causal), in GB per rank:

# %%
CONFIG = {"batch": 1, "heads": 8, "head_dim": 64, "dtype": torch.bfloat16, "causal": True}
seq_lens = [2**p for p in range(14, 21)]  # 16K … 1M tokens
ring_sizes = [1, 2, 4, 8]
per_rank = {w: [sum(ring_memory_bytes(n, w, **CONFIG).values()) for n in seq_lens] for w in ring_sizes}
naive_scores = [4 * CONFIG["batch"] * CONFIG["heads"] * n * n for n in seq_lens]  # float32 n × n, one device

print(f"KEY_CHUNK = {KEY_CHUNK}")
print("n (tokens)  " + "".join(f"{'w = ' + str(w):>11}" for w in ring_sizes) + "   naive n×n scores")
for i, n in enumerate(seq_lens):
    print(f"{n:>10}  " + "".join(f"{per_rank[w][i] / 1e9:>11.3g}" for w in ring_sizes)
          + f"   {naive_scores[i] / 1e9:>10.4g}")

for w in ring_sizes:  # linear in n once c >= KEY_CHUNK
    for i in range(len(seq_lens) - 1):
        if seq_lens[i] // w >= KEY_CHUNK:
            assert per_rank[w][i + 1] == 2 * per_rank[w][i]
for w in ring_sizes[:-1]:  # depends on n / w only
    assert per_rank[2 * w][1:] == [per_rank[w][i] for i in range(len(seq_lens) - 1)]
terms = ring_memory_bytes(131072, 2, **CONFIG)
share = terms["score tiles"] / sum(terms.values())
vs_shards = terms["score tiles"] / (terms["q, k, v shards"] + terms["K/V in flight (double buffer)"])
print(f"\nn = 128K, w = 2: the score tiles are {share:.0%} of the total, "
      f"{vs_shards:.0f}× the q/k/v shards and K/V buffers together")
assert share > 0.85 and vs_shards > 10

# %% [markdown]
# Lines of slope 1 on the log-log plot, shifted down by each doubling of the
# ring; the dashed line is the $n \times n$ float32 score matrix that naive
# attention would hold on one device. On the right, the terms at 128K tokens
# over 2 ranks: with $d = 64$ the score tile of `KEY_CHUNK` = 2048 keys is
# far larger than the shards themselves ($3 \cdot 2048 \cdot 4$ bytes per
# query and head against $7 \cdot 64 \cdot 2$). It is still $O(n/w)$, but a
# fused kernel that also tiles the queries (FlashAttention) would shrink it
# to a constant.

# %%
fig_mem = plot_memory_per_rank(seq_lens, per_rank, reference=naive_scores,
                               reference_label="naive: n × n float32 scores, one device",
                               terms=terms, terms_label="n = 128K, w = 2")
fig_mem

# %% jupyter={"source_hidden": true}
# Saved for the README and the docs (hidden in JupyterLab).
fig_mem.savefig(SAVE / "02_memory.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** memory per rank depends only on $c = n / w$: more ranks fit a
# longer sequence.

# %% [markdown]
# **Measured.** `python -m ringbook.dist_bench` (under `torchrun` with 2
# H100s) records each rank's CUDA allocator peak for one forward call,
# inputs included. The cell below reads the committed results, if any, and
# checks every measured peak against the formula's bound, plus a fixed
# allowance of 0.1 GB for what the formula does not model and that does not
# grow with $n$ (cuBLAS keeps its workspace in the same allocator).

# %%
# NBVAL_IGNORE_OUTPUT
measured_file = FIGURES / "dist-bench-nvidia-h100-80gb-hbm3-bfloat16-w2.json"
ALLOWANCE_GB = 0.1  # library workspaces: allocated once, independent of n
if not measured_file.exists():
    print(f"The GPU measurement is not committed yet ({measured_file.relative_to(ROOT)}).")
else:
    rows = [r for r in load_rows(measured_file) if r.get("per_rank_peak_mem_gb")]
    assert rows, f"{measured_file.name} has no row with a measured per-rank peak"
    print(f"{rows[0]['device']}, torch {rows[0]['torch_version']}, {rows[0]['dtype']}")
    print("seq_len  w  causal  measured GB per rank      bound GB   measured / bound   time ms")
    for r in rows:
        bound = sum(ring_memory_bytes(r["seq_len"], r["ring_size"], batch=r.get("batch", 1),
                                      heads=r.get("heads", 8), head_dim=r.get("head_dim", 64),
                                      dtype=getattr(torch, r["dtype"]), causal=r["causal"]).values()) / 1e9
        peaks = r["per_rank_peak_mem_gb"]
        print(f"{r['seq_len']:>7} {r['ring_size']:>2}  {r['causal']!s:6}  "
              f"{', '.join(f'{p:.3f}' for p in peaks):24}  {bound:9.3f}   {max(peaks) / bound:16.2f}   "
              f"{r['time_ms']:.1f}")
        assert max(peaks) <= bound + ALLOWANCE_GB, (r["seq_len"], r["causal"], peaks, bound)
    print(f"every measured peak is within the bound (+ {ALLOWANCE_GB} GB):", True)

# %% [markdown]
# **Why the causal peaks sit at half the bound.** Without a mask the measured
# peak is 0.96–0.98 of the bound; with one (zigzag) it is about 0.48. The
# bound takes the score tile of a whole-shard block, $b\,h\,c \cdot
# \min(c, \texttt{KEY\_CHUNK})$. But a zigzag shard is two pieces of $c/2$
# tokens, and its blocks pair pieces (§2): the largest tile has $c/2$ query
# rows, half the bound's. The tiles are almost all of the memory (above), so
# the peak halves. Counting the tile of a piece instead gives a bound the
# causal peaks sit close to:

# %%
# NBVAL_IGNORE_OUTPUT
if measured_file.exists():
    for r in (r for r in rows if r["causal"]):
        terms_r = ring_memory_bytes(r["seq_len"], r["ring_size"], batch=r.get("batch", 1), heads=r.get("heads", 8),
                                    head_dim=r.get("head_dim", 64), dtype=getattr(torch, r["dtype"]), causal=True)
        piece_bound = (sum(terms_r.values()) - terms_r["score tiles"] / 2) / 1e9  # tiles of c/2 query rows
        ratio_piece = max(r["per_rank_peak_mem_gb"]) / piece_bound
        print(f"{r['seq_len']:>7} causal: measured / bound with piece tiles = {ratio_piece:.2f}")
        assert 0.8 <= ratio_piece <= 1.0 + ALLOWANCE_GB / piece_bound

# %% [markdown]
# ## 4b · When the transfer hides: double buffering
#
# Each step a rank computes one block, $4 b h c^2 d$ FLOPs at rate $F$,
# while the next K/V shard, $2 b c h d$ elements of $e$ bytes, crosses the
# link at bandwidth $B$ on another stream. With double buffering a step takes
# the longer of the two, so the transfer is free when
#
# $$
# \frac{4 b h c^2 d}{F} \ge \frac{2 b c h d\, e}{B}
# \iff c \ge \frac{e F}{2 B} \quad (= F / B \text{ in bf16}),
# $$
#
# the condition of Liu et al. (2023, Table 2: about 1K tokens per device on
# A100s over NVLink, 24.5K over InfiniBand). `ringbook.demo.ring_step_seconds`
# is this model. Below, $F$ is the cuDNN rate measured at 131K in the
# committed H100 file, and $B$ two nominal link rates (not measured here):
# NVLink 4 at 450 GB/s per direction and 400 Gb/s InfiniBand at 50 GB/s.

# %%
measured_h100 = FIGURES / "bench-nvidia-h100-80gb-hbm3-bfloat16.json"
cudnn_131k = next(r for r in load_rows(measured_h100)
                  if r["impl"] == "sdpa_cudnn" and r["seq_len"] == 131072 and not r["causal"] and r["status"] == "ok")
F_H100 = cudnn_131k["tflops"] * 1e12
LINKS = {"NVLink 4, 450 GB/s": 450e9, "InfiniBand 400 Gb/s, 50 GB/s": 50e9}
C_STEP = 4096
timeline = {}
for name, bw in LINKS.items():
    t = ring_step_seconds(C_STEP, flops_per_s=F_H100, bytes_per_s=bw)
    hidden = t["transfer"] <= t["compute"]
    print(f"{name}: threshold c ≥ {t['threshold']:,.0f} tokens; at c = {C_STEP}: compute {t['compute'] * 1e3:.3f} ms, "
          f"transfer {t['transfer'] * 1e3:.3f} ms -> {'hidden' if hidden else 'the compute waits'}")
    timeline[f"c = {C_STEP}, {name}"] = (t["compute"] * 1e3, t["transfer"] * 1e3)
print(f"(F = {F_H100 / 1e12:.0f} TFLOP/s: cuDNN on the {cudnn_131k['device']}, bf16, 131K, from {measured_h100.name})")
assert ring_step_seconds(C_STEP, flops_per_s=F_H100, bytes_per_s=450e9)["transfer"] < timeline[next(iter(timeline))][0] / 1e3
assert ring_step_seconds(C_STEP, flops_per_s=F_H100, bytes_per_s=50e9)["threshold"] > C_STEP

# %%
plot_ring_timeline(4, timeline)

# %% [markdown]
# **Takeaway:** over NVLink a shard of a few thousand tokens already hides
# its transfer; over InfiniBand the same ring waits on the network unless
# each rank holds about ten thousand tokens or more.

# %% [markdown]
# ## 5 · A real ring: 4 processes
#
# `ringbook.distributed.ring_attention` is the same algorithm over a
# `torch.distributed` process group: each process holds one shard, and the
# K/V shard travels by point-to-point messages (`batch_isend_irecv`), the
# next one in flight while the current one is attended. The backward is a
# second trip round the ring: dq stays home, dk and dv travel with their
# shard and one more hop brings them back to their owner.
#
# `ringbook.distributed.spawn` starts 4 local processes (gloo on the CPU). Each
# runs `ringbook.demo.ring_worker`: it builds the global inputs from a seed
# (only so that we can check the result here; a real job would load just its
# shard), cuts its shard with `ringbook.distributed.shard`, runs forward and
# backward for every layout, causal and not, and sends back its part of out,
# lse and the gradients. Here we put the parts back in token order with
# `unshard` and compare them with `naive_attention` and its autograd
# gradients, in float64.

# %%
n_ring, w_ring = 48, 4
cases = [(layout, causal) for layout in LAYOUTS for causal in (False, True)]
results = spawn(ring_worker, w_ring, n_ring, cases, timeout=300.0)

q, k, v, dout = global_inputs(n_ring)
print(f"{w_ring} processes, n = {n_ring}: {n_ring // w_ring} tokens a rank")
print("layout      causal  out, lse, dq, dk, dv within 1e-10 of naive_attention (float64)")
for layout, causal in cases:
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = naive_attention(qr, kr, vr, causal=causal)
    (ref_out * dout).sum().backward()
    ref = {"out": ref_out, "lse": ref_lse, "dq": qr.grad, "dk": kr.grad, "dv": vr.grad}
    got = {name: unshard([res["cases"][(layout, causal)][name] for res in results], layout,
                         dim=2 if name == "lse" else 1) for name in ref}
    err = {name: (got[name] - ref[name].detach()).abs().max().item() for name in ref}
    ok = all(e < TOL for e in err.values())
    print(f"{layout:11} {causal!s:6}  {ok}")
    assert ok, (layout, causal, err)

held = [res["bytes"] for res in results]
print(f"\nevery rank holds q, k, v shards of {held[0]['q, k, v shard']} bytes = 1/{w_ring} of the whole "
      f"{held[0]['whole q, k, v']} bytes:",
      all(h["q, k, v shard"] * w_ring == h["whole q, k, v"] for h in held))
assert all(h["q, k, v shard"] * w_ring == h["whole q, k, v"] for h in held)

# %% [markdown]
# **Summary.** The ring is exact because the merge (M) is associative and
# commutative; the layout decides the causal balance (zigzag: balanced and
# little wasted work; striped: balanced, but every tile is masked, not
# skipped); and a rank holds O(n / w) bytes, dominated at $d = 64$ by its
# score tile. The GPU benchmark (`ringbook.dist_bench`) measures the same
# ring on real hardware.

# %% [markdown]
# **References.** Liu, Zaharia & Abbeel (2023), [Ring Attention with
# Blockwise Transformers for Near-Infinite Context](https://arxiv.org/abs/2310.01889);
# Brandon et al. (2023), [Striped Attention](https://arxiv.org/abs/2311.09431);
# the zigzag layout as used by [ring-flash-attention](https://github.com/zhuzilin/ring-flash-attention)
# (zhuzilin, 2024) and PyTorch's context parallel (its load balancer).

# %% [markdown]
# > **What to remember**
# >
# > * Each rank keeps its queries and meets every K/V shard once: at step $t$ rank $r$ holds shard $(r - t) \bmod w$.
# > * With a causal mask the contiguous layout leaves early ranks idle; zigzag (chunks $r$ and $2w-1-r$) balances
# >   the work.
# > * Memory per rank is linear in $c = n / w$: doubling the sequence and the ring leaves it unchanged.
