"""The parameter server's wire format, algorithms with several optimizers on every strategy,
hung peers, and what importing an algorithm costs."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from shoal.distributed import wire
from shoal.distributed.compress import Compressor

# -- the byte layout --------------------------------------------------------------------------


def test_push_layout_is_fixed_and_documented():
    payload = (torch.arange(3, dtype=torch.float32),)
    push = wire.Push(optimizer=2, version=7, samples=5.0, lr=0.25, worker_sps=100.0, payload=payload)
    raw = wire.encode(push)
    assert raw.dtype == torch.uint8 and raw.numel() == 48 + 12
    b = raw.numpy().tobytes()
    assert b[:8] == (1).to_bytes(2, "little") + (2).to_bytes(2, "little") + (2).to_bytes(4, "little")
    assert np.frombuffer(b[8:16], "<i8")[0] == 7
    assert list(np.frombuffer(b[16:40], "<f8")) == [5.0, 0.25, 100.0]
    assert np.frombuffer(b[40:48], "<i8")[0] == 0  # no statistics
    assert list(np.frombuffer(b[48:], "<f4")) == [0.0, 1.0, 2.0]
    got = wire.decode(raw, [(torch.zeros(1),), (torch.zeros(1),), payload])
    assert isinstance(got, wire.Push)
    assert (got.optimizer, got.version, got.samples, got.lr, got.worker_sps) == (2, 7, 5.0, 0.25, 100.0)
    assert torch.equal(got.payload[0], payload[0])
    # With normalisation the worker's new statistics (float64) come between header and payload.
    stats = torch.tensor([3.0, 0.5, 1.25], dtype=torch.float64)
    raw = wire.encode(wire.Push(2, 7, 5.0, 0.25, 100.0, payload, stats))
    b = raw.numpy().tobytes()
    assert raw.numel() == 48 + 24 + 12 and np.frombuffer(b[40:48], "<i8")[0] == 3
    assert list(np.frombuffer(b[48:72], "<f8")) == [3.0, 0.5, 1.25]
    got = wire.decode(raw, [(torch.zeros(1),), (torch.zeros(1),), payload])
    assert torch.equal(got.stats, stats) and torch.equal(got.payload[0], payload[0])


@pytest.mark.parametrize("mode", ["none", "fp16", "topk"])
def test_every_message_decodes_to_what_was_encoded(mode):
    codec = Compressor(mode, 50, ratio=0.1)
    payload = codec.compress(torch.randn(50))
    reply = wire.Reply(0, 9, False, 3, 4, [1.5, 2.5, 3.5], payload)
    got = wire.decode(wire.encode(reply), [codec.empty()])
    assert (got.optimizer, got.version, got.accepted, got.lag, got.dropped) == (0, 9, False, 3, 4)
    assert got.worker_sps == [1.5, 2.5, 3.5]
    assert all(torch.equal(a, b) for a, b in zip(got.payload, payload))
    assert wire.encode(reply).numel() == wire.reply_size(codec.empty(), 3)
    weights = torch.randn(11)
    assert torch.equal(wire.decode(wire.encode(wire.Weights(weights))).weights, weights)
    assert wire.encode(wire.Weights(weights)).numel() == wire.weights_size(11)
    stats = torch.randn(7, dtype=torch.float64)
    with_stats = wire.decode(wire.encode(wire.Weights(weights, stats)))
    assert torch.equal(with_stats.weights, weights) and torch.equal(with_stats.stats, stats)
    assert wire.encode(wire.Weights(weights, stats)).numel() == wire.weights_size(11, 7)
    reply = wire.Reply(0, 9, False, 3, 4, [1.5, 2.5, 3.5], payload, stats)
    got = wire.decode(wire.encode(reply), [codec.empty()])
    assert torch.equal(got.stats, stats) and all(torch.equal(a, b) for a, b in zip(got.payload, payload))
    assert wire.encode(reply).numel() == wire.reply_size(codec.empty(), 3, 7)
    assert isinstance(wire.decode(wire.encode(wire.Done())), wire.Done)
    assert isinstance(wire.decode(wire.encode(wire.Waiting())), wire.Waiting)
    # A short message read from a longer buffer (the server's, sized for the largest push).
    big = torch.zeros(wire.push_size([codec.empty(), (torch.zeros(500),)]), dtype=torch.uint8)
    push = wire.encode(wire.Push(0, 1, 2.0, 0.1, 0.0, payload))
    big[: push.numel()] = push
    assert all(torch.equal(a, b) for a, b in zip(wire.decode(big, [codec.empty()]).payload, payload))


def test_a_message_in_another_format_is_refused_not_misread():
    raw = wire.encode(wire.Done())
    raw[2] = 99  # the format field
    with pytest.raises(ValueError, match="wire format 99"):
        wire.decode(raw)


# -- gloo delivers a shorter message into a longer buffer (the wire relies on it) -------------


def _short_into_long(rank: int, store: str, results) -> None:
    from shoal.distributed.link import SERVER, WORKER, Link, announce, open_store

    opened = open_store(f"file://{store}", host=rank == SERVER)
    if rank == WORKER:
        announce(opened, 0, 0)
    link = Link(opened, 0, 0, rank)
    if rank == WORKER:
        link.send(torch.arange(10, dtype=torch.uint8), timeout=30)
        results.put((rank, None))
    else:
        buffer = torch.zeros(100, dtype=torch.uint8)
        link.recv(buffer, timeout=30)
        results.put((rank, buffer[:12].tolist()))
    os._exit(0)


def spawn(target, *args) -> tuple[list, object]:
    """``target(*a, results)`` in a spawned process for each ``a`` in ``args``."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=target, args=(*a, results)) for a in args]
    for p in procs:
        p.start()
    return procs, results


