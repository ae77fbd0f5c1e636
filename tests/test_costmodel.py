"""ringbook.costmodel: it reads the schedules, its simulator is consistent, and it predicts the committed runs."""

import dataclasses
import math
from pathlib import Path

import pytest

from ringbook.bench.results import load_rows
from ringbook.costmodel import (
    KERNELS,
    Phase,
    Transfer,
    Workload,
    compare,
    fit_rows,
    overlap_threshold,
    predict,
    preset,
    simulate,
)
from ringbook.costmodel.check import anchors, measured_cases
from ringbook.strategies import bytes_sent, strategy_schedule

FIGURES = Path(__file__).resolve().parents[1] / "figures"
H100 = preset("h100-nvlink")


@pytest.mark.parametrize("strategy,layout,u", [("ring", "zigzag", None), ("allgather", "contiguous", None),
                                               ("ulysses", "contiguous", None), ("usp", "zigzag", 2)])
@pytest.mark.parametrize("backward", [False, True])
def test_bytes_are_the_schedules(strategy, layout, u, backward):
    work = Workload(4, 4096, 8, 2, 64, 2, True, backward)
    p = predict(strategy, work, H100, layout=layout, ulysses_size=u)
    sched = strategy_schedule(strategy, 4096, 4, heads=8, kv_heads=2, head_dim=64, dtype_bytes=2, causal=True,
                              layout=layout, ulysses_size=u, backward=backward)
    assert p.bytes_per_device == max(bytes_sent(sched, 4))
    # the seconds on the wire are those bytes over the link (plus one latency per message)
    link = H100.intra
    for cs, st in zip(sched, p.steps):
        mine = sum(m.nbytes for m in cs.messages if m.src == 0)
        msgs = len({(m.dst, m.what in ("out", "lse", "dq", "dK/dV")) for m in cs.messages if m.src == 0})
        assert st.comm == pytest.approx(mine / link.bandwidth + msgs * link.latency, rel=1e-9)


def test_timeline_is_consistent():
    work = Workload(8, 1 << 16, 16, 4, 128, 2, True, True)
    for p in compare(work, preset("h100-tcp", gpus_per_node=2)):
        if not p.ok:
            continue
        tl = p.timeline
        assert tl.total == pytest.approx(max(i.end for i in tl.intervals))
        for dev in range(tl.devices):
            for stream in ("compute", "comm"):
                ivs = tl.of(dev, stream)
                assert all(a.end <= b.start + 1e-15 for a, b in zip(ivs, ivs[1:])), (p.label, dev, stream)
                assert all(i.end > i.start for i in ivs)


def test_simulator_by_hand():
    # two devices, a ring of two steps: step time = max(compute, transfer)
    steps = [Phase("a", (2.0, 2.0), (Transfer(0, 1, 3.0), Transfer(1, 0, 3.0))), Phase("b", (2.0, 2.0), ())]
    assert simulate(steps, 2).total == pytest.approx(5.0)
    steps = [Phase("a", (2.0, 2.0), (Transfer(0, 1, 1.0), Transfer(1, 0, 1.0))), Phase("b", (2.0, 2.0), ())]
    assert simulate(steps, 2).total == pytest.approx(4.0)
    # a collective waits for the last device
    steps = [Phase("a", (1.0, 4.0), ()), Phase("g", (0.0, 0.0), (Transfer(0, 1, 1.0), Transfer(1, 0, 1.0)), True)]
    assert simulate(steps, 2).total == pytest.approx(5.0)
    with pytest.raises(ValueError, match="devices"):
        simulate(steps, 0)


def test_overlap_threshold_by_hand():
    # c ≥ g·e·F/(2·h·B): h = g, bf16, F = 400 TF/s, B = 50 GB/s → c ≥ 8000
    assert overlap_threshold(400e12, 50e9, heads=8, kv_heads=8) == pytest.approx(8000)
    assert overlap_threshold(400e12, 50e9, heads=32, kv_heads=8) == pytest.approx(2000)
    assert overlap_threshold(400e12, 50e9, heads=8, kv_heads=8, causal=True) == pytest.approx(16000)
    # backward: K/V (bf16) and dK/dV (fp32) against 2.5× the work
    assert overlap_threshold(400e12, 50e9, heads=8, kv_heads=8, backward=True) == pytest.approx(2 * 6 * 8000 / 10)
    # the simulator agrees: a kernel with no per-call cost, a link with no latency
    kern = dataclasses.replace(KERNELS["h100-cudnn"], t0_full=0.0, peak_full=400e12)
    link = dataclasses.replace(H100.inter, bandwidth=50e9, latency=0.0)
    m = dataclasses.replace(H100, kernel=kern, intra=link, inter=link)
    for c, hides in ((16000, True), (4000, False)):
        p = predict("ring", Workload(4, 4 * c, 8, 8, 64, 2, False), m)
        assert all(s.hides for s in p.steps) is hides


def test_constraints_and_bad_input():
    p = predict("ulysses", Workload(16, 1 << 16, 8, 8), H100)
    assert not p.ok and "heads" in p.ruled_out and math.isinf(p.total)
    p = predict("allgather", Workload(2, 1 << 22, 64, 64, 128), H100)
    assert not p.ok and "GB per device" in p.ruled_out
    with pytest.raises(ValueError, match="kv_heads"):
        Workload(4, 1024, 8, 3)
    with pytest.raises(TypeError, match="devices"):
        Workload(4.0, 1024, 8, 8)
    with pytest.raises(NotImplementedError, match="documents"):
        Workload(4, 1024, 8, 8, documents=(512, 512))
    with pytest.raises(ValueError, match="name"):
        preset("h100")
    with pytest.raises(TypeError, match="machine"):
        predict("ring", Workload(4, 1024, 8, 8), "h100")


def test_presets_are_fits_of_committed_rows():
    rows = load_rows(FIGURES / "bench-nvidia-h100-80gb-hbm3-bfloat16.json")
    fb = load_rows(FIGURES / "bench-nvidia-h100-80gb-hbm3-bfloat16-fwd-bwd.json")
    for impl, key in (("sdpa_cudnn", "h100-cudnn"), ("sdpa_flash", "h100-flash"), ("ring", "h100-einops")):
        got, want = fit_rows(rows, impl, name="", source="", backward_rows=fb), KERNELS[key]
        for field in ("peak_full", "t0_full", "peak_causal", "t0_causal"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=0.01), (key, field)


def test_predicts_every_committed_run():
    cases = measured_cases(FIGURES)
    multi = [c for c in cases if c.source.startswith("dist-bench")]
    assert len(multi) >= 14 and len([c for c in cases if c.held]) >= 40
    report = "\n".join(f"{c.source} {c.what} n={c.seq_len} causal={c.causal} bwd={c.backward}: "
                       f"measured {c.measured_ms:.2f} ms, predicted {c.predicted_ms:.2f} ms ({c.error:+.1%})"
                       for c in cases if c.held)
    print(report)
    bad = [c for c in cases if c.held and abs(c.error) > 0.25]
    assert not bad, report


def test_anchors_are_reported():
    rows = anchors()
    assert len(rows) == 4 and all(a.predicted and a.why and a.assumed for a in rows)
