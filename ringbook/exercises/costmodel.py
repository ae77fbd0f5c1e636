"""Exercises of notebook 08 (choosing a strategy): the overlap threshold, a hop's bytes, the winner on a cluster.

References: :func:`ringbook.costmodel.overlap_threshold`, the byte counts of
:func:`ringbook.strategy_schedule`, and :func:`ringbook.costmodel.compare`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..costmodel import Workload, compare, overlap_threshold, preset
from ..strategies import strategy_schedule
from ._core import _close, _run


def check_hide_tokens(fn: Callable) -> bool | None:
    """``fn(flops_rate, bandwidth, heads, kv_heads, elem_bytes, causal) -> c``: fewest tokens per device that hide a hop.

    Forward pass of a ring with a balanced layout; ``flops_rate`` in FLOP/s,
    ``bandwidth`` in bytes/s one way.
    """
    cases = []
    for f, b, h, g, e, causal in ((400e12, 50e9, 8, 8, 2, False), (400e12, 50e9, 32, 8, 2, False),
                                  (470e12, 380e9, 64, 8, 2, True), (300e12, 1.56e9, 8, 1, 4, True),
                                  (900e12, 12.5e9, 128, 8, 2, False)):
        want = torch.tensor(overlap_threshold(f, b, heads=h, kv_heads=g, dtype_bytes=e, causal=causal),
                            dtype=torch.float64)
        cases.append((f"F={f:.3g}, B={b:.3g}, heads={h}, kv_heads={g}, elem_bytes={e}, causal={causal}",
                      (f, b, h, g, e, causal), want, lambda got, want: _close(got, want, atol=1e-6 * float(want))))

    def hint(c):
        f, b, h, g, e, causal = c["args"]
        try:
            got = float(c["got"])
        except (TypeError, ValueError):
            return "return one number: tokens per device"
        want = float(c["want"])
        if causal and abs(got * 2 - want) < 1e-6 * want:
            return "with a causal mask a balanced hop computes half the block: the compute shrinks, the bytes do not"
        if abs(got * h / g - want) < 1e-6 * want or abs(got - want * h / g) < 1e-6 * want:
            return "the hop carries kv_heads heads, the block computes heads heads: both belong in the ratio"
        return "set the hop's seconds 2·c·g·d·e/B equal to the block's 4·c²·h·d/F and solve for c"
    return _run("hide_tokens", fn, cases, hint)


def _hop(strategy: str, n: int, w: int, h: int, g: int, d: int, e: int, u: int | None) -> int:
    sched = strategy_schedule(strategy, n, w, heads=h, kv_heads=g, head_dim=d, dtype_bytes=e, causal=True,
                              layout="zigzag", ulysses_size=u)
    return max(m.nbytes for st in sched if st.collective == "p2p" for m in st.messages if m.src == 0)


def check_hop_bytes(fn: Callable) -> bool | None:
    """``fn(n, world, ulysses_size, heads, kv_heads, head_dim, elem_bytes) -> bytes``: one ring hop's K/V message.

    The ring (``ulysses_size=1``) or the ring part of the hybrid: what rank 0
    sends to the next group at one step, batch 1.
    """
    cases = []
    for n, w, u, h, g, d, e in ((1024, 4, 1, 8, 8, 16, 2), (1024, 8, 2, 8, 2, 16, 2), (2048, 8, 4, 16, 2, 32, 2),
                                (1024, 8, 4, 8, 8, 64, 4), (4096, 16, 8, 32, 4, 16, 2)):
        want = torch.tensor(_hop("usp" if u > 1 else "ring", n, w, h, g, d, e, u if u > 1 else None),
                            dtype=torch.float64)
        cases.append((f"n={n}, world={w}, ulysses_size={u}, heads={h}, kv_heads={g}, head_dim={d}, elem_bytes={e}",
                      (n, w, u, h, g, d, e), want, lambda got, want: _close(got, want, atol=0.5)))

    def hint(c):
        n, w, u, h, g, d, e = c["args"]
        try:
            got = float(c["got"])
        except (TypeError, ValueError):
            return "return one number of bytes"
        if u > 1 and abs(got - 2 * (n // w) * g * d * e) < 0.5:
            return "in the hybrid a hop carries the group's chunk (n/r tokens), for this member's share of kv heads"
        if u > 1 and g < u and abs(got - 2 * (n // (w // u)) * (g / u) * d * e) < 0.5:
            return "with fewer kv heads than the group has members, kv heads are replicated first: g' = lcm(g, u)"
        return "K and V both travel: 2 · tokens · kv heads · head_dim · elem_bytes"
    return _run("hop_bytes", fn, cases, hint)


CLUSTERS = (  # (devices, seq_len, heads, kv_heads, preset, inter link)
    (8, 1 << 17, 8, 8, "h100-nvlink", "ib"),
    (16, 1 << 17, 32, 32, "h100-nvlink", "tcp"),
    (64, 1 << 16, 64, 8, "h100-nvlink", "ib"),
    (16, 1 << 16, 16, 2, "h100-nvlink", "tcp"),
)


def _winner(w, n, h, g, name, inter) -> str:
    return compare(Workload(w, n, h, g, 128, 2, True), preset(name, inter=inter))[0].label


def check_cluster_winner(fn: Callable) -> bool | None:
    """``fn(devices, seq_len, heads, kv_heads, machine) -> label``: the model's fastest strategy (causal, d=128).

    ``machine`` is a :class:`ringbook.costmodel.Machine`; the label is the
    :attr:`~ringbook.costmodel.Prediction.label` of the winner, e.g.
    ``"ring (zigzag)"`` or ``"hybrid 8×2"``.
    """
    cases = []
    for w, n, h, g, name, inter in CLUSTERS:
        want = _winner(w, n, h, g, name, inter)
        cases.append((f"devices={w}, seq_len={n}, heads={h}, kv_heads={g}, {name} with {inter} across nodes",
                      (w, n, h, g, preset(name, inter=inter)), want, lambda got, want: got == want))

    def hint(c):
        if c["got"] == "ring (contiguous)":
            return "causal: the contiguous ring leaves the last rank with most of the work"
        return "ask the model for every candidate (compare) and take the fastest that is not ruled out"
    return _run("cluster_winner", fn, cases, hint)
