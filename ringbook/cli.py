"""Command line: ``python -m ringbook bench`` (the main job) and ``python -m ringbook report``."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import torch


def _bool_list(text: str) -> list[bool]:
    choices = {"false": [False], "true": [True], "both": [False, True]}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"--causal must be false, true or both, got {text!r}")
    return choices[text.lower()]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seq(text: str) -> int:
    """Sequence lengths accept a K/M suffix: 16K = 16384, 1M = 1048576."""
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2}.get(t[-1:], 1)
    return _positive(t[:-1] if mult > 1 else t) * mult


def build_parser() -> argparse.ArgumentParser:
    from .bench import DTYPES, IMPLS

    parser = argparse.ArgumentParser(prog="python -m ringbook", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="run the benchmark sweep (defaults sized to the device)",
                       description="Measure attention implementations; writes JSON, a Markdown report and "
                                   "PNG plots. Every option defaults to the embedded sweep for the device found.")
    b.add_argument("--impl", nargs="+", choices=sorted(IMPLS), help="implementations to measure")
    b.add_argument("--seq-lens", nargs="+", type=_seq, help="sequence lengths (e.g. 4096 16K 1M)")
    b.add_argument("--ring-sizes", nargs="+", type=_positive, help="ring sizes (ring implementations only)")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (default bf16 on GPU, fp32 on CPU)")
    b.add_argument("--causal", type=_bool_list, help="false, true or both (default both)")
    b.add_argument("--batch", type=_positive)
    b.add_argument("--heads", type=_positive)
    b.add_argument("--head-dim", type=_positive)
    b.add_argument("--warmup", type=int)
    b.add_argument("--repeats", type=_positive)
    b.add_argument("--max-row-seconds", type=float, help="do not run a call predicted to take longer")
    b.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    b.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default figures/)")
    b.add_argument("--stem", help="file name stem (default bench-<device>-<dtype>)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--backward", action="store_true",
                   help="time forward + backward (out.backward(dout)) instead of the forward")

    r = sub.add_parser("report", help="redraw the report and plots from a results JSON file")
    r.add_argument("json", type=Path)
    r.add_argument("--out", type=Path, help="output folder (default: beside the JSON)")
    return parser


def _config_from_args(args):
    from .bench import DTYPES, default_config

    config = default_config(args.device)
    for field, value in (("impls", args.impl), ("seq_lens", args.seq_lens), ("ring_sizes", args.ring_sizes),
                         ("causal", args.causal), ("batch", args.batch), ("heads", args.heads),
                         ("head_dim", args.head_dim), ("warmup", args.warmup), ("repeats", args.repeats),
                         ("max_row_seconds", args.max_row_seconds)):
        if value is not None:
            setattr(config, field, value)
    if args.dtype:
        config.dtype = DTYPES[args.dtype]
    config.backward = args.backward
    return config


def print_table(rows: list[dict], file=sys.stdout) -> None:
    header = f"{'impl':<16}{'ring':>5}{'causal':>8}{'seq':>10}{'status':>8}{'ms':>11}{'TFLOP/s':>9}{'GB':>8}{'rel err':>10}"
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in rows:
        def f(key, fmt):
            return fmt.format(r[key]) if r.get(key) is not None else "-"
        print(f"{r['impl']:<16}{r['ring_size']:>5}{str(r['causal']):>8}{r['seq_len']:>10}{r['status']:>8}"
              f"{f('time_ms', '{:.2f}'):>11}{f('tflops', '{:.3g}'):>9}{f('peak_mem_gb', '{:.2f}'):>8}"
              f"{f('max_rel_err', '{:.1e}'):>10}", file=file)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import report

    if args.command == "report":
        rows = report.load_rows(args.json)
        import json
        meta = json.loads(args.json.read_text()).get("meta", {})
        paths = report.write_outputs(rows, args.out or args.json.parent, stem=args.json.stem, meta=meta)
    else:
        from .bench import run_sweep

        config = _config_from_args(args)
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            print(f"error: --device {config.device} but no CUDA device is available", file=sys.stderr)
            return 2
        rows = run_sweep(config, progress=not args.quiet)
        meta = {"generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": "python -m ringbook " + " ".join(argv if argv is not None else sys.argv[1:]),
                "warmup": config.warmup, "repeats": config.repeats, "max_row_seconds": config.max_row_seconds}
        print_table(rows)
        paths = report.write_outputs(rows, args.out, stem=args.stem, meta=meta)
    for kind, path in paths.items():
        print(f"wrote {kind:<10} {path}")
    return 0
