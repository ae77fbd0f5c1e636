"""Solutions to notebook 03's exercises (checked by ringbook.exercises)."""


def kept_positions(n, segment, rate, offset):
    """Positions whose index inside their segment is ≡ offset (mod rate)."""
    return [p for p in range(n) if p % segment % rate == offset]
