"""Solutions to notebook 01's exercises (checked by ringbook.exercises; the teacher build fills them in)."""

import torch


def lse_from_m_l(m, l):
    """lse = m + log l; a fully masked row (l = 0) has lse -inf."""
    return torch.where(l > 0, m + torch.log(torch.where(l > 0, l, 1.0)), float("-inf"))


def my_merge(out_a, lse_a, out_b, lse_b):
    """Equation (M): weights e^{lse_a − lse}, e^{lse_b − lse}, with empty sides (lse -inf) weighing 0."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), 0.0, lse)  # both sides empty: no -inf − (-inf)
    w_a, w_b = torch.exp(lse_a - safe), torch.exp(lse_b - safe)
    return w_a[:, None] * out_a + w_b[:, None] * out_b, lse


def online_step(m, l, acc, s, v):
    """Fold one key block: new max, rescale the old sum and output, add the block's terms."""
    m_new = torch.maximum(m, s.amax(dim=1))
    m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)  # a row that has seen only -inf so far
    scale = torch.exp(m - m_safe)
    p = torch.exp(s - m_safe[:, None])
    return m_new, l * scale + p.sum(dim=1), acc * scale[:, None] + p @ v
