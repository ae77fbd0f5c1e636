"""Solutions to notebook 04's exercises (checked by ringbook.exercises)."""

import math

import torch

from ringbook import naive_attention
from ringbook.bench.rules import rounding_atol


def passes_2x_rule(out, ref64, out_naive, atol):
    """err(out) ≤ 2 · err(out_naive) + atol, errors over the finite reference entries; ±inf must match, no NaN."""
    def err(x):
        x = x.double()
        fin = torch.isfinite(ref64)
        if x.isnan().any() or not torch.equal(torch.isfinite(x), fin) or not torch.equal(x[~fin], ref64[~fin]):
            return math.inf
        return (x[fin] - ref64[fin]).abs().max().item() if fin.any() else 0.0

    return err(out) <= 2 * err(out_naive) + atol


def overflow_inputs(q, k, v):
    """Scores of a few hundred: exp overflows float32 (above ~88) unless the maximum is subtracted first."""
    return q * 64, k, v


def catches_bugs(attention):
    """The 2× rule on out and lse, in float16 and bfloat16, with and without the mask, at ordinary and large logits."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(1, 64, 2, 16, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
        for big in (1, 64):
            for causal in (False, True):
                qb = q * big
                ref = naive_attention(qb.double(), k.double(), v.double(), causal=causal)
                base = naive_attention(qb, k, v, causal=causal, precision="input")
                got = attention(qb, k, v, causal=causal)
                for g, b, r in zip(got, base, ref):
                    if not passes_2x_rule(g, r, b, rounding_atol(r, g.dtype)):
                        return False
    return True
