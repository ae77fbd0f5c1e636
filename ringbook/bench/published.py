"""Published figures the benchmark is held against, read from ``ringbook/data/published.json``.

* :data:`SEED_ROWS`, :data:`SEED_FLAWS`, :data:`SEED_REPORT`: the report this
  project started from (its text is ``docs/seed-report.md``, what it got wrong
  ``docs/seed-notes.md``). Its rows stay in every report beside ringbook's
  exact measurement of the same configuration.
* :data:`TARGETS`: the production path's speed targets, each a ratio against
  a peer timed in the same run, with what it applies to.
"""

from __future__ import annotations

import json
from importlib import resources

_DATA = json.loads(resources.files("ringbook").joinpath("data/published.json").read_text())

SEED_REPORT: dict = _DATA["seed_report"]
# (name, impl, ring_size, the seed's max seq, the seed's throughput at max in tok/s)
SEED_ROWS: list[tuple] = [tuple(row) for row in SEED_REPORT["rows"]]
SEED_FLAWS: str = SEED_REPORT["flaws"]
TARGETS: dict = {key: value for key, value in _DATA["targets"].items() if key != "about"}
