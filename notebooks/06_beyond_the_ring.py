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
# # 06 · Beyond the ring: all-gather, Ulysses and the hybrid
#
# > **You will learn** the three other ways to spread attention over $w$ ranks that the field uses beside the
# > ring — all-gather of K/V (Llama 3, PyTorch's default), Ulysses' all-to-all from sequence to heads
# > (DeepSpeed) and the 2-D hybrid (USP): what each one moves at each step, as an equation and as data; why
# > each is exact; what constrains it (heads divisible by the ranks, grouped-query attention); and how they
# > compare in bytes and memory per rank.
# >
# > **You need** notebook 02 (the ring, its schedule and layouts); notebook 01's merge (M) helps.
# >
# > **Exercises** 06.1–06.3: Ulysses' head split and its constraint (§3); the bytes each step sends (§3);
# > the hybrid's groups (§4).
# >
# > **Time** 50–70 minutes working alone, at a student's pace; executing it takes about 10 s on 2 CPU cores.
#
# Ring attention (notebook 02) is one answer to "the sequence does not fit on one device". It is not the only
# one, and often not the one production systems pick: PyTorch's context parallelism all-gathers K/V by default
# (the method of the Llama 3 paper), DeepSpeed-Ulysses re-shards from sequence to heads with all-to-all, and
# yunchang (USP), TransformerEngine, Megatron and LoongTrain combine Ulysses inside a node with a ring across
# nodes. Which one is fastest depends on the heads, the kv heads, the links and the sequence length; what each
# one *moves* can be counted exactly, and that is what this notebook does.
#
# Notation, as in notebook 02: $w$ ranks, $n$ tokens, $c = n/w$ per rank; $h$ query heads, $g$ kv heads
# (grouped-query attention: query head $i$ reads kv head $\lfloor i / (h/g) \rfloor$), head dim $d$, $e$
# bytes per element. Tensors are `b n h d`, lse `b h n`.

# %% jupyter={"source_hidden": true}
# Setup: ROOT is the ringbook clone (None outside one, e.g. on Colab), FIGURES its committed results,
# SAVE where this notebook's figures go: build/figures/, never the committed figures/ unless asked
# ($RINGBOOK_FIGURES_OUT, which `make sync-notebooks` sets). See ringbook/_paths.py.
from ringbook._paths import notebook_paths

PATHS = notebook_paths()
ROOT, FIGURES, SAVE = PATHS

# %%
import json

import torch
from einops import repeat
from IPython.display import display

import ringbook
from ringbook import (
    LAYOUTS,
    allgather_attention,
    naive_attention,
    ring_attention,
    strategy_schedule,
    ulysses_attention,
    usp_attention,
)
from ringbook.exercises.strategies import check_step_bytes, check_ulysses_heads, check_usp_groups
from ringbook.strategies import Wire, bytes_sent, head_split, lcm_heads
from ringbook.viz.strategies import plot_bytes_per_rank, plot_strategy_engine_cost, plot_strategy_schedule

torch.manual_seed(0)
torch.set_num_threads(1)
F64 = torch.float64  # exactness checks run in float64
TOL = 1e-10


def reference(q, k, v, causal=False):
    """naive_attention with the kv heads repeated for grouped-query attention (q head i reads kv head i // (h/g))."""
    r = q.shape[2] // k.shape[2]
    return naive_attention(q, repeat(k, "b n g d -> b n (g r) d", r=r), repeat(v, "b n g d -> b n (g r) d", r=r),
                           causal=causal)


def error(got, want):
    return max((a - b).abs().max().item() for a, b in zip(got, want))


print("ringbook", ringbook.__version__)

# %% [markdown]
# ## 1 · One footing for four strategies: the schedule as data
#
# Notebook 02's `ring_schedule` says which blocks each rank computes at each step. `strategy_schedule` adds
# the other half: at each step, which **messages** travel — sender, receiver, bytes, and what they carry
# (`"K/V"`, `"q"`, `"out"`, `"lse"`; in the backward `"dK/dV"`, `"dout"`, `"dq"`, `"dlse"`). The ring, in
# these terms, sends one K/V shard to the next rank after every step but the last:
#
# $$
# \text{ring, per hop: } 2\,c\,g\,d\,e \text{ bytes}, \qquad
# \text{per rank per forward: } (w - 1)\cdot 2\,c\,g\,d\,e .
# $$
#
# The problem used for the printed schedules: 1024 tokens, 8 query heads, 2 kv heads, $d = 64$, bfloat16
# ($e = 2$), causal, 4 ranks.

