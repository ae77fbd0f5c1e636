"""Which fused kernel runs a *partial* (masked) block: measured on the GPU (issue 24).

    python3 tools/gpu_masked.py [--out DIR] [--sizes 8192 16384 65536] [--whole-lens 131072 1048576]
    python tools/gpu_masked.py --device cpu --quick        # plumbing smoke test on tiny shapes

A block of the ring that a document or window boundary cuts (``Masked`` in
:mod:`ringbook.fast.blocks`) runs today on the einops path. This script
measures, per block kind, the kernels that could replace it — each returns
the lse the ring's merge needs:

* ``ringbook_masked`` — today's :class:`ringbook.fast.blocks.Masked` kernel
  (its forward, and its backward with the block's out/lse and ``delta``, as
  the engine calls them);
* ``flex`` — ``torch.compile(flex_attention)`` with a BlockMask from
  ``create_block_mask(..., _compile=True)``; one generic mask_mod (causal,
  window, documents) whose offsets, window and document ids are captured
  *tensors*, so a new block of the same size does not recompile;
* ``flex_direct`` — the same compiled kernel, its BlockMask built from the
  mask's structure (``BlockMask.from_kv_blocks``: each 128×128 tile full,
  partial or empty from its position ranges) — no n² mask evaluation, no
  int32 index arithmetic over n²;
* ``varlen`` — ``torch.nn.attention.varlen.varlen_attn`` (flash), one
  sequence per document piece of the block (``cu_seq_q``/``cu_seq_k``), the
  window as ``window_size=(left, right)``, rows that see no key cropped off;
* ``sdpa_boolmask`` — the naive baseline: the memory-efficient SDPA kernel
  with the block's mask as an additive bias (n_q × n_k, built outside the
  timing);
* ``dense_upper_bound`` — ringbook's fused dense kernel on the same block,
  mask ignored (top-left causal on the diagonal): an *unmasked upper bound*
  on speed, not a candidate, never checked against the masked reference.

Block kinds (bf16, b=1, h=8, d=64): over a ``--seq`` (131072) token
sequence, ``--docs`` (16, 1024) equal documents shifted by half a document
(so that power-of-two blocks are cut: ids ``(i + L/2) // L``), causal; and a
causal sliding window of ``--window`` (4096) keys. Each at ``--sizes``
(q rows = kv rows = 8K, 16K, 64K), on the diagonal (q and kv the same
positions, from ``seq/2``) and just off it (kv the ``size`` positions before q).

Whole-sequence rows (``--whole-lens``): ``flex``, ``flex_direct``, ``varlen``
and ``ringbook.production_ring_attention(..., document_ids=, window=,
ring_size=w)`` for each w of ``--rings`` (candidate ``ringbook_production``
for the first, ``ringbook_ring{w}`` for the others) on the whole sequence
(the issue's target: ringbook within 1.1× of the faster peer), with cuDNN
dense causal as the unmasked upper bound (up to 131072 tokens).

Every candidate is first checked against float64 on sampled query rows (out
and lse; rows near the mask's edges included) and on the whole out/lse
(finite; lse −inf exactly where a row sees no key); with a backward, its
dq/dk/dv against float64 where the block is at most ``--grad-check-max``
rows. A candidate that fails is an ``error`` row and is not timed. The
correct ones are timed in interleaved rounds (CUDA events, median:
``ringbook.bench.measure.time_interleaved``), forward and forward+backward;
a call slower than ``--slow-ms`` is timed alone, a few repeats. An API this
torch lacks gives an ``unavailable`` row with the reason.

Output: one JSON line per row as it goes (``t`` = seconds since start,
compile time included in the first call's ``first_call_s``), and
``gpu_masked.json`` in ``--out`` (default ``$OUT``), rewritten after every
row: environment, every row (shape, mask, candidate, status, error, ms,
TFLOP/s of *visible* pairs), and ``choice``: the fastest correct candidate
per block kind and mode, and the whole-sequence ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ringbook  # noqa: E402
from ringbook.bench import environment  # noqa: E402
from ringbook.bench.measure import (  # noqa: E402
    MaskedReference,
    WrongResult,
    check_whole,
    compare,
    relative_error,
    time_interleaved,
    time_once,
)
from ringbook.bench.rules import finite_max_error  # noqa: E402
from ringbook.fast.blocks import Masked  # noqa: E402
from ringbook.fast.kernels import block_attention_backward, delta, forward_block  # noqa: E402
from ringbook.masks import MaskSpec, classify, keep  # noqa: E402
from ringbook.naive import naive_attention  # noqa: E402
from ringbook.tolerance import TOLERANCE  # noqa: E402

H, D, BWD_FACTOR = 8, 64, 3.5  # forward + backward ≈ 3.5 forwards (ringbook.bench.sweep.BACKWARD_FLOPS_FACTOR)
BIG_WINDOW = 1 << 30  # "no window" in the generic mask_mod
T0 = time.perf_counter()
STATE: dict = {"rows": []}


class Unavailable(Exception):
    """This torch (or device) lacks what a candidate needs: an ``unavailable`` row, not an error."""


def now() -> float:
    return round(time.perf_counter() - T0, 1)


def log(msg: str) -> None:
    print(f"[{now():7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- masks of contiguous position ranges

@dataclasses.dataclass
class Case:
    """q rows at positions ``[q0, q0 + nq)`` × kv rows at ``[k0, k0 + nk)`` of a sequence with document ids ``ids``
    (``(n,)`` CPU int64, None: one document) and ``window`` (None: none); causal."""

    name: str
    mask: str  # "docs16", "docs1024", "window4096"
    where: str  # "diag", "off", "whole"
    q0: int
    nq: int
    k0: int
    nk: int
    ids: torch.Tensor | None
    window: int | None
    causal: bool = True

    @property
    def kind(self) -> str:
        return f"{self.mask}/{self.where}"

    def q_doc(self):
        return None if self.ids is None else self.ids[self.q0:self.q0 + self.nq]

    def k_doc(self):
        return None if self.ids is None else self.ids[self.k0:self.k0 + self.nk]


def shifted_docs(n: int, count: int) -> torch.Tensor:
    """``count`` equal documents shifted by half a document: ids ``(i + L/2) // L`` (``count + 1`` ids, the first
    and last half as long), so that blocks at powers of two are cut by a boundary."""
    length = n // count
    return (torch.arange(n) + length // 2) // length


def row_counts(c: Case) -> torch.Tensor:
    """Keys each query row of the block sees (``(nq,)`` int64), without forming the mask."""
    p = torch.arange(c.q0, c.q0 + c.nq)
    lo = torch.full_like(p, c.k0)
    hi = torch.full_like(p, c.k0 + c.nk - 1)
    if c.causal:
        hi = torch.minimum(hi, p)
    if c.window is not None:
        lo = torch.maximum(lo, p - c.window + 1)
        if not c.causal:
            hi = torch.minimum(hi, p + c.window - 1)
    if c.ids is not None:
        ids = c.ids
        d = ids[p]
        lo = torch.maximum(lo, torch.searchsorted(ids, d, right=False))
        hi = torch.minimum(hi, torch.searchsorted(ids, d, right=True) - 1)
    return (hi - lo + 1).clamp(min=0)


def spec_of(c: Case) -> MaskSpec:
    if c.ids is None:
        return MaskSpec(c.causal, c.window)
    starts = (0, *(torch.nonzero(c.ids[1:] != c.ids[:-1]).flatten() + 1).tolist())
    return MaskSpec(c.causal, c.window, (tuple(starts),), int(c.ids.numel()))


def block_keep(c: Case, rows: torch.Tensor | None, device) -> torch.Tensor | None:
    """The block's boolean mask on ``rows`` (query rows inside the block; None: all), ``(m, nk)`` or
    ``(1, 1, m, nk)`` — :func:`ringbook.masks.keep`."""
    qp = torch.arange(c.q0, c.q0 + c.nq)
    qp = qp if rows is None else qp[rows.cpu()]
    kp = torch.arange(c.k0, c.k0 + c.nk)
    qd = None if c.ids is None else c.ids[qp][None]
    kd = None if c.ids is None else c.ids[kp][None]
    return keep(qp.to(device), kp.to(device), causal=c.causal, window=c.window,
                q_doc=None if qd is None else qd.to(device), k_doc=None if kd is None else kd.to(device))


# --------------------------------------------------------------------------- varlen: a block as flash sequences

INF = float("inf")


def varlen_plan(c: Case) -> dict:
    """The block as flash varlen sequences: per document piece the rows that see a key, cropped, with one
    ``window_size=(left, right)`` for all (flash aligns each sequence bottom-right: key c' seen by query r' iff
    ``sk − sq − left ≤ c' − r' ≤ sk − sq + right``, −1 = unbounded). Raises Unavailable when the block needs
    something flash cannot say (pieces that do not tile the rows, or different windows)."""
    if c.ids is None:
        pieces = [(c.q0, c.q0 + c.nq, c.k0, c.k0 + c.nk)]
    else:
        qd, kd = c.q_doc(), c.k_doc()
        pieces = []
        for d in torch.unique(qd).tolist():
            qi = torch.nonzero(qd == d).flatten()
            ki = torch.nonzero(kd == d).flatten()
            if ki.numel():
                pieces.append((c.q0 + int(qi[0]), c.q0 + int(qi[-1]) + 1, c.k0 + int(ki[0]), c.k0 + int(ki[-1]) + 1))
    seqs, windows = [], set()
    for qa, qb, ka, kb in pieces:
        nq, nk, delta_ = qb - qa, kb - ka, qa - ka  # key pos − query pos = (c − r) − delta_
        hi = delta_ if c.causal else INF
        lo = -INF
        if c.window is not None:
            lo = delta_ - c.window + 1
            if not c.causal:
                hi = min(hi, delta_ + c.window - 1)
        if lo > hi:
            continue
        r0 = int(max(0, -hi)) if hi != INF else 0
        r1 = int(min(nq, nk - lo)) if lo != -INF else nq
        c0 = int(max(0, lo)) if lo != -INF else 0
        c1 = int(min(nk, nq + hi)) if hi != INF else nk
        if r1 <= r0 or c1 <= c0:
            continue
        sq, sk, shift = r1 - r0, c1 - c0, c0 - r0
        lo2, hi2, s = lo - shift, hi - shift, sk - sq
        if lo2 <= -(sq - 1):  # the bound never bites inside the cropped rectangle
            lo2 = -INF
        if hi2 >= sk - 1:
            hi2 = INF
        if (lo2 != -INF and s < lo2) or (hi2 != INF and s > hi2):
            raise Unavailable(f"piece q[{qa},{qb}) k[{ka},{kb}): its band c'-r' in [{lo2},{hi2}] does not contain "
                              f"flash's alignment sk-sq={s}")
        left = -1 if lo2 == -INF else int(s - lo2)
        right = -1 if hi2 == INF else int(hi2 - s)
        windows.add((left, right))
        seqs.append((qa + r0, qa + r1, ka + c0, ka + c1))
    if not seqs:
        raise Unavailable("no query row of the block sees a key (an empty block is never planned)")
    if len(windows) > 1:
        raise Unavailable(f"the pieces need different flash windows {sorted(windows)}")
    for a, b in zip(seqs, seqs[1:]):
        if a[1] != b[0] or a[3] != b[2]:
            raise Unavailable(f"the pieces' rows do not tile: {a} then {b} (a gather would be needed)")
    cu_q = [0] + [s[1] - seqs[0][0] for s in seqs]
    cu_k = [0] + [s[3] - seqs[0][2] for s in seqs]
    return {"rows": (seqs[0][0] - c.q0, seqs[-1][1] - c.q0), "keys": (seqs[0][2] - c.k0, seqs[-1][3] - c.k0),
            "cu_q": cu_q, "cu_k": cu_k, "max_q": max(s[1] - s[0] for s in seqs),
            "max_k": max(s[3] - s[2] for s in seqs), "window_size": windows.pop(), "sequences": len(seqs)}


def _pad_rows(out, lse, rows, nq):
    """Cropped ``(out b m h d, lse b h m)`` back to the block's ``nq`` rows: zeros and −inf outside ``rows``."""
    r0, r1 = rows
    if (r0, r1) == (0, nq):
        return out, lse
    b, _, h, d = out.shape
    full_o = out.new_zeros(b, nq, h, d)
    full_l = lse.new_full((b, h, nq), -INF)
    full_o[:, r0:r1] = out
    full_l[:, :, r0:r1] = lse
    return full_o, full_l


