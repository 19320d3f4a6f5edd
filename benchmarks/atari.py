"""Atari frames/s, shoal vs gymnasium, SB3 and EnvPool: ``python benchmarks/atari.py``."""

import sys

from shoal.bench.atari import main

if __name__ == "__main__":
    sys.exit(main())
