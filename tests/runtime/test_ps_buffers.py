"""PS candidates written into the resident buffers, checked against mergekit (oracle) and the merge library."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dfsmerge.genome import MERGED, Candidate, GenomeSpace, PSGenome
from dfsmerge.genome.dfs import DFSGenome
from dfsmerge.genome.plan import PathPlan
from dfsmerge.merge import merge_tensor
from dfsmerge.runtime import PSBuffers, Runtime
from dfsmerge.runtime.pool import LayerPool
from dfsmerge.zoo.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ps_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ps")
    a = make_tiny_checkpoint("llama", root / "a", seed=1, num_layers=4, hidden=32)
    b = make_tiny_checkpoint("llama", root / "b", seed=2, like=a, delta_std=0.3)
    c = make_tiny_checkpoint("llama", root / "c", seed=3, like=a, delta_std=0.3)
    return {"A": str(a), "B": str(b), "C": str(c)}


@pytest.fixture(scope="module")
def ps_pool(ps_ckpts):
    return LayerPool(ps_ckpts)


def _genomes(p):
    return {
        "ties_filters_groups": PSGenome({"B": p["B"], "C": p["C"]}, "ties", 4, base_model="A",
                                        extra_models={"A": p["A"]}, layer_granularity=2,
                                        filters=["self_attn", "mlp"]),
        "linear_smooth": PSGenome({"A": p["A"], "B": p["B"], "C": p["C"]}, "linear", 4, layer_granularity=1,
                                  smooth=True, filters=["mlp"]),
        "task_arithmetic_base_in_models": PSGenome({"A": p["A"], "B": p["B"]}, "task_arithmetic", 4,
                                                   base_model="A", allow_negative_weights=True),
        "slerp_groups": PSGenome({"A": p["A"], "B": p["B"]}, "slerp", 4, base_model="A", layer_granularity=2),
    }


def _mergekit(recipe, out_dir):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(recipe.to_mergekit()), str(out_dir),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
    sd = {}
    for f in glob.glob(f"{out_dir}/*.safetensors"):
        sd.update(load_file(f))
    return sd


@pytest.mark.parametrize("kind", ["ties_filters_groups", "linear_smooth", "task_arithmetic_base_in_models",
                                  "slerp_groups"])
def test_buffers_equal_mergekit_of_decoded_recipe(kind, ps_ckpts, ps_pool, tmp_path):
    genome = _genomes(ps_ckpts)[kind]
    lo, hi = genome.bounds
    recipe = genome.decode(np.random.default_rng(0).uniform(lo, hi))
    buffers = PSBuffers({m.name: m.model for m in ps_pool}, "A")
    ptrs = {n: t.data_ptr() for n, t in buffers._dst.items()}
    model = buffers.apply(recipe)
    want = _mergekit(recipe, tmp_path / "out")
    params = dict(model.named_parameters())
    assert set(want) == set(buffers.names)
    for name, ref in want.items():
        got = params[name]
        assert got.data_ptr() == ptrs[name], f"{name} was reallocated"
        diff = (got.float() - ref.float()).abs()
        assert torch.allclose(got.float(), ref.float(), atol=1e-6, rtol=1e-5), \
            f"{name}: max diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_random_method_buffers_equal_merge_library(ps_ckpts, ps_pool):
    """dare_ties draws random masks: compare with the merge library called tensor by tensor with the seed."""
    genome = PSGenome({"B": ps_ckpts["B"], "C": ps_ckpts["C"]}, "dare_ties", 4, base_model="A",
                      extra_models={"A": ps_ckpts["A"]}, layer_granularity=1)
    recipe = genome.decode(np.random.default_rng(1).uniform(0.2, 1.0, genome.dim))
    buffers = PSBuffers({m.name: m.model for m in ps_pool}, "A", seed=7)
    model = buffers.apply(recipe)
    srcs = {m.name: dict(m.model.named_parameters(remove_duplicate=False)) for m in ps_pool}
    params = dict(model.named_parameters(remove_duplicate=False))
    cfg = model.config.to_dict()
    for name in buffers.names:
        layer = buffers.architecture.layer_index(name)
        group = 0 if layer is None else layer
        if name in buffers.architecture.post_tensor_names(cfg):
            group = 3
        arr = recipe.array()
        per = [{"weight": float(arr[group, i, 0, 0]), "density": float(arr[group, i, 0, 1])} for i in range(2)]
        want = merge_tensor("dare_ties", [srcs["B"][name], srcs["C"][name], srcs["A"][name]], base_index=2,
                            params=per + [{}], global_params={"normalize": recipe.normalize}, seed=7, name=name)
        assert torch.equal(params[name], want), name


def test_joint_runtime_merged_model_is_model_a(ps_ckpts):
    pool = LayerPool(ps_ckpts)
    runtime = Runtime(pool, ps_template="A", merged_as_base=True)
    assert pool.base == MERGED and pool.names[0] == MERGED
    ps = PSGenome({"B": ps_ckpts["B"], "C": ps_ckpts["C"]}, "task_arithmetic", 4, base_model="A",
                  extra_models={"A": ps_ckpts["A"]})
    dfs = DFSGenome({MERGED: 4, "B": 4}, repetitions=2)
    space = GenomeSpace("joint", ps=ps, dfs=dfs)
    cand = space.decode(space.initial())
    model = runtime.prepare(cand)
    ids = torch.randint(5, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = runtime.buffers.model(ids).logits  # vanilla HF forward of the merged model
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    # a second PS candidate rewrites the same storage the stitched model reads
    x = space.initial()
    x[: ps.dim] = 0.9
    cand2 = space.decode(x)
    model2 = runtime.prepare(cand2)
    assert model2 is model
    with torch.no_grad():
        want2 = runtime.buffers.model(ids).logits
        got2 = model2(ids).logits
    assert not torch.allclose(want, want2)
    assert torch.allclose(got2, want2, atol=1e-5)


def test_ps_only_runtime_returns_merged_hf_model(ps_ckpts, ps_pool):
    runtime = Runtime(ps_pool, ps_template="A")
    genome = PSGenome({"A": ps_ckpts["A"], "B": ps_ckpts["B"]}, "linear", 4)
    cand = Candidate(genome.decode(genome.initial()), None)
    model = runtime.prepare(cand)
    assert model is runtime.buffers.model
    w = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    a = dict(ps_pool["A"].model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    b = dict(ps_pool["B"].model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert torch.allclose(w, (a + b) / 2, atol=1e-6)
    assert isinstance(PathPlan.identity("A", 4), PathPlan)


@pytest.mark.parametrize("kind", ["ties_filters_groups", "linear_smooth", "dare_ties", "slerp_groups"])
def test_buffers_equal_dfsmerge_merge_cli(kind, ps_ckpts, ps_pool, tmp_path):
    """The resident buffers equal `dfsmerge merge` of the decoded recipe's YAML, tensor for tensor."""
    from dfsmerge.cli import main

    if kind == "dare_ties":
        genome = PSGenome({"B": ps_ckpts["B"], "C": ps_ckpts["C"]}, "dare_ties", 4, base_model="A",
                          extra_models={"A": ps_ckpts["A"]}, layer_granularity=2, filters=["mlp"])
    else:
        genome = _genomes(ps_ckpts)[kind]
    lo, hi = genome.bounds
    recipe = genome.decode(np.random.default_rng(3).uniform(lo, hi))
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    assert main(["merge", str(tmp_path / "recipe.yaml"), str(tmp_path / "out"), "--seed", "7", "--quiet"]) == 0
    want = {}
    for f in glob.glob(f"{tmp_path}/out/*.safetensors"):
        want.update(load_file(f))
    model = PSBuffers({m.name: m.model for m in ps_pool}, "A", seed=7).apply(recipe)
    params = dict(model.named_parameters())
    assert set(want) == set(params)
    for name, ref in want.items():
        diff = (params[name].float() - ref.float()).abs()
        assert torch.equal(params[name], ref), f"{name}: max diff {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.parametrize("kind", ["ties_filters_groups", "linear_smooth", "task_arithmetic_base_in_models",
                                  "slerp_groups"])
