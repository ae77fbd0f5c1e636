"""Ring attention across processes, run under torchrun, and its peers measured in the same run::

    torchrun --nproc-per-node=2 -m ringbook.bench.dist_sweep --seq-lens 131072 --dtype bf16 --causal both --out figures
    torchrun --nproc-per-node=2 -m ringbook.bench.dist_sweep --kernel auto --peers one_gpu context_parallel \\
        --seq-lens 131072 --dtype bf16 --causal both --out figures --formats json

What is measured, for every (causal, seq_len):

* **The ring over the process group** (one rank per GPU). ``--kernel einops``
  (the default) times :func:`ringbook.distributed.ring_attention` with its
  einops block path (``impl="ring_dist"``); ``--kernel auto`` (or ``cudnn``,
  ``flash``, ``efficient``) times
  :func:`ringbook.distributed.production_ring_attention`, the fused kernels
  (``impl="production_dist"``). The row records ``kernel`` and ``layout``.
* ``--peers one_gpu``: rank 0 alone runs the whole sequence on its own GPU
  (the other ranks wait at a barrier), once per implementation of
  ``--one-gpu-impls`` (default ``sdpa_cudnn production`` on CUDA, ``sdpa
  production`` on the CPU), with :func:`ringbook.bench.run_row`: an ordinary
  bench row (its own timing and check, ``ring_size`` 1) marked
  ``peer_of="dist"``, ``gpus=1``.
* ``--peers context_parallel``: PyTorch's context parallelism,
  ``torch.distributed.tensor.experimental.context_parallel``
  (``impl="context_parallel"``), one row per SDPA backend of
  ``--cp-backends`` (default ``cudnn flash``; field ``sdpa_backend``). CUDA
  only: on the CPU the row is an error "not run: …" (CP only reroutes the
  CUDA SDPA kernels). Every rank draws the same full-length q, k, v
  (``b h n d``); ``context_parallel`` shards them in place — head-tail load
  balanced when causal (rank r holds chunks r and 2w−1−r of 2w, ringbook's
  "zigzag"), contiguous otherwise (CP's SDPA refuses load balancing without
  ``is_causal``) — and ``F.scaled_dot_product_attention`` is timed inside the
  context. Which positions each rank really holds is read back from a
  position buffer sharded with q, k, v; the row's ``layout`` names it. The
  fields ``cp_load_balance`` and ``cp_rotate_method`` (``--cp-rotate``,
  default PyTorch's) record CP's options. A backend CP refuses, or any other
  failure, is an error row; the run goes on.

Timing: every rank warms up, then the call is timed ``--repeats`` times with
a barrier before each repeat — CUDA events on GPUs (NCCL),
``time.perf_counter`` on the CPU (gloo). A repeat takes as long as its
slowest rank; a multi-GPU row's ``time_ms`` is the median over repeats of
that maximum, and ``per_rank_time_ms`` the median of each rank. Peak memory
is measured per rank as in :mod:`ringbook.bench` (CUDA allocator peak of one
call, inputs included; on the CPU the resident peak of one call, labelled
in ``peak_mem_kind``); ``peak_mem_gb`` is the maximum over ranks and
``per_rank_peak_mem_gb`` every rank's. For context_parallel the full-length
inputs are freed once CP has sharded them, so its peak counts the same
things as the ring's — this rank's shards, the output and what one call
allocates (CP's gathered K/V included); the row's ``peak_mem_includes`` says so.

The check: on every ring row each rank checks every entry of its own output
and lse (and with ``--mode fwd+bwd`` its dq, dk, dv) on the last timed call
and on a checked call after it — finite, the lse −inf exactly where a row sees
no key — at every length (:func:`ringbook.bench.measure.check_whole`). Up to
``--check-max-seq`` tokens (16K) the checked call's q, k, v, out and lse (and
gradients) are gathered on rank 0 and compared with float64 attention
(:func:`ringbook.bench.measure.reference_check`; the gradients on every row
where the float64 reference fits, :func:`~ringbook.bench.measure.gradient_error`).
Longer sequences are not gathered (that would defeat the point of sharding):
the same configuration is re-run at ``--check-max-seq`` tokens and checked
there; the row's ``check`` field says which was done. context_parallel rows
are checked at full length: every entry of each rank's output finite, and
every rank compares evenly spaced rows of its own output with the float64
reference of the whole (replicated) sequence at the rows' global positions.
A row is ``ok`` only through :func:`ringbook.bench.verdict`: every number
finite, every error within the dtype's tolerance
(:data:`ringbook.bench.TOLERANCE`); a check that fails on any rank is an
``error`` row saying which rank, which call and where.

Bad options are refused in one line (exit status 2), and rank 0 checks that
it can write into ``--out`` before anything is measured.

Rank 0 writes every row to ``<out>/<stem>.json`` (``--out`` default
``results/``, which git ignores; plus ``.md`` and the two
PNG plots unless ``--formats`` says otherwise; the default stem
``dist-bench-<device>-<dtype>-w<world>`` ends in ``-<kernel>`` for the fused
kernels, so such a run does not overwrite the einops one), with a ``scaling`` summary in
the JSON's ``meta`` (also printed): for each (causal, seq_len) the ring row's
time, the fastest ok one-GPU row and ``speedup_vs_one_gpu`` (its time / the
ring's), the fastest ok context_parallel row and ``cp_time_over_ours`` (its
time / the ring's), and the per-GPU peaks. The exit status is 1 if a row
failed (rows that were not run, which say why, do not count).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist

from .. import distributed as rd
from .._utils import attention_flops
from ..distributed import production_ring_attention, ring_attention, ring_dilated_attention, unshard
from ..fast.plans import allgather_plan, rank_plan
from ..masks import check_document_ids, document_ids_from_cu_seqlens, mask_spec, visible_pairs
from ..schedule import check_layout, layout_positions, usp_positions
from ..strategies import bytes_sent as strategy_bytes
from ..strategies import strategy_schedule
from . import measure
from .cli import (
    RESULTS,
    CliError,
    OneLineParser,
    bool_list,
    check_writable_dir,
    non_negative,
    positive,
    print_table,
    seconds,
    seq_len,
)
from .measure import (
    DENSE,
    MaskedReference,
    WrongResult,
    check_whole,
    environment,
    peak_memory_gb,
    reference_error,
    relative_error,
    sync,
    time_once,
)
from .registry import DILATED, IMPLS, _ring_dilated_flops, bench_dilated_config
from .report import FORMATS, scaling_summary, write_outputs
from .results import slug
from .rules import DTYPES, verdict
from .sweep import BACKWARD_FLOPS_FACTOR, new_row, run_row

KERNELS = ("einops", "auto", "cudnn", "flash", "efficient")
PEERS = ("one_gpu", "stacked", "context_parallel")
MODES = {"forward": "forward", "fwd+bwd": "forward+backward"}
PATTERNS = ("dense", "dilated")
STRATEGIES = ("ring", "allgather", "ulysses", "usp")  # ringbook.distributed's context-parallel strategies
RING_IMPLS = {("dense", True): "ring_dist", ("dense", False): "production_dist",
              ("dilated", True): "ring_dilated_dist", ("dilated", False): "production_dilated_dist"}
CP_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
CP_PEAK_MEM_INCLUDES = (
    "this rank's q, k, v shards, the output and what one context-parallel SDPA call allocates (its gathered or "
    "rotated K/V included); not the replicated full-length inputs, freed once context_parallel has sharded them")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="torchrun --nproc-per-node=N -m ringbook.bench.dist_sweep", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", nargs="+", type=seq_len, default=[131072], help="global sequence lengths (16K, 1M…)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--causal", type=bool_list, default=[False, True], help="false, true or both (default)")
    p.add_argument("--kernel", choices=KERNELS, default="einops",
                   help="the attention backend: einops (default): ring_attention's einops blocks, impl ring_dist; "
                        "auto/cudnn/flash/efficient: production_ring_attention(backend=...), impl production_dist "
                        "(--backend names the process-group backend, gloo or nccl)")
    p.add_argument("--layout", choices=["auto", "contiguous", "zigzag", "striped"], default="auto",
                   help="how tokens are dealt to ranks (auto: zigzag when causal, else contiguous)")
    p.add_argument("--peers", nargs="*", choices=PEERS, default=[],
                   help="also measure, in the same run: one_gpu (rank 0 alone, the whole sequence) and/or "
                        "context_parallel (PyTorch's, CUDA only)")
    p.add_argument("--one-gpu-impls", nargs="+", choices=sorted(IMPLS), default=None,
                   help="bench implementations of the one_gpu peer (default sdpa_cudnn production on CUDA, "
                        "sdpa production on the CPU)")
    p.add_argument("--cp-backends", nargs="+", choices=sorted(CP_BACKENDS), default=["cudnn", "flash"],
                   help="SDPA backends of the context_parallel peer, one row each (default cudnn flash)")
    p.add_argument("--cp-rotate", choices=["allgather", "alltoall"], default=None,
                   help="context_parallel's K/V rotation (default: PyTorch's default)")
    p.add_argument("--mode", choices=list(MODES), default="forward",
                   help="time the forward, or forward and backward (out.backward(dout); q, k, v require grad)")
    p.add_argument("--pattern", choices=PATTERNS, default="dense",
                   help="dense attention, or the benchmark's dilated configuration (contiguous shards, "
                        "ringbook.distributed.ring_dilated_attention; its peers dilated_sdpa and production_dilated)")
    p.add_argument("--strategy", nargs="+", choices=STRATEGIES, default=["ring"],
                   help="the context-parallel strategies to measure, each in the same run: ring (default), allgather "
                        "(K/V all-gathered), ulysses (all-to-all to head shards), usp (Ulysses in groups of "
                        "--ulysses-size ranks, the ring across); dense pattern only for all but the ring")
    p.add_argument("--ulysses-size", type=positive, default=None,
                   help="ranks per Ulysses group for --strategy usp (default 2)")
    p.add_argument("--documents", type=positive, default=None,
                   help="pack this many documents of random lengths (seeded) into each sequence: attention stays "
                        "inside each (dense pattern)")
    p.add_argument("--window", type=positive, default=None,
                   help="a sliding window of this many tokens (causal: the query and the window − 1 before it)")
    p.add_argument("--batch", type=positive, default=1)
    p.add_argument("--heads", type=positive, default=8)
    p.add_argument("--head-dim", type=positive, default=64)
    p.add_argument("--warmup", type=non_negative, default=2)
    p.add_argument("--repeats", type=positive, default=10)
    p.add_argument("--check-max-seq", type=seq_len, default=16384,
                   help="gather and check the full output up to this length; above, check a run of this length")
    p.add_argument("--timeout", type=seconds, default=300.0, help="seconds any rank waits for a peer")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="output folder, written by rank 0 (default results/, which git ignores)")
    p.add_argument("--stem", help="file name stem (default dist-bench-<device>-<dtype>-w<world>, "
                                  "with -<kernel> unless the kernel is einops)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="files to write (default json md png)")
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


def _gathered_check(q, k, v, out, lse, *, layout, causal, reference, backward=None,
                    ulysses_size: int = 1) -> dict | None:
    """Gather every rank's shards; rank 0 compares them with float64 and returns the row's check fields
    (``max_rel_err``, ``checked_rows``, ``lse_max_rel_err``; with ``backward`` = (dout, dq, dk, dv) also
    ``grad_max_rel_err`` and ``grad_checked_rows``, 0 where the reference does not fit); None on the others."""
    world = dist.get_world_size()

    def gather(x, dim=1):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return unshard(parts, layout, dim=dim, ulysses_size=ulysses_size)

    full = [gather(x) for x in (q, k, v, out)]
    full_lse = gather(lse, dim=2)
    full_grads = [gather(x) for x in backward] if backward is not None else None
    if dist.get_rank() != 0:
        return None
    c = measure.reference_check(*full, full_lse, causal=causal, reference=reference)
    fields = {"max_rel_err": c.max_rel_err, "checked_rows": c.rows, "lse_max_rel_err": c.lse_max_rel_err}
    if full_grads is not None:
        g = measure.gradient_error(*full[:3], full_grads[0], tuple(full_grads[1:]), causal=causal, reference=reference)
        fields.update(grad_max_rel_err=g and g[0], grad_checked_rows=g[1] if g else 0)
    return fields


def _time(call, device, *, warmup, repeats, last=None):
    """Warm up, then time ``repeats`` calls, a barrier before each; ``last[0]`` keeps the last call's result
    (as :func:`ringbook.bench.measure.time_call`)."""
    for _ in range(warmup):
        call()
    sync(device)
    timed = call if last is None else (lambda: last.append(call()))
    times = []
    for _ in range(repeats):
        if last is not None:
            last.clear()
        dist.barrier()
        times.append(time_once(timed, device))
    return times


class _FailedElsewhere(Exception):
    """A check failed on another rank (which reports it): this rank stops the row too, with nothing to add."""


def _agreed(check, what: str) -> None:
    """Run ``check`` on every rank; raise its own error where it failed and :class:`_FailedElsewhere` on the
    others, so no rank goes on to a collective the failed one will never join."""
    _everywhere(check, what, elsewhere=_FailedElsewhere)


def _failure(exc: BaseException, row: dict, mine: dict) -> None:
    """Record ``exc`` as this rank's outcome (a "not run: …" decision keeps its bare message; a check that
    failed on another rank is that rank's to report)."""
    if isinstance(exc, _FailedElsewhere):
        return
    mine["oom"] = measure.is_oom(exc)
    not_run = str(exc).startswith("not run")
    wrong = isinstance(exc, WrongResult)
    mine["error"] = (str(exc) if not_run else f"wrong result: {exc}" if wrong
                     else f"{type(exc).__name__}: {exc}").strip()[:500]
    if not mine["oom"] and not not_run and not wrong:
        row["traceback"] = traceback.format_exc(limit=4)


