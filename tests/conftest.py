"""pytest setup shared by the unit tests.

* ``tests/`` is put on ``sys.path`` so test modules can ``from helpers import ...``
  whether or not the directory is a package.
* hypothesis runs without deadlines (the first call into torch is slow) and
  with a modest number of examples by default; set
  ``HYPOTHESIS_PROFILE=thorough`` for a longer search.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Tests use small tensors; one intra-op thread keeps them fast and predictable
# on a 2-core CI machine, where processes started by the distributed tests
# would otherwise oversubscribe the cores (seen: 20-30x slowdowns).
torch.set_num_threads(1)

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is only needed by the property tests
    pass
else:
    settings.register_profile(
        "ringbook", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile(
        "thorough", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ringbook"))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Tests draw inputs from explicit seeds; also pin the global RNG so nothing drifts."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)