# %%
W = 4
PROBLEM = {"heads": 8, "kv_heads": 2, "head_dim": 64, "dtype_bytes": 2, "causal": True}
N_SHOW = 1024


def describe(schedule):
    for st in schedule:
        kinds = sorted({m.what for m in st.messages})
        sent = bytes_sent([st], W)
        busy = sum(1 for wk in st.work if wk.scores)
        print(f"  {st.phase} step {st.step}: {st.collective or 'compute only':14} {len(st.messages):2} messages "
              f"{', '.join(kinds):14} bytes per rank {sent}   ranks computing: {busy}")


ring = strategy_schedule("ring", N_SHOW, W, layout="zigzag", **PROBLEM)
describe(ring)
c, g, d, e = N_SHOW // W, PROBLEM["kv_heads"], PROBLEM["head_dim"], PROBLEM["dtype_bytes"]
assert bytes_sent(ring, W) == [(W - 1) * 2 * c * g * d * e] * W

# %% [markdown]
# ## 2 · All-gather K/V (Llama 3)
#
# **Why.** The ring needs $w-1$ dependent hops and a careful layout to balance causal work. If K/V are small —
# and with grouped-query attention they are: Llama 3 70B has $h = 64$ and $g = 8$, so K/V are a quarter of
# the bytes of q — one collective can simply give **every rank the whole K/V**. Each rank then attends its own
# queries to all keys with any mask it likes (causal, documents, windows), in one kernel call. While the
# gather is in flight the rank can already attend its own K/V shard (the diagonal block); the rest follows.
#
# $$
# \text{all-gather, per rank per forward: } \frac{w-1}{w}\cdot 2\,n\,g\,d\,e = (w-1)\cdot 2\,c\,g\,d\,e ,
# $$
#
# the same bytes as the ring, in one collective instead of $w - 1$ hops; the price is memory: every rank holds
# K/V of the whole sequence, $2\,n\,g\,d\,e$, which grows with $n$, not $n/w$. The backward gathers K/V again
# and **reduce-scatters** dK/dV: every rank sends each other rank its partial gradient of that rank's shard.
#
# **A toy version in plain torch**, four ranks played in turn, contiguous layout, grouped-query attention:

# %%
n, h, g, d = 24, 4, 2, 8
q, k, v = (torch.randn(2, n, heads, d, dtype=F64) for heads in (h, g, g))


def toy_allgather(q, k, v, w, causal):
    c = q.shape[1] // w
    shards = [(q[:, r * c:(r + 1) * c], k[:, r * c:(r + 1) * c], v[:, r * c:(r + 1) * c]) for r in range(w)]
    k_all = torch.cat([s[1] for s in shards], dim=1)  # the all-gather: every rank ends with these
    v_all = torch.cat([s[2] for s in shards], dim=1)
    k_all, v_all = (repeat(x, "b n g d -> b n (g r) d", r=q.shape[2] // x.shape[2]) for x in (k_all, v_all))
    outs, lses = [], []
    for r, (q_r, _, _) in enumerate(shards):
        s = torch.einsum("bihd,bjhd->bhij", q_r, k_all) * q.shape[3] ** -0.5
        if causal:  # query position r·c + i sees key position j ≤ r·c + i
            s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(r * c, (r + 1) * c)[:, None], float("-inf"))
        outs.append(torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v_all))
        lses.append(torch.logsumexp(s, -1))
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


for causal in (False, True):
    err = error(toy_allgather(q, k, v, 4, causal), reference(q, k, v, causal))
    print(f"toy all-gather, causal={causal!s:5}: within 1e-10 of naive_attention: {err < TOL}")
    assert err < TOL

# %% [markdown]
# **The library's form**, `ringbook.allgather_attention`, is the same made general: every layout of notebook 02
# (zigzag balances the causal work, because rank $r$'s queries then see as many keys as every other rank's),
# blocks computed from the schedule (a block no query sees is skipped), and a `Wire` that records every message
# it hands from one rank to another, so we can hold the schedule against what was really moved:

# %%
for layout in LAYOUTS:
    for causal in (False, True):
        wire = Wire()
        got = allgather_attention(q, k, v, ring_size=4, causal=causal, layout=layout, wire=wire)
        sched = strategy_schedule("allgather", n, 4, heads=h, kv_heads=g, head_dim=d, dtype_bytes=8, causal=causal,
                                  layout=layout, batch=2)
        moved = sorted(m[1:] for m in wire.log)
        planned = sorted((m.src, m.dst, m.what, m.nbytes) for st in sched for m in st.messages)
        ok = error(got, reference(q, k, v, causal)) < TOL and moved == planned
        print(f"{layout:11} causal={causal!s:5}: exact, and moved exactly what the schedule says: {ok}")
        assert ok