def _collect(row: dict, mine: dict, *, dtype) -> dict | None:
    """Gather every rank's outcome and finish the row on rank 0 (None on the other ranks).

    ``mine`` holds this rank's ``error`` (text or None), ``oom``, ``times``
    (ms per repeat) and ``peak`` (GB); optionally ``check`` = (max |out − ref|,
    max |ref|, rows) where every rank checked rows of its own output, and
    ``layout`` where every rank found out its own.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
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
        if len(by_message) == 1 and len(failed) == world and every[0]["error"].startswith("not run"):
            row["error"] = every[0]["error"]  # the same decision on every rank
        else:
            row["error"] = "; ".join(f"rank {', '.join(map(str, ranks))}: {msg}"
                                     for msg, ranks in by_message.items())[:1000]
        return row
    per_repeat = [max(ts) for ts in zip(*(m["times"] for m in every))]  # a repeat ends with its slowest rank
    t = statistics.median(per_repeat)
    n, batch = row["seq_len"], row["batch"]
    row.update(time_ms=t, times_ms=per_repeat, tflops=row["flops"] / (t * 1e-3) / 1e12,
               tokens_per_s=batch * n / (t * 1e-3),
               per_rank_time_ms=[statistics.median(m["times"]) for m in every],
               per_rank_peak_mem_gb=[m["peak"] for m in every],
               peak_mem_gb=max(m["peak"] for m in every))
    if all(m.get("sent") is not None for m in every):
        row["bytes_sent_per_gpu"] = max(m["sent"] for m in every)
    checks = [m["check"] for m in every if m.get("check")]
    if checks:
        row["max_rel_err"] = relative_error(max(c[0] for c in checks), max(c[1] for c in checks))
        row["checked_rows"] = sum(c[2] for c in checks)
    layouts = [m.get("layout") for m in every]
    if any(layouts):
        row["layout"] = layouts[0] if len(set(layouts)) == 1 else f"per rank: {layouts}"
    return verdict(row, dtype)


# --------------------------------------------------------------------------- the ring

def _attend(q, k, v, *, causal, layout, timeout, kernel, pattern="dense", strategy="ring", ulysses_size=1,
            masks=None):
    """This rank's ``(out, lse)``: ring_attention's einops path, or production_ring_attention with ``kernel``;
    for the dilated pattern, ring_dilated_attention (einops, or ``backend=kernel``) with the benchmark's config;
    for another strategy, its function of :mod:`ringbook.distributed` with ``backend=kernel``."""
    if pattern == "dilated":
        cfg = bench_dilated_config(q.shape[1] * dist.get_world_size())
        return ring_dilated_attention(q, k, v, causal=causal, heads="grouped", timeout=timeout,
                                      backend=kernel, **cfg)
    masks = masks or {}
    if strategy != "ring":
        extra = {"ulysses_size": ulysses_size} if strategy == "usp" else {}
        return getattr(rd, f"{strategy}_attention")(q, k, v, causal=causal, layout=layout, timeout=timeout,
                                                    backend=kernel, **extra, **masks)
    if kernel == "einops":
        return ring_attention(q, k, v, causal=causal, layout=layout, timeout=timeout, **masks)
    return production_ring_attention(q, k, v, causal=causal, layout=layout, timeout=timeout, backend=kernel, **masks)


def packed_documents(n: int, count: int, seed: int) -> torch.Tensor:
    """``(n,)`` ids of ``count`` documents of random lengths (at least 1 token each) packed into ``n`` tokens."""
    if not 1 <= count <= n:
        raise ValueError(f"--documents must be between 1 and the sequence length {n}, got {count}")
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n - 1, generator=gen)[:count - 1].sort().values + 1
    return document_ids_from_cu_seqlens([0, *cuts.tolist(), n])


def bytes_sent_per_gpu(n: int, world: int, rank: int, *, pattern: str, causal: bool, batch: int, heads: int,
                       head_dim: int, dtype: torch.dtype, backward: bool, strategy: str = "ring",
                       layout: str = "contiguous", ulysses_size: int = 1, document_ids: torch.Tensor | None = None,
                       window: int | None = None) -> int:
    """What this rank sends, read from the plan or schedule it runs (not counted on the wire).

    The ring: its rank plan's traffic (:meth:`ringbook.fast.engine.Plan.bytes_sent`: K and V of its shard
    ``w − 1`` hops forward; a backward sends them round again and the float32 dK/dV ``w`` hops, the last one
    home). Dilated: the dilated K/V rows its segments' other pieces need (the exchange's routes), with a
    backward the same again plus their float32 gradients the other way. All-gather: its plan's all-gather
    and reduce-scatter. Ulysses and USP: their communication schedule
    (:func:`ringbook.strategies.strategy_schedule`: the all-to-alls, and the ring across groups).
    ``document_ids``/``window``: a ring's hops nobody needs are not sent (the all-gather gathers everything).
    """
    if pattern == "dilated":
        from ..distributed.dilated import _ring_plan, _traffic
        from ..fast.engine import Plan

        cfg = bench_dilated_config(n)
        plan = _ring_plan(n, world, cfg["segment_lengths"], cfg["dilation_rates"], heads, "grouped", causal)
        sent, received, grad_sent = _traffic(plan, rank, 1)
        return Plan((), sent=sent, received=received, grad_sent=grad_sent).bytes_sent(batch, head_dim, dtype,
                                                                                      backward=backward)
    masked = document_ids is not None or window is not None
    if strategy in ("ring", "allgather"):
        build = rank_plan if strategy == "ring" else allgather_plan
        mask = mask_spec(causal, check_document_ids(document_ids, 1, n), window) if masked else None
        plan = build(n, world, rank, layout, causal, kv_heads=heads, mask=mask)
        return plan.bytes_sent(batch, head_dim, dtype, backward=backward)
    elem = torch.empty((), dtype=dtype).element_size()
    schedule = strategy_schedule(strategy, n, world, heads=heads, kv_heads=heads, head_dim=head_dim, dtype_bytes=elem,
                                 causal=causal, layout=layout, batch=batch, backward=backward,
                                 ulysses_size=ulysses_size if strategy == "usp" else None, document_ids=document_ids,
                                 window=window)
    return strategy_bytes(schedule, world)[rank]


def measure_ring(n: int, *, causal: bool, layout: str, dtype: torch.dtype, batch: int, heads: int, head_dim: int,
                 warmup: int, repeats: int, check_max_seq: int, timeout: float, seed: int, device: torch.device,
                 env: dict, kernel: str = "einops", mode: str = "forward", pattern: str = "dense",
                 strategy: str = "ring", ulysses_size: int | None = None, documents: int | None = None,
                 window: int | None = None) -> dict | None:
    """One row of the ring (on rank 0; None elsewhere). Every rank must call it with the same arguments.

    ``kernel="einops"``: :func:`ring_attention` (impl ``ring_dist``); any other
    kernel: :func:`production_ring_attention` with it (impl ``production_dist``);
    ``pattern="dilated"``: :func:`ring_dilated_attention` (``ring_dilated_dist``
    or ``production_dilated_dist``). ``mode="fwd+bwd"`` times the forward and
    ``out.backward(dout)``.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    backward = mode == "fwd+bwd"
    if pattern == "dilated":
        layout = "contiguous"  # dilated segments are contiguous: so are its shards
    layout = layout if layout != "auto" else ("zigzag" if causal else "contiguous")
    masked = documents is not None or window is not None
    ids = packed_documents(n, documents, seed) if documents is not None and documents <= n else None
    if masked and pattern == "dense" and (documents is None or ids is not None):
        flops = 4.0 * batch * heads * head_dim * visible_pairs(n, causal=causal, document_ids=ids, window=window)
    else:
        flops = (attention_flops(batch, heads, n, n, head_dim, causal) if pattern == "dense"
                 else _ring_dilated_flops(batch, heads, n, n, head_dim, causal))
    u = (ulysses_size or 2) if strategy == "usp" else 1
    impl = RING_IMPLS[(pattern, kernel == "einops")] if strategy == "ring" else f"{strategy}_dist"
    row = new_row(env, impl, seq_len=n, ring_size=world, causal=causal,
                  dtype=dtype, batch=batch, heads=heads, head_dim=head_dim, mode=MODES[mode],
                  flops=None if flops is None else flops * (BACKWARD_FLOPS_FACTOR if backward else 1))
    if masked:
        row.update(documents=documents, window=window)
    row.update(kernel=kernel, layout=layout, pattern=pattern, strategy=strategy, gpus=world, per_rank_time_ms=None,
               per_rank_peak_mem_gb=None, check=None, bytes_sent_per_gpu=None,
               bytes_sent_kind="by the schedule: what each rank's ring sends (ringbook.bench.dist_sweep."
                               "bytes_sent_per_gpu), the largest over ranks")
    if backward:
        row.update(grad_max_rel_err=None, grad_checked_rows=None)
    mine = {"error": None, "oom": False, "times": None, "peak": None}
    q = k = v = out = lse = dout = None
    try:
        try:
            check_layout(n, world, layout)
            if pattern == "dilated" and flops is None:
                raise ValueError(f"the benchmark's dilated configuration does not fit n={n}")
            if pattern == "dilated" and strategy != "ring":
                raise ValueError(f"--pattern dilated runs on the ring only, not --strategy {strategy}")
            if pattern == "dilated" and masked:
                raise ValueError("--documents and --window apply to the dense pattern")
            if documents is not None and ids is None:
                packed_documents(n, documents, seed)  # says why
            if strategy == "usp":
                row["ulysses_size"] = u
                usp_positions(n, world, u, layout)
            if strategy in ("ulysses", "usp") and heads % (world if strategy == "ulysses" else u):
                raise ValueError(f"{strategy} deals whole heads to ranks: {heads} heads do not divide into "
                                 f"{world if strategy == 'ulysses' else u}")
        except ValueError as exc:
            raise ValueError(f"not run: {exc}") from None
        q, k, v = _shards(n, world, rank, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                          device=device, seed=seed)
        mine["sent"] = bytes_sent_per_gpu(n, world, rank, pattern=pattern, causal=causal, batch=batch, heads=heads,
                                          head_dim=head_dim, dtype=dtype, backward=backward, strategy=strategy,
                                          layout=layout, ulysses_size=u, document_ids=ids, window=window)
        dout = torch.randn_like(q) if backward else None
        if backward:
            for x in (q, k, v):
                x.requires_grad_()

        reference = DENSE if pattern == "dense" else DILATED
        if masked:
            reference = MaskedReference(document_ids=ids, window=window)

        def _no_key(length):  # this rank's rows that see no key (b h n), or None: every row sees one
            mask = reference.no_key(length, heads, causal=causal)
            return None if mask is None else mask[:, usp_positions(length, world, u, layout)[rank]].unsqueeze(0)

        def grads():
            return {"dq": q.grad, "dk": k.grad, "dv": v.grad} if backward else None

        def call():
            if backward:
                for x in (q, k, v):
                    x.grad = None
            out, lse = _attend(q, k, v, causal=causal, layout=layout, timeout=timeout, kernel=kernel, pattern=pattern,
                               strategy=strategy, ulysses_size=u,
                               masks={"document_ids": ids, "window": window} if masked else None)
            if backward:
                out.backward(dout)
            return out.detach(), lse.detach()

        # Timed calls, every entry of the last one checked on every rank; then the checked call: its peak
        # memory, every entry, and (up to check_max_seq) the gathered output, lse and gradients against float64.
        last: list = []
        mine["times"] = _time(call, device, warmup=warmup, repeats=repeats, last=last)
        _agreed(lambda: check_whole(*last[0], no_key=_no_key(n), grads=grads(), call="the last timed call"),
                "the check of the last timed call")
        last.clear()
        mine["peak"], (out, lse) = peak_memory_gb(call, device, inputs=(q, k, v))
        _agreed(lambda: check_whole(out, lse, no_key=_no_key(n), grads=grads(), call="the checked call"),
                "the check of the checked call")
        whole = (f"every rank's whole output, lse{', dq, dk, dv' if backward else ''} finite on the last timed "
                 "call and on a checked call after it")

        def gathered_check():  # this rank's q, k, v, out, lse as they are when it is called (also the check run's)
            return _gathered_check(q.detach(), k.detach(), v.detach(), out, lse, layout=layout, causal=causal,
                                   reference=reference, backward=(dout, q.grad, k.grad, v.grad) if backward else None,
                                   ulysses_size=u)

        if n <= check_max_seq:
            fields = gathered_check()
            if fields is not None:
                row.update(fields)
                row["check"] = (f"{whole}; its full output and lse gathered on rank 0 ({fields['checked_rows']} of "
                                f"{n} query rows against float64)" + _grad_words(fields))
        out = lse = None
        if n > check_max_seq:
            m = check_max_seq - check_max_seq % (2 * world)
            q = k = v = dout = None  # free the long shards before the check run
            measure.free(device)
            q, k, v = _shards(m, world, rank, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                              device=device, seed=seed + 1)
            if masked:  # the check run's own documents (the same count, over its length); call() reads `ids`
                ids = packed_documents(m, min(documents, m), seed) if documents is not None else None
                reference = MaskedReference(document_ids=ids, window=window)
            dout = torch.randn_like(q) if backward else None
            for x in (q, k, v):
                x.requires_grad_(backward)
            out, lse = call()
            _agreed(lambda: check_whole(out, lse, no_key=_no_key(m), grads=grads(), call=f"the check run at {m}"),
                    "the check run")
            fields = gathered_check()
            if fields is not None:
                row.update(fields)
                row["check"] = (f"{whole}; not gathered at {n} tokens: a separate run of the same configuration at "
                                f"seq_len {m} was checked the same way and gathered on rank 0 "
                                f"({fields['checked_rows']} query rows against float64)" + _grad_words(fields))
    except Exception as exc:  # noqa: BLE001 - every failure becomes the row's status
        _failure(exc, row, mine)
    finally:
        q = k = v = out = lse = dout = None
        measure.free(device)
    return _collect(row, mine, dtype=dtype)


