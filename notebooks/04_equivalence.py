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
# # 04 · Equivalence: every implementation against the float64 reference
#
# > **You will learn** how to check an attention implementation in low precision (flash-attention's 2× rule); that
# > every ringbook path computes the reference function, forward and backward.
# >
# > **You need** notebooks 01–03.
# >
# > **Exercises** no exercises.
# >
# > **Time** 20–30 minutes working alone, at a student's pace; executing it takes 10–30 s on 2 CPU cores.
#
# Notebooks 01–03 showed, one implementation at a time, that blockwise, ring
# and dilated attention compute *the same function* as the naive reference.
# This notebook checks all of them at once, as a matrix:
#
# * **rows**: `blockwise_attention`; `ring_attention` with each layout
#   (contiguous, zigzag, striped) and `production_ring_attention` with each
#   of its layouts (contiguous, zigzag), at ring sizes $w = 1, 2, 4, 8$; and
#   for two dilated configurations `dilated_attention`,
#   `ring_dilated_attention` and `production_ring_attention(...,
#   segment_lengths=...)`, against `dilated_attention_dense`;
# * **columns**: float64, float32, bfloat16 and float16, without and with the
#   causal mask;
# * **in each cell**: the forward result (`out` and `lse`) and the gradients
#   `dq`, `dk`, `dv` of a random linear loss, each compared with the float64
#   reference.
#
# The multi-process ring (`ringbook.distributed.ring_attention`) runs the
# same schedule over `torch.distributed`; notebook 02 (section 5) checks its
# forward and backward against `naive_attention` on 4 real processes, so it is
# not repeated here.
#
# In float64 "equal" means equal to rounding. In bfloat16 and float16 the
# reference itself cannot be reproduced, so we need a rule for how large an
# error is acceptable: flash-attention's **2× rule** (section 1). The sizes are
# small ($b = 1$, $n = 64$, $h = 4$, $d = 16$; $n$ divisible by $2 \cdot 8$ so
# that zigzag fits a ring of 8) so that the whole matrix runs on a CPU in well
# under a minute.

# %% jupyter={"source_hidden": true}
# Setup: ROOT is the ringbook clone (None outside one, e.g. on Colab), FIGURES its committed results,
# SAVE where this notebook's figures go: build/figures/, never the committed figures/ unless asked
# ($RINGBOOK_FIGURES_OUT, which `make sync-notebooks` sets). See ringbook/_paths.py.
from ringbook._paths import notebook_paths

PATHS = notebook_paths()
ROOT, FIGURES, SAVE = PATHS

# %%
import functools
import time

import numpy as np
import torch
from IPython.display import display
from ipywidgets import Dropdown, interactive
from tqdm.auto import tqdm

import ringbook
from ringbook import (
    LAYOUTS,
    blockwise_attention,
    dilated_attention,
    dilated_attention_dense,
    naive_attention,
    production_ring_attention,
    ring_attention,
    ring_dilated_attention,
)
from ringbook.bench.rules import finite_max_error, rounding_atol
from ringbook.viz import plot_error_matrix

torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and the result does not depend on the core count

B, N, H, D = 1, 64, 4, 16  # n = 64: a ring of 8 holds 8 tokens a rank, zigzag two chunks of 4
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HALF = (torch.bfloat16, torch.float16)
RING_SIZES = (1, 2, 4, 8)
TOL64 = 1e-10  # float64: equal to rounding
TOL32 = 1e-5  # float32: a fixed tolerance, justified in section 1

print("ringbook", ringbook.__version__)

