"""ringbook: learn, check and measure ring attention.

Tensors are ``b n h d`` (batch, sequence, heads, head_dim); the log-sum-exp
``lse`` is ``b h n``. Every attention function takes ``(q, k, v, *,
causal=..., scale=..., <variant options>)`` and returns ``(out, lse)``.

``import ringbook`` needs only torch and einops: plotting, widgets and the
benchmark import matplotlib and ipywidgets only when they are used.
"""

from .dilated import dilated_attention, dilated_attention_dense, dilated_flops, dilated_weights
from .naive import causal_mask, naive_attention
from .online_softmax import attend_block, blockwise_attention, merge_partials, online_softmax_trace
from .production import production_plan, production_ring_attention
from .ring import ring_attention
from .ring_dilated import dilated_ring_plan, ring_dilated_attention
from .schedule import LAYOUTS, layout_positions, ring_schedule, work_per_rank

__version__ = "0.1.0"

__all__ = [
    "naive_attention",
    "causal_mask",
    "merge_partials",
    "attend_block",
    "blockwise_attention",
    "online_softmax_trace",
    "ring_attention",
    "production_ring_attention",
    "production_plan",
    "dilated_attention",
    "dilated_attention_dense",
    "dilated_weights",
    "dilated_flops",
    "ring_dilated_attention",
    "dilated_ring_plan",
    "ring_schedule",
    "layout_positions",
    "work_per_rank",
    "LAYOUTS",
    "__version__",
]
