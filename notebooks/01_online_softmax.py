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
# # 01 · The online softmax
#
# > **You will learn** the safe softmax and why it cannot overflow; the online recurrence for $m$ and $\ell$; the
# > lse merge (M) and why blocks may be merged in any order; how blockwise attention follows.
# >
# > **You need** attention as $\mathrm{softmax}(QK^\top/\sqrt d)V$; basic PyTorch tensors.
# >
# > **Exercises** exercises 1–3 (the lse of a block, the merge, one online step).
# >
# > **Time** 60–75 minutes working alone, at a student's pace; executing it takes 10–30 s on 2 CPU cores.
#
# Ring attention splits the keys and values of a long sequence over devices
# and passes them round a ring: each device sees **one block of keys at a
# time** and never the whole row of attention scores. This notebook derives
# the two facts that make that possible:
#
# 1. a softmax can be computed *online*, block by block, with a running max
#    $m$ and a running normaliser $\ell$ (sections 1–3);
# 2. attention over two disjoint key sets, each summarised by its output $O$
#    and log-sum-exp $\mathrm{lse}$, merges exactly, and the merge is
#    associative and commutative, so blocks may arrive in any order and be
#    grouped in any way (sections 4–5).
#
# Every section goes: why → the equation → the code (written here in plain
# torch where it is short, then imported from `ringbook`) → a cell that
# checks it numerically → a picture.
#
# **Shapes.** One vocabulary, in every module and notebook:
#
# | letter | meaning |
# | --- | --- |
# | `b` | batch |
# | `n` | sequence length (`i` for query positions, `j` for key positions) |
# | `h` | heads |
# | `d` | head dimension |
# | `w` | ring size (`ring_size` in code; the world size of a process group): the number of blocks |
# | `c` | chunk (shard) length |
# | `s`, `r` | segment length and dilation rate (dilated attention, notebook 03); never `w` |
#
# q, k and v are `b n h d`; the log-sum-exp `lse` is `b h n`; score tensors
# are `b h i j`. Every attention function returns `(out, lse)`.

# %% jupyter={"source_hidden": true}
# Setup: ROOT is the ringbook clone (None outside one, e.g. on Colab), FIGURES its committed results,
# SAVE where this notebook's figures go: build/figures/, never the committed figures/ unless asked
# ($RINGBOOK_FIGURES_OUT, which `make sync-notebooks` sets). See ringbook/_paths.py.
from ringbook._paths import notebook_paths

PATHS = notebook_paths()
ROOT, FIGURES, SAVE = PATHS

# %%
import math
from functools import reduce

import torch
from einops import einsum, rearrange
from IPython.display import display

import ringbook
from ringbook import attend_block, blockwise_attention, merge_partials, naive_attention, online_softmax_trace
from ringbook.exercises import check_lse_from_m_l, check_merge_partials, check_online_step
from ringbook.viz import plot_block_weights, plot_error_bars, plot_exp_overflow, plot_online_softmax
from ringbook.viz.widgets import online_softmax_explorer

torch.manual_seed(0)
F64 = torch.float64  # exactness checks run in float64
TOL = 1e-12  # float64 agreement asserted throughout

print("ringbook", ringbook.__version__)

# %% [markdown]
# ## 1 · Why the plain softmax overflows
#
# Attention turns a row of scores $s_j = \mathrm{scale}\cdot q \cdot k_j$ into
# weights with a softmax. Written as in the textbook,
#
# $$
# \mathrm{softmax}(s)_j = \frac{e^{s_j}}{\sum_k e^{s_k}},
# $$
#
# it exponentiates the raw scores. But $e^{x}$ is infinite in floating point as
# soon as $x > \log(\text{largest finite number})$:
#
# | dtype | largest finite | $e^x$ overflows for $x >$ |
# | --- | --- | --- |
# | float16 | 65504 | 11.09 |
# | bfloat16, float32 | $\approx 3.4\cdot 10^{38}$ | 88.72 |
# | float64 | $\approx 1.8\cdot 10^{308}$ | 709.78 |
#
# Scores of 12 are ordinary (a confident head, or activations that were not
# normalised), and scores of 100 happen. Then numerator and denominator are
# both inf, and inf/inf is **nan**. The other end fails too: if every score is
# very negative, every $e^{s_k}$ underflows to 0 and 0/0 is nan.

