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
# > contiguous, zigzag and striped layouts; memory per rank $O(n/w)$; the double-buffered send/receive loop, forward
# > and backward, on 4 real processes; when the transfer hides behind the compute.
# >
# > **You need** notebook 01 (the merge (M)).
# >
# > **Exercises** 02.1–02.6, in increasing difficulty: the ring loop (§1); zigzag positions, skipped causal blocks,
# > any block's kind (§2); the ring backward (§5); the overlap threshold of your hardware (§6).
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
# (section 4), writes the real send/receive loop and runs it on 4 processes
# (section 5), and asks when the transfer costs nothing (section 6).
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

import inspect
import math

import torch
from IPython.display import display

import ringbook
from ringbook import LAYOUTS, layout_positions, naive_attention, ring_attention, ring_schedule, work_per_rank
from ringbook.bench.results import load_rows
from ringbook.demo import fused_memory_bytes, global_inputs, ring_memory_bytes, ring_step_seconds, ring_worker, run_source
from ringbook.distributed import spawn, unshard
from ringbook.exercises import (
    block_backward,
    check_causal_skip,
    check_classify_block,
    check_overlap_threshold,
    check_toy_ring_attention,
    check_toy_ring_backward,
    check_zigzag_positions,
)
from ringbook.online_softmax import KEY_CHUNK
from ringbook.viz import plot_causal_work, plot_error_bars, plot_memory_per_rank, plot_ring_step, plot_ring_timeline
from ringbook.viz.ring import plot_ring_overlap
from ringbook.viz.widgets import overlap_explorer, ring_step_explorer

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
# **Exercise 02.1 · The ring loop** (easy, once (M) is known). Play the
# $w$ ranks in turn in one process, one head, no mask: q, k, v are `(n, d)`.
# Rank $r$ keeps the queries $rc, \dots, (r+1)c - 1$ ($c = n/w$) and a running
# $(O, \mathrm{lse})$ that starts as the empty partial $(0, -\infty)$; it
# starts with the K/V shard of its own tokens. At each of the $w$ steps, every
# rank attends its queries to the K/V shard it holds (`torch.softmax` and
# `torch.logsumexp` of the block's scores, scaled by $d^{-1/2}$), merges the
# block into its running pair by (M), and then every shard moves one rank
# along the ring, $r \to r + 1$. Return the whole sequence's `(out, lse)`.
# §5 writes the same loop over real processes.

# %%
def toy_ring_attention(q, k, v, w):
    """q, k, v: (n, d), one head, no mask. Returns (out, lse) after w steps of a w-rank ring."""
    raise NotImplementedError


_ = check_toy_ring_attention(toy_ring_attention)

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

# %% tags=["nbval-ignore-output"]
explorer = ring_step_explorer(n_pic, W, step=0, layout="zigzag", causal=True)
_ = display(explorer)

# %% [markdown]
# **Exercise 02.2 · The zigzag positions** (easy). Write the token positions
# rank `rank` holds in the zigzag layout, in the order it holds them (a list
# or a tensor of whole numbers); the picture above shows them for $w = 4$.
# The checker compares with `ringbook.layout_positions` for several sizes,
# one rank included.

# %%
def zigzag_positions(n, world, rank):
    """The positions of rank `rank`'s zigzag shard, e.g. (8, 2, 0) -> [0, 1, 6, 7]."""
    raise NotImplementedError


_ = check_zigzag_positions(zigzag_positions)

# %% [markdown]
# **Exercise 02.3 · Which causal blocks are skipped** (easy). With the
# contiguous layout and a causal mask, rank $r$ holds at step $t$ the K/V
# shard of rank $(r - t) \bmod w$. Return whether its block at that step is
# skipped (every key after every query): set the slider above to
# `contiguous` and watch the hatched blocks. The checker compares with
# `ringbook.ring_schedule` for every rank and step of several ring sizes.

# %%
def causal_skip(rank, step, world):
    """True if rank `rank` has nothing to compute at step `step` (contiguous, causal)."""
    raise NotImplementedError


_ = check_causal_skip(causal_skip)

