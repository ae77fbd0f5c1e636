"""One palette for every figure, so a colour means the same thing in every notebook and results plot."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

# One palette for every notebook, so a colour means the same thing throughout.
COLORS = {
    "score": "#4c72b0",
    "seen": "#4c72b0",
    "unseen": "#c7c7c7",
    "max": "#c44e52",
    "norm": "#55a868",
    "exact": "#222222",
    "partial": "#dd8452",
    "safe": "#55a868",
    "overflow": "#c44e52",
}
DTYPE_COLORS = {
    torch.float16: "#8172b3",
    torch.bfloat16: "#937860",
    torch.float32: "#da8bc3",
    torch.float64: "#8c8c8c",
}
BLOCK_CMAP = "tab10"
ERROR_FLOOR = 1e-18  # errors of exactly 0 are drawn here (log axes)
RANK_CMAP = "tab10"  # rank r is drawn in colour r everywhere in notebook 02
PAIR_CMAP = "Dark2"  # pair p (segment length, dilation rate) is drawn in colour p in notebook 03
KIND_COLORS = {"local": "#55a868", "exchanged": "#dd8452"}
UNCOVERED = "#c44e52"
# one colour per implementation in the results figures (notebook 05, the report plots)
IMPL_COLORS = {
    "ring": "#4c72b0", "ring_dist": "#4c72b0", "ring_dilated": "#55a868", "production": "#c44e52",
    "blockwise": "#8172b3", "naive": "#937860", "sdpa": "#8c8c8c", "sdpa_cudnn": "#222222",
    "sdpa_flash": "#dd8452", "sdpa_efficient": "#da8bc3", "production_dilated": "#17becf",
    "production_dist": "#c44e52", "context_parallel": "#8172b3",
}
# one colour per context-parallel strategy (notebook 06) and per kind of message on the wire
STRATEGY_COLORS = {"ring": "#4c72b0", "allgather": "#dd8452", "ulysses": "#55a868", "usp": "#8172b3"}
MESSAGE_COLORS = {"K/V": "#4c72b0", "q": "#dd8452", "out": "#55a868", "lse": "#937860", "dK/dV": "#c44e52",
                  "dout": "#55a868", "dq": "#dd8452", "dlse": "#937860"}
# line style and marker per ring size in the results figures
RING_STYLES = {1: ("-", "o"), 2: ("-", "P"), 4: ("--", "s"), 8: ("-.", "^"), 16: (":", "D")}


def rank_color(r: int) -> tuple[float, float, float, float]:
    """Rank r's colour (the same in every figure of the ring)."""
    return plt.get_cmap(RANK_CMAP)(r % 10)


def pair_color(p: int) -> tuple[float, float, float, float]:
    """The colour of (segment length, dilation rate) pair p."""
    return plt.get_cmap(PAIR_CMAP)(p % 8)
