"""Periodic greedy evaluation (``--eval-every``) and the best checkpoint beside the latest."""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import shoal
from shoal.agent import make_config
from shoal.algos import ALGORITHMS
from shoal.cli import main
from shoal.config import MAX_EVAL_EPISODES
from shoal.run import checkpoint as ckpt
from shoal.training import trainer as trainer_module
from shoal.training.trainer import EVAL_ENVS, Trainer, evaluate
from tests.test_resume import SMALL

# PPO updates every 4 envs x 64 steps = 256 env steps; evaluations every 1000 steps then come
# at the first update past each multiple (1024, 2048, 3072) and at the end (4000).
PPO = dict(
    num_envs=4,
    num_steps=64,
    update_epochs=2,
    total_steps=4000,
    checkpoint_every=1024,
    eval_every=1000,
    eval_episodes=1,
)


def trainer(run_dir, algo: str = "ppo", **overrides) -> Trainer:
    values = {**PPO, "run_dir": str(run_dir)} if algo == "ppo" else {"run_dir": str(run_dir)}
    return Trainer(
        ALGORITHMS[algo], make_config(algo, "CartPole-v1", {**values, **overrides}), progress=False
    )


def weights(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.clone() for m, mod in modules.items() for k, v in mod.state_dict().items()}


def eval_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_return" in r]


class Scores:
    """A stand-in for ``evaluate`` whose scores the test chooses; it notes the weights it saw."""

    def __init__(self, monkeypatch, scores: list[float]) -> None:
        self.scores, self.seen = list(scores), []
        monkeypatch.setattr(trainer_module, "evaluate", self)

    def __call__(self, algo, env, episodes, seed, stop=None) -> dict:
        if seed != 1 + MAX_EVAL_EPISODES:  # the final evaluation
            return evaluate(algo, env, episodes, seed, stop)
        self.seen.append(weights(algo.modules()))
        return {"mean_return": self.scores.pop(0), "std_return": 0.5, "episodes": episodes}


def test_evaluations_are_logged_at_each_multiple_and_the_best_weights_are_kept(tmp_path, monkeypatch):
    scores = Scores(monkeypatch, [3.0, 7.0, 5.0, 6.0])  # the second evaluation is the best
    run = trainer(tmp_path / "run", keep_checkpoints=1)
    summary = run.train()
    rows = eval_rows(tmp_path / "run")
    assert [r["env_steps"] for r in rows] == [1024, 2048, 3072, 4000]
    assert [r["eval_return"] for r in rows] == [3.0, 7.0, 5.0, 6.0]
    assert all(r["eval_return_std"] == 0.5 and r["eval_seconds"] >= 0 for r in rows)
    assert summary["best_eval_return"] == 7.0 and summary["best_eval_env_steps"] == 2048
    assert "mean_return" in summary  # the final evaluation is still there, under its own keys

    (best,) = (tmp_path / "run" / "checkpoints" / "best").glob("*.json")  # one best, never pruned
    assert best.name == f"ckpt-{2048:012d}.json"
    assert len(list((tmp_path / "run" / "checkpoints").glob("ckpt-*.json"))) == 1  # keep_checkpoints=1
    agent = shoal.load(tmp_path / "run", best=True)
    assert agent.run_dir == (tmp_path / "run").absolute()
    loaded = weights(agent.algorithm.modules())
    assert all(torch.equal(loaded[k], scores.seen[1][k]) for k in loaded)
    assert not torch.equal(
        loaded["net.actor_head.weight"], weights(run.algo.modules())["net.actor_head.weight"]
    )


