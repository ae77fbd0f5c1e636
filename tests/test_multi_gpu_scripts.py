"""The per-machine scripts of the multi-GPU runs (tools/multi_gpu/), rehearsed on the CPU with gloo.

The multi-GPU machines are not lent yet; when one is, its script must run as
it is. Here the same three sweeps run at tiny sizes (RINGBOOK_MULTI_GPU_SMOKE=1):
every step exits 0 and writes rows that are ok (or "not run" for the CUDA-only
context_parallel peer), with the scaling summary the issue asks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringbook import distributed as rd

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_two_gpu_script_rehearses_on_the_cpu(tmp_path):
    env = {**os.environ, "RINGBOOK_MULTI_GPU_SMOKE": "1", "OUT": str(tmp_path), "MASTER_PORT": str(rd.free_port()),
           "TORCHRUN": str(Path(sys.executable).with_name("torchrun")), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "tools/multi_gpu/h200-x2.sh")], capture_output=True, text=True,
                          timeout=420, env=env, cwd=ROOT)
    logs = {p.name: p.read_text()[-1500:] for p in tmp_path.glob("*.log")}
    assert proc.returncode == 0, proc.stdout + proc.stderr + json.dumps(logs, indent=1)
    assert proc.stdout.split("\n")[:3] == [f"h200-x2-{s}: exit 0" for s in ("dense", "dilated", "fwd-bwd")]
    for step, ring in (("dense", "production_dist"), ("dilated", "production_dilated_dist"),
                       ("fwd-bwd", "production_dist")):
        data = json.loads((tmp_path / f"h200-x2-{step}.json").read_text())
        rows = data["rows"]
        assert {r["causal"] for r in rows} == {False, True}
        for r in rows:
            assert r["status"] == "ok" or r["error"].startswith("not run: context_parallel"), r
        assert sum(r["impl"] == ring for r in rows) == 2
        summary = data["meta"]["scaling"]
        assert all(s["impl"] == ring and s["parallel_efficiency"] is not None for s in summary)
        if step != "fwd-bwd":
            assert all(s["stacked_time_ms"] is not None for s in summary)
        else:
            assert all(r["mode"] == "forward+backward" for r in rows)
