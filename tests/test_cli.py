"""The command line never loses a sweep and says what is wrong in one line (exit status 2)."""

import json
import subprocess
import sys

import pytest
import torch

from ringbook import bench
from ringbook.bench import cli, results, sweep

SMALL_SWEEP = ["--seq-lens", "32", "64", "--heads", "2", "--head-dim", "8", "--causal", "false",
               "--repeats", "3", "--warmup", "0", "--quiet"]


def _main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- bench: bad options

@pytest.mark.parametrize("argv, needles", [
    (["--device", "tpu"], ["--device", "cpu, cuda or cuda:N", "'tpu'"]),
    (["--device", "xyz"], ["--device", "'xyz'"]),
    (["--device", "cpu:7"], ["--device", "without an index"]),
    (["--max-row-seconds", "-1"], ["--max-row-seconds", "positive"]),
    (["--max-row-seconds", "nan"], ["--max-row-seconds", "finite"]),
    (["--max-row-seconds", "0"], ["--max-row-seconds"]),
    (["--warmup", "-2"], ["--warmup", "≥ 0"]),
    (["--repeats", "0"], ["--repeats", "positive"]),
])
def test_bench_bad_option_is_one_line_and_status_2(argv, needles, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, *needles)
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_cuda_without_a_gpu_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--device", "cuda:1", "--out", str(tmp_path)])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "--device", "no CUDA device")


@pytest.mark.parametrize("where", ["file", "/proc", "/sys"])
def test_unwritable_out_is_refused_before_measuring(where, capsys, tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(sweep, "run_row", lambda *a, **k: measured.append(1))
    target = {"file": tmp_path / "a-file", "/proc": "/proc/ringbook-results", "/sys": "/sys/ringbook-results"}[where]
    if where == "file":
        target.write_text("not a folder")
    code, _, err = _main(capsys, "bench", *SMALL_SWEEP, "--impl", "naive", "--out", str(target))
    assert code == 2
    _one_line_error(err, "--out", str(target))
    assert measured == []


# --------------------------------------------------------------------------- bench: rows are never lost

def test_json_is_written_row_by_row(capsys, tmp_path, monkeypatch):
    real = sweep.run_row
    seen = []

    def spy(*args, **kwargs):
        path = tmp_path / "bench-cpu-float32.json"
        seen.append(len(json.loads(path.read_text())["rows"]) if path.exists() else 0)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "run_row", spy)
    code, out, _ = _main(capsys, "bench", *SMALL_SWEEP, "--impl", "naive", "blockwise", "--out", str(tmp_path))
    assert code == 0
    assert seen == [0, 1, 2, 3]  # before each row, the file holds every row measured so far
    data = json.loads((tmp_path / "bench-cpu-float32.json").read_text())
    assert len(data["rows"]) == 4 and data["meta"]["complete"] is True and data["meta"]["rows_planned"] == 4
    assert 0 < data["meta"]["sweep_seconds"] < 600


def test_ctrl_c_keeps_the_rows_measured(capsys, tmp_path, monkeypatch):
    real = sweep.run_row
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "run_row", interrupted)
    code, out, err = _main(capsys, "bench", *SMALL_SWEEP, "--impl", "naive", "blockwise", "--out", str(tmp_path))
    assert code == 130
    assert "interrupted after 2 of 4 rows" in err
    data = json.loads((tmp_path / "bench-cpu-float32.json").read_text())
    assert len(data["rows"]) == 2 and all(r["status"] == "ok" for r in data["rows"])
    assert data["meta"]["interrupted"] is True and data["meta"]["complete"] is False
    assert (tmp_path / "bench-cpu-float32.md").exists()  # the report is drawn from what was measured
    rows, _ = results.load_results(tmp_path / "bench-cpu-float32.json")  # and can be redrawn
    assert len(rows) == 2


