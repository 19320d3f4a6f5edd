"""Atari (ALE) preprocessing, applied automatically to ``ALE/...`` and ``*NoFrameskip-v4`` ids.

The standard pipeline of the DQN papers, as OpenAI Baselines, SB3 and CleanRL apply it, built
from gymnasium's own wrappers where they do the job (``AtariPreprocessing``,
``FrameStackObservation``, ``TransformReward``) and three small ones they lack:

* :class:`GameScore` reports the raw score and length of every *whole game* in ``info``
  (``game_return``, ``game_length``) when the game really ends, so that logged returns are game
  scores, not the clipped per-life returns the learner sees;
* :class:`EpisodicLife` (training only) ends an episode when a life is lost, but starts the
  next one where the game is, not with a new game;
* :class:`FireOnReset` presses FIRE after every reset in games whose action 1 is FIRE
  (Breakout's ball, for one, never comes otherwise).

Innermost first: ALE env (frameskip=1) -> AtariPreprocessing (30 no-ops, skip 4 with max over
the last 2 frames, 84x84 grayscale) -> GameScore -> EpisodicLife -> FireOnReset -> sign of the
reward -> 4 stacked frames, uint8 ``(4, 84, 84)``. Evaluation drops EpisodicLife and the reward
clipping: it plays whole games and sums their raw rewards. See docs/atari.md.
"""

from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

NOOP_MAX = 30
FRAME_SKIP = 4
SCREEN_SIZE = 84
STACK = 4


def register_ale() -> bool:
    """Register the ALE ids with gymnasium if ale-py is installed (``pip install 'shoal[atari]'``)."""
    try:
        import ale_py
    except ImportError:
        return False
    if "ALE/Pong-v5" not in gym.registry:
        gym.register_envs(ale_py)
    return True


def ensure_registered(env: Any) -> None:
    """Register the ALE ids on first need: importing ale-py costs a third of a second, which
    shoal does not make every command pay (ALE/... ids are unknown to gymnasium until then)."""
    if isinstance(env, str) and env not in gym.registry and (env.startswith("ALE/") or env.endswith("-v4")):
        register_ale()


def is_atari(env: Any) -> bool:
    """Whether ``env`` is an id shoal preprocesses: ``ALE/<Game>-v5`` or ``<Game>NoFrameskip-v4``.

    Other v4 ids skip a random 2-4 frames inside the emulator, which a frame-skip wrapper
    would multiply; they are left as they are.
    """
    if not isinstance(env, str) or not (env.startswith("ALE/") or env.endswith("NoFrameskip-v4")):
        return False
    ensure_registered(env)
    try:
        return str(gym.spec(env).entry_point).startswith("ale_py")
    except gym.error.Error:
        return False


class GameScore(gym.Wrapper):
    """Adds ``game_return`` (raw, unclipped) and ``game_length`` (agent steps) to the ``info`` of
    the step that ends a game; placed below life loss and reward clipping, it sees whole games."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.score, self.length = 0.0, 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        self.score, self.length = 0.0, 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.score += float(reward)
        self.length += 1
        if terminated or truncated:
            info = {**info, "game_return": self.score, "game_length": self.length}
        return obs, reward, terminated, truncated, info


class EpisodicLife(gym.Wrapper):
    """A lost life ends the episode (``terminated``) for the learner, which then values each life
    on its own; the reset that follows continues the game with one no-op step instead of
    starting a new one. A reset given a seed or options, or after the game ended, is a real one.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.lives, self.game_over = 0, True

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        if self.game_over or seed is not None or options is not None:
            obs, info = self.env.reset(seed=seed, options=options)
        else:  # a life was lost: go on from here (the no-op's reward still counts in the game score)
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset()
        self.game_over = False
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class FireOnReset(gym.Wrapper):
    """Presses FIRE after each reset: some games (Breakout) wait for it before they start."""

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        self.env.reset(seed=seed, options=options)
        obs, _, terminated, truncated, info = self.env.step(1)
        if terminated or truncated:  # (not expected; as Baselines does)
            obs, info = self.env.reset()
        return obs, info


def needs_fire(env: gym.Env) -> bool:
    """Baselines' rule: the game's action 1 is FIRE (and it has more than FIRE and NOOP)."""
    meanings = env.unwrapped.get_action_meanings()
    return len(meanings) >= 3 and meanings[1] == "FIRE"


def make_atari(env_id: str, *, training: bool = True, **env_kwargs: Any) -> gym.Env:
    """The preprocessed env of ``env_id``; ``training=False``: whole games, raw rewards.

    The id's own emulator settings stay (v5: sticky actions 0.25, minimal action set; v4
    NoFrameskip: no sticky actions); only the frame skip moves from the emulator to the wrapper,
    which max-pools the last two frames.
    """
    register_ale()
    env = gym.make(env_id, **{**env_kwargs, "frameskip": 1})
    try:
        env = gym.wrappers.AtariPreprocessing(
            env, noop_max=NOOP_MAX, frame_skip=FRAME_SKIP, screen_size=SCREEN_SIZE, grayscale_obs=True
        )
    except gym.error.DependencyNotInstalled:
        env.close()
        raise gym.error.DependencyNotInstalled(
            "Atari preprocessing needs OpenCV: pip install 'shoal[atari]' (or opencv-python-headless)"
        ) from None
    env = GameScore(env)
    if training:
        env = EpisodicLife(env)
    if needs_fire(env):
        env = FireOnReset(env)
    if training:
        env = gym.wrappers.TransformReward(env, lambda r: float(np.sign(r)))
    return gym.wrappers.FrameStackObservation(env, STACK)


class AtariFactory:
    """Picklable constructor of a preprocessed Atari env (env workers and actors make their own)."""

    def __init__(self, env_id: str, training: bool = True) -> None:
        self.env_id, self.training = env_id, training
        self.__name__ = env_id  # what logs and errors call it

    def __call__(self, **env_kwargs: Any) -> gym.Env:
        return make_atari(self.env_id, training=self.training, **env_kwargs)


def env_source(env: Any, atari_wrappers: bool = True, *, training: bool = True) -> Any:
    """What to make envs from: ``env`` itself, or an :class:`AtariFactory` for an Atari id when
    ``atari_wrappers`` (the config field of that name) is on. Every place shoal makes an env from
    a config goes through here, so training, actors, evaluation and ``shoal eval`` agree."""
    if atari_wrappers and is_atari(env):
        return AtariFactory(env, training)
    return env


def reports_games(source: Any) -> bool:
    """Whether envs made from ``source`` report whole games in ``info`` (see :class:`GameScore`)."""
    return isinstance(source, AtariFactory)


def game_scores(infos: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(envs whose game ended, their raw scores, their lengths) from a vector env's batched
    infos, or None when the envs report no games (anything but preprocessed Atari)."""
    if "game_return" not in infos:
        return None
    mask = np.asarray(infos["_game_return"], dtype=bool)
    returns = np.asarray(infos["game_return"], dtype=np.float64)
    lengths = np.asarray(infos["game_length"], dtype=np.int64)
    return mask, returns, lengths
