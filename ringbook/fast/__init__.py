"""The fast path: one ring engine on PyTorch's fused kernels.

===============  ==============================================================
module           what it holds
===============  ==============================================================
``engine``       the ring engine: one forward and one backward loop over a plan
                 of block calls, parametrised by a mover; its one autograd Function
``stacked``      every rank in one process (ranks stacked in the batch): the
                 production plan, :func:`production_ring_attention`
``dilated``      dilated attention as gathered blocks on the engine (one fused
                 call per pair and head group); :func:`dilated_sdpa`, the peer
``kernels``      one block of attention and its backward on the fused SDPA ops,
                 probed against the einops path before use
``merge``        equation (M) in place into float32 accumulators (torch, Triton)
``triton_merge`` the Triton kernel of the merge (imported on CUDA only)
``aten``         the private aten ops, called by keyword with a checked signature
===============  ==============================================================

The multi-process movers and plans are in :mod:`ringbook.distributed`.
"""

from .dilated import dilated_sdpa
from .stacked import production_plan, production_ring_attention

__all__ = ["production_plan", "production_ring_attention", "dilated_sdpa"]
