"""Non-finite input: refused while ``ringbook.check_finite`` is on; otherwise it reaches every row that sees it.

The contract (``ringbook.check_finite``'s docstring): with the check on, every
implementation raises a ValueError naming the tensor, the first offending
index and NaN/+inf/-inf; with it off, a NaN reaches at least every output row
that sees it — which *other* rows it reaches is implementation-defined and
not tested here.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from helpers import make_qkv

import ringbook
from ringbook import _utils

DILATED = dict(segment_lengths=[4, 8], dilation_rates=[1, 2])
DENSE = {
    "naive": ringbook.naive_attention,
    "blockwise": functools.partial(ringbook.blockwise_attention, block_size=3),
    **{f"ring_{layout}_w{w}": functools.partial(ringbook.ring_attention, ring_size=w, layout=layout)
       for layout in ringbook.LAYOUTS for w in (1, 2, 4)},
    "production_contiguous": functools.partial(ringbook.production_ring_attention, ring_size=4, layout="contiguous"),
    "production_zigzag": functools.partial(ringbook.production_ring_attention, ring_size=4, layout="zigzag"),
}
DILATED_IMPLS = {
    "dilated": functools.partial(ringbook.dilated_attention, **DILATED),
    "dilated_dense": functools.partial(ringbook.dilated_attention_dense, **DILATED),
    "ring_dilated": functools.partial(ringbook.ring_dilated_attention, **DILATED, ring_size=4),
    "production_dilated": functools.partial(ringbook.production_ring_attention, **DILATED, ring_size=4),
}
EVERY = {**DENSE, **DILATED_IMPLS}
B, N, H, D = 2, 16, 2, 3


@pytest.fixture(autouse=True)
def _restore_switch():
    """No test leaves the process-wide switch changed."""
    before = _utils._CHECK_FINITE
    yield
    _utils._CHECK_FINITE = before


def _with(x, index, value):
    x = x.clone()
    x[index] = value
    return x


# --------------------------------------------------------------------------- the switch


def test_off_by_default_and_exported():
    assert "check_finite" in ringbook.__all__ and ringbook.check_finite is _utils.check_finite
    assert _utils.finite_check_enabled() is False  # the test run does not set RINGBOOK_CHECK_FINITE


def test_plain_call_turns_it_on_and_off():
    ringbook.check_finite()
    assert _utils.finite_check_enabled()
    ringbook.check_finite(False)
    assert not _utils.finite_check_enabled()
    ringbook.check_finite(True)
    assert _utils.finite_check_enabled()


def test_context_manager_restores_the_previous_state_even_on_error():
    with ringbook.check_finite():
        assert _utils.finite_check_enabled()
        with ringbook.check_finite(False):
            assert not _utils.finite_check_enabled()
        assert _utils.finite_check_enabled()
    assert not _utils.finite_check_enabled()
    ringbook.check_finite(True)
    with pytest.raises(KeyError):
        with ringbook.check_finite(False):
            raise KeyError("inside")
    assert _utils.finite_check_enabled()


@pytest.mark.parametrize("mode", [1, "yes", None])
def test_mode_must_be_bool(mode):
    with pytest.raises(TypeError, match=r"^mode must be True or False"):
        ringbook.check_finite(mode)
    assert not _utils.finite_check_enabled()


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), (" ON ", True), ("0", False), ("", False),
                                      ("off", False)])
def test_environment_variable(monkeypatch, value, on):
    monkeypatch.setenv("RINGBOOK_CHECK_FINITE", value)
    assert _utils._finite_from_environment() is on


def test_environment_variable_bad_value(monkeypatch):
    monkeypatch.setenv("RINGBOOK_CHECK_FINITE", "sometimes")
    with pytest.raises(ValueError, match=r"^RINGBOOK_CHECK_FINITE must be 1 \(check\) or 0 \(do not\), got 'sometimes'"):
        _utils._finite_from_environment()


def test_environment_variable_read_at_import():
    """The module sets its switch from the environment once, at import."""
    import inspect

    assert "_CHECK_FINITE = _finite_from_environment()" in inspect.getsource(_utils)


# --------------------------------------------------------------------------- check on: refused everywhere

BAD = {"NaN": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("name", list(EVERY))
def test_check_on_refuses_non_finite_input_everywhere(name):
    """NaN, +inf and -inf in each of q, k, v: named, first index, kind; nothing computed."""
    clean = make_qkv(B, N, H, D, seed=1)
    for which in range(3):
        for kind, value in BAD.items():
            args = list(clean)
            args[which] = _with(_with(args[which], (1, 5, 1, 2), value), (1, 9, 0, 0), float("nan"))
            with ringbook.check_finite():
                with pytest.raises(ValueError, match=rf"^{'qkv'[which]} has {re.escape(kind)} at index \(1, 5, 1, 2\) "
                                                     rf"\(shape \({B}, {N}, {H}, {D}\); 2 non-finite values in all\); "
                                                     "non-finite input is refused while ringbook.check_finite is on$"):
                    EVERY[name](*args, causal=True)
    EVERY[name](*args, causal=True)  # off again: no check


def test_check_on_accepts_finite_input_unchanged():
    q, k, v = make_qkv(B, N, H, D, seed=2)
    want = ringbook.naive_attention(q, k, v, causal=True)
    with ringbook.check_finite():
        got = ringbook.naive_attention(q, k, v, causal=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --------------------------------------------------------------------------- check off: rows that see it


def _sees(name, j):
    """``(n, h)`` bool: whether query i, head h sees key j (causal)."""
    i = torch.arange(N)
    if name in DILATED_IMPLS:
        c = ringbook.dilated_weights(N, H, **DILATED, causal=True)  # h i j
        return c[:, :, j].T > 0
    return (i >= j)[:, None].expand(N, H)


@pytest.mark.parametrize("which", [1, 2])
@pytest.mark.parametrize("name", list(EVERY))
def test_check_off_nan_key_reaches_every_row_that_sees_it(name, which):
    """Causal, a NaN in k or v at key j: every (row, head) that sees j is NaN (k: out and lse; v: its NaN feature).

    Other rows may be NaN too: implementation-defined (naive: every row, blockwise: from j's block on, ...)."""
    for j in (0, 6, 13):
        args = list(make_qkv(B, N, H, D, seed=3))
        args[which] = _with(args[which], (0, j, slice(None), 1), float("nan"))
        out, lse = EVERY[name](*args, causal=True)
        sees = _sees(name, j)
        assert sees.any()
        if which == 1:  # every score with key j is NaN: the whole row (out NaN, lse non-finite: NaN here)
            assert torch.isnan(out[0][sees]).all() and torch.isnan(lse[0].T[sees]).all(), j
        else:  # v's feature 1 is NaN: that feature of the row (features do not mix)
            assert torch.isnan(out[0][sees][:, 1]).all(), j
        assert not torch.isnan(out[1]).any() and not torch.isnan(lse[1]).any()  # the other batch element: untouched


@pytest.mark.parametrize("name", list(EVERY))
def test_check_off_nan_query_reaches_its_row(name):
    q, k, v = make_qkv(B, N, H, D, seed=4)
    for i in (0, 7, 15):
        out, lse = EVERY[name](_with(q, (0, i, 0, 2), float("nan")), k, v, causal=True)
        # every row sees a key (dilated: the pair (4, 1) keeps every position), so row i, head 0 is NaN
        assert torch.isnan(out[0, i, 0]).all() and torch.isnan(lse[0, 0, i]), i
        assert not torch.isnan(out[1]).any()


@pytest.mark.parametrize("name", list(EVERY))
def test_check_off_inf_value_reaches_every_row_that_sees_it(name):
    q, k, v = make_qkv(B, N, H, D, seed=5)
    j = 6
    out, _ = EVERY[name](q, k, _with(v, (0, j, slice(None), 0), float("inf")), causal=True)
    sees = _sees(name, j)
    assert (~torch.isfinite(out[0][sees][:, 0])).all()
