"""Vector-env throughput, shoal vs gymnasium, SB3 and EnvPool: ``python benchmarks/vector_envs.py``."""

import sys

from shoal.bench.vector_envs import main

if __name__ == "__main__":
    sys.exit(main())