def test_nan_implementation_through_the_cli_is_an_error_row(capsys, tmp_path):
    bench.register(bench.Impl("nan_test_double", lambda q, k, v, **_: (torch.full_like(q, float("nan")), None),
                              "returns NaN (test double)"))
    try:
        code, out, _ = _main(capsys, "bench", *SMALL_SWEEP, "--impl", "nan_test_double", "--out", str(tmp_path))
    finally:
        del bench.IMPLS["nan_test_double"]
    assert code == 0  # the sweep finished; its rows say what went wrong
    rows = json.loads((tmp_path / "bench-cpu-float32.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["error", "error"]
    assert all("NaN" in r["error"] and r["max_rel_err"] is None for r in rows)
    assert "0.0e+00" not in out
    md = (tmp_path / "bench-cpu-float32.md").read_text()
    assert "none ok" in md and "NaN" in md


# --------------------------------------------------------------------------- report

def _results(tmp_path):
    row = bench.run_row(bench.IMPLS["naive"], seq_len=32, ring_size=1, causal=False, dtype=torch.float32, batch=1,
                        heads=2, head_dim=8, device=torch.device("cpu"), warmup=0, repeats=3)
    assert row["status"] == "ok", row["error"]
    path = results.save_json([row], tmp_path / "results.json", {"generated": "then", "extra_key": [1, 2]})
    return path, row


def test_report_does_not_modify_its_input(capsys, tmp_path):
    path, _ = _results(tmp_path)
    before = path.read_bytes()
    code, out, _ = _main(capsys, "report", str(path))
    assert code == 0, out
    assert path.read_bytes() == before  # unknown top-level keys kept, nothing rewritten
    assert (tmp_path / "results.md").exists() and (tmp_path / "results-throughput.png").exists()


def test_report_accepts_a_list_of_rows(capsys, tmp_path):
    _, row = _results(tmp_path)
    path = tmp_path / "list.json"
    path.write_text(json.dumps([row]))
    code, out, err = _main(capsys, "report", str(path), "--out", str(tmp_path / "drawn"))
    assert code == 0, err
    assert (tmp_path / "drawn" / "list.md").exists()


def _bad_files(tmp_path):
    _, row = _results(tmp_path)
    no_seq = {k: v for k, v in row.items() if k != "seq_len"}
    nan_ok = {**row, "time_ms": float("nan")}
    return {
        "missing": (None, "no such file"),
        "empty": (b"", "is empty"),
        "corrupt": (b'{"rows": [', "not valid JSON"),
        "binary": (bytes(range(256)), "not a text file"),
        "rows-not-a-list": (b'{"rows": 5}', "'rows' must be a list"),
        "not-results": (b'{"hello": 1}', "not a ringbook results file"),
        "no-rows": (b'{"rows": []}', "no rows"),
        "row-without-seq-len": (json.dumps({"rows": [no_seq]}).encode(), "row 0 has no 'seq_len'"),
        "row-not-object": (b'{"rows": [3]}', "row 0 must be an object"),
        "ok-row-with-nan": (json.dumps({"rows": [nan_ok]}).encode(), "time_ms=nan"),
        "bad-status": (json.dumps({"rows": [{**row, "status": "fine"}]}).encode(), "status='fine'"),
    }


def test_report_bad_files_are_one_line_and_status_2(capsys, tmp_path):
    for name, (content, needle) in _bad_files(tmp_path).items():
        path = tmp_path / f"{name}.json"
        if content is not None:
            path.write_bytes(content)
        code, _, err = _main(capsys, "report", str(path), "--out", str(tmp_path / "out"))
        assert code == 2, name
        _one_line_error(err, str(path), needle)


def test_report_on_a_folder_is_refused(capsys, tmp_path):
    code, _, err = _main(capsys, "report", str(tmp_path))
    assert code == 2
    _one_line_error(err, "is a directory")


def test_real_process_exit_status_and_no_traceback(tmp_path):
    """The same through ``python -m ringbook`` in a fresh process (what a user runs)."""
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\x00\x01garbage")
    for argv in (["report", str(bad)],):  # the bench options' one-line errors are checked in-process above
        res = subprocess.run([sys.executable, "-m", "ringbook", *argv], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- issue 20: no raw traceback, rows kept

def test_bench_out_with_a_name_too_long_names_out(capsys, tmp_path, monkeypatch):
    """Before: rc 1 with ``OSError: File name too long``, not naming --out (Path.exists raised)."""
    monkeypatch.setattr(sweep, "run_row", lambda *a, **k: pytest.fail("measured"))
    target = tmp_path / ("a" * 300)
    code, _, err = _main(capsys, "bench", *SMALL_SWEEP, "--impl", "naive", "--out", str(target))
    assert code == 2
    _one_line_error(err, "--out", "is not a writable folder", "name too long")


def test_report_on_deeply_nested_json_names_the_file(capsys, tmp_path):
    """Before: rc 1 with a RecursionError."""
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = _main(capsys, "report", str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    _one_line_error(err, str(path), "nested too deeply")


def test_a_second_ctrl_c_while_the_report_is_drawn_keeps_the_rows(capsys, tmp_path, monkeypatch):
    """Before: a raw KeyboardInterrupt traceback (the rows were kept)."""
    from ringbook.bench import report

    real = sweep.run_row
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    def drawing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_row", interrupted)
    monkeypatch.setattr(report, "write_outputs", drawing)
    code, _, err = _main(capsys, "bench", *SMALL_SWEEP, "--impl", "naive", "--out", str(tmp_path))
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "python -m ringbook bench: interrupted"
    rows, meta = results.load_results(tmp_path / "bench-cpu-float32.json")
    assert len(rows) == 1 and rows[0]["status"] == "ok" and meta["complete"] is False


@pytest.mark.parametrize("peak", ["null", "missing"])
def test_report_draws_an_ok_row_without_a_peak(peak, capsys, tmp_path):
    """Before: TypeError/KeyError (rc 1) on a row bench writes wherever the CPU peak cannot be reset."""
    _, row = _results(tmp_path)
    row = {key: value for key, value in row.items() if key != "peak_mem_gb"} if peak == "missing" else \
        {**row, "peak_mem_gb": None}
    path = results.save_json([row, {**row, "seq_len": 64}], tmp_path / "no-peak.json")
    code, out, err = _main(capsys, "report", str(path), "--out", str(tmp_path / "drawn"))
    assert code == 0, err
    md = (tmp_path / "drawn" / "no-peak.md").read_text()
    assert "not measured" in md and (tmp_path / "drawn" / "no-peak-memory.png").stat().st_size > 1000


# --------------------------------------------------------------------------- dist_sweep: options as bench's

@pytest.mark.parametrize("argv, needles", [
    (["--timeout", "-1"], ["--timeout", "positive"]),
    (["--timeout", "nan"], ["--timeout", "finite"]),
    (["--warmup", "-1"], ["--warmup", "≥ 0"]),
    (["--repeats", "0"], ["--repeats", "positive"]),
    (["--kernel", "tpu"], ["--kernel", "invalid choice"]),
])
def test_dist_sweep_bad_option_is_one_line_and_status_2(argv, needles, capsys, monkeypatch):
    """Before: --timeout -1 / nan failed inside init_process_group with raw tracebacks; --warmup -1 was accepted."""
    from ringbook.bench import dist_sweep

    monkeypatch.setenv("RANK", "0")  # as under torchrun: the options are refused before any process group
    monkeypatch.setattr(dist_sweep, "_setup", lambda *a: pytest.fail("a process group was started"))
    with pytest.raises(SystemExit) as exc:
        dist_sweep.main(argv)
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, *needles)


def test_a_run_writes_into_results_which_git_ignores(capsys, tmp_path, monkeypatch):
    """Before: ``make bench`` from a fresh clone rewrote the tracked figures/bench-cpu-float32.*."""
    from pathlib import Path

    from ringbook.bench import dist_sweep

    root = Path(__file__).resolve().parents[1]
    assert "/results/" in (root / ".gitignore").read_text().splitlines()
    assert dist_sweep.build_parser().parse_args([]).out == Path("results")
    makefile = (root / "Makefile").read_text()
    assert "bench-commit:" in makefile and "ringbook bench --out figures" in makefile
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, "bench", *SMALL_SWEEP, "--impl", "naive")
    assert code == 0, err
    assert out.startswith("writing results/bench-cpu-float32.json after every row") and "ignored by git" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert (tmp_path / "results" / "bench-cpu-float32.json").exists()