# %% [markdown]
# ## 1 · The rule
#
# Every quantity $x$ (`out`, `lse`, `dq`, `dk`, `dv`) is compared with the
# same quantity computed by the float64 reference, $x_{64}$, **on the same
# rounded inputs**: q, k, v (and the loss weights) are drawn once in float64,
# rounded to the cell's dtype, and the reference runs on those rounded values
# cast back to float64. The error measures the algorithm, not the rounding of
# its inputs:
#
# $$
# \mathrm{err}(x) = \max_{\text{finite entries}} \big|x - x_{64}\big| ,
# $$
#
# where an entry that is $-\infty$ in the reference (a query that sees no key,
# e.g. a position no dilated pair keeps: `lse` is $-\infty$) must be $-\infty$
# in $x$ too, and no entry may be NaN.
#
# * **float64**: $\mathrm{err}(x) < 10^{-10}$.
# * **float32**: $\mathrm{err}(x) < 10^{-5}$. The unit roundoff is
#   $u = 2^{-24} \approx 6 \cdot 10^{-8}$; every quantity here is a sum of at
#   most $n = 64$ products of length-$d = 16$ dot products of values of order
#   1, whose worst-case rounding bound is about $(n + d)\,u \approx 5 \cdot
#   10^{-6}$ per unit of magnitude. $10^{-5}$ allows for that and is still
#   20× below every half-precision error of `out` and of the gradients in
#   the matrix (checked in section 4), so a real mistake (a dropped block, a
#   wrong mask) cannot hide under it. float32 is
#   not held to the 2× rule: the naive float32 error is itself a few ulps, so
#   the ratio would measure rounding luck.
# * **bfloat16, float16**: the error may be at most twice the error of the
#   *naive path computed in the same dtype* (`naive_attention(...,
#   precision="input")`, for dilated attention `dilated_attention_dense(...,
#   precision="input")`), plus the rounding noise of the dtype at the
#   reference's magnitude:
#
# $$
# \rho(x) = \frac{\mathrm{err}(x)}{2\, \mathrm{err}\big(x_{\text{naive, dtype}}\big) + \mathrm{atol}} \le 1,
# \qquad
# \mathrm{atol} = 2 \max \big| \mathrm{fl}\big(\mathrm{fl}(\hat x + 0.3) - 0.3\big) - \hat x \big|,
# \quad \hat x = \mathrm{fl}(x_{64}) .
# $$
#
# This is the rule of flash-attention's test suite, for the forward and the
# backward: a fused kernel is allowed to be somewhat worse than the
# straightforward computation in the same precision, but not by more than a
# factor 2; the atol ($\mathrm{fl}$ = rounding to the dtype; float32 for `lse`,
# which is float32 for half-precision input) keeps a lucky, near-zero naive
# error from making the bound impossible. The gradients come from one
# backward pass of the loss $\sum \mathrm{out} \cdot g_{\mathrm{out}} +
# \sum_{\mathrm{lse} \text{ finite}} \mathrm{lse} \cdot g_{\mathrm{lse}}$
# with random $g$, so both outputs feed the gradient.
#
# The helpers below are the measurement; every attention they call is
# imported from `ringbook`.

# %%
QUANTITIES = ("out", "lse", "dq", "dk", "dv")
FORWARD, GRADIENTS = QUANTITIES[:2], QUANTITIES[2:]


def draw(seed):
    """Fresh float64 inputs: q, k, v and the loss weights g_out (b n h d) and g_lse (b h n)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g_out = (torch.randn(B, N, H, D, generator=gen, dtype=torch.float64) for _ in range(4))
    return q, k, v, g_out, torch.randn(B, H, N, generator=gen, dtype=torch.float64)


INPUTS = draw(0)  # the matrix's inputs


def lse_dtype(dtype):
    return torch.float32 if dtype in HALF else dtype  # ringbook's lse is float32 for half-precision input


def run(fn, dtype, causal, *, in_float64=False, inputs=INPUTS):
    """out, lse and dq, dk, dv of ``fn`` on the inputs rounded to ``dtype`` (computed in float64 if asked)."""
    q, k, v, g_out, g_lse = inputs
    xs, g_out, g_lse = [x.to(dtype) for x in (q, k, v)], g_out.to(dtype), g_lse.to(lse_dtype(dtype))
    if in_float64:
        xs, g_out, g_lse = [x.double() for x in xs], g_out.double(), g_lse.double()
    xs = [x.requires_grad_() for x in xs]
    out, lse = fn(*xs, causal=causal)
    g_lse = torch.where(torch.isfinite(lse), g_lse, 0)  # no gradient into lse = -inf (a query that sees no key)
    grads = torch.autograd.grad((out, lse), xs, grad_outputs=(g_out, g_lse))
    return dict(zip(QUANTITIES, (out.detach(), lse.detach(), *grads)))


max_error = finite_max_error  # max |x − ref| over the finite entries of ref; NaN or other ±inf is an error


def allowed_errors(dtype, ref, base):
    """The bound each quantity's error must stay under, in this dtype."""
    if dtype == torch.float64:
        return dict.fromkeys(QUANTITIES, TOL64)
    if dtype == torch.float32:
        return dict.fromkeys(QUANTITIES, TOL32)
    return {x: 2 * max_error(base[x], ref[x], f"naive {x}") + rounding_atol(ref[x], lse_dtype(dtype) if x == "lse"
                                                                            else dtype) for x in QUANTITIES}


