"""The supervisor's policy, on a fake backend: what is replaced, rebuilt, refused or stopped."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from shoal.config import TrainConfig
from shoal.launch.supervisor import Exit, Rank, Supervisor, Topology, TrainingFailed
from shoal.training.trainer import StopRequest


def _noop(**kwargs: Any) -> dict[str, Any]:  # pragma: no cover - never called by the fake
    return {}


ERROR = "ValueError: bug"


class FakeBackend:
    """Ranks that do what a script says, one poll at a time.

    ``script[(attempt, key, generation)]`` is a list of what the rank does at each poll:
    "run", "return", "die", "raise", "hang" (no sign of life from then on) or "starting"
    (90 s more without a first sign of life).
    """

    settle_s = 0.0

    def __init__(self, script: dict[tuple[int, Any, int], list[str]]) -> None:
        self.script = script
        self.attempt = 0
        self.started: list[tuple[int, Any, int, str | None]] = []  # (attempt, key, generation, resume)
        self.state: dict[Any, dict] = {}
        self.stops = 0
        self.killed: list[Any] = []

    def begin(self, topology: Topology) -> str:
        self.attempt += 1
        self.state = {}
        return f"fake://{self.attempt}"

    def start(self, rank: Rank, kwargs: dict[str, Any]) -> None:
        generation = kwargs.get("generation", 0)
        self.started.append((self.attempt, rank.key, generation, kwargs["resume"]))
        steps = self.script.get((self.attempt, rank.key, generation), ["run", "return"])
        self.state[rank.key] = {
            "steps": list(steps),
            "exit": None,
            "silent": 0.0,
            "result": None,
            "up": False,
        }

    def _advance(self) -> None:
        for key, s in self.state.items():
            if s["exit"] is not None or s["result"] is not None:
                continue
            step = s["steps"].pop(0) if len(s["steps"]) > 1 else s["steps"][0]
            if step == "run":
                s["up"], s["silent"] = True, 0.0
            elif step == "starting":
                s["silent"] += 90.0
            elif step == "return":
                s["result"] = {"rank": key}
            elif step == "die":
                s["exit"] = Exit("was killed by SIGKILL before returning a result", killed=True)
            elif step == "raise":
                s["exit"] = Exit(
                    "exited with code 1 before returning a result: ValueError: bug", killed=False
                )
            elif step == "hang":
                s["silent"] += 1000.0

    def results(self) -> list[tuple[Any, Any]]:
        self._advance()
        out = [
            (k, s["result"]) for k, s in self.state.items() if s["result"] is not None and not s.get("taken")
        ]
        for k, _ in out:
            self.state[k]["taken"] = True
        return out

    def exit(self, key: Any) -> Exit | None:
        return self.state[key]["exit"]

    def silent_for(self, key: Any) -> float:
        return self.state[key]["silent"]

    def has_started(self, key: Any) -> bool:
        return self.state[key]["up"]

    def request_stop(self) -> None:
        self.stops += 1
        for s in self.state.values():
            if s["exit"] is None and s["result"] is None and "die" not in s["steps"]:
                s["steps"] = ["return"]  # (a rank about to die dies all the same)

    def kill(self, key: Any) -> None:
        self.killed.append(key)
        self.state[key]["exit"] = Exit("hung (no sign of life) and was ended before returning a result", True)

    def end(self, finished: bool) -> None:
        pass


def supervise(tmp_path, strategy: str, script: dict, **config: Any) -> tuple[Supervisor, FakeBackend]:
    settings = dict(strategy=strategy, num_workers=2, backend="mp", run_dir=str(tmp_path), hang_timeout=60.0)
    cfg = dataclasses.replace(TrainConfig(), **{**settings, **config})
    backend = FakeBackend(script)
    job = dict(algo="ppo", config=cfg, resume=None, progress=False)
    return Supervisor(backend, Topology.of(cfg), job, StopRequest()), backend


def test_a_worker_of_a_server_strategy_killed_by_a_signal_is_replaced_while_the_others_go_on(tmp_path):
    sup, backend = supervise(tmp_path, "a3c", {(1, 1, 0): ["run", "die"]})
    results = sup.run()
    assert results["worker_replacements"] == 1 and results["group_rebuilds"] == 0
    assert backend.attempt == 1  # nobody else was restarted
    assert [(k, g) for _, k, g, _ in backend.started] == [(0, 0), (1, 0), ("server", 0), (1, 1)]
    assert {results[0]["rank"], results[1]["rank"], results["server"]["rank"]} == {0, 1, "server"}


def test_a_killed_rank_of_one_group_rebuilds_the_whole_group(tmp_path):
    sup, backend = supervise(tmp_path, "sync", {(1, 0, 0): ["run", "die"]})
    results = sup.run()
    assert results["group_rebuilds"] == 1 and results["worker_replacements"] == 0
    assert backend.attempt == 2
    assert [(a, k) for a, k, _, _ in backend.started] == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_a_dead_server_rebuilds_the_group(tmp_path):
    sup, backend = supervise(tmp_path, "a3c", {(1, "server", 0): ["run", "die"]})
    assert sup.run()["group_rebuilds"] == 1
    assert backend.attempt == 2


def test_a_rank_that_raises_is_not_retried_and_its_error_is_the_one_line(tmp_path):
    sup, backend = supervise(tmp_path, "a3c", {(1, 1, 0): ["run", "raise"]})
    with pytest.raises(
        TrainingFailed, match=r"^worker 1 exited with code 1 before returning a result: ValueError: bug$"
    ):
        sup.run()
    assert backend.attempt == 1 and len(backend.started) == 3


def test_a_raising_peer_of_a_killed_rank_blames_the_killed_one(tmp_path):
    # A killed rank breaks its peers' gloo links: they raise too, but the group is rebuilt.
    sup, backend = supervise(tmp_path, "sync", {(1, 0, 0): ["run", "die"], (1, 1, 0): ["run", "raise"]})
    assert sup.run()["group_rebuilds"] == 1


@pytest.mark.parametrize(("strategy", "replaced"), [("a3c", True), ("sync", False)])
def test_a_hung_rank_is_ended_after_hang_timeout_and_then_lost_like_a_dead_one(tmp_path, strategy, replaced):
    sup, backend = supervise(tmp_path, strategy, {(1, 1, 0): ["run", "hang"]})
    results = sup.run()
    assert backend.killed == [1]
    assert (results["worker_replacements"], results["group_rebuilds"]) == ((1, 0) if replaced else (0, 1))


def test_a_rank_slow_to_start_has_the_startup_allowance_and_then_hang_timeout(tmp_path, caplog):
    # 90 s before its first sign of life: past --hang-timeout 60, within STARTUP_S (120 s).
    sup, backend = supervise(tmp_path, "a3c", {(1, 1, 0): ["starting", "run", "return"]})
    assert sup.run()["worker_replacements"] == 0 and backend.killed == []
    # 180 s and still not started: ended, and lost like a dead one.
    sup, backend = supervise(tmp_path, "a3c", {(1, 1, 0): ["starting", "starting", "run", "return"]})
    assert sup.run()["worker_replacements"] == 1 and backend.killed == [1]
    assert (
        "worker 1 showed no sign of life in the 120 s since it was started (stuck starting up)" in caplog.text
    )
    # Once started, --hang-timeout applies.
    sup, backend = supervise(tmp_path, "a3c", {(1, 1, 0): ["run", "starting", "run", "return"]})
    assert sup.run()["worker_replacements"] == 1 and backend.killed == [1]


def test_no_hang_detection_with_hang_timeout_0(tmp_path):
    sup, backend = supervise(
        tmp_path, "a3c", {(1, 1, 0): ["run", "hang", "hang", "return"]}, hang_timeout=0.0
    )
    sup.run()
    assert backend.killed == []


def test_losses_past_max_restarts_stop_the_run_in_one_line(tmp_path):
    script = {(1, 1, g): ["run", "die"] for g in range(5)}
    sup, _ = supervise(tmp_path, "a3c", script, max_restarts=2)
    with pytest.raises(TrainingFailed, match=r"the limit \(--max-restarts 2\); checkpoints are in"):
        sup.run()
    assert sup.replacements == 3


def test_a_stop_is_passed_to_every_rank_once_and_a_loss_meanwhile_rebuilds_nothing(tmp_path):
    sup, backend = supervise(tmp_path, "a3c", {(1, 1, 0): ["run", "run", "run"]})
    sup.stop.request("SIGTERM")
    results = sup.run()
    assert backend.stops == 1 and results["worker_replacements"] == 0
    sup, backend = supervise(tmp_path, "a3c", {(1, 1, 0): ["run", "die"]})
    sup.stop.request("SIGTERM")
    with pytest.raises(TrainingFailed, match="worker 1 was killed"):
        sup.run()
    assert backend.attempt == 1


def test_the_local_ray_is_our_own_never_a_ray_already_running_here(monkeypatch):
    # ray.init() without an address joins the newest Ray started on this machine, another
    # job's, and then refuses num_cpus: two `--backend ray` runs on one machine collided.
    import ray

    from shoal.launch.ray_backend import ray_start

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    assert ray_start(dataclasses.replace(TrainConfig(), backend="ray", num_workers=2))
    assert calls[0]["address"] == "local"
    ray_start(dataclasses.replace(TrainConfig(), backend="ray", num_workers=2, ray_address="10.0.0.1:6379"))
    assert calls[1]["address"] == "10.0.0.1:6379"  # a cluster the user names is joined
