"""shoal: parallel and distributed reinforcement learning."""

from shoal.agent import A2C, APPO, DQN, IMPALA, PPO, SAC, TD3, Agent, load
from shoal.envs import ProcessVectorEnv, make_vec

__version__ = "0.1.0"
__all__ = [
    "PPO",
    "A2C",
    "DQN",
    "SAC",
    "TD3",
    "IMPALA",
    "APPO",
    "Agent",
    "load",
    "ProcessVectorEnv",
    "make_vec",
    "__version__",
]