# %%
def plain_softmax(s):
    """The textbook formula: exponentiate, then normalise. Not safe."""
    e = torch.exp(s)
    return e / e.sum()


def verdict(p):
    return "nan" if p.isnan().any() else ("inf" if p.isinf().any() else "ok")


DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
for dtype in DTYPES:
    print(f"{str(dtype):15} e^x overflows for x > {math.log(torch.finfo(dtype).max):7.2f}")

row = torch.randn(12, dtype=F64)  # a row of scores of order 1
print("\nplain softmax of the row scaled by a factor:")
print("factor   " + "".join(f"{str(t)[6:]:>10}" for t in DTYPES))
for factor in (1, 10, 30, 100):
    print(f"{factor:<9}" + "".join(f"{verdict(plain_softmax((row * factor).to(t))):>10}" for t in DTYPES))

big = torch.tensor([100.0, 99.0, 98.0])
tiny = torch.tensor([-110.0, -111.0])
print("\nscores 100, 99, 98 in float32:", verdict(plain_softmax(big)))
print("scores -110, -111 in float32: ", verdict(plain_softmax(tiny)), "(e^-110 underflows: 0/0)")
assert plain_softmax(big).isnan().all() and plain_softmax(tiny).isnan().all()
assert verdict(plain_softmax(row * 30)) == "ok"  # float64 is fine here...
assert verdict(plain_softmax((row * 30).half())) == "nan"  # ...float16 is not

# %% [markdown]
# The curve below is $e^x$ on a log scale, with the largest finite float16
# and float32 numbers. The dots are the row scaled by 50: the crosses are
# scores whose exponential is already inf in float16.

# %%
scores = row * 50
plot_exp_overflow(scores, dtypes=(torch.float16, torch.float32))

# %% [markdown]
# **Takeaway:** the plain softmax breaks as soon as a score passes the log of
# the dtype's largest number: about 11 in float16, 88 in float32.

# %% [markdown]
# ## 2 · The safe softmax: subtract the max
#
# Multiplying numerator and denominator by $e^{-m}$ changes nothing, for any
# $m$. Choosing $m = \max_k s_k$:
#
# $$
# \mathrm{softmax}(s)_j = \frac{e^{s_j - m}}{\sum_k e^{s_k - m}}, \qquad
# m = \max_k s_k, \qquad
# \mathrm{lse}(s) = \log \sum_k e^{s_k} = m + \log \sum_k e^{s_k - m}.
# $$
#
# Every exponent is now $\le 0$, so every term lies in $[0, 1]$ (a term far
# below the max underflows to 0, which is harmless): nothing overflows. The
# largest term is exactly $e^0 = 1$, so the denominator is $\ge 1$: no 0/0
# either. `ringbook.attend_block` is this formula for one
# block of keys: it takes the row max `m`, forms `p = exp(s - m)` and the
# normaliser `l = p.sum()`, returns `out = p @ v / l` and `lse = m + log(l)`.

# %%
s16 = scores.half()  # the row scaled by 50, stored in float16
p = torch.exp(s16 - s16.max())
safe = p / p.sum()
exact = torch.softmax(scores, dim=0)  # float64 reference
print("plain softmax, float16:", verdict(plain_softmax(s16)))
print("safe softmax,  float16:", verdict(safe), "| max |Δ| vs float64 < 1e-3:", (safe.double() - exact).abs().max().item() < 1e-3)

# The same in ringbook: attend_block on huge scores, in float16 and float32.
q, k, v = (torch.randn(1, 16, 2, 8, dtype=F64) for _ in range(3))
score_max = (einsum(q, k, "b i h d, b j h d -> b h i j") * 30.0).abs().max().item()
print(f"attention scores with scale 30: largest |s| > 200: {score_max > 200}")
for dtype in (torch.float16, torch.float32):
    qt, kt, vt = q.to(dtype), k.to(dtype), v.to(dtype)
    out, lse = attend_block(qt, kt, vt, scale=30.0)
    ref_out, ref_lse = naive_attention(qt, kt, vt, scale=30.0)  # float64 arithmetic
    err = (out.double() - ref_out.double()).abs().max().item()
    print(
        f"attend_block {str(dtype):14}",
        f"finite: {bool(out.isfinite().all() and lse.isfinite().all())}, max |Δout| < 1e-3: {err < 1e-3}",
    )
    assert out.isfinite().all() and lse.isfinite().all() and err < 1e-3