# %% [markdown]
# Who sends what: on the left of each step the senders, on the right the receivers; an arrow is a message,
# coloured by what it carries, wider when it is bigger. A ringed rank computes during that step: all-gather
# attends the diagonal block while the gather is in flight, then the rest.

# %%
fig_ag = plot_strategy_schedule(strategy_schedule("allgather", N_SHOW, W, layout="zigzag", **PROBLEM), W,
                                title="all-gather K/V, w = 4, 8 query heads, 2 kv heads, causal zigzag")
fig_ag

# %% [markdown]
# **Takeaway:** all-gather sends what the ring sends, in one collective, and pays for it in memory: K/V of the
# whole sequence on every rank.

# %% [markdown]
# ## 3 · Ulysses: from sequence shards to head shards (DeepSpeed)
#
# **Why.** Heads never talk to each other inside attention. So instead of moving keys to queries, re-shard: an
# **all-to-all** gives rank $r$ *every token* of heads $r\frac{h}{w}, \dots, (r+1)\frac{h}{w} - 1$; each rank
# runs ordinary attention over the whole sequence for its heads (any kernel, any mask), and a second all-to-all
# brings the output back to the sequence shards. In an all-to-all every rank sends $\frac{w-1}{w}$ of what it
# holds:
#
# $$
# \text{Ulysses, per rank per forward: }
# \underbrace{\tfrac{w-1}{w}\,c\,d\,e\,(h + 2g')}_{\text{q, K/V to heads}} +
# \underbrace{\tfrac{w-1}{w}\,c\,d\,e\,h}_{\text{out back}}
# = \tfrac{w-1}{w}\,\tfrac{n}{w}\,d\,e\,(2h + 2g') ,
# $$
#
# plus the lse ($\frac{w-1}{w} c\,h$ floats) when the caller wants it. Per rank this *shrinks* as $w$ grows at
# fixed $n$; the ring's and all-gather's grow towards $2ngde$. Two constraints: $w$ must divide $h$ (a rank gets
# whole heads), and a rank must receive the kv heads its query heads read. When $g < w$ there are not enough kv
# heads to go round: they are **replicated** to $g' = \max(g, w)$ before the all-to-all (as DeepSpeed's ALST
# does; in general $g' = \mathrm{lcm}(g, w)$), so K/V cost $g'/g$ times more on the wire and in memory — with
# $g = 1$ and $w = 8$, eight times.
#
# **A toy version in plain torch**: the all-to-all is a list of messages, `parts[src][dst]`.

# %%
def toy_ulysses(q, k, v, w, causal):
    c, hq, hk = q.shape[1] // w, q.shape[2] // w, k.shape[2] // w  # here w divides g: no replication
    # rank src holds tokens src·c … ; it cuts its heads into w slices, one per receiver
    parts = [[tuple(x[:, src * c:(src + 1) * c, dst * hx:(dst + 1) * hx] for x, hx in ((q, hq), (k, hk), (v, hk)))
              for dst in range(w)] for src in range(w)]
    outs, lses = [], []
    for dst in range(w):  # rank dst: every token of its heads
        q_d, k_d, v_d = (torch.cat([parts[src][dst][i] for src in range(w)], dim=1) for i in range(3))
        k_d, v_d = (repeat(x, "b n g d -> b n (g r) d", r=hq // hk) for x in (k_d, v_d))
        s = torch.einsum("bihd,bjhd->bhij", q_d, k_d) * q.shape[3] ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v_d))
        lses.append(torch.logsumexp(s, -1))
    # the second all-to-all: rank dst returns token shard src of its heads to rank src; here we just re-assemble
    return torch.cat(outs, dim=2), torch.cat(lses, dim=1)


for causal in (False, True):
    err = error(toy_ulysses(q, k, v, 2, causal), reference(q, k, v, causal))
    print(f"toy Ulysses, w = 2, causal={causal!s:5}: within 1e-10 of naive_attention: {err < TOL}")
    assert err < TOL

# %% [markdown]
# **The library's form**, `ringbook.ulysses_attention`, replicates kv heads when it must and refuses a ring
# size that does not divide the heads, saying which would work:

