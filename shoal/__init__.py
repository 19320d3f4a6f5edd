"""shoal: parallel and distributed reinforcement learning."""

from shoal.envs import ProcessVectorEnv, make_vec

__version__ = "0.1.0"
__all__ = ["ProcessVectorEnv", "make_vec", "__version__"]
