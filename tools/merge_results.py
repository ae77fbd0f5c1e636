"""Merge benchmark JSON files measured in one session on one machine into one results file.

The GPU sweep is run in parts (each device command has a time limit); this
joins the parts' rows, checks they come from the same device and software,
and writes the usual JSON, report and plots. A configuration (impl, mode,
seq_len, ring_size, causal) measured in several parts keeps the row of the
last part that has it (a later run replaces an earlier one, so ratios are
taken between rows of the same run):

    python tools/merge_results.py figures/bench-nvidia-h100-80gb-hbm3-bfloat16 part-a.json part-b.json
"""

import json
import sys
from pathlib import Path

from ringbook.bench import report

SAME = ("device", "torch_version", "cuda_version", "dtype", "batch", "heads", "head_dim")


def main(argv):
    if len(argv) < 3:
        raise SystemExit(__doc__)
    target, parts = Path(argv[0]), [Path(p) for p in argv[1:]]
    by_config, metas = {}, []
    for p in parts:
        data = json.loads(p.read_text())
        for r in data["rows"]:
            key = (r["impl"], r.get("mode", "forward"), r["seq_len"], r["ring_size"], r["causal"])
            by_config.pop(key, None)  # re-inserted: the later part's row, in the later part's order
            by_config[key] = r
        metas.append(data.get("meta", {}))
    rows = list(by_config.values())
    for key in SAME:
        values = {str(r.get(key)) for r in rows}
        if len(values) != 1:
            raise SystemExit(f"refusing to merge: rows differ in {key}: {sorted(values)}")
    meta = {}
    for key in sorted({k for m in metas for k in m}):  # a setting that differs between parts is kept per part
        values = [m.get(key) for m in metas]
        meta[key] = values[0] if all(v == values[0] for v in values) else values
    meta["generated"] = max(m.get("generated", "") for m in metas)
    paths = report.write_outputs(rows, target.parent, stem=target.name, meta=meta)
    for kind, path in paths.items():
        print(f"wrote {kind:<10} {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
