"""Benchmark of :func:`ringbook.distributed.ring_attention` across processes, run under torchrun::

    torchrun --nproc-per-node=2 -m ringbook.dist_bench --seq-lens 131072 --dtype bf16 --causal both --out figures

Each rank draws its own shard of q, k and v (seeded by rank; never the whole
sequence), warms up, then times the ring ``--repeats`` times with a barrier
before each repeat — CUDA events on GPUs (NCCL), ``time.perf_counter`` on the
CPU (gloo). A repeat takes as long as its slowest rank; the row's
``time_ms`` is the median over repeats of that maximum, and
``per_rank_time_ms`` the median of each rank. Peak memory is measured per
rank as in :mod:`ringbook.bench` (CUDA allocator peak of one call, inputs
included; on the CPU the process's max RSS, labelled in ``peak_mem_kind``);
``peak_mem_gb`` is the maximum over ranks.

The check: up to ``--check-max-seq`` tokens (16K) every rank's q, k, v and
out are gathered on rank 0 and compared with :func:`ringbook.naive_attention`
(:func:`ringbook.bench.check_against_reference`). Longer sequences are not
gathered (that would defeat the point of sharding): the same configuration is
re-run at ``--check-max-seq`` tokens and checked there; the row's ``check``
field says which was done.

Rank 0 writes the rows (the fields of :mod:`ringbook.bench` rows with
``impl="ring_dist"``, plus ``layout``, ``per_rank_time_ms``,
``per_rank_peak_mem_gb``, ``check``) to ``<out>/<stem>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from . import bench
from ._utils import attention_flops
from .distributed import ring_attention, unshard
from .schedule import check_layout


def build_parser() -> argparse.ArgumentParser:
    from .cli import _bool_list, _positive, _seq

    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node=N -m ringbook.dist_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", nargs="+", type=_seq, default=[131072], help="global sequence lengths (16K, 1M…)")
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--causal", type=_bool_list, default=[False, True], help="false, true or both (default)")
    p.add_argument("--layout", choices=["auto", "contiguous", "zigzag", "striped"], default="auto",
                   help="how tokens are dealt to ranks (auto: zigzag when causal, else contiguous)")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--heads", type=_positive, default=8)
    p.add_argument("--head-dim", type=_positive, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=_positive, default=10)
    p.add_argument("--check-max-seq", type=_seq, default=16384,
                   help="gather and check the full output up to this length; above, check a run of this length")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any rank waits for a peer")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("figures"))
    p.add_argument("--stem", help="file name stem (default dist-bench-<device>-<dtype>-w<world>)")
    return p


def _setup(backend: str, timeout_s: float):
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
    return device


def _shards(n, world, rank, *, batch, heads, head_dim, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + rank)
    return [torch.randn(batch, n // world, heads, head_dim, generator=gen, device=device, dtype=dtype)
            for _ in range(3)]


def _gathered_error(q, k, v, out, *, layout, causal):
    """Gather every rank's shards; rank 0 returns (max_rel_err, rows checked), others (None, None)."""
    world = dist.get_world_size()
    full = []
    for x in (q, k, v, out):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        full.append(unshard(parts, layout))
    if dist.get_rank() != 0:
        return None, None
    return bench.check_against_reference(*full, causal=causal)


def _time(call, device, *, warmup, repeats):
    for _ in range(warmup):
        call()
    bench._sync(device)
    times = []
    for _ in range(repeats):
        dist.barrier()
        times.append(bench.time_once(call, device))
    return times