# %% [markdown]
# **Exercise 02.4 · Any block's kind** (medium). The schedule sorts every
# block into `"full"`, `"causal"` or `"skip"` from its token positions alone,
# whatever the layout. Given the positions of a block's queries and of its
# keys (LongTensors, in any order), return its kind. The checker runs every
# block of every step of the three layouts, and shuffled positions.

# %%
def classify_block(q_pos, k_pos):
    """'full' (no mask needed), 'causal' (the mask is needed) or 'skip' (every key after every query)."""
    raise NotImplementedError


_ = check_classify_block(classify_block)

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
# If the ranks move in **lock step** (no rank starts step $t + 1$ before
# every rank has finished step $t$, which is what happens when each step
# waits for the shard of the previous rank and every link is equally fast),
# the ring's time is set by the slowest rank at each step: the **critical
# path** is $\sum_t \max_r \mathrm{work}_{t,r}$. Ranks that may run ahead
# (deeper buffering) could do better; the schedule's numbers below assume
# lock step.

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
# A rank never holds the whole sequence. With a fused attention kernel
# (FlashAttention, cuDNN; ringbook's production path), which keeps its score
# tiles on chip, a rank holds at its peak, with $S = b\,c\,h\,d$ elements in
# a shard, $e$ bytes per input element and $a$ bytes per accumulator element
# ($a = 4$ for bfloat16 input):
#
# * **its three shards** q, k, v: $3 S e$;
# * **two K/V buffers in flight**: the shard it attends now (and sends on) and
#   the buffer the next shard arrives in (double buffering, §5): $2 \cdot 2 S e$;
# * **the O and lse accumulators**, and one block's partial before it is
#   merged: $2 (S + b h c)\, a$;
# * **in the backward**, in addition: out and dout ($2 S e$), the dQ
#   accumulator ($S a$), and the dK/dV partial sums, which travel with their
#   shard in two buffers like K/V ($2 \cdot 2 S a$).
#
# $$
# \text{forward: } 7 S e + 2 (S + b h c)\, a, \qquad
# \text{backward: } 9 S e + 2 (S + b h c)\, a + 5 S a, \qquad S = b\,\tfrac{n}{w}\,h\,d .
# $$
#
# Every term is linear in $c = n/w$: doubling the sequence and the ring
# leaves the memory per rank unchanged. `ringbook.demo.fused_memory_bytes`
# is this count. The table is for the configuration of the GPU benchmark
# (bfloat16, $b = 1$, $h = 8$, $d = 64$), in GB per rank, forward:

# %%
CONFIG = {"batch": 1, "heads": 8, "head_dim": 64, "dtype": torch.bfloat16}
seq_lens = [2**p for p in range(14, 21)]  # 16K … 1M tokens
ring_sizes = [1, 2, 4, 8]
per_rank = {w: [sum(fused_memory_bytes(n, w, **CONFIG).values()) for n in seq_lens] for w in ring_sizes}
naive_scores = [4 * CONFIG["batch"] * CONFIG["heads"] * n * n for n in seq_lens]  # float32 n × n, one device

print("n (tokens)  " + "".join(f"{'w = ' + str(w):>11}" for w in ring_sizes) + "   naive n×n scores")
for i, n in enumerate(seq_lens):
    print(f"{n:>10}  " + "".join(f"{per_rank[w][i] / 1e9:>11.3g}" for w in ring_sizes)
          + f"   {naive_scores[i] / 1e9:>10.4g}")
for w in ring_sizes[:-1]:  # depends on n / w only
    assert per_rank[2 * w][1:] == [per_rank[w][i] for i in range(len(seq_lens) - 1)]