def make_varlen(c: Case, scale: float, device):
    if device.type != "cuda":
        raise Unavailable("varlen_attn runs on CUDA only (flash)")
    try:
        from torch.nn.attention import varlen as vl
    except ImportError as exc:
        raise Unavailable(f"torch.nn.attention.varlen is missing in torch {torch.__version__}: {exc}") from None
    plan = varlen_plan(c)
    params = inspect.signature(vl.varlen_attn).parameters
    kw: dict = {}
    if "return_aux" not in params or not hasattr(vl, "AuxRequest"):
        raise Unavailable("varlen_attn has no return_aux (no lse)")
    kw["return_aux"] = vl.AuxRequest(lse=True)
    if "scale" in params:
        kw["scale"] = scale
    elif abs(scale - D ** -0.5) > 1e-12:
        raise Unavailable("varlen_attn has no scale argument")
    left, right = plan["window_size"]
    if "window_size" in params:
        kw["window_size"] = (left, right)
    elif (left, right) == (-1, 0) and "is_causal" in params:
        kw["is_causal"] = True
    elif (left, right) != (-1, -1):
        raise Unavailable(f"this varlen_attn has no window_size (needs {(left, right)})")
    cu_q = torch.tensor(plan["cu_q"], dtype=torch.int32, device=device)
    cu_k = torch.tensor(plan["cu_k"], dtype=torch.int32, device=device)
    (r0, r1), (c0, c1) = plan["rows"], plan["keys"]

    def fwd(q, k, v):
        out, lse = vl.varlen_attn(q[0, r0:r1], k[0, c0:c1], v[0, c0:c1], cu_q, cu_k, plan["max_q"], plan["max_k"],
                                  **kw)
        if lse.shape[0] != H:  # (T, h) in some versions' docs, (h, T) from flash
            lse = lse.transpose(0, 1)
        return _pad_rows(out[None], lse[None].float(), (r0, r1), c.nq)

    info = {k_: plan[k_] for k_ in ("rows", "keys", "window_size", "sequences", "max_q", "max_k")}
    info["api"] = "varlen_attn(" + ", ".join(sorted(kw)) + ")"
    return fwd, info


