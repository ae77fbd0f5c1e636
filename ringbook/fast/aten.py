"""PyTorch's private attention ops, called by keyword through one checked wrapper.

The fused SDPA kernels that return the log-sum-exp of a block (what a ring
needs to merge blocks) are private aten ops whose signatures change between
PyTorch releases. :func:`call` names every argument and every result it
uses, so nothing is picked by position; the first call of an op checks its
schema against those names, and a mismatch raises a clear error naming the
torch version instead of passing a boolean into the wrong slot.
"""

from __future__ import annotations

import torch

# op -> (arguments ringbook passes, results ringbook reads: names, or indices for unnamed results)
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str | int, ...]]] = {
    "_scaled_dot_product_cudnn_attention": (
        ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "return_debug_mask",
         "scale"),
        ("output", "logsumexp", "cum_seq_q", "cum_seq_k", "philox_seed", "philox_offset")),
    "_scaled_dot_product_flash_attention": (
        ("query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale"),
        ("output", "logsumexp", "cum_seq_q", "cum_seq_k", "rng_state", "unused")),
    "_scaled_dot_product_efficient_attention": (
        ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "scale"),
        ("output", "log_sumexp")),
    "_scaled_dot_product_flash_attention_backward": (
        ("grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
         "dropout_p", "is_causal", "philox_seed", "philox_offset", "scale"),
        ("grad_query", "grad_key", "grad_value")),
    "_scaled_dot_product_cudnn_attention_backward": (
        ("grad_out", "query", "key", "value", "out", "logsumexp", "philox_seed", "philox_offset", "attn_bias",
         "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal", "scale"),
        (0, 1, 2)),
}
_CHECKED: dict[str, tuple[int, ...]] = {}  # op -> positions of the results read, once its schema is checked


class OpSignatureError(RuntimeError):
    """A private aten op whose signature is not the one ringbook was written for."""


def _result_positions(name: str) -> tuple[int, ...]:
    """Check ``name``'s schema against :data:`SIGNATURES` once; the positions of the results read."""
    if name in _CHECKED:
        return _CHECKED[name]
    wanted_args, wanted_results = SIGNATURES[name]
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        raise OpSignatureError(f"torch {torch.__version__} has no aten.{name}, which ringbook's fused kernels use; "
                               f"use backend='einops' or a torch version with it (2.3 or later)")
    schema = op.default._schema
    args = {a.name: a for a in schema.arguments}
    results = [r.name for r in schema.returns]
    problems = [f"no argument {a!r}" for a in wanted_args if a not in args]
    problems += [f"argument {a.name!r} is required but ringbook does not pass it" for a in schema.arguments
                 if a.name not in wanted_args and not a.has_default_value() and a.type.kind() != "OptionalType"]
    positions = []
    for r in wanted_results:
        if isinstance(r, int):
            if r >= len(results):
                problems.append(f"no result {r}")
            positions.append(r)
        elif r not in results:
            problems.append(f"no result {r!r}")
        else:
            positions.append(results.index(r))
    if problems:
        raise OpSignatureError(f"torch {torch.__version__} changed aten.{name}: {'; '.join(problems)} (its schema: "
                               f"{schema}); use backend='einops' on this torch, or a version ringbook knows")
    _CHECKED[name] = tuple(positions)
    return _CHECKED[name]


def call(name: str, **kwargs) -> dict:
    """Call ``torch.ops.aten.<name>`` with keyword arguments; its results by name (or index), as a dict.

    Every keyword must be one of the op's arguments ringbook knows
    (:data:`SIGNATURES`); the schema is checked at the first call.
    """
    positions = _result_positions(name)
    wanted_args, wanted_results = SIGNATURES[name]
    unknown = set(kwargs) - set(wanted_args)
    if unknown:
        raise TypeError(f"aten.{name}: ringbook passes only {wanted_args}, got {sorted(unknown)}")
    res = getattr(torch.ops.aten, name)(**kwargs)
    res = res if isinstance(res, (tuple, list)) else (res,)
    return {key: res[pos] for key, pos in zip(wanted_results, positions)}
