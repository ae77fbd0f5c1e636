"""Solutions to notebook 06's exercises (checked by ringbook.exercises)."""

import math


def step_bytes(strategy, n, world, heads, kv_heads, head_dim, elem_bytes):
    """Bytes one rank sends at each forward step that sends (q, K/V, out; batch 1)."""
    c, w = n // world, world
    kv_shard = 2 * c * kv_heads * head_dim * elem_bytes  # K and V of one rank's tokens
    if strategy == "ring":
        return [kv_shard] * (w - 1)  # one hop after every step but the last
    if strategy == "allgather":
        return [kv_shard * (w - 1)] if w > 1 else []  # every other rank gets my shard
    g = kv_heads * w // math.gcd(kv_heads, w)  # kv heads replicated until every rank has its own
    if w == 1:
        return []
    to_heads = (w - 1) * c * (heads + 2 * g) // w * head_dim * elem_bytes  # q and K/V of the others' heads
    back = (w - 1) * c * heads // w * head_dim * elem_bytes  # out of my heads, the others' tokens
    return [to_heads, back]


def ulysses_heads(heads, kv_heads, world, rank):
    """(query heads, kv heads in the original numbering) that Ulysses rank `rank` attends."""
    if heads % world:
        raise ValueError(f"world={world} does not divide heads={heads}")
    g = max(kv_heads, world)  # kv heads after replication (kv_heads and world divide one another)
    hq, hk = heads // world, g // world
    return list(range(rank * hq, (rank + 1) * hq)), [x // (g // kv_heads) for x in range(rank * hk, (rank + 1) * hk)]


def usp_groups(world, ulysses_size, rank):
    """(Ulysses group, ring group) of `rank`: consecutive ranks, then the same member of every group."""
    i, j = divmod(rank, ulysses_size)
    return list(range(i * ulysses_size, (i + 1) * ulysses_size)), list(range(j, world, ulysses_size))
