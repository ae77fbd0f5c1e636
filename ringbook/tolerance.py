"""The project's one tolerance table: the largest error a result may have in each input dtype.

It sits below the fast path and the benchmark, which both read it: the
fast path's kernel probes and CUDA-graph check (:mod:`ringbook.fast`), the
benchmark's row verdict (:mod:`ringbook.bench.rules`, which re-exports it),
the tests, the notebooks and ``tools/``. A benchmark row whose
``max_rel_err`` against the float64 reference exceeds ``TOLERANCE[dtype]``
is a wrong answer (status ``error``).
"""

from __future__ import annotations

import torch

TOLERANCE: dict[torch.dtype, float] = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4,
                                       torch.float64: 1e-9}