def _grad_words(fields: dict) -> str:
    if "grad_checked_rows" not in fields:
        return ""
    if fields["grad_checked_rows"]:
        return f"; dq, dk, dv against float64 on all {fields['grad_checked_rows']} rows"
    return "; dq, dk, dv not compared with float64 (the reference does not fit in memory)"


# --------------------------------------------------------------------------- peer: one GPU

def default_one_gpu_impls(device: torch.device, pattern: str = "dense") -> list[str]:
    """The one_gpu peer's implementations: the fastest fused SDPA and ringbook's production path (dense), or
    the batched-call peer and the production path with the dilated configuration."""
    if pattern == "dilated":
        return ["dilated_sdpa", "production_dilated"]
    return ["sdpa_cudnn", "production"] if device.type == "cuda" else ["sdpa", "production"]


def measure_one_gpu(impl_name: str, n: int, *, causal: bool, dtype: torch.dtype, batch: int, heads: int,
                    head_dim: int, warmup: int, repeats: int, seed: int, device: torch.device,
                    env: dict, mode: str = "forward", ring_size: int = 1, peer_of: str = "dist") -> dict | None:
    """Rank 0 alone runs the whole sequence with a :mod:`ringbook.bench` implementation; the others wait.

    Returns the bench row on rank 0 (``ring_size`` 1, ``peer_of="dist"``,
    ``gpus=1``; its own timing and check), None on the other ranks. The
    ``stacked`` peer is the same with the one-process ring at the world's ring
    size (``peer_of="stacked"``: one GPU playing every rank, not a one-GPU
    baseline).
    """
    row = None
    if dist.get_rank() == 0:
        row = run_row(IMPLS[impl_name], seq_len=n, ring_size=ring_size, causal=causal, dtype=dtype, batch=batch,
                      heads=heads, head_dim=head_dim, device=device, warmup=warmup, repeats=repeats,
                      seed=seed, env=env, backward=mode == "fwd+bwd")
        row.update(peer_of=peer_of, gpus=1)
    dist.barrier()
    return row