terms = fused_memory_bytes(131072, 2, backward=True, **CONFIG)
print("\nn = 128K, w = 2, forward and backward: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in terms.items()))

# %% [markdown]
# Lines of slope 1 on the log-log plot, shifted down by each doubling of the
# ring; the dashed line is the $n \times n$ float32 score matrix that naive
# attention would hold on one device. On the right, the terms at 128K tokens
# over 2 ranks, backward included.

# %%
fig_mem = plot_memory_per_rank(seq_lens, per_rank, reference=naive_scores,
                               reference_label="naive: n × n float32 scores, one device",
                               terms=terms, terms_label="n = 128K, w = 2, fwd + bwd")
fig_mem

# %% jupyter={"source_hidden": true}
# Saved for the README and the docs (hidden in JupyterLab).
fig_mem.savefig(SAVE / "02_memory.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** memory per rank depends only on $c = n / w$: more ranks fit a
# longer sequence.
#
# **Footnote: the einops path.** `ringbook.distributed.ring_attention` with
# its default einops kernel materialises score tiles in ordinary memory:
# `attend_block` visits a shard's keys `KEY_CHUNK` at a time, so a tile has
# $T = b\,h\,c \cdot \min(c, \texttt{KEY\_CHUNK})$ scores, and at most three
# float tiles (scores, scores − max, their exp) plus, when causal, a boolean
# mask are alive at once: $T\,(3a + [\text{causal}])$ bytes, where
# $[\text{causal}]$ is 1 with a mask and 0 without. Its merge also keeps
# more temporaries. `ringbook.demo.ring_memory_bytes` is that bound,
#
# $$
# 7 S e + 8 S a + 8\,b h c\,a + b h c \min(c, \texttt{KEY\_CHUNK})\,(3a + [\text{causal}]),
# $$
#
# still linear in $c$, but at $d = 64$ the tiles dominate. `python -m
# ringbook.bench.dist_sweep` measured each rank's CUDA allocator peak for this path
# on 2 H100s; the committed file is read below (`tests/test_memory_model.py`
# checks every peak against the bound).

# %%
measured_file = PATHS.result("dist-bench-nvidia-h100-80gb-hbm3-bfloat16-w2.json")
if measured_file is not None:
    rows = [r for r in load_rows(measured_file) if r.get("per_rank_peak_mem_gb")]
    print(f"{rows[0]['device']}, torch {rows[0]['torch_version']}, {rows[0]['dtype']}, einops kernel; "
          f"KEY_CHUNK = {KEY_CHUNK}")
    print("seq_len  w  causal  measured GB per rank      bound GB   measured / bound")
    for r in rows:
        bound = sum(ring_memory_bytes(r["seq_len"], r["ring_size"], batch=r.get("batch", 1),
                                      heads=r.get("heads", 8), head_dim=r.get("head_dim", 64),
                                      dtype=getattr(torch, r["dtype"]), causal=r["causal"]).values()) / 1e9
        peaks = r["per_rank_peak_mem_gb"]
        print(f"{r['seq_len']:>7} {r['ring_size']:>2}  {r['causal']!s:6}  "
              f"{', '.join(f'{p:.3f}' for p in peaks):24}  {bound:9.3f}   {max(peaks) / bound:16.2f}")

# %% [markdown]
# Without a mask the peaks sit just under the bound. With one (zigzag) they
# sit near half of it: a zigzag shard is two pieces of $c/2$ tokens, its
# blocks pair pieces (§2), so its largest tile has $c/2$ query rows, half the
# bound's, and the tiles are almost all of this path's memory.

# %% [markdown]
# ## 5 · A real ring: 4 processes, double buffered
#
# Now the loop of exercise 02.1 on real processes, each holding only its
# shards. The K/V shard travels by point-to-point messages: `dist.isend` to
# rank $r+1$ and `dist.irecv` from rank $r-1$, both posted *before* the
# block is computed, so the next shard is in flight while the current one is
# attended. That needs **two buffers**: `kv`, the shard being attended (and
# sent), and `incoming`, where the next one lands; after both messages
# complete, the two swap roles.
#
# The backward is a second trip round the ring (notebook 01, §6c). dQ stays
# home. dK and dV of a shard travel *with* it, in their own two buffers: each
# rank adds its queries' contribution, then passes them on. After the last
# step a rank holds the dK/dV of the shard that started on rank $r + 1$, so
# **one more hop** brings every dK/dV home.
#
# The cell below is the whole loop, forward and backward, for the contiguous
# layout (the causal mask skips shards from later ranks, §2). Blocks are
# computed with the library's `attend_block` and `attend_block_backward`
# (notebook 01's formulas), merged by `merge_partials` (M).

# %%
def ring_rank(rank, world, n, causal):
    """One rank of a contiguous ring over `world` processes: forward, then backward, by isend/irecv."""
    import torch.distributed as dist

    from ringbook.demo import global_inputs
    from ringbook.online_softmax import attend_block, attend_block_backward, merge_partials

    c = n // world
    q, k, v, dout = (x[:, rank * c:(rank + 1) * c] for x in global_inputs(n))  # this rank's shards, b c h d
    scale, nxt, prv = q.shape[-1] ** -0.5, (rank + 1) % world, (rank - 1) % world
    KV, DKV = 0, 1  # message tags

    def visible(src):  # contiguous and causal: a shard from a later rank lies wholly in the future
        return not causal or src <= rank

    # Forward: K/V travel; two buffers, the next shard in flight while this one is attended.
    kv, incoming = torch.stack([k, v]), torch.empty(2, *k.shape, dtype=k.dtype)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[0], q.shape[2], c), -math.inf, dtype=q.dtype)  # b h c
    for t in range(world):
        src = (rank - t) % world  # the shard held at step t started on rank src
        if t < world - 1:
            pending = [dist.isend(kv, nxt, tag=KV), dist.irecv(incoming, prv, tag=KV)]
        if visible(src):
            part = attend_block(q, kv[0], kv[1], scale=scale, causal=causal, q_offset=rank * c, k_offset=src * c)
            out, lse = merge_partials(out, lse, *part)
        if t < world - 1:
            for work in pending:
                work.wait()
            kv, incoming = incoming, kv  # the buffer just sent receives next time

    # Backward: K/V travel again, and dK/dV travel with them; dQ stays home.
    dq = torch.zeros_like(q)
    kv, incoming = torch.stack([k, v]), torch.empty(2, *k.shape, dtype=k.dtype)
    dkv, dkv_incoming = torch.zeros_like(kv), torch.empty_like(kv)
    for t in range(world):
        src = (rank - t) % world
        pending = [dist.isend(kv, nxt, tag=KV), dist.irecv(incoming, prv, tag=KV)] if t < world - 1 else []
        if visible(src):
            dq_b, dk_b, dv_b = attend_block_backward(q, kv[0], kv[1], out, lse, dout, scale=scale, causal=causal,
                                                     q_offset=rank * c, k_offset=src * c)
            dq += dq_b
            dkv += torch.stack([dk_b, dv_b])
        # dK/dV leave once this rank's part is added; at t = world - 1 this is the final hop home
        pending += [dist.isend(dkv, nxt, tag=DKV), dist.irecv(dkv_incoming, prv, tag=DKV)]
        for work in pending:
            work.wait()
        kv, incoming = incoming, kv
        dkv, dkv_incoming = dkv_incoming, dkv
    return {"out": out, "lse": lse, "dq": dq, "dk": dkv[0], "dv": dkv[1]}