assert verdict(safe) == "ok" and (safe.double() - exact).abs().max() < 1e-3

# %% [markdown]
# The same scores shifted by their max (diamonds) all sit at $x \le 0$, where
# $e^x \le 1$ is representable in every dtype.

# %%
plot_exp_overflow(scores, dtypes=(torch.float16, torch.float32), show_shifted=True)

# %% [markdown]
# **Takeaway:** after subtracting the max every exponent is at most 0, so no
# dtype overflows.

# %% [markdown]
# ## 3 · The online normaliser
#
# The safe softmax needs $m = \max_k s_k$ *before* it exponentiates anything:
# one pass over all keys for the max, a second for the sum. In a ring a
# device sees the keys one block $B_1, B_2, \dots, B_K$ at a time and cannot
# keep them all. So keep a **running** max $m$ and normaliser $\ell$, and
# correct $\ell$ whenever the max grows (Milakov & Gimelshein, 2018):
#
# $$
# m_0 = -\infty,\quad \ell_0 = 0, \qquad
# m_k = \max\Big(m_{k-1},\ \max_{j \in B_k} s_j\Big), \qquad
# \ell_k = \ell_{k-1}\, e^{m_{k-1} - m_k} + \sum_{j \in B_k} e^{s_j - m_k}.
# $$
#
# By induction $\ell_k = \sum_{j \in B_1 \cup \dots \cup B_k} e^{s_j - m_k}$:
# the factor $e^{m_{k-1} - m_k} \le 1$ re-measures the old sum against the
# new max. After the last block $m_K = \max_j s_j$ and
# $m_K + \log \ell_K = \mathrm{lse}(s)$, whatever the block size.
# `ringbook.online_softmax_trace` runs this update on one row of scores and
# returns $(m_k, \ell_k)$ after every block.
#
# The row here is one query against 48 keys, in blocks of 6. One key in the
# sixth block matches the query much better than the others, so the max
# jumps late.

# %%
D, N, BLOCK = 8, 48, 6
q1 = 2.0 * torch.randn(1, 1, 1, D, dtype=F64)  # one query (b = 1, n = 1, h = 1)
k1, v1 = torch.randn(1, N, 1, D, dtype=F64), torch.randn(1, N, 1, D, dtype=F64)
k1[:, 33] = q1[:, 0]  # key 33 (block 6) copies the query: a score far above the rest, late in the row
scale = 1 / math.sqrt(D)
s = einsum(q1, k1, "b i h d, b j h d -> b h i j")[0, 0, 0] * scale  # the row s_j, j = 0..N-1

trace = online_softmax_trace(s, BLOCK)
m = torch.tensor([mk for mk, _ in trace], dtype=F64)
l = torch.tensor([lk for _, lk in trace], dtype=F64)
K = len(trace)

# the invariant after every block, and the final lse, for several block sizes
invariant = all(
    math.isclose(l[i], torch.exp(s[: (i + 1) * BLOCK] - m[i]).sum().item(), rel_tol=TOL) for i in range(K)
)
final = {}
for bs in (1, 5, BLOCK, 7, N):
    m_K, l_K = online_softmax_trace(s, bs)[-1]
    final[bs] = math.isclose(m_K + math.log(l_K), torch.logsumexp(s, 0).item(), rel_tol=TOL)
print(f"{K} blocks; m never decreases: {bool((m.diff() >= 0).all())}; m_K == max(s): {m[-1].item() == s.max().item()}")
print("l_k == sum of e^(s_j - m_k) over the keys seen, every k:", invariant)
print("m_K + log l_K == logsumexp(s):", final)
assert (m.diff() >= 0).all() and m[-1] == s.max() and invariant and all(final.values())

