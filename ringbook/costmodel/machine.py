"""The machine: how fast the attention kernel runs a call of a given size, the links, the memory.

Kernel rate. One kernel call of ``f`` FLOPs (``4·b·h·n_q·n_k·d``, half for a
causal block) takes ``t = t0 + f / peak``: a fixed cost per call (launch,
tail, the first and last waves of tiles) and a steady rate. Equivalently the
achieved rate is ``peak · f / (f + f½)`` with ``f½ = t0 · peak``: short blocks
run slower, as the 16K rows show. ``t0`` and ``peak`` are fitted separately
for full and causal calls by least squares on the relative error of the
committed one-GPU rows (:func:`fit_kernel`); the backward costs ``backward``
times the forward of the same call, from committed forward+backward rows.

Links. ``bandwidth`` is bytes per second one way per GPU, ``latency`` seconds
per message. No link was measured in this repository: every link preset is
nominal (the vendor's figure) or a published measurement, and says which.

Memory bandwidth ``hbm`` (bytes/s, nominal) times the folds: each kernel
call's partial result is merged into float32 accumulators (the online-softmax
merge of (out, lse) forward, dq and dK/dV added backward); see
:func:`ringbook.costmodel.model.fold_bytes`. None: no fold term.

Blocks a document or window boundary cuts (``"masked"``), three ways:

* ``fused=`` a :class:`FusedMasked` (the H100 presets: FlashAttention-2's
  variable-length kernel, which ringbook's engine runs on such blocks on
  CUDA, :mod:`ringbook.fast.varlen`): a tiled kernel skips the tiles no
  query sees and computes every other tile *whole*, so a masked block costs
  the tiles its visible pairs touch, plus what a tile row and a masked tile
  cost beyond a tile's FLOPs (:meth:`FusedMasked.call_time`);
* ``fused=None`` (and ``masked=None``): an ideal fused kernel, the block's
  *visible* pairs at the causal rate (no tile rounding, no per-row cost): a
  lower bound, 20–60% under the committed masked rows;
* ``masked=`` a :class:`KernelRate`: a dense kernel that computes every pair
  of the block and masks afterwards, at that kernel's full rate;
  ``KERNELS["h100-einops"]`` is ringbook's einops path (what the engine runs
  on such blocks on the CPU). It takes precedence over ``fused``.

The fused constants are fitted from the committed whole-sequence rows of
``figures/masks/gpu-masked-peers-h100.json`` (varlen_attn and flex_attention
on 131K tokens in 16 or 1,024 documents, or under a 4,096-token window; see
:data:`FUSED` and :func:`ringbook.costmodel.check.fit_fused`).
"""

from __future__ import annotations

import dataclasses
import math

from .._utils import check_positive_int


