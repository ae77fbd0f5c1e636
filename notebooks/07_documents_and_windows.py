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
# # 07 · Packed documents and sliding windows on the ring
#
# > **You will learn** why training packs documents into one sequence and what the document mask leaves to
# > compute; how a sliding window cuts attention to a band; which blocks of which ring step each rank can then
# > skip, read from the schedule; why zigzag stops balancing the work once documents are packed, and how the
# > per-document head-tail layout (PyTorch's `_PerDocumentHeadTailLoadBalancer`) restores it; how many K/V hops a
# > window needs, counted from the engine's plan; that the production ring with both masks is still exact; and
# > what it cost on a GPU beside two fused peers, measured.
# >
# > **You need** notebook 02 (the ring, its schedule, the layouts and their causal balance).
# >
# > **Exercises** 07.1–07.3: a block's kind under a document mask (§3); the work imbalance of a layout (§4);
# > the hops a window needs (§5).
# >
# > **Time** 50–70 minutes working alone, at a student's pace; executing it takes about 10 s on 2 CPU cores.
#
# Notebook 02's ring meets every K/V shard at every rank because, without a mask, every query needs every key.
# Two masks that training uses every day break that: **packed documents** (a query sees only its own document)
# and a **sliding window** (a query sees only the $W$ tokens up to it). Both make most of the score matrix
# empty, and a ring that knows the mask can skip whole blocks, whole steps and even whole hops. They also move
# the work around, so the layout that balanced a causal mask need not balance these.
#
# Notation, as in notebook 02: $w$ ranks, $n$ tokens, $c = n/w$ per rank; a packed sequence holds documents of
# lengths $L_1, \dots, L_D$ with $\sum_d L_d = n$; `document_ids` gives each token's document. Tensors are
# `b n h d`, lse `b h n`.

# %% jupyter={"source_hidden": true}
# Setup: ROOT is the ringbook clone (None outside one, e.g. on Colab), FIGURES its committed results,
# SAVE where this notebook's figures go: build/figures/, never the committed figures/ unless asked
# ($RINGBOOK_FIGURES_OUT, which `make sync-notebooks` sets). See ringbook/_paths.py.
from ringbook._paths import notebook_paths

PATHS = notebook_paths()
ROOT, FIGURES, SAVE = PATHS

# %%
import json
import math
import re

import torch
from IPython.display import display
from ipywidgets import Dropdown, IntSlider, Text, interactive

import ringbook
from ringbook import LAYOUTS, naive_attention, production_plan, production_ring_attention, ring_schedule, work_per_rank
from ringbook.exercises.masks import check_document_block, check_layout_imbalance, check_window_hops
from ringbook.masks import document_ids_from_cu_seqlens, keep, mask_spec
from ringbook.schedule import best_layout, head_tail_positions, layout_pieces, layout_positions, layout_report
from ringbook.viz.masks import (
    masked_timings,
    plot_layout_work,
    plot_mask_ring,
    plot_masked_timings,
    plot_window_hops,
    rank_work,
    ring_blocks,
)

torch.manual_seed(0)
torch.set_num_threads(1)
F64 = torch.float64  # exactness checks run in float64
TOL = 1e-10


def ids_of(lengths):
    """document_ids (n,) of documents of these lengths, packed one after the other."""
    return document_ids_from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()])


def error(got, want):
    return max((a - b).abs().max().item() for a, b in zip(got, want))


print("ringbook", ringbook.__version__)

# %% [markdown]
# ## 1 · Why pack documents
#
# A training batch is made of documents of very different lengths. Padding every document to the longest wastes
# the padded tokens' compute; **packing** concatenates documents into sequences of exactly $n$ tokens and adds a
# mask so that no token attends across a document boundary. Token $i$ of document $d(i)$ then sees key $j$ when
#
# $$
# \text{keep}(i, j) = \big[d(i) = d(j)\big] \wedge \big[j \le i\big]_{\text{causal}} ,
# \qquad
# \text{scores needed} = \sum_{d} L_d^2 \;\;\text{or, causal,}\;\; \sum_d \frac{L_d (L_d + 1)}{2} ,
# $$
#
# against $n^2$ (causal $n(n+1)/2$) for one document of length $n$. Packing is *exact*: a document attends
# exactly as it would alone. In `ringbook` the documents are given as `document_ids`, one non-decreasing id per
# token (`document_ids_from_cu_seqlens` converts the `cu_seqlens` of varlen kernels).
#
# **A toy version in plain torch**: the mask from the ids, attention with it, against each document attended on
# its own.