# %% [markdown]
# `ringbook.distributed.spawn` starts 4 local processes (gloo on the CPU).
# A spawned process can only import its function, so `run_source` hands it
# the cell's source text: the loop above is the loop that runs. Every rank
# builds the same global inputs from a seed (only so that we can check the
# result here; a real job would load just its shard). We put the parts back
# in token order and compare them with `naive_attention` and its autograd
# gradients, in float64.

# %%
n_ring, w_ring = 48, 4
q, k, v, dout = global_inputs(n_ring)


def reference(causal):
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = naive_attention(qr, kr, vr, causal=causal)
    (ref_out * dout).sum().backward()
    return {"out": ref_out.detach(), "lse": ref_lse.detach(), "dq": qr.grad, "dk": kr.grad, "dv": vr.grad}


mine = {}
print(f"{w_ring} processes, n = {n_ring}: {n_ring // w_ring} tokens a rank; the loop above, contiguous layout")
for causal in (False, True):
    parts = spawn(run_source, w_ring, inspect.getsource(ring_rank), "ring_rank", n_ring, causal, timeout=300.0)
    mine[causal] = {name: torch.cat([p[name] for p in parts], dim=2 if name == "lse" else 1) for name in parts[0]}
    ref = reference(causal)
    err = max((mine[causal][name] - ref[name]).abs().max().item() for name in ref)
    print(f"causal={causal!s:5}: out, lse, dq, dk, dv within 1e-10 of naive_attention: {err < TOL}")
    assert err < TOL, (causal, err)

