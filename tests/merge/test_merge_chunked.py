"""Merging in row chunks (bounded memory) gives the whole-tensor merge bit for bit, for every registered method."""

from __future__ import annotations

import pytest
import torch

from dfsmerge.config import MergeConfig
from dfsmerge.merge import get_method, registered_methods
from dfsmerge.merge.chunked import _RadixSelect
from dfsmerge.merge.sparsify import kth_largest, top_k_mask
from dfsmerge.recipe import execute_job, job_chunking, open_models, plan_merge, run_merge
from tests.test_recipe import _models_recipe

# (method, extra recipe keys): every method with the shared test recipe, plus the variants that switch a
# method between its chunked and whole-tensor paths
CASES = [(m, {}) for m in registered_methods()] + [
    ("ties", {"dtype": "bfloat16"}),  # bf16 deltas: many magnitudes tie at the threshold
    ("ties", {"parameters": {"rescale": True}}),  # L1 rescale: whole tensor
    ("breadcrumbs_ties", {"parameters": {"density": 1.0}}),
    ("dare_ties", {"parameters": {"density": 1.0}}),  # no draws: elementwise
    ("model_stock", {"parameters": {"filter_wise": True}}),
    ("task_arithmetic", {"out_dtype": "bfloat16"}),
]
# what stays whole with the shared recipe (densities < 1): random draws, rank windows, per-tensor cosines
WHOLE = {"arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
         "karcher", "model_stock", "multislerp", "nuslerp", "ramplus_tl", "sce", "slerp"}


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
    expect_chunked = method not in WHOLE and "rescale" not in extra.get("parameters", {})
    if extra.get("parameters", {}).get("density") == 1.0 or extra.get("parameters", {}).get("filter_wise"):
        expect_chunked = True
    assert (chunked_jobs > 0) == expect_chunked, chunked_jobs


def test_declared_chunkings():
    chunkable = {m for m in registered_methods() if get_method(m).chunking is not None}
    assert {"linear", "task_arithmetic", "ties", "model_stock", "nearswap"} <= chunkable
    assert not {"slerp", "karcher", "multislerp", "sce", "arcee_fusion"} & chunkable


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


def test_run_merge_small_budget_equals_unchunked(tiny_family_models, tmp_path):
    from safetensors.torch import load_file

    recipe = _models_recipe("ties", tiny_family_models["llama"])
    config = MergeConfig.model_validate(recipe)
    a = run_merge(config, tmp_path / "a", progress=False, workers=1, memory_budget="100GB")
    b = run_merge(config, tmp_path / "b", progress=False, workers=2, memory_budget=4_000)
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
