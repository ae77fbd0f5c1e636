"""Solutions to notebook 02's exercises (checked by ringbook.exercises)."""

import math

import torch

from ringbook.exercises import block_backward


def zigzag_positions(n, world, rank):
    """Chunks r and 2w − 1 − r of 2w equal chunks."""
    c = n // (2 * world)
    first, second = rank, 2 * world - 1 - rank
    return list(range(first * c, (first + 1) * c)) + list(range(second * c, (second + 1) * c))


def causal_skip(rank, step, world):
    """Contiguous and causal: the held shard came from rank (r − t) mod w; skipped if that is a later rank."""
    return (rank - step) % world > rank


def toy_ring_attention(q, k, v, w):
    """w ranks in turn: each keeps its queries, attends the K/V shard it holds, merges by (M), passes the shard on."""
    c, scale = q.shape[0] // w, q.shape[1] ** -0.5
    queries = q.split(c)
    held = list(zip(k.split(c), v.split(c)))  # the K/V shard each rank holds; at step 0 its own
    out = [torch.zeros_like(x) for x in queries]
    lse = [torch.full((c,), -math.inf, dtype=q.dtype) for _ in queries]
    for _ in range(w):
        for r in range(w):
            k_b, v_b = held[r]
            s_b = queries[r] @ k_b.T * scale
            lse_b, out_b = torch.logsumexp(s_b, dim=1), torch.softmax(s_b, dim=1) @ v_b
            merged = torch.logaddexp(lse[r], lse_b)  # equation (M)
            out[r] = torch.exp(lse[r] - merged)[:, None] * out[r] + torch.exp(lse_b - merged)[:, None] * out_b
            lse[r] = merged
        held = held[-1:] + held[:-1]  # the send: the shard held by rank r moves to rank r + 1
    return torch.cat(out), torch.cat(lse)


def classify_block(q_pos, k_pos):
    """Full when the latest key is at or before the earliest query; skip when the earliest key is after the latest."""
    if k_pos.max() <= q_pos.min():
        return "full"
    if k_pos.min() > q_pos.max():
        return "skip"
    return "causal"


def toy_ring_backward(q, k, v, out, lse, dout, w):
    """dQ stays home; dK/dV travel with their K/V shard; one more hop after the last step brings them home."""
    c = q.shape[0] // w
    rows = [slice(r * c, (r + 1) * c) for r in range(w)]
    dq = [torch.zeros_like(q[s]) for s in rows]
    held = [(k[s], v[s], torch.zeros_like(k[s]), torch.zeros_like(v[s])) for s in rows]  # K, V, dK, dV
    for _ in range(w):
        for r in range(w):
            k_b, v_b, dk_b, dv_b = held[r]
            g_q, g_k, g_v = block_backward(q[rows[r]], k_b, v_b, out[rows[r]], lse[rows[r]], dout[rows[r]])
            dq[r] = dq[r] + g_q
            held[r] = (k_b, v_b, dk_b + g_k, dv_b + g_v)
        held = held[-1:] + held[:-1]  # the send; after the last step this is the final hop: dK/dV arrive home
    return torch.cat(dq), torch.cat([h[2] for h in held]), torch.cat([h[3] for h in held])


def overlap_threshold(flops_per_s, bytes_per_s, elem_bytes, causal):
    """Compute 4·b·h·c²·d·[½ if causal] / F equals transfer 2·b·c·h·d·e / B at c = e·F / (2·B) (twice that causal)."""
    work = 0.5 if causal else 1.0
    return elem_bytes * flops_per_s / (2.0 * work * bytes_per_s)