def test_fused_entry_point_path_equals_merge_library(kind, ps_ckpts, ps_pool):
    """The CUDA path hands the same parameters to dfsmerge.kernels.fused_merge (checked here via its reference)."""
    genome = _genomes(ps_ckpts)[kind]
    lo, hi = genome.bounds
    recipe = genome.decode(np.random.default_rng(4).uniform(lo, hi))
    sources = {m.name: m.model for m in ps_pool}
    lib = dict(PSBuffers(sources, "A", use_kernels=False).apply(recipe).named_parameters())
    fused = dict(PSBuffers(sources, "A", use_kernels="always").apply(recipe).named_parameters())
    for name, want in lib.items():
        diff = (fused[name] - want).abs()
        assert torch.allclose(fused[name], want, atol=1e-6, rtol=1e-5), f"{name}: max diff {diff.max():.3g}"


def test_kept_merges_are_copied_back_bit_for_bit(ps_ckpts, ps_pool):
    # racing applies each candidate's recipe once per block, between the other candidates' blocks: a kept copy is
    # restored instead of merged again, and gives exactly the weights a fresh merge gives (dare_ties: random masks)
    genome = PSGenome({"B": ps_ckpts["B"], "C": ps_ckpts["C"]}, "dare_ties", 4, base_model="A",
                      extra_models={"A": ps_ckpts["A"]}, layer_granularity=1)
    rng = np.random.default_rng(3)
    recipes = [genome.decode(rng.uniform(0.2, 1.0, genome.dim)) for _ in range(3)]
    sources = {m.name: m.model for m in ps_pool}
    fresh = PSBuffers(sources, "A", seed=7)
    want = [{n: t.clone() for n, t in fresh.apply(r).named_parameters()} for r in recipes]
    kept = PSBuffers(sources, "A", seed=7, keep_mb=64)
    ptrs = {n: t.data_ptr() for n, t in kept._dst.items()}
    for _ in range(3):  # three blocks, round robin over the candidates
        for r, w in zip(recipes, want, strict=True):
            got = dict(kept.apply(r).named_parameters())
            assert all(torch.equal(got[n], w[n]) for n in w)
    assert (kept.merges, kept.restores) == (3, 6)
    assert all(t.data_ptr() == ptrs[n] for n, t in kept._dst.items())
    kept.forget()
    kept.apply(recipes[0])
    assert kept.merges == 4

    size = sum(t.numel() * t.element_size() for t in kept._dst.values())
    small = PSBuffers(sources, "A", seed=7, keep_mb=1.5 * size / 2**20)  # room for one copy: first come, first kept
    for _ in range(2):
        for r in recipes:
            small.apply(r)
    assert (small.merges, small.restores) == (5, 1)
    none = PSBuffers(sources, "A", seed=7)
    for r in recipes * 2:
        none.apply(r)
    assert (none.merges, none.restores) == (6, 0)
