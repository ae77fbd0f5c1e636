"""Notebook 02's memory claims against the committed GPU measurement (moved here from the notebook's cells)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ringbook.bench.results import load_rows
from ringbook.demo import fused_memory_bytes, ring_memory_bytes

MEASURED = Path(__file__).resolve().parents[1] / "figures" / "dist-bench-nvidia-h100-80gb-hbm3-bfloat16-w2.json"
ALLOWANCE_GB = 0.1  # library workspaces (cuBLAS): allocated once, independent of n


def _rows():
    if not MEASURED.exists():
        pytest.skip(f"{MEASURED.name} is not committed")
    rows = [r for r in load_rows(MEASURED) if r.get("per_rank_peak_mem_gb")]
    assert rows, f"{MEASURED.name} has no row with a measured per-rank peak"
    return rows


def _terms(r):
    return ring_memory_bytes(r["seq_len"], r["ring_size"], batch=r.get("batch", 1), heads=r.get("heads", 8),
                             head_dim=r.get("head_dim", 64), dtype=getattr(torch, r["dtype"]), causal=r["causal"])


def test_every_measured_peak_is_within_the_einops_bound():
    for r in _rows():
        bound = sum(_terms(r).values()) / 1e9
        assert max(r["per_rank_peak_mem_gb"]) <= bound + ALLOWANCE_GB, (r["seq_len"], r["causal"])


def test_causal_peaks_follow_the_bound_with_tiles_of_one_zigzag_piece():
    for r in (r for r in _rows() if r["causal"]):
        terms = _terms(r)
        piece_bound = (sum(terms.values()) - terms["score tiles"] / 2) / 1e9  # tiles of c/2 query rows
        ratio = max(r["per_rank_peak_mem_gb"]) / piece_bound
        assert 0.8 <= ratio <= 1.0 + ALLOWANCE_GB / piece_bound, (r["seq_len"], ratio)


def test_fused_memory_is_linear_in_the_shard_and_counts_the_backward():
    kw = {"batch": 1, "heads": 8, "head_dim": 64, "dtype": torch.bfloat16}
    a = fused_memory_bytes(2**16, 2, **kw)
    assert a == fused_memory_bytes(2**17, 4, **kw)
    assert {k: 2 * v for k, v in a.items()} == fused_memory_bytes(2**17, 2, **kw)
    s = 2**15 * 8 * 64
    assert a["q, k, v shards"] == 3 * s * 2 and a["K/V buffers in flight"] == 4 * s * 2
    bwd = fused_memory_bytes(2**16, 2, backward=True, **kw)
    assert bwd["dK/dV in flight"] == 4 * s * 4 and bwd["dQ"] == s * 4