# %% [markdown]
# (a) The running max steps up whenever a block holds a larger score.
# (b) At those steps (circled) the old $\ell$ is multiplied by
# $e^{m - m'} < 1$ before the new block is added, so $\ell$ can fall: at
# block 6 the planted key raises the max by about 2. Measured against the
# final max instead, $\ell_k e^{m_k - m_K}$ only grows, one block's worth at
# a time, until it reaches $\ell_K$.

# %%
plot_online_softmax(s, BLOCK, m, l)

# %% [markdown]
# **Takeaway:** the running max only grows, and rescaling $\ell$ by $e^{m -
# m'}$ keeps it consistent, so one pass over the blocks suffices.

# %% [markdown]
# **Exercise 1 · The lse of a block.** A block's scan leaves its row maxima
# $m$ and normalisers $\ell = \sum_j e^{s_j - m}$. Write the block's
# $\mathrm{lse}$ from them (one row per entry; a row whose keys are all
# masked has $m = -\infty$ and $\ell = 0$). Replace the `raise` and run the
# cell: the checker tries awkward cases and says which one fails, and why.

# %%
def lse_from_m_l(m, l):
    """m, l: tensors of shape (rows,). Return the lse of each row."""
    raise NotImplementedError


_ = check_lse_from_m_l(lse_from_m_l)

# %% [markdown]
# ## 4 · Merging partial results: the lse merge
#
# The normaliser alone is not attention: we also need the weighted sum of
# values. Summarise attention of a query over a key set $J$ by two things,
# the output and the log-sum-exp,
#
# $$
# \mathrm{lse}_J = \log \sum_{j \in J} e^{s_j}, \qquad
# O_J = \sum_{j \in J} e^{s_j - \mathrm{lse}_J}\, v_j .
# $$
#
# For disjoint key sets $A$ and $B$ the summary of $A \cup B$ follows from the
# two summaries alone, equation (M) of `ringbook/online_softmax.py`:
#
# $$
# \mathrm{lse} = \log\big(e^{\mathrm{lse}_A} + e^{\mathrm{lse}_B}\big), \qquad
# O = e^{\mathrm{lse}_A - \mathrm{lse}}\, O_A + e^{\mathrm{lse}_B - \mathrm{lse}}\, O_B . \tag{M}
# $$
#
# **Why it holds, and why any order works.** Write $Z_J = e^{\mathrm{lse}_J}
# = \sum_{j\in J} e^{s_j}$ and $U_J = Z_J O_J = \sum_{j \in J} e^{s_j} v_j$.
# Both are plain sums over keys, so $Z_{A\cup B} = Z_A + Z_B$ and
# $U_{A \cup B} = U_A + U_B$; (M) is exactly this, written in log space so that
# every exponent is $\le 0$. The merge is therefore *addition in disguise*,
# exactly so in real arithmetic; in floating point each order of merging
# rounds differently, by a few units in the last place (notebook 04 measures
# it):
#
# * commutative: $M(P_A, P_B) = M(P_B, P_A)$;
# * associative: $M(M(P_A, P_B), P_C) = M(P_A, M(P_B, P_C))$;
# * with identity $(O, \mathrm{lse}) = (0, -\infty)$, i.e. $Z = 0, U = 0$: the
#   empty key set. A query that sees no key of a block (causal masking) gets
#   exactly this partial, and it drops out of the merge.
#
# So the key blocks can be visited in any order and grouped in any way: in a
# loop (blockwise attention), as a tree, or as they travel round a ring, where
# each device sees the blocks in a different order.
#
# **Build it first, as the sums it is.** Ten lines of plain torch: turn each
# summary back into its sums $Z$ and $U$, add, and divide. One query row per
# entry: `out` is (rows, d), `lse` is (rows,). We check it against
# `ringbook.merge_partials` on two real partials (`ringbook.attend_block`
# makes one partial per key block).

# %%
def merge_by_addition(out_a, lse_a, out_b, lse_b):
    """(M) read literally: Z = e^lse and U = Z·O are sums over keys, so the union adds them."""
    z_a, z_b = torch.exp(lse_a), torch.exp(lse_b)  # Σ e^{s_j} over A and over B
    u = z_a[:, None] * out_a + z_b[:, None] * out_b  # Σ e^{s_j} v_j over A ∪ B
    z = z_a + z_b
    return u / z[:, None], torch.log(z)


