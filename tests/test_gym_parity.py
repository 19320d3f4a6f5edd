"""ProcessVectorEnv next to gymnasium's AsyncVectorEnv: the same calls give the same results.

Each scenario is run on both classes; every call's result, or the type of the exception it
raised, is recorded and the two records must be equal. A user swapping the import should
see no difference (other than speed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from envs import FailingEnv, SpaceEnv, TextEnv, fns
from gymnasium import spaces
from gymnasium.vector import AsyncVectorEnv, AutoresetMode
from test_process_vector_env import assert_same

from shoal.envs import ProcessVectorEnv

pytestmark = pytest.mark.timeout(120)


class SlowEnv(SpaceEnv):
    """Steps, resets and naps as slowly as asked."""

    def __init__(self, reset_sleep: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reset_sleep = reset_sleep

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        time.sleep(self.reset_sleep)
        return super().reset(**kwargs)

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


class BigFrameEnv(SpaceEnv):
    def render(self) -> np.ndarray:
        return np.full((400, 600, 3), self.t, dtype=np.uint8)


class Point(spaces.Space):
    """A space gymnasium knows nothing about (no shared memory, no batching)."""

    def __init__(self) -> None:
        super().__init__()

    def sample(self, mask: Any = None, probability: Any = None) -> tuple[int, int]:
        return (int(self.np_random.integers(9)), int(self.np_random.integers(9)))

    def contains(self, x: Any) -> bool:
        return isinstance(x, tuple) and len(x) == 2

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Point)


DYNAMIC: dict[str, Callable[[], spaces.Space]] = {
    "sequence": lambda: spaces.Sequence(spaces.Discrete(4)),
    "graph": lambda: spaces.Graph(spaces.Box(0, 1, (2,)), spaces.Discrete(3)),
    "text": lambda: spaces.Text(max_length=5),
    "oneof": lambda: spaces.OneOf((spaces.Discrete(3), spaces.Box(0, 1, (2,)))),
    "custom": Point,
}


class DynamicEnv(SpaceEnv):
    def __init__(self, kind: str = "sequence", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.observation_space = DYNAMIC[kind]()


class Recorder:
    """Runs calls, keeping ("ok", result) or ("raised", exception type) for each."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the type is the result
            self.log.append(("raised", type(exc)))
            return None
        self.log.append(("ok", out))
        return out


Script = Callable[[gym.vector.VectorEnv, Recorder], None]


def run(cls: type, env_fns: list, script: Script, **kwargs: Any) -> list[tuple[str, Any]]:
    rec = Recorder()
    env = rec(cls, env_fns, **kwargs)
    if env is not None:
        try:
            script(env, rec)
        finally:
            env.close(terminate=True)
    return rec.log


def assert_parity(env_fns: list, script: Script, **kwargs: Any) -> None:
    ours = run(lambda *a, **k: ProcessVectorEnv(*a, num_workers=2, **k), env_fns, script, **kwargs)
    theirs = run(AsyncVectorEnv, env_fns, script, **kwargs)
    assert [kind for kind, _ in ours] == [kind for kind, _ in theirs], f"{ours}\n!=\n{theirs}"
    for n, ((kind, got), (_, want)) in enumerate(zip(ours, theirs)):
        if kind == "raised":
            assert got is want, f"call {n}: {got.__name__} raised, gymnasium raises {want.__name__}"
        elif n > 0:  # call 0 makes the vector env
            assert_same(got, want, f"call {n}")


ZEROS = np.zeros(3, dtype=np.int64)


# -- scenarios ------------------------------------------------------------------------------


def out_of_order(env: Any, rec: Recorder) -> None:
    rec(env.step_wait)
    rec(env.reset_wait)
    rec(env.call_wait)
    env.reset_async(seed=0)
    rec(env.step_async, ZEROS)
    rec(env.reset_async)
    rec(env.call_async, "double", 1)
    rec(env.set_attr, "label", "x")
    rec(env.step_wait)
    rec(env.call_wait)
    rec(env.reset_wait)
    env.step_async(ZEROS)
    rec(env.reset_wait)
    rec(env.step_async, ZEROS)
    rec(env.step_wait)
    env.call_async("double", 2)
    rec(env.step_async, ZEROS)
    rec(env.call_wait)
    rec(env.call_wait)


