"""The notebooks' setup cell: it runs outside a clone, and never overwrites the committed figures unless asked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ringbook import _paths

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.py"))


def _setup_cell(source: Path) -> str:
    """The first code cell of a jupytext py:percent notebook."""
    cells = re.split(r"^# %%.*$", source.read_text(), flags=re.M)
    headers = re.findall(r"^# %%.*$", source.read_text(), flags=re.M)
    return next(body for header, body in zip(headers, cells[1:]) if "[markdown]" not in header)


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
