"""Fast kernels of the ring engine: one block of attention and its backward, on PyTorch's fused SDPA ops.

A ring step attends a query block to a key/value block and folds the
result into a running ``(out, lse)`` with equation (M) of notebook 01.
:mod:`ringbook.online_softmax` does both in einops, for reading; this module
does them fast, for the ring engine (:mod:`ringbook.fast.engine`):

* :func:`block_attention` — ``(out, lse)`` of one block. On CUDA it calls
  PyTorch's lse-returning SDPA kernels (cuDNN, flash or memory-efficient:
  ``torch.ops.aten._scaled_dot_product_{cudnn,flash,efficient}_attention``, called by keyword
  through :func:`ringbook.fast.aten.call`);
  elsewhere, and for dtypes they refuse, :func:`~ringbook.online_softmax.attend_block`
  (einops, keys visited ``KEY_CHUNK`` at a time). Block kinds: ``causal=False``
  (no mask) or ``causal=True``, which means a *diagonal* block: query and key
  rows are the same token positions, so the kernels' top-left causal mask
  is exact. Anything else (a causal block with different positions) is not
  a block these kernels take; the ring's plan never produces one.
* :func:`block_attention_backward` — ``(dq, dk, dv)`` of one block given the
  *global* ``out`` and ``lse`` of its query rows (the FlashAttention
  backward; the ring sums the blocks). On CUDA in bfloat16/float16 the cuDNN
  backward op ``_scaled_dot_product_cudnn_attention_backward`` (else the
  flash one, ``_scaled_dot_product_flash_attention_backward``), as PyTorch's
  own context parallel feeds them; elsewhere
  :func:`~ringbook.online_softmax.attend_block_backward`.
* the merge of block results into the ring's accumulators is
  :mod:`ringbook.fast.merge`.

Grouped-query attention: k/v may have ``h_kv`` heads dividing q's ``h``
(q head i reads k/v head ``i // (h / h_kv)``); K/V are expanded only at the
kernel call, and only for a kernel that cannot take them unexpanded.

Trust, but check: before a CUDA kernel is used for a (device, dtype,
head_dim, causal, GQA) combination it is run once on a small strided input
and compared with the einops path; a kernel that errors or disagrees is
skipped (:data:`STATUS` records why). The chosen backend is cached. Shapes:
q ``b n h d``, k/v ``b n h_kv d``, lse ``b h n``.
"""

from __future__ import annotations

import torch
from einops import einsum, reduce

from .._utils import LOW_PRECISION, compute_dtype, refuse_double_backward
from ..online_softmax import KEY_CHUNK, attend_block, attend_block_backward
from ..tolerance import TOLERANCE
from . import aten
from .state import AUX as _AUX
from .state import BACKWARD_OK as _BACKWARD_OK
from .state import CHOICE as _CHOICE
from .state import STATUS, reset_caches, warn_once

BACKENDS = ("auto", "cudnn", "flash", "efficient", "einops")
__all__ = ["BACKENDS", "STATUS", "block_attention", "block_attention_backward", "check_backend", "delta",
           "expand_kv", "forward_block", "reduce_kv", "reset_caches", "warn_once"]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``b n h_kv d`` → ``b n h d``: k/v head j serves q heads ``j·g … j·g+g−1`` (g = h / h_kv)."""
    g = heads // x.shape[2]
    return x if g == 1 else x.repeat_interleave(g, dim=2)


def reduce_kv(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Inverse of :func:`expand_kv` for gradients: sum the g query heads that shared a k/v head."""
    return dx if dx.shape[2] == kv_heads else reduce(dx, "b n (hk g) d -> b n hk d", "sum", hk=kv_heads)


# --------------------------------------------------------------------------- forward of one block