def timed_out(call: str) -> Script:
    """A wait that times out, then the same wait again: nothing is pending any more.

    Only one timeout per env: gymnasium leaves the late replies in its pipes, and the next
    call reads them instead of its own.
    """

    def script(env: Any, rec: Recorder) -> None:
        if call != "reset":
            env.reset(seed=0)
        if call == "step":
            env.step_async(ZEROS)
        elif call == "reset":
            env.reset_async(seed=0)
        else:
            env.call_async("nap", 0.5)
        wait = getattr(env, f"{call}_wait")
        rec(wait, timeout=0.05)
        rec(wait)

    return script


def error_in_step(env: Any, rec: Recorder) -> None:
    env.reset(seed=0)
    rec(env.step, ZEROS)
    rec(env.step, ZEROS)


def error_in_reset(env: Any, rec: Recorder) -> None:
    rec(env.reset, seed=0)


def error_calling(name: str, *args: Any, **kwargs: Any) -> Script:
    def script(env: Any, rec: Recorder) -> None:
        env.reset(seed=0)
        rec(env.call, name, *args, **kwargs)

    script.__name__ = f"error_calling_{name}"
    return script


def error_setting(env: Any, rec: Recorder) -> None:
    rec(env.set_attr, "unwrapped", 1)


def calls_and_attributes(env: Any, rec: Recorder) -> None:
    rec(env.reset, seed=5)
    rec(lambda: env.np_random_seed)
    rec(env.step, np.array([0, 1, 2]))
    rec(env.call, "double", 5)
    rec(env.call, "double", x=2)
    rec(env.get_attr, "max_len")
    rec(env.set_attr, "label", "same")
    rec(env.get_attr, "label")
    rec(env.set_attr, "label", ["a", "b", "c"])
    rec(env.set_attr, "label", ("d", "e", "f"))
    rec(env.get_attr, "label")
    rec(env.set_attr, "label", ["a"])
    rec(env.render)
    rec(lambda: (env.num_envs, env.render_mode, env.metadata["autoreset_mode"]))
    rec(lambda: (env.observation_space, env.single_observation_space))
    rec(lambda: (env.action_space, env.single_action_space))


def reset_arguments(env: Any, rec: Recorder) -> None:
    rec(env.reset, seed=[1, 2, 3])
    rec(env.reset, seed=[1, 2])
    rec(env.reset, seed=7, options={"note": 3})
    rec(env.reset, options={"reset_mask": [True, False, True]})
    rec(env.reset, options={"reset_mask": np.ones(2, dtype=bool)})
    rec(env.reset, options={"reset_mask": np.ones(3, dtype=np.int64)})
    rec(env.reset, options={"reset_mask": np.zeros(3, dtype=bool)})
    rec(env.reset, seed=[4, 5, 6], options={"reset_mask": np.array([True, False, True]), "note": 1})


def bad_action(actions: Any) -> Script:
    """One misuse per env: after it, gymnasium's env is left with some steps pending."""

    def script(env: Any, rec: Recorder) -> None:
        env.reset(seed=0)
        rec(env.step, actions)

    return script


def after_close(env: Any, rec: Recorder) -> None:
    env.reset(seed=0)
    env.step_async(ZEROS)
    rec(env.close, timeout=5)  # waits for the pending step
    rec(env.close)
    for call in (
        lambda: env.reset(seed=0),
        lambda: env.reset_async(),
        lambda: env.reset_wait(),
        lambda: env.step(ZEROS),
        lambda: env.step_async(ZEROS),
        lambda: env.step_wait(),
        lambda: env.call("double", 1),
        lambda: env.call_async("double", 1),
        lambda: env.call_wait(),
        lambda: env.get_attr("label"),
        lambda: env.set_attr("label", "x"),
        lambda: env.render(),
    ):
        rec(call)


def episodes(steps: int = 30, seed: int = 3) -> Script:
    """Reset, then step with seeded random actions; in DISABLED mode, reset the ended envs."""

    def script(env: Any, rec: Recorder) -> None:
        rec(env.reset, seed=seed)
        env.action_space.seed(seed)
        for _ in range(steps):
            out = rec(env.step, env.action_space.sample())
            if out is None:
                return
            done = out[2] | out[3]
            if env.autoreset_mode is AutoresetMode.DISABLED and done.any():
                rec(env.step, env.action_space.sample())  # an ended env, stepped anyway
                rec(env.reset, options={"reset_mask": done})

    return script


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [out_of_order, calls_and_attributes, reset_arguments, after_close])
def test_api_and_misuse(script):
    assert_parity(fns(3, render_mode="rgb_array"), script)