qm, km, vm = (torch.randn(1, 16, 1, 8, dtype=F64) for _ in range(3))  # one batch, one head: rows = queries
part_a = attend_block(qm, km[:, :6], vm[:, :6], scale=8 ** -0.5)  # keys 0–5
part_b = attend_block(qm, km[:, 6:], vm[:, 6:], scale=8 ** -0.5)  # keys 6–15
rows = [(o[0, :, 0], lse[0, 0]) for o, lse in (part_a, part_b)]  # (16, 8) outputs and (16,) lse
mine = merge_by_addition(*rows[0], *rows[1])
library = merge_partials(*part_a, *part_b)
whole = naive_attention(qm, km, vm)
print("merge_by_addition equals ringbook.merge_partials:",
      torch.allclose(mine[0], library[0][0, :, 0], atol=TOL) and torch.allclose(mine[1], library[1][0, 0], atol=TOL))
print("... and attention over all 16 keys:", torch.allclose(mine[0], whole[0][0, :, 0], atol=TOL))
assert torch.allclose(mine[0], whole[0][0, :, 0], atol=TOL) and torch.allclose(mine[1], whole[1][0, 0], atol=TOL)

# The same two partials with logits 100 times larger, in float32 as a GPU kernel would hold them:
big = [(o.float(), 100 * lse.float()) for o, lse in rows]
big_out, big_lse = merge_by_addition(*big[0], *big[1])
print("float32, logits × 100: finite outputs", int(big_out.isfinite().all(dim=1).sum()), "of", big_out.shape[0],
      "rows; lse finite:", bool(big_lse.isfinite().all()))
assert not big_out.isfinite().all()  # e^{lse} overflowed: inf / inf = NaN

# %% [markdown]
# Correct, and broken exactly where §1 said it would be: $e^{\mathrm{lse}}$
# overflows once logits are large, and $\infty/\infty$ is NaN. Written in
# log space, with every exponent $\le 0$, (M) cannot overflow.
#
# **Exercise 2 · The merge (M), in log space.** Write it with the same
# shapes as `merge_by_addition`. The checker includes logits scaled by 100
# in float32, an empty side $(0, -\infty)$ (a causal block a query cannot
# see) and two empty sides.

# %%
def my_merge(out_a, lse_a, out_b, lse_b):
    """Return (out, lse) of the union of the two disjoint key sets."""
    raise NotImplementedError


_ = check_merge_partials(my_merge)

# %% [markdown]
# `ringbook.merge_partials` is the same merge, made robust (empty sides on
# either or both hands, autograd) and, in `ringbook.fast.merge`, fast: one
# `lerp_` pass over the accumulator, since the two weights sum to 1. From
# here on the notebook uses it.

# %%
B, H, W, C = 2, 3, 4, 10  # batch, heads, w blocks of c keys each (n = w·c = 40)
q, k, v = (torch.randn(B, W * C, H, D, dtype=F64) for _ in range(3))
ref_out, ref_lse = naive_attention(q, k, v)
kb = rearrange(k, "b (w c) h d -> w b c h d", w=W)
vb = rearrange(v, "b (w c) h d -> w b c h d", w=W)
parts = [attend_block(q, kb[r], vb[r], scale=scale) for r in range(W)]  # one (out, lse) per block
empty = (torch.zeros_like(ref_out), torch.full_like(ref_lse, -math.inf))


def merge(a, b):
    return merge_partials(*a, *b)


orders = {
    "left fold ((P0 P1) P2) P3": reduce(merge, parts),
    "right fold P0 (P1 (P2 P3))": merge(parts[0], merge(parts[1], merge(parts[2], parts[3]))),
    "tree (P0 P1) (P2 P3)": merge(merge(parts[0], parts[1]), merge(parts[2], parts[3])),
    "reversed P3 P2 P1 P0": reduce(merge, parts[::-1]),
    "shuffled": reduce(merge, [parts[r] for r in torch.randperm(W).tolist()]),
    "from the identity (0, -inf)": reduce(merge, parts, empty),
}
errors = {}
for name, (out, lse) in orders.items():
    errors[name] = max((out - ref_out).abs().max().item(), (lse - ref_lse).abs().max().item())
    print(f"{name:28} equals naive_attention (max |Δ| < {TOL:g}): {errors[name] < TOL}")