def _sdpa_call(backend: str, q, k, v, scale: float, causal: bool):
    """One lse-returning SDPA kernel on ``b n h d`` views. Returns ``(out b n h d, lse b h n float32)``."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # b h n d views: the kernels take strides
    common = {"query": qt, "key": kt, "value": vt, "dropout_p": 0.0, "is_causal": causal, "scale": scale}
    if backend == "cudnn":
        res = aten.call("_scaled_dot_product_cudnn_attention", **common, attn_bias=None, compute_log_sumexp=True,
                        return_debug_mask=False)
        out, lse = res["output"], res["logsumexp"]
        if lse.dim() == 4:  # (b, h, n, 1)
            lse = lse[..., 0]
    elif backend == "flash":
        res = aten.call("_scaled_dot_product_flash_attention", **common, return_debug_mask=False)
        out, lse = res["output"], res["logsumexp"]
    elif backend == "efficient":
        res = aten.call("_scaled_dot_product_efficient_attention", **common, attn_bias=None, compute_log_sumexp=True)
        out, lse = res["output"], res["log_sumexp"][..., :q.shape[1]]  # lse is padded to a multiple of 32 rows
    else:
        raise ValueError(f"unknown SDPA backend {backend!r}")
    return out.transpose(1, 2), lse


def _einops_block(q, k, v, scale: float, causal: bool):
    """The reference path: :func:`attend_block` (top-left causal), keys ``KEY_CHUNK`` at a time."""
    h = q.shape[2]
    return attend_block(q, expand_kv(k, h), expand_kv(v, h), scale=scale, causal=causal, chunk=KEY_CHUNK)


def _candidates(device: torch.device, dtype: torch.dtype, gqa: bool, backend: str):
    """(backend, expand K/V) pairs to try, fastest first (cuDNN > flash > efficient on sm90 in half precision)."""
    if device.type != "cuda" or backend == "einops":
        return [("einops", False)]
    names = [backend] if backend != "auto" else (
        ["cudnn", "flash", "efficient"] if dtype in LOW_PRECISION else ["efficient"] if dtype == torch.float32 else [])
    out = []
    for name in names:
        out += [(name, False), (name, True)] if gqa else [(name, False)]
    return out + [("einops", False)]


def _probe_inputs(device, dtype, shapes, seed=0):
    """Random strided views (a window of a larger buffer) of the given ``b n h d`` shapes."""
    gen = torch.Generator(device=device).manual_seed(seed)
    views = []
    for b, n, h, d in shapes:
        base = torch.randn(b, 2 * n, h, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
        views.append(base[:, n // 2:n // 2 + n])  # non-contiguous batch stride, like the ring's slices
    return views


def _tolerance(dtype) -> float:
    """The project's one tolerance table (:data:`ringbook.tolerance.TOLERANCE`)."""
    return TOLERANCE[dtype]


def _probe_forward(backend, expand, device, dtype, d, causal, h, hk, scale) -> str | None:
    """None if the kernel agrees with the einops path on a small problem, else what went wrong."""
    n_q, n_k = (128, 128) if causal else (128, 64)
    q, k, v = _probe_inputs(device, dtype, [(2, n_q, h, d), (2, n_k, hk, d), (2, n_k, hk, d)])
    try:
        kk, vv = (expand_kv(k, h), expand_kv(v, h)) if expand else (k, v)
        out, lse = _sdpa_call(backend, q, kk, vv, scale, causal)
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    ref_out, ref_lse = _einops_block(q, k, v, scale, causal)
    err_o = (out.float() - ref_out.float()).abs().max().item()
    err_l = (lse.float() - ref_lse.float()).abs().max().item()
    if tuple(out.shape) != tuple(q.shape) or tuple(lse.shape) != (2, h, n_q):
        return f"wrong shapes: out {tuple(out.shape)}, lse {tuple(lse.shape)}"
    if not (err_o <= _tolerance(dtype) and err_l <= _tolerance(dtype)):
        return f"disagrees with the einops path: max |Δout| {err_o:.3g}, max |Δlse| {err_l:.3g}"
    return None