def collect(procs: list, results, timeout: float = 120.0) -> dict:
    """One result per process, by key; a process that fails stops the others and the test."""
    got: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < len(procs):
            while not results.empty():
                key, value = results.get()
                got[key] = value
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not failed and time.monotonic() < deadline, f"exit codes {[p.exitcode for p in procs]}"
            time.sleep(0.05)
    finally:
        for p in procs:
            p.join(30 if len(got) == len(procs) else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return got


@pytest.mark.timeout(120)
def test_gloo_delivers_a_short_message_into_a_longer_buffer(tmp_path):
    store = str(tmp_path / "store")
    procs, results = spawn(_short_into_long, (0, store), (1, store))
    assert collect(procs, results)[0] == [*range(10), 0, 0]


# -- several optimizers, on every strategy -----------------------------------------------------

SIZES = (8, 3)  # Linear(3, 2) and Linear(2, 1): the pushes differ in size
LRS = (1.0, 0.5)


def _nets(seed: int) -> tuple[list[torch.nn.Module], list[torch.optim.Optimizer]]:
    """A toy algorithm: two nets, each with its own optimizer (like an actor and a critic)."""
    torch.manual_seed(seed)
    nets = [torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)]
    return nets, [torch.optim.SGD(net.parameters(), lr=lr) for net, lr in zip(nets, LRS)]


def _grads(rank: int) -> list[np.ndarray]:
    rng = np.random.default_rng(10 + rank)
    return [rng.normal(size=n).astype(np.float32) for n in SIZES]


def _set_grads(net: torch.nn.Module, flat: np.ndarray) -> None:
    offset = 0
    for p in net.parameters():
        p.grad = torch.as_tensor(flat[offset : offset + p.numel()]).view_as(p).clone()
        offset += p.numel()


def _flat(nets) -> list[list[float]]:
    return [torch.nn.utils.parameters_to_vector(net.parameters()).detach().tolist() for net in nets]


