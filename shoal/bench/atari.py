"""Atari throughput, shoal against gymnasium, SB3 and EnvPool (issue 13), on Breakout and Pong.

Every number is in **frames/s**: one env step is 4 emulator frames (frame skip 4), so frames/s
= 4 x env steps/s. Every implementation runs the standard preprocessing (30 no-op starts,
frame skip 4 with max-pooling, 84x84 grayscale, 4 stacked frames, life loss ends the episode,
FIRE on reset, reward sign) on the v5 emulator (sticky actions 0.25). Parts (``--part``):

- ``envs``: frames/s of vector envs stepped with random valid actions (pre-sampled outside the
  timed windows), 8 and 16 envs: gymnasium's ``SyncVectorEnv`` and ``AsyncVectorEnv`` (shared
  memory, fork) over shoal's ``make_atari``; SB3's ``SubprocVecEnv`` (fork) over SB3's own
  preprocessing (``make_atari_env`` + ``VecFrameStack(4)``, what an SB3 user runs); EnvPool's
  Atari (its ids: ``Breakout-v5``; set to the same preprocessing, sticky actions 0.25 and
  ``--workers`` threads); shoal's ``ProcessVectorEnv`` (``--workers`` env workers) over
  ``AtariFactory`` and ``make_vec``'s auto choice; and ``shoal-process-noinfo``, the same
  ``ProcessVectorEnv`` over envs whose ``info`` drops ALE's per-step keys (``lives``,
  ``episode_frame_number``, ``frame_number``), which shows what pickling a non-empty info
  every step costs. All are kept open and timed round-robin, one window each per repeat, in
  an order rotated every repeat; medians over ``--repeats``.
- ``train``: PPO training frames/s, shoal against SB3, CleanRL's ppo_atari hyperparameters
  (shoal's ``ALE/*`` preset: 8 envs x 128 steps, 4 epochs x 4 minibatches, lr 2.5e-4
  annealed, clip 0.1, ent 0.01, vf 0.5, gamma 0.99, lambda 0.95, max grad norm 0.5) mapped
  one to one onto SB3's arguments; the same torch thread count (``--torch-threads``). Rates
  are taken between the end of the first and of the last update (start-up, the first rollout
  and anything after the loop are not counted), as ``shoal bench scaling`` does from
  metrics rows. Where the two differ:

  * networks: the same, one Nature-CNN shared by policy and value (SB3's ``CnnPolicy``,
    CleanRL's ppo_atari, shoal's ``ActorCritic`` for frames). ``sb3-separate`` (not run by
    default) is SB3 with ``share_features_extractor=False``, two CNNs; ``update share`` is the
    part of the loop spent in updates;
  * value loss: shoal's preset clips it as CleanRL does, SB3 has no such clipping
    (``clip_range_vf`` clips differently): shoal runs with ``clip_vloss`` off here;
  * envs: SB3 steps its envs in one process (``DummyVecEnv``, ``make_atari_env``'s default;
    ``--sb3-vec subproc`` for ``SubprocVecEnv``), shoal with its default (``vectorization``
    auto); SB3's wrappers are its own (same steps, its ``WarpFrame`` resize is OpenCV's
    INTER_AREA as gymnasium's).

- ``curve``: a Breakout learning curve, shoal against SB3, ``--curve-seeds`` (seed 1 by
  default; an earlier run's seeds stay), same settings as ``train``, ``--curve-frames``
  frames; game scores (raw, whole games) against env steps (x4 for frames); a PNG.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from shoal.bench import gemm_rate, machine, plot_curves, vector_envs
from shoal.bench.vector_envs import Stepper
from shoal.envs.atari import FRAME_SKIP, AtariFactory, make_atari, register_ale

IMPLEMENTATIONS = [
    "gym-sync",
    "gym-async",
    "sb3-subproc",
    "envpool",
    "shoal-process",
    "shoal-process-noinfo",
    "shoal-auto",
]
ENVS = ["ALE/Breakout-v5", "ALE/Pong-v5"]
TRAIN_ROWS = ["shoal", "sb3", "sb3-separate"]
DEFAULT_TRAIN_ROWS = ["shoal", "sb3"]
ALE_INFO = ("lives", "episode_frame_number", "frame_number")
TRAIN_TARGET = 2.0  # shoal's training frames/s over SB3's (shared CNN, its default)


class _DropALEInfo(gym.Wrapper):
    """Removes ALE's per-step info keys, so that a step's info is empty unless a game ends."""

    def reset(self, **kwargs: Any) -> Any:
        obs, info = self.env.reset(**kwargs)
        return obs, {k: v for k, v in info.items() if k not in ALE_INFO}

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {k: v for k, v in info.items() if k not in ALE_INFO}


class QuietAtariFactory(AtariFactory):
    """:class:`AtariFactory` whose envs drop ALE's per-step info (for ``shoal-process-noinfo``)."""

    def __call__(self, **env_kwargs: Any) -> gym.Env:
        return _DropALEInfo(make_atari(self.env_id, training=self.training, **env_kwargs))