# --------------------------------------------------------------------------- peer: PyTorch's context parallel

def _replicated(n, *, batch, heads, head_dim, dtype, device, seed):
    """The whole sequence's q, k, v (``b h n d``), the same on every rank."""
    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + 99_991)
    return [torch.randn(batch, heads, n, head_dim, generator=gen, device=device, dtype=dtype) for _ in range(3)]


def _layout_name(positions: torch.Tensor, n: int, world: int, rank: int) -> str:
    """The ringbook layout whose shard of ``rank`` holds exactly ``positions`` (in order), else "other"."""
    for name in ("contiguous", "zigzag"):
        try:
            if torch.equal(layout_positions(n, world, name)[rank], positions.cpu()):
                return name
        except ValueError:  # the length does not allow that layout
            pass
    return "other"


def _everywhere(call, what: str, *, elsewhere: type[Exception] = RuntimeError):
    """Run ``call`` once on every rank; if it raised anywhere, raise on every rank (none is left waiting): its
    own error where it failed, ``elsewhere`` naming the failed ranks and the first error on the others."""
    problem = None
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised
        problem = exc
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, None if problem is None else f"{type(problem).__name__}: {problem}"[:300])
    if problem is not None:
        raise problem
    failed = [r for r, p in enumerate(every) if p]
    if failed:
        raise elsewhere(f"{what} failed on rank(s) {failed}: {every[failed[0]]}")


