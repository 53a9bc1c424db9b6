"""Oracle tests: dfsmerge's methods equal mergekit 0.1.5's ``merge_tensors`` within 1e-6 in float32.

Random methods are compared too: with ``seed=None`` both draw from torch's global RNG in the same order, so
seeding it identically before each call must give the same result.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dfsmerge.merge import get_method, merge_tensor
from tests.merge.conftest import random_tensors

merge_methods_api = pytest.importorskip("mergekit.merge_methods.api", reason="mergekit 0.1.5 is the test oracle")

TOL = 1e-6


def _tensors(n: int, shape: tuple[int, ...], seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    # Fine-tunes near a base, as real models: small deltas with mixed signs.
    return [base] + [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n - 1)]


def _mergekit_parameters(
    method: str, params: list[dict], global_params: dict, base_index: int | None
) -> dict[str, Any]:
    m = get_method(method)
    out: dict[str, Any] = {k: v for k, v in global_params.items() if k in {p.name for p in m.global_params()}}
    for spec in m.per_model_params():
        if not any(spec.name in p for p in params):
            if spec.name in global_params:
                out[spec.name] = global_params[spec.name]
            continue
        fallback = global_params.get(spec.name, spec.default)
        out[spec.name] = {
            i: p.get(spec.name, fallback)
            for i, p in enumerate(params)
            if not (spec.non_base and i == base_index and m.base != "none")
        }
    return out


def _compare(method, tensors, base_index, params, global_params, *, seed_global: int | None = None, tol=TOL):
    if seed_global is not None:
        torch.manual_seed(seed_global)
    expected = merge_methods_api.merge_tensors(
        tensors,
        method,
        parameters=_mergekit_parameters(method, params, global_params, base_index),
        base_index=base_index,
        name="model.layers.0.mlp.up_proj.weight",
    )
    if seed_global is not None:
        torch.manual_seed(seed_global)
    got = merge_tensor(
        method,
        tensors,
        base_index=base_index,
        params=params,
        global_params=global_params,
        seed=None,
        name="model.layers.0.mlp.up_proj.weight",
    )
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.dtype, expected.dtype)
    diff = (got.double() - expected.double()).abs()
    assert diff.max().item() <= tol, (
        f"{method} {global_params} {params}: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"
    )


SHAPES = [(12, 10), (17,), (3, 4, 5)]


def _weights(n: int, base_index: int | None, values: list[float], key: str = "weight") -> list[dict]:
    it = iter(values)
    return [{} if i == base_index else {key: next(it)} for i in range(n)]


LINEAR_CASES = [
    ({}, [0.2, 0.5, 0.3]),
    ({}, [1.0, 2.0, -0.5]),
    ({"normalize": False}, [0.2, 0.5, 0.3]),
    ({"normalize": False}, [0.7, -0.4, 0.0]),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("global_params", "weights"), LINEAR_CASES)
@pytest.mark.parametrize("n", [2, 3])
def test_linear(shape, global_params, weights, n):
    params = [{"weight": w} for w in weights[:n]]
    _compare("linear", _tensors(n, shape, 1), None, params, global_params)


def test_linear_ignores_base_and_promotes_dtypes():
    tensors = _tensors(3, (9, 5), 2)
    tensors[1] = tensors[1].bfloat16()
    params = [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}]
    _compare("linear", tensors, 1, params, {})
    _compare("linear", [t.bfloat16() for t in tensors], None, params, {}, tol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.25])
@pytest.mark.parametrize("base_index", [0, 1])
def test_slerp(shape, t, base_index):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(shape, generator=g) for _ in range(2)]  # far apart: the spherical branch
    _compare("slerp", tensors, base_index, [{}, {}], {"t": t})


@pytest.mark.parametrize("factor", [2.0, -3.0, 0.0])
def test_slerp_colinear_antipodal_and_zero(factor):
    a = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    _compare("slerp", [a, factor * a], 0, [{}, {}], {"t": 0.4})
    _compare("slerp", [a, factor * a + 1e-4], 0, [{}, {}], {"t": 0.4})


NUSLERP_OPTIONS = [
    {},
    {"nuslerp_flatten": False},
    {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    {"nuslerp_row_wise": True},
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", NUSLERP_OPTIONS)
@pytest.mark.parametrize("base_index", [None, 0, 2])
@pytest.mark.parametrize("weights", [[0.3, 0.9], [1.0, 0.0], [0.5, -0.5]])
def test_nuslerp(shape, options, base_index, weights):
    n = 2 if base_index is None else 3
    tensors = _tensors(n, shape, 5)
    if base_index is None:
        tensors = [tensors[0], torch.randn(shape, generator=torch.Generator().manual_seed(6))]
    _compare("nuslerp", tensors, base_index, _weights(n, base_index, weights), options)


def test_nuslerp_colinear_rows():
    a = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    b = a.clone()
    b[1] = -2 * a[1]  # one antipodal row, one identical row (0), others differ
    b[2:] = torch.randn(3, 4, generator=torch.Generator().manual_seed(8))
    for options in NUSLERP_OPTIONS:
        _compare("nuslerp", [a, b], None, [{"weight": 0.4}, {"weight": 0.6}], options)


GTA_CASES = [
    ({}, [0.7, 0.4], [0.5, 0.3]),
    ({"normalize": True}, [0.7, 0.4], [0.5, 0.3]),
    ({"normalize": False}, [1.0, 1.0], [0.2, 0.9]),
    ({"lambda": 0.6}, [0.7, -0.4], [0.5, 0.5]),
    ({"int8_mask": True, "normalize": True, "lambda": 1.5}, [0.3, 0.8], [0.4, 0.7]),
    ({"rescale": True}, [0.5, 0.5], [0.3, 0.6]),
    ({"normalize": True}, [0.5, -0.5], [0.6, 0.6]),  # weights summing to zero
    ({}, [0.5, 0.8], [1.0, 0.0]),
]
DETERMINISTIC_GTA = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]


@pytest.mark.parametrize("method", DETERMINISTIC_GTA)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("global_params", "weights", "densities"), GTA_CASES)
def test_gta_deterministic(method, shape, global_params, weights, densities):
    params = [{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)]
    _compare(method, _tensors(3, shape, 9), 0, params, global_params)


@pytest.mark.parametrize("method", DETERMINISTIC_GTA)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_gta_model_counts_and_base_position(method, n):
    tensors = _tensors(n, (10, 6), 10)
    tensors = tensors[1:] + tensors[:1]  # base last
    base_index = n - 1
    params = [{"weight": 0.3 + 0.1 * i, "density": 0.6} for i in range(n - 1)] + [{}]
    _compare(method, tensors, base_index, params, {})


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.2), (0.8, 0.5), (0.0, 0.1)])
def test_breadcrumbs_gamma(method, density, gamma):
    params = [{}, {"weight": 0.6, "density": density, "gamma": gamma}, {"weight": 0.4, "density": 0.5}]
    _compare(method, _tensors(3, (20, 10), 11), 0, params, {})


@pytest.mark.parametrize("shape", [*SHAPES, (6, 1)])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [3, 4])
def test_model_stock(shape, filter_wise, n):
    _compare("model_stock", _tensors(n, shape, 12), 0, [{}] * n, {"filter_wise": filter_wise})


def test_model_stock_singular_keeps_base():
    base, a = _tensors(2, (4, 3), 13)
    b = 2 * base - a  # opposite task vectors: cos = -1, 1 + (N-1) cos = 0
    _compare("model_stock", [base, a, b], 0, [{}] * 3, {})


@pytest.mark.parametrize("scale", [None, 0.5, -2.0])
def test_passthrough(scale):
    params = [{} if scale is None else {"scale": scale}]
    _compare("passthrough", _tensors(1, (5, 3), 14), None, params, {})


RANDOM_CASES = [
    ({}, [0.5, 0.3]),
    ({"rescale": False, "normalize": True, "lambda": 0.8}, [0.7, 0.7]),
    ({"int8_mask": True}, [0.25, 1.0]),
]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("global_params", "densities"), RANDOM_CASES)
def test_random_methods_with_the_same_global_rng(method, shape, global_params, densities):
    params = [{}, {"weight": 0.6, "density": densities[0]}, {"weight": 0.5, "density": densities[1]}]
    if method.startswith("della"):
        params[1]["epsilon"] = 0.1
    _compare(method, _tensors(3, shape, 15), 0, params, global_params, seed_global=2024)


# ---- sce, multislerp, karcher, nearswap, arcee_fusion, ram, ramplus_tl ----------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("global_params", [{}, {"select_topk": 0.5}, {"select_topk": 0.13, "int8_mask": True},
                                           {"select_topk": 0.0}, {"select_topk": 1.0, "int8_mask": True}])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_sce(shape, global_params, n):
    tensors = _tensors(n, shape, 20)
    _compare("sce", tensors[1:] + tensors[:1], n - 1, [{}] * n, global_params)  # base last


def test_sce_zero_task_vectors_weigh_uniformly():
    base, ft = _tensors(2, (6, 5), 21)
    _compare("sce", [base, base.clone(), ft], 0, [{}] * 3, {"select_topk": 0.4})
    _compare("sce", [base, base.clone(), base.clone()], 0, [{}] * 3, {})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("base_index", [None, 0, 2])
@pytest.mark.parametrize(("global_params", "weights"), [
    ({}, [0.3, 0.9]),
    ({}, [1.0, 2.0, 0.5]),
    ({"normalize_weights": False}, [0.3, 0.4]),
    ({"normalize_weights": False, "eps": 1e-4}, [0.5, 0.2, 0.7]),
    ({}, [0.6]),
])
def test_multislerp(shape, base_index, global_params, weights):
    k = len(weights)
    n = k + (base_index is not None)
    if base_index == 2 and n < 3:
        base_index = n - 1
    tensors = _tensors(n, shape, 22) if base_index is not None else random_tensors(n, shape, seed=23)
    _compare("multislerp", tensors, base_index, _weights(n, base_index, weights), global_params)


def test_multislerp_antipodal_pair_falls_back_to_linear():
    a = torch.randn(5, 4, generator=torch.Generator().manual_seed(24))
    _compare("multislerp", [a, -a], None, [{"weight": 0.5}, {"weight": 0.5}], {})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("global_params", [{}, {"max_iter": 0}, {"max_iter": 1}, {"max_iter": 60, "tol": 1e-7},
                                           {"tol": 0.5}])
def test_karcher(shape, n, global_params):
    _compare("karcher", random_tensors(n, shape, seed=25), None, [{}] * n, global_params)


def test_karcher_zero_identical_and_ignored_base():
    a, b = random_tensors(2, (6, 3), seed=26)
    _compare("karcher", [a, torch.zeros_like(a), b], None, [{}] * 3, {})  # a zero-norm input leaves the average
    _compare("karcher", [torch.zeros_like(a)] * 2, None, [{}] * 2, {})
    _compare("karcher", [a, a.clone(), 2 * a], None, [{}] * 3, {})  # one direction: theta < tol everywhere
    _compare("karcher", [a, b], 1, [{}] * 2, {})  # the base is an ordinary input


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.05, 0.5, 10.0])
@pytest.mark.parametrize("base_index", [0, 1])
def test_nearswap(shape, t, base_index):
    _compare("nearswap", _tensors(2, shape, 27), base_index, [{}, {}], {"t": t})


@pytest.mark.parametrize("shape", [*SHAPES, (40, 33), (1, 7)])
@pytest.mark.parametrize("base_index", [0, 1])
def test_arcee_fusion(shape, base_index):
    tensors = _tensors(2, shape, 28)
    if base_index == 1:
        tensors = tensors[::-1]
    _compare("arcee_fusion", tensors, base_index, [{}, {}], {})


def _sparse_finetunes(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    # Task vectors that are exactly zero on random entries, so contributions overlap on some entries only.
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    out = [base]
    for _ in range(n - 1):
        delta = 0.1 * torch.randn(shape, generator=g)
        delta[torch.rand(shape, generator=g) < 0.5] = 0
        delta[torch.rand(shape, generator=g) < 0.1] *= 1e-4  # below the default epsilon
        out.append(base + delta)
    return out


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("global_params", [{}, {"epsilon": 0.0}, {"epsilon": 0.05}])
def test_ram(method, shape, n, global_params):
    tensors = _sparse_finetunes(n, shape, 29)
    _compare(method, tensors, 0, [{}] * n, global_params)


@pytest.mark.parametrize("global_params", [{"r": 0.5, "alpha": 0.9}, {"r": 2.0, "alpha": 0.05}, {"r": 0.0}])
def test_ramplus_tl_rescale(global_params):
    tensors = _sparse_finetunes(3, (16, 12), 30)
    _compare("ramplus_tl", tensors[1:] + tensors[:1], 2, [{}] * 3, global_params)