# --------------------------------------------------------------------------- flex_attention

_FLEX: dict = {}


def flex_api():
    """``(compiled flex_attention, lse keyword, create_block_mask, BlockMask)``; Unavailable if missing."""
    if "api" not in _FLEX:
        try:
            from torch.nn.attention import flex_attention as fa
        except ImportError as exc:
            raise Unavailable(f"flex_attention is missing in torch {torch.__version__}: {exc}") from None
        params = inspect.signature(fa.flex_attention).parameters
        if "return_aux" in params and hasattr(fa, "AuxRequest"):
            lse_kw = {"return_aux": fa.AuxRequest(lse=True)}
        elif "return_lse" in params:
            lse_kw = {"return_lse": True}
        else:
            raise Unavailable("flex_attention returns no lse in this torch")
        for cfg, key in ((torch._dynamo.config, "cache_size_limit"), (torch._dynamo.config, "recompile_limit"),
                         (torch._dynamo.config, "accumulated_cache_size_limit"),
                         (torch._dynamo.config, "accumulated_recompile_limit")):
            if hasattr(cfg, key):
                setattr(cfg, key, max(getattr(cfg, key), 256))
        _FLEX["api"] = (torch.compile(fa.flex_attention, dynamic=False), lse_kw, fa.create_block_mask, fa.BlockMask)
    return _FLEX["api"]


def generic_mask_mod(q_off, k_off, window, doc, causal: bool):
    """One mask_mod for every block: causal, window and documents by token position, its numbers captured tensors
    (0-dim int32 offsets and window, the whole sequence's int32 document ids), so a new block of the same size
    reuses the compiled kernel."""
    def mask_mod(b, h, q_idx, kv_idx):
        qp = q_idx + q_off
        kp = kv_idx + k_off
        m = (qp - kp) < window
        if causal:
            m = m & (kp <= qp)
        else:
            m = m & (kp - qp < window)
        return m & (doc[qp] == doc[kp])
    return mask_mod


