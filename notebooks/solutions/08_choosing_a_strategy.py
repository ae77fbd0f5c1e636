"""Solutions to notebook 08's exercises (checked by ringbook.exercises)."""

import math

from ringbook.costmodel import Workload, compare


def hide_tokens(flops_rate, bandwidth, heads, kv_heads, elem_bytes, causal):
    """Fewest tokens per device c at which a forward ring hop hides: 2·c·g·d·e/B ≤ share·4·c²·h·d/F."""
    share = 0.5 if causal else 1.0  # a balanced causal hop computes half a block
    return 2 * kv_heads * elem_bytes * flops_rate / (4 * heads * share * bandwidth)


def hop_bytes(n, world, ulysses_size, heads, kv_heads, head_dim, elem_bytes):
    """K/V bytes of one ring hop: the group's chunk of n/r tokens, this member's g'/u kv heads."""
    r = world // ulysses_size
    g = kv_heads * ulysses_size // math.gcd(kv_heads, ulysses_size)  # replicated to lcm(g, u)
    return 2 * (n // r) * (g // ulysses_size) * head_dim * elem_bytes


def cluster_winner(devices, seq_len, heads, kv_heads, machine):
    """The model's fastest strategy that is not ruled out."""
    work = Workload(devices, seq_len, heads, kv_heads, 128, 2, True)
    return compare(work, machine)[0].label
