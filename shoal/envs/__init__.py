"""Experience collection: vector envs that step many environments at once."""

from gymnasium.envs.registration import register, registry

from shoal.envs.make import make_vec
from shoal.envs.process_vector_env import EnvWorkerError, ProcessVectorEnv

if "shoal/HeavyCartPole-v1" not in registry:
    register(
        id="shoal/HeavyCartPole-v1",
        entry_point="shoal.envs.heavy:HeavyCartPole",
        max_episode_steps=500,
        reward_threshold=475.0,
    )

__all__ = ["ProcessVectorEnv", "EnvWorkerError", "make_vec"]
