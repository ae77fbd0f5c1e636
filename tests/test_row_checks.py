"""A benchmark row is ``ok`` only if every number it stands on was checked (injected implementations).

Each test hands :func:`ringbook.bench.run_row` (or the sweep) an implementation
that is right except in one place the reference comparison does not sample:
a row outside the compared set, the lse, a timed call after the checked one,
a gradient; or one that is too slow to run at all. The row must say so.
"""

from __future__ import annotations

import time

import pytest
import torch

from ringbook import bench
from ringbook.bench import measure, sweep

CPU = torch.device("cpu")
SMALL = dict(ring_size=1, dtype=torch.float32, batch=1, heads=2, head_dim=8, device=CPU, warmup=1, repeats=3)
NAIVE = bench.IMPLS["naive"].fn


class EightRows(measure.Reference):
    """Dense attention compared on 8 evenly spaced rows only: rows 1…8 of 64 are never compared."""

    max_rows = 8


def _fake(fn, **kw):
    return bench.Impl("injected", fn, "test double", **kw)


def _poke(x, index, value):
    x = x.clone()
    x[index] = value
    return x


def _row(fn, n=64, **kw):
    reference = kw.pop("reference", EightRows())
    return bench.run_row(_fake(fn, reference=reference), seq_len=n, causal=kw.pop("causal", True), **{**SMALL, **kw})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_entry_in_a_row_the_reference_does_not_compare_is_an_error(bad):
    """Before: NaN or +inf at query row 1 of a 16K output passed, 5,086 of 16,384 rows being compared."""
    ok = _row(lambda q, k, v, **_: NAIVE(q, k, v, causal=True, ring_size=1))
    assert ok["status"] == "ok" and ok["checked_rows"] == 8, ok["error"]
    row = _row(lambda q, k, v, **_: (_poke(NAIVE(q, k, v, causal=True, ring_size=1)[0], (0, 1, 0, 0), bad), None))
    assert row["status"] == "error" and row["error"].startswith("wrong result: output is")
    assert "(first at index (0, 1, 0, 0))" in row["error"] and "first call" in row["error"]


def test_a_bad_entry_outside_the_dilated_128_rows_is_an_error():
    """The dilated implementations compare 128 rows at any length: a NaN at row 1 of 256 was ok."""
    impl = bench.IMPLS["dilated_sdpa"]

    def fn(q, k, v, **kw):
        out, lse = impl.fn(q, k, v, **kw)
        return _poke(out, (0, 1, 0, 0), float("nan")), lse

    row = bench.run_row(_fake(fn, reference=impl.reference, flops=impl.flops), seq_len=256, causal=False,
                        **{**SMALL, "heads": 8})
    assert row["status"] == "error" and "output is NaN at 1 of" in row["error"], row["error"]


@pytest.mark.parametrize("poke, message", [
    (lambda lse: torch.full_like(lse, float("nan")), "lse is NaN"),
    (lambda lse: _poke(lse, (0, 1, 5), float("inf")), "lse is +inf"),
    (lambda lse: lse + 1.0, "lse_max_rel_err"),  # finite but wrong: compared with the reference's
])
def test_the_lse_is_checked(poke, message):
    """Before: the right output with an all-NaN lse was ok."""
    def fn(q, k, v, **_):
        out, lse = NAIVE(q, k, v, causal=True, ring_size=1)
        return out, poke(lse)

    row = _row(fn)
    assert row["status"] == "error" and message in row["error"], row["error"]


def test_the_lse_is_minus_inf_exactly_where_a_row_sees_no_key():
    impl = bench.IMPLS["dilated_sdpa"]
    no_key = impl.reference.no_key(256, 8, causal=False)
    assert no_key.any() and not no_key.all()
    h, i = (int(x) for x in no_key.nonzero()[0])

    def fn(q, k, v, **kw):
        out, lse = impl.fn(q, k, v, **kw)
        return out, _poke(lse, (0, h, i), 0.0)

    kw = dict(seq_len=256, causal=False, **{**SMALL, "heads": 8})
    assert bench.run_row(impl, **kw)["status"] == "ok"
    row = bench.run_row(_fake(fn, reference=impl.reference, flops=impl.flops), **kw)
    assert row["status"] == "error" and "lse is not -inf" in row["error"] and "sees no key" in row["error"]


@pytest.mark.parametrize("what", ["out", "lse"])
def test_the_last_timed_call_is_checked_too(what):
    """Before: right on its first call, NaN on every timed call, and ok with the NaN calls' timings."""
    calls = []

    def fn(q, k, v, **_):
        calls.append(1)
        out, lse = NAIVE(q, k, v, causal=True, ring_size=1)
        if len(calls) > 1:
            out, lse = (_poke(out, (0, 1, 0, 0), float("nan")), lse) if what == "out" else (out, lse * float("nan"))
        return out, lse

    row = _row(fn)
    assert row["status"] == "error" and "in the last timed call" in row["error"], row["error"]
    assert len(calls) == 1 + SMALL["warmup"] - 1 + SMALL["repeats"]  # the checks ran no call of their own


class NoRoom(measure.Reference):
    def grads_bytes(self, batch, heads, seq_len):
        return float("inf")


