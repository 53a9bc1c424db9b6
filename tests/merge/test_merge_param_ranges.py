"""Parameter ranges: every declared range is enforced by the merge library and by `dfsmerge merge` (one-line error
naming the field, the value and the fix, exit status 2, no output directory)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from dfsmerge.errors import MergeError
from dfsmerge.merge import get_method, merge_tensor, registered_methods
from tests.recipe.test_recipe import _models_recipe

METHODS = registered_methods()
RANGED = [(m, p.name) for m in METHODS for p in get_method(m).params if p.range_text()]


def _outside(spec) -> list[float]:
    """Values just outside each declared bound."""
    values = []
    step = 1 if spec.kind is int else 0.5
    if spec.ge is not None:
        values.append(spec.ge - step)
    if spec.gt is not None:
        values.append(spec.gt)
    if spec.le is not None:
        values.append(spec.le + step)
    if spec.lt is not None:
        values.append(spec.lt)
    return values


def _inside(spec) -> list[float]:
    """The closed bounds themselves (valid)."""
    return [v for v in (spec.ge, spec.le) if v is not None]


def _with_value(call, spec, value):
    if spec.per_model:
        params = [p if (spec.non_base and i == call.base_index) else {**p, spec.name: value}
                  for i, p in enumerate(call.params)]
        return {**call.kwargs(), "params": params}
    return {**call.kwargs(), "global_params": {**call.global_params, spec.name: value}}


def test_every_fraction_and_tolerance_has_a_range():
    # the ranges the issue names, read from the registry
    for method in METHODS:
        for p in get_method(method).params:
            if p.name in ("density", "gamma", "select_topk"):
                assert p.range_text() == "in [0, 1]", (method, p.name)
            if p.name in ("epsilon", "max_iter", "r", "alpha"):
                assert p.range_text() == ">= 0", (method, p.name)
            if p.name in ("tol", "eps"):
                assert p.range_text() == "> 0", (method, p.name)


@pytest.mark.parametrize(("method", "param"), RANGED)
def test_library_rejects_values_outside_the_range(method, param, valid_call):
    spec = get_method(method).param(param)
    call = valid_call(method)
    for value in _outside(spec):
        with pytest.raises(MergeError, match=rf"{param}={value!r}.*outside the valid range.*use a value"):
            merge_tensor(method, call.tensors, **_with_value(call, spec, value), seed=0, name="w")
    for value in _inside(spec):
        if param == "epsilon" and method.startswith("della"):
            value = 0.0  # della also needs epsilon < min(density, 1 - density)
        out = merge_tensor(method, call.tensors, **_with_value(call, spec, value), seed=0, name="w")
        assert out.shape == call.tensors[0].shape


def test_integer_parameter_rejects_fractions(valid_call):
    call = valid_call("karcher")
    with pytest.raises(MergeError, match=r"max_iter=2.5.*not an integer"):
        merge_tensor("karcher", call.tensors, **{**call.kwargs(), "global_params": {"max_iter": 2.5}})


def _bad_setting(method: str) -> tuple[str, str, object, str]:
    """(scope, parameter, value, expected message part) of an invalid value for ``method``."""
    m = get_method(method)
    ranged = [p for p in m.params if p.range_text()]
    if ranged:
        spec = ranged[0]
        return ("model" if spec.per_model else "global"), spec.name, _outside(spec)[-1], "outside the valid range"
    flag = next((p for p in m.params if p.kind is bool), None)
    if flag is not None:
        return "global", flag.name, "maybe", "not a boolean"
    number = next((p for p in m.params if p.kind is float), None)
    if number is not None:
        return ("model" if number.per_model else "global"), number.name, "abc", "not a number"
    return "global", "densty", 0.5, "unknown parameter"


@pytest.mark.parametrize("method", METHODS)
def test_cli_rejects_invalid_values_before_writing(method, tiny_family_models, tmp_path, capsys):
    from dfsmerge.cli import main

    recipe = _models_recipe(method, tiny_family_models["llama"])
    scope, name, value, needle = _bad_setting(method)
    if scope == "model":
        recipe["models"][0].setdefault("parameters", {})[name] = [{"filter": "mlp", "value": [0.5, value]},
                                                                  {"value": 0.5}]
        field = "models[0].parameters"
    else:
        recipe.setdefault("parameters", {})[name] = value
        field = "parameters"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["merge", str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err and f"{field}" in err, err
    if needle != "unknown parameter":  # a method without parameters: the unknown name is the error
        assert f"{name}={value!r}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # no output, no temporary directory


def test_ties_density_above_one_exits_2(tiny_family_models, tmp_path):
    m = tiny_family_models["llama"]
    recipe = {"merge_method": "ties", "base_model": str(m["base"]), "dtype": "float32",
              "models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.5, "density": 1.5}},
                         {"model": str(m["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    path = tmp_path / "ties.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = subprocess.run([sys.executable, "-m", "dfsmerge.cli", "merge", str(path), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (
        "dfsmerge: error: MergeError: ties: density=1.5 (in models[0].parameters) is outside the valid range "
        "([0, 1]); use a value in [0, 1] (fraction of each task vector kept)")
    assert not (tmp_path / "out").exists()
