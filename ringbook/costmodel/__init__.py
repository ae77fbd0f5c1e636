"""Choosing a strategy: a cost model and a step simulator, checked against measurements (notebook 08).

* :mod:`.machine` — the kernel's rate per call size (fitted from committed
  benchmark rows), links, memory; presets with their sources.
* :mod:`.model` — a :class:`Workload`, every strategy's schedule
  (:func:`ringbook.strategy_schedule`) turned into compute and transfer
  seconds per step, memory per device, constraints; :func:`compare`.
* :mod:`.visible` — the pairs a block's documents and window leave, and the
  tiles a fused kernel computes for them, in closed form.
* :mod:`.simulate` — one compute and one communication stream per device.
* :mod:`.check` — the model against every committed measurement and the
  published anchors.

Needs only the standard library and ringbook (no plotting).
"""

from .machine import (
    FUSED,
    KERNELS,
    LINKS,
    PRESETS,
    FusedMasked,
    KernelRate,
    Link,
    Machine,
    fit_kernel,
    fit_rows,
    preset,
)
from .model import (
    Prediction,
    StepCost,
    Workload,
    candidates,
    compare,
    fold_bytes,
    ideal,
    memory_per_device,
    overlap_threshold,
    packed,
    pass_kv_preferred,
    predict,
)
from .simulate import Interval, Phase, Timeline, Transfer, simulate

__all__ = [
    "FUSED", "KERNELS", "LINKS", "PRESETS", "FusedMasked", "KernelRate", "Link", "Machine", "fit_kernel", "fit_rows",
    "preset",
    "Prediction", "StepCost", "Workload", "candidates", "compare", "fold_bytes", "ideal", "memory_per_device",
    "overlap_threshold", "packed", "pass_kv_preferred", "predict",
    "Interval", "Phase", "Timeline", "Transfer", "simulate",
]