# The rule on the naive path itself: in half precision it passes trivially (its ratio is err / (2 err + atol) < 1/2).
ref = run(naive_attention, torch.float16, True, in_float64=True)
base = run(functools.partial(naive_attention, precision="input"), torch.float16, True)
bound = allowed_errors(torch.float16, ref, base)
ratio_naive = max(max_error(base[x], ref[x], x) / bound[x] for x in QUANTITIES)
print("the naive float16 path against its own 2× rule: ratio < 0.5:", ratio_naive < 0.5)
assert ratio_naive < 0.5

# %% [markdown]
# ## 2 · The rows: every implementation, layout and ring size
#
# Dense attention is checked against `naive_attention`. Dilated attention is
# checked against `dilated_attention_dense`, equation (D) of notebook 03 with
# the $n \times n$ weights materialised, in two configurations on $n = 64$:
#
# * **A**: pairs $(16, 1), (32, 2)$, every head uses every pair
#   (`heads="all"`): every position is kept;
# * **B**: pairs $(8, 1), (16, 2), (32, 4)$, heads grouped (the benchmark's shape):
#   the heads of the rate-2 and rate-4 groups keep only some positions, so
#   `lse` has $-\infty$ entries and `out` exact zeros that every
#   implementation must reproduce.
#
# On rings of 2, 4 and 8 ranks (shards of 32, 16 and 8 tokens) the segments
# of 16 and 32 span several shards and are exchanged between ranks.

# %%
DILATED = {
    "A": {"segment_lengths": [16, 32], "dilation_rates": [1, 2], "heads": "all"},
    "B": {"segment_lengths": [8, 16, 32], "dilation_rates": [1, 2, 4], "heads": "grouped"},
}
FAMILIES = {}  # name -> (float64 reference, naive low-precision baseline, {row label: attention})
rows = {"blockwise · blocks of 16": functools.partial(blockwise_attention, block_size=16)}
for layout in LAYOUTS:
    rows |= {f"ring_attention · {layout} · w={w}": functools.partial(ring_attention, ring_size=w, layout=layout)
             for w in RING_SIZES}
# production refuses striped: its causal blocks interleave positions, which the fused kernels' top-left
# causal mask cannot express
for layout in ("contiguous", "zigzag"):
    rows |= {f"production · {layout} · w={w}":
             functools.partial(production_ring_attention, ring_size=w, layout=layout) for w in RING_SIZES}
FAMILIES["dense"] = (naive_attention, functools.partial(naive_attention, precision="input"), rows)
for tag, cfg in DILATED.items():
    rows = {f"dilated {tag} · dilated_attention": functools.partial(dilated_attention, **cfg)}
    rows |= {f"dilated {tag} · ring_dilated · w={w}": functools.partial(ring_dilated_attention, ring_size=w, **cfg)
             for w in RING_SIZES}
    rows |= {f"dilated {tag} · production · w={w}": functools.partial(production_ring_attention, ring_size=w, **cfg)
             for w in RING_SIZES}
    FAMILIES[f"dilated {tag}"] = (functools.partial(dilated_attention_dense, **cfg),
                                  functools.partial(dilated_attention_dense, precision="input", **cfg), rows)

ROWS = [label for *_, rows in FAMILIES.values() for label in rows]
GROUPS = [i for i, label in enumerate(ROWS) if i and label.rsplit(" · ", 1)[0] != ROWS[i - 1].rsplit(" · ", 1)[0]]
COLUMNS = [(dtype, causal) for dtype in DTYPES for causal in (False, True)]
print(f"{len(ROWS)} rows × {len(COLUMNS)} columns = {len(ROWS) * len(COLUMNS)} cells, "
      f"{len(QUANTITIES)} quantities each")
for name, (*_, rows) in FAMILIES.items():
    print(f"  {name:10} {len(rows):2} rows")

