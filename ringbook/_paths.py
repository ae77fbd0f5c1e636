"""Where a notebook reads committed results and saves its figures, in a clone or not.

Every notebook's first (hidden) cell is one call::

    from ringbook._paths import notebook_paths
    ROOT, FIGURES, SAVE = paths = notebook_paths()

* ``ROOT`` is the root of the ringbook clone the notebook runs in (found from
  the working directory upwards, then from where ``ringbook`` was imported),
  or ``None`` outside a clone, e.g. a notebook opened on Colab after
  ``pip install ringbook``.
* ``FIGURES`` is ``ROOT / "figures"``, the committed results the notebooks
  read, or ``None`` outside a clone.
* ``SAVE`` is where the notebook writes its figures. Running a notebook never
  overwrites the committed figures unless asked: the folder is
  ``$RINGBOOK_FIGURES_OUT`` when set (``tools/build_notebooks.py``, which
  ``make sync-notebooks`` runs, sets it to ``figures/`` on purpose), else
  ``build/figures/`` in a clone (git ignores ``build/``), else a folder in the
  system's temporary directory.

Committed results outside a clone. The benchmark files under ``figures/`` are
not shipped as package data, on purpose: each is a measurement tied to the
commit and device that produced it, the largest is a few hundred kB, and a
second copy inside the wheel would be a second home for every number, free to
drift from the one the README and the tests read. Everything a lesson derives
is computed live in the notebook; only the cells that *show* a GPU
measurement need a file, and outside a clone they say so and skip that figure
(``paths.result(name)`` returns ``None`` after printing which file of the
repository the figure needs).

Importing this module needs only the standard library.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

ENV_OUT = "RINGBOOK_FIGURES_OUT"
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # a clone when ringbook is imported from one


def _is_clone(path: Path) -> bool:
    """A ringbook checkout: ``pyproject.toml`` naming the project ``ringbook``, beside ``ringbook/`` or ``figures/``."""
    marker = path / "pyproject.toml"
    if not marker.is_file() or not ((path / "ringbook").is_dir() or (path / "figures").is_dir()):
        return False
    try:
        text = marker.read_text()
    except OSError:
        return False
    return any(line.replace(" ", "") == 'name="ringbook"' for line in text.splitlines())


def find_root(start: Path | None = None) -> Path | None:
    """The clone's root above ``start`` (default: the working directory) or above ``ringbook``'s source; else None."""
    start = Path.cwd() if start is None else Path(start)
    for path in (start, *start.resolve().parents):
        if _is_clone(path):
            return path
    return _PACKAGE_PARENT if _is_clone(_PACKAGE_PARENT) else None


class NotebookPaths(NamedTuple):
    root: Path | None
    figures: Path | None
    save: Path

    def result(self, name: str) -> Path | None:
        """``figures/<name>`` when this clone has it; otherwise print which repository file is missing, return None."""
        path = None if self.figures is None else self.figures / name
        if path is not None and path.exists():
            return path
        where = "this clone" if self.root is not None else "an installed package (no clone found)"
        print(f"This figure reads figures/{name}, a measurement committed to the repository; it is not in {where}. "
              "Run the notebook in a clone of the ringbook repository to see it; the rest runs without it.")
        return None


def notebook_paths(start: Path | None = None) -> NotebookPaths:
    """``(root, figures, save)`` for a notebook running in ``start`` (default: the working directory).

    ``save`` exists on return. It is the committed ``figures/`` only when
    ``$RINGBOOK_FIGURES_OUT`` says so.
    """
    root = find_root(start)
    figures = None if root is None else root / "figures"
    if os.environ.get(ENV_OUT):
        save = Path(os.environ[ENV_OUT])
    elif root is not None:
        save = root / "build" / "figures"
    else:
        save = Path(tempfile.gettempdir()) / "ringbook-figures"
    save.mkdir(parents=True, exist_ok=True)
    return NotebookPaths(root, figures, save)
