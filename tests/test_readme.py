"""README numbers are read from the committed results files, never typed by hand."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_block_matches_the_committed_results():
    generated = subprocess.run([sys.executable, str(ROOT / "tools/readme_results.py")], capture_output=True,
                               text=True, check=True).stdout.strip()
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- results:start -->", 1)[1].split("<!-- results:end -->", 1)[0].strip()
    assert block == generated, "README results are stale: run `python tools/readme_results.py --write`"


def test_readme_links_and_figures_exist():
    import re

    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?:figures|notebooks)/[^)]+)\)", readme)
    assert targets, "README shows no figure or notebook"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, missing
