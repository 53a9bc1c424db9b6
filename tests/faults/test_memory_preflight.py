"""Memory preflight: the estimate counts what transformers counts (the checkpoints' parameters, from the headers
alone), and a search or an ``eval`` whose estimate exceeds ``--max-memory`` or the machine's memory is refused with
one line before anything is loaded or any run directory is created."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import yaml

from dfsmerge.cli import main
from dfsmerge.errors import ConfigError
from dfsmerge.runtime.memory import (
    MemoryEstimate,
    check_memory,
    checkpoint_numel,
    machine_memory,
    parse_memory,
    search_estimate,
)
from dfsmerge.search import load_search_config
from tests.search.conftest import read_evals


def _params(path) -> int:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return sum(p.numel() for p in m.state_dict().values())


def test_estimate_counts_the_checkpoints_parameters(tiny_models, make_config):
    for path in tiny_models.values():
        assert checkpoint_numel(path) == _params(path)
    from dfsmerge.search.space import build_space

    cfg = load_search_config(make_config("ps", "random"))  # cost + synthetic objectives: the pool is loaded
    assert cfg.needs_model
    est = search_estimate(cfg, build_space(cfg)[1])
    n = {name: _params(p) for name, p in tiny_models.items()}
    # the three models resident in float32 and one merged copy of the base architecture
    assert est.parts["merged copy (PS buffers)"] == 4 * n["base"]
    assert sum(v for k, v in est.parts.items() if k.startswith("model ")) == 4 * sum(n.values())
    assert not est.unknown


def test_search_over_budget_refused_before_any_work(tiny_models, make_config, tmp_path, capsys):
    from dfsmerge.search.space import build_space

    d = make_config("ps", "random", popsize=2, max_evals=2)
    est = search_estimate(load_search_config(d), build_space(load_search_config(d))[1])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--out", str(run), "--quiet", "--max-memory", str(est.total - 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ConfigError: each search worker needs an estimated" in err[0], err
    assert "--max-memory" in err[0] and "merged copy" in err[0]
    assert not run.exists()
    assert main(["search", str(cfg), "--out", str(run), "--quiet", "--max-memory", str(est.total)]) == 0
    assert len(read_evals(run)) == 2


def test_eval_of_a_model_larger_than_the_machine_refused(tiny_models, tmp_path, capsys):
    """A checkpoint whose header declares 4 TiB (a sparse file: nothing is on disk) is refused from its header."""
    d = tmp_path / "huge"
    d.mkdir()
    (d / "config.json").write_text((tiny_models["base"] / "config.json").read_text())
    n = 1 << 20
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [n, n],
                                                       "data_offsets": [0, 4 * n * n]}}).encode()
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n * n)
    assert checkpoint_numel(d) == n * n
    assert main(["eval", str(d), "--tasks", "anything"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an estimated 4.0 TiB" in err[0] and "this machine's memory" in err[0], err


def test_eval_of_a_plan_over_budget(tiny_models, tmp_path, capsys):
    from dfsmerge.genome.plan import PathPlan

    plan = PathPlan.identity("A", 2, models={"A": str(tiny_models["base"])})
    (tmp_path / "plan.yaml").write_text(plan.to_yaml())
    assert main(["eval", str(tmp_path / "plan.yaml"), "--tasks", "anything", "--max-memory", "1KB"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs an estimated" in err and "--max-memory 1000 B" in err, err


def test_check_memory_and_parse():
    total, what = machine_memory("cpu")
    check_memory(MemoryEstimate({"x": total // 2}), what="w")
    with pytest.raises(ConfigError, match="more than this machine's memory"):
        check_memory(MemoryEstimate({"x": total + 1}), what="w")
    assert parse_memory("2GiB") == 2 << 30
    with pytest.raises(ConfigError, match="--max-memory 'lots'"):
        parse_memory("lots")
