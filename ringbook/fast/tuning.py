"""The fast path's tuning knobs as one record of data: :class:`Tuning`, carried in the engine's Settings.

Every knob was chosen by a measurement (``tools/gpu_dense.py``,
``tools/gpu_check_production.py``; the results are in ``figures/production/``);
tools and tests change them by passing another record
(``production_ring_attention(..., tuning=Tuning(merge_group=1))``), never by
flipping a module global, and a captured CUDA graph is keyed on them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How the fused rings run (none of it changes what they compute, beyond rounding).

    * ``merge_group`` — block results a one-process ring holds and folds into
      its float32 accumulators in one pass (the Triton merge's
      ``MAX_BLOCKS``, 8, at most per kernel call); the backward sums as many
      blocks' gradients per pass. ``rank_merge_group`` / ``rank_grad_group``:
      the same for one rank of a process group.
    * ``overlap`` — on CUDA the backward's gradient sums run on a second
      stream, under the next block's kernel.
    * ``triton`` — use the Triton merge and gradient sums where they pass
      their self-check (False: torch ops, an ablation);
      ``merge_launch`` / ``add_launch``: their launch shapes (elements per
      program, warps), measured on an H200
      (``figures/production/gpu-dense-tune-h200.json``).
    * ``doubled_kv_fraction`` — the one-process ring writes its stacked K/V
      twice (one launch per step where the held shards wrap round the ring)
      and holds grouped results while these take at most this fraction of
      the free memory.
    * ``parts_min_extra_bytes`` / ``parts_extra_fraction`` — a one-process
      forward whose extra memory would pass max(min bytes, fraction × (inputs
      + output)) runs its query ranks in parts.
    * ``graph_max_bytes`` — with ``graph="auto"``, forward calls whose q is at
      most this big are replayed from a CUDA graph.
    """

    merge_group: int = 8
    rank_merge_group: int = 4
    rank_grad_group: int = 2
    overlap: bool = True
    triton: bool = True
    merge_launch: tuple[int, int] = (1024, 2)
    add_launch: tuple[int, int] = (2048, 8)
    doubled_kv_fraction: float = 0.1
    parts_min_extra_bytes: int = 2 << 30
    parts_extra_fraction: float = 0.25
    graph_max_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("merge_group", "rank_merge_group", "rank_grad_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Tuning.{name} must be a positive int, got {value!r}")
        for name in ("merge_launch", "add_launch"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, int) and x > 0 for x in value)):
                raise ValueError(f"Tuning.{name} must be (elements, warps), two positive ints, got {value!r}")
        for name in ("doubled_kv_fraction", "parts_extra_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"Tuning.{name} must be a number ≥ 0, got {value!r}")
        for name in ("parts_min_extra_bytes", "graph_max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Tuning.{name} must be an int ≥ 0, got {value!r}")
        for name in ("overlap", "triton"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Tuning.{name} must be a bool, got {getattr(self, name)!r}")


DEFAULT = Tuning()


def check_tuning(tuning: Tuning | None) -> Tuning:
    """``tuning`` (None: :data:`DEFAULT`), refused by name if it is not a :class:`Tuning`."""
    if tuning is None:
        return DEFAULT
    if not isinstance(tuning, Tuning):
        raise TypeError(f"tuning must be a ringbook.fast.tuning.Tuning (or None), got {type(tuning).__name__}")
    return tuning
