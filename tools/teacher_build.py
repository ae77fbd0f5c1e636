"""The teacher's copy: every notebook with its exercises solved, executed, in ``build/teacher/`` (git ignores it).

    python tools/teacher_build.py [NAME ...]      # or: make teacher

For each notebook with a solutions file (``notebooks/solutions/<name>.py``)
every exercise stub — a code cell defining a function whose body raises
``NotImplementedError`` — gets the solution's function of the same name in
its place; the checker call below it is kept, so the executed copy shows
each checker's ✓. The copy is executed like the committed notebooks
(``tools/build_notebooks.py``) and written to ``build/teacher/<name>.ipynb``.
The committed notebooks and figures are not touched (the copies' figures go
to ``build/teacher/figures/``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jupytext  # noqa: E402
import nbformat  # noqa: E402
from build_notebooks import NOTEBOOKS, ROOT, execute, resolve, strip_volatile  # noqa: E402

OUT = ROOT / "build" / "teacher"


def solutions(name: str) -> dict[str, str]:
    """``{function name: source}`` of ``notebooks/solutions/<name>.py`` (empty if there is none)."""
    path = NOTEBOOKS / "solutions" / f"{name}.py"
    if not path.exists():
        return {}
    text = path.read_text()
    return {node.name: ast.get_source_segment(text, node) for node in ast.parse(text).body
            if isinstance(node, ast.FunctionDef)}


def fill(nb, solved: dict[str, str]) -> list[str]:
    """Replace each stub function with its solution, in place; return the names filled in."""
    filled = []
    for cell in nb.cells:
        if cell.cell_type != "code" or "raise NotImplementedError" not in cell.source:
            continue
        tree = ast.parse(cell.source)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in solved:
                lines = cell.source.splitlines()
                start = node.lineno - 1 - len(node.decorator_list)
                cell.source = "\n".join(lines[:start] + solved[node.name].splitlines() + lines[node.end_lineno:])
                filled.append(node.name)
                break
        else:
            raise SystemExit(f"a stub cell has no solution in notebooks/solutions: {cell.source.splitlines()[0]!r}")
    return filled


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    OUT.mkdir(parents=True, exist_ok=True)
    for source in resolve(argv):
        solved = solutions(source.stem)
        if not solved:
            continue
        nb = jupytext.read(source, fmt="py:percent")
        names = fill(nb, solved)
        execute(nb, source.parent, figures_out=OUT / "figures")
        nb = strip_volatile(nb)
        nbformat.validate(nb)
        target = OUT / f"{source.stem}.ipynb"
        nbformat.write(nb, target)
        print(f"wrote {target.relative_to(ROOT)} with solutions: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
