"""`shoal bench envs`'s ceiling row: processes that step their envs without waiting for each other."""

from __future__ import annotations

import numpy as np
import psutil

from shoal.bench.vector_envs import ceilings, measure_cell, open_stepper


def test_independent_processes_step_every_env_and_leave_no_process():
    before = {child.pid for child in psutil.Process().children()}  # (e.g. a resource tracker)
    stepper = open_stepper("independent", "CartPole-v1", 5, 2)
    try:
        children = [child for child in psutil.Process().children() if child.pid not in before]
        assert stepper.shares == [3, 2] and len(children) == 2
        assert stepper.run(np.zeros((50, 5), np.int64)) > 0
    finally:
        stepper.close()
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)


def test_ceiling_lines_compare_with_sync_and_shoal():
    cell = measure_cell("CartPole-v1", 4, ["gym-sync", "shoal-process", "independent"], 1, 0.05, 2)
    assert all(cell[name]["median"] > 0 for name in cell)
    lines = dict(ceilings({"CartPole-v1": {"4": cell}}))
    alone = cell["independent"]["median"]
    assert lines["independent / gym-sync, CartPole-v1 x4 (the ceiling)"] == alone / cell["gym-sync"]["median"]
    assert lines["shoal-process / independent, CartPole-v1 x4"] == cell["shoal-process"]["median"] / alone
