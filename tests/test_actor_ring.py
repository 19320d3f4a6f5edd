"""The shared memory of decoupled actors: every trajectory reaches the learner exactly once,
and no reader ever sees a half-published weight vector."""

from __future__ import annotations

import multiprocessing as mp
import time
import zlib

import numpy as np
import pytest
import torch

from shoal.actors.actor import ActorPolicy, policy_vector
from shoal.actors.pool import ActorFailed, MpActors
from shoal.actors.shared import TrajectoryLayout, TrajectoryRing, WeightBuffer
from shoal.agent import make_config
from shoal.algos import ALGORITHMS
from shoal.training.trainer import spaces_of

CARTPOLE = TrajectoryLayout(16, 4, (4,), "<f4", (), "<i8")


def test_slots_do_not_overlap_and_seal_detects_a_change():
    ring = TrajectoryRing(CARTPOLE, num_actors=2, slots_per_actor=3, ctx=mp.get_context("spawn"))
    assert ring.owned(1) == [3, 4, 5] and ring.owner(4) == 1
    for k in range(ring.num_slots):  # every byte of every field of every slot, written once
        for name, view in ring.slot(k).items():
            view[...] = np.full(view.shape, k + 1).astype(view.dtype) if name != "valid" else True
    for k in range(ring.num_slots):
        assert (ring.slot(k)["obs"] == k + 1).all() and (ring.slot(k)["episode_length"] == k + 1).all()
    crc = ring.seal(2, version=7, actor=0, seq=5)
    assert ring.header(2) == {"version": 7, "actor": 0, "seq": 5, "crc": crc}
    assert ring.verify(2) == crc
    ring.slot(2)["rewards"][3, 1] += 1  # written after it was sent
    with pytest.raises(RuntimeError, match="CRC mismatch"):
        ring.verify(2)


def test_a_slot_sealed_in_one_ring_is_stored_and_verified_in_another():
    """How the Ray pool ships a trajectory: an actor's one-slot ring, its bytes and header
    stored into the learner's ring, whose CRC check then covers the journey."""
    ctx = mp.get_context("spawn")
    actor_ring = TrajectoryRing(CARTPOLE, num_actors=1, slots_per_actor=1, ctx=ctx)
    learner_ring = TrajectoryRing(CARTPOLE, num_actors=2, slots_per_actor=2, ctx=ctx)
    rng = np.random.default_rng(4)
    for view in actor_ring.slot(0).values():
        view[...] = rng.normal(size=view.shape).astype(view.dtype)
    crc = actor_ring.seal(0, version=3, actor=1, seq=9)
    shipped = actor_ring.raw(0).copy()
    learner_ring.store(3, shipped, version=3, actor=1, seq=9, crc=crc)
    assert learner_ring.header(3) == {"version": 3, "actor": 1, "seq": 9, "crc": crc}
    assert learner_ring.verify(3) == crc
    for name, view in actor_ring.slot(0).items():
        np.testing.assert_array_equal(learner_ring.slot(3)[name], view)
    shipped[17] ^= 1  # one bit changed on the way
    learner_ring.store(2, shipped, version=3, actor=1, seq=9, crc=crc)
    with pytest.raises(RuntimeError, match="CRC mismatch"):
        learner_ring.verify(2)


def test_weight_buffer_versions_and_guards():
    buffer = WeightBuffer(5, mp.get_context("spawn"))
    out = np.zeros(5, np.float32)
    assert buffer.version == 0 and buffer.read(out, newer_than=0) is None
    assert buffer.publish(np.arange(5)) == 1
    assert buffer.read(out, newer_than=0) == 1 and out.tolist() == [0, 1, 2, 3, 4]
    assert buffer.read(out, newer_than=1) is None
    seq, data = buffer._arrays()
    seq[0] += 1  # a writer that died mid-write: the reader waits, then says so
    with pytest.raises(TimeoutError):
        buffer.read(out, timeout=0.2)
    seq[0] += 1
    data[2] = 99  # bytes that are not the ones published (the CRC differs): never returned
    with pytest.raises(TimeoutError):
        buffer.read(out, timeout=0.2)


def _publisher(buffer: WeightBuffer, count: int) -> None:
    vector = np.empty(buffer.size, np.float32)
    for k in range(1, count + 1):
        vector.fill(k)  # version k is the constant vector k
        buffer.publish(vector)


@pytest.mark.slow
def test_a_reader_never_sees_a_torn_weight_vector():
    ctx = mp.get_context("spawn")
    buffer = WeightBuffer(1 << 20, ctx)  # 4 MB: a write takes long enough to be caught mid-way
    writer = ctx.Process(target=_publisher, args=(buffer, 3000))
    writer.start()
    out = np.empty(buffer.size, np.float32)
    seen, torn_naive, last = set(), 0, 0
    try:
        while writer.is_alive() or buffer.version > last:
            naive = np.frombuffer(buffer._data, np.float32)[: buffer.size].copy()  # no seqlock
            torn_naive += naive[0] != naive[-1]
            version = buffer.read(out, newer_than=last)
            if version is None:
                continue
            assert out[0] == version and (out == out[0]).all(), f"torn vector read as version {version}"
            assert version > last
            seen.add(version)
            last = version
    finally:
        writer.join(30)
    assert writer.exitcode == 0 and last == 3000
    assert len(seen) > 10, "the reader hardly overlapped the writer: the test proves nothing"
    print(f"{len(seen)} versions read whole; {torn_naive} naive copies were torn")


