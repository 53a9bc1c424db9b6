"""Fail before work: what config files can tell is checked before the run directory exists (exit 2, one line,
nothing written), and every search's candidate 0 is its start (the source's own path, the initial PS weights)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from dfsmerge.search import load_search_config, run_search
from dfsmerge.zoo.tiny import make_tiny_checkpoint
from tests.search.conftest import MC_TASK, read_evals


def _run_cli(cfg: dict, tmp_path) -> subprocess.CompletedProcess:
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "dfsmerge.cli", "search", str(tmp_path / "cfg.yaml"), "--out",
                           str(tmp_path / "run"), "--quiet"], capture_output=True, text=True)


def _one_line_exit_2(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dfsmerge: error:"), res.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_unsupported_architecture_exits_2_without_run_dir(make_config, tiny_models, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_models["m1"], odd)
    cfg_json = json.loads((odd / "config.json").read_text())
    cfg_json["model_type"] = "mamba"
    (odd / "config.json").write_text(json.dumps(cfg_json))
    cfg = make_config("dfs", "cma", popsize=4, max_evals=8)
    cfg["genome"]["models"] = [str(odd), str(tiny_models["m2"])]
    res = _run_cli(cfg, tmp_path)
    _one_line_exit_2(res, "mamba")
    assert not (tmp_path / "run").exists()


def test_incompatible_pool_exits_2_without_run_dir(make_config, tiny_models, tmp_path):
    wide = make_tiny_checkpoint("llama", tmp_path / "wide", seed=3, num_layers=2, hidden=32)
    cfg = make_config("dfs", "cma", popsize=4, max_evals=8)
    cfg["genome"]["models"] = [str(tiny_models["m1"]), str(wide)]
    _one_line_exit_2(_run_cli(cfg, tmp_path), "hidden_size")
    assert not (tmp_path / "run").exists()


def test_missing_task_exits_2_without_run_dir(make_config, mc_task_dir, tmp_path):
    cfg = make_config("dfs", "cma", popsize=4, max_evals=8, task_paths=[str(mc_task_dir)], builtin_tasks=False,
                      objectives=[{"name": MC_TASK + "_nope", "split": "validation"}])
    _one_line_exit_2(_run_cli(cfg, tmp_path), MC_TASK + "_nope")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["ps", "dfs", "joint", "staged"])
@pytest.mark.parametrize("optimizer", ["cma", "nsga2", "random"])
def test_candidate_zero_is_the_start(mode, optimizer, make_config, tmp_path):
    cfg = load_search_config(make_config(mode, optimizer, popsize=4, max_evals=8,
                                         **({"stage2": {"budget": {"max_evals": 8}}} if mode == "staged" else {})))
    run_search(cfg, tmp_path / "run", progress=False)
    evals = read_evals(tmp_path / "run")
    from dfsmerge.search.space import build_space

    space, _ = build_space(cfg)
    starts = [0]
    if mode == "staged":  # stage 2 starts from the stage-1 best's own path
        starts.append(next(i for i, r in enumerate(evals) if r.get("stage") == 2))
    for i in starts:
        r = evals[i]
        sp = space.with_stage(r.get("stage", 1), space.ps.decode(np.asarray(evals[0]["genome"]))) \
            if mode == "staged" and r.get("stage") == 2 else space.with_stage(1) if mode == "staged" else space
        want = sp.decode(sp.initial())
        got = sp.decode(np.asarray(r["genome"]))
        assert got.path == want.path
        assert (got.ps is None) == (want.ps is None)
        if got.ps is not None and mode != "staged":
            assert got.ps.to_mergekit() == want.ps.to_mergekit()
