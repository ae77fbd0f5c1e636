"""The stored notebooks are what their jupytext sources say, and ran cleanly.

Reviews read ``notebooks/*.py`` (jupytext ``py:percent``); nbval and readers
use the executed ``notebooks/*.ipynb``. These tests keep the two in step:
same cells, same sources, and every stored notebook executed top to bottom
without an error. Rebuild with ``make sync-notebooks``
(``python tools/build_notebooks.py [NAME ...]``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
IPYNBS = sorted(NOTEBOOKS.glob("*.ipynb"))
SOURCES = sorted(NOTEBOOKS.glob("*.py"))
REBUILD = "rebuild it with `python tools/build_notebooks.py {stem}` (make sync-notebooks)"


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.name)
def test_notebook_matches_its_source(ipynb: Path):
    source = ipynb.with_suffix(".py")
    assert source.exists(), f"{ipynb.name} has no paired jupytext source {source.name}"
    stored = nbformat.read(ipynb, as_version=4)
    formats = stored.metadata.get("jupytext", {}).get("formats", "")
    assert "py:percent" in formats, f"{ipynb.name}: jupytext metadata should pair it as 'ipynb,py:percent', got {formats!r}"
    expected, actual = _cells(jupytext.read(source, fmt="py:percent")), _cells(stored)
    for i, (want, got) in enumerate(zip(expected, actual)):
        assert got == want, f"{ipynb.name} cell {i} differs from {source.name}; " + REBUILD.format(stem=ipynb.stem)
    assert len(actual) == len(expected), (
        f"{ipynb.name} has {len(actual)} cells but {source.name} has {len(expected)}; " + REBUILD.format(stem=ipynb.stem)
    )


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_source_has_a_stored_notebook(source: Path):
    assert source.with_suffix(".ipynb").exists(), (
        f"{source.name} has no executed notebook; " + REBUILD.format(stem=source.stem)
    )


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.name)
def test_notebook_was_executed_cleanly(ipynb: Path):
    nb = nbformat.read(ipynb, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{ipynb.name} has no code cells"
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{ipynb.name}: code cells must run once each, top to bottom, in a fresh kernel "
        f"(execution counts {counts}); " + REBUILD.format(stem=ipynb.stem)
    )
    for i, cell in enumerate(code):
        errors = [out for out in cell.outputs if out.output_type == "error"]
        assert not errors, f"{ipynb.name} code cell {i} stored an error: {errors[0].get('ename')}: {errors[0].get('evalue')}"
        assert "execution" not in cell.metadata, f"{ipynb.name} code cell {i} keeps execution timing metadata"
