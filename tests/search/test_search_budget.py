"""Budget limits end a stage where they say (generations, evaluations, time), unknown task names fail before any
model is loaded, and the progress/tracker paths run."""

from __future__ import annotations

import pytest

from dfsmerge.errors import ConfigError
from dfsmerge.search import load_search_config, run_search
from tests.search.conftest import read_evals


def test_max_generations_and_max_evals(make_config, tmp_path):
    d = make_config("dfs", "random", popsize=4, max_evals=100)
    d["budget"] = {"max_generations": 3}
    res = run_search(load_search_config(d), tmp_path / "g", progress=False)
    assert res.n_evals == 12 and "max_generations=3" in res.stop_reason
    assert sorted({r["generation"] for r in read_evals(tmp_path / "g")}) == [0, 1, 2]
    d["budget"] = {"max_evals": 10}  # generations are never cut short: 3 x 4 >= 10
    res = run_search(load_search_config(d), tmp_path / "e", progress=False)
    assert res.n_evals == 12 and "max_evals=10" in res.stop_reason


def test_time_limit(make_config, tmp_path):
    d = make_config("ps", "random", popsize=4)
    d["budget"] = {"time_limit": 1e-6}
    res = run_search(load_search_config(d), tmp_path / "t", progress=False)
    assert res.n_evals == 0 and "time_limit" in res.stop_reason
    assert res.best is None


def test_unknown_task_fails_before_models_load(make_config, mc_task_dir, tmp_path, monkeypatch):
    import dfsmerge.runtime.pool

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the tasks were validated")

    monkeypatch.setattr(dfsmerge.runtime.pool, "load_model", no_load)
    d = make_config("ps", "cma", objectives=[{"name": "no_such_task_xyz"}], builtin_tasks=False,
                    task_paths=[str(mc_task_dir)])
    with pytest.raises(ConfigError, match="no_such_task_xyz"):
        run_search(load_search_config(d), tmp_path / "r", progress=False)


def test_forced_progress_bar_and_optional_trackers(make_config, tmp_path, capsys):
    d = make_config("ps", "random", popsize=4, max_evals=8, logging={"tensorboard": True})
    lines = []
    res = run_search(load_search_config(d), tmp_path / "p", progress="force", emit=lines.append)
    assert res.n_evals == 8
    assert any(line.startswith("generation 1: 4 evals") for line in lines), lines
    assert "generation 0" in capsys.readouterr().err  # the tqdm bar
    try:
        import tensorboard  # noqa: F401

        assert (tmp_path / "p" / "tensorboard").is_dir()
    except ImportError:
        assert any("tensorboard logging disabled" in line for line in lines), lines