def _context_parallel(row, mine, n, *, causal, backend, rotate, dtype, batch, heads, head_dim, warmup, repeats,
                      seed, device, backward=False):
    """Time PyTorch's context-parallel SDPA on this rank; fills ``mine`` (times, peak, check, layout).

    Sets the row's ``cp_load_balance`` and ``cp_rotate_method``. CP's options
    are module globals: they are restored afterwards.
    """
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import _attention as cp_impl  # _cp_options, set_rotate_method
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    world, rank = dist.get_world_size(), dist.get_rank()
    options = cp_impl._cp_options
    saved = (options.enable_load_balance, options.rotate_method)
    mesh = init_device_mesh(device.type, (world,))
    q, k, v = _replicated(n, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device, seed=seed)
    where = torch.arange(n, device=device).view(1, 1, n, 1)  # sharded with q, k, v: tells which rows a rank holds
    buffers = [q, k, v, where]
    try:
        # Head-tail load balancing for causal attention only: CP's SDPA refuses it without is_causal.
        options.enable_load_balance = causal
        if rotate:
            cp_impl.set_rotate_method(rotate)
        row.update(cp_load_balance=causal, cp_rotate_method=options.rotate_method.name.lower())
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2] * len(buffers),
                              no_restore_buffers=set(buffers)):
            local = [x.clone().requires_grad_(backward) for x in (q, k, v)]  # this rank's shards
            positions = where.reshape(-1).clone()
            for x in buffers:  # sharding resized them in place, keeping the full-length storage: free it
                x.set_()
            del q, k, v, where, buffers
            dout = torch.randn_like(local[0]) if backward else None

            def call():
                if not backward:
                    return F.scaled_dot_product_attention(*local, is_causal=causal)  # CP's, inside the context
                for x in local:
                    x.grad = None
                out = F.scaled_dot_product_attention(*local, is_causal=causal)
                out.backward(dout)  # CP's backward: the K/V and their gradients rotate again
                return out.detach()

            def grads():
                return dict(zip(("dq", "dk", "dv"), (x.grad for x in local))) if backward else None

            with sdpa_kernel(getattr(SDPBackend, CP_BACKENDS[backend])):
                _everywhere(call, f"context_parallel with the {backend} SDPA backend")
                last: list = []
                mine["times"] = _time(call, device, warmup=max(warmup - 1, 0), repeats=repeats, last=last)
                _agreed(lambda: check_whole(last[0], grads=grads(), call="the last timed call"),
                        "the check of the last timed call")
                last.clear()
                mine["peak"], out = peak_memory_gb(call, device, inputs=local)
                _agreed(lambda: check_whole(out, grads=grads(), call="the checked call"),
                        "the check of the checked call")
    finally:
        options.enable_load_balance, options.rotate_method = saved
    local.clear()
    measure.free(device)
    mine["layout"] = _layout_name(positions, n, world, rank)
    q, k, v = _replicated(n, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device, seed=seed)
    mine["check"] = reference_error(*(x.transpose(1, 2) for x in (q, k, v, out.detach())), positions=positions,
                                    causal=causal)


