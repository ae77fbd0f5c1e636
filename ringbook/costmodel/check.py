"""The model against every committed measurement, and beside the published anchors.

:func:`measured_cases` reads the committed benchmark files (``figures/``) and
predicts each row with the machine fitted for its device and kernel:

* multi-process rows (``figures/dist-bench-*-w*.json``, two H100s over
  NVLink): ``ring_dist`` (the einops ring, kernel ``h100-einops``),
  ``production_dist`` (the ring on cuDNN, ``h100-cudnn``), PyTorch's
  ``context_parallel`` with its all-gather rotater (the all-gather strategy,
  on the cuDNN or flash kernel the row names);
* one-process rows of ``figures/bench-*.json``: ``production`` (every rank
  played on one GPU, forward and forward+backward) and the einops ``ring``,
  ring sizes above 1.

One-process rows whose blocks are shorter than :data:`MIN_BLOCK` rows are
reported but not held to the bound: their time is the engine's per-step
bookkeeping (merges, launches) that the model does not have.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .machine import KERNELS, preset
from .model import Workload, predict

MIN_BLOCK = 8192


@dataclasses.dataclass(frozen=True)
class Case:
    """One committed row, the model's prediction of it, and the relative error."""

    source: str
    what: str
    devices: int
    seq_len: int
    causal: bool
    backward: bool
    kernel: str
    measured_ms: float
    predicted_ms: float
    held: bool  # inside the model's range (held to the bound)

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1


def _rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


def _kernel(device: str, impl: str, backend: str | None = None) -> str | None:
    gpu = "h100" if "H100" in device else "h200" if "H200" in device else None
    kind = {"ring_dist": "einops", "ring": "einops", "context_parallel": backend}.get(impl, "cudnn")
    name = f"{gpu}-{kind}"
    return name if gpu and name in KERNELS else None


def measured_cases(figures: str | Path) -> list[Case]:
    """Every committed row the model covers, predicted (see the module docstring)."""
    figures = Path(figures)
    if not figures.is_dir():
        raise ValueError(f"figures must be the folder of committed results, got {str(figures)!r}")
    cases = []
    for path in sorted(figures.glob("dist-bench-*-w*.json")) + sorted(figures.glob("bench-*.json")):
        multi = path.name.startswith("dist-bench")
        for r in _rows(path):
            impl = r.get("impl")
            if r.get("status") != "ok" or impl not in ("ring_dist", "production_dist", "context_parallel",
                                                      "production", "ring"):
                continue
            if multi == (impl in ("production", "ring")) or (not multi and r.get("ring_size", 1) < 2):
                continue
            if impl == "context_parallel" and r.get("cp_rotate_method") != "all_gather":
                continue
            kernel = _kernel(r.get("device", ""), impl, r.get("sdpa_backend"))
            if kernel is None or r.get("dtype") != "bfloat16":
                continue
            n, w, causal = r["seq_len"], r["ring_size"], bool(r["causal"])
            backward = r.get("mode") == "forward+backward"
            layout = r.get("layout") or ("zigzag" if causal else "contiguous")
            strategy = "allgather" if impl == "context_parallel" else "ring"
            work = Workload(w, n, r["heads"], r.get("kv_heads", r["heads"]), r["head_dim"], 2, causal, backward,
                            r.get("batch", 1))
            pred = predict(strategy, work, preset("h100-nvlink", kernel=kernel), layout=layout, one_process=not multi)
            what = f"{impl}{'' if multi else f' r{w}'}{' ' + r['sdpa_backend'] if impl == 'context_parallel' else ''}"
            held = multi or n // w >= MIN_BLOCK
            cases.append(Case(path.name, what, w, n, causal, backward, kernel, r["time_ms"], pred.total * 1e3, held))
    return cases