def _two_optimizer_rank(rank: int, store: str, mode: str, pipelined: bool, samples: list, results) -> None:
    """Ranks 0 and 1: one step of each optimizer with known gradients; rank 2: the server."""
    from shoal.distributed.link import WORKER, Link, announce, open_store
    from shoal.distributed.server import ParameterServer
    from shoal.distributed.strategy import ServerStrategy

    torch.set_num_threads(1)
    if rank == 2:
        nets, optimizers = _nets(0)
        stats = ParameterServer(optimizers, 2, mode).serve(open_store(f"file://{store}", host=True))
        results.put((rank, {"stats": stats, "weights": _flat(nets)}))
        os._exit(0)
    nets, optimizers = _nets(rank + 1)  # the server's greeting overwrites these
    opened = open_store(f"file://{store}", host=False)
    announce(opened, rank, 0)
    strategy = ServerStrategy(rank, 2, pipelined=pipelined, link=Link(opened, rank, 0, WORKER))
    strategy.start({"actor": nets[0], "critic": nets[1]}, {"actor": optimizers[0], "critic": optimizers[1]})
    for net, optimizer, grad in zip(nets, optimizers, _grads(rank)):
        _set_grads(net, grad)
        strategy.reduce_gradients(list(net.parameters()), samples=samples[rank])
        strategy.step(optimizer)
    strategy.finish()
    results.put((rank, {"weights": _flat(nets), "versions": strategy.versions}))
    os._exit(0)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["async", "sync", "pipelined"])
def test_parameter_server_steps_each_optimizer_of_the_algorithm(mode, tmp_path):
    store = str(tmp_path / "store")
    samples = [1, 3]
    server_mode = "async" if mode == "pipelined" else mode
    procs, results = spawn(
        _two_optimizer_rank, *[(r, store, server_mode, mode == "pipelined", samples) for r in range(3)]
    )
    got = collect(procs, results)
    start = [np.array(w) for w in _flat(_nets(0)[0])]
    g = [_grads(0), _grads(1)]
    if mode == "sync":  # one round per optimizer: the sample-weighted mean, once
        expected = [start[i] - LRS[i] * (g[0][i] * 1 + g[1][i] * 3) / 4 for i in range(2)]
        assert got[2]["stats"]["version"] == 2
    else:  # each push applied on its own, to its optimizer's weights only
        expected = [start[i] - LRS[i] * (g[0][i] + g[1][i]) for i in range(2)]
        assert got[2]["stats"]["version"] == 4
    assert got[2]["stats"]["pushes"] == 4
    for i in range(2):
        np.testing.assert_allclose(got[2]["weights"][i], expected[i], atol=1e-6)
    np.testing.assert_allclose(got[0]["weights"][0], expected[0], atol=1e-6)  # the chief: the final model
    np.testing.assert_allclose(got[0]["weights"][1], expected[1], atol=1e-6)
    if mode == "sync":
        assert got[0]["versions"] == got[1]["versions"] == [1, 1]


def test_staleness_is_per_optimizer():
    """A3C's bound counts the updates of the optimizer a gradient is for, not of the others."""
    from shoal.distributed.server import ParameterServer

    nets, optimizers = _nets(0)
    server = ParameterServer(optimizers, 2, "async", max_lag=1)
    for _ in range(3):  # the critic moves on three times
        assert server.push(torch.ones(3), 1, 0.1, version=server.versions[1], optimizer=1) == (True, 0)
    assert server.push(torch.ones(8), 1, 0.1, version=0, optimizer=0) == (True, 0)  # the actor's: fresh
    assert server.push(torch.ones(3), 1, 0.1, version=1, optimizer=1) == (False, 2)
    assert server.versions == [1, 3] and server.version == 4 and server.dropped == 1


def test_sync_rounds_are_per_optimizer():
    from shoal.distributed.server import ParameterServer

    nets, optimizers = _nets(0)
    server = ParameterServer(optimizers, 2, "sync")
    before = _flat(nets)
    server.push(torch.ones(8), 1, 1.0, 0, optimizer=0)
    server.push(torch.full((3,), 2.0), 1, 1.0, 0, optimizer=1)
    server.push(torch.full((8,), 3.0), 1, 1.0, 0, optimizer=0)
    server.apply_round(0)
    after = _flat(nets)
    np.testing.assert_allclose(after[0], np.array(before[0]) - 2.0, atol=1e-6)  # mean of 1 and 3
    assert after[1] == before[1] and server.versions == [1, 0]


