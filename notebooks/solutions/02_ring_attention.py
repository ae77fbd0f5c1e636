"""Solutions to notebook 02's exercises (checked by ringbook.exercises)."""


def zigzag_positions(n, world, rank):
    """Chunks r and 2w − 1 − r of 2w equal chunks."""
    c = n // (2 * world)
    first, second = rank, 2 * world - 1 - rank
    return list(range(first * c, (first + 1) * c)) + list(range(second * c, (second + 1) * c))


def causal_skip(rank, step, world):
    """Contiguous and causal: the held shard came from rank (r − t) mod w; skipped if that is a later rank."""
    return (rank - step) % world > rank
