"""Solutions to notebook 03's exercises (checked by ringbook.exercises)."""


def kept_positions(n, segment, rate, offset):
    """Positions whose index inside their segment is ≡ offset (mod rate)."""
    return [p for p in range(n) if p % segment % rate == offset]


def pair_scores(n, segment, rate, causal):
    """n/s segments of m = s/r kept tokens: m² scores each, or m(m+1)/2 with the mask."""
    m = segment // rate
    return n // segment * (m * (m + 1) // 2 if causal else m * m)


def rows_sent(n, ring_size, segment, rate, offset, causal):
    """Per rank: kept rows of its piece of every segment it shares, times the ranks that receive them."""
    c = n // ring_size
    sent = [0] * ring_size
    for start in range(0, n, segment):
        ranks = list(range(start // c, (start + segment - 1) // c + 1))
        for i, rank in enumerate(ranks):
            piece = range(max(start, rank * c), min(start + segment, (rank + 1) * c))
            kept = sum((p - start) % rate == offset for p in piece)
            receivers = len(ranks) - 1 - i if causal else len(ranks) - 1
            sent[rank] += kept * receivers
    return sent