def _mask_tensors(c: Case, device):
    n_ids = c.ids.numel() if c.ids is not None else max(c.q0 + c.nq, c.k0 + c.nk)
    doc = (c.ids if c.ids is not None else torch.zeros(n_ids, dtype=torch.int64)).to(device, torch.int32)
    i32 = dict(dtype=torch.int32, device=device)
    return (torch.tensor(c.q0, **i32), torch.tensor(c.k0, **i32),
            torch.tensor(c.window if c.window is not None else BIG_WINDOW, **i32), doc)


def direct_block_mask(c: Case, device, block: int = 128):
    """``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)`` from the position ranges of each
    ``block × block`` tile: empty, full or partial, as :func:`ringbook.masks.classify` decides a block."""
    def ranges(start, length):
        a = torch.arange(0, length, block, device=device)
        return start + a, start + torch.clamp(a + block, max=length) - 1
    qs, qe = (x[:, None] for x in ranges(c.q0, c.nq))
    ks, ke = (x[None, :] for x in ranges(c.k0, c.nk))
    empty = torch.zeros(qs.shape[0], ks.shape[1], dtype=torch.bool, device=device)
    full = torch.ones_like(empty)
    if c.causal:
        empty |= ks > qe
        full &= ke <= qs
    if c.window is not None:
        empty |= (qs - ke >= c.window) if c.causal else ((qs - ke >= c.window) | (ks - qe >= c.window))
        full &= (qe - ks < c.window) if c.causal else ((qe - ks < c.window) & (ke - qs < c.window))
    if c.ids is not None:
        ids = c.ids.to(device)
        dqs, dqe, dks, dke = ids[qs], ids[qe], ids[ks], ids[ke]
        empty |= (dks > dqe) | (dqs > dke)
        full &= (dqs == dqe) & (dks == dke) & (dqs == dks)
    full &= ~empty
    partial = ~empty & ~full

    def ordered(m):
        num = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[None, None], idx[None, None]
    return (*ordered(partial), *ordered(full))


def make_flex(c: Case, scale: float, device, direct: bool):
    flex, lse_kw, create_block_mask, block_mask_cls = flex_api()
    mod = generic_mask_mod(*_mask_tensors(c, device), c.causal)
    info = {}
    t = time.perf_counter()
    if direct:
        num, idx, fnum, fidx = direct_block_mask(c, device)
        bm = block_mask_cls.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=128, mask_mod=mod,
                                           seq_lengths=(c.nq, c.nk))
        info["mask_build"] = "BlockMask.from_kv_blocks (tiles classified from position ranges)"
    else:
        kw = {"device": device}
        if "_compile" in inspect.signature(create_block_mask).parameters:
            kw["_compile"] = True
            info["mask_build"] = "create_block_mask(..., _compile=True)"
        else:
            info["mask_build"] = "torch.compile(create_block_mask)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            build = create_block_mask if kw.get("_compile") else torch.compile(create_block_mask)
            bm = build(mod, 1, 1, c.nq, c.nk, **kw)
    sync(device)
    info["mask_build_s"] = round(time.perf_counter() - t, 3)
    info["mask_blocks"] = {"partial": int(bm.kv_num_blocks.sum()),
                           "full": int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0,
                           "tiles": int(math.ceil(c.nq / 128) * math.ceil(c.nk / 128))}

    def fwd(q, k, v):
        res = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, scale=scale, **lse_kw)
        out, aux = res
        lse = aux.lse if hasattr(aux, "lse") else aux
        return out.transpose(1, 2), lse.float()
    return fwd, info


# --------------------------------------------------------------------------- the other candidates

def make_masked(c: Case, device):
    kern = Masked(torch.arange(c.q0, c.q0 + c.nq, device=device), torch.arange(c.k0, c.k0 + c.nk, device=device),
                  c.causal, None if c.ids is None else c.q_doc()[None].to(device),
                  None if c.ids is None else c.k_doc()[None].to(device), c.window)
    return kern, {"path": "ringbook.fast.blocks.Masked (attend_block / attend_block_backward, einops)"}


def make_boolmask(c: Case, scale: float, device):
    if device.type != "cuda":
        raise Unavailable("the memory-efficient SDPA kernel runs on CUDA only")
    counts = row_counts(c)
    seen = torch.nonzero(counts > 0).flatten()
    r0, r1 = int(seen[0]), int(seen[-1]) + 1
    m = block_keep(c, torch.arange(r0, r1), device)
    m = m.reshape(r1 - r0, c.nk) if m is not None else torch.ones(r1 - r0, c.nk, dtype=torch.bool, device=device)
    bias = torch.zeros(r1 - r0, c.nk, dtype=torch.bfloat16, device=device).masked_fill_(~m, -INF)
    del m
    bias = bias[None, None].expand(1, H, r1 - r0, c.nk)

    def fwd(q, k, v):
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q[:, r0:r1].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias.to(q.dtype), True, 0.0, False,
            scale=scale)
        out, lse = res[0].transpose(1, 2), res[1][..., :r1 - r0]
        return _pad_rows(out, lse, (r0, r1), c.nq)
    return fwd, {"rows": (r0, r1), "bias_gb": round(bias[0, 0].numel() * 2 / 1e9, 3)}


