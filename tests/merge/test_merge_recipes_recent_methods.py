"""`dfsmerge merge` against mergekit 0.1.5's ``run_merge`` for sce, multislerp, karcher, nearswap, arcee_fusion,
ram and ramplus_tl: several recipes each with gradients, filters, per-model and per-slice parameters, within 1e-6
in float32 on tiny checkpoints (tests/recipe/test_recipe.py runs one default recipe of every method on every
family)."""

from __future__ import annotations

import pytest

from dfsmerge.recipe.config import load_merge_config
from dfsmerge.recipe.executor import run_merge
from tests.recipe.test_recipe import _assert_same, _mergekit


def _models(m, names, params=None):
    return [{"model": str(m[n]), **({"parameters": params[i]} if params and params[i] else {})}
            for i, n in enumerate(names)]


def _recipes(m):
    b = str(m["base"])
    yield "sce-gradient-filter", {
        "merge_method": "sce", "base_model": b, "models": _models(m, ["ft1", "ft2", "ft3"]),
        "parameters": {"select_topk": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.5}], "int8_mask": True}}
    yield "sce-slices", {
        "merge_method": "sce", "slices": [
            {"sources": [{"model": str(m[n]), "layer_range": [0, 1]} for n in ("base", "ft1", "ft2")],
             "base_model": b, "parameters": {"select_topk": 0.3}},
            {"sources": [{"model": str(m[n]), "layer_range": [1, 2]} for n in ("base", "ft3")], "base_model": b}]}
    yield "multislerp-no-base", {
        "merge_method": "multislerp", "models": _models(m, ["ft1", "ft2", "ft3"], [
            {"weight": [0.2, 0.9]}, {"weight": [{"filter": "self_attn", "value": 0.1}, {"value": 0.6}]},
            {"weight": 0.4}])}
    yield "multislerp-base-unnormalized", {
        "merge_method": "multislerp", "base_model": b, "models": _models(m, ["ft1", "ft2"], [
            {"weight": 0.3}, {"weight": [0.5, 0.1]}]), "parameters": {"normalize_weights": False, "eps": 1e-6}}
    yield "karcher-iterations", {
        "merge_method": "karcher", "models": _models(m, ["ft1", "ft2", "ft3"]),
        "parameters": {"max_iter": [{"filter": "mlp", "value": 2}, {"value": 30}], "tol": 1e-7}}
    yield "karcher-with-base", {
        "merge_method": "karcher", "base_model": b, "models": _models(m, ["ft1", "ft2"])}
    yield "nearswap-gradient", {
        "merge_method": "nearswap", "base_model": b, "models": _models(m, ["ft2"]),
        "parameters": {"t": [0.001, 0.3]}}
    yield "nearswap-slices", {
        "merge_method": "nearswap", "slices": [
            {"sources": [{"model": b, "layer_range": [1, 2]}, {"model": str(m["ft1"]), "layer_range": [0, 1]}],
             "base_model": b, "parameters": {"t": [{"filter": "o_proj", "value": 0.5}, {"value": 0.02}]}},
            {"sources": [{"model": b, "layer_range": [0, 1]}, {"model": str(m["ft3"]), "layer_range": [1, 2]}],
             "base_model": str(m["ft3"]), "parameters": {"t": 0.1}}]}
    yield "arcee_fusion", {"merge_method": "arcee_fusion", "base_model": b, "models": _models(m, ["ft1"])}
    yield "arcee_fusion-slices", {
        "merge_method": "arcee_fusion", "slices": [
            {"sources": [{"model": str(m["ft2"]), "layer_range": [1, 2]}, {"model": b, "layer_range": [0, 1]}],
             "base_model": b},
            {"sources": [{"model": str(m["ft1"]), "layer_range": [0, 1]}, {"model": b, "layer_range": [1, 2]}],
             "base_model": str(m["ft1"])}]}
    yield "ram-epsilon", {
        "merge_method": "ram", "base_model": b, "models": _models(m, ["ft1", "ft2", "ft3"]),
        "parameters": {"epsilon": [{"filter": "mlp", "value": [0.1, 0.3]}, {"value": 0.2}]}}
    yield "ramplus_tl", {
        "merge_method": "ramplus_tl", "base_model": b, "models": _models(m, ["ft1", "ft2"]),
        "parameters": {"epsilon": 0.25, "r": [0.5, 2.0], "alpha": [{"filter": "self_attn", "value": 0.9},
                                                                       {"value": 0.05}]}}


CASES = [name for name, _ in _recipes({k: "" for k in ("base", "ft1", "ft2", "ft3")})]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("case", CASES)
def test_recent_methods_match_mergekit(case, family, tiny_family_models, tmp_path):
    recipe = dict(_recipes(tiny_family_models[family]))[case]
    recipe["dtype"] = "float32"  # slices keep 2 layers: mergekit does not rewrite qwen3/gemma2's layer_types
    ours = run_merge(load_merge_config(recipe), tmp_path / "ours", progress=False)
    _assert_same(ours, _mergekit(recipe, tmp_path / "mk"))
