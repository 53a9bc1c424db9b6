"""``fused_merge`` (reference path) agrees with the merge library's ``merge_tensor`` for deterministic methods.

Both implement mergekit 0.1.5 semantics independently; fp32 inputs without tied magnitudes (tie-breaking at a
magnitude threshold is unspecified in mergekit and may differ between the two).
"""

from __future__ import annotations

import pytest
import torch

merge = pytest.importorskip("dfsmerge.merge")

from dfsmerge.kernels import fused_merge  # noqa: E402

WEIGHTS = [(0.6, 0.5), (0.3, 0.7), (-0.2, 0.3)]
CASES = [
    ("task_arithmetic", {}),
    ("ties", {}),
    ("ties", {"normalize": False}),
    ("breadcrumbs", {}),
    ("breadcrumbs_ties", {}),
    ("dare_ties", {}),  # density 1 below: no random draw
    ("dare_linear", {}),
    ("della", {}),
    ("della_linear", {}),
]


def _inputs(shape=(33, 65)):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    return [base] + [base + 0.1 * torch.randn(shape, generator=g) for _ in WEIGHTS]


@pytest.mark.parametrize(("method", "glob"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_gta_agrees_with_merge_library(method, glob):
    tensors = _inputs()
    random = method.startswith(("dare", "della"))
    params = [{}] + [{"weight": w, "density": 1.0 if random else d} for w, d in WEIGHTS]
    got = fused_merge(method, tensors, base_index=0, params=params, global_params=glob, backend="reference")
    expected = merge.merge_tensor(method, tensors, base_index=0, params=params, global_params=glob, seed=0,
                                  name="t")
    diff = (got - expected).abs()
    assert diff.max().item() <= 1e-6, f"{method}: max diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


def test_linear_and_slerp_agree_with_merge_library():
    tensors = _inputs()
    params = [{"weight": w} for w in (0.1, 0.2, 0.3, 0.4)]
    got = fused_merge("linear", tensors, params=params, backend="reference")
    expected = merge.merge_tensor("linear", tensors, base_index=None, params=params, global_params={}, seed=0,
                                  name="t")
    assert (got - expected).abs().max().item() <= 1e-6
    got = fused_merge("slerp", tensors[:2], base_index=0, params=[{}, {}], global_params={"t": 0.3},
                      backend="reference")
    expected = merge.merge_tensor("slerp", tensors[:2], base_index=0, params=[{}, {}], global_params={"t": 0.3},
                                  seed=0, name="t")
    assert (got - expected).abs().max().item() <= 1e-6
