"""shoal vs SB3 on MuJoCo and Box2D, SAC/TD3, 1 vs 2 workers: ``python benchmarks/zoo.py --part ...``."""

import sys

from shoal.bench.zoo import main

if __name__ == "__main__":
    sys.exit(main())
