"""Merging in row chunks (bounded memory) gives the whole-tensor merge bit for bit, for every registered method."""

from __future__ import annotations

import pytest
import torch

from dfsmerge.merge import get_method, registered_methods
from dfsmerge.merge.chunked import _RadixSelect, _SampledSelect
from dfsmerge.merge.sparsify import kth_largest, top_k_mask
from dfsmerge.recipe.config import MergeConfig
from dfsmerge.recipe.executor import execute_job, job_chunking, open_models, plan_merge, run_merge
from tests.recipe.test_recipe import _models_recipe

# (method, extra recipe keys): every method with the shared test recipe, plus the variants that switch a
# method between its chunked and whole-tensor paths
CASES = [(m, {}) for m in registered_methods()] + [
    ("ties", {"dtype": "bfloat16"}),  # bf16 deltas: many magnitudes tie at the threshold
    ("ties", {"parameters": {"rescale": True}}),  # L1 rescale: whole tensor
    ("breadcrumbs", {"dtype": "bfloat16"}),  # ties at both ends of the rank window
    ("breadcrumbs_ties", {"dtype": "bfloat16", "parameters": {"gamma": 0.3}}),
    ("breadcrumbs_ties", {"parameters": {"density": 1.0}}),
    ("dare_ties", {"parameters": {"density": 1.0}}),  # no draws: elementwise
    ("model_stock", {"parameters": {"filter_wise": True}}),
    ("task_arithmetic", {"out_dtype": "bfloat16"}),
    ("slerp", {"dtype": "bfloat16", "parameters": {"t": 0.7}}),
    ("nuslerp", {"parameters": {"nuslerp_flatten": False}}),  # vectors along the last axis: per row
    ("nuslerp", {"parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}),  # along dim 0: whole
    ("multislerp", {"parameters": {"normalize_weights": False}}),
    ("karcher", {"base_model": None, "parameters": {"max_iter": 3, "tol": 1e-9}}),
    ("ramplus_tl", {"parameters": {"epsilon": 0.0, "r": 0.5, "alpha": 1.0}}),
    ("sce", {"dtype": "bfloat16", "parameters": {"select_topk": 0.3}}),  # tied variances at the threshold
    ("sce", {"parameters": {"select_topk": 1.0}}),
    ("arcee_fusion", {"dtype": "bfloat16"}),
]
# what stays whole with the shared recipe (densities < 1): random draws and per-tensor cosines
WHOLE = {"dare_linear", "dare_ties", "della", "della_linear", "model_stock"}


def _plan(method: str, models: dict, extra: dict):
    recipe = _models_recipe(method, models, **extra)
    if "density" in extra.get("parameters", {}):
        for entry in recipe["models"]:
            entry.get("parameters", {}).pop("density", None)
    config = MergeConfig.model_validate(recipe)
    return plan_merge(config, open_models(config))


@pytest.mark.parametrize(("method", "extra"), CASES, ids=[f"{m}-{'-'.join(e) or 'default'}" for m, e in CASES])
def test_chunked_equals_whole(method, extra, tiny_family_models):
    plan = _plan(method, tiny_family_models["llama"], extra)
    chunked_jobs = 0
    for job in plan.jobs:
        chunked = job_chunking(plan, job, chunk_bytes=1)  # one row per chunk: as many chunks as rows
        chunked_jobs += chunked is not None
        whole = execute_job(plan, job, seed=5, chunk_bytes=None)
        parts = execute_job(plan, job, seed=5, chunk_bytes=1)
        assert parts.dtype == whole.dtype and parts.shape == whole.shape
        diff = (parts.double() - whole.double()).abs()
        assert torch.equal(parts, whole), (job.out_name, float(diff.max()), float(diff.mean()))
    given = extra.get("parameters", {})
    expect_chunked = method not in WHOLE and "rescale" not in given and not given.get("nuslerp_row_wise")
    if given.get("density") == 1.0 or given.get("filter_wise"):
        expect_chunked = True
    assert (chunked_jobs > 0) == expect_chunked, chunked_jobs


def test_declared_chunkings():
    chunkable = {m for m in registered_methods() if get_method(m).chunking is not None}
    assert {"linear", "task_arithmetic", "ties", "model_stock", "nearswap", "slerp", "nuslerp", "multislerp",
            "karcher", "breadcrumbs", "breadcrumbs_ties", "ramplus_tl", "sce", "arcee_fusion"} <= chunkable


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("quantize", [False, True])
def test_radix_select_matches_kth_largest(density, quantize):
    g = torch.Generator().manual_seed(int(density * 1000) + quantize)
    w = torch.randn(3001, generator=g).abs()
    if quantize:
        w = (w * 8).round() / 8  # many ties, zeros included
    k = max(1, int(density * w.numel()))
    sel = _RadixSelect(w.numel(), k)
    for p in range(2):
        for chunk in w.split(97):
            sel.gather(p, chunk)
        sel.end_pass(p, w.numel())
    assert sel.value == float(kth_largest(w, k))
    assert sel.greater == int((w > kth_largest(w, k)).sum())
    assert sel.greater < k <= int(top_k_mask(w, k).sum()) + sel.greater


@pytest.mark.parametrize("signed", [False, True])
def test_signed_radix_select_matches_kthvalue(signed):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(4001, generator=g) * 4).round() / 4  # ties, +0.0 and -0.0
    w = w if signed else w.abs()
    for j in (1, 700, 2000, 4001):
        sel = _RadixSelect(w.numel(), w.numel() - j + 1, signed=signed)
        for p in range(2):
            for chunk in w.split(333):
                sel.gather(p, chunk)
            sel.end_pass(p, w.numel())
        ref = torch.kthvalue(w, j).values
        assert sel.value == float(ref)
        assert (sel.below, sel.equal) == (int((w < ref).sum()), int((w == ref).sum()))


@pytest.mark.parametrize("n", [5000, 300_001])
@pytest.mark.parametrize(("miss", "levels"), [(False, 64), (True, 64), (False, 4)])
def test_sampled_select_matches_kth_largest(n, miss, levels, monkeypatch):
    if levels == 4:  # a band wider than the limit: radix passes instead of the band pass
        monkeypatch.setattr("dfsmerge.merge.chunked._BAND_LIMIT", 1000)
    g = torch.Generator().manual_seed(n)
    w = ((torch.randn(n, generator=g) * levels).round() / levels).abs()  # many ties; with 4 levels a wide band
    k = int(0.37 * n)
    sel = _SampledSelect(n, k)
    p = 0
    while p < sel.passes:
        for chunk in w.split(7777):
            sel.gather(p, chunk.numel(), lambda start, step, c=chunk: c[start::step])
        sel.end_pass(p)
        if p == 0 and miss and sel.passes > 1:
            sel.bounds = (0.0, 0.0)  # an unlucky sample: the bracket misses, radix passes follow
        p += 1
    if levels == 4 and n > 1 << 17:
        assert (sel.radix_start, sel.passes) == (1, 3)
    else:
        assert sel.passes == (1 if n < 1 << 17 else 4 if miss else 2)
    assert sel.value == float(kth_largest(w, k))
    assert sel.greater == int((w > kth_largest(w, k)).sum())


def test_run_merge_small_budget_equals_unchunked(tiny_family_models, tmp_path):
    from safetensors.torch import load_file

    recipe = _models_recipe("ties", tiny_family_models["llama"])
    config = MergeConfig.model_validate(recipe)
    a = run_merge(config, tmp_path / "a", progress=False, workers=1, memory_budget="100GB")
    b = run_merge(config, tmp_path / "b", progress=False, workers=2, memory_budget=4_000)
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
