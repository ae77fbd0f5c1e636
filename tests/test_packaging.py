"""Set-up promises: pyproject and environment.yml agree, `import ringbook` stays
light, and CI runs the README's test command."""

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += [r for r in extra if not r.startswith("ringbook")]
    return {_name(r): r.replace(" ", "") for r in reqs}


def _conda_requirements() -> dict[str, str]:
    reqs, in_deps = {}, False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
            continue
        m = re.match(r"^  - ([A-Za-z0-9_.\-]+[^#]*?)\s*(#.*)?$", line)
        if in_deps and m:
            spec = m.group(1).replace(" ", "")
            name = CONDA_TO_PIP.get(_name(spec), _name(spec))
            if name not in ("python", "pip") and not spec.endswith(":"):
                reqs[name] = name + spec[len(_name(spec)):]
    return reqs


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    pip, conda = _pyproject_requirements(), _conda_requirements()
    assert set(pip) == set(conda), f"only in pyproject: {set(pip) - set(conda)}; only in environment.yml: {set(conda) - set(pip)}"
    assert pip == conda, "version bounds differ between pyproject.toml and environment.yml"


def test_cpu_constraint_pins_the_cpu_wheel():
    pins = [line for line in (ROOT / "constraints/cpu.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins == ["torch==2.13.0"]
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints/cpu.txt" in makefile


def test_import_ringbook_needs_no_jupyter_widgets_or_matplotlib():
    code = (
        "import sys, ringbook, ringbook.bench, ringbook.schedule\n"
        "heavy = [m for m in ('matplotlib', 'ipywidgets', 'IPython', 'jupyterlab', 'nbval') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in readme and "make bench" in readme
    assert re.search(r"^make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: ", makefile, re.M) and "--nbval" in makefile