assert all(e < TOL for e in errors.values())


def same(x, y, tol=TOL):
    return all(torch.allclose(a, b, rtol=0, atol=tol) for a, b in zip(x, y))


a, b, c = parts[:3]
commutative = same(merge(a, b), merge(b, a))
associative = same(merge(merge(a, b), c), merge(a, merge(b, c)))
identity = all(torch.equal(x, y) for x, y in zip(merge(a, empty), a)) and same(merge(empty, a), a)
empty_out, empty_lse = merge(empty, empty)
print("merge is commutative:", commutative)
print("merge is associative:", associative)
print("(0, -inf) is the identity:", identity)
print("empty ∘ empty = (0, -inf):", bool((empty_out == 0).all() and torch.isneginf(empty_lse).all()))

# A causal block that lies wholly in a query's future gives exactly the identity.
masked_out, masked_lse = attend_block(q[:, :C], kb[1], vb[1], scale=scale, causal=True, q_offset=0, k_offset=C)
print("future block under causal mask gives (0, -inf):", bool((masked_out == 0).all() and torch.isneginf(masked_lse).all()))
assert commutative and associative and identity
assert (empty_out == 0).all() and torch.isneginf(empty_lse).all()
assert (masked_out == 0).all() and torch.isneginf(masked_lse).all()

# %% [markdown]
# Each block's weight in (M) is $e^{\mathrm{lse}_J - \mathrm{lse}}$: positive,
# and summing to 1 over the blocks, so the merged output is a convex
# combination of the partial outputs. A block that holds the keys a query
# likes gets a large share (first batch, first head shown):

# %%
lse_blocks = torch.stack([lse[0, 0] for _, lse in parts])  # w × n: lse_J of each block, per query
plot_block_weights(lse_blocks, labels=[f"block {r}: keys {r * C}–{(r + 1) * C - 1}" for r in range(W)])

# %% [markdown]
# **Takeaway:** each block counts in proportion to its share of the softmax
# mass, $e^{\mathrm{lse}_J - \mathrm{lse}}$.

# %% [markdown]
# And every order of merging lands on the reference to float64 rounding:

# %%
plot_error_bars(errors, title="Merging the 4 partials in different orders vs naive_attention", tolerance=TOL)

# %% [markdown]
# **Takeaway:** the order of merging changes only the last digits of float64.

# %% [markdown]
# **Exercise 3 · One online-softmax step with values.** §3's recurrence
# carries $m$ and $\ell$; carry also the unnormalised output
# $\mathrm{acc} = \sum_j e^{s_j - m} v_j$. Given the running `(m, l, acc)`
# and a new block's scores `s` (rows × keys) and values `v` (keys × d),
# return the updated triple. The checker runs your step over all blocks from
# $(-\infty, 0, 0)$ and compares `acc / l` with the softmax.

# %%
def online_step(m, l, acc, s, v):
    """m, l: (rows,); acc: (rows, d); s: (rows, keys); v: (keys, d). Return (m, l, acc) after the block."""
    raise NotImplementedError


_ = check_online_step(online_step)

# %% [markdown]
# ## 5 · Blockwise attention equals naive attention
#
# Blockwise attention is the left fold of (M), starting from the identity:
#
# $$
# (O, \mathrm{lse}) = M\big(\cdots M\big(M\big((0, -\infty), P_{B_1}\big), P_{B_2}\big) \cdots, P_{B_K}\big),
# \qquad P_{B_k} = \texttt{attend\_block}(q, k_{B_k}, v_{B_k}).
# $$
#
# It holds one `block_size`-wide tile of scores at a time: memory
# $O(n \cdot \text{block\_size})$ instead of the $O(n^2)$ score matrix of
# `naive_attention`. Its lse after block $k$ is the online normaliser of
# section 3: $\mathrm{lse}_k = m_k + \log \ell_k$. With a causal mask, blocks
# wholly in a query's future are skipped, which is the identity partial
# again. `ringbook.blockwise_attention` implements it.