# %% [markdown]
# **The library's form.** `ringbook.distributed.ring_attention` is the same
# algorithm made general: every layout, autograd, a check that every rank
# agrees on the problem, deadlines on every wait, and `batch_isend_irecv` for
# the exchange. `ringbook.demo.ring_worker` runs it on each rank, forward and
# backward, for every layout, causal and not; its contiguous results must
# equal the loop above.

# %%
cases = [(layout, causal) for layout in LAYOUTS for causal in (False, True)]
results = spawn(ring_worker, w_ring, n_ring, cases, timeout=300.0)

print("layout      causal  within 1e-10 of naive_attention   (contiguous: and of the loop above)")
for layout, causal in cases:
    ref = reference(causal)
    got = {name: unshard([res["cases"][(layout, causal)][name] for res in results], layout,
                         dim=2 if name == "lse" else 1) for name in ref}
    ok = all((got[name] - ref[name]).abs().max().item() < TOL for name in ref)
    if layout == "contiguous":
        ok = ok and all((got[name] - mine[causal][name]).abs().max().item() < TOL for name in ref)
    print(f"{layout:11} {causal!s:6}  {ok}")
    assert ok, (layout, causal)

held = [res["bytes"] for res in results]
print(f"\nevery rank holds q, k, v shards of {held[0]['q, k, v shard']} bytes = 1/{w_ring} of the whole "
      f"{held[0]['whole q, k, v']} bytes:",
      all(h["q, k, v shard"] * w_ring == h["whole q, k, v"] for h in held))
assert all(h["q, k, v shard"] * w_ring == h["whole q, k, v"] for h in held)

# %% [markdown]
# **Exercise 02.5 · The ring backward** (harder). The backward half of the
# loop above, in one process, one head, no mask: q, k, v, out, dout `(n, d)`,
# lse `(n,)`, the *final* out and lse of the forward. Rank $r$ keeps its
# queries, out, lse, dout and a dQ accumulator; the K/V shards travel as in
# the forward, and each carries its dK/dV partial sums, which every rank it
# visits adds to. `block_backward(q_b, k_b, v_b, out_b, lse_b, dout_b)`
# returns one block's `(dq, dk, dv)`. Mind the final hop. Return the whole
# sequence's `(dq, dk, dv)`; the checker compares with autograd. First the
# helper on a single block that holds every key (batch 0, head 0 of the
# inputs above):

# %%
ref = reference(False)
one_block = block_backward(q[0, :, 0], k[0, :, 0], v[0, :, 0], ref["out"][0, :, 0], ref["lse"][0, 0], dout[0, :, 0])
print("block_backward over all keys == autograd:",
      all(torch.allclose(g, ref[name][0, :, 0], atol=TOL) for g, name in zip(one_block, ("dq", "dk", "dv"))))


# %%
def toy_ring_backward(q, k, v, out, lse, dout, w):
    """Gradients (dq, dk, dv), each (n, d), by a w-rank ring: dq stays home, dk/dv travel with their shard."""
    raise NotImplementedError


_ = check_toy_ring_backward(toy_ring_backward)

# %% [markdown]
# ## 6 · When the transfer hides: double buffering
#
# With two buffers, a step takes the longer of its compute and its transfer.
# Forward, no mask: a block costs $4 b h c^2 d$ FLOPs at rate $F$, while the
# next K/V shard, $2 b c h d$ elements of $e$ bytes, crosses the link at
# bandwidth $B$. The transfer is free when
#
# $$
# \frac{4 b h c^2 d}{F} \ge \frac{2 b c h d\, e}{B}
# \iff c \ge \frac{e F}{2 B} \quad (= F / B \text{ in bf16}),
# $$
#
# the condition of Liu et al. (2023, Table 2: about 1K tokens per device on
# A100s over NVLink, 24.5K over InfiniBand). Two refinements:
#
# * **causal, zigzag**: every step after the first computes two blocks of
#   $(c/2)^2$, **half** the FLOPs, for the same bytes: the threshold
#   **doubles**, $c \ge e F / B$;
# * **backward**: about 2.5× the forward FLOPs, while dK/dV ($g$ bytes per
#   element, float32) travel with K/V: $c \ge (e + g) F / (5 B)$, or
#   $1.2\,F/B$ in bf16; twice that causal.
#
# `ringbook.demo.ring_step_seconds(c, causal=..., backward=...)` is this
# model. Below, $F$ is the cuDNN rate measured at 131K in the committed H100
# file, and $B$ two nominal link rates (not measured here): NVLink 4 at
# 450 GB/s per direction and 400 Gb/s InfiniBand at 50 GB/s.

