"""Solutions to notebook 07's exercises (checked by ringbook.exercises)."""

import torch


def document_block(q_range, k_range, document_ids, causal):
    """'full', 'partial' or 'empty': a block of contiguous query and key ranges under the document mask."""
    (q0, q1), (k0, k1) = (q_range[0], q_range[1] - 1), (k_range[0], k_range[1] - 1)  # first and last token
    dq0, dq1, dk0, dk1 = (int(document_ids[i]) for i in (q0, q1, k0, k1))
    if dk0 > dq1 or dq0 > dk1 or (causal and k0 > q1):  # no document in common, or every key after every query
        return "empty"
    one_document = dq0 == dq1 == dk0 == dk1
    if one_document and not (causal and k1 > q0):  # one document, and (causal) every key at or before every query
        return "full"
    return "partial"


def window_hops(n, world, window):
    """The hops a causal window needs: the first query of a shard reaches window − 1 tokens back."""
    c = n // world
    return min(world - 1, -(-(window - 1) // c))  # ⌈(W − 1)/c⌉, at most the w − 1 other shards


def layout_imbalance(positions, document_ids, causal):
    """Busiest / mean of the scores each rank needs under the document mask."""
    n = document_ids.numel()
    i, j = positions[:, :, None], torch.arange(n)[None, None, :]  # (w, c, 1) queries against (1, 1, n) keys
    seen = document_ids[i] == document_ids[j]
    if causal:
        seen &= j <= i
    work = seen.sum(dim=(1, 2)).double()
    return (work.max() / work.mean()).item()
