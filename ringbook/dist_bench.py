"""``torchrun -m ringbook.dist_bench`` keeps working: the multi-process sweep is :mod:`ringbook.bench.dist_sweep`."""

import sys

from .bench.dist_sweep import main

if __name__ == "__main__":
    sys.exit(main())