def _config(**overrides):
    values = dict(num_envs=4, rollout_length=16, num_actors=2, slots_per_actor=2, seed=3)
    return make_config("appo", "CartPole-v1", {**values, **overrides}, presets=False)


@pytest.mark.slow
def test_two_actors_every_trajectory_exactly_once():
    """Real actor processes on CartPole; the learner reads slowly (the actors wait for slots)
    and publishes new weights meanwhile. Counts, sequence numbers and CRCs all agree."""
    config = _config()
    obs_space, action_space = spaces_of(config.env)
    net = ALGORITHMS["appo"].actor_network(config, obs_space, action_space)
    normalizer = ALGORITHMS["appo"](config, obs_space, action_space, torch.device("cpu")).normalizer
    layout = TrajectoryLayout(16, 4, (4,), "<f4", (), "<i8")
    pool = MpActors(
        "appo", config, layout, len(policy_vector(net, normalizer)), num_actors=2, slots_per_actor=2
    )
    pool.publish(policy_vector(net, normalizer))
    pool.start()
    seqs: dict[int, list[int]] = {0: [], 1: []}
    content_crc = {0: 0, 1: 0}
    rng = np.random.default_rng(0)
    try:
        deadline = time.monotonic() + 120
        while min(len(s) for s in seqs.values()) < 25:
            assert time.monotonic() < deadline, f"only {seqs} arrived"
            for slot in pool.receive(0.1):
                header, arrays = pool.ring.header(slot), pool.ring.slot(slot)
                assert header["actor"] == pool.ring.owner(slot)
                seqs[header["actor"]].append(header["seq"])
                copied = {k: v.copy() for k, v in arrays.items()}
                content_crc[header["actor"]] ^= zlib.crc32(copied["obs"]) ^ header["seq"]
                assert copied["valid"].any() and np.isfinite(copied["logprobs"]).all()
                time.sleep(float(rng.uniform(0, 0.02)))  # a slow learner: actors block on free slots
                pool.release(slot)
            if sum(map(len, seqs.values())) % 10 == 0:
                pool.publish(policy_vector(net, normalizer))
    finally:
        produced = pool.close()
    # Slots sent but not read by the loop above were read by close(): counted, CRC-checked.
    assert produced.consistent, produced
    for actor, got in seqs.items():
        assert got == list(range(len(got))), f"actor {actor}: out of order, lost or twice: {got}"
        assert produced.sent[actor] >= len(got)
    assert sum(produced.received) == sum(produced.sent)


def test_actor_policy_acts_as_the_learner_after_loading_its_vector():
    config = _config(normalize_obs=True)
    obs_space, action_space = spaces_of(config.env)
    algo = ALGORITHMS["appo"](config, obs_space, action_space, torch.device("cpu"))
    algo.normalizer.observe(np.random.default_rng(1).normal(3.0, 2.0, (64, 4)))
    algo.normalizer.merge([algo.normalizer.take_fresh()])
    torch.manual_seed(5)
    copy = ActorPolicy(
        ALGORITHMS["appo"].actor_network(config, obs_space, action_space), action_space, True, 10.0
    )
    copy.load(policy_vector(algo.net, algo.normalizer))
    obs = np.random.default_rng(2).normal(3.0, 2.0, (8, 4)).astype(np.float32)
    _, actions, logprobs = copy.act(obs)
    learner_logprobs, _, _ = algo.net.evaluate(algo._obs(obs), torch.as_tensor(actions))
    np.testing.assert_allclose(logprobs, learner_logprobs.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_an_actor_that_raises_fails_the_learner_in_one_line():
    """An actor's exception reaches the learner's next receive as one line (here: a weight
    vector too short for its network); closing then leaves no process behind."""
    config = _config()
    obs_space, action_space = spaces_of(config.env)
    size = sum(
        p.numel() for p in ALGORITHMS["appo"].actor_network(config, obs_space, action_space).parameters()
    )
    pool = MpActors("appo", config, CARTPOLE, size - 1, num_actors=2, slots_per_actor=1)
    pool.publish(np.zeros(size - 1, np.float32))
    pool.start()
    try:
        with pytest.raises(ActorFailed, match=r"^actor [01] raised RuntimeError: "):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                pool.receive(0.1)
    finally:
        pool.close()


def test_a_pool_whose_second_actor_cannot_start_closes_the_first_and_raises_the_cause(monkeypatch):
    """An OSError starting actor 1 (no memory, a process limit) is what the caller sees;
    closing the pool then ends actor 0 and skips the actor that never started."""
    config = _config()
    obs_space, action_space = spaces_of(config.env)
    size = sum(
        p.numel() for p in ALGORITHMS["appo"].actor_network(config, obs_space, action_space).parameters()
    )
    pool = MpActors("appo", config, CARTPOLE, size, num_actors=2, slots_per_actor=1)
    pool.publish(np.zeros(size, np.float32))
    real = type(pool.ctx.Process(target=print)).start
    started: list[object] = []

    def start(proc: object) -> None:
        if started:
            raise OSError(11, "Resource temporarily unavailable")
        started.append(proc)
        real(proc)

    monkeypatch.setattr(type(pool.ctx.Process(target=print)), "start", start)
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        pool.start()
    pool.close()
    assert not started[0].is_alive()
