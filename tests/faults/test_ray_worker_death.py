"""A Ray actor SIGKILLed (by its pid, as the OOM killer does) at a random point of a search: the search goes on with
the other actor and a replacement, scores the lost candidate again and records every candidate once, so each of
five runs ends with the evals of an uninterrupted local run (same candidates, same scores, none twice)."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from dfsmerge.search import load_search_config, run_search
from tests.faults.conftest import same_evals
from tests.search.conftest import MC_TASK

ray = pytest.importorskip("ray", reason="ray is an optional dependency (pip install ray)")

pytestmark = pytest.mark.slow  # two actors loading torch on a 2-core machine: minutes


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_killed_actor_runs_equal_uninterrupted(ray_cluster, make_config, mc_task_dir, tmp_path):
    from dfsmerge.search.backends import RayBackend

    d = make_config("joint", "cma", popsize=4, max_evals=8,
                    objectives=[{"name": MC_TASK, "limit": 6}, {"type": "cost", "name": "hops", "weight": 0.01}],
                    task_paths=[str(mc_task_dir)], builtin_tasks=False, eval_dtype="float32")
    cfg = load_search_config(d)
    run_search(cfg, tmp_path / "local", progress=False)
    rcfg = cfg.with_overrides(backend="ray", num_workers=2)
    backend = RayBackend(rcfg, num_workers=2, max_restarts=5)
    evaluate = backend.evaluate
    rng = random.Random(0)
    killed = []
    try:
        for run in range(5):
            at = rng.randrange(7)  # after this many results of the run, mid-way through the next candidates
            delay = rng.uniform(0.0, 0.3)
            seen = {"n": 0, "done": False}

            def evaluate_and_kill(genomes, candidates=None, block=None, at=at, delay=delay, seen=seen):
                for i, res in evaluate(genomes, candidates, block):
                    if not seen["done"] and seen["n"] == at:
                        seen["done"] = True
                        victim = backend.actors[0]
                        pid = ray.get(victim.pid.remote())
                        time.sleep(delay)
                        os.kill(pid, signal.SIGKILL)
                        killed.append((run, at, pid))
                    seen["n"] += 1
                    yield i, res

            backend.evaluate = evaluate_and_kill
            retries = backend.retries
            run_search(rcfg, tmp_path / f"ray{run}", progress=False, backend=backend)
            assert seen["done"], f"run {run}: the kill point {at} was not reached"
            assert backend.retries >= retries  # the kill may land between candidates: then nothing is lost
            same_evals(tmp_path / f"ray{run}", tmp_path / "local")
    finally:
        backend.close()
    assert len(killed) == 5 and backend.restarts == 5
    assert backend.retries >= 1, "no kill ever hit a candidate in flight"