@pytest.mark.parametrize(
    "actions",
    [np.zeros(2, np.int64), np.zeros(4, np.int64), [0, 1, 2], 0, np.zeros((3, 1), np.int64)],
    ids=["too-few", "too-many", "list", "scalar", "extra-dim"],
)
def test_bad_actions(actions):
    assert_parity(fns(3), bad_action(actions))


@pytest.mark.parametrize("call", ["step", "reset", "call"])
def test_timeouts(call):
    slow = 0.5 if call == "step" else 0.0
    env_fns = [lambda: SlowEnv(step_sleep=slow, reset_sleep=0.5 if call == "reset" else 0.0)] * 3
    assert_parity(env_fns, timed_out(call))


@pytest.mark.parametrize(
    "env_fns, script",
    [
        (fns(2) + [lambda: FailingEnv(fail_at=2)], error_in_step),
        (fns(2) + [lambda: FailingEnv(fail_in_reset=True)], error_in_reset),
        (fns(3), error_calling("missing_method")),
        (fns(3), error_calling("step", 0)),
        (fns(3), error_calling("close")),
        (fns(3), error_calling("double", 1, 2, 3)),
        (fns(3), error_setting),
    ],
    ids=["step", "reset", "missing", "reserved-step", "reserved-close", "bad-args", "set_attr"],
)
def test_sub_env_errors(env_fns, script):
    assert_parity(env_fns, script)


@pytest.mark.parametrize("shared_memory", [True, False])
@pytest.mark.parametrize("mode", list(AutoresetMode))
@pytest.mark.parametrize("obs_space", ["box_f32", "dict", "tuple", "discrete"])
def test_autoreset_modes(obs_space, mode, shared_memory):
    env_fns = fns(3, obs_space=obs_space, action_space="tuple")
    assert_parity(env_fns, episodes(), autoreset_mode=mode, shared_memory=shared_memory)


@pytest.mark.parametrize("shared_memory", [True, False])
@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
@pytest.mark.parametrize("kind", sorted(DYNAMIC))
def test_custom_and_dynamic_shape_spaces(kind, mode, shared_memory):
    env_fns = [lambda: DynamicEnv(kind)] * 3
    assert_parity(env_fns, episodes(steps=12), autoreset_mode=mode, shared_memory=shared_memory)


def test_sequence_observations_without_shared_memory():
    assert_parity(fns(3, cls=TextEnv), episodes(steps=12), shared_memory=False)


@pytest.mark.parametrize(
    "env_fns, kwargs",
    [
        (fns(3), {"max_concurrency": 0}),
        (fns(3), {"max_concurrency": "2"}),
        (fns(3), {"max_concurrency": 2}),
        (fns(3), {"observation_mode": "bogus"}),
        (fns(3), {"observation_mode": (1, 2)}),
        (fns(3), {"autoreset_mode": "bogus"}),
        (fns(3), {"autoreset_mode": "SameStep"}),
        ([lambda: SpaceEnv(obs_space="box_f32"), lambda: SpaceEnv(obs_space="discrete")], {}),
        ([lambda: SpaceEnv(action_space="discrete"), lambda: SpaceEnv(action_space="box")], {}),
        (
            [lambda: SpaceEnv(obs_space="box_f32"), lambda: SpaceEnv(obs_space="box_i16")],
            {"observation_mode": "different"},
        ),
    ],
    ids=[
        "concurrency-0",
        "concurrency-str",
        "concurrency-2",
        "obs-mode",
        "obs-mode-tuple",
        "autoreset-bogus",
        "autoreset-str",
        "obs-mismatch",
        "action-mismatch",
        "different-mismatch",
    ],
)
def test_construction(env_fns, kwargs):
    assert_parity(env_fns, lambda env, rec: rec(env.reset, seed=0), **kwargs)


@pytest.mark.parametrize("shared_memory", [True, False])
def test_render_large_frames(shared_memory):
    def script(env: Any, rec: Recorder) -> None:
        env.reset(seed=0)
        env.step(np.zeros(3, dtype=np.int64))
        rec(env.render)

    assert_parity([lambda: BigFrameEnv(render_mode="rgb_array")] * 3, script, shared_memory=shared_memory)


def test_render_cartpole_rgb_array():
    pytest.importorskip("pygame")

    def script(env: Any, rec: Recorder) -> None:
        env.reset(seed=0)
        rec(env.render)

    assert_parity([lambda: gym.make("CartPole-v1", render_mode="rgb_array")] * 3, script)