def envpool_id(env_id: str) -> str:
    """EnvPool names ``ALE/Breakout-v5`` ``Breakout-v5``."""
    return env_id.split("/")[-1]


def envpool_settings(workers: int) -> dict[str, Any]:
    """EnvPool's Atari set to the standard preprocessing on the v5 emulator: its defaults have
    no life loss, no reward clipping and no sticky actions (``repeat_action_probability=0``)."""
    return dict(
        stack_num=4,
        frame_skip=FRAME_SKIP,
        noop_max=30,
        img_height=84,
        img_width=84,
        gray_scale=True,
        episodic_life=True,
        reward_clip=True,
        use_fire_reset=True,
        repeat_action_probability=0.25,
        full_action_space=False,
        max_episode_steps=27_000,  # v5's 108,000 frames
        num_threads=workers,
    )


def sb3_atari_envs(env_id: str, num_envs: int, seed: int, vec: str = "dummy") -> Any:
    """SB3's own Atari pipeline: ``make_atari_env`` (its ``AtariWrapper``) + ``VecFrameStack(4)``.

    ``frameskip=1`` for the emulator: SB3's wrapper skips 4 frames itself, and a v5 id's
    emulator would skip 4 more (16 frames per step). Sticky actions stay the emulator's 0.25.
    """
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecFrameStack

    register_ale()
    cls, kwargs = (SubprocVecEnv, {"start_method": "fork"}) if vec == "subproc" else (DummyVecEnv, None)
    envs = make_atari_env(
        env_id,
        n_envs=num_envs,
        seed=seed,
        env_kwargs={"frameskip": 1},
        vec_env_cls=cls,
        vec_env_kwargs=kwargs,
    )
    return VecFrameStack(envs, n_stack=4)


# -- envs ------------------------------------------------------------------------------------


def open_stepper(name: str, env_id: str, num_envs: int, workers: int) -> Stepper:
    """The implementation ``name`` with ``num_envs`` preprocessed copies of ``env_id``, reset
    with seed 0; its rates are frames per second. SB3 and EnvPool bring their own Atari
    preprocessing; the others step shoal's (``vector_envs.open_stepper``)."""
    if name == "sb3-subproc":
        env = sb3_atari_envs(env_id, num_envs, 0, "subproc")
        env.reset()  # (seeded when made)
        return Stepper(name, env, "make_atari_env + VecFrameStack(4)", FRAME_SKIP)
    if name == "envpool":
        import envpool

        env = envpool.make_gymnasium(
            envpool_id(env_id), num_envs=num_envs, seed=0, **envpool_settings(workers)
        )
        env.reset()
        return Stepper(name, env, f"{workers} threads, sticky 0.25", FRAME_SKIP)
    if name == "shoal-process-noinfo":
        stepper = vector_envs.open_stepper(
            "shoal-process", QuietAtariFactory(env_id), num_envs, workers, FRAME_SKIP
        )
        stepper.name = name
        return stepper
    return vector_envs.open_stepper(name, AtariFactory(env_id), num_envs, workers, FRAME_SKIP)


