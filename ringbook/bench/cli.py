"""Command line: ``python -m ringbook bench`` (the main job) and ``python -m ringbook report``."""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, TextIO

import torch

from . import report, results
from .measure import environment
from .registry import IMPLS
from .rules import DTYPES
from .sweep import default_config, planned_rows, run_sweep

RESULTS = Path("results")  # where a run writes unless told: git ignores it, so a run leaves the clone clean


class CliError(Exception):
    """Bad input to the command line: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (exit status 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def bool_list(text: str) -> list[bool]:
    choices = {"false": [False], "true": [True], "both": [False, True]}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"--causal must be false, true or both, got {text!r}")
    return choices[text.lower()]


def _integer(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive(text: str) -> int:
    """An integer ≥ 1 (argparse type)."""
    return _integer(text, 1, "a positive integer")


def non_negative(text: str) -> int:
    """An integer ≥ 0 (argparse type)."""
    return _integer(text, 0, "an integer ≥ 0")


def seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {text!r}")
    return value


def _device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` with N an existing GPU."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r} "
                                         f"(ringbook benchmarks CPUs and CUDA GPUs)")
    if device.type == "cpu" and device.index is not None:
        raise argparse.ArgumentTypeError(f"expected cpu without an index, got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} but no CUDA device is available (use cpu)")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r} but this machine has {count} CUDA device(s): "
                                             f"cuda:0 … cuda:{count - 1}")
    return str(device)


def seq_len(text: str) -> int:
    """Sequence lengths accept a K/M suffix: 16K = 16384, 1M = 1048576."""
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2}.get(t[-1:], 1)
    return positive(t[:-1] if mult > 1 else t) * mult


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m ringbook", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="run the benchmark sweep (defaults sized to the device)",
                       description="Measure attention implementations; writes JSON, a Markdown report and "
                                   "PNG plots. Every option defaults to the embedded sweep for the device found.")
    b.add_argument("--impl", nargs="+", choices=sorted(IMPLS), help="implementations to measure")
    b.add_argument("--seq-lens", nargs="+", type=seq_len, help="sequence lengths (e.g. 4096 16K 1M)")
    b.add_argument("--ring-sizes", nargs="+", type=positive, help="ring sizes (ring implementations only)")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (default bf16 on GPU, fp32 on CPU)")
    b.add_argument("--causal", type=bool_list, help="false, true or both (default both)")
    b.add_argument("--batch", type=positive)
    b.add_argument("--heads", type=positive)
    b.add_argument("--head-dim", type=positive)
    b.add_argument("--warmup", type=non_negative)
    b.add_argument("--repeats", type=positive)
    b.add_argument("--max-row-seconds", type=seconds, help="do not run a call predicted to take longer")
    b.add_argument("--device", type=_device, help="cuda, cuda:1 or cpu (default: cuda if available)")
    b.add_argument("--out", type=Path, default=RESULTS,
                   help="output folder (default results/, which git ignores; --out figures refreshes the committed "
                        "results)")
    b.add_argument("--stem", help="file name stem (default bench-<device>-<dtype>)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--backward", action="store_true",
                   help="time forward + backward (out.backward(dout)) instead of the forward")

    r = sub.add_parser("report", help="redraw the report and plots from a results JSON file")
    r.add_argument("json", type=Path)
    r.add_argument("--out", type=Path, help="output folder (default: beside the JSON)")
    return parser


def _config_from_args(args):
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


def print_table(rows: list[dict], file: TextIO | None = None) -> None:
    file = file if file is not None else sys.stdout  # looked up per call: a default bound at import goes stale
    header = f"{'impl':<16}{'ring':>5}{'causal':>8}{'seq':>10}{'status':>8}{'ms':>11}{'TFLOP/s':>9}{'GB':>8}{'rel err':>10}"
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in rows:
        def f(key, fmt):
            return fmt.format(r[key]) if r.get(key) is not None else "-"
        print(f"{r['impl']:<16}{r['ring_size']:>5}{str(r['causal']):>8}{r['seq_len']:>10}{r['status']:>8}"
              f"{f('time_ms', '{:.2f}'):>11}{f('tflops', '{:.3g}'):>9}{f('peak_mem_gb', '{:.2f}'):>8}"
              f"{f('max_rel_err', '{:.1e}'):>10}", file=file)


def check_writable_dir(path: Path, option: str = "--out") -> Path:
    """Create ``path`` if needed and prove a file can be written there; else :class:`CliError`."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise CliError(f"{option} {path} is a file; expected a folder to write results into")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ringbook-write-check-"):
            pass
    except OSError as exc:
        raise CliError(f"{option} {path} is not a writable folder ({exc.strerror or exc})") from None
    return path


def _bench(args, argv) -> int:
    config = _config_from_args(args)
    out = check_writable_dir(args.out)
    stem = args.stem or results.default_stem([{**environment(torch.device(config.device)),
                                              "dtype": str(config.dtype).replace("torch.", ""),
                                              "mode": "forward+backward" if config.backward else "forward"}])
    json_path = out / f"{stem}.json"
    print(f"writing {json_path} after every row, then the report and plots beside it"
          + (" (results/ is ignored by git; --out figures refreshes the committed results)" if out == RESULTS else ""))
    meta = {"generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m ringbook " + " ".join(argv if argv is not None else sys.argv[1:]),
            "warmup": config.warmup, "repeats": config.repeats, "max_row_seconds": config.max_row_seconds,
            "rows_planned": len(planned_rows(config))}
    done: list[dict] = []

    def save(rows):  # after every row: a crash or Ctrl-C keeps what was measured
        done[:] = rows
        results.save_json(rows, json_path, {**meta, "complete": False})

    start = time.perf_counter()
    try:
        rows = run_sweep(config, progress=not args.quiet, on_row=save)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(done)} of {meta['rows_planned']} rows", file=sys.stderr)
        if not done:
            return 130
        rows, meta["interrupted"] = list(done), True
        code = 130
    else:
        code = 0
    meta["sweep_seconds"] = round(time.perf_counter() - start, 1)  # the whole sweep, every row's checks included
    print_table(rows)
    paths = report.write_outputs(rows, out, stem=stem, meta={**meta, "complete": code == 0})
    for kind, path in paths.items():
        print(f"wrote {kind:<10} {path}")
    return code


def _report(args) -> int:
    rows, meta = results.load_results(args.json)
    out = check_writable_dir(args.out or args.json.parent)
    # The input is never rewritten: only the report and the plots are drawn from it.
    paths = report.write_outputs(rows, out, stem=args.json.stem, meta=meta, formats=("md", "png"))
    for kind, path in paths.items():
        print(f"wrote {kind:<10} {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; bad input prints one line naming the option or file and returns 2 (no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return _report(args) if args.command == "report" else _bench(args, argv)
    except (CliError, results.ResultsFileError) as exc:
        print(f"python -m ringbook {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while the report is drawn (the rows are already saved)
        print(f"\npython -m ringbook {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, the traceback only on request
        if os.environ.get("RINGBOOK_DEBUG"):
            raise
        print(f"python -m ringbook {args.command}: error: {type(exc).__name__}: {exc} "
              f"(RINGBOOK_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
