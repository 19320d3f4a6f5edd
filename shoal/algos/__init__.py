"""The algorithms, by name. Each module holds one algorithm's config and math."""

from shoal.algos.a2c import A2C, A2CConfig
from shoal.algos.appo import APPO, APPOConfig
from shoal.algos.base import Algorithm
from shoal.algos.dqn import DQN, DQNConfig
from shoal.algos.impala import IMPALA, IMPALAConfig
from shoal.algos.ppo import PPO, PPOConfig
from shoal.algos.sac import SAC, SACConfig
from shoal.algos.td3 import TD3, TD3Config

ALGORITHMS: dict[str, type[Algorithm]] = {
    "ppo": PPO,
    "a2c": A2C,
    "dqn": DQN,
    "sac": SAC,
    "td3": TD3,
    "impala": IMPALA,
    "appo": APPO,
}

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "PPO",
    "PPOConfig",
    "A2C",
    "A2CConfig",
    "DQN",
    "DQNConfig",
    "SAC",
    "SACConfig",
    "TD3",
    "TD3Config",
    "IMPALA",
    "IMPALAConfig",
    "APPO",
    "APPOConfig",
]
