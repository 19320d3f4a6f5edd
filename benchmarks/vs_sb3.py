"""PPO vs Stable-Baselines3 on identical hyperparameters: ``python benchmarks/vs_sb3.py --part ...``."""

import sys

from shoal.bench.sb3 import main

if __name__ == "__main__":
    sys.exit(main())