def _grad_fault(kind):
    class Fault(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return _poke(g, (0, 1, 0, 0), float("nan")) if kind == "nan" else 2 * g

    def fn(q, k, v, **_):
        return NAIVE(Fault.apply(q), k, v, causal=True, ring_size=1)

    return fn


def test_backward_rows_check_and_compare_the_gradients():
    good = _row(lambda q, k, v, **_: NAIVE(q, k, v, causal=True, ring_size=1), backward=True, reference=None)
    assert good["status"] == "ok", good["error"]
    assert good["grad_max_rel_err"] < 1e-5 and good["grad_checked_rows"] == 64
    assert "dq, dk, dv against float64 on all 64 rows" in good["check"]
    nan = _row(_grad_fault("nan"), backward=True)
    assert nan["status"] == "error" and "dq is NaN" in nan["error"], nan["error"]  # before: ok
    wrong = _row(_grad_fault("twice"), backward=True)
    assert wrong["status"] == "error" and "grad_max_rel_err" in wrong["error"], wrong["error"]
    unchecked = _row(lambda q, k, v, **_: NAIVE(q, k, v, causal=True, ring_size=1), backward=True,
                     reference=NoRoom())
    assert unchecked["status"] == "ok" and unchecked["grad_checked_rows"] == 0
    assert unchecked["grad_max_rel_err"] is None and "not compared" in unchecked["check"]
    nan_unchecked = _row(_grad_fault("nan"), backward=True, reference=NoRoom())
    assert nan_unchecked["status"] == "error" and "dq is NaN" in nan_unchecked["error"]  # finite: checked anyway


def test_the_first_row_of_a_series_is_bounded_by_a_calibration_call(monkeypatch):
    """Before: ``--seq-lens 1M`` ran for minutes with no row, only later rows being predicted."""
    seen = []

    def slow(q, k, v, **_):
        n = q.shape[1]
        seen.append(n)
        time.sleep(2e-7 * n * n)  # 0.05 s at 512 tokens: 0.2 s predicted at 1,024
        return NAIVE(q, k, v, causal=False, ring_size=1)

    monkeypatch.setattr(sweep, "CALIBRATION_FLOPS", 1e7)  # 4·1024²·8 = 3.4e7 FLOPs: calibrated at 512 tokens
    monkeypatch.setitem(bench.IMPLS, "slow", _fake(slow))
    config = bench.SweepConfig(impls=["slow"], seq_lens=[1024], causal=[False], heads=1, head_dim=8,
                               max_row_seconds=0.1)
    spec = {"seq_len": 1024, "causal": False, "ring_size": 1}
    assert sweep.calibration_length(bench.IMPLS["slow"], config, spec) == 512
    assert sweep.calibration_length(bench.IMPLS["slow"], config, {**spec, "seq_len": 512}) is None  # small already
    (row,) = bench.run_sweep(config, progress=False)
    assert row["status"] == "skipped" and set(seen) == {512}, (row, seen)
    assert "(> max_row_seconds=0.1)" in row["error"] and "at seq_len 512 (a calibration call" in row["error"]
    config.max_row_seconds = 2.0
    (row,) = bench.run_sweep(config, progress=False)
    assert row["status"] == "ok" and 1024 in seen


def test_a_launch_bound_calibration_call_is_lengthened_before_it_bounds_the_row(monkeypatch):
    """Before: an 8-rank ring's 3.6 ms call at 256 tokens, scaled by the work, skipped its 36 ms row at 16K."""
    seen = []

    def launch_bound(q, k, v, **_):
        seen.append(q.shape[1])
        time.sleep(0.03)  # the same at every length: 0.03 s × (1024/128)² = 1.9 s predicted from 128 tokens
        return NAIVE(q, k, v, causal=False, ring_size=1)

    monkeypatch.setattr(sweep, "CALIBRATION_FLOPS", 6e5)  # 4·128²·8 = 5.2e5: calibrated at 128 tokens
    monkeypatch.setitem(bench.IMPLS, "launch_bound", _fake(launch_bound))
    config = bench.SweepConfig(impls=["launch_bound"], seq_lens=[1024], causal=[False], heads=1, head_dim=8,
                               max_row_seconds=1.0, warmup=0, repeats=1)
    (row,) = bench.run_sweep(config, progress=False)
    assert row["status"] == "ok" and set(seen) == {128, 512, 1024}, (row, seen)  # 512: 0.48 s predicted


def test_a_wrong_calibration_call_leaves_the_first_row_unbounded_and_not_run(monkeypatch):
    def nan(q, k, v, **_):
        assert q.shape[1] < 1024, "the long call was run"
        return torch.full_like(q, float("nan")), None

    monkeypatch.setattr(sweep, "CALIBRATION_FLOPS", 1e7)
    monkeypatch.setitem(bench.IMPLS, "nan", _fake(nan))
    config = bench.SweepConfig(impls=["nan"], seq_lens=[1024], causal=[False], heads=1, head_dim=8)
    (row,) = bench.run_sweep(config, progress=False)
    assert row["status"] == "skipped" and "cannot be bounded" in row["error"] and "output is NaN" in row["error"]


def test_cpu_peak_memory_does_not_under_report_after_a_larger_row():
    """Before: a causal naive row at n=256 after a larger one reported 1.6 MB, below its own 2 MB scores."""
    if measure._TRIM is None:
        assert "lower bound" in bench.environment(CPU)["peak_mem_kind"]  # said so in every row
        return
    kw = {**SMALL, "heads": 8, "head_dim": 16}
    big = bench.run_row(bench.IMPLS["naive"], seq_len=1024, causal=True, **kw)
    small = bench.run_row(bench.IMPLS["naive"], seq_len=256, causal=True, **kw)
    assert big["status"] == small["status"] == "ok"
    assert small["peak_mem_gb"] >= 8 * 256 * 256 * 4 / 1e9  # the float32 score matrix, at least