# %%
for w in (1, 2, 4):
    for g_try in (4, 2, 1):
        k_g, v_g = k[:, :, :g_try], v[:, :, :g_try]
        for causal in (False, True):
            assert error(ulysses_attention(q, k_g, v_g, ring_size=w, causal=causal),
                         reference(q, k_g, v_g, causal)) < TOL
print("ulysses_attention: exact for w = 1, 2, 4 with 4, 2 and 1 kv heads (replicated when fewer than w)")
try:
    ulysses_attention(q, k, v, ring_size=3)
except ValueError as exc:
    print("refused:", exc)

# %% [markdown]
# Which heads a rank gets, with their kv heads in the original numbering (a replica shows as its original):

# %%
for heads, kv_heads, w in ((8, 8, 4), (8, 2, 4), (8, 1, 8)):
    split = head_split(heads, kv_heads, w)
    print(f"h = {heads}, g = {kv_heads}, w = {w}, g' = {lcm_heads(kv_heads, w)}: "
          + "; ".join(f"rank {r}: q {qh} kv {kh}" for r, (qh, kh) in enumerate(split[:3])) + " …")

# %% [markdown]
# **Exercise 06.1 · Ulysses' head split** (easy). Return the query heads and the kv heads (original numbering,
# one entry per head received) that Ulysses rank `rank` attends, or raise `ValueError` when `world` ranks cannot
# share the heads. The cases have `kv_heads` and `world` dividing one another.

# %%
def ulysses_heads(heads, kv_heads, world, rank):
    """([query heads], [kv heads]) of Ulysses rank `rank`; ValueError if the heads cannot be split."""
    raise NotImplementedError


_ = check_ulysses_heads(ulysses_heads)

# %% [markdown]
# **Exercise 06.2 · The bytes of each step** (medium). For `"ring"`, `"allgather"` and `"ulysses"`, return the
# bytes one rank sends at each forward step that sends anything (batch 1; count q, K/V and out, leave the lse
# out). The checker compares with `strategy_schedule`.

# %%
def step_bytes(strategy, n, world, heads, kv_heads, head_dim, elem_bytes):
    """[bytes sent at each step that sends], for one rank."""
    raise NotImplementedError


_ = check_step_bytes(step_bytes)

# %% [markdown]
# The picture of the two all-to-alls (w = 4, 8 query heads, 2 kv heads replicated to 4): every rank sends to
# every other rank, first q and K/V, then out and the lse; nothing moves while it computes.

# %%
fig_ul = plot_strategy_schedule(strategy_schedule("ulysses", N_SHOW, W, **PROBLEM), W,
                                title="Ulysses, w = 4, 8 query heads, 2 kv heads (replicated to 4), causal")
fig_ul

# %% [markdown]
# **Takeaway:** Ulysses moves a constant volume per rank as $w$ and $n$ grow together, but it stops at $w = h$
# and pays $g'/g$ for grouped-query attention, and nothing overlaps its all-to-alls in the plain form.

# %% [markdown]
# ## 4 · The hybrid: Ulysses inside a group, the ring across groups (USP)
#
# **Why.** Ulysses cannot use more ranks than heads, and its all-to-alls want fast links (inside a node); the
# ring works at any $w$ and overlaps its hops with compute (across nodes). The 2-D hybrid takes $w = u \cdot r$:
# **Ulysses groups** of $u$ consecutive ranks, and **ring groups** joining the same member of every Ulysses
# group. The layout of notebook 02 deals the tokens to the $r$ groups; inside a group, member $j$ holds the
# $j$-th $n/w$ of the group's chunk. An all-to-all inside each group gives member $j$ the whole chunk for heads
# $j\frac{h}{u} \dots$; a ring of $r$ steps across groups passes K/V chunks of those heads; an all-to-all brings
# the output back.
#
# $$
# \text{USP } u \times r\text{, per rank per forward: }
# \tfrac{u-1}{u}\,\tfrac{n}{w}\,d\,e\,(2h + 2g') + (r-1)\cdot 2\,\tfrac{n}{r}\,\tfrac{g'}{u}\,d\,e,
# \qquad g' = \mathrm{lcm}(g, u) .
# $$
#
# $u = 1$ is the ring, $u = w$ is Ulysses; only $u$ must divide $h$.
#
# **Exercise 06.3 · The hybrid's groups** (easy). Return the ranks of `rank`'s Ulysses group and of its ring
# group, each ascending.

# %%
def usp_groups(world, ulysses_size, rank):
    """([ranks of its Ulysses group], [ranks of its ring group])."""
    raise NotImplementedError


