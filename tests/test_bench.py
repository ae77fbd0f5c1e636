"""The benchmark harness: rows, statuses, the sweep's failure handling, the CLI and report."""

import json
import subprocess
import sys
import time

import pytest
import torch

from ringbook import bench
from ringbook._utils import attention_flops
from ringbook.bench import published, report, results
from ringbook.viz import results as viz_results

REQUIRED = {"device", "torch_version", "impl", "seq_len", "ring_size", "causal", "dtype", "batch", "heads",
            "head_dim", "time_ms", "tflops", "tokens_per_s", "peak_mem_gb", "max_rel_err", "status"}
CPU = torch.device("cpu")
SMALL = dict(ring_size=1, dtype=torch.float32, batch=1, heads=2, head_dim=16, device=CPU, warmup=1, repeats=3)


def test_flops_count():
    assert attention_flops(1, 8, 1024, 1024, 64) == 4 * 8 * 1024 * 1024 * 64
    assert attention_flops(2, 8, 1024, 512, 64, causal=True) == 2 * 2 * 8 * 1024 * 512 * 64


@pytest.mark.parametrize("name", ["naive", "blockwise", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_row_ok_and_consistent(name, causal):
    row = bench.run_row(bench.IMPLS[name], seq_len=96, causal=causal, **SMALL)
    assert REQUIRED <= row.keys()
    assert row["status"] == "ok", row["error"]
    assert row["max_rel_err"] < 1e-5
    assert row["checked_rows"] == 96
    assert row["time_ms"] > 0 and len(row["times_ms"]) >= 3
    assert row["time_ms"] == pytest.approx(sorted(row["times_ms"])[len(row["times_ms"]) // 2]) or len(row["times_ms"]) % 2 == 0
    assert row["tflops"] == pytest.approx(attention_flops(1, 2, 96, 96, 16, causal) / (row["time_ms"] * 1e-3) / 1e12)
    assert row["tokens_per_s"] == pytest.approx(96 / (row["time_ms"] * 1e-3))
    assert row["dtype"] == "float32" and row["device_type"] == "cpu"


def _fake(name, fn, **kw):
    return bench.Impl(name, fn, "test double", **kw)


def test_wrong_answer_is_an_error_row():
    impl = _fake("zeros", lambda q, k, v, **_: (torch.zeros_like(q), None))
    row = bench.run_row(impl, seq_len=64, causal=False, **SMALL)
    assert row["status"] == "error"
    assert "wrong result" in row["error"]
    assert row["max_rel_err"] == pytest.approx(1.0)


def test_reference_check_catches_one_bad_row():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 300, 2, 8, generator=g) for _ in range(3))
    from ringbook import naive_attention

    out, _ = naive_attention(q, k, v, causal=True)
    err, rows = bench.check_against_reference(q, k, v, out, causal=True, budget_bytes=1)
    assert rows == 8 and err < 1e-6  # a small budget checks few rows
    out[:, -1] += 1.0  # the last row is always among the checked ones
    err, _ = bench.check_against_reference(q, k, v, out, causal=True, budget_bytes=1)
    assert err > 0.1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_output_is_never_ok(bad):
    """The issue's reproducer: Python's max(err, nan) kept err, so a NaN output checked as 0.0."""
    q = k = v = torch.randn(1, 64, 2, 8)
    out = torch.full_like(q, bad)
    with pytest.raises(bench.WrongResult, match="NaN" if bad != bad else "inf"):
        bench.check_against_reference(q, k, v, out, causal=False)
    one = torch.zeros_like(q)
    one[0, 63, 1, 7] = bad  # a single entry, in the last head: found too
    with pytest.raises(bench.WrongResult, match=r"1 of .* \(first at index \(0, 63, 1, 7\)\)"):
        bench.check_against_reference(q, k, v, one, causal=True)
    row = bench.run_row(_fake("bad", lambda q, k, v, **_: (torch.full_like(q, bad), None)), seq_len=64,
                        causal=False, **SMALL)
    assert row["status"] == "error" and row["error"].startswith("wrong result: output is")
    assert row["max_rel_err"] is None and "traceback" not in row


def test_dilated_check_refuses_non_finite_output():
    q = k = v = torch.randn(1, 256, 8, 8)
    out, _ = bench.IMPLS["ring_dilated"].fn(q, k, v, causal=False, ring_size=1)
    err, _ = bench.registry._ring_dilated_check(q, k, v, out, causal=False)
    assert err < 1e-5
    out[0, 0, 0, 0] = float("nan")
    with pytest.raises(bench.WrongResult, match="NaN"):
        bench.registry._ring_dilated_check(q, k, v, out, causal=False)


def test_a_reference_that_is_not_finite_cannot_be_compared():
    with pytest.raises(bench.WrongResult, match="reference is not finite"):
        bench.compare(torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0]))
    assert bench.compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])) == (0.5, 2.5)