def available(name: str, env_id: str | None = None) -> str | None:
    """Why ``name`` cannot run (``env_id``) here, or None."""
    if name == "envpool" and env_id is not None and not env_id.startswith("ALE/"):
        return "EnvPool's ids are the v5 ones"
    needs = {"envpool": "envpool", "sb3-subproc": "stable_baselines3"}
    if name in needs:
        try:
            __import__(needs[name])
        except ImportError:
            return f"{needs[name]} not installed"
    return None


def action_count(env_id: str) -> int:
    """The minimal action set's size, the same for every implementation (v5: minimal set)."""
    register_ale()
    env = gym.make(env_id)
    try:
        return int(env.action_space.n)
    finally:
        env.close()


def measure_cell(
    env_id: str, num_envs: int, impls: list[str], repeats: int, seconds: float, workers: int
) -> dict[str, dict[str, Any]]:
    """All implementations on one (env, num_envs) cell, round-robin; frames/s per repeat."""
    return vector_envs.measure_cell(
        env_id,
        num_envs,
        impls,
        repeats,
        seconds,
        workers,
        stepper=open_stepper,
        why_not=available,
        num_actions=action_count(env_id),
        per_step=FRAME_SKIP,
        warmup=10,
    )


def _fmt(cell: dict[str, Any]) -> str:
    if "median" not in cell:
        return f"n/a ({cell['skipped']})" if "skipped" in cell else "n/a"
    v = cell["median"]
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def envs_table(results: dict[str, Any]) -> str:
    """Markdown table of median frames/s: one row per implementation, one column per cell."""
    cols = [(e, n) for e, cells in results.items() for n in cells]
    impls = list(dict.fromkeys(name for e, n in cols for name in results[e][n]))
    head = (
        "| frames/s (median; 4 per env step) | "
        + " | ".join(f"{e.split('/')[-1]} x{n}" for e, n in cols)
        + " |"
    )
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for name in impls:
        cells = [_fmt(results[e][n].get(name, {})) for e, n in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def envs_ratios(results: dict[str, Any]) -> list[tuple[str, float]]:
    """shoal-process against each other implementation, and what the per-step info costs it."""
    out = []
    for env, cells in results.items():
        for n, cell in cells.items():
            ours = cell.get("shoal-process", {}).get("median")
            if not ours:
                continue
            for other in ("gym-sync", "gym-async", "sb3-subproc", "envpool", "shoal-process-noinfo"):
                theirs = cell.get(other, {}).get("median")
                if theirs:
                    out.append((f"shoal-process / {other}, {env.split('/')[-1]} x{n}", ours / theirs))
    return out


def part_envs(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for env_id in args.envs:
        results[env_id] = {}
        for n in args.num_envs:
            print(f"  measuring {env_id} x{n} ...", flush=True)
            results[env_id][str(n)] = measure_cell(
                env_id, n, args.impls, args.repeats, args.seconds, args.workers
            )
    return {"results": results, "ratios": [{"what": w, "ratio": v} for w, v in envs_ratios(results)]}


# -- train -----------------------------------------------------------------------------------


def train_config(
    env_id: str, seed: int, run_dir: str, steps: int, threads: int, num_steps: int | None
) -> Any:
    """shoal's PPO config for ``env_id`` (its ``ALE/*`` preset), value clipping off as SB3;
    ``num_steps`` (the rollout length) only to make smoke runs short."""
    from shoal.agent import make_config

    return make_config(
        "ppo",
        env_id,
        {
            **({"num_steps": num_steps} if num_steps else {}),
            "seed": seed,
            "run_dir": run_dir,
            "total_steps": steps,
            "clip_vloss": False,
            "torch_threads": threads,
            "checkpoint_every": 10 * steps,  # none inside the loop
            "log_every": max(1, steps // 20),
        },
    )


def _rates(marks: list[tuple[float, int, float]]) -> dict[str, Any]:
    """Frames/s and update share between the first and last of (time, env steps, update
    seconds) marks taken after each update."""
    if len(marks) < 2:
        raise ValueError("a run must make at least 2 updates to be timed; raise --train-steps")
    (t0, s0, _), (t1, s1, _) = marks[0], marks[-1]
    span, updating = t1 - t0, sum(u for _, _, u in marks[1:])
    return {
        "fps": FRAME_SKIP * (s1 - s0) / span,
        "update_share": updating / span,
        "update_seconds": updating / (len(marks) - 1),  # per timed update
        "timed_seconds": span,
        "timed_steps": s1 - s0,
        "updates": len(marks),
    }


def run_shoal_ppo(
    env_id: str,
    seed: int,
    steps: int,
    out: Path,
    threads: int,
    num_steps: int | None = None,
    curve: bool = False,
) -> dict[str, Any]:
    """shoal's PPO for ``steps`` env steps; the rates of :func:`_rates` (and game scores)."""
    from torch.utils.flop_counter import FlopCounterMode

    from shoal.algos import PPO
    from shoal.training.trainer import Trainer

    class Loop(Trainer):
        def _finish(self) -> dict[str, Any]:  # no final checkpoint and evaluation: not measured
            return {"env_steps": self.env_steps}

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    trainer = Loop(PPO, train_config(env_id, seed, str(out), steps, threads, num_steps), progress=False)
    marks: list[tuple[float, int, float]] = []
    update = trainer.algo.update

    counted: dict[str, float] = {}

    def timed(*a: Any, **k: Any) -> Any:
        if not marks:  # the first update is outside the timed span: count its FLOPs
            with FlopCounterMode(display=False) as flops:
                result = update(*a, **k)
            counted["update_gflop"] = flops.get_total_flops() / 1e9
            marks.append((time.perf_counter(), trainer.env_steps, 0.0))
            return result
        begin = time.perf_counter()
        result = update(*a, **k)
        now = time.perf_counter()
        marks.append((now, trainer.env_steps, now - begin))
        return result

    trainer.algo.update = timed  # type: ignore[method-assign]
    trainer.train()
    res = {
        **_rates(marks),
        **counted,
        "run_seconds": time.perf_counter() - started,
        "vector_env": type(trainer.envs).__name__,
    }
    if curve:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        res["curve"] = [(r["env_steps"], r["episode_return"]) for r in rows if "episode_return" in r]
    return res


def run_sb3_ppo(
    env_id: str,
    seed: int,
    steps: int,
    threads: int,
    shared: bool = True,
    vec: str = "dummy",
    num_steps: int | None = None,
    curve: bool = False,
) -> dict[str, Any]:
    """SB3's PPO (``CnnPolicy``) with the same hyperparameters, argument for argument."""
    import torch
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.callbacks import BaseCallback

    from shoal.bench.sb3 import sb3_ppo_kwargs

    started = time.perf_counter()
    config = train_config(env_id, seed, "/dev/null", steps, threads, num_steps)

    torch.set_num_threads(threads)
    model = SB3PPO(
        "CnnPolicy",
        sb3_atari_envs(env_id, config.num_envs, seed, vec),
        **sb3_ppo_kwargs(config),
        policy_kwargs={"share_features_extractor": shared},
        seed=seed,
        device="cpu",
    )
    marks: list[tuple[float, int, float]] = []
    train = model.train

    def timed() -> None:
        begin = time.perf_counter()
        train()
        now = time.perf_counter()
        marks.append((now, model.num_timesteps, now - begin))

    model.train = timed  # type: ignore[method-assign]
    games: list[tuple[float, float]] = []

    class Scores(BaseCallback):
        """Whole games' raw scores: SB3's Monitor sits under its AtariWrapper."""

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    games.append((self.num_timesteps, float(info["episode"]["r"])))
            return True

    model.learn(total_timesteps=steps, callback=Scores() if curve else None)
    model.get_env().close()
    res = {**_rates(marks), "run_seconds": time.perf_counter() - started, "vector_env": vec}
    if curve:
        res["curve"] = _binned(games, max(1, steps // 20))
    return res


def _binned(games: list[tuple[float, float]], width: float) -> list[tuple[float, float]]:
    """Mean game score per ``width`` env steps (at the bin's end), as shoal's metrics rows."""
    bins: dict[int, list[float]] = {}
    for steps, score in games:
        bins.setdefault(int(steps // width), []).append(score)
    return [((k + 1) * width, float(np.mean(v))) for k, v in sorted(bins.items())]


def _train_row(name: str, env_id: str, args: argparse.Namespace, work: Path, r: int) -> dict[str, Any]:
    if name == "shoal":
        run_dir = work / f"train-{env_id.split('/')[-1]}-{r}"
        return run_shoal_ppo(env_id, 1, args.train_steps, run_dir, args.torch_threads, args.num_steps)
    return run_sb3_ppo(
        env_id, 1, args.train_steps, args.torch_threads, name == "sb3", args.sb3_vec, args.num_steps
    )


def part_train(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Each row on each env, ``--train-repeats`` times, in an order rotated every repeat."""
    rows = [r for r in args.train_rows if not (r.startswith("sb3") and available("sb3-subproc"))]
    results: dict[str, Any] = {}
    for env_id in args.envs:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
        for r in range(args.train_repeats):
            for name in rows[r % len(rows) :] + rows[: r % len(rows)]:
                res = _train_row(name, env_id, args, work, r)
                runs[name].append(res)
                print(
                    f"  {env_id} {name}: {res['fps']:,.0f} frames/s, update share {res['update_share']:.0%}",
                    flush=True,
                )
        results[env_id] = {
            name: {
                "median_fps": statistics.median(x["fps"] for x in res),
                "update_share": statistics.median(x["update_share"] for x in res),
                **(
                    {
                        "update_gflop": statistics.median(x["update_gflop"] for x in res),
                        "update_seconds": statistics.median(x["update_seconds"] for x in res),
                    }
                    if all("update_gflop" in x for x in res)
                    else {}
                ),
                "runs": res,
            }
            for name, res in runs.items()
        }
    # what the updates' arithmetic could reach here: a plain matrix product's rate
    return {"results": results, "gemm_gflops": gemm_rate(args.torch_threads), "threads": args.torch_threads}


def train_lines(train: dict[str, Any]) -> list[str]:
    rows = list(dict.fromkeys(name for cells in train["results"].values() for name in cells))
    envs = list(train["results"])
    lines = [
        "| PPO training frames/s (median; 4 per env step) | "
        + " | ".join(f"{e.split('/')[-1]} | update share" for e in envs)
        + " |",
        "|---" * (2 * len(envs) + 1) + "|",
    ]
    for name in rows:
        cells = []
        for e in envs:
            c = train["results"][e].get(name)
            cells += [f"{c['median_fps']:,.0f}", f"{c['update_share']:.0%}"] if c else ["n/a", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for e in envs:
        cell = train["results"][e]
        ours = cell.get("shoal", {}).get("median_fps")
        for other in ("sb3", "sb3-separate"):
            theirs = cell.get(other, {}).get("median_fps")
            if ours and theirs:
                what = f"shoal / {other}, {e.split('/')[-1]}"
                if other == "sb3":
                    verdict = "ok" if ours / theirs >= TRAIN_TARGET else "BELOW TARGET"
                    lines.append(f"- {what}: **{ours / theirs:.2f}x** (target >= {TRAIN_TARGET}x, {verdict})")
                else:
                    lines.append(f"- {what} (two CNNs each): {ours / theirs:.2f}x")
        lines += ceiling_lines(e, cell, train.get("gemm_gflops"), train.get("threads"))
    return lines


def ceiling_lines(env_id: str, cell: dict[str, Any], gemm: float | None, threads: int | None) -> list[str]:
    """How far shoal's own updates let it go: with collection free, frames/s / update share;
    and the FLOP rate of those updates against a plain matrix product's on this machine."""
    ours, theirs = cell.get("shoal"), cell.get("sb3")
    if not ours or not theirs or "update_gflop" not in ours:
        return []
    name = env_id.split("/")[-1]
    ceiling = ours["median_fps"] / ours["update_share"]
    rate = ours["update_gflop"] / ours["update_seconds"]
    plain = f", a plain 256x256x256 product {gemm:.0f} GFLOP/s on {threads} thread(s)" if gemm else ""
    return [
        f"- shoal's updates, {name}: {ours['update_gflop']:.0f} GFLOP each (counted) in"
        f" {ours['update_seconds']:.2f} s, {rate:.0f} GFLOP/s{plain}; if collecting took no time,"
        f" these updates alone would cap shoal at {ceiling:,.0f} frames/s,"
        f" **{ceiling / theirs['median_fps']:.2f}x** SB3"
    ]


# -- curve -----------------------------------------------------------------------------------


def part_curve(
    args: argparse.Namespace, work: Path, png: Path, before: dict[str, Any] | None
) -> dict[str, Any]:
    """Each of ``--curve-seeds``, shoal then SB3; the seeds an earlier run measured on the same
    env and budget are kept (one run per seed and side), so seeds can be added one at a time."""
    env_id, steps = args.curve_env, args.curve_frames // FRAME_SKIP
    runs = (
        dict(curve_runs(before))
        if before and (before["env"], before["frames"]) == (env_id, args.curve_frames)
        else {}
    )
    for seed in args.curve_seeds:
        s = run_shoal_ppo(
            env_id, seed, steps, work / "curve-shoal", args.torch_threads, args.num_steps, curve=True
        )
        print(f"  curve seed {seed} shoal: {s['fps']:,.0f} frames/s", flush=True)
        b = run_sb3_ppo(
            env_id, seed, steps, args.torch_threads, True, args.sb3_vec, args.num_steps, curve=True
        )
        print(f"  curve seed {seed} sb3: {b['fps']:,.0f} frames/s", flush=True)
        runs[str(seed)] = {"shoal": s, "sb3": b, "date": dt.datetime.now(dt.timezone.utc).date().isoformat()}
    res = {
        "env": env_id,
        "frames": args.curve_frames,
        "runs": dict(sorted(runs.items(), key=lambda kv: int(kv[0]))),
    }
    title = f"PPO on {env_id}, {args.curve_frames:,} frames"
    sides = {side: [r[side]["curve"] for r in res["runs"].values()] for side in ("shoal", "sb3")}
    plot_curves({title: sides}, png, "game score (mean per log row)")
    return res


def curve_runs(curve: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The curve part's runs by seed (a report from before ``--curve-seeds`` held seed 1 alone)."""
    if "runs" in curve:
        return curve["runs"]
    return {"1": {"shoal": curve["shoal"], "sb3": curve["sb3"]}}


def late_score(curve: list, steps: int) -> float | None:
    """Mean game score over the last tenth of ``steps`` env steps (the points that end in it):
    one number per side that neither a single noisy row nor SB3's rollouts past the budget
    (a last bin of a few games) decide."""
    late = [score for at, score in curve if 0.9 * steps < at <= steps]
    return float(np.mean(late)) if late else None


def curve_lines(curve: dict[str, Any]) -> list[str]:
    steps = curve["frames"] // FRAME_SKIP
    runs = curve_runs(curve)
    late = {side: [late_score(r[side]["curve"], steps) for r in runs.values()] for side in ("shoal", "sb3")}

    def cell(scores: list[float | None]) -> str:
        known = [x for x in scores if x is not None]
        if not known:
            return "n/a"
        each = ", ".join("n/a" if x is None else f"{x:.1f}" for x in scores)
        return f"{np.mean(known):.1f}" + (f" ({each})" if len(scores) > 1 else "")

    fps = {side: ", ".join(f"{r[side]['fps']:,.0f}" for r in runs.values()) for side in ("shoal", "sb3")}
    return [
        f"| PPO on {curve['env']}, {curve['frames']:,} frames, seeds {', '.join(runs)} | shoal | SB3 |",
        "|---|---|---|",
        f"| mean game score over the last 10% of frames | {cell(late['shoal'])} | {cell(late['sb3'])} |",
        f"| training frames/s | {fps['shoal']} | {fps['sb3']} |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal bench atari", description=__doc__.split("\n")[0])
    parser.add_argument("--part", nargs="+", default=["envs", "train"], choices=["envs", "train", "curve"])
    parser.add_argument(
        "--envs", nargs="+", default=ENVS, help="ALE ids (EnvPool's are the same without 'ALE/')"
    )
    parser.add_argument("--num-envs", nargs="+", type=int, default=[8, 16], help="envs: vector sizes")
    parser.add_argument("--impls", nargs="+", default=IMPLEMENTATIONS, choices=IMPLEMENTATIONS)
    parser.add_argument("--repeats", type=int, default=5, help="envs: timed windows per implementation")
    parser.add_argument("--seconds", type=float, default=2.0, help="envs: length of one timed window")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="env workers (EnvPool threads)"
    )
    # Sizing: one update is 8 x 128 = 1024 env steps, then 4 epochs x 4 minibatches of 256
    # frame stacks. Smoke measurements (nice'd, on a busy 2-core machine, 2 torch threads):
    # ~0.35 s per minibatch for one shared CNN (~0.7 s for two): ~8 s per update there. A
    # quiet machine should be at least ~1.5x faster, so 16 updates (15 timed) take ~1.5 min
    # per run.
    parser.add_argument("--train-steps", type=int, default=16_384, help="train: env steps per run")
    parser.add_argument(
        "--num-steps", type=int, default=None, help="train, curve: rollout length (default: the preset's 128)"
    )
    parser.add_argument("--train-repeats", type=int, default=1, help="train: runs per row and env")
    parser.add_argument("--train-rows", nargs="+", default=DEFAULT_TRAIN_ROWS, choices=TRAIN_ROWS)
    parser.add_argument("--sb3-vec", default="dummy", choices=["dummy", "subproc"], help="SB3's vector env")
    parser.add_argument(
        "--torch-threads", type=int, default=os.cpu_count() or 1, help="train: both libraries"
    )
    parser.add_argument("--curve-env", default="ALE/Breakout-v5")
    parser.add_argument("--curve-frames", type=int, default=1_000_000, help="curve: frames per library")
    parser.add_argument(
        "--curve-seeds",
        nargs="+",
        type=int,
        default=[1],
        help="curve: seeds to run (seeds an earlier run of the same env and budget measured are kept)",
    )
    parser.add_argument("--out", default="benchmarks/results/atari.json", help="JSON output (and .md, .png)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    work = out.parent / "atari_runs"
    report: dict[str, Any] = {
        "benchmark": "atari",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("numpy", "gymnasium", "torch", "ale_py", "envpool", "stable_baselines3"),
        "settings": vars(args),
        "envpool_settings": envpool_settings(args.workers),
    }
    if out.exists():  # keep parts measured by earlier invocations
        report = {**json.loads(out.read_text()), **report}
    lines: list[str] = []
    if "envs" in args.part:
        print("envs ...", flush=True)
        report["envs"] = part_envs(args)
    if "train" in args.part:
        print("train ...", flush=True)
        report["train"] = part_train(args, work)
    if "curve" in args.part:
        print("curve ...", flush=True)
        report["curve"] = part_curve(args, work, out.with_name(out.stem + "_curve.png"), report.get("curve"))
    if "envs" in report:
        lines += [envs_table(report["envs"]["results"]), ""]
        lines += [f"- {r['what']}: {r['ratio']:.2f}x" for r in report["envs"]["ratios"]] + [""]
    if "train" in report:
        lines += train_lines(report["train"]) + [""]
    if "curve" in report:
        lines += curve_lines(report["curve"]) + [""]
    text = "\n".join(lines)
    print("\n" + text)
    report["seconds"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {out} and {out.with_suffix('.md')} in {report['seconds']:.0f} s")
    return 0