_ = check_usp_groups(usp_groups)

# %% [markdown]
# The library's form, `ringbook.usp_attention`, for every split of 4 ranks and every layout; $u = 1$ must equal
# notebook 02's `ring_attention`:

# %%
for u in (1, 2, 4):
    for layout in LAYOUTS:
        for causal in (False, True):
            wire = Wire()
            got = usp_attention(q, k, v, ring_size=4, ulysses_size=u, causal=causal, layout=layout, wire=wire)
            sched = strategy_schedule("usp", n, 4, heads=h, kv_heads=g, head_dim=d, dtype_bytes=8, causal=causal,
                                      layout=layout, ulysses_size=u, batch=2)
            assert error(got, reference(q, k, v, causal)) < TOL
            assert sorted(m[1:] for m in wire.log) == sorted(
                (m.src, m.dst, m.what, m.nbytes) for st in sched for m in st.messages)
    print(f"usp {u} × {4 // u}: exact for every layout, causal and not; moved what the schedule says")
q_mha, k_mha, v_mha = (torch.randn(1, n, 4, d, dtype=F64) for _ in range(3))
assert error(usp_attention(q_mha, k_mha, v_mha, ring_size=4, ulysses_size=1, causal=True, layout="zigzag"),
             ring_attention(q_mha, k_mha, v_mha, ring_size=4, causal=True, layout="zigzag")) < TOL
try:
    usp_attention(q, k, v, ring_size=4, ulysses_size=3)
except ValueError as exc:
    print("refused:", exc)

# %% [markdown]
# 2 × 2: an all-to-all inside each pair (0, 1) and (2, 3), one ring hop between the pairs (0 → 2, 1 → 3, and
# back), the all-to-all back.

# %%
fig_usp = plot_strategy_schedule(strategy_schedule("usp", N_SHOW, W, layout="zigzag", ulysses_size=2, **PROBLEM),
                                 W, title="USP 2 × 2, 8 query heads, 2 kv heads, causal zigzag")
fig_usp

# %% [markdown]
# ## 5 · Side by side
#
# Bytes per rank, forward, for a long-context layer of a grouped-query model: 32 query heads, 8 kv heads,
# $d = 128$, bfloat16, batch 1, 128K tokens on 8 ranks, from the schedules. "K/V held" is what a rank holds of
# K and V at its peak, inputs only: the ring its shard and two buffers in flight; all-gather the whole K/V;
# Ulysses its shard and the head-sharded K/V; USP both of those and the ring's two buffers.

# %%
BIG = {"heads": 32, "kv_heads": 8, "head_dim": 128, "dtype_bytes": 2, "causal": True}
N_BIG, W_BIG = 131072, 8
rows = [("ring", None), ("allgather", None), ("ulysses", None), ("usp", 2), ("usp", 4)]