@pytest.mark.parametrize("field, value", [("time_ms", float("nan")), ("tflops", float("inf")),
                                          ("tokens_per_s", None), ("max_rel_err", float("nan")),
                                          ("peak_mem_gb", float("nan"))])
def test_verdict_only_ok_when_every_number_is_finite(field, value):
    good = {"time_ms": 1.0, "tflops": 2.0, "tokens_per_s": 3.0, "max_rel_err": 1e-7, "peak_mem_gb": 0.5,
            "dtype": "float32", "status": "error", "error": None}
    assert bench.verdict(dict(good), torch.float32)["status"] == "ok"
    row = bench.verdict({**good, field: value}, torch.float32)
    assert row["status"] == "error" and field in row["error"] and "not finite" in row["error"]


def test_cpu_peak_memory_is_per_row_not_the_process_high_water_mark():
    """A large row first, then a small one: the small row's figure must not carry the large one's peak."""
    big = bench.run_row(bench.IMPLS["naive"], seq_len=1024, causal=False, **{**SMALL, "heads": 8})
    small = bench.run_row(bench.IMPLS["naive"], seq_len=32, causal=False, **SMALL)
    assert big["status"] == small["status"] == "ok"
    assert "per" in bench.environment(CPU)["peak_mem_kind"] or "during one call" in bench.environment(CPU)["peak_mem_kind"]
    # naive at 1024 tokens, 8 heads materialises 8·1024² float32 scores (32 MB) at least once
    assert big["peak_mem_gb"] > 0.02
    assert small["peak_mem_gb"] < 0.5 * big["peak_mem_gb"]