def _collective_rank(rank: int, port: int, strategy_name: str, compress: str, results) -> None:
    import torch.distributed as dist

    from shoal.distributed.strategy import ParamAvgStrategy, SyncStrategy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    nets, optimizers = _nets(0)
    if strategy_name == "sync":
        strategy = SyncStrategy(rank, 2, compress)
    else:
        strategy = ParamAvgStrategy(rank, 2, sync_every=2, compress=compress)
    strategy.start({"actor": nets[0], "critic": nets[1]}, {"actor": optimizers[0], "critic": optimizers[1]})
    for net, optimizer, grad in zip(nets, optimizers, _grads(rank)):
        _set_grads(net, grad)
        strategy.reduce_gradients(list(net.parameters()), samples=rank + 1)
        strategy.step(optimizer)
    strategy.finish()
    results.put((rank, _flat(nets)))
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("compress", ["none", "fp16"])
@pytest.mark.parametrize("strategy", ["sync", "param-avg"])
def test_collective_strategies_reduce_and_average_every_optimizer(strategy, compress):
    from shoal.launch import free_port

    port = free_port()
    procs, results = spawn(_collective_rank, *[(r, port, strategy, compress) for r in range(2)])
    got = collect(procs, results)
    start = [np.array(w) for w in _flat(_nets(0)[0])]
    g = [_grads(0), _grads(1)]
    if strategy == "sync":  # the sample-weighted mean gradient (1 and 2 samples), on both workers
        expected = [start[i] - LRS[i] * (g[0][i] * 1 + g[1][i] * 2) / 3 for i in range(2)]
    else:  # each worker steps alone; then both nets are averaged (K = 2 step calls)
        expected = [start[i] - LRS[i] * (g[0][i] + g[1][i]) / 2 for i in range(2)]
    atol = 1e-3 if compress == "fp16" else 1e-6
    for rank in range(2):
        for i in range(2):
            np.testing.assert_allclose(got[rank][i], expected[i], atol=atol)


# -- importing an algorithm ----------------------------------------------------------------------


