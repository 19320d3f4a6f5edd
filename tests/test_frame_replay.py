"""FrameReplayBuffer stores each frame once yet samples exactly what ReplayBuffer samples."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from shoal.buffers import FrameReplayBuffer, ReplayBuffer, make_replay

K, FRAME = 4, (3, 4)  # tiny frames of few values: many frames repeat by chance, as in Atari


class Stream:
    """Vector-env steps of stacked frames, made as FrameStackObservation and gymnasium's
    next-step autoreset make them: each step shifts one new frame in; after an episode ends
    one invalid step returns a fresh stack (the reset frame k times)."""

    def __init__(self, num_envs: int, episode_end: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.num_envs, self.episode_end = num_envs, episode_end
        self.obs = np.stack([self.fresh() for _ in range(num_envs)])
        self.ended = np.zeros(num_envs, dtype=bool)

    def frame(self) -> np.ndarray:
        return self.rng.integers(0, 3, FRAME, dtype=np.uint8)

    def fresh(self) -> np.ndarray:
        return np.repeat(self.frame()[None], K, axis=0)

    def step(self, paused: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """One step of every env; ``paused`` envs stand still (an invalid step, as autoreset's)."""
        n = self.num_envs
        paused = np.zeros(n, dtype=bool) if paused is None else paused
        valid = ~self.ended & ~paused
        end = self.rng.random(n) < self.episode_end
        terminated = valid & end & (self.rng.random(n) < 0.5)
        truncated = valid & end & ~terminated
        next_obs = np.stack(
            [
                self.obs[e]
                if paused[e]
                else self.fresh()
                if self.ended[e]
                else np.concatenate([self.obs[e, 1:], self.frame()[None]])
                for e in range(n)
            ]
        )
        rewards = np.where(valid, self.rng.normal(size=n), 0.0).astype(np.float32)
        actions = self.rng.integers(0, 6, n)
        step = (self.obs, actions, rewards, next_obs, terminated, truncated, valid)
        self.obs, self.ended = next_obs, (terminated | truncated) | (self.ended & paused)
        return step

    def jump(self, e: int, how: int) -> None:
        """The trainer starts a new episode without the env ending one (a cut episode): a fresh
        stack, the same stack but its first frame, or the stack one unseen step later."""
        self.obs = self.obs.copy()
        if how == 0:
            self.obs[e] = self.fresh()
        elif how == 1:
            self.obs[e, 0] = 3  # a value no frame has
        else:
            self.obs[e] = np.concatenate([self.obs[e, 1:], self.frame()[None]])
        self.ended[e] = False


def buffers(capacity: int, num_envs: int, n_step: int) -> tuple[ReplayBuffer, FrameReplayBuffer]:
    args = (capacity, num_envs, (K, *FRAME), np.uint8, (), np.int64, n_step, 0.9)
    return ReplayBuffer(*args), FrameReplayBuffer(*args)


def assert_same_samples(plain: ReplayBuffer, frames: FrameReplayBuffer, rng: np.random.Generator) -> None:
    assert (frames.size, frames.pos) == (plain.size, plain.pos)
    if plain.size == 0:
        return
    twin = copy.deepcopy(rng)
    expected, got = plain.sample(64, rng), frames.sample(64, twin)
    for a, b in zip(expected, got):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    # every stored transition, not only a sample
    np.testing.assert_array_equal(frames.frames[frames.obs_frames[: plain.size]], plain.obs[: plain.size])
    np.testing.assert_array_equal(
        frames.frames[frames.next_frames[: plain.size]], plain.next_obs[: plain.size]
    )


def restored(
    plain: ReplayBuffer, frames: FrameReplayBuffer, capacity: int, num_envs: int, n_step: int
) -> tuple[ReplayBuffer, FrameReplayBuffer]:
    """Both buffers saved and loaded into fresh ones (as a checkpoint and --resume do)."""
    plain.clear_pending()
    frames.clear_pending()
    fresh_plain, fresh_frames = buffers(capacity, num_envs, n_step)
    fresh_plain.load(*plain.state())
    arrays, meta = frames.state()
    used = np.unique(np.concatenate([frames.obs_frames[: frames.size], frames.next_frames[: frames.size]]))
    assert len(arrays["frames"]) == len(used)  # only the frames still in use are saved
    assert all(a.dtype != object for a in arrays.values())
    fresh_frames.load(arrays, meta)
    return fresh_plain, fresh_frames


@pytest.mark.parametrize("tight", [False, True])
@pytest.mark.parametrize("n_step", [1, 3])
@pytest.mark.parametrize("episode_end", [0.005, 0.3])  # long episodes: the ring wraps; short: it grows
def test_frame_replay_samples_exactly_what_replay_samples(n_step, episode_end, tight, monkeypatch, caplog):
    if tight:  # no reserve: the store grows to exactly what is in use, and is always full
        monkeypatch.setattr(
            FrameReplayBuffer, "frames_for", staticmethod(lambda c, n, k, s: n * k * (s + 1) + k)
        )
    capacity, num_envs = (37, 3) if not tight else (23, 2)
    stream, rng = Stream(num_envs, episode_end, seed=n_step), np.random.default_rng(0)
    plain, frames = buffers(capacity, num_envs, n_step)
    wraps, growths, head, slots = 0, 0, frames.head, len(frames.frames)
    for t in range(1500):
        if t % 97 == 50:  # a cut episode: partial n-step transitions dropped, a new start
            e = t % num_envs
            stream.jump(e, how=t % 3)
            cut = np.arange(num_envs) == e
            plain.clear_pending(cut)
            frames.clear_pending(cut)
        paused = np.arange(num_envs) == 1 if t % 500 in range(200, 300) else None  # long-pinned frames
        step = stream.step(paused)
        before = len(frames.frames)
        plain.add(*step)
        frames.add(*step)
        growths += len(frames.frames) > before
        assert_same_samples(plain, frames, rng)
        wraps += frames.head < head
        head = frames.head
        if t == 399 and episode_end < 0.1 and not tight:  # long episodes: frames reclaimed, none added
            assert len(frames.frames) == FrameReplayBuffer.frames_for(capacity, num_envs, K, n_step)
        if t % 400 == 399:
            plain, frames = restored(plain, frames, capacity, num_envs, n_step)
            assert_same_samples(plain, frames, rng)
            head, slots = frames.head, len(frames.frames)
    assert plain.size == capacity
    assert wraps >= 5  # the frame ring was overwritten many times over
    # Frames are reclaimed: about one per transition, up to k + 1 when episodes last one step.
    if episode_end < 0.1 and not tight:  # no growth since the start or the last load
        assert len(frames.frames) == slots
    assert len(frames.frames) <= 9 / 8 * ((K + 1) * capacity + frames.pinned_max) + K
    assert (frames.pins >= 0).all()
    assert frames.pins.sum() <= frames.pinned_max
    # Growth is memory the start-up check did not count: each one says so.
    grew = [r.getMessage() for r in caplog.records if "frame store grew" in r.getMessage()]
    assert len(grew) >= growths and (growths > 0) == (len(grew) > 0)
    if episode_end < 0.1 and not tight:
        assert growths == 0
    for message in grew:
        assert re.fullmatch(
            r"the replay's frame store grew to [\d,]+ frames \(\d+\.\d\d GB; the start-up memory check"
            r" counted \d+\.\d\d GB\): episodes here average under ~32 steps",
            message,
        ), message


def test_frames_are_shared_only_when_the_data_says_so():
    """A reset stack is stored whole, a shifted stack adds one frame, a repeated one none."""
    plain, frames = buffers(10, 1, 1)
    stream = Stream(1, 0.0, seed=1)
    first = stream.step()
    frames.add(*first)
    plain.add(*first)
    assert frames.head == K + 1  # the first stack whole, then one new frame
    frames.add(*stream.step())
    assert frames.head == K + 2  # obs was the last next_obs: nothing new; next_obs one frame
    obs, actions, rewards, next_obs, terminated, truncated, valid = stream.step()
    looks_shifted = next_obs.copy()
    looks_shifted[0, 0] = 255 - looks_shifted[0, 0]  # a different frame where the shared ones go
    frames.add(obs, actions, rewards, looks_shifted, terminated, truncated, valid)
    assert frames.head == 2 * K + 2  # not a shift of obs: stored whole
    np.testing.assert_array_equal(frames.frames[frames.next_frames[2]], looks_shifted[0])


def test_make_replay_chooses_frames_only_for_stacked_uint8_frames():
    args = ((), np.int64, 1, 0.99)
    assert isinstance(make_replay(8, 1, (4, 84, 84), np.uint8, *args), FrameReplayBuffer)
    assert type(make_replay(8, 1, (4, 84, 84), np.float32, *args)) is ReplayBuffer
    assert type(make_replay(8, 1, (84, 84, 3), np.uint8, *args)) is ReplayBuffer  # an RGB image
    assert type(make_replay(8, 1, (1, 84, 84), np.uint8, *args)) is ReplayBuffer  # nothing to share
    assert type(make_replay(8, 1, (4,), np.float32, *args)) is ReplayBuffer


def test_a_replay_buffer_checkpoint_loads_into_a_frame_replay_buffer():
    """A run saved before FrameReplayBuffer (whole stacks) resumes with the same transitions."""
    plain, frames = buffers(20, 2, 1)
    stream, rng = Stream(2, 0.1, seed=3), np.random.default_rng(1)
    for _ in range(30):
        plain.add(*stream.step())
    frames.load(*plain.state())
    assert_same_samples(plain, frames, rng)
    for _ in range(60):
        step = stream.step()
        plain.add(*step)
        frames.add(*step)
        assert_same_samples(plain, frames, rng)


@pytest.mark.parametrize("num_envs, n_step", [(1, 1), (8, 3)])
def test_nbytes_is_what_a_new_buffer_allocates(num_envs, n_step):
    """What the start-up memory check counts (DQNConfig.memory_needed)."""
    buf = FrameReplayBuffer(1000, num_envs, (4, 84, 84), np.uint8, (), np.int64, n_step, 0.99)
    allocated = sum(a.nbytes for a in vars(buf).values() if isinstance(a, np.ndarray))
    assert allocated == FrameReplayBuffer.nbytes(1000, num_envs, (4, 84, 84), 8, n_step)


@pytest.mark.parametrize("cls", [0, 1])
def test_a_replay_state_bigger_than_the_buffer_is_refused_in_one_line(cls):
    """A checkpoint whose replay outgrew this buffer (saved when each worker of a group kept a
    whole buffer_size) is refused with a message, not a numpy broadcast error."""
    stream = Stream(2, 0.3, seed=0)
    big, small = buffers(40, 2, 1)[cls], buffers(20, 2, 1)[cls]
    for _ in range(30):
        big.add(*stream.step())
    assert big.size > 20
    with pytest.raises(ValueError, match="holds .* more than this one's capacity of 20") as error:
        small.load(*big.state())
    assert "\n" not in str(error.value)