# %% [markdown]
# ## 3 · The matrix
#
# For each family, dtype and mask the float64 reference and the naive
# low-precision baseline are computed once; then every row runs forward and
# backward. `errors[row, dtype, causal][x]` is $\mathrm{err}(x)$ and
# `bounds[...]` the error it is allowed.

# %%
# NBVAL_IGNORE_OUTPUT
errors, bounds = {}, {}
t0 = time.perf_counter()
progress = tqdm(total=len(FAMILIES) * len(COLUMNS), desc="matrix", unit="column")
for name, (reference, baseline, rows) in FAMILIES.items():
    for dtype, causal in COLUMNS:
        progress.set_postfix_str(f"{name}, {str(dtype)[6:]}, {'causal' if causal else 'full'}")
        ref = run(reference, dtype, causal, in_float64=True)
        base = run(baseline, dtype, causal) if dtype in HALF else None
        allowed = allowed_errors(dtype, ref, base)
        for label, fn in rows.items():
            got = run(fn, dtype, causal)
            assert got["out"].dtype == got["dq"].dtype == dtype and got["lse"].dtype == lse_dtype(dtype), label
            errors[label, dtype, causal] = {x: max_error(got[x], ref[x], f"{label} {x}") for x in QUANTITIES}
            bounds[label, dtype, causal] = allowed
        progress.update()