def test_exceptions_become_rows():
    def boom(q, k, v, **_):
        raise RuntimeError("kernel exploded")

    row = bench.run_row(_fake("boom", boom), seq_len=32, causal=False, **SMALL)
    assert row["status"] == "error" and "kernel exploded" in row["error"]

    def oom(q, k, v, **_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")

    row = bench.run_row(_fake("oom", oom), seq_len=32, causal=False, **SMALL)
    assert row["status"] == "oom"


def test_cuda_only_impl_refused_on_cpu():
    row = bench.run_row(bench.IMPLS["sdpa_cudnn"], seq_len=32, causal=False, **SMALL)
    assert row["status"] == "error" and row["error"].startswith("RuntimeError: not run")


def test_cpu_guard_refuses_rows_that_cannot_fit():
    huge = bench.run_row(bench.IMPLS["naive"], seq_len=2 ** 22, causal=False, **{**SMALL, "heads": 8})
    assert huge["status"] == "oom" and huge["error"].startswith("not run: needs about")
    assert huge["time_ms"] is None


def test_sweep_goes_on_after_oom_and_error(monkeypatch):
    calls = []

    def oom_above_64(q, k, v, **_):
        calls.append(q.shape[1])
        if q.shape[1] > 64:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return bench.IMPLS["naive"].fn(q, k, v, causal=False, ring_size=1)

    def boom(q, k, v, **_):
        raise ValueError("broken")

    monkeypatch.setitem(bench.IMPLS, "fake_oom", _fake("fake_oom", oom_above_64))
    monkeypatch.setitem(bench.IMPLS, "fake_err", _fake("fake_err", boom))
    config = bench.SweepConfig(impls=["fake_oom", "fake_err", "sdpa"], seq_lens=[32, 64, 128, 256],
                               causal=[False], heads=2, head_dim=8, repeats=3)
    rows = bench.run_sweep(config, progress=False)
    by = {(r["impl"], r["seq_len"]): r for r in rows}
    assert len(rows) == 12
    assert [by[("fake_oom", n)]["status"] for n in (32, 64, 128, 256)] == ["ok", "ok", "oom", "oom"]
    assert by[("fake_oom", 256)]["error"] == "not run: seq_len 128 already ran out of memory"
    assert 256 not in calls  # the longer length was not attempted
    assert all(by[("fake_err", n)]["status"] == "error" for n in (32, 64, 128, 256))
    assert all(by[("sdpa", n)]["status"] == "ok" for n in (32, 64, 128, 256))


def test_sweep_does_not_run_calls_predicted_too_slow(monkeypatch):
    def slow(q, k, v, **_):
        time.sleep(0.02 * (q.shape[1] / 32) ** 2)
        return bench.IMPLS["naive"].fn(q, k, v, causal=False, ring_size=1)

    monkeypatch.setitem(bench.IMPLS, "slow", _fake("slow", slow))
    config = bench.SweepConfig(impls=["slow"], seq_lens=[32, 64, 1024], causal=[False], heads=1, head_dim=8,
                               repeats=3, max_row_seconds=1.0)
    rows = bench.run_sweep(config, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped"]  # not an error: nothing failed
    assert rows[2]["error"].startswith("not run: a call is predicted to take")


def test_sweep_predicts_with_the_work_count_not_always_quadratically(monkeypatch):
    """Before: dilated rows (linear work) were not run, predicted from (n / n_prev)² growth."""
    def linear(q, k, v, **_):
        time.sleep(0.02 * q.shape[1] / 32)
        return bench.IMPLS["naive"].fn(q, k, v, causal=False, ring_size=1)

    monkeypatch.setitem(bench.IMPLS, "linear", _fake("linear", linear, flops=lambda b, h, n_q, n_k, d, c: 4.0 * n_q))
    config = bench.SweepConfig(impls=["linear"], seq_lens=[32, 64, 512], causal=[False], heads=1, head_dim=8,
                               warmup=0, repeats=3, max_row_seconds=0.5)
    rows = bench.run_sweep(config, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]  # 0.32 s predicted (linear), not 2.6 s (quadratic)


def test_plan_rejects_unknown_impl_and_expands_ring_sizes_only_for_ring_impls(monkeypatch):
    with pytest.raises(ValueError, match="unknown implementation"):
        bench.planned_rows(bench.SweepConfig(impls=["nope"], seq_lens=[8]))
    monkeypatch.setitem(bench.IMPLS, "fake_ring", _fake("fake_ring", None, ring=True))
    specs = bench.planned_rows(bench.SweepConfig(impls=["sdpa", "fake_ring"], seq_lens=[8, 16], ring_sizes=[1, 4],
                                         causal=[True]))
    assert {(s["impl"], s["ring_size"]) for s in specs} == {("sdpa", 1), ("fake_ring", 1), ("fake_ring", 4)}
    assert len(specs) == 2 + 4


def test_default_config_is_small_on_cpu():
    config = bench.default_config("cpu")
    assert config.dtype == torch.float32 and max(config.seq_lens) <= 4096
    flops = sum(attention_flops(config.batch, config.heads, n, n, config.head_dim) for n in config.seq_lens)
    assert flops < 1e11  # about a minute on two cores, reference checks included


def test_report_and_plots_from_rows(tmp_path):
    config = bench.SweepConfig(impls=["naive", "sdpa"], seq_lens=[32, 64], heads=2, head_dim=8, repeats=3)
    rows = bench.run_sweep(config, progress=False)
    rows.append({**rows[0], "seq_len": 128, "status": "oom", "error": "CUDA out of memory", "time_ms": None,
                 "tflops": None, "tokens_per_s": None, "peak_mem_gb": None, "max_rel_err": None})
    paths = report.write_outputs(rows, tmp_path, meta={"warmup": 1, "repeats": 3})
    text = paths["report"].read_text()
    assert "### Summary Table" in text and "#### Sequence Length: 64 tokens" in text
    assert "| naive | 1 | True | 64 |" in text  # max seq reached for causal naive
    assert "Rows that did not succeed" in text and "CUDA out of memory" in text
    assert "RingDilatedV2_r8" in text and "Production_r16" in text  # the seed's rows stay
    assert results.load_rows(paths["json"]) == json.loads(json.dumps(rows, default=str))
    for key in ("throughput", "memory"):
        assert paths[key].stat().st_size > 10_000
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    only_md = report.write_outputs(rows, tmp_path / "md", formats=["md"])
    assert list(only_md) == ["report"] and [p.name for p in (tmp_path / "md").iterdir()] == [only_md["report"].name]
    with pytest.raises(ValueError, match="formats must be among"):
        report.write_outputs(rows, tmp_path, formats=["pdf"])
    with pytest.raises(ValueError, match="rows is empty"):
        report.markdown_report([])
    with pytest.raises(ValueError, match="metric must be one of"):
        viz_results.plot_results(rows, "speed")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ringbook", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_end_to_end(tmp_path):
    res = _cli("bench", "--impl", "naive", "blockwise", "--seq-lens", "64", "128", "--heads", "2",
               "--head-dim", "8", "--causal", "both", "--repeats", "3", "--quiet", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "status" in res.stdout and "wrote report" in res.stdout
    data = json.loads((tmp_path / "bench-cpu-float32.json").read_text())
    assert len(data["rows"]) == 8 and all(REQUIRED <= r.keys() for r in data["rows"])
    assert all(r["status"] == "ok" for r in data["rows"])
    assert data["meta"]["repeats"] == 3
    res = _cli("report", str(tmp_path / "bench-cpu-float32.json"), "--out", str(tmp_path / "again"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "again" / "bench-cpu-float32.md").exists()


@pytest.mark.parametrize("args, message", [
    (["--seq-lens", "0"], "positive integer"),
    (["--causal", "maybe"], "false, true or both"),
    (["--impl", "nope"], "invalid choice"),
])
def test_cli_rejects_bad_options(args, message, tmp_path, capsys):
    from ringbook.bench import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *args, "--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_seq_len_suffixes():
    from ringbook.bench.cli import seq_len as _seq

    assert _seq("16K") == 16384 and _seq("1M") == 1048576 and _seq("300") == 300


@pytest.mark.parametrize("name,ring_size", [("production", 4), ("ring", 2), ("sdpa", 1)])
def test_forward_backward_rows(name, ring_size):
    row = bench.run_row(bench.IMPLS[name], seq_len=64, causal=True, backward=True,
                        **{**SMALL, "ring_size": ring_size})
    assert row["status"] == "ok", row["error"]
    assert row["mode"] == "forward+backward"
    assert row["flops"] == pytest.approx(bench.BACKWARD_FLOPS_FACTOR * attention_flops(1, 2, 64, 64, 16, True))
    assert row["max_rel_err"] < 1e-5
    assert report.row_label(row).endswith("fwd+bwd")


def test_forward_backward_call_really_runs_the_backward(monkeypatch):
    seen = []

    def fn(q, k, v, **_):
        out, lse = bench.IMPLS["naive"].fn(q, k, v, causal=False, ring_size=1)

        def hook(grad):
            seen.append(grad.shape)
        out.register_hook(hook)
        return out, lse

    row = bench.run_row(_fake("hooked", fn), seq_len=16, causal=False, backward=True, **SMALL)
    assert row["status"] == "ok", row["error"]
    assert len(seen) >= 1 + SMALL["repeats"]  # the checked call and every timed call ran a backward
    identity = bench.run_row(_fake("identity", lambda q, k, v, **_: (q * 1.0, None)), seq_len=16, causal=False,
                             backward=True, **SMALL)
    assert identity["status"] == "error" and "dk is missing" in identity["error"]  # q is not attention


@pytest.mark.parametrize("causal", [False, True])
def test_production_dilated_row_is_the_seed_configuration(causal):
    ring = bench.run_row(bench.IMPLS["ring_dilated"], seq_len=256, causal=causal, **{**SMALL, "ring_size": 4, "heads": 8})
    prod = bench.run_row(bench.IMPLS["production_dilated"], seq_len=256, causal=causal,
                         **{**SMALL, "ring_size": 4, "heads": 8})
    assert prod["status"] == "ok", prod["error"]
    assert prod["flops"] == ring["flops"] < attention_flops(1, 8, 256, 256, 16, causal)
    assert prod["max_rel_err"] < 1e-5
    names = {impl for _, impl, *_ in published.SEED_ROWS}
    assert names == {"ring_dilated", "production_dilated"}


def test_cli_backward_writes_its_own_file(tmp_path, capsys):
    from ringbook.bench import cli

    code = cli.main(["bench", "--backward", "--impl", "production", "--ring-sizes", "2", "--seq-lens", "64",
                     "--heads", "2", "--head-dim", "8", "--causal", "false", "--repeats", "3", "--quiet",
                     "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "bench-cpu-float32-fwd-bwd.json").read_text())
    assert [r["mode"] for r in data["rows"]] == ["forward+backward"]
    assert "fwd+bwd" in (tmp_path / "bench-cpu-float32-fwd-bwd.md").read_text()


@pytest.mark.parametrize("causal", [False, True])
def test_dilated_sdpa_peer_computes_the_production_dilated_function(causal):
    """The batched-call peer (one fused call per head group, no ring) is the same function as production_dilated."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 256, 8, 16, generator=g, dtype=torch.float64) for _ in range(3))
    peer, peer_lse = bench.IMPLS["dilated_sdpa"].fn(q, k, v, causal=causal, ring_size=1)
    for ring_size in (1, 4):
        prod, prod_lse = bench.IMPLS["production_dilated"].fn(q, k, v, causal=causal, ring_size=ring_size)
        assert torch.allclose(peer, prod, atol=1e-12, rtol=0)
        assert torch.equal(torch.isneginf(peer_lse), torch.isneginf(prod_lse))  # the same uncovered positions
    row = bench.run_row(bench.IMPLS["dilated_sdpa"], seq_len=256, causal=causal, **{**SMALL, "heads": 8})
    assert row["status"] == "ok" and row["max_rel_err"] < 1e-5, row["error"]
    assert row["flops"] == bench.run_row(bench.IMPLS["production_dilated"], seq_len=256, causal=causal,
                                         **{**SMALL, "heads": 8})["flops"]