def measure_context_parallel(n: int, *, causal: bool, backend: str, rotate: str | None, dtype: torch.dtype,
                             batch: int, heads: int, head_dim: int, warmup: int, repeats: int, seed: int,
                             device: torch.device, env: dict, mode: str = "forward",
                             pattern: str = "dense") -> dict | None:
    """One row of PyTorch's context parallel with SDPA ``backend`` (on rank 0; None elsewhere); never raises.

    Every rank must call it with the same arguments. CUDA only: elsewhere the
    row is an error "not run: …".
    """
    world = dist.get_world_size()
    backward = mode == "fwd+bwd"
    row = new_row(env, "context_parallel", seq_len=n, ring_size=world, causal=causal, dtype=dtype,
                  batch=batch, heads=heads, head_dim=head_dim, mode=MODES[mode],
                  flops=attention_flops(batch, heads, n, n, head_dim, causal) * (BACKWARD_FLOPS_FACTOR if backward
                                                                                else 1))
    row.update(sdpa_backend=backend, layout=None, gpus=world, cp_load_balance=None, cp_rotate_method=None,
               per_rank_time_ms=None, per_rank_peak_mem_gb=None, peak_mem_includes=CP_PEAK_MEM_INCLUDES,
               check=("every rank's whole output" + (", dq, dk, dv" if backward else "") + " finite on the last "
                      "timed call and on a checked call after it; every rank compared evenly spaced rows of that "
                      "call's output with the float64 reference of the whole sequence at their global positions"
                      + ("; gradients not compared with float64" if backward else "")))
    mine = {"error": None, "oom": False, "times": None, "peak": None, "check": None, "layout": None}
    try:
        if pattern != "dense":
            raise RuntimeError("not run: context_parallel computes dense attention; the dilated pattern has no "
                               "context-parallel peer")
        if device.type != "cuda":
            raise RuntimeError("not run: context_parallel needs CUDA (NCCL)")
        _context_parallel(row, mine, n, causal=causal, backend=backend, rotate=rotate, dtype=dtype, batch=batch,
                          heads=heads, head_dim=head_dim, warmup=warmup, repeats=repeats, seed=seed, device=device,
                          backward=backward)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the row's status
        _failure(exc, row, mine)
    finally:
        measure.free(device)
    return _collect(row, mine, dtype=dtype)