progress.close()
print(f"{len(errors)} cells, forward and backward, in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# ## 4 · The checks
#
# Every cell, every quantity: the error over the error it is allowed, $\rho$
# of section 1 in half precision and $\mathrm{err} / \mathrm{tol}$ in float32
# and float64. All of them must be at most 1.

# %%
def ratio(key, x):
    return errors[key][x] / bounds[key][x]


print(f"{'dtype':9} {'bound':25} {'forward: out, lse':>19} {'gradients: dq, dk, dv':>23}")
for dtype in DTYPES:
    rule = {torch.float64: f"err < {TOL64:g}", torch.float32: f"err < {TOL32:g}"}.get(dtype,
                                                                                      "err ≤ 2 err_naive + atol")
    keys = [key for key in errors if key[1] == dtype]
    line = f"{str(dtype)[6:]:9} {rule:25}"
    for part in (FORWARD, GRADIENTS):
        checked = [ratio(key, x) <= 1 for key in keys for x in part]
        line += f" {sum(checked):>4} of {len(checked):<4} pass: {all(checked)!s:5}"
        assert all(checked), (dtype, part)
    print(line)

ref_b = run(FAMILIES["dilated B"][0], torch.float64, False, in_float64=True)
print("dilated B: the reference has lse = -inf entries, and every row reproduced them exactly:",
      bool(torch.isneginf(ref_b["lse"]).any()))  # max_error asserted the -inf pattern in every cell
assert torch.isneginf(ref_b["lse"]).any()
half = min(errors[key][x] for key in errors if key[1] in HALF for x in ("out", *GRADIENTS))
print(f"every half-precision error of out, dq, dk, dv is > 20 × the float32 tolerance {TOL32:g}:", half > 20 * TOL32)
assert half > 20 * TOL32

# %% [markdown]
# The checks closest to their bound on this machine (the exact values depend
# on rounding, so this cell's output is not compared):

# %%
# NBVAL_IGNORE_OUTPUT
closest = sorted(((ratio(key, x), key, x) for key in errors for x in QUANTITIES), reverse=True)[:8]
for r, (label, dtype, causal), x in closest:
    print(f"  {label:28} {str(dtype)[6:]:9} {'causal' if causal else 'full':6} {x}: ratio {r:.2f}")
assert closest[0][0] <= 1

# %% [markdown]
# ## 5 · Why the ring casts to float32 once, before the deal
#
# `ring_attention` is differentiated by plain autograd. An earlier version
# cast each K/V block to float32 inside `attend_block` (`k.to(work)`), so in
# the backward the gradient of each *block* was rounded to the input dtype
# when it passed back through that cast, and autograd added the $w$ (for
# zigzag $2w$) block gradients of a K/V shard — one per query rank that saw
# it — **in float16 or bfloat16**:
#
# $$
# dK_{\text{shard}} = \mathrm{fl}\Big(\sum_{r=0}^{w-1} \mathrm{fl}\big(dK^{(r)}\big)\Big)
# \quad\text{instead of}\quad
# \mathrm{fl}\Big(\sum_{r=0}^{w-1} dK^{(r)}\Big).
# $$
#
# One extra rounding per block and a low-precision sum: the error grew with
# the number of blocks a shard meets, and this matrix caught it (a float16
# zigzag cell at $w = 4$ over the 2× rule, ratios up to 1.6 in other
# draws). The fix is one cast of q, k and v to the accumulator dtype
# *before* the deal, so autograd sums the block gradients in float32 and
# rounds once. `production_ring_attention` has its own backward, which
# accumulates dK and dV in float32 the same way.
#
# The cell below repeats the float16, unmasked column for several fresh
# draws, and compares the library with an explicit float32 run rounded once:
# the two agree, and the ratio no longer depends on the layout or the ring
# size.

# %%
def ring_attention_float32_grads(q, k, v, **kwargs):
    """ring_attention on float32 copies: autograd accumulates the block gradients in float32, rounded once."""
    out, lse = ring_attention(q.float(), k.float(), v.float(), **kwargs)
    return out.to(q.dtype), lse


SEEDS = range(6)
VARIANTS = {"ringbook": ring_attention, "float32 run, rounded once": ring_attention_float32_grads}
RING_ROWS = [label for label in FAMILIES["dense"][2] if label.startswith("ring_attention")]
worst_err = {(label, v): 0.0 for label in RING_ROWS for v in VARIANTS}
worst_ratio, mean_ratio = dict(worst_err), dict(worst_err)
for seed in SEEDS:  # fresh inputs for each seed; float16, no mask
    inputs = draw(seed)
    ref = run(naive_attention, torch.float16, False, in_float64=True, inputs=inputs)
    allowed = allowed_errors(torch.float16, ref, run(functools.partial(naive_attention, precision="input"),
                                                     torch.float16, False, inputs=inputs))
    for label in RING_ROWS:
        kwargs = FAMILIES["dense"][2][label].keywords
        for v, fn in VARIANTS.items():
            got = run(functools.partial(fn, **kwargs), torch.float16, False, inputs=inputs)
            assert got["dk"].dtype == torch.float16
            err = max(max_error(got[x], ref[x], x) for x in GRADIENTS)
            r = max(max_error(got[x], ref[x], x) / allowed[x] for x in GRADIENTS)
            worst_err[label, v] = max(worst_err[label, v], err)
            worst_ratio[label, v] = max(worst_ratio[label, v], r)
            mean_ratio[label, v] += r / len(SEEDS)

print(f"float16 gradients of ring_attention, {len(SEEDS)} input draws, every layout and ring size:")
for v in VARIANTS:
    flat = [mean_ratio[label, v] for label in RING_ROWS]
    worst = max(worst_ratio[label, v] for label in RING_ROWS)
    print(f"  {v}: every ratio ≤ 1: {worst <= 1}; the mean ratio is the same (to 2%) for every layout and "
          f"ring size: {max(flat) < 1.02 * min(flat)}")
    assert worst <= 1 and max(flat) < 1.02 * min(flat)

# %% [markdown]
# Left, the largest gradient error over the input draws; right, the worst
# ratio $\rho$: the same for every layout and ring size — the error of
# rounding the float32 result once.

# %%
plot_error_matrix(np.array([[worst_err[label, v] for v in VARIANTS] for label in RING_ROWS]), RING_ROWS,
                  list(VARIANTS), ratios=np.array([[worst_ratio[label, v] for v in VARIANTS] for label in RING_ROWS]),
                  ratio_labels=list(VARIANTS), groups=[4, 8],
                  title=f"ring_attention, float16, dq dk dv: worst of {len(SEEDS)} input draws",
                  ratio_title="worst ratio ρ", digits=2)

# %% [markdown]
# ## 6 · The picture
#
# One row per implementation, layout and ring size; one column per dtype and
# mask. Left: the largest error of `out` and `lse` against the float64
# reference, on a log scale: float64 sits near $10^{-15}$, float32 near
# $10^{-6}$, float16 at a few $10^{-4}$ and bfloat16 at a few $10^{-3}$,
# whatever the implementation, ring size or layout. Right: the 2× rule's ratio $\rho$, the
# larger of the two, for the half-precision columns; green passes, red
# (outlined) would fail. White lines separate the groups of rows.

# %%
def matrix(part, dtypes=DTYPES, value=lambda key, x: errors[key][x]):
    """rows × (dtype, causal): the largest ``value`` over the quantities of ``part``."""
    return np.array([[max(value((label, dtype, causal), x) for x in part) for dtype in dtypes
                      for causal in (False, True)] for label in ROWS])


def labels(dtypes):
    return [f"{str(dtype)[6:]}\n{'causal' if causal else 'full'}" for dtype in dtypes for causal in (False, True)]


def plot_part(part, what):
    return plot_error_matrix(matrix(part), ROWS, labels(DTYPES), ratios=matrix(part, HALF, ratio),
                             ratio_labels=labels(HALF), groups=GROUPS,
                             title=f"{what}: max |error| vs the float64 reference (b = {B}, n = {N}, h = {H}, "
                                   f"d = {D})")


fig_forward = plot_part(FORWARD, "forward, out and lse")
fig_forward

# %% jupyter={"source_hidden": true}
# Saved for the README and the docs (hidden in JupyterLab).
fig_forward.savefig(SAVE / "04_equivalence.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** the error depends on the dtype, not on the implementation, the
# layout or the ring size.

# %% [markdown]
# The gradients, the largest error of dq, dk and dv. They are mostly larger
# than the forward errors (the backward sums over queries as well as over
# keys); every cell is within the rule. The dilated ring rows,
# differentiated by autograd with a cast per block, grow a little with the
# ring size, but stay well within the rule.

# %%
fig_gradients = plot_part(GRADIENTS, "gradients, dq, dk and dv")
fig_gradients

# %% jupyter={"source_hidden": true}
# Saved for the README and the docs (hidden in JupyterLab).
fig_gradients.savefig(SAVE / "04_gradients.png", dpi=110, metadata={"Software": None})

# %% [markdown]
# **Takeaway:** the gradients, too, stay within the 2× rule in every cell.

# %% [markdown]
# **One quantity at a time.** Pick `out`, `lse`, `dq`, `dk` or `dv`: the
# same two heatmaps for that quantity alone. `lse` is computed in float32
# for half-precision input, so its errors are those of float32 even in the
# bfloat16 and float16 columns.

# %%
# NBVAL_IGNORE_OUTPUT
def show_quantity(quantity):
    fig = plot_error_matrix(matrix([quantity]), ROWS, labels(DTYPES), ratios=matrix([quantity], HALF, ratio),
                            ratio_labels=labels(HALF), groups=GROUPS,
                            title=f"{quantity}: max |error| vs the float64 reference")
    display(fig)
    return fig


explorer = interactive(show_quantity, quantity=Dropdown(options=QUANTITIES, value="lse", description="quantity"))
_ = display(explorer)

# %% jupyter={"source_hidden": true}
# Check (hidden in JupyterLab): changing the control redraws the figure; then it goes back.
# NBVAL_IGNORE_OUTPUT
assert explorer.result.axes[0].get_title().startswith("lse:")
explorer.children[0].value = "dk"
assert explorer.result.axes[0].get_title().startswith("dk:")
explorer.children[0].value = "lse"

# %% [markdown]
# **Summary.** Every implementation — blockwise, the ring in every layout,
# the production path, dilated attention on a ring — computes the reference
# function: to $10^{-15}$ in float64 and within $10^{-5}$ in float32, forward
# and backward, for every ring size. In bfloat16 and float16 every forward
# result and every gradient of every row is within flash-attention's 2× rule
# (section 4: all 234 gradient checks and all 156 forward checks pass in each
# dtype), `ring_attention`'s autograd gradients included, since it casts to
# float32 once before the deal (section 5). On this CPU the production rows
# run the einops kernels, not the fused ones, which is why they match
# `ring_attention` to every digit; the fused kernels are checked against the
# float64 reference on a GPU by `tools/gpu_check_production.py` and
# `tools/gpu_dilated.py` (their committed results are read in notebook 05).

# %% [markdown]
# > **What to remember**
# >
# > * Check against float64, forward and backward; in half precision allow at most twice the naive path's error in
# >   the same dtype, plus rounding.
# > * Every ringbook path passes, in every layout and ring size; where a path once failed, the check found it.
