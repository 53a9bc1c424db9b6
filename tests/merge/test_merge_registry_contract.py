"""The merge registry is the one source of truth of a method: every registered method goes through `dfsmerge merge`,
PS genome decoding (where it declares genes) and the fused kernels (where it declares one), and what the registry
declares (genes, ranges, kernels, base requirement) is what those parts use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dfsmerge.errors import ConfigError
from dfsmerge.genome import PSGenome
from dfsmerge.merge import get_method, merge_tensor, registered_methods
from tests.recipe.test_recipe import _models_recipe

METHODS = registered_methods()
GENOME_METHODS = [m for m in METHODS if get_method(m).genes]
KERNEL_METHODS = [m for m in METHODS if get_method(m).kernel is not None]


@pytest.mark.parametrize("method", METHODS)
def test_declarations_are_consistent(method):
    m = get_method(method)
    for gene in m.genes:
        spec = m.param(gene.name)
        lo = -gene.high if gene.signed else gene.low
        assert gene.low < gene.high
        assert spec.in_range(lo) and spec.in_range(gene.high), (gene, spec.range_text())
        assert gene.initial is None or gene.low <= gene.initial <= gene.high
    for spec in m.params:
        if spec.default is not None and not spec.required and spec.kind is not bool:
            assert spec.in_range(spec.default), (spec.name, spec.default, spec.range_text())


def test_genome_and_kernels_read_the_registry():
    from dfsmerge.genome import METHOD_GENES
    from dfsmerge.kernels import KERNELS, METHOD_NAMES

    declared = {m: tuple(g.name for g in get_method(m).genes) for m in GENOME_METHODS}
    assert declared == METHOD_GENES
    assert set(METHOD_NAMES) == set(KERNEL_METHODS)
    assert all(get_method(m).kernel in KERNELS for m in KERNEL_METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_through_dfsmerge_merge(method, tiny_family_models, tmp_path, capsys):
    from dfsmerge.cli import main

    m = tiny_family_models["llama"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_models_recipe(method, m)))
    assert main(["merge", str(path), str(tmp_path / "out"), "--seed", "3"]) == 0, capsys.readouterr().err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(m["base"] / "model.safetensors"))
    assert set(merged) == set(base)
    assert all(torch.isfinite(t).all() for t in merged.values())


def _genome(method: str, m: dict, **kw) -> PSGenome:
    spec = get_method(method)
    k = 2
    if spec.max_inputs is not None:
        k = spec.max_inputs - (spec.base != "none")
    elif spec.max_non_base is not None:
        k = spec.max_non_base
    models = {f"ft{i + 1}": str(m[f"ft{i + 1}"]) for i in range(k)}
    base = {} if spec.base == "none" else {"base_model": "base", "extra_models": {"base": str(m["base"])}}
    return PSGenome(models, method, 2, layer_granularity=1, dtype="float32", **base, **kw)


@pytest.mark.parametrize("method", GENOME_METHODS)
def test_every_genome_method_decodes_to_a_recipe_that_merges(method, tiny_family_models, tmp_path, capsys):
    from dfsmerge.cli import main

    genome = _genome(method, tiny_family_models["llama"])
    lo, hi = genome.bounds
    assert np.all(lo <= genome.initial()) and np.all(genome.initial() <= hi)
    x = np.random.default_rng(0).uniform(lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo))  # out of bounds too
    recipe = genome.decode(x)
    spec = get_method(method)
    for gene_name in genome.genes:  # decoded values lie in the parameter's valid range
        for layer in (0, 1, None):
            per_input, glob = recipe.tensor_params("model.layers.0.mlp.up_proj.weight", layer)
            values = [glob[gene_name]] if gene_name in glob else [p[gene_name] for p in per_input if p]
            assert values and all(spec.param(gene_name).in_range(v) for v in values)
    # mid-range genes for the merge: della rejects densities within its epsilon (0.15) of 0 or 1, as mergekit
    recipe = genome.decode(lo + (hi - lo) * np.random.default_rng(1).uniform(0.3, 0.7, genome.dim))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_mergekit()))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    # the genome's own per-tensor parameters give the tensor `dfsmerge merge` wrote
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    inputs = [load_file(str(p) + "/model.safetensors")[name] for p in
              [*(genome.models[k] for k in genome.models), *(genome.extra_models.values())]]
    per_input, glob = recipe.tensor_params(name, 1)
    base_index = len(inputs) - 1 if genome.base_model is not None else None
    expected = merge_tensor(method, inputs, base_index=base_index, params=per_input, global_params=glob, seed=0,
                            name=name)
    assert torch.equal(merged[name], expected)


@pytest.mark.parametrize("method", [m for m in METHODS if not get_method(m).genes])
def test_methods_without_genes_have_no_genome(method, tiny_family_models):
    with pytest.raises(ConfigError, match=f"merge_method='{method}' has no searchable parameters"):
        _genome(method, tiny_family_models["llama"])


@pytest.mark.parametrize("method", GENOME_METHODS)
def test_base_requirement_comes_from_the_registry(method, tiny_family_models):
    spec = get_method(method)
    genome = _genome(method, tiny_family_models["llama"])
    if spec.base == "required":
        with pytest.raises(ConfigError, match="needs base_model"):
            PSGenome(dict(genome.models), method, 2)


@pytest.mark.parametrize("method", KERNEL_METHODS)
def test_fused_reference_path_equals_the_merge_library(method, valid_call):
    from dfsmerge.kernels import fused_merge

    call = valid_call(method, (9, 7))
    got = fused_merge(method, call.tensors, base_index=call.base_index, params=call.params,
                      global_params=call.global_params, seed=0, backend="reference")
    want = merge_tensor(method, call.tensors, **call.kwargs(), seed=0, name="w")
    if get_method(method).random:  # both draw a mask; the RNG streams differ (dfsmerge.kernels documents it)
        assert got.shape == want.shape and torch.isfinite(got).all()
    else:
        assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("method", [m for m in KERNEL_METHODS if "density" in {p.name for p in get_method(m).params}])
def test_fused_path_checks_ranges(method, valid_call):
    from dfsmerge.errors import MergeError
    from dfsmerge.kernels import fused_merge

    call = valid_call(method)
    params = [p if i == call.base_index else {**p, "density": 1.5} for i, p in enumerate(call.params)]
    with pytest.raises(MergeError, match=r"density=1.5.*outside the valid range"):
        fused_merge(method, call.tensors, base_index=call.base_index, params=params,
                    global_params=call.global_params, backend="reference")
