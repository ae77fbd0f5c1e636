"""The README's headline GPU table, generated from the committed results files.

    python tools/readme_results.py           # print the table
    python tools/readme_results.py --write   # replace the block between the README's markers

tests/test_readme.py fails when the README's block differs from what this
prints, so every number in the README comes from a file under figures/.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ringbook.report import load_rows  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
ONE_GPU = "figures/bench-nvidia-h100-80gb-hbm3-bfloat16.json"
TWO_GPU = "figures/dist-bench-nvidia-h100-80gb-hbm3-bfloat16-w2.json"
SEQ = 131072
SHOW = [  # (file, impl, ring_size, what it is)
    (ONE_GPU, "sdpa_cudnn", 1, "PyTorch SDPA, cuDNN backend (the peer)"),
    (ONE_GPU, "sdpa_flash", 1, "PyTorch SDPA, flash backend"),
    (ONE_GPU, "blockwise", 1, "ringbook blockwise (einops online softmax)"),
    (ONE_GPU, "ring", 1, "ringbook ring, one process, 1 rank (einops)"),
    (ONE_GPU, "ring", 16, "ringbook ring, one process playing 16 ranks (einops)"),
    (ONE_GPU, "ring_dilated", 8, "ringbook dilated V2, 8 ranks, seed config (dilated work)"),
    (TWO_GPU, "ring_dist", 2, "ringbook ring over NCCL, 2 GPUs (einops); memory per GPU"),
]


def _cell(row):
    if row is None:
        return "not measured"
    if row["status"] != "ok":
        return row["status"]
    return f"{row['time_ms']:,.1f} ms · {row['tflops']:.3g} TFLOP/s · {row['peak_mem_gb']:.2f} GB"


def table() -> str:
    cache, first = {}, None
    lines = [
        f"| seq {SEQ:,}, bf16, b=1 h=8 d=64 | non-causal | causal | file |",
        "|---|---|---|---|",
    ]
    for path, impl, ring, what in SHOW:
        rows = cache.setdefault(path, load_rows(ROOT / path))
        first = first or rows[0]
        pick = {c: next((r for r in rows if r["impl"] == impl and r["ring_size"] == ring and r["causal"] == c
                         and r["seq_len"] == SEQ), None) for c in (False, True)}
        lines.append(f"| {what} | {_cell(pick[False])} | {_cell(pick[True])} | `{Path(path).name}` |")
    lines.append("")
    lines.append(f"Measured on {first['device']}, PyTorch {first['torch_version']}; median of timed calls "
                 "(CUDA events), peak memory from `max_memory_allocated`, every row checked against the "
                 "float64 reference.")
    return "\n".join(lines)


def main(argv):
    block = table()
    if "--write" not in argv:
        print(block)
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{block}\n{END}{tail}")
    print(f"updated {readme}")


if __name__ == "__main__":
    main(sys.argv[1:])
