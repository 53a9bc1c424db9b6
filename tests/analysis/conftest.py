"""The analysis tests reuse the search fixtures (tiny checkpoints, config builder) and share one tiny joint PS+DFS
run scored on a multiple-choice task (the toy joint demo's shape), written by `dfsmerge search`."""

import pytest

from tests.search.conftest import MC_TASK, make_config, mc_task_dir, tiny_models  # noqa: F401


@pytest.fixture(scope="session")
def joint_run(tiny_models, mc_task_dir, tmp_path_factory):  # noqa: F811 - the imported fixtures
    genome = {"mode": "joint", "models": [str(tiny_models["m1"]), str(tiny_models["m2"])],
              "base_model": str(tiny_models["base"]), "layer_granularity": 1,
              "dfs": {"repetitions": 2, "scales": "per_step"}}
    cfg = {"genome": genome, "objectives": [{"name": MC_TASK, "native": True}], "task_paths": [str(mc_task_dir)],
           "optimizer": {"name": "cma", "popsize": 4, "sigma0": 0.5}, "budget": {"max_evals": 12}, "seed": 0,
           "eval_dtype": "float32"}
    import yaml

    from dfsmerge.cli import main

    d = tmp_path_factory.mktemp("ablate")
    (d / "joint.yaml").write_text(yaml.safe_dump(cfg))
    run = d / "run"
    assert main(["search", str(d / "joint.yaml"), "--out", str(run), "--quiet"]) == 0
    return run
