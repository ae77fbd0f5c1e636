"""Context parallelism over real processes (``torch.distributed``): one rank per process, every wait with a deadline.

==============  ==============================================================
module          what it holds
==============  ==============================================================
``shards``      :func:`shard` / :func:`unshard`: a sequence cut into each rank's
                shard and put back, for any layout
``comm``        point-to-point exchange and collectives with deadlines, the
                one cross-rank agreement on the inputs
``entry``       the one distributed entry: open the group, run a strategy's
                plan and mover on the ring engine
``ring``        :func:`ring_attention` and :func:`production_ring_attention`:
                the ring engine with a P2P mover and this rank's plan
``allgather``   :func:`allgather_attention`: K/V all-gathered (Llama 3), dK/dV
                reduce-scattered
``ulysses``     :func:`ulysses_attention`: all-to-all to head shards and back
``usp``         :func:`usp_attention`: Ulysses inside groups, the ring across
``dilated``     :func:`ring_dilated_attention`: dilated attention over the
                ranks, only spanning segments exchanging dilated K/V
``launch``      :func:`spawn`: run a function on ``w`` local processes (gloo)
==============  ==============================================================

Importing this package starts nothing.
"""

from .allgather import allgather_attention
from .comm import DEFAULT_TIMEOUT_S
from .dilated import ring_dilated_attention
from .launch import SpawnError, free_port, spawn
from .ring import production_ring_attention, ring_attention
from .shards import shard, unshard
from .ulysses import ulysses_attention
from .usp import usp_attention

__all__ = [
    "ring_attention", "production_ring_attention", "allgather_attention", "ulysses_attention", "usp_attention",
    "ring_dilated_attention", "shard", "unshard", "spawn",
    "SpawnError", "free_port", "DEFAULT_TIMEOUT_S",
]