# %%
n_odd = 50  # not a multiple of most block sizes: the last block is short
q, k, v = (torch.randn(2, n_odd, 3, D, dtype=F64) for _ in range(3))
print("block_size  causal  max |Δout|, |Δlse| < 1e-12")
for causal in (False, True):
    ref_out, ref_lse = naive_attention(q, k, v, causal=causal)
    for block_size in (1, 7, 16, n_odd, 64):
        out, lse = blockwise_attention(q, k, v, block_size=block_size, causal=causal)
        ok = (out - ref_out).abs().max().item() < TOL and (lse - ref_lse).abs().max().item() < TOL
        print(f"{block_size:>10}  {causal!s:>6}  {ok}")
        assert ok, (block_size, causal)

# %% [markdown]
# The same fold for the single query of section 3, one block at a time, so we
# can watch it: after each block we keep the partial output and lse.

# %%
out, lse = torch.zeros_like(q1), torch.full((1, 1, 1), -math.inf, dtype=F64)
outs, lses = [], []
for start in range(0, N, BLOCK):
    part = attend_block(q1, k1[:, start:start + BLOCK], v1[:, start:start + BLOCK], scale=scale)
    out, lse = merge_partials(out, lse, *part)
    outs.append(out[0, 0, 0])
    lses.append(lse[0, 0, 0])
outs, lses = torch.stack(outs), torch.stack(lses)  # K × d, K
exact_out, exact_lse = naive_attention(q1, k1, v1, scale=scale)
exact_out = exact_out[0, 0, 0]

online_matches_trace = torch.allclose(lses, m + torch.log(l), rtol=TOL, atol=0)
fold_is_blockwise = torch.allclose(out, blockwise_attention(q1, k1, v1, block_size=BLOCK)[0], rtol=0, atol=TOL)
print("lse after block k == m_k + log l_k (section 3), every k:", online_matches_trace)
print("the fold equals blockwise_attention:", fold_is_blockwise)
print("the last partial equals naive_attention:", (outs[-1] - exact_out).abs().max().item() < TOL)
assert online_matches_trace and fold_is_blockwise and (outs[-1] - exact_out).abs().max() < TOL

# %% [markdown]
# The whole story in one figure (saved to `figures/01_online_softmax.png`):
# (a) the running max, (b) the normaliser, (c) the partial output against the
# exact one after all blocks and (d) its error after each block, beside the
# softmax mass of the keys not seen yet. The partial output is exact only once
# the last block has been merged; the big step down is block 6, whose key
# carries most of the mass.

# %%
fig = plot_online_softmax(s, BLOCK, m, l, outs, exact_out)
fig