def test_importing_the_algorithms_opens_no_link_machinery():
    """``import torch`` (2.13) already imports torch.distributed itself; nothing more may come:
    not our links (gloo groups, stores) and no torch.distributed module torch did not load."""
    code = (
        "import sys, torch\n"
        "before = {m for m in sys.modules if m.startswith('torch.distributed')}\n"
        "import shoal.algos, shoal.distributed.strategy\n"
        "after = {m for m in sys.modules if m.startswith('torch.distributed')}\n"
        "print(sorted(after - before), 'shoal.distributed.link' in sys.modules,"
        " 'shoal.distributed.server' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "False", "False"], done.stdout


# -- hung peers --------------------------------------------------------------------------------


def _pushing_worker(store_path: str, stop_after_push: bool, results) -> None:
    """Worker 0: takes the greeting, pushes once, then (optionally) stops itself, then pushes again."""
    from shoal.distributed.link import WORKER, Link, announce, open_store
    from shoal.distributed.strategy import ServerStrategy

    torch.set_num_threads(1)
    store = open_store(f"file://{store_path}", host=False)
    announce(store, 0, 0)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    strategy = ServerStrategy(0, 1, link=Link(store, 0, 0, WORKER), peer_timeout=5)
    strategy.start({"net": net}, {"optimizer": optimizer})
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    strategy.step(optimizer)
    if stop_after_push:
        os.kill(os.getpid(), signal.SIGSTOP)  # hangs: the server must not wait for it forever
    try:
        strategy.step(optimizer)
        results.put("pushed")
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")
    os._exit(0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_server_drops_a_hung_worker_after_the_peer_timeout_and_counts_it_lost(tmp_path):
    from shoal.distributed.link import lost_why, open_store
    from shoal.distributed.server import ParameterServer

    store_path = str(tmp_path / "store")
    store = open_store(f"file://{store_path}", host=True)
    net = torch.nn.Linear(3, 2)
    server = ParameterServer(torch.optim.SGD(net.parameters(), lr=1.0), 1, "async", peer_timeout=2.0)
    thread = threading.Thread(target=server.serve, args=(store,), daemon=True)
    thread.start()
    procs, results = spawn(_pushing_worker, (store_path, True))
    worker = procs[0]
    deadline = time.monotonic() + 60
    while server.lost == 0:  # it pushed once, then stopped: 2 s later it is lost
        assert time.monotonic() < deadline, "the server never gave up on a stopped worker"
        time.sleep(0.1)
    assert server.version == 1 and server.lost == 1
    assert "sent nothing for 2 s" in lost_why(store, 0, 0)  # for the supervisor: end it, replace it
    os.kill(worker.pid, signal.SIGCONT)  # it wakes up: its link is closed, it cannot push
    error = results.get()
    # Its link is gone: gloo says so at once (the server's socket closed: FIN, or RST when
    # bytes were still unread there; both seen in CI), or its next answer never comes.
    gone = ("Connection closed by peer", "Connection reset by peer")
    closed = error.startswith("RuntimeError") and any(why in error for why in gone)
    assert closed or error.startswith("PeerTimeout: the parameter server did not answer within 5 s"), error
    worker.join(30)
    assert worker.exitcode == 0


def _server_process(store_path: str, stop: bool, results) -> None:
    from shoal.distributed.link import open_store
    from shoal.distributed.server import ParameterServer

    store = open_store(f"file://{store_path}", host=True)
    net = torch.nn.Linear(3, 2)
    server = ParameterServer(torch.optim.SGD(net.parameters(), lr=1.0), 1, "async")
    threading.Thread(target=server.serve, args=(store,), daemon=True).start()
    while server.version < 3:  # (answered by now: the worker pushed again)
        time.sleep(0.01)
    if stop:
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(60)
    os._exit(0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_raises_peer_timeout_naming_a_hung_server(tmp_path):
    from shoal.distributed.link import WORKER, Link, PeerTimeout, announce, open_store
    from shoal.distributed.strategy import ServerStrategy

    store_path = str(tmp_path / "store")
    procs, _ = spawn(_server_process, (store_path, True))
    try:
        store = open_store(f"file://{store_path}", host=False)
        announce(store, 0, 0)
        net = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
        strategy = ServerStrategy(0, 1, link=Link(store, 0, 0, WORKER), peer_timeout=2.0)
        strategy.start({"net": net}, {"optimizer": optimizer})
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        start = time.monotonic()
        with pytest.raises(PeerTimeout, match="the parameter server did not answer within 2 s"):
            for _ in range(100):
                strategy.step(optimizer)  # the third is answered; then the server stops
        assert strategy.version >= 2 and time.monotonic() - start < 20
    finally:
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].join(30)


def _slow_sync_worker(store_path: str, rank: int, delay: float, results) -> None:
    """A sync worker that computes for ``delay`` s before its push (the other one waits)."""
    from shoal.distributed.link import WORKER, Link, announce, open_store
    from shoal.distributed.strategy import ServerStrategy

    torch.set_num_threads(1)
    store = open_store(f"file://{store_path}", host=False)
    announce(store, rank, 0)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    strategy = ServerStrategy(rank, 2, link=Link(store, rank, 0, WORKER), peer_timeout=1.0)
    strategy.start({"net": net}, {"optimizer": optimizer})
    for step in range(2):
        if step == 1:
            time.sleep(delay)  # after its first push: the server's clock runs, within its bound
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        strategy.step(optimizer)
    time.sleep(delay)  # the chief waits for the final weights meanwhile
    strategy.finish()
    results.put((rank, strategy.version))
    os._exit(0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_waiting_for_a_sync_round_longer_than_the_timeout_is_kept_alive(tmp_path):
    """Worker 0 waits 1.5 s for worker 1's second push and as long for the final weights, with
    its own bound at 1 s: the server's Waiting messages keep its waits from timing out (the
    server's own bound, 2 s, lets worker 1 be that slow)."""
    from shoal.distributed.link import open_store
    from shoal.distributed.server import ParameterServer

    store_path = str(tmp_path / "store")
    store = open_store(f"file://{store_path}", host=True)
    net = torch.nn.Linear(3, 2)
    server = ParameterServer(torch.optim.SGD(net.parameters(), lr=1.0), 2, "sync", peer_timeout=2.0)
    stats: dict = {}
    thread = threading.Thread(target=lambda: stats.update(server.serve(store)), daemon=True)
    thread.start()
    procs, results = spawn(_slow_sync_worker, (store_path, 0, 0.0), (store_path, 1, 1.5))
    got = collect(procs, results)
    thread.join(30)
    assert got == {0: 2, 1: 2} and stats["workers_lost"] == 0 and stats["version"] == 2
