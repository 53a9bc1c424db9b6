"""Layer Swapping (dfsmerge.zoo.layer_swap): the recipe, run by dfsmerge merge and by mergekit itself, equals the
same model written as a layer path and exported, tensor for tensor (tiny random Llama experts of one base)."""

from __future__ import annotations

import pytest
import torch
import yaml

from dfsmerge.errors import ConfigError
from dfsmerge.export import export_plan
from dfsmerge.recipe.config import load_merge_config
from dfsmerge.recipe.executor import run_merge
from dfsmerge.zoo.layer_swap import LayerSwap, layer_swap_plan, layer_swap_recipe
from dfsmerge.zoo.tiny import make_tiny_checkpoint
from tests.mergekit_oracle import load_dir, run_mergekit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    base = make_tiny_checkpoint("llama", root / "base", seed=0, num_layers=6, hidden=32)
    return {"math": make_tiny_checkpoint("llama", root / "math", seed=1, like=base, delta_std=0.2),
            "lang": make_tiny_checkpoint("llama", root / "lang", seed=2, like=base, delta_std=0.2)}


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k].float() - b[k].float()).abs().max()}"


def test_sources_and_bad_split_points():
    assert LayerSwap(10, 2, 3, 1).sources() == ["lang"] * 2 + ["avg"] + ["math"] * 3 + ["avg"] + ["lang"] * 3
    with pytest.raises(ConfigError, match="math layers"):
        LayerSwap(6, 3, 3, 0)
    with pytest.raises(ConfigError, match="bottom"):
        LayerSwap(6, 0, 2, 0)


@pytest.mark.parametrize("transition", [0, 1])
def test_recipe_equals_plan_export_and_mergekit(experts, tmp_path, transition):
    swap = LayerSwap(6, 1, 2, transition)
    recipe = layer_swap_recipe(swap, math=str(experts["math"]), lang=str(experts["lang"]))
    ours = run_merge(load_merge_config(recipe), tmp_path / "ours")
    avg = None
    if transition:  # the transition layers' source: the experts' 0.5/0.5 linear merge, every layer
        soup = {"merge_method": "linear", "parameters": {"normalize": False}, "dtype": "float32",
                "models": [{"model": str(experts[k]), "parameters": {"weight": 0.5}} for k in ("lang", "math")]}
        avg = str(run_merge(load_merge_config(soup), tmp_path / "avg"))
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(layer_swap_plan(swap, math=str(experts["math"]), lang=str(experts["lang"]),
                                                        avg=avg)))
    exported = export_plan(plan_file, tmp_path / "plan_export")
    _same(load_dir(ours), load_dir(exported))
    _same(load_dir(ours), load_dir(run_mergekit(recipe, tmp_path / "mergekit")))
