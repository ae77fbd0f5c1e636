"""README and docs/results.md numbers are read from the committed results files, never typed by hand."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, path", [("readme", "README.md"), ("docs", "docs/results.md")])
def test_results_block_matches_the_committed_results(name, path):
    generated = subprocess.run([sys.executable, str(ROOT / "tools/readme_results.py"), name], capture_output=True,
                               text=True, check=True).stdout.strip()
    text = (ROOT / path).read_text()
    block = text.split("<!-- results:start -->", 1)[1].split("<!-- results:end -->", 1)[0].strip()
    assert block == generated, f"{path} results are stale: run `python tools/readme_results.py --write`"


def test_readme_is_a_newcomers_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    block = readme.split("<!-- results:start -->", 1)[1].split("<!-- results:end -->", 1)[0]
    assert sum(line.startswith("| ") for line in block.splitlines()) <= 1 + 6  # header and at most six rows
    assert "](docs/results.md)" in readme


@pytest.mark.parametrize("path", ["README.md", "docs/results.md"])
def test_links_and_figures_exist(path):
    text = (ROOT / path).read_text()
    targets = re.findall(r"\]\(((?:\.\./)?(?:figures|notebooks|docs)/[^)]+|[\w.-]+\.md)\)", text)
    assert targets, f"{path} shows no figure, notebook or document"
    missing = [t for t in targets if not ((ROOT / path).parent / t).exists()]
    assert not missing, missing
