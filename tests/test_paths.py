"""The notebooks run outside a clone, and never overwrite the committed figures unless asked.

Outside a clone (a notebook opened after ``pip install ringbook``, e.g. on
Colab) ``ROOT`` and ``FIGURES`` are None: only the setup cell may name them,
every committed result is read through ``PATHS.result(name)``, and the cells
that need one skip their figure or table when it returns None.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from ringbook import _paths

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.py"))


def _code_cells(source: Path) -> list[str]:
    """The code cells of a jupytext py:percent notebook, in order."""
    cells = re.split(r"^# %%.*$", source.read_text(), flags=re.M)
    headers = re.findall(r"^# %%.*$", source.read_text(), flags=re.M)
    return [body for header, body in zip(headers, cells[1:]) if "[markdown]" not in header]


def _setup_cell(source: Path) -> str:
    """The first code cell: the notebook's setup."""
    return _code_cells(source)[0]


def _results_read(source: Path) -> list[str]:
    """The names every ``PATHS.result(...)`` call of the notebook asks for (string literals only)."""
    calls = re.findall(r"PATHS\.result\(([^)]*)\)", "".join(_code_cells(source)[1:]))
    return [ast.literal_eval(arg) for arg in calls]


@pytest.fixture
def outside_a_clone(tmp_path, monkeypatch):
    """cwd is an empty folder and ringbook looks installed (its parent is not a clone), as on Colab."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_paths, "_PACKAGE_PARENT", tmp_path / "site-packages")
    monkeypatch.delenv(_paths.ENV_OUT, raising=False)
    return tmp_path


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_runs_outside_a_clone(source, outside_a_clone, capsys):
    scope: dict = {}
    exec(_setup_cell(source), scope)  # no StopIteration from looking for pyproject.toml
    assert scope["ROOT"] is None and scope["FIGURES"] is None
    assert scope["SAVE"].is_dir() and not scope["SAVE"].is_relative_to(ROOT)
    assert scope["PATHS"].result("bench-cpu-float32.json") is None
    assert "committed to the repository" in capsys.readouterr().out


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_in_a_clone_saves_outside_the_committed_figures(source, monkeypatch):
    monkeypatch.chdir(ROOT / "notebooks")
    monkeypatch.delenv(_paths.ENV_OUT, raising=False)
    scope: dict = {}
    exec(_setup_cell(source), scope)
    assert scope["ROOT"] == ROOT and scope["FIGURES"] == ROOT / "figures"
    assert scope["SAVE"] == ROOT / "build" / "figures"  # git ignores build/
    assert scope["PATHS"].result("bench-cpu-float32.json") == ROOT / "figures" / "bench-cpu-float32.json"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_only_the_setup_cell_names_the_clone(source):
    """ROOT and FIGURES are None outside a clone: past the setup cell, results are read through PATHS.result."""
    for i, cell in enumerate(_code_cells(source)[1:], start=1):
        assert not re.search(r"\b(ROOT|FIGURES)\b", cell), f"{source.name} code cell {i} uses ROOT or FIGURES"
    for name in _results_read(source):
        assert (ROOT / "figures" / name).is_file(), f"{source.name} reads figures/{name}, which is not committed"


def _build_notebooks():
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "tools" / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ringbook imported from a folder that is not a clone, as after `pip install ringbook`
_AS_INSTALLED = ("from pathlib import Path\nimport ringbook._paths\n"
                 "ringbook._paths._PACKAGE_PARENT = Path.cwd() / 'site-packages'")


@pytest.mark.slow
@pytest.mark.parametrize("source", [p for p in NOTEBOOKS if p.stem[:2] == "05"], ids=lambda p: p.stem)  # reads the most files
def test_notebook_runs_outside_a_clone(source, tmp_path):
    """Every cell runs; each committed result it reads is reported missing once and its figure or table skipped.

    05 reads the most committed results; 03's one read, and every other notebook, are covered by the static
    check above (no ROOT or FIGURES after the setup cell, every ``PATHS.result`` name committed).
    """
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    nb = jupytext.read(source, fmt="py:percent")
    nb.cells.insert(0, nbformat.v4.new_code_cell(_AS_INSTALLED))
    _build_notebooks().execute(nb, tmp_path, figures_out=tmp_path / "saved")  # raises on a cell's error
    stdout = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                     if out.output_type == "stream")
    reads = _results_read(source)
    assert reads and stdout.count("committed to the repository") == len(reads), stdout[-2000:]
    assert all(f"figures/{name}" in stdout for name in reads)


def test_figures_go_to_the_committed_folder_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT / "notebooks")
    monkeypatch.setenv(_paths.ENV_OUT, str(ROOT / "figures"))
    assert _paths.notebook_paths().save == ROOT / "figures"
    monkeypatch.setenv(_paths.ENV_OUT, str(tmp_path / "out"))
    assert _paths.notebook_paths().save == tmp_path / "out"


def test_a_foreign_pyproject_is_not_a_clone(outside_a_clone):
    (outside_a_clone / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    (outside_a_clone / "figures").mkdir()
    assert _paths.find_root() is None
