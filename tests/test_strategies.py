"""Compression and the parameter server, in one process: what they send is what arrives."""

from __future__ import annotations

import pytest
import torch

from shoal.distributed.compress import Compressor
from shoal.distributed.server import ParameterServer
from shoal.distributed.strategy import flat_params


@pytest.mark.parametrize("mode", ["fp16", "topk"])
def test_error_feedback_loses_nothing(mode):
    """Whatever a lossy payload leaves out is sent later: sent + residual == everything given."""
    torch.manual_seed(0)
    codec = Compressor(mode, 1000, ratio=0.01)
    given, sent = torch.zeros(1000), torch.zeros(1000)
    for _ in range(50):
        vector = torch.randn(1000)
        given += vector
        sent += codec.decompress(codec.compress(vector))
    torch.testing.assert_close(sent + codec.residual, given, atol=1e-4, rtol=0)
    assert (codec.residual != 0).any()  # it really was lossy


def test_topk_keeps_the_largest_entries_and_is_50x_smaller():
    codec = Compressor("topk", 10_000, ratio=0.01)
    vector = torch.randn(10_000)
    dense = codec.decompress(codec.compress(vector))
    kept = dense != 0
    assert kept.sum() == 100
    assert vector[kept].abs().min() >= vector[~kept].abs().max()
    torch.testing.assert_close(dense[kept], vector[kept])
    assert Compressor("none", 10_000).nbytes() / codec.nbytes() == 50


def test_none_is_exact():
    codec = Compressor("none", 10)
    vector = torch.randn(10)
    assert torch.equal(codec.decompress(codec.compress(vector)), vector)


def _server(mode: str, max_lag: int | None = None, compress: str = "none") -> tuple[ParameterServer, list]:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    return ParameterServer(torch.optim.SGD(net.parameters(), lr=1.0), 2, mode, max_lag, compress), list(
        net.parameters()
    )


def test_server_applies_exactly_the_pushed_gradients():
    server, params = _server("async")
    start = flat_params(params).clone()
    g0, g1 = torch.randn(8), torch.randn(8)
    assert server.push(g0, samples=5, lr=0.5, version=0) == (True, 0)
    torch.testing.assert_close(flat_params(params), start - 0.5 * g0)
    assert server.push(g1, samples=5, lr=0.25, version=0) == (True, 1)  # one update stale
    torch.testing.assert_close(flat_params(params), start - 0.5 * g0 - 0.25 * g1)
    assert server.version == 2


def test_server_drops_gradients_past_the_lag_bound():
    server, params = _server("async", max_lag=1)
    for _ in range(3):
        server.push(torch.ones(8), 1, 0.1, version=server.version)
    before = flat_params(params).clone()
    assert server.push(torch.ones(8), 1, 0.1, version=1) == (False, 2)
    assert server.dropped == 1 and server.version == 3
    assert torch.equal(flat_params(params), before)


def test_sync_server_applies_the_sample_weighted_mean_once():
    server, params = _server("sync")
    start = flat_params(params).clone()
    g0, g1 = torch.randn(8), torch.randn(8)
    server.push(g0, samples=1, lr=1.0, version=0)
    server.push(g1, samples=3, lr=1.0, version=0)
    assert torch.equal(flat_params(params), start)  # nothing applied before the round is complete
    server.apply_round()
    torch.testing.assert_close(flat_params(params), start - (g0 + 3 * g1) / 4)
    assert server.version == 1


@pytest.mark.parametrize("compress", ["none", "fp16", "topk"])
def test_pulls_bring_a_worker_copy_to_the_global_weights(compress):
    """The per-worker mirror equals what the worker holds; uncompressed pulls are exact."""
    server, params = _server("async", compress=compress)
    worker = flat_params(params).clone()  # the worker starts from the same weights
    for _ in range(20):
        server.push(torch.randn(8), 1, 0.1, version=server.version)
        worker += Compressor(compress, 8).decompress(server.pull(0))
        torch.testing.assert_close(worker, server.mirrors[0])
    if compress == "none":
        torch.testing.assert_close(worker, flat_params(params))
    for _ in range(200):  # no new updates: repeated pulls converge on the global weights
        worker += Compressor(compress, 8).decompress(server.pull(0))
    torch.testing.assert_close(worker, flat_params(params), atol=1e-3, rtol=0)


def test_progress_line_shows_workers_lag_bytes_and_communication():
    from shoal.run.logger import distributed_summary

    line = distributed_summary(
        {"sps_worker_10": 5.0, "sps_worker_2": 2000.0, "policy_lag": 0.5, "bytes_per_update": 73328.0}
        | {"comm_seconds": 3.0, "wall_time": 12.0}
    )
    assert line == "workers 2,000/5 sps | lag 0.5 | 73.3 kB/update | comm 25%"
    assert distributed_summary({"sps": 10.0}) == ""
