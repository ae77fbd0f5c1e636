"""Build the notebooks from their jupytext sources: write, execute, store.

For every ``notebooks/*.py`` (jupytext ``py:percent``), or only those named on
the command line, this script

1. writes the paired ``.ipynb`` from the ``.py`` (the ``.py`` is the source
   that reviews read; the ``.ipynb`` is generated),
2. executes it in place on CPU, with the kernel of the Python running this
   script and the working tree's ``ringbook`` first on the kernel's path,
   cwd = ``notebooks/``,
3. makes it diff-friendly: stable cell ids, no execution timing metadata,
   and widget model ids renumbered in order of appearance.

This is the one place that refreshes the committed figures: it sets
``$RINGBOOK_FIGURES_OUT`` to ``figures/`` (unless the caller set it), and the
notebooks' setup cell (``ringbook._paths.notebook_paths``) saves there. A
notebook run any other way saves its figures into ``build/figures/``.

Usage (``make sync-notebooks`` runs the first)::

    python tools/build_notebooks.py
    python tools/build_notebooks.py 01_online_softmax        # or notebooks/01_online_softmax.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import jupytext
import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbconvert.preprocessors import ExecutePreprocessor

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "python3"
TIMEOUT_S = 600
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


class CurrentEnvKernelSpecManager(KernelSpecManager):
    """Resolves every kernel name to ipykernel running on ``sys.executable``."""

    def get_kernel_spec(self, kernel_name):
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return KernelSpec(argv=argv, display_name="Python 3 (ipykernel)", language="python")


def resolve(names: list[str]) -> list[Path]:
    """The ``.py`` sources to build: all of ``notebooks/*.py``, or the named ones."""
    if not names:
        sources = sorted(NOTEBOOKS.glob("*.py"))
        if not sources:
            raise SystemExit(f"no notebook sources (*.py) in {NOTEBOOKS}")
        return sources
    sources = []
    for name in names:
        stem = Path(name).name.removesuffix(".py").removesuffix(".ipynb")
        path = NOTEBOOKS / f"{stem}.py"
        if not path.exists():
            known = ", ".join(p.stem for p in sorted(NOTEBOOKS.glob("*.py"))) or "none"
            raise SystemExit(f"no notebook source {path.relative_to(ROOT)}; known notebooks: {known}")
        sources.append(path)
    return sources


def stable_ids(nb) -> None:
    """Cell ids from the cell's type and source, so a rebuild keeps them."""
    seen: dict[str, int] = {}
    for cell in nb.cells:
        digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:8]
        seen[digest] = seen.get(digest, 0) + 1
        cell.id = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"


def strip_volatile(nb):
    """Drop timing metadata and renumber widget model ids in order of appearance."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
    nb.metadata.pop("papermill", None)
    nb.metadata.get("language_info", {}).pop("version", None)  # Python's patch version is noise
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    if not state:
        return nb
    text = json.dumps(nb)
    ids = sorted(state, key=text.index)  # in order of first appearance
    mapping = {uid: f"{i:032x}" for i, uid in enumerate(ids, start=1)}
    text = re.sub("|".join(map(re.escape, ids)), lambda mo: mapping[mo.group(0)], text)
    return nbformat.from_dict(json.loads(text))


@contextmanager
def patched_environ(values: dict[str, str]):
    """Set environment variables (inherited by the kernel) for the duration."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def build(source: Path) -> Path:
    target = source.with_suffix(".ipynb")
    nb = jupytext.read(source, fmt="py:percent")
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    nb.metadata.setdefault("kernelspec", {"display_name": "Python 3 (ipykernel)", "language": "python", "name": KERNEL_NAME})
    stable_ids(nb)

    execute(nb, source.parent, figures_out=Path(os.environ.get("RINGBOOK_FIGURES_OUT") or ROOT / "figures"))
    nb = strip_volatile(nb)
    nbformat.validate(nb)
    nbformat.write(nb, target)
    return target


def execute(nb, cwd: Path, figures_out: Path) -> None:
    """Run every cell of ``nb`` in place on a kernel of this Python, with this checkout's ringbook first.

    The notebook saves its figures into ``figures_out``.
    """
    kernel_env = {
        "RINGBOOK_FIGURES_OUT": str(figures_out),
        # the kernel imports this checkout's ringbook, whatever is installed
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        # figures render as PNG even if the caller set MPLBACKEND=Agg
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=CurrentEnvKernelSpecManager())
    ep = ExecutePreprocessor(timeout=TIMEOUT_S, kernel_name=KERNEL_NAME, record_timing=False, store_widget_state=True)
    try:
        with patched_environ(kernel_env):
            ep.preprocess(nb, {"metadata": {"path": str(cwd)}}, km=km)
    finally:  # the client leaves a kernel it did not start running
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to build (stem, .py or .ipynb); default: all")
    args = parser.parse_args(argv)
    for source in resolve(args.names):
        t0 = time.perf_counter()
        target = build(source)
        print(f"built {target.relative_to(ROOT)} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