# --------------------------------------------------------------------------- the scaling summary

def print_scaling(summary: list[dict], file: TextIO = sys.stdout) -> None:
    def num(x, fmt):
        return "-" if x is None else fmt.format(x)

    def gbs(xs):
        return "-" if not xs else "/".join(f"{x:.2f}" for x in xs)

    print("scaling: ours = the ring row; 1-GPU = fastest ok one_gpu row; CP = fastest ok context_parallel row",
          file=file)
    header = (f"{'causal':<7}{'seq':>9}  {'ours':<24}{'ms':>10}  {'GB/GPU':<12}{'1-GPU':<14}{'ms':>10}"
              f"{'speedup':>9}{'eff':>6}  {'CP':<8}{'ms':>10}  {'GB/GPU':<12}{'CP/ours':>8}")
    print(header, file=file)
    print("-" * len(header), file=file)
    for s in summary:
        ours = f"{s['impl']}[{s['kernel']}]x{s['gpus']}" if s["impl"] else "-"
        print(f"{str(s['causal']):<7}{s['seq_len']:>9}  {ours:<24}{num(s['time_ms'], '{:.2f}'):>10}  "
              f"{gbs(s['per_rank_peak_mem_gb']):<12}{s['one_gpu_impl'] or '-':<14}"
              f"{num(s['one_gpu_time_ms'], '{:.2f}'):>10}{num(s['speedup_vs_one_gpu'], '{:.2f}x'):>9}"
              f"{num(s.get('parallel_efficiency'), '{:.0%}'):>6}  "
              f"{s['cp_sdpa_backend'] or '-':<8}{num(s['cp_time_ms'], '{:.2f}'):>10}  "
              f"{gbs(s['cp_per_rank_peak_mem_gb']):<12}{num(s['cp_time_over_ours'], '{:.2f}x'):>8}", file=file)


