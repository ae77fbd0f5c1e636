"""Ring attention over real processes (``torch.distributed``): one rank per process, every wait with a deadline.

==============  ==============================================================
module          what it holds
==============  ==============================================================
``shards``      :func:`shard` / :func:`unshard`: a sequence cut into each rank's
                shard and put back, for any layout
``comm``        point-to-point exchange with deadlines, the cross-rank
                agreement on the inputs
``ring``        :func:`ring_attention` and :func:`production_ring_attention`:
                the ring engine with a P2P mover and this rank's plan
``dilated``     :func:`ring_dilated_attention`: dilated attention over the
                ranks, only spanning segments exchanging dilated K/V
``launch``      :func:`spawn`: run a function on ``w`` local processes (gloo)
==============  ==============================================================

Importing this package starts nothing.
"""

from .comm import DEFAULT_TIMEOUT_S
from .dilated import ring_dilated_attention
from .launch import SpawnError, free_port, spawn
from .ring import production_ring_attention, ring_attention
from .shards import shard, unshard

__all__ = [
    "ring_attention", "production_ring_attention", "ring_dilated_attention", "shard", "unshard", "spawn",
    "SpawnError", "free_port", "DEFAULT_TIMEOUT_S",
]
