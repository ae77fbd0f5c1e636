"""ringbook: learn, check and measure ring attention.

Tensors are ``b n h d`` (batch, sequence, heads, head_dim); the log-sum-exp
``lse`` is ``b h n``. Every attention function takes ``(q, k, v, *,
causal=..., scale=..., <variant options>)`` and returns ``(out, lse)``.

``import ringbook`` needs only torch and einops: plotting, widgets and the
benchmark import matplotlib and ipywidgets only when they are used.

Input rules, the same for every implementation (checked once, in
``ringbook._utils.check_qkv``):

* a q, k or v with a zero-size batch, seq, heads or head_dim is refused
  with a ValueError naming the tensor, the dimension and the shape;
* non-finite input (NaN, +inf, -inf in q, k or v) is refused with a
  ValueError naming the tensor, the first offending index and what it is
  while :func:`check_finite` is on (``with ringbook.check_finite(): ...``,
  ``ringbook.check_finite()``, or ``RINGBOOK_CHECK_FINITE=1`` at import);
  without it, a NaN/inf reaches at least every output row that sees it
  (the query itself, or a query whose visible keys include it: a NaN makes
  such rows' out NaN), and may reach other rows too: which ones is
  implementation-defined. The exact contract, and a known gap of the CUDA
  fused merge, is in :func:`check_finite`.

Derivatives: the einops implementations (``naive_attention``,
``merge_partials``, ``attend_block``, ``blockwise_attention``,
``ring_attention``, ``dilated_attention``, ``dilated_attention_dense``,
``ring_dilated_attention``) are twice differentiable (``create_graph=True``
gives exact second derivatives). Those built on custom autograd Functions
(``production_ring_attention``, ``ringbook.fast.kernels.block_attention``,
``ringbook.distributed.ring_attention`` and ``production_ring_attention``)
are once differentiable: their backward raises a RuntimeError under
``create_graph=True`` instead of returning NaN or wrong second derivatives.
"""

from ._utils import check_finite
from .dilated import dilated_attention, dilated_attention_dense, dilated_flops, dilated_weights
from .fast.plans import production_plan
from .fast.stacked import production_ring_attention
from .naive import causal_mask, naive_attention
from .online_softmax import attend_block, blockwise_attention, merge_partials, online_softmax_trace
from .ring import ring_attention
from .ring_dilated import dilated_ring_plan, ring_dilated_attention
from .schedule import LAYOUTS, layout_positions, ring_schedule, work_per_rank
from .strategies import allgather_attention, strategy_schedule, ulysses_attention, usp_attention

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
    "allgather_attention",
    "ulysses_attention",
    "usp_attention",
    "strategy_schedule",
    "layout_positions",
    "work_per_rank",
    "LAYOUTS",
    "check_finite",
    "__version__",
]
