"""Fused linear and slerp kernels vs their eager references, in the Triton CPU interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dfsmerge.kernels.linear import linear_reference, linear_triton  # noqa: E402
from dfsmerge.kernels.slerp import slerp_reference, slerp_triton  # noqa: E402

SHAPES = [(7,), (1, 1), (33, 65)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _tensors(n, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def assert_close(actual, expected, tol, what):
    diff = (actual.float() - expected.float()).abs()
    bound = tol * (1 + expected.float().abs())
    if not bool((diff <= bound).all()):
        raise AssertionError(
            f"{what}: max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g} (tolerance {tol:g})"
        )


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_kernel_matches_reference(shape, dtype, normalize):
    xs = _tensors(3, shape, dtype)
    weights = [0.5, 0.3, -0.1]
    out = linear_triton(xs, weights=weights, normalize=normalize, block=1024)
    assert out.dtype == dtype
    assert_close(out, linear_reference(xs, weights=weights, normalize=normalize), TOL[dtype], f"linear {shape}")


def test_linear_one_hot_returns_that_tensor():
    xs = _tensors(3, (33, 65), torch.bfloat16)
    assert torch.equal(linear_triton(xs, weights=[0.0, 1.0, 0.0]), xs[1])


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_slerp_kernel_matches_reference(shape, dtype, t):
    a, b = _tensors(2, shape, dtype)
    out = slerp_triton(t, a, b, block=1024)
    assert out.dtype == dtype
    assert_close(out, slerp_reference(t, a, b), TOL[dtype], f"slerp t={t} {shape}")


@pytest.mark.parametrize("scale", [2.0, -3.0])
def test_slerp_colinear_falls_back_to_lerp(scale):
    (a,) = _tensors(1, (33, 65), torch.float32)
    b = a * scale  # colinear (scale > 0) or antipodal (scale < 0): |dot| = 1 > 0.9995
    out = slerp_triton(0.25, a, b, block=512)
    assert_close(out, 0.75 * a + 0.25 * b, 1e-6, "colinear slerp")


def test_slerp_t0_returns_base_and_out_aliases():
    a, b = _tensors(2, (33, 65), torch.bfloat16)
    assert_close(slerp_triton(0.0, a, b), a, 1e-6, "slerp t=0")
    resident = a.clone()
    expected = slerp_triton(0.6, a, b)
    slerp_triton(0.6, resident, b, out=resident)
    assert torch.equal(resident, expected)


LARGE = [pytest.param(d, marks=() if d == torch.bfloat16 else pytest.mark.slow, id=str(d)) for d in DTYPES]


@pytest.mark.parametrize("dtype", LARGE)
def test_slerp_large_odd_shape(dtype):
    a, b = _tensors(2, (1151, 4099), dtype)
    assert_close(slerp_triton(0.4, a, b, block=65536), slerp_reference(0.4, a, b), TOL[dtype], "slerp 1151x4099")


@pytest.mark.parametrize("dtype", LARGE)
def test_linear_large_odd_shape(dtype):
    xs = _tensors(3, (1151, 4099), dtype)
    w = [0.2, 0.5, 0.4]
    assert_close(linear_triton(xs, weights=w, block=65536), linear_reference(xs, weights=w), TOL[dtype], "linear")
