"""The algorithms, by name. Each module holds one algorithm's config and math."""

from shoal.algos.a2c import A2C, A2CConfig
from shoal.algos.base import Algorithm
from shoal.algos.dqn import DQN, DQNConfig
from shoal.algos.ppo import PPO, PPOConfig

ALGORITHMS: dict[str, type[Algorithm]] = {"ppo": PPO, "a2c": A2C, "dqn": DQN}

__all__ = ["ALGORITHMS", "Algorithm", "PPO", "PPOConfig", "A2C", "A2CConfig", "DQN", "DQNConfig"]