# --------------------------------------------------------------------------- output

def _describe(row: dict) -> str:
    what = row["impl"] + (f"[{row['kernel']}]" if row.get("kernel") else "") + \
        (f"[{row['sdpa_backend']}]" if row.get("sdpa_backend") else "")
    text = (f"{what} gpus={row.get('gpus', row['ring_size'])} causal={row['causal']} n={row['seq_len']}: "
            f"{row['status']} {row['time_ms'] or float('nan'):.2f} ms")
    if row.get("peak_mem_gb") is not None:
        text += f", peak {row['peak_mem_gb']:.2f} GB" + (" per GPU" if row.get("per_rank_peak_mem_gb") else "")
    return text + (f" ({row['error']})" if row.get("error") else "")


def _failed(row: dict) -> bool:
    return row["status"] == "error" and "not run:" not in str(row.get("error") or "")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "RANK" not in os.environ:
        print("ringbook.bench.dist_sweep runs under torchrun, e.g.\n"
              "  torchrun --nproc-per-node=2 -m ringbook.bench.dist_sweep --seq-lens 131072 --dtype bf16\n"
              "  torchrun --nproc-per-node=2 -m ringbook.bench.dist_sweep --kernel auto --peers one_gpu context_parallel "
              "--seq-lens 131072", file=sys.stderr)
        return 2
    device = _setup(args.backend, args.timeout)
    problem = [None]
    if dist.get_rank() == 0:  # the folder rank 0 writes into, before anything is measured
        try:
            check_writable_dir(args.out)
        except CliError as exc:
            problem[0] = str(exc)
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        if dist.get_rank() == 0:
            print(f"ringbook.bench.dist_sweep: error: {problem[0]}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rank, world = dist.get_rank(), dist.get_world_size()
    env = environment(device)
    env["backend"] = dist.get_backend()
    one_gpu_impls = args.one_gpu_impls or default_one_gpu_impls(device, args.pattern)
    stacked_impl = "production_dilated" if args.pattern == "dilated" else "production"
    common = {"dtype": dtype, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
              "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed, "device": device, "env": env,
              "mode": args.mode}
    rows = []
    try:
        for causal in args.causal:
            for n in sorted(args.seq_lens):
                here = [measure_ring(n, causal=causal, layout=args.layout, kernel=args.kernel,
                                     check_max_seq=args.check_max_seq, timeout=args.timeout, pattern=args.pattern,
                                     strategy=strategy, ulysses_size=args.ulysses_size, documents=args.documents,
                                     window=args.window, **common)
                        for strategy in args.strategy]
                if "one_gpu" in args.peers:
                    here += [measure_one_gpu(name, n, causal=causal, **common) for name in one_gpu_impls]
                if "stacked" in args.peers:
                    here.append(measure_one_gpu(stacked_impl, n, causal=causal, ring_size=world, peer_of="stacked",
                                                **common))
                if "context_parallel" in args.peers:
                    here += [measure_context_parallel(n, causal=causal, backend=b, rotate=args.cp_rotate,
                                                      pattern=args.pattern, **common) for b in args.cp_backends]
                if rank == 0:
                    rows += here
                    for row in here:
                        print(_describe(row), flush=True)
    finally:
        if rank == 0 and rows:
            stem = args.stem or (f"dist-bench-{'cpu' if device.type == 'cpu' else slug(env['device'])}-"
                                 f"{str(dtype).replace('torch.', '')}-w{world}"
                                 + ("" if args.kernel == "einops" else f"-{args.kernel}")
                                 + ("" if args.pattern == "dense" else f"-{args.pattern}")
                                 + ("" if args.mode == "forward" else "-fwd-bwd"))
            summary = scaling_summary(rows)
            meta = {"generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": f"torchrun --nproc-per-node={world} -m ringbook.bench.dist_sweep "
                               + " ".join(argv if argv is not None else sys.argv[1:]),
                    "warmup": args.warmup, "repeats": args.repeats, "world_size": world, "kernel": args.kernel,
                    "mode": args.mode, "pattern": args.pattern, "strategies": list(args.strategy),
                    "documents": args.documents, "window": args.window,
                    "peers": list(args.peers), "one_gpu_impls": one_gpu_impls if "one_gpu" in args.peers else [],
                    "cp_backends": args.cp_backends if "context_parallel" in args.peers else [],
                    "cp_rotate": args.cp_rotate, "scaling": summary}
            print_table(rows)
            print_scaling(summary)
            for kind, path in write_outputs(rows, args.out, stem=stem, meta=meta, formats=args.formats).items():
                print(f"wrote {kind:<10} {path}")
        dist.destroy_process_group()
    return 1 if any(_failed(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