def dense_block(c: Case, scale: float):
    causal = c.q0 == c.k0 and c.nq == c.nk and c.causal  # diagonal: top-left causal is the causal mask

    def fwd(q, k, v):
        return forward_block(q, k, v, scale=scale, causal=causal, backend="auto")

    def bwd(q, k, v, out, lse, dout):
        return block_attention_backward(q, k, v, out, lse, dout, scale=scale, causal=causal, backend="auto")
    return fwd, bwd, {"causal": causal, "path": "ringbook.fast.kernels.forward_block (fused dense, lse)"}


# --------------------------------------------------------------------------- checks

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_rows(c: Case, counts: torch.Tensor, count: int = 48) -> torch.Tensor:
    """Query rows to check: evenly spaced, the first few, and rows the mask cuts (some keys seen, not all)."""
    n = c.nq
    rows = set(torch.linspace(0, n - 1, count // 2).round().long().tolist()) | set(range(min(4, n)))
    seen = torch.nonzero(counts > 0).flatten()
    if seen.numel():
        rows |= {int(seen[0]), int(seen[-1])}
    cut = torch.nonzero((counts > 0) & (counts < counts.max())).flatten()
    if cut.numel():
        rows |= set(cut[torch.linspace(0, cut.numel() - 1, min(count // 2, cut.numel())).round().long()].tolist())
    return torch.tensor(sorted(rows))


def block_reference(c: Case, q, k, v, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(out, lse)`` of the block's query ``rows`` (naive attention, a head at a time)."""
    mask = block_keep(c, rows, q.device)
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]
    qr = q[:, rows.to(q.device)]
    parts = [naive_attention(qr[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1], mask=mask)
             for h in range(q.shape[2])]
    return torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=1)


def block_reference_grads(c: Case, q, k, v, dout):
    mask = block_keep(c, None, q.device)
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]
    grads = []
    for h in range(q.shape[2]):
        x = [t[:, :, h:h + 1].detach().double().requires_grad_() for t in (q, k, v)]
        out, _ = naive_attention(*x, mask=mask)
        out.backward(dout[:, :, h:h + 1].double())
        grads.append([t.grad for t in x])
    return tuple(torch.cat(g, dim=2) for g in zip(*grads))


def check_result(c: Case, q, k, v, out, lse, ref, rows, counts, dtype) -> dict:
    """Out and lse against float64 on ``rows``; the whole out finite, the whole lse −inf exactly where a row sees
    no key. Raises WrongResult."""
    no_key = (counts == 0).to(out.device)[None, None] if bool((counts == 0).any()) else None
    check_whole(out, lse, no_key=no_key)
    ref_out, ref_lse = ref
    err, scale = compare(out[:, rows.to(out.device)], ref_out)
    lse_err = finite_max_error(lse[:, :, rows.to(lse.device)], ref_lse, "lse")
    fin = ref_lse[torch.isfinite(ref_lse)]
    lse_rel = relative_error(lse_err, fin.abs().max().item() if fin.numel() else 1.0)
    res = {"max_rel_err": relative_error(err, scale), "lse_max_rel_err": lse_rel, "checked_rows": int(rows.numel())}
    tol = TOLERANCE[dtype]
    if not res["max_rel_err"] <= tol or not lse_rel <= tol:
        raise WrongResult(f"out rel err {res['max_rel_err']:.3g}, lse rel err {lse_rel:.3g} (tolerance {tol:g})")
    return res


def check_grads(grads, ref_grads, dtype) -> float:
    worst = 0.0
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        try:
            e, s = compare(g, r)
        except WrongResult as exc:
            raise WrongResult(f"{name}: {exc}") from None
        worst = max(worst, relative_error(e, s))
    if not worst <= TOLERANCE[dtype]:
        raise WrongResult(f"gradient rel err {worst:.3g} exceeds {TOLERANCE[dtype]:g}")
    return worst


# --------------------------------------------------------------------------- rows, timing, output

def emit(row: dict, args) -> None:
    row["t"] = now()
    STATE["rows"].append(row)
    print(json.dumps({k: v for k, v in row.items() if k not in ("traceback", "times_ms")}, default=str), flush=True)
    write(args)


def write(args) -> None:
    STATE["choice"] = choose(STATE["rows"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_masked.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(STATE, indent=1, default=str))
    os.replace(tmp, path)


PEERS = ("flex", "flex_direct", "varlen")
NOT_CANDIDATES = ("dense_upper_bound",)


def choose(rows: list[dict]) -> dict:
    """Per block kind and mode: the fastest correct candidate at each size, and over the sizes (least total ms
    among the candidates measured at every size); whole-sequence rows: ringbook against the faster peer."""
    timed = [r for r in rows if r.get("status") == "ok" and isinstance(r.get("ms"), (int, float))
             and r["candidate"] not in NOT_CANDIDATES]
    blocks: dict = {}
    for r in timed:
        if r["where"] == "whole":
            continue
        slot = blocks.setdefault(r["kind"], {}).setdefault(r["mode"], {"by_size": {}, "_ms": {}})
        size = str(r["nq"])
        best = slot["by_size"].get(size)
        if best is None or r["ms"] < best["ms"]:
            slot["by_size"][size] = {"fastest": r["candidate"], "ms": r["ms"], "tflops": r.get("tflops")}
        slot["_ms"].setdefault(r["candidate"], {})[size] = r["ms"]
    for kind in blocks.values():
        for slot in kind.values():
            sizes = set(slot["by_size"])
            totals = {cand: sum(ms.values()) for cand, ms in slot.pop("_ms").items() if set(ms) == sizes}
            slot["overall"] = min(totals, key=totals.get) if totals else None
            slot["total_ms"] = {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: kv[1])}
    whole: dict = {}
    for r in timed:
        if r["where"] != "whole":
            continue
        whole.setdefault(f"{r['mask']}/n={r['nq']}", {}).setdefault(r["mode"], {})[r["candidate"]] = r["ms"]
    for key, modes in whole.items():
        for mode, ms in modes.items():
            peers = {p: ms[p] for p in PEERS if p in ms}
            if peers:
                fastest = min(peers, key=peers.get)
                ms["fastest_peer"] = fastest
                for cand in [c for c in list(ms) if c == "ringbook_production" or c.startswith("ringbook_ring")]:
                    tag = "" if cand == "ringbook_production" else cand[len("ringbook"):]
                    ms[f"ringbook{tag}_over_fastest_peer"] = round(ms[cand] / peers[fastest], 3)
                    ms[f"within_1.1x{tag}"] = ms[f"ringbook{tag}_over_fastest_peer"] <= 1.1
    return {"blocks": blocks, "whole": whole}


def base_row(c: Case, cand: str, mode: str, dtype) -> dict:
    return {"kind": c.kind, "mask": c.mask, "where": c.where, "name": c.name, "candidate": cand, "mode": mode,
            "nq": c.nq, "nk": c.nk, "q0": c.q0, "k0": c.k0, "window": c.window,
            "documents": None if c.ids is None else int(c.ids.max()) + 1, "causal": c.causal, "batch": 1,
            "heads": H, "head_dim": D, "dtype": str(dtype).replace("torch.", ""), "status": None, "error": None,
            "ms": None, "tflops": None}


def run_group(c: Case, mode: str, makers: dict, q, k, v, dout, ref, ref_grads, rows, counts, visible, args,
              extra: dict) -> None:
    """Check each candidate of one (block, mode), then time the correct ones; one row each."""
    device, dtype = q.device, q.dtype
    flops = 4.0 * D * visible * (BWD_FACTOR if mode == "fwd+bwd" else 1.0)
    ready, out_rows = {}, {}
    for cand, make in makers.items():
        row = base_row(c, cand, mode, dtype)
        row.update(extra)
        out_rows[cand] = row
        t = time.perf_counter()
        try:
            call, grads_of, info = make(mode)
            row.update(info)
            first = time.perf_counter()
            res = call()
            sync(device)
            row["first_call_s"] = round(time.perf_counter() - first, 3)
            if cand in NOT_CANDIDATES:
                row["check"] = "not checked: computes attention without the mask (an upper bound on speed)"
            else:
                out, lse, grads = grads_of(res)
                row.update(check_result(c, q, k, v, out, lse, ref, rows, counts, dtype))
                if mode == "fwd+bwd":
                    if ref_grads is not None:
                        row["grad_max_rel_err"] = check_grads(grads, ref_grads, dtype)
                    else:
                        row["grad_check"] = f"skipped: block over --grad-check-max={args.grad_check_max} rows"
                        for name, g in zip(("dq", "dk", "dv"), grads):
                            if not torch.isfinite(g).all():
                                raise WrongResult(f"{name} is not finite")
            del res
            est = time_once(call, device)
            row["est_ms"] = round(est, 3)
            ready[cand] = (call, est)
        except (Unavailable, NotImplementedError) as exc:  # an API this torch or device lacks
            row.update(status="unavailable", error=f"{type(exc).__name__}: {exc}"[:600])
        except Exception as exc:  # noqa: BLE001 - every failure is a row, the run goes on
            if "NotImplementedError" in f"{type(exc).__name__}: {exc}":  # wrapped (InductorError): unsupported here
                row.update(status="unavailable", error=f"{type(exc).__name__}: {exc}"[:600])
                row["setup_s"] = round(time.perf_counter() - t, 3)
                free(device)
                continue
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:800],
                       traceback=traceback.format_exc(limit=8))
            if "illegal memory access" in str(exc).lower():
                emit(row, args)
                raise SystemExit("CUDA context is broken (illegal memory access); stopping")
        row["setup_s"] = round(time.perf_counter() - t, 3)
        free(device)
    fast = {n_: f for n_, (f, est) in ready.items() if est <= args.slow_ms}
    slow = {n_: (f, est) for n_, (f, est) in ready.items() if est > args.slow_ms}
    timings = {}
    if fast:
        try:
            rounds = args.rounds
            total = sum(ready[n_][1] for n_ in fast)
            rounds = int(max(3, min(rounds, args.group_budget_ms / max(total, 1e-3))))
            timings.update({n_: dict(x, rounds=rounds) for n_, x in
                            time_interleaved(fast, device, rounds=rounds, warmup=1).items()})
        except Exception as exc:  # noqa: BLE001
            for n_ in fast:
                out_rows[n_].update(status="error", error=f"timing: {type(exc).__name__}: {exc}"[:600])
    for n_, (f, est) in slow.items():  # the estimate's call is the first sample
        reps = int(max(1, min(3, args.slow_budget_ms / est)))
        try:
            ts = [est] + [time_once(f, device) for _ in range(reps - 1)]
            timings[n_] = {"median_ms": statistics.median(ts), "times_ms": [round(x, 4) for x in ts],
                           "rounds": reps, "timed": "alone (slower than --slow-ms)"}
        except Exception as exc:  # noqa: BLE001
            out_rows[n_].update(status="error", error=f"timing: {type(exc).__name__}: {exc}"[:600])
    for cand, row in out_rows.items():
        if cand in timings and row["status"] is None:
            ms = timings[cand]["median_ms"]
            row.update(status="ok", ms=round(ms, 4), tflops=round(flops / ms / 1e9, 2),
                       times_ms=timings[cand]["times_ms"], rounds=timings[cand]["rounds"])
            if "timed" in timings[cand]:
                row["timed"] = timings[cand]["timed"]
        elif row["status"] is None:
            row["status"] = "error"
        emit(row, args)
    free(device)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autograd_call(fwd, q, k, v, dout, mode):
    """A call of ``fwd`` (forward) or of forward and backward (``torch.autograd.grad`` into leaves), and how to
    read ``(out, lse, grads)`` from its result."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fwd(q, k, v)
        return call, lambda res: (res[0], res[1], None)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def call():
        out, lse = fwd(*leaves)
        grads = torch.autograd.grad(out, leaves, dout)
        return out.detach(), lse.detach(), grads
    return call, lambda res: res


def block_makers(c: Case, q, k, v, dout, scale, args) -> dict:
    device = q.device
    wanted = set(args.candidates)

    def masked(mode):
        kern, info = make_masked(c, device)
        if mode == "fwd":
            def call():
                return kern.forward(q, k, v, scale=scale, backend="auto")
            return call, lambda res: (res[0], res[1], None), info

        def call():
            out, lse = kern.forward(q, k, v, scale=scale, backend="auto")
            out = out.to(q.dtype)
            grads = kern.backward(q, k, v, out, lse, dout, delta=delta(dout, out), scale=scale, backend="auto")
            return out, lse, grads
        return call, lambda res: res, info

    def boolmask(mode):
        fwd, info = make_boolmask(c, scale, device)
        return (*autograd_call(fwd, q, k, v, dout, mode), info)

    makers = {"ringbook_masked": masked, **peer_makers(c, q, k, v, dout, scale), "sdpa_boolmask": boolmask}
    return {name: m for name, m in makers.items() if name in wanted}


def peer_makers(c: Case, q, k, v, dout, scale) -> dict:
    """The makers of the peers a block row and a whole-sequence row share: flex_attention (two BlockMask
    constructions), varlen_attn, and the unmasked dense upper bound."""
    device = q.device

    def flex(direct):
        def make(mode):
            fwd, info = make_flex(c, scale, device, direct)
            return (*autograd_call(fwd, q, k, v, dout, mode), info)
        return make

    def varlen(mode):
        fwd, info = make_varlen(c, scale, device)
        return (*autograd_call(fwd, q, k, v, dout, mode), info)

    def dense(mode):
        fwd, bwd, info = dense_block(c, scale)
        if mode == "fwd":
            return lambda: fwd(q, k, v), lambda res: (res[0], res[1], None), info

        def call():
            out, lse = fwd(q, k, v)
            out = out.to(q.dtype)
            return out, lse, bwd(q, k, v, out, lse, dout)
        return call, lambda res: res, info

    return {"flex": flex(False), "flex_direct": flex(True), "varlen": varlen, "dense_upper_bound": dense}


# --------------------------------------------------------------------------- block cases and whole sequences

def block_cases(args) -> list[Case]:
    n = args.seq
    masks = [(f"docs{cnt}", shifted_docs(n, cnt), None) for cnt in args.docs]
    masks += [(f"window{w}", None, w) for w in args.windows]
    cases = []
    for size in args.sizes:
        for name, ids, window in masks:
            q0 = max(size, min(n // 2, n - size))
            for where, k0 in (("diag", q0), ("off", q0 - size)):
                cases.append(Case(f"{name} {where} {size}x{size}", name, where, q0, size, k0, size, ids, window))
    return cases


def run_blocks(args, device, dtype) -> None:
    scale = D ** -0.5
    for c in block_cases(args):
        cls = classify(torch.arange(c.q0, c.q0 + c.nq), torch.arange(c.k0, c.k0 + c.nk), spec_of(c))
        counts = row_counts(c)
        visible = int(counts.sum()) * H
        extra = {"classify": cls, "visible_fraction": round(visible / (H * c.nq * c.nk), 6)}
        log(f"block {c.name}: {cls}, visible {extra['visible_fraction']:.4%}")
        gen = torch.Generator(device=device).manual_seed(c.nq + c.q0 - c.k0)
        q, k, v, dout = (torch.randn(1, n_, H, D, generator=gen, device=device, dtype=dtype)
                         for n_ in (c.nq, c.nk, c.nk, c.nq))
        rows = check_rows(c, counts)
        ref = block_reference(c, q, k, v, rows)
        for mode in args.modes:
            ref_grads = None
            if mode == "fwd+bwd" and c.nq <= args.grad_check_max and c.nk <= args.grad_check_max:
                ref_grads = block_reference_grads(c, q, k, v, dout)
            run_group(c, mode, block_makers(c, q, k, v, dout, scale, args), q, k, v, dout, ref, ref_grads, rows,
                      counts, visible, args, extra)
        q = k = v = dout = ref = None
        free(device)


def whole_cases(args) -> list[Case]:
    cases = []
    for n in args.whole_lens:
        for cnt in args.docs:
            cases.append(Case(f"docs{cnt} whole {n}", f"docs{cnt}", "whole", 0, n, 0, n, shifted_docs(n, cnt), None))
        for w in args.windows:
            cases.append(Case(f"window{w} whole {n}", f"window{w}", "whole", 0, n, 0, n, None, w))
    return cases


def run_whole(args, device, dtype) -> None:
    scale = D ** -0.5
    for c in whole_cases(args):
        n = c.nq
        counts = row_counts(c)
        visible = int(counts.sum()) * H
        log(f"whole {c.name}: visible {visible / (H * n * n):.4%}")
        try:
            gen = torch.Generator(device=device).manual_seed(n)
            q, k, v, dout = (torch.randn(1, n, H, D, generator=gen, device=device, dtype=dtype) for _ in range(4))
        except Exception as exc:  # noqa: BLE001
            row = base_row(c, "inputs", "fwd", dtype)
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:600])
            emit(row, args)
            continue
        rows = check_rows(c, counts, count=32)
        reference = MaskedReference(document_ids=None if c.ids is None else c.ids[None].to(device), window=c.window)
        pos = rows.to(device)
        ref = reference.rows(q, k, v, pos, causal=True)
        wanted = set(args.candidates)

        def production(mode, c=c, ring=args.rings[0]):
            ids = None if c.ids is None else c.ids[None]

            def fwd(a, b, d_):
                return ringbook.production_ring_attention(a, b, d_, ring_size=ring, causal=True,
                                                          document_ids=ids, window=c.window, layout="zigzag")
            return (*autograd_call(fwd, q, k, v, dout, mode),
                    {"path": f"production_ring_attention(ring_size={ring}, layout=zigzag)"})

        peers = peer_makers(c, q, k, v, dout, scale)

        def dense(mode, n=n, peers=peers):
            if n > 131072:
                raise Unavailable("the unmasked upper bound is skipped beyond 131072 tokens (dense n² is seconds)")
            return peers["dense_upper_bound"](mode)

        makers = {"ringbook_production": production,
                  **{f"ringbook_ring{w}": functools.partial(production, ring=w) for w in args.rings[1:]},
                  **peers, "dense_upper_bound": dense}
        makers = {name: m for name, m in makers.items() if name in wanted or name.startswith("ringbook_")}
        for mode in args.modes:
            run_group(c, mode, makers, q, k, v, dout, ref, None, rows, counts, visible, args,
                      {"visible_fraction": round(visible / (H * n * n), 6)})
        q = k = v = dout = ref = None
        free(device)


# --------------------------------------------------------------------------- main

ALL = ("ringbook_masked", "flex", "flex_direct", "varlen", "sdpa_boolmask", "dense_upper_bound")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="directory for gpu_masked.json")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny shapes (with --device cpu: a plumbing smoke test)")
    p.add_argument("--seq", type=int, default=131072, help="sequence length the blocks sit in")
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 65536], help="block rows (q = kv)")
    p.add_argument("--docs", type=int, nargs="+", default=[16, 1024], help="equal documents over the sequence")
    p.add_argument("--windows", type=int, nargs="+", default=[4096], help="causal sliding windows")
    p.add_argument("--whole-lens", type=int, nargs="*", default=[131072, 1048576], help="whole-sequence rows")
    p.add_argument("--rings", type=int, nargs="+", default=[8, 1, 16], help="ring sizes of production_ring_attention")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=("fwd", "fwd+bwd"))
    p.add_argument("--candidates", nargs="+", default=list(ALL), choices=ALL)
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (at most)")
    p.add_argument("--group-budget-ms", type=float, default=1500.0, help="time per group of interleaved calls")
    p.add_argument("--slow-ms", type=float, default=300.0, help="a call slower than this is timed alone")
    p.add_argument("--slow-budget-ms", type=float, default=2500.0, help="time for a slow call's repeats")
    p.add_argument("--grad-check-max", type=int, default=8192, help="largest block whose gradients are checked")
    p.add_argument("--no-blocks", action="store_true", help="whole-sequence rows only")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_masked needs a CUDA device (or --device cpu --quick)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        args.seq, args.sizes, args.docs, args.windows = 2048, [256], [4, 64], [64]
        args.whole_lens, args.rings, args.rounds, args.grad_check_max = [1024], [4, 1], 3, 1024
    env = environment(device)
    try:
        import triton
        env["triton_version"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton_version"] = f"not importable: {exc}"[:100]
    STATE.update(env=env, args={k: str(v) for k, v in vars(args).items()}, dtype=str(dtype), batch=1, heads=H,
                 head_dim=D, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                 notes=["tflops: FLOPs of the visible (query, key) pairs only (4·d each forward, ×3.5 fwd+bwd)",
                        "dense_upper_bound ignores the mask: not a candidate, not checked",
                        "documents are equal and shifted by half a document (ids (i + L/2) // L)",
                        "varlen/sdpa_boolmask compute only the rows that see a key (rows listed), the rest are "
                        "filled with out 0, lse -inf"])
    print(json.dumps({"env": env}), flush=True)
    warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
    if not args.no_blocks:
        run_blocks(args, device, dtype)
    run_whole(args, device, dtype)
    from ringbook.fast.state import STATUS
    STATE["ringbook_status"] = dict(STATUS)  # what the engine chose (the Triton merge's self-check among it)
    STATE["finished_s"] = now()
    write(args)
    counts = {s: sum(r["status"] == s for r in STATE["rows"]) for s in ("ok", "error", "unavailable")}
    log(f"done: {counts}; wrote {args.out / 'gpu_masked.json'}")
    print(json.dumps({"choice": STATE["choice"]}, default=str), flush=True)
    return 0 if counts["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