@dataclasses.dataclass(frozen=True)
class KernelRate:
    """``t = t0 + f/peak`` per call, for full and causal calls; the backward is ``backward`` × the forward."""

    name: str
    peak_full: float  # FLOP/s
    t0_full: float  # seconds per call
    peak_causal: float
    t0_causal: float
    backward: float
    source: str
    measured: bool = True

    def call_time(self, flops: float, causal: bool = False) -> float:
        """Seconds for one forward call of ``flops`` FLOPs (counted as the benchmarks count them)."""
        if flops < 0:
            raise ValueError(f"flops must be ≥ 0, got {flops}")
        if flops == 0:
            return 0.0
        return (self.t0_causal + flops / self.peak_causal) if causal else (self.t0_full + flops / self.peak_full)

    def rate(self, flops: float, causal: bool = False) -> float:
        """Achieved FLOP/s of one call: ``peak · f / (f + f½)``."""
        return flops / self.call_time(flops, causal) if flops > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class FusedMasked:
    """A fused masked kernel: what a block a boundary cuts costs on it, counted in ``tile × tile`` tiles.

    The tiles come from :func:`ringbook.costmodel.visible.tile_counts`
    (``aligned``: ``"piece"`` tiles each document piece from its own start, as
    a variable-length kernel sees it; ``"block"`` tiles the block's grid, as
    flex_attention's BlockMask does). With ``τ = 4·b·h·d·tile²/peak_causal``
    one tile's forward seconds at ``kernel``'s causal rate (the causal fit
    counts a whole causal call's visible half, which at the fitted lengths is
    within 1–3% of the tiles it computes), a call of ``T`` tiles, ``P`` of
    them partial (the mask evaluated element by element), in ``R`` tile rows,
    takes

        forward    t0 + τ·(T + row·R + mask·M),   M = P (+ the banded full tiles if masks_banded)
        backward   backward·(t0 + τ·T) + τ·(row_backward·R + mask·P)

    ``row``: a tile row's work item beyond its tiles (load the queries, write
    out and lse; nothing to overlap them with when the row has one or two
    tiles), in tiles; ``row_backward`` the same in the backward (its work item
    also adds its dq through float32 atomics, and the kernel's pre- and
    post-passes over dq run per token); ``mask``: the element-wise mask on a
    partial tile, in tiles; ``masks_banded``: FlashAttention-2 masks every
    tile of a piece whose band it calls local (a window: ``Is_local`` sets
    ``Need_masking`` in its main loop), in the forward only (the committed
    window rows' backward costs what the 16-document rows' does).
    """

    name: str
    kernel: KernelRate
    tile: int
    aligned: str
    row: float
    row_backward: float
    mask: float
    masks_banded: bool
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.kernel, KernelRate):
            raise TypeError(f"kernel must be a KernelRate, got {type(self.kernel).__name__}")
        check_positive_int(self.tile, "tile")
        if self.aligned not in ("piece", "block"):
            raise ValueError(f"aligned must be 'piece' or 'block', got {self.aligned!r}")
        for name in ("row", "row_backward", "mask"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be ≥ 0 (tiles), got {getattr(self, name)}")

    def call_time(self, tile_flops: float, tiles: float, partial: float, rows: float, banded: float = 0.0,
                  backward: bool = False) -> float:
        """Seconds of one call (class docstring); ``tile_flops`` = ``4·b·h·d·tile²``, the counts per head."""
        if tiles <= 0:
            return 0.0
        k = self.kernel
        tau = tile_flops / k.peak_causal
        if backward:
            return k.backward * (k.t0_causal + tau * tiles) + tau * (self.row_backward * rows + self.mask * partial)
        masked = partial + (banded if self.masks_banded else 0.0)
        return k.t0_causal + tau * (tiles + self.row * rows + self.mask * masked)


@dataclasses.dataclass(frozen=True)
class Link:
    """``latency + nbytes / bandwidth`` seconds for one message (bandwidth: bytes/s one way per GPU)."""

    name: str
    bandwidth: float
    latency: float
    source: str
    measured: bool = False

    def time(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency + nbytes / self.bandwidth


@dataclasses.dataclass(frozen=True)
class Machine:
    """A kernel, a link inside a node, a link across nodes, GPUs per node and memory per GPU (bytes)."""

    name: str
    kernel: KernelRate
    intra: Link
    inter: Link
    gpus_per_node: int
    memory: float
    source: str
    hbm: float | None = None  # bytes/s of device memory, for the folds; None: no fold term
    masked: KernelRate | None = None  # a dense masked kernel (every pair at its full rate); None: see fused
    fused: FusedMasked | None = None  # a fused masked kernel (its tiles); None: visible pairs at the causal rate

    def __post_init__(self) -> None:
        check_positive_int(self.gpus_per_node, "gpus_per_node")
        if self.fused is not None and not isinstance(self.fused, FusedMasked):
            raise TypeError(f"fused must be a FusedMasked or None, got {type(self.fused).__name__}")
        for kern, name in ((self.kernel, "kernel"), (self.masked, "masked")):
            if not isinstance(kern, KernelRate) and (name == "kernel" or kern is not None):
                raise TypeError(f"{name} must be a KernelRate{' or None' if name == 'masked' else ''}, got "
                                f"{type(kern).__name__}")
        if self.hbm is not None and not self.hbm > 0:
            raise ValueError(f"hbm must be > 0 bytes/s or None, got {self.hbm}")
        for link, name in ((self.intra, "intra"), (self.inter, "inter")):
            if not isinstance(link, Link):
                raise TypeError(f"{name} must be a Link, got {type(link).__name__}")
        if not self.memory > 0:
            raise ValueError(f"memory must be > 0 bytes, got {self.memory}")

    def link(self, src: int, dst: int) -> Link:
        """The link a message from device ``src`` to ``dst`` takes."""
        return self.intra if src // self.gpus_per_node == dst // self.gpus_per_node else self.inter


def fit_kernel(points: list[tuple[float, float]]) -> tuple[float, float]:
    """``(t0, peak)`` minimising Σ((t0 + f/peak − t)/t)² over ``(flops, seconds)`` points (two or more)."""
    if len(points) < 2:
        raise ValueError(f"points needs at least two (flops, seconds) pairs, got {len(points)}")
    s11 = s12 = s22 = b1 = b2 = 0.0
    for f, t in points:
        if not (f > 0 and t > 0):
            raise ValueError(f"points must have flops > 0 and seconds > 0, got ({f}, {t})")
        x1, x2 = 1 / t, f / t
        s11, s12, s22, b1, b2 = s11 + x1 * x1, s12 + x1 * x2, s22 + x2 * x2, b1 + x1, b2 + x2
    det = s11 * s22 - s12 * s12
    t0, inv_peak = (b1 * s22 - b2 * s12) / det, (s11 * b2 - s12 * b1) / det
    return max(t0, 0.0), 1 / inv_peak


def fit_rows(rows: list[dict], impl: str, *, name: str, source: str, backward_rows: list[dict] = ()) -> KernelRate:
    """A :class:`KernelRate` from benchmark rows of one-GPU ``impl`` (``ring_size`` 1, forward, status ok).

    ``backward_rows``: forward+backward rows of the same impl; ``backward`` is
    the median of (t_fwd+bwd − t_fwd) / t_fwd over lengths present in both.
    """
    def pts(causal):
        return [(r["flops"], r["time_ms"] / 1e3) for r in rows
                if r.get("impl") == impl and r.get("status") == "ok" and r.get("ring_size", 1) == 1
                and bool(r.get("causal")) == causal and r.get("mode") in ("forward", None)]
    (t0f, pf), (t0c, pc) = fit_kernel(pts(False)), fit_kernel(pts(True))
    fwd = {(r["seq_len"], bool(r["causal"])): r["time_ms"] for r in rows if r.get("impl") == impl
           and r.get("status") == "ok" and r.get("ring_size", 1) == 1 and r.get("mode") in ("forward", None)}
    ratios = sorted(r["time_ms"] / fwd[key] - 1 for r in backward_rows
                    if r.get("impl") == impl and r.get("ring_size", 1) == 1 and r.get("status") == "ok"
                    and (key := (r["seq_len"], bool(r["causal"]))) in fwd)
    backward = ratios[len(ratios) // 2] if ratios else 2.5
    return KernelRate(name, pf, t0f, pc, t0c, backward, source)


# --------------------------------------------------------------------------- presets
# Kernel constants below are fit_rows(...) of the committed files named in `source`
# (tests/test_costmodel.py refits them and checks they agree to 1%).

_H100_BENCH = "figures/bench-nvidia-h100-80gb-hbm3-bfloat16.json"
_H100_FB = "figures/bench-nvidia-h100-80gb-hbm3-bfloat16-fwd-bwd.json"
_H200_BENCH = "figures/bench-nvidia-h200-bfloat16.json"

KERNELS: dict[str, KernelRate] = {
    "h100-cudnn": KernelRate("cuDNN SDPA, H100, bf16, d=64", 471.5e12, 63.1e-6, 442.0e12, 109.1e-6, 2.647,
                             f"fit of sdpa_cudnn rows 4K–512K in {_H100_BENCH}; backward from {_H100_FB}"),
    "h100-flash": KernelRate("flash SDPA (FA2), H100, bf16, d=64", 309.6e12, 125.0e-6, 292.9e12, 167.1e-6, 2.718,
                             f"fit of sdpa_flash rows 4K–512K in {_H100_BENCH}; backward from {_H100_FB}"),
    "h100-einops": KernelRate("ringbook einops blocks, H100, bf16, d=64", 13.5e12, 1.04e-3, 7.3e12, 1.56e-3, 2.5,
                              f"fit of the one-process `ring` rows at ring_size 1, 4K–128K, in {_H100_BENCH}; "
                              "backward 2.5 assumed (no committed row)"),
    "h200-cudnn": KernelRate("cuDNN SDPA, H200, bf16, d=64", 461.5e12, 33.6e-6, 455.3e12, 233.3e-6, 2.647,
                             f"fit of sdpa_cudnn rows 16K and 128K in {_H200_BENCH} (two points: exact); "
                             "backward taken from the H100 rows"),
}

_H100_MASKED = "figures/masks/gpu-masked-peers-h100.json"
_FLEX_SPEED = 0.7843  # flex_attention's seconds per tile ÷ FlashAttention-2's (fitted, FUSED's source)

FUSED: dict[str, FusedMasked] = {
    "h100-varlen": FusedMasked(
        "FlashAttention-2 varlen (varlen_attn, ringbook.fast.varlen), H100, bf16, d=64", KERNELS["h100-flash"],
        128, "piece", 1.286, 9.116, 0.5116, True,
        f"rate: the h100-flash fit; row and mask: least squares (relative error) over the three forward varlen rows "
        f"of {_H100_MASKED} (131K tokens: 16 or 1,024 documents, window 4,096); row_backward: over their backward "
        "parts (forward+backward − forward); the tile size is FlashAttention-2's for d ≤ 128"),
    "h100-flex": FusedMasked(
        "flex_attention (torch.compile, BlockMask 128), H100, bf16, d=64",
        dataclasses.replace(KERNELS["h100-flash"], name="flex_attention, H100, bf16, d=64",
                            peak_full=KERNELS["h100-flash"].peak_full / _FLEX_SPEED,
                            peak_causal=KERNELS["h100-flash"].peak_causal / _FLEX_SPEED, measured=False,
                            source="h100-flash's fit with its peaks ÷ 0.784 (fitted: no unmasked flex row is "
                                   "committed); backward ratio and per-call cost h100-flash's"),
        128, "block", 1.286, 9.116, 2.033, False,
        f"speed (0.784 × FlashAttention-2's seconds per tile) and mask: least squares over the six forward "
        f"flex/flex_direct rows of {_H100_MASKED}; row and row_backward FlashAttention-2's (h100-varlen)"),
}

_GB = 1e9
NVLINK_H100 = Link("NVLink 4 (H100/H200)", 380 * _GB, 5e-6,
                   "380 of the nominal 450 GB/s one way, p2pBandwidthLatencyTest in NVIDIA/nccl issue 1264 "
                   "(published, not measured here); latency 5 µs assumed", measured=False)
NVLINK_H800 = Link("NVLink (H800)", 200 * _GB, 5e-6, "nominal 400 GB/s both ways, so 200 one way; latency assumed")
NVLINK_A100 = Link("NVLink 3 (A100)", 300 * _GB, 5e-6, "nominal 600 GB/s both ways, so 300 one way; latency assumed")
IB_400 = Link("InfiniBand 8 × 400 Gb/s per node", 50 * _GB, 10e-6,
              "nominal: one 400 Gb/s NIC per GPU = 50 GB/s one way; latency 10 µs assumed")
TCP_100 = Link("TCP 100 Gb/s per node", 12.5 * _GB / 8, 50e-6,
               "nominal: 100 Gb/s per node shared by 8 GPUs = 1.56 GB/s per GPU; latency 50 µs assumed")

LINKS: dict[str, Link] = {"nvlink": NVLINK_H100, "ib": IB_400, "tcp": TCP_100}


HBM = {"h100": 3.35e12, "h200": 4.8e12}  # nominal HBM3 / HBM3e bytes/s (NVIDIA's data sheets)


FUSED_FOR_GPU = {"h100": FUSED["h100-varlen"]}  # the engine's masked kernel per GPU (none fitted for the H200)


def _node(name: str, kernel: str, inter: Link, memory_gb: float, intra: Link = NVLINK_H100) -> Machine:
    gpu = kernel.split("-")[0]
    hbm, fused = HBM[gpu], FUSED_FOR_GPU.get(gpu)
    return Machine(name, KERNELS[kernel], intra, inter, 8, memory_gb * _GB,
                   f"kernel: {KERNELS[kernel].source}; links: {intra.source} / {inter.source}; "
                   f"memory {memory_gb:g} GB and {hbm / 1e12:g} TB/s nominal; masked blocks: "
                   f"{fused.name if fused else 'visible pairs at the causal rate (no fused fit for this GPU)'}",
                   hbm=hbm, fused=fused)


PRESETS: dict[str, Machine] = {
    "h100-nvlink": _node("8 × H100 per node, NVLink; InfiniBand across nodes", "h100-cudnn", IB_400, 80),
    "h200-nvlink": _node("8 × H200 per node, NVLink; InfiniBand across nodes", "h200-cudnn", IB_400, 141),
    "h100-tcp": _node("8 × H100 per node, NVLink; 100 Gb/s TCP across nodes", "h100-cudnn", TCP_100, 80),
}


def preset(name: str, *, kernel: str | None = None, gpus_per_node: int | None = None,
           inter: str | None = None, fused: str | None = None) -> Machine:
    """A preset machine, optionally with another kernel of :data:`KERNELS` (and its GPU's ``hbm`` and fused masked
    kernel), another fused masked kernel of :data:`FUSED`, node size or inter-node link."""
    if name not in PRESETS:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    m = PRESETS[name]
    if kernel is not None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
        gpu = kernel.split("-")[0]
        m = dataclasses.replace(m, kernel=KERNELS[kernel], hbm=HBM.get(gpu, m.hbm),
                                fused=FUSED_FOR_GPU.get(gpu) if gpu in HBM else m.fused)
    if fused is not None:
        if fused not in FUSED:
            raise ValueError(f"fused must be one of {sorted(FUSED)}, got {fused!r}")
        m = dataclasses.replace(m, fused=FUSED[fused])
    if inter is not None:
        if inter not in LINKS:
            raise ValueError(f"inter must be one of {sorted(LINKS)}, got {inter!r}")
        m = dataclasses.replace(m, inter=LINKS[inter])
    if gpus_per_node is not None:
        m = dataclasses.replace(m, gpus_per_node=check_positive_int(gpus_per_node, "gpus_per_node"))
    return m


def scaled_kernel(kernel: KernelRate, peak: float, *, name: str, source: str) -> KernelRate:
    """``kernel``'s per-call costs with another peak (for hardware with no committed rows): nominal."""
    if not (isinstance(peak, (int, float)) and math.isfinite(peak) and peak > 0):
        raise ValueError(f"peak must be a positive FLOP/s, got {peak!r}")
    s = peak / kernel.peak_full
    return dataclasses.replace(kernel, name=name, peak_full=peak, peak_causal=kernel.peak_causal * s,
                               source=source, measured=False)