def _choose(q, k, causal: bool, scale: float, backend: str):
    key = (str(q.device), q.dtype, q.shape[3], causal, q.shape[2] != k.shape[2], backend)
    if key not in _CHOICE:
        notes = []
        for name, expand in _candidates(q.device, q.dtype, key[4], backend):
            if name == "einops":
                _CHOICE[key] = (name, False)
                break
            why = _probe_forward(name, expand, q.device, q.dtype, q.shape[3], causal, q.shape[2], k.shape[2], scale)
            if why is None:
                _CHOICE[key] = (name, expand)
                break
            notes.append(f"{name}{' (K/V expanded)' if expand else ''}: {why}")
        chosen = _CHOICE[key]
        STATUS[f"forward {key}"] = (f"{chosen[0]}{' (K/V expanded)' if chosen[1] else ''}"
                                       + (f"; skipped {'; '.join(notes)}" if notes else ""))
    return key, _CHOICE[key]


def forward_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_attention` without autograd (the ring engine's own Function handles gradients)."""
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"a causal block must be diagonal (the same positions for queries and keys), got "
                         f"{q.shape[1]} query and {k.shape[1]} key rows")
    key, (name, expand) = _choose(q, k, causal, scale, backend)
    if name == "einops":
        return _einops_block(q, k, v, scale, causal)
    h = q.shape[2]
    try:
        return _sdpa_call(name, q, *((expand_kv(k, h), expand_kv(v, h)) if expand else (k, v)), scale, causal)
    except RuntimeError as exc:  # a shape the probe did not cover: demote this combination to the einops path
        if "out of memory" in str(exc).lower():
            raise
        STATUS[f"forward {key}"] = f"einops after {name} failed at shape {tuple(q.shape)}: {str(exc)[:200]}"
        _CHOICE[key] = ("einops", False)
        return _einops_block(q, k, v, scale, causal)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, backend):
        ctx.set_materialize_grads(False)
        out, lse = forward_block(q, k, v, scale=scale, causal=causal, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, causal, backend)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        refuse_double_backward(
            "ringbook.fast.kernels.block_attention (the block kernel of production_ring_attention's dilated path)",
            "a custom autograd Function calling the fused SDPA backward ops, or their einops twin",
            "For second derivatives use ringbook.dilated_attention or ringbook.ring_dilated_attention (einops, "
            "twice differentiable).")
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, backend = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        # a gradient of lse enters as delta = D − dlse (einops path)
        blk_delta = None if dlse is None else delta(dout, out, dlse)
        dq, dk, dv = block_attention_backward(q, k, v, out, lse, dout, scale=scale, causal=causal, delta=blk_delta,
                                              backend=backend)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query block to one key/value block with the fastest kernel available. Returns ``(out, lse)``.

    ``q`` is ``b i h d``, ``k``/``v`` are ``b j h_kv d`` (``h_kv`` divides
    ``h``). ``causal=True`` means a diagonal block (``i == j``, the same
    token positions), masked top-left. ``out`` comes back in the kernel's
    dtype (the input dtype from a CUDA kernel, the accumulator dtype from
    the einops path) and ``lse`` (``b h i``) in float32 (float64 for float64
    input). ``backend``: ``"auto"`` (cuDNN > flash > memory-efficient on
    CUDA, checked once and cached; einops elsewhere) or one of
    :data:`BACKENDS` to force it. Once differentiable (through
    :func:`block_attention_backward`), gradients of ``lse`` included;
    ``create_graph=True`` (double backward) raises a RuntimeError.
    """
    check_backend(backend)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _BlockAttention.apply(q, k, v, scale, causal, backend)
    return forward_block(q, k, v, scale=scale, causal=causal, backend=backend)


# --------------------------------------------------------------------------- backward of one block

def delta(dout: torch.Tensor, out: torch.Tensor, dlse: torch.Tensor | None = None) -> torch.Tensor:
    """``D − dlse`` (``b h i``, accumulator dtype): the FlashAttention backward's row term, written once.

    ``D = rowsum(dO ∘ O)``; a gradient of lse adds ``P ∘ dlse`` to dS, which
    is the same as subtracting it from D.
    """
    work = compute_dtype(out.dtype)
    d = einsum(dout.to(work), out.to(work), "b i h d, b i h d -> b h i")
    return d if dlse is None else d - dlse.to(work)


def _aux(name: str, device):
    """What backward op ``name`` wants besides the tensors, from one tiny forward of its kernel (cached).

    ``cum_seq_q``, ``cum_seq_k``, ``philox_seed``, ``philox_offset`` (dropout
    0: unused), and for cuDNN also the rank of the lse its forward returns.
    """
    if (name, device) not in _AUX:
        x = torch.randn(1, 1, 16, 64, device=device, dtype=torch.bfloat16)
        common = {"query": x, "key": x, "value": x, "dropout_p": 0.0, "is_causal": False, "scale": 0.125,
                  "return_debug_mask": False}
        if name == "flash":
            res = aten.call("_scaled_dot_product_flash_attention", **common)
            _AUX[name, device] = {"cum_seq_q": res["cum_seq_q"], "cum_seq_k": res["cum_seq_k"],
                                  "philox_seed": res["rng_state"], "philox_offset": res["unused"]}
        else:
            res = aten.call("_scaled_dot_product_cudnn_attention", **common, attn_bias=None, compute_log_sumexp=True)
            _AUX[name, device] = {"cum_seq_q": res["cum_seq_q"], "cum_seq_k": res["cum_seq_k"],
                                  "philox_seed": res["philox_seed"], "philox_offset": res["philox_offset"],
                                  "lse_rank": res["logsumexp"].dim()}
    return _AUX[name, device]


def _flash_backward(q, k, v, out, lse, dout, scale: float, causal: bool):
    aux = _aux("flash", q.device)
    qt, kt, vt, ot, dot = (x.transpose(1, 2) for x in (q, k, v, out, dout))
    res = aten.call("_scaled_dot_product_flash_attention_backward", grad_out=dot, query=qt, key=kt, value=vt, out=ot,
                    logsumexp=lse.float().contiguous(), cum_seq_q=aux["cum_seq_q"], cum_seq_k=aux["cum_seq_k"],
                    max_q=q.shape[1], max_k=k.shape[1], dropout_p=0.0, is_causal=causal,
                    philox_seed=aux["philox_seed"], philox_offset=aux["philox_offset"], scale=scale)
    return tuple(res[key].transpose(1, 2) for key in ("grad_query", "grad_key", "grad_value"))


def _cudnn_backward(q, k, v, out, lse, dout, scale: float, causal: bool):
    """The cuDNN backward op, fed the global out/lse as PyTorch's own context parallel does."""
    aux = _aux("cudnn", q.device)
    qt, kt, vt, ot, dot = (x.transpose(1, 2) for x in (q, k, v, out, dout))
    lse = lse.float().contiguous()  # cuDNN reads the stats densely (a strided lse gives wrong gradients)
    if aux["lse_rank"] == 4:
        lse = lse.unsqueeze(-1)
    res = aten.call("_scaled_dot_product_cudnn_attention_backward", grad_out=dot, query=qt, key=kt, value=vt, out=ot,
                    logsumexp=lse, philox_seed=aux["philox_seed"], philox_offset=aux["philox_offset"],
                    attn_bias=None, cum_seq_q=aux["cum_seq_q"], cum_seq_k=aux["cum_seq_k"], max_q=q.shape[1],
                    max_k=k.shape[1], dropout_p=0.0, is_causal=causal, scale=scale)
    return tuple(res[i].transpose(1, 2) for i in (0, 1, 2))


_BACKWARD_OPS = {"cudnn": _cudnn_backward, "flash": _flash_backward}


def _einops_backward(q, k, v, out, lse, dout, scale, causal, delta):
    h, hk = q.shape[2], k.shape[2]
    dq, dk, dv = attend_block_backward(q, expand_kv(k, h), expand_kv(v, h), out, lse, dout, scale=scale,
                                       causal=causal, delta=delta, chunk=KEY_CHUNK)
    return dq, reduce_kv(dk, hk), reduce_kv(dv, hk)


def _run_backward(name, expand, q, k, v, out, lse, dout, scale, causal):
    """One backward op; with ``expand`` K/V go in expanded to q's heads and their gradients are summed back."""
    h, hk = q.shape[2], k.shape[2]
    if not expand:
        return _BACKWARD_OPS[name](q, k, v, out, lse, dout, scale, causal)
    dq, dk, dv = _BACKWARD_OPS[name](q, expand_kv(k, h), expand_kv(v, h), out, lse, dout, scale, causal)
    return dq, reduce_kv(dk.float(), hk), reduce_kv(dv.float(), hk)


def _probe_backward(device, dtype, d, causal, h, hk, scale, backend):
    """The first (op, expand) whose gradients agree with the einops backward on a small problem; raise if none."""
    n_q, n_k = (128, 128) if causal else (128, 64)
    q, k, v, dout = _probe_inputs(device, dtype, [(2, n_q, h, d), (2, n_k, hk, d), (2, n_k, hk, d), (2, n_q, h, d)],
                                  seed=1)
    out, lse = _einops_block(q, k, v, scale, causal)
    out = out.to(dtype)
    ref = _einops_backward(q, k, v, out, lse, dout, scale, causal, None)
    names = [backend] if backend in _BACKWARD_OPS else list(_BACKWARD_OPS)
    problems = []
    for name in names:
        for expand in ((False, True) if h != hk else (False,)):
            label = f"{name} {'expanded' if expand else 'native'}"
            try:
                got = _run_backward(name, expand, q, k, v, out, lse, dout, scale, causal)
            except RuntimeError as exc:
                problems.append(f"{label}: {str(exc).strip().splitlines()[0][:200]}")
                continue
            errs = [((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-6)).item()
                    for g, r in zip(got, ref)]
            if all(tuple(g.shape) == tuple(r.shape) for g, r in zip(got, ref)) and max(errs) <= _tolerance(dtype):
                return (name, expand), problems
            problems.append(f"{label}: relative errors dq/dk/dv {[f'{e:.2g}' for e in errs]}")
    raise RuntimeError(
        f"no fused backward op ({', '.join(f'{n} backward' for n in names)}) agrees with ringbook's einops backward "
        f"for dtype {dtype}, head_dim {d}, causal={causal}, heads {h}/{hk} on {device} ({'; '.join(problems)}); "
        "refusing to return gradients that may be wrong. Pass backend='einops' to use the (slower, exact) einops "
        "backward.")


def block_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             dout: torch.Tensor, *, scale: float, causal: bool = False, delta: torch.Tensor | None = None,
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of one block, given the global ``out``/``lse`` of its query rows.

    The FlashAttention backward of :func:`~ringbook.online_softmax.attend_block_backward`
    (same arguments; ``k``/``v`` may have fewer heads, their gradients are
    summed over the query heads that share them). On CUDA in
    bfloat16/float16 with ``delta`` None it runs a fused backward op —
    cuDNN's (``_scaled_dot_product_cudnn_attention_backward``), else
    flash's (``_scaled_dot_product_flash_attention_backward``); ``backend``
    ``"cudnn"``/``"flash"`` forces one — checked once per combination
    against the einops path (no agreeing op raises rather than returning
    wrong gradients). With ``delta`` (a gradient of lse:
    ``delta = D − dlse``), in float32/float64, on the CPU or with
    ``backend="einops"`` it runs the einops path. Gradients come back in the
    kernel's dtype (the input dtype from a fused op) or the accumulator dtype.
    """
    check_backend(backend)
    fast = q.device.type == "cuda" and q.dtype in LOW_PRECISION and delta is None and backend != "einops"
    if not fast:
        return _einops_backward(q, k, v, out, lse, dout, scale, causal, delta)
    key = (str(q.device), q.dtype, q.shape[3], causal, q.shape[2] != k.shape[2], backend)
    if key not in _BACKWARD_OK:
        try:
            _BACKWARD_OK[key], skipped = _probe_backward(q.device, q.dtype, q.shape[3], causal, q.shape[2],
                                                         k.shape[2], scale, backend)
            name, expand = _BACKWARD_OK[key]
            STATUS[f"backward {key}"] = (f"{name} backward op{' (K/V expanded)' if expand else ''}"
                                            + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
        except RuntimeError as exc:
            _BACKWARD_OK[key] = str(exc)
            STATUS[f"backward {key}"] = str(exc)
    ok = _BACKWARD_OK[key]
    if isinstance(ok, str):
        raise RuntimeError(ok)
    return _run_backward(*ok, q, k, v, out, lse, dout, scale, causal)
