"""The kernels' references agree with mergekit 0.1.5 (the test oracle) in fp32 for the deterministic methods."""

from __future__ import annotations

import pytest
import torch

merge_api = pytest.importorskip("mergekit.merge_methods.api")

from dfsmerge.kernels import fused_merge  # noqa: E402

SHAPES = [(7,), (1, 1), (33, 65)]


def _inputs(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n - 1)]


def _assert_close(actual, expected, what, tol=1e-6):
    diff = (actual - expected).abs()
    if not bool((diff <= tol).all()):
        raise AssertionError(f"{what}: max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}")


CASES = [
    ("task_arithmetic", {"weight": [0.5, 0.3, -0.2]}, {}),
    ("task_arithmetic", {"weight": [0.5, 0.3, 0.4]}, {"normalize": True, "lambda": 0.8}),
    ("ties", {"weight": [0.6, 0.3, -0.2], "density": [0.5, 0.7, 0.2]}, {}),
    ("ties", {"weight": [0.6, 0.3, 0.2], "density": [0.5, 0.7, 0.2]}, {"normalize": False, "rescale": True}),
    ("breadcrumbs", {"weight": [0.6, 0.3, 0.2], "density": [0.5, 0.7, 0.2], "gamma": [0.05, 0.1, 0.0]}, {}),
    ("breadcrumbs_ties", {"weight": [0.6, 0.3, 0.2], "density": [0.5, 0.7, 0.4]}, {"lambda": 1.3}),
    # density 1: DARE / DELLA draw no random numbers, rescale and consensus still apply.
    ("dare_ties", {"weight": [0.6, 0.3, -0.2], "density": 1.0}, {}),
    ("dare_linear", {"weight": [0.6, 0.3, 0.2], "density": 1.0}, {"normalize": True}),
    ("della", {"weight": [0.6, 0.3, 0.2], "density": 1.0}, {}),
    ("della_linear", {"weight": [0.6, 0.3, 0.2], "density": 1.0}, {}),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("method", "per_input", "shared"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_gta_reference_matches_mergekit(method, per_input, shared, shape):
    tensors = _inputs(shape)
    expected = merge_api.merge_tensors(tensors, method, parameters={**per_input, **shared}, base_index=0)
    got = fused_merge(method, tensors, base_index=0, params=per_input, global_params=shared, backend="reference")
    _assert_close(got, expected, f"{method} {shape}")


def test_gta_reference_matches_mergekit_with_base_last():
    tensors = _inputs((33, 65))
    params = {"weight": [0.6, 0.3, 0.5], "density": [0.3, 0.6, 0.9]}
    expected = merge_api.merge_tensors(tensors, "ties", parameters=params, base_index=3)
    got = fused_merge("ties", tensors, base_index=3, params=params, backend="reference")
    _assert_close(got, expected, "ties base_index=3")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_reference_matches_mergekit(shape, normalize):
    tensors = _inputs(shape, n=3)
    params = {"weight": [0.2, 0.5, 0.6]}
    expected = merge_api.merge_tensors(tensors, "linear", parameters={**params, "normalize": normalize})
    got = fused_merge("linear", tensors, params=params, global_params={"normalize": normalize},
                      backend="reference")
    _assert_close(got, expected, f"linear {shape}")


@pytest.mark.parametrize("t", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_slerp_reference_matches_mergekit(shape, t):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    expected = merge_api.merge_tensors([a, b], "slerp", parameters={"t": t}, base_index=0)
    got = fused_merge("slerp", [a, b], base_index=0, global_params={"t": t}, backend="reference")
    _assert_close(got, expected, f"slerp {shape}")


def test_slerp_reference_matches_mergekit_colinear():
    a = torch.randn(33, 65, generator=torch.Generator().manual_seed(4))
    expected = merge_api.merge_tensors([a, -2 * a], "slerp", parameters={"t": 0.3}, base_index=0)
    got = fused_merge("slerp", [a, -2 * a], base_index=0, global_params={"t": 0.3}, backend="reference")
    _assert_close(got, expected, "slerp antipodal")