# %%
measured_h100 = PATHS.result("bench-nvidia-h100-80gb-hbm3-bfloat16.json")
if measured_h100 is not None:
    cudnn_131k = next(r for r in load_rows(measured_h100) if r["impl"] == "sdpa_cudnn" and r["seq_len"] == 131072
                      and not r["causal"] and r["status"] == "ok")
    F_H100 = cudnn_131k["tflops"] * 1e12
    print(f"F = {F_H100 / 1e12:.0f} TFLOP/s: cuDNN on the {cudnn_131k['device']}, bf16, 131K, from {measured_h100.name}")
else:
    F_H100 = 400e12
    print("F = 400 TFLOP/s, a nominal rate (the measured one is in the repository)")
LINKS = {"NVLink 4, 450 GB/s": 450e9, "InfiniBand 400 Gb/s, 50 GB/s": 50e9}
C_STEP = 4096
timeline = {}
for name, bw in LINKS.items():
    for causal in (False, True):
        t = ring_step_seconds(C_STEP, flops_per_s=F_H100, bytes_per_s=bw, causal=causal)
        hidden = t["transfer"] <= t["compute"]
        print(f"{name}, {'causal zigzag' if causal else 'no mask':13}: threshold c ≥ {t['threshold']:7,.0f} tokens; "
              f"at c = {C_STEP}: compute {t['compute'] * 1e3:.3f} ms, transfer {t['transfer'] * 1e3:.3f} ms "
              f"-> {'hidden' if hidden else 'the compute waits'}")
        if not causal:
            timeline[f"c = {C_STEP}, {name}"] = (t["compute"] * 1e3, t["transfer"] * 1e3)

# %%
plot_ring_timeline(4, timeline)

# %% [markdown]
# The four modes at once, forward and backward, without a mask and causal:
# on the left one step at $c$ = 4096, on the right compute (∝ $c^2$) and
# transfer (∝ $c$) against the shard length, crossing at each threshold.

# %%
plot_ring_overlap(C_STEP, F_H100 / 1e12, 450.0)

# %% [markdown]
# **Takeaway:** over NVLink a shard of about two thousand tokens hides its
# transfer even causal; over InfiniBand the ring waits on the network unless
# each rank holds about nine thousand tokens, twice as many with a causal
# mask (the thresholds printed above).
#
# Try your own hardware: the shard length $c$, the FLOP rate your kernel
# reaches (not the datasheet peak) and your link's bandwidth per direction.

# %% tags=["nbval-ignore-output"]
overlap = overlap_explorer(shard_len=4096, tflops=F_H100 / 1e12, gb_per_s=450)
_ = display(overlap)

# %% [markdown]
# **Exercise 02.6 · The overlap threshold of your hardware** (medium). Given
# the FLOP rate $F$ (FLOP/s), the link bandwidth $B$ (bytes/s), the bytes per
# element $e$ of K and V, and whether the mask is causal (zigzag), return
# the shard length $c$ at which one forward step's compute time equals its
# transfer time. Then put in your own numbers.

# %%
def overlap_threshold(flops_per_s, bytes_per_s, elem_bytes, causal):
    """The shard length c (tokens, a float) above which the next K/V shard arrives before the block is done."""
    raise NotImplementedError


_ = check_overlap_threshold(overlap_threshold)

# %% [markdown]
# **Summary.** The ring is exact because the merge (M) is associative and
# commutative; the layout decides the causal balance (zigzag: balanced and
# little wasted work; striped: balanced, but every tile is masked, not
# skipped); and a rank holds O(n / w) bytes, dominated at $d = 64$ by its
# score tile. The GPU benchmark (`ringbook.bench.dist_sweep`) measures the same
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
