"""The Ray backend with 2 local actors (CPU) writes the same evals.jsonl objectives as the local backend for the
same seed, also when an actor dies mid-generation (its candidate is retried on the other actor)."""

from __future__ import annotations

import pytest

from dfsmerge.search import load_search_config, run_search
from tests.search.conftest import MC_TASK, read_evals, strip_volatile

ray = pytest.importorskip("ray", reason="ray is an optional dependency (pip install ray)")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_matches_local(ray_cluster, make_config, mc_task_dir, tmp_path):
    from dfsmerge.search.backends import RayBackend

    d = make_config("joint", "cma", popsize=4, max_evals=8,
                    objectives=[{"name": MC_TASK, "limit": 6}, {"type": "cost", "name": "hops", "weight": 0.01}],
                    task_paths=[str(mc_task_dir)], builtin_tasks=False,
                    eval_dtype="float32")  # auto's choice is timed: two runs may differ, and an actor is killed
    cfg = load_search_config(d)
    run_search(cfg, tmp_path / "local", progress=False)
    rcfg = cfg.with_overrides(backend="ray", num_workers=2)
    backend = RayBackend(rcfg, num_workers=2)
    assert len(backend.actors) == 2
    evaluate = backend.evaluate
    killed = []

    def evaluate_and_kill_one(genomes, candidates=None):  # kill actor 0 after the first result of the first generation
        for i, res in evaluate(genomes, candidates):
            if not killed:
                killed.append(backend.actors[0])
                ray.kill(backend.actors[0])
            yield i, res

    backend.evaluate = evaluate_and_kill_one
    run_search(rcfg, tmp_path / "ray", progress=False, backend=backend)
    backend.close()
    local, remote = read_evals(tmp_path / "local"), read_evals(tmp_path / "ray")
    assert killed and backend.retries >= 1 and len(local) == len(remote) == 8
    assert [strip_volatile(r) for r in remote] == [strip_volatile(r) for r in local]
    assert any(r["objectives"][MC_TASK] is not None for r in local)