# %%
LENGTHS = [72, 16, 8, 32]  # one packed sequence of n = 128 tokens
ids = ids_of(LENGTHS)
n = ids.numel()
q, k, v = (torch.randn(1, n, 2, 8, dtype=F64) for _ in range(3))


def toy_packed_attention(q, k, v, ids, causal):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    seen = ids[:, None] == ids[None, :]
    if causal:
        seen &= j <= i
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[3] ** -0.5
    s = s.masked_fill(~seen, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v), torch.logsumexp(s, -1)


for causal in (False, True):
    packed = toy_packed_attention(q, k, v, ids, causal)
    alone = [naive_attention(q[:, ids == d], k[:, ids == d], v[:, ids == d], causal=causal) for d in range(len(LENGTHS))]
    alone = torch.cat([o for o, _ in alone], dim=1), torch.cat([lse for _, lse in alone], dim=2)
    library = naive_attention(q, k, v, causal=causal, document_ids=ids)
    print(f"causal={causal!s:5}: packed = each document alone: {error(packed, alone) < TOL}; "
          f"= naive_attention(document_ids=): {error(packed, library) < TOL}")
    assert error(packed, alone) < TOL and error(packed, library) < TOL

needed = sum(L * (L + 1) // 2 for L in LENGTHS)
print(f"documents {LENGTHS}: causal scores needed {needed} of {n * (n + 1) // 2} "
      f"({needed / (n * (n + 1) / 2):.0%} of one causal sequence of n = {n})")

# %% [markdown]
# ## 2 · The sliding window
#
# A **window** of $W$ tokens lets query $i$ see only keys $i - W < j \le i$: itself and the $W - 1$ before it
# (Longformer, Mistral; `ringbook` also takes a symmetric window $|i - j| < W$ without `causal`). The scores
# needed grow as $nW$ instead of $n^2/2$. Windows and documents combine: a key must be in the query's document
# *and* in its window. `ringbook.masks.keep` is the mask of any block, by token positions:

# %%
WINDOW = 20
pos = torch.arange(n)
band = keep(pos, pos, causal=True, window=WINDOW)
both = keep(pos, pos, causal=True, window=WINDOW, q_doc=ids[None], k_doc=ids[None])[0, 0]
print(f"window {WINDOW}: scores needed {int(band.sum())} of {n * (n + 1) // 2} causal; "
      f"with the documents too: {int(both.sum())}")
i, j = pos[:, None], pos[None, :]
assert torch.equal(band, (j <= i) & (i - j < WINDOW))
changed = error(naive_attention(q, k, v, causal=True, window=WINDOW, document_ids=ids),
                toy_packed_attention(q, k, v, ids, True))
print(f"the window changes the result by up to {changed:.2f}; a window of n changes nothing:")
assert error(naive_attention(q, k, v, causal=True, window=n, document_ids=ids),
             naive_attention(q, k, v, causal=True, document_ids=ids)) < TOL
print("  naive_attention(window=n) = naive_attention(): True")

# %% [markdown]
# ## 3 · The masks over the ring steps: which blocks a rank skips
#
# Notebook 02's schedule cut each step of each rank into blocks (its query pieces × the held K/V pieces) and
# called each one full, causal or skipped. With documents and windows `ring_schedule` uses four words:
# `"full"` (every pair seen: no mask needed), `"causal"` (only the causal mask cuts it), `"masked"` (a document
# or window boundary cuts it) and, in `skipped`, the **empty** blocks: no query of the block sees any key of it,
# so it is never computed. It decides from the ends of the pieces alone, because ids never decrease:
#
# $$
# \text{empty} \iff d(k_{\text{first}}) > d(q_{\text{last}}) \;\lor\; d(q_{\text{first}}) > d(k_{\text{last}})
# \;\lor\; \big(\text{causal} \wedge k_{\text{first}} > q_{\text{last}}\big) \;\lor\; \text{(window: the nearest
# pair is } \ge W \text{ apart)} .
# $$
#
# The zigzag schedule of our packed sequence on 4 ranks, one letter per block (f full, c causal, m masked,
# · empty):

# %%
W = 4
LETTER = {"full": "f", "causal": "c", "masked": "m"}


def show(schedule):
    print("step " + "".join(f"rank {r:<5}" for r in range(W)))
    for t, row in enumerate(schedule):
        cells = ["".join(LETTER[b.kind] for b in s.blocks) + "·" * len(s.skipped) for s in row]
        print(f"{t:4} " + "".join(f"{cell:10}" for cell in cells))


sched = ring_schedule(n, W, layout="zigzag", causal=True, document_ids=ids)
show(sched)
blocks_all = sum(len(s.blocks) + len(s.skipped) for row in sched for s in row)
empty = sum(len(s.skipped) for row in sched for s in row)
print(f"{empty} of {blocks_all} blocks empty; without documents: "
      f"{sum(len(s.skipped) for row in ring_schedule(n, W, layout='zigzag', causal=True) for s in row)}")

# %% [markdown]
# The same data as a picture. `ringbook.viz.masks.ring_blocks` classifies the blocks of *any* split of the
# tokens into per-rank pieces with the library's `classify` (§4 feeds it the pieces of a layout built per
# document); for the library's layouts it gives exactly the schedule's blocks:

# %%
def library_pieces(layout, n, w=W):
    """Each rank's pieces as position tensors: contiguous runs, or one strided run for striped."""
    return [[torch.arange(a, b, w if layout == "striped" else 1) for a, b in p] for p in layout_pieces(n, w, layout)]


for layout in LAYOUTS:
    for kwargs in ({"document_ids": ids}, {"window": WINDOW}, {"document_ids": ids, "window": WINDOW}):
        mine = ring_blocks(library_pieces(layout, n), causal=True, **kwargs)
        theirs = ring_schedule(n, W, layout=layout, causal=True, **kwargs)
        pos_r = layout_positions(n, W, layout)
        same = all(
            sorted((tuple(qp.tolist()), tuple(kp.tolist()), kind) for qp, kp, kind in mine[t][r] if kind != "empty")
            == sorted((tuple(pos_r[r][b.q[0]:b.q[1]].tolist()), tuple(pos_r[s.kv_rank][b.kv[0]:b.kv[1]].tolist()),
                       b.kind) for b in s.blocks)
            for t, row in enumerate(theirs) for r, s in enumerate(row))
        assert same and rank_work(mine, causal=True, **kwargs)[1] == work_per_rank(n, W, layout=layout, causal=True,
                                                                                  **kwargs)
print("ring_blocks = ring_schedule's blocks, and its computed work = work_per_rank, for every layout and mask")

# %% [markdown]
# Each cell of the score matrix in the colour of the rank that computes it; pale cells are computed inside a
# block and masked away; hatched cells lie in empty blocks, never computed. Thin lines are document boundaries.

# %%
fig_zigzag = plot_mask_ring(library_pieces("zigzag", n), causal=True, document_ids=ids,
                            title=f"zigzag, documents {LENGTHS}, causal, w = {W}")
fig_zigzag

# %% [markdown]
# **Takeaway:** the document mask empties most blocks, and a ring that reads it from the schedule never computes
# them. But look at the bars: rank 3 holds the end of the long first document and does far more than the others.
#
# **Exercise 07.1 · A block's kind under a document mask** (easy). Given a block's query range and key range
# (`(start, stop)`, each contiguous), the `(n,)` document ids and `causal`, return `"full"` (every query sees
# every key), `"empty"` (none does) or `"partial"`. Decide from the ends of the ranges, as the schedule does;
# the checker compares with the mask itself over several packings (documents of length 1, one document
# spanning every shard, a boundary on a shard boundary).

# %%
def document_block(q_range, k_range, document_ids, causal):
    """'full', 'partial' or 'empty' for the block of queries q_range and keys k_range."""
    raise NotImplementedError


_ = check_document_block(document_block)

# %% [markdown]
# ## 4 · Why zigzag no longer balances, and what does
#
# Zigzag gives rank $r$ chunks $r$ and $2w - 1 - r$ of the *sequence*, so that under a causal mask an early chunk
# (few keys) pairs with a late one (many keys). With packed documents a query's work is its position *inside its
# document*, not in the sequence, and zigzag's pairing means nothing: a long document where the sequence's late
# chunks fall gives their ranks more work. The fix is to apply zigzag to **every document**: cut each
# document into $2w$ chunks and give rank $r$ chunks $r$ and $2w-1-r$ of each. Each document is then balanced
# on its own, so the sum is too. That is PyTorch's `_PerDocumentHeadTailLoadBalancer` (in
# `torch.distributed.tensor.experimental._context_parallel._load_balancer`), which requires every document
# length to be a multiple of $2w$.
#
# The library deals it as the layout `"doc_headtail"`: `head_tail_positions(document_ids, w)` gives the positions
# each rank holds, `layout_pieces(n, w, "doc_headtail", document_ids)` its pieces, one per chunk, and
# `ring_schedule`, `work_per_rank` and `ring_attention` take it with the `document_ids` it is dealt from:

# %%
def pieces_of(layout, lengths):
    """Each rank's pieces as position tensors, for any layout (documents packed with these lengths)."""
    pieces = layout_pieces(sum(lengths), W, layout, ids_of(lengths))
    return [[torch.arange(a, b, W if layout == "striped" else 1) for a, b in p] for p in pieces]


print("rank 0 holds", layout_pieces(n, W, "doc_headtail", ids)[0])
assert torch.equal(head_tail_positions(ids, W), torch.stack([torch.cat(p) for p in pieces_of("doc_headtail", LENGTHS)]))
try:
    head_tail_positions(ids_of([72, 16, 4, 36]), W)
except ValueError as refusal:
    print("documents [72, 16, 4, 36]:", refusal)

# %% [markdown]
# The work per rank of each layout, for our documents. **Needed**: the (query, key) pairs the mask keeps, of the
# rank's queries; **computed**: the area of the blocks that are not empty (a partial block is computed whole
# and masked, as `work_per_rank` counts it). The imbalance is busiest / mean: the ring runs at the pace of the
# busiest rank. We count from our blocks, and check against the library's `layout_report`, which counts the same
# for every layout that fits the mask (`best_layout` picks the one whose busiest rank computes least):

# %%
LAYOUTS_07 = (*LAYOUTS, "doc_headtail")
needed, computed = {}, {}
report = layout_report(n, W, causal=True, document_ids=ids)
print(f"{'layout':12} {'needed per rank':>26} {'busiest/mean':>13} {'computed per rank':>27} {'busiest/mean':>13}")
for layout in LAYOUTS_07:
    blocks = ring_blocks(pieces_of(layout, LENGTHS), causal=True, document_ids=ids)
    needed[layout], computed[layout] = rank_work(blocks, causal=True, document_ids=ids)
    imb = [max(x) / (sum(x) / W) for x in (needed[layout], computed[layout])]
    print(f"{layout:12} {str(needed[layout]):>26} {imb[0]:13.2f} {str(computed[layout]):>27} {imb[1]:13.2f}")
    assert report[layout].needed == tuple(needed[layout]) and report[layout].computed == tuple(computed[layout])
assert len({sum(x) for x in needed.values()}) == 1  # every layout needs the same scores in all
print("layout_report counts the same; best_layout:", best_layout(n, W, causal=True, document_ids=ids))

# %%
fig_work = plot_layout_work(needed, computed, title=f"documents {LENGTHS}, causal, w = {W}: needed (solid) and "
                            "computed (pale) per rank")
fig_work

# %% jupyter={"source_hidden": true}
# Saved for the README and the docs (hidden in JupyterLab).
fig_work.savefig(SAVE / "07_documents_and_windows.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# Read the table above: contiguous and zigzag leave their busiest rank with far more than the mean, because the
# long first document's late tokens land on one or two ranks. Striped spreads every document over every rank, so
# its *needed* work is nearly even, but its strided pieces cross every document boundary, no block is ever
# empty, and it computes the whole matrix. Head-tail balances both, and skips nearly all it does not need.
#
# The same head-tail picture as the zigzag one above:

# %%
fig_head_tail = plot_mask_ring(pieces_of("doc_headtail", LENGTHS), causal=True, document_ids=ids,
                               title=f"head-tail per document, documents {LENGTHS}, causal, w = {W}")
fig_head_tail

# %% [markdown]
# **Takeaway:** balance the work the *mask* leaves. For packed documents that is zigzag inside each document
# (head-tail), not across the sequence. Its price: documents must be cut into $2w$ equal chunks (lengths
# multiples of $2w$, or padded to one), and a rank's pieces are many small ones, which a real kernel
# runs as one varlen call rather than block by block.
#
# **Exercise 07.2 · The work imbalance of a layout** (medium). Given the positions each rank holds
# (`(w, c)`, any layout), the `(n,)` document ids and `causal`, return busiest / mean of the scores each rank
# needs (float). The checker runs contiguous, zigzag, striped and doc_headtail over several packings.

# %%
def layout_imbalance(positions, document_ids, causal):
    """max over ranks / mean over ranks of the (query, key) pairs the mask keeps, per rank's queries."""
    raise NotImplementedError


_ = check_layout_imbalance(layout_imbalance)

# %% [markdown]
# ## 5 · The window's skipped hops
#
# With a causal window of $W$ tokens and contiguous shards, the first query of rank $r$, at position $rc$, reaches
# furthest back: to key $rc - W + 1$, which lies $\lceil (W - 1)/c \rceil$ shards before rank $r$'s own. No rank
# needs a shard further back, so after that many hops the ring can stop: the later steps are empty on every
# rank, and the K/V they would have carried are never sent.
#
# $$
# \text{hops} = \min\!\Big(w - 1,\; \Big\lceil \frac{W - 1}{c} \Big\rceil\Big)
# $$
#
# (a window of $W = c + 1$ needs one hop, not two: the often-quoted $\lceil W/c \rceil$ is one too many whenever
# $c$ divides $W - 1$). The engine's plan (`production_plan`) drops the steps nobody needs; here are its
# launches per step for a few windows (the cut blocks of neighbouring ranks over the same rows share one launch,
# one kernel call over all their pieces), and the hops read from it:

# %%
N_HOPS, C_HOPS = 64, 64 // W


def plan_hops(layout, window):
    plan = production_plan(N_HOPS, W, layout=layout, causal=True, mask=mask_spec(True, None, window))
    return max((t for t, launches in enumerate(plan) if launches), default=0), [len(s) for s in plan]


print(f"n = {N_HOPS}, w = {W}, c = {C_HOPS}")
for window in (1, C_HOPS, C_HOPS + 1, C_HOPS + 2, 2 * C_HOPS + 1, N_HOPS):
    bound = min(W - 1, math.ceil((window - 1) / C_HOPS))
    (hops, launches), (z_hops, z_launches) = plan_hops("contiguous", window), plan_hops("zigzag", window)
    print(f"W = {window:3}: contiguous launches per step {str(launches):14} hops {hops}   "
          f"⌈(W−1)/c⌉ bound {bound}   ⌈W/c⌉ {min(W - 1, math.ceil(window / C_HOPS))}   "
          f"zigzag launches {str(z_launches):14} hops {z_hops}")
    assert hops == bound

# %% [markdown]
# For every window from 1 to past $n$ (the grey lines mark $W = kc + 2$, where hop $k + 1$ starts: $W = kc + 1$
# still reaches back only $k$ shards):

# %%
windows = list(range(1, N_HOPS + 9))
hops = {layout: [plan_hops(layout, x)[0] for x in windows] for layout in ("contiguous", "zigzag")}
bound = [min(W - 1, math.ceil((x - 1) / C_HOPS)) for x in windows]
assert hops["contiguous"] == bound
fig_hops = plot_window_hops(windows, hops, bound, shard_len=C_HOPS, ring_size=W)
for layout in ("contiguous", "zigzag"):
    need, comp = rank_work(ring_blocks(library_pieces(layout, N_HOPS), causal=True, window=C_HOPS), causal=True,
                           window=C_HOPS)
    print(f"window {C_HOPS}, {layout:10}: needed per rank {need}, computed per rank {comp}")
fig_hops

# %% [markdown]
# **Takeaway:** with contiguous shards a window takes only the hops it reaches; `ringbook.distributed.ring_attention`
# stops its ring after the same last step. Zigzag is the wrong layout for a window's *traffic*: a rank's late
# chunk needs the chunk just before it, which lives on the *next* rank, $w - 1$ hops round the ring, so every
# window above one token takes every hop (the zigzag column of the printout above). Its *work* is another
# matter (the two lines printed above the figure): contiguous shards balance the scores the window needs,
# apart from rank 0, whose first queries have fewer than $W - 1$ keys before them, while zigzag's half-size
# blocks skip more finely and compute less. Which costs more, the hops or the masked work, depends on the
# link and the kernel.
#
# **Exercise 07.3 · The hops a window needs** (easy). Return the number of K/V hops a causal window of `window`
# tokens needs on `world` ranks with contiguous shards of `n / world`. The checker compares with the last
# non-empty step of `production_plan`.

# %%
def window_hops(n, world, window):
    """How many times the K/V shards must move one rank on, for a causal window (contiguous layout)."""
    raise NotImplementedError


_ = check_window_hops(window_hops)

# %% [markdown]
# ## 6 · The production ring with documents and a window, checked
#
# `production_ring_attention` runs the plan: empty blocks are never launched, steps nobody needs are dropped,
# full blocks keep the fused kernels and blocks a boundary cuts run with their mask. Against
# `naive_attention` with the same mask, in float64, for both its layouts, several ring sizes, causal and not, with
# random document lengths (a document of length 1 among them) and windows below, at and above a shard:

# %%
N_CHECK = 48
lengths = [1, 13, 6, 20, 8]  # 48 tokens, a document of length 1
check_ids = ids_of(lengths)
qc, kc, vc = (torch.randn(2, N_CHECK, 2, 8, dtype=F64) for _ in range(3))
worst, runs = 0.0, 0
for layout in ("contiguous", "zigzag"):
    for ring_size in (1, 2, 4):
        for causal in (False, True):
            for window in (None, 1, 5, 12, 30):
                kwargs = {"causal": causal, "document_ids": check_ids, "window": window}
                got = production_ring_attention(qc, kc, vc, ring_size=ring_size, layout=layout, **kwargs)
                worst = max(worst, error(got, naive_attention(qc, kc, vc, **kwargs)))
                runs += 1
print(f"{runs} runs (2 layouts × ring sizes 1, 2, 4 × causal or not × 5 windows), documents {lengths}: "
      f"largest difference from naive_attention {worst:.1e}")
assert worst < TOL

# %% [markdown]
# The production ring takes the per-document head-tail layout of §4 too (`layout="doc_headtail"`, every document
# a multiple of $2w$ tokens): a rank's whole shard against each held one is then one masked block, in which
# each document's keys sit in two runs (its head and its tail chunk), and the variable-length kernel meets them
# in two passes merged by equation (M). Exact as well:

# %%
ht_lengths = [8, 16, 24]  # multiples of 2w for w = 2 and 4
ht_ids = ids_of(ht_lengths)
worst_ht = 0.0
for ring_size in (2, 4):
    for causal in (False, True):
        for window in (None, 5, 30):
            kwargs = {"causal": causal, "document_ids": ht_ids, "window": window}
            got = production_ring_attention(qc, kc, vc, ring_size=ring_size, layout="doc_headtail", **kwargs)
            worst_ht = max(worst_ht, error(got, naive_attention(qc, kc, vc, **kwargs)))
print(f"doc_headtail, documents {ht_lengths}, ring sizes 2 and 4, causal or not, 3 windows: largest difference "
      f"{worst_ht:.1e}")
assert worst_ht < TOL

# %% [markdown]
# ### 6b · What it costs on a GPU, measured
#
# Skipping is only worth it if what is left runs fast. `tools/gpu_masked.py` times `production_ring_attention`
# with each mask on one GPU (all ranks played in one process) beside two peers that compute the same masked
# attention over the whole sequence in one fused call, in the same run: `flex_attention` with a `BlockMask`, and
# `varlen_attn` (FlashAttention's variable-length kernel, the one the ring runs on the blocks a boundary cuts),
# with cuDNN's dense causal call as what not skipping would cost. The committed file says which code, device and
# versions produced it:

# %%
masked_path = PATHS.result("masks/gpu-masked-peers-h100.json")
if masked_path is not None:
    masked_run = json.loads(masked_path.read_text())
    masked_table = masked_timings(masked_run)
    print(f"{masked_run['env']['device']}, PyTorch {masked_run['env']['torch_version']}, ringbook at "
          f"{masked_run['code']['ringbook_commit']}, bf16, b=1 h=8 d=64, causal")
    for (mask, n, mode), ms in masked_table.items():
        peer = min(ms[p] for p in ("flex", "varlen") if p in ms)
        rings = "  ".join(f"{c}: {v:6.2f} ms ({v / peer:4.1f}× the faster peer)" for c, v in ms.items()
                          if c.startswith("ring "))
        print(f"{mask:>10} {n:,} {mode:7}  flex {ms.get('flex', float('nan')):6.2f} ms  varlen "
              f"{ms.get('varlen', float('nan')):6.2f} ms  dense {ms.get('dense_upper_bound', float('nan')):7.2f} ms  "
              f"{rings}")
    fig = plot_masked_timings(masked_table, title="documents and a window at 131K: ringbook's ring against one "
                              "fused call over the whole sequence")
    fig.savefig(SAVE / "07_masked_gpu.png", dpi=110, metadata={"Software": None})
    display(fig)

# %% [markdown]
# Skipping pays: every masked call is far below the dense one. But the ring in this run is 3–23× slower than the
# peers, although its cut blocks run on `varlen_attn`'s own kernel: the time goes elsewhere. A profile of the
# same masked code on an H100 (`figures/masks/profile-masked-h100.json`) found most of it on the host: 17–32 ms per
# call scanning the document ids with torch's CPU ops. That scan, the copies around each cut block and the launch
# per rank have been replaced since (see the notes in `docs/results.md`); the ring has not been measured again yet.
# The target the project set itself is within 1.1× of the faster peer. Until a run shows it, read these bars as
# what the engine cost at that commit, not today.

# %% [markdown]
# ## 7 · Try it: documents, a window, a layout
#
# Type the document lengths (in units of $2w = 8$ tokens, so every layout, head-tail included, applies: `9, 2,
# 1, 4` is our 72, 16, 8 and 32), move the window (0: none) and switch the layout. Watch which blocks turn
# empty, and how the bars of the busiest rank move.

# %%
UNIT = 2 * W


def draw(window, documents, layout):
    lengths = [UNIT * int(x) for x in re.findall(r"\d+", documents) if int(x) > 0] or [UNIT]
    fig = plot_mask_ring(pieces_of(layout, lengths), causal=True, document_ids=ids_of(lengths),
                         window=window or None, title=f"{layout}, documents {lengths}, window {window or 'none'}")
    display(fig)
    return fig


# %% tags=["nbval-ignore-output"]
mask_explorer = interactive(draw, window=IntSlider(0, 0, 64, 1, description="window"),
                            documents=Text("9, 2, 1, 4", description="lengths ÷ 8", continuous_update=False),
                            layout=Dropdown(options=list(LAYOUTS_07), value="zigzag", description="layout"))
_ = display(mask_explorer)

# %% [markdown]
# **Summary.** Packing keeps attention inside documents; a window keeps it inside a band. Both leave most
# blocks of the ring empty, and the schedule says which ones from the ends of the pieces alone, so they are never
# computed. The work that is left is no longer where zigzag expects it: per-document head-tail balances packed
# documents, contiguous shards suit a window, and a window needs only $\min(w-1, \lceil (W-1)/c \rceil)$ hops.

# %% [markdown]
# **References.** Krell et al. (2021), [Efficient Sequence Packing without Cross-contamination](https://arxiv.org/abs/2107.02027);
# Beltagy, Peters & Cohan (2020), [Longformer](https://arxiv.org/abs/2004.05150) (sliding windows); PyTorch's
# context parallel load balancers (`_PerDocumentHeadTailLoadBalancer`, `_PTRRLoadBalancer`) in
# `torch/distributed/tensor/experimental/_context_parallel/_load_balancer.py`; MagiAttention (SandAI, 2025)
# for mask-aware dispatch; the varlen interfaces of [ring-flash-attention](https://github.com/zhuzilin/ring-flash-attention).

# %% [markdown]
# > **What to remember**
# >
# > * Packed documents: a query sees its own document only; scores needed $\sum_d L_d^2$, not $n^2$.
# > * A block is empty when its queries and keys share no document (or, causal, every key follows every query,
# >   or the window cannot reach): the schedule skips it from the ends of the pieces alone.
# > * Zigzag balances one causal sequence; for packed documents zigzag *each document* (head-tail).
# > * A causal window over contiguous shards needs $\min(w-1, \lceil (W-1)/c \rceil)$ hops; zigzag needs them all.