def test_the_best_checkpoint_scores_what_was_logged_and_eval_best_reads_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    trainer(run_dir, total_steps=2048).train()
    best = max(eval_rows(run_dir), key=lambda r: r["eval_return"])
    agent = shoal.load(run_dir, best=True)
    # The periodic evaluations play their own seeds, after every final evaluation's.
    again = evaluate(agent.algorithm, "CartPole-v1", 5, 1 + MAX_EVAL_EPISODES)
    assert again["mean_return"] == best["eval_return"]

    assert main(["eval", str(run_dir), "--best", "--episodes", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mean_return"] == evaluate(agent.algorithm, "CartPole-v1", 3, 1)["mean_return"]


class LeanWithThePole:
    """A weak CartPole rule (its episodes last 25-60 steps) whose action for a row depends on
    that row only, so that playing episodes at once cannot change them."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def predict(self, obs: np.ndarray) -> np.ndarray:
        self.batches.append(len(obs))
        return (obs[:, 2] > 0).astype(np.int64)


def test_episodes_played_at_once_score_what_each_scores_alone():
    made, closed = [], []

    class Closing(gym.Wrapper):
        def close(self) -> None:
            closed.append(self)
            super().close()

    def make() -> gym.Env:
        made.append(Closing(gym.make("CartPole-v1")))
        return made[-1]

    n = EVAL_ENVS + 5  # the last 5 episodes play on envs whose first episode ended
    rule = LeanWithThePole()
    together = evaluate(rule, make, n, seed=3)
    assert len(made) == EVAL_ENVS and closed == made
    assert rule.batches[0] == EVAL_ENVS and len(rule.batches) < 3 * 60  # batched steps, not n * length
    alone = [evaluate(LeanWithThePole(), "CartPole-v1", 1, seed=3 + k)["mean_return"] for k in range(n)]
    assert len(set(alone)) > 5  # n different episodes
    assert together == {"mean_return": np.mean(alone), "std_return": np.std(alone), "episodes": n}


def test_a_run_without_eval_every_has_no_best_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    trainer(run_dir, total_steps=256, eval_every=0).train()
    assert not (run_dir / "checkpoints" / "best").exists()
    assert main(["eval", str(run_dir), "--best"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no best checkpoint" in err and "--eval-every" in err
    with pytest.raises(ckpt.CheckpointError, match="without --eval-every"):
        shoal.load(run_dir, best=True)
    assert main(["train", "ppo", "--periodic-eval-episodes", "3", "--run-dir", str(tmp_path / "x")]) == 2
    assert "drop --periodic-eval-episodes" in capsys.readouterr().err


def test_a_resumed_run_keeps_a_better_best(tmp_path, monkeypatch):
    Scores(monkeypatch, [10.0, 9.0, 1.0, 2.0])
    run_dir = tmp_path / "run"
    trainer(run_dir).train(stop_after_checkpoints=2)  # evaluated at 1024, 2048
    resumed = trainer(run_dir)
    summary = resumed.train(resume=ckpt.latest(run_dir / "checkpoints"))  # 3072, 4000: both worse
    assert [r["eval_return"] for r in eval_rows(run_dir)] == [10.0, 9.0, 1.0, 2.0]
    assert summary["best_eval_return"] == 10.0 and summary["best_eval_env_steps"] == 1024
    assert ckpt.best(run_dir).name == f"ckpt-{1024:012d}.json"


DQN = {**SMALL["dqn"], "eval_episodes": 1}  # tests/test_resume.py's small DQN run


def test_evaluations_change_no_weight_and_resume_bitwise_and_best_holds_no_replay(tmp_path):
    plain = trainer(tmp_path / "plain", "dqn", **DQN)
    plain.train()
    whole = trainer(tmp_path / "whole", "dqn", **DQN, eval_every=700)
    whole.train()
    split = trainer(tmp_path / "split", "dqn", **DQN, eval_every=700)
    split.train(stop_after_checkpoints=2)
    split = trainer(tmp_path / "split", "dqn", **DQN, eval_every=700)
    split.train(resume=ckpt.latest(tmp_path / "split" / "checkpoints"))
    for other in (whole, split):
        a, b = weights(plain.algo.modules()), weights(other.algo.modules())
        assert all(torch.equal(a[k], b[k]) for k in a)
    whole_rows, split_rows = (
        [(r["env_steps"], r["eval_return"]) for r in eval_rows(tmp_path / d)] for d in ("whole", "split")
    )
    assert whole_rows == split_rows  # the same scores at the same steps, none twice
    assert [steps for steps, _ in whole_rows] == [700, 1400, 2100, 2800, 3000]

    best = ckpt.best(tmp_path / "whole")
    assert not list(best.parent.glob("*.heavy.safetensors"))  # the replay buffer stays out
    agent = shoal.load(tmp_path / "whole", best=True)  # mid-episode n-step transitions or not
    assert agent.algorithm.replay.size == 0
    assert agent.act(np.zeros(4, dtype=np.float32)) in (0, 1)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_mp_workers_evaluate_once_on_the_chief_and_write_one_best(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "train", "ppo", "--backend", "mp", "--num-workers", "2",
         "--num-envs", "2", "--num-steps", "64", "--total-steps", "2048", "--eval-every", "512",
         "--eval-episodes", "1", "--run-dir", str(run_dir), "--quiet"],
        capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r["env_steps"] for r in eval_rows(run_dir)]
    assert steps == [512, 1024, 1536, 2048]  # one row each: the chief's
    assert len(list((run_dir / "checkpoints" / "best").glob("*.json"))) == 1
    assert "best periodic evaluation" in done.stdout