def kv_held(strategy, n, w, u, kv_heads, head_dim, dtype_bytes, **_):
    c, gd = n // w, kv_heads * head_dim * dtype_bytes
    if strategy == "ring":
        return 3 * 2 * c * gd  # own shard + two in flight
    if strategy == "allgather":
        return 2 * n * gd
    u = w if strategy == "ulysses" else u
    gp = lcm_heads(kv_heads, u)
    heads_kv = 2 * (n // (w // u)) * (gp // u) * head_dim * dtype_bytes  # the group's chunk, my kv heads
    return 2 * c * gd + heads_kv * (1 if u == w else 3)  # USP: plus the ring's two buffers


print(f"n = {N_BIG}, w = {W_BIG}, h = 32, g = 8, d = 128, bfloat16")
print(f"{'strategy':10} {'MB sent per rank':>17} {'steps that send':>16} {'MB of K/V held':>15}")
table = {}
for strategy, u in rows:
    sched = strategy_schedule(strategy, N_BIG, W_BIG, ulysses_size=u, **BIG)
    sent = bytes_sent(sched, W_BIG)
    name = strategy if u is None else f"usp {u}×{W_BIG // u}"
    table[name] = sent[0]
    sending = sum(1 for st in sched if st.messages)
    print(f"{name:10} {sent[0] / 1e6:17.1f} {sending:16} {kv_held(strategy, N_BIG, W_BIG, u, **BIG) / 1e6:15.1f}")
    assert len(set(sent)) == 1  # every rank sends the same
assert table["ring"] == table["allgather"]

# %% [markdown]
# | strategy | sent per rank (fwd) | K/V held | needs | overlap | with GQA ($g < h$) |
# |---|---|---|---|---|---|
# | ring | $(w-1)\,2cgde$, $w-1$ hops | $O(n/w)$ | a balanced layout when causal | each hop behind a block | fewer bytes |
# | all-gather | $(w-1)\,2cgde$, one gather | $O(n)$ | nothing: any mask | the diagonal block | a cheap gather |
# | Ulysses | $\frac{w-1}{w}\frac{n}{w}de(2h+2g')$ | $O(n/w)$ | $w \mid h$ | none (plain form) | $g' = \max(g, w)$ |
# | USP $u \times r$ | Ulysses on $u$ + ring on $r$ | $O(n/w)$ | $u \mid h, w$ | the ring part | $g' = \mathrm{lcm}(g, u)$ |
#
# Against the ring size, at a fixed 128K tokens (every strategy computes the same scores per rank, balanced,
# so bytes per rank is also bytes per unit of work: the higher, the harder to hide behind the compute):

# %%
sizes = [2, 4, 8, 16, 32]
curves = {}
for strategy, u in (("ring", None), ("allgather", None), ("ulysses", None), ("usp", 2), ("usp", 8)):
    name = strategy if u is None else f"usp {u}×(w/{u})"
    curves[name] = []
    for w in sizes:
        fits = (strategy != "ulysses" or BIG["heads"] % w == 0) and (u is None or (w % u == 0 and w > u))
        curves[name].append(bytes_sent(strategy_schedule(strategy, N_BIG, w, ulysses_size=u, **BIG), w)[0]
                            if fits else 0)
print(f"{'w':14}" + "".join(f"{w:9}" for w in sizes))
for name, values in curves.items():
    print(f"{name:14}" + "".join(f"{v / 1e6:9.1f}" if v else "        –" for v in values) + "   MB per rank")
fig_bytes = plot_bytes_per_rank(sizes, curves, title="forward, 128K tokens, h = 32, g = 8, d = 128, bfloat16")
fig_bytes

# %% jupyter={"source_hidden": true}
# Saved for the README and the docs (hidden in JupyterLab).
fig_bytes.savefig(SAVE / "06_beyond_the_ring.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# ### 5b · What each strategy's engine costs, measured on one GPU
#
# Bytes are half the story; the other half is what the engine spends around the kernels. With every rank played
# on one GPU there is no network, so a strategy's time beside one cuDNN call on the whole sequence is its
# engine's cost alone: the extra launches, merges and copies (1.0 would be free). `tools/gpu_strategies.py`
# measured it, each output checked against float64 first; the committed file says on what:

# %%
strategies_path = PATHS.result("strategies/gpu-strategies-h100.json")
if strategies_path is not None:
    measured = json.loads(strategies_path.read_text())
    print(f"{measured['env']['device']}, PyTorch {measured['env']['torch_version']}, ringbook at "
          f"{measured['code']['ringbook_commit']}, bf16, b=1 h=8 d=64, forward")
    for r in measured["rows"]:
        cells = "  ".join(f"{s} {r['ratio_vs_cudnn'][s]:.2f}×" if s in r["ratio_vs_cudnn"] else f"{s} –"
                          for s in ("ring", "allgather", "ulysses"))
        print(f"{r['seq_len']:>7,} tokens, {r['ring_size']:2} ranks, {'causal' if r['causal'] else 'full  '}: "
              f"cuDNN {r['ms']['cudnn']:6.2f} ms   {cells}")
    display(plot_strategy_engine_cost(measured["rows"], title="one GPU playing every rank: cuDNN time / "
                                                               "strategy time (dashed: 0.95)"))

# %% [markdown]
# At 131K tokens and 8 ranks every strategy costs within about 7% of the fused kernel, Ulysses nothing at all
# (it is one full-attention call per head group). At 16K the calls are short and the launches and merges show,
# most for all-gather with 16 ranks. Ulysses has no bar at 16 ranks: 8 heads do not split over 16 ranks.

# %% [markdown]
# **Takeaway:** at a fixed sequence, the ring and all-gather send more per rank as $w$ grows (towards
# $2ngde$), Ulysses and the hybrids less; all-gather trades that for $O(n)$ memory, Ulysses for the
# $w \mid h$ limit and the $g'/g$ replication. The hybrid keeps Ulysses' all-to-alls inside a fast group and
# lets the ring scale past the head count. Which one is *fastest* depends on the links and the kernels:
# `ringbook.distributed` runs them on real processes, and the benchmark measures them.