def measure(n, *, causal, layout, dtype, batch, heads, head_dim, warmup, repeats, check_max_seq, timeout, seed,
            device, env) -> dict | None:
    """One row (on rank 0; None elsewhere). Every rank must call it with the same arguments."""
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = layout if layout != "auto" else ("zigzag" if causal else "contiguous")
    row = bench.new_row(env, "ring_dist", seq_len=n, ring_size=world, causal=causal, dtype=dtype, batch=batch,
                        heads=heads, head_dim=head_dim, flops=attention_flops(batch, heads, n, n, head_dim, causal))
    row.update(layout=layout, per_rank_time_ms=None, per_rank_peak_mem_gb=None, check=None)
    mine = {"error": None, "oom": False, "times": None, "peak": None}
    q = k = v = out = None
    try:
        try:
            check_layout(n, world, layout)
        except ValueError as exc:
            raise ValueError(f"not run: {exc}") from None
        q, k, v = _shards(n, world, rank, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                          device=device, seed=seed)

        def call():
            return ring_attention(q, k, v, causal=causal, layout=layout, timeout=timeout)

        mine["times"] = _time(call, device, warmup=warmup, repeats=repeats)
        mine["peak"], _ = bench.peak_memory_gb(call, device)
        if n <= check_max_seq:
            out, _ = call()
            err, rows = _gathered_error(q, k, v, out, layout=layout, causal=causal)
            row["check"] = f"full output gathered on rank 0 ({rows} of {n} query rows against float64)"
        else:
            m = check_max_seq - check_max_seq % (2 * world)
            del q, k, v
            q = k = v = None
            bench._free(device)
            cq, ck, cv = _shards(m, world, rank, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                                 device=device, seed=seed + 1)
            cout, _ = ring_attention(cq, ck, cv, causal=causal, layout=layout, timeout=timeout)
            err, rows = _gathered_error(cq, ck, cv, cout, layout=layout, causal=causal)
            row["check"] = (f"not gathered at {n} tokens; a separate run of the same configuration at "
                            f"seq_len {m} was gathered on rank 0 and checked ({rows} query rows)")
            del cq, ck, cv, cout
        row["max_rel_err"], row["checked_rows"] = err, rows
    except Exception as exc:  # noqa: BLE001 - every failure becomes the row's status
        mine["oom"] = bench._is_oom(exc)
        mine["error"] = f"{type(exc).__name__}: {exc}".strip()[:500]
        if not mine["oom"] and not str(exc).startswith("not run"):
            row["traceback"] = traceback.format_exc(limit=4)
    finally:
        del q, k, v, out
        bench._free(device)
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank != 0:
        return None
    failed = [r for r, m in enumerate(every) if m["error"]]
    if failed:
        row["status"] = "oom" if all(every[r]["oom"] for r in failed) else "error"
        by_message = {}
        for r in failed:
            by_message.setdefault(every[r]["error"], []).append(r)
        row["error"] = "; ".join(f"rank {', '.join(map(str, ranks))}: {msg}"
                                 for msg, ranks in by_message.items())[:1000]
        return row
    per_repeat = [max(ts) for ts in zip(*(m["times"] for m in every))]  # a repeat ends with its slowest rank
    t = statistics.median(per_repeat)
    row.update(time_ms=t, times_ms=per_repeat, tflops=row["flops"] / (t * 1e-3) / 1e12,
               tokens_per_s=batch * n / (t * 1e-3),
               per_rank_time_ms=[statistics.median(m["times"]) for m in every],
               per_rank_peak_mem_gb=[m["peak"] for m in every],
               peak_mem_gb=max(m["peak"] for m in every))
    tol = bench.TOLERANCE[dtype]
    if not math.isfinite(row["max_rel_err"]) or row["max_rel_err"] > tol:
        row["error"] = f"wrong result: max_rel_err {row['max_rel_err']:.3g} exceeds {tol:g} for {row['dtype']}"
    else:
        row["status"] = "ok"
    return row


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if "RANK" not in os.environ:
        print("ringbook.dist_bench runs under torchrun, e.g.\n"
              "  torchrun --nproc-per-node=2 -m ringbook.dist_bench --seq-lens 131072 --dtype bf16", file=sys.stderr)
        return 2
    device = _setup(args.backend, args.timeout)
    dtype = bench.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rank, world = dist.get_rank(), dist.get_world_size()
    env = bench.environment(device)
    env["backend"] = dist.get_backend()
    rows = []
    try:
        for causal in args.causal:
            for n in sorted(args.seq_lens):
                row = measure(n, causal=causal, layout=args.layout, dtype=dtype, batch=args.batch, heads=args.heads,
                              head_dim=args.head_dim, warmup=args.warmup, repeats=args.repeats,
                              check_max_seq=args.check_max_seq, timeout=args.timeout, seed=args.seed,
                              device=device, env=env)
                if rank == 0:
                    rows.append(row)
                    print(f"ring_dist w={world} causal={causal} n={n}: {row['status']} "
                          f"{row['time_ms'] or float('nan'):.2f} ms", flush=True)
    finally:
        if rank == 0 and rows:
            from .cli import print_table
            from .report import slug, write_outputs

            stem = args.stem or f"dist-bench-{'cpu' if device.type == 'cpu' else slug(env['device'])}-" \
                                f"{str(dtype).replace('torch.', '')}-w{world}"
            meta = {"generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": f"torchrun --nproc-per-node={world} -m ringbook.dist_bench "
                               + " ".join(argv if argv is not None else sys.argv[1:]),
                    "warmup": args.warmup, "repeats": args.repeats, "world_size": world}
            print_table(rows)
            for kind, path in write_outputs(rows, args.out, stem=stem, meta=meta).items():
                print(f"wrote {kind:<10} {path}")
        dist.destroy_process_group()
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
