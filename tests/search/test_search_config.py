"""The search config: validation before any model is loaded (all errors in one ConfigError naming field, value and
fix), overrides, objective kinds, and mergekit-evolve configs accepted unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dfsmerge.errors import ConfigError
from dfsmerge.optim import OPTIMIZERS, validate_options
from dfsmerge.search import load_search_config, run_search
from dfsmerge.search.config import SyntheticObjectiveConfig, translate_mergekit_evolve
from tests.search.conftest import MC_TASK, read_evals


def test_all_errors_in_one_message(make_config):
    d = make_config("ps", "cma")
    d["genome"]["mode"] = "sideways"
    d["optimizer"] = {"name": "cma", "popsize": 1, "options": {"bogus": 1}}
    d["objectives"] = [{"name": "x", "weight": -1}]
    d["budget"] = {"max_evals": 0}
    with pytest.raises(ConfigError) as e:
        load_search_config(d)
    msg = str(e.value)
    for needle in ("genome.mode='sideways'", "optimizer.popsize=1", "weight=-1", "budget.max_evals=0"):
        assert needle in msg, msg


def test_cross_field_errors(make_config):
    d = make_config("ps", "random")
    d["genome"]["base_model"] = None
    d["optimizer"] = {"name": "random", "sigma0": 0.3}
    d["budget"] = {}
    with pytest.raises(ConfigError) as e:
        load_search_config(d)
    msg = str(e.value)
    assert "needs base_model" in msg and "sigma0=0.3 is not a setting of 'random'" in msg, msg
    assert "budget has no limit" in msg, msg


@pytest.mark.parametrize("where", ["flat", "options"])
@pytest.mark.parametrize("name", ["nsga2", "random", "llm"])
def test_sigma0_belongs_to_cma(make_config, name, where):
    """sigma0 is a setting of CMA-ES's own model: on another optimizer it is a one-line error naming it and the fix;
    on cma it reaches CMAOptions, beside name or under options."""
    d = make_config("ps", name)
    d["optimizer"] = {"name": name, **({"sigma0": 0.2} if where == "flat" else {"options": {"sigma0": 0.2}})}
    with pytest.raises(ConfigError) as e:
        load_search_config(d)
    msg = str(e.value)
    assert "\n" not in msg and f"sigma0=0.2 is not a setting of {name!r}" in msg and "a setting of cma" in msg, msg
    d["optimizer"]["name"] = "cma"
    cfg = load_search_config(d)
    assert cfg.optimizer.options == {"sigma0": 0.2}
    assert validate_options("cma", **cfg.optimizer.all_options()).sigma0 == 0.2
    assert load_search_config(cfg.to_dict()) == cfg


def test_optimizer_settings_of_old_run_configs(make_config):
    """config.yaml files written before the optimizers' own settings models carry sigma0/multi_objective: null;
    they still load. A set multi_objective names its replacement."""
    d = make_config("ps", "nsga2")
    d["optimizer"] = {"name": "nsga2", "popsize": 4, "sigma0": None, "multi_objective": None, "options": {}}
    assert load_search_config(d).optimizer.options == {}
    d["optimizer"]["multi_objective"] = False
    with pytest.raises(ConfigError, match="multi_objective=False is not an optimizer setting.*set combine: weighted"):
        load_search_config(d)


def test_layer_granularity_checked_against_the_models(make_config, tmp_path):
    d = make_config("ps", "cma")
    d["genome"]["layer_granularity"] = 3  # the tiny models have 2 layers
    with pytest.raises(ConfigError, match="layer_granularity=3 does not divide num_hidden_layers=2"):
        run_search(load_search_config(d), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()  # rejected before the run directory is created


def test_objective_kinds_and_n_obj(make_config):
    d = make_config("ps", "nsga2", objectives=["some_task", {"type": "cost", "name": "hops"},
                                               {"type": "synthetic", "name": "sphere"}])
    cfg = load_search_config(d)
    assert [o.key for o in cfg.objectives] == ["some_task", "cost/hops", "synthetic/sphere"]
    assert isinstance(cfg.objectives[2], SyntheticObjectiveConfig)
    assert cfg.n_obj == 3


def test_multi_objective_is_the_objectives_word(make_config):
    """combine decides; left out, 2+ objectives are a Pareto vector when every optimizer of the run takes one
    (whatever its name), else the weighted sum; one objective is one number."""
    three = ["some_task", {"type": "cost", "name": "hops"}, {"type": "synthetic", "name": "sphere", "weight": 0.5}]
    for name in OPTIMIZERS:
        d = make_config("ps", name, objectives=three)
        d["optimizer"] = {"name": name, **({"model": "some-model"} if name == "llm" else {})}
        cfg = load_search_config(d)
        assert cfg.multi_objective == OPTIMIZERS[name].multi_objective and cfg.n_obj == (3 if cfg.multi_objective
                                                                                        else 1), name
        assert load_search_config({**d, "combine": "weighted"}).n_obj == 1
        assert load_search_config({**d, "objectives": three[:1]}).n_obj == 1
        if OPTIMIZERS[name].multi_objective:
            assert load_search_config({**d, "combine": "pareto"}).n_obj == 3
        else:
            with pytest.raises(ConfigError) as e:
                load_search_config({**d, "combine": "pareto"})
            assert f"combine='pareto' but optimizer.name={name!r} is single-objective" in str(e.value)
    with pytest.raises(ConfigError, match="combine='pareto' needs two or more objectives"):
        load_search_config({**make_config("ps", "nsga2", objectives=three[:1]), "combine": "pareto"})
    staged = make_config("staged", "nsga2", objectives=three, stage2={"optimizer": {"name": "cma"}})
    assert load_search_config(staged).n_obj == 1  # stage 2's CMA-ES takes one number, so both stages sum
    with pytest.raises(ConfigError, match="stage2.optimizer.name='cma' is single-objective"):
        load_search_config({**staged, "combine": "pareto"})
    assert load_search_config({**staged, "stage2": {"optimizer": {"name": "random"}}}).n_obj == 3


def test_shipped_configs_keep_their_objectives_count():
    """The configs under configs/ behave as before optimizers stopped deciding multi-objective: only the NSGA-II
    one is Pareto; every CMA-ES sigma0 reaches its settings."""
    root = Path(__file__).resolve().parents[2] / "configs"
    files = [f for f in sorted(root.rglob("*.yaml")) if "tasks" not in f.parts and "recipes" not in f.parts]
    assert files
    for f in files:
        cfg = load_search_config(f)
        want = len(cfg.objectives) if f.name == "nsga2.yaml" else 1
        assert cfg.n_obj == want, f
        raw = yaml.safe_load(f.read_text()).get("optimizer") or {}
        if "sigma0" in raw:
            assert cfg.optimizer.options["sigma0"] == raw["sigma0"], f


def test_overrides_and_round_trip(make_config):
    cfg = load_search_config(make_config("dfs", "cma"))
    cfg2 = cfg.with_overrides(**{"budget.max_evals": 50, "seed": 7, "backend": None})
    assert cfg2.budget.max_evals == 50 and cfg2.seed == 7 and cfg2.backend == "local"
    assert load_search_config(yaml.safe_load(yaml.safe_dump(cfg2.to_dict()))) == cfg2
    with pytest.raises(ConfigError, match="backend"):
        cfg.with_overrides(backend="spark")


def test_relative_model_paths_resolve_against_the_config_file(tiny_models, tmp_path):
    root = tiny_models["base"].parent
    cfg_file = root / "search.yaml"
    cfg_file.write_text(yaml.safe_dump({"genome": {"mode": "dfs", "models": ["m1", "m2"]},
                                        "objectives": [{"type": "cost", "name": "hops"}],
                                        "budget": {"max_evals": 4}}))
    cfg = load_search_config(cfg_file)
    assert [m.model for m in cfg.genome.models] == [str(tiny_models["m1"]), str(tiny_models["m2"])]


MERGEKIT_EVOLVE = """\
genome:
  models:
    - {m1}
    - {m2}
  merge_method: task_arithmetic
  base_model: {base}
  layer_granularity: 1
  normalize: false
  allow_negative_weights: false
