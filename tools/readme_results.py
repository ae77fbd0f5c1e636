"""The README's headline GPU table, generated from the committed results files.

    python tools/readme_results.py           # print the table
    python tools/readme_results.py --write   # replace the block between the README's markers

tests/test_readme.py fails when the README's block differs from what this
prints, so every number in the README comes from a file under figures/.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ringbook.report import load_rows  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
ONE_GPU = "figures/bench-nvidia-h100-80gb-hbm3-bfloat16.json"
TWO_GPU = "figures/dist-bench-nvidia-h100-80gb-hbm3-bfloat16-w2.json"
CHECK = "figures/production/gpu-check-h100.json"
LONG = "figures/bench-h100-long-4m.json"
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


def production_table() -> str:
    """production_ring_attention against the fastest SDPA backend, timed in the same run."""
    data = json.loads((ROOT / CHECK).read_text())
    rows = {(r["section"], r["name"]): r for r in data["rows"]}
    lines = [
        "| production_ring_attention, bf16, b=1 h=8 d=64 | time | TFLOP/s | × fastest SDPA (same run) |",
        "|---|---|---|---|",
    ]
    for section, name, what in [
        ("fwd", "131072 w=1 causal=False", "forward, 131K, 1 rank"),
        ("fwd", "131072 w=16 causal=False", "forward, 131K, 16 ranks"),
        ("fwd", "131072 w=16 causal=True", "forward, 131K, 16 ranks, causal zigzag"),
        ("fwd+bwd", "65536 w=8 causal=False", "forward+backward, 64K, 8 ranks"),
        ("fwd+bwd", "65536 w=8 causal=True", "forward+backward, 64K, 8 ranks, causal"),
    ]:
        r = rows[(section, name)]
        lines.append(f"| {what} | {r['ms']:,.1f} ms | {r['tflops']:.0f} | {r['ratio_vs_sdpa']:.2f}× "
                     f"({r['sdpa_best'].split('_')[0].lower()}: {r['sdpa_ms']:,.1f} ms) |")
    long_rows = {r["impl"]: r for r in load_rows(ROOT / LONG)}
    prod, peer = long_rows["production"], long_rows["sdpa_cudnn"]
    lines.append(f"| forward, {prod['seq_len']:,} tokens, 16 ranks, causal (one timed call) | "
                 f"{prod['time_ms'] / 1e3:,.1f} s, "
                 f"{prod['peak_mem_gb']:.1f} GB peak | {prod['tflops']:.0f} | "
                 f"{peer['time_ms'] / prod['time_ms']:.2f}× (cudnn: {peer['time_ms'] / 1e3:,.1f} s, "
                 f"{peer['peak_mem_gb']:.1f} GB) |")
    env = data["env"]
    lines += ["", f"From `{Path(CHECK).name}` (CUDA events, 2 warm-up calls, median of 5–7) and "
              f"`{Path(LONG).name}`: {env['device']}, PyTorch {env['torch']}, cuDNN {env['cudnn']}, "
              f"Triton {env['triton']}."]
    return "\n".join(lines)


def main(argv):
    block = table() + "\n\n" + production_table()
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
