"""Distributed training scaling and bytes per update: ``python benchmarks/scaling.py``."""

import sys

from shoal.bench.scaling import main

if __name__ == "__main__":
    sys.exit(main())
