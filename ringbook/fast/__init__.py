"""The fast path: one ring engine on PyTorch's fused kernels.

===============  ==============================================================
module           what it holds
===============  ==============================================================
``engine``       the ring engine: one forward and one backward loop over a plan
                 of block calls, parametrised by a mover; its one autograd Function
``blocks``       block kinds: where a block's rows are (Box, Gather, Strided) and
                 which kernel it runs (FULL, CAUSAL, Positions)
``plans``        every plan, lowered from the one schedule (ringbook.schedule),
                 with its work and traffic per step as data
``tuning``       the measured knobs as one record (Tuning), carried in Settings
``state``        kernel choices, probes, status and CUDA graphs (reset_caches)
``stacked``      every rank in one process (ranks stacked in the batch):
                 :func:`production_ring_attention`
``dilated``      dilated attention as gathered blocks on the engine (one fused
                 call per pair and head group); :func:`dilated_sdpa`, the peer
``kernels``      one block of attention and its backward on the fused SDPA ops,
                 probed against the einops path before use
``merge``        equation (M) in place into float32 accumulators (torch, Triton)
``triton_merge`` the Triton kernel of the merge (imported on CUDA only)
``aten``         the private aten ops, called by keyword with a checked signature
===============  ==============================================================

The multi-process movers are in :mod:`ringbook.distributed`; their plans are in ``plans`` too.
"""

from .dilated import dilated_sdpa
from .plans import production_plan
from .stacked import production_ring_attention
from .tuning import Tuning

__all__ = ["Tuning", "dilated_sdpa", "production_plan", "production_ring_attention"]