# %% jupyter={"source_hidden": true}
# Saved for the README and the docs (hidden in JupyterLab).
fig.savefig(SAVE / "01_online_softmax.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** the online output is exact only after the last block; until
# then its error is the mass of the keys not yet seen.

# %% [markdown]
# Move the slider to add one key block at a time and watch $m$, $\ell$ and the
# output converge.

# %%
# NBVAL_IGNORE_OUTPUT
explorer = online_softmax_explorer(s, BLOCK, m, l, outs, exact_out, blocks_seen=K)
_ = display(explorer)

# %% jupyter={"source_hidden": true}
# Check (hidden in JupyterLab): moving the slider redraws the figure; then the slider goes back.
# NBVAL_IGNORE_OUTPUT
assert len(explorer.result.axes) == 4
explorer.children[0].value = 3
assert explorer.result.axes[0].get_title() == f"(a) scores and running max, 3/{K} blocks seen"
explorer.children[0].value = K

# %% [markdown]
# ## 6 · Two forms of one summary, and the backward pass
#
# **FlashAttention's accumulator is the same summary.** FlashAttention (Dao
# et al., 2022) carries, per query row, the running max $m$, the running
# normaliser $\ell$ and the *unnormalised* output $\mathrm{acc} =
# \sum_j e^{s_j - m} v_j$ (exercise 3). The $(O, \mathrm{lse})$ form of
# section 4 is the same information, normalised:
#
# $$
# O = \mathrm{acc} / \ell, \qquad \mathrm{lse} = m + \log \ell ,
# \qquad\text{and back:}\quad \ell = e^{\mathrm{lse} - m},\ \mathrm{acc} = \ell\, O
# \ \text{for any } m .
# $$
#
# Inside one kernel the unnormalised form saves a division per block; between
# devices the normalised form is what travels and merges, because it needs no
# agreed $m$: each side's exponents in (M) are relative to the merged lse.
#
# **The backward pass.** With $P = \mathrm{softmax}(S)$, $S = QK^\top \cdot
# \text{scale}$ and $O = PV$, the gradients given $dO$ are
#
# $$
# dV = P^\top dO, \qquad dP = dO\, V^\top, \qquad
# dS = P \circ (dP - D), \quad D_i = \textstyle\sum_d dO_{id}\, O_{id},
# \qquad dQ = dS\, K \cdot \text{scale}, \quad dK = dS^\top Q \cdot \text{scale}.
# $$
#
# $D$ is the row sum of $P \circ dP$ (since $O = PV$), which is why the
# backward needs only $O$ and $\mathrm{lse}$ of the forward: $P_{ij} =
# e^{s_{ij} - \mathrm{lse}_i}$ is recomputed block by block, and $D$ from $O$
# and $dO$. A gradient of lse adds $P \circ d\mathrm{lse}$ to $dS$, which is
# the same as using $D - d\mathrm{lse}$. On a ring each block's $dS$ needs the
# *global* $O$ and lse of its queries, so the backward runs the ring again:
# $dQ$ sums over the blocks a rank meets and stays home, while $dK$ and $dV$
# belong to the K/V shard and travel with it, collecting each rank's
# contribution, and one last hop brings them to their owner. The check below
# computes these formulas by hand and compares them with autograd:

# %%
q6, k6, v6 = (torch.randn(5, 8, dtype=F64, requires_grad=True) for _ in range(3))
do6, dlse6 = torch.randn(5, 8, dtype=F64), torch.randn(5, dtype=F64)
sc = 1 / math.sqrt(8)
S6 = q6 @ k6.T * sc
P6, lse6 = torch.softmax(S6, dim=1), torch.logsumexp(S6, dim=1)
O6 = P6 @ v6
auto = torch.autograd.grad((O6 * do6).sum() + (lse6 * dlse6).sum(), (q6, k6, v6))
with torch.no_grad():
    D6 = (do6 * O6).sum(dim=1) - dlse6  # D − dlse
    dS6 = P6 * (do6 @ v6.T - D6[:, None])
    by_hand = (dS6 @ k6 * sc, dS6.T @ q6 * sc, P6.T @ do6)
print("dq, dk, dv from dS = P∘(dP − (D − dlse)) equal autograd's:",
      all(torch.allclose(a, b, atol=1e-12) for a, b in zip(by_hand, auto)))
m6, l6 = S6.detach().amax(dim=1), torch.exp(S6.detach() - S6.detach().amax(dim=1, keepdim=True)).sum(dim=1)
acc6 = torch.exp(S6.detach() - m6[:, None]) @ v6.detach()
print("(acc / l, m + log l) == (O, lse):", torch.allclose(acc6 / l6[:, None], O6.detach(), atol=1e-12)
      and torch.allclose(m6 + torch.log(l6), lse6.detach(), atol=1e-12))
assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(by_hand, auto))

# %% [markdown]
# **References.** Milakov & Gimelshein (2018), [Online normalizer calculation
# for softmax](https://arxiv.org/abs/1805.02867); Rabe & Staats (2021),
# [Self-attention does not need O(n²) memory](https://arxiv.org/abs/2112.05682);
# Dao et al. (2022), [FlashAttention](https://arxiv.org/abs/2205.14135).

# %% [markdown]
# **Next:** notebook 02 puts the blocks on a ring. Each device keeps its query
# block, the key/value blocks travel one hop per step, and every device folds
# them into its accumulator with (M), in its own order, which the
# commutativity and associativity shown here make exact.

# %% [markdown]
# > **What to remember**
# >
# > * Subtracting the row max makes every exponent ≤ 0: the softmax cannot overflow.
# > * A block of keys is summarised by $(O, \mathrm{lse})$; two summaries over disjoint keys merge exactly by (M),
# >   with identity $(0, -\infty)$.
# > * The merge is addition of $Z = e^{\mathrm{lse}}$ and $U = Z O$ in log space: any order, any grouping, equal up
# >   to rounding.