tasks:
  - name: {task}
    weight: 1.0
    metric: acc,none
limit: 8
"""


def test_mergekit_evolve_config_runs_unchanged(tiny_models, mc_task_dir, tmp_path, capsys):
    from mergekit.evo.config import EvolMergeConfiguration

    from dfsmerge.cli import main

    text = MERGEKIT_EVOLVE.format(task=MC_TASK, **{k: str(v) for k, v in tiny_models.items()})
    EvolMergeConfiguration.model_validate(yaml.safe_load(text))  # mergekit-evolve itself reads this file
    cfg_file = tmp_path / "evolve.yaml"
    cfg_file.write_text(text)
    cfg = load_search_config(cfg_file)
    assert cfg.genome.mode == "ps" and cfg.optimizer.name == "cma"
    assert abs(cfg.optimizer.options["sigma0"] - 1 / 6) < 1e-12
    assert cfg.budget.max_evals == 100 and cfg.objectives[0].limit == 8
    assert translate_mergekit_evolve(yaml.safe_load(text))["objectives"][0]["metric"] == "acc,none"
    rc = main(["search", str(cfg_file), "--out", str(tmp_path / "run"), "--task-path", str(mc_task_dir),
               "--max-evals", "4", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    evals = read_evals(tmp_path / "run")
    assert len(evals) >= 4
    for r in evals:
        acc = r["objectives"][f"{MC_TASK}/acc,none"]
        assert 0 <= acc <= 1 and r["values"][f"{MC_TASK}/acc,none"] == -acc  # higher_is_better -> minimise -acc
        assert r["fitness"] == -acc
    assert (tmp_path / "run" / "best" / "recipe.yaml").is_file()


def test_stage2_section_checked(make_config):
    d = make_config("ps", "cma", stage2={"budget": {"max_evals": 4}})
    with pytest.raises(ConfigError, match=r"stage2 is set but genome.mode='ps' has one stage; use mode: staged"):
        load_search_config(d)
    d = make_config("staged", "cma", stage2={"optimizer": {"name": "cma", "popsize": 1}})
    with pytest.raises(ConfigError, match="popsize"):
        load_search_config(d)
    cfg = load_search_config(make_config("staged", "cma", popsize=4, max_evals=8,
                                         stage2={"optimizer": {"name": "random", "popsize": 5}}))
    assert cfg.optimizer_for(1).name == "cma" and cfg.optimizer_for(2).name == "random"
    assert cfg.budget_for(2).max_evals == 8  # no stage2.budget: the top-level one


def test_cli_budget_overrides_reach_stage2(make_config, tmp_path):
    from dfsmerge.cli import main

    d = make_config("staged", "cma", popsize=3, max_evals=9, objectives=[{"type": "synthetic", "name": "sphere"}],
                    stage2={"budget": {"max_evals": 30}})
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    assert main(["search", str(cfg_path), "--out", str(tmp_path / "r"), "--quiet", "--max-evals", "6"]) == 0
    stages = [r["stage"] for r in read_evals(tmp_path / "r")]
    assert stages == [1] * 6 + [2] * 6
