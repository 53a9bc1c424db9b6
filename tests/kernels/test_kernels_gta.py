"""Fused GTA kernel vs its eager reference, run in the Triton CPU interpreter (TRITON_INTERPRET=1, conftest)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from dfsmerge.kernels import fused_merge  # noqa: E402
from dfsmerge.kernels._common import GTA_METHODS  # noqa: E402
from dfsmerge.kernels.gta import gta_masks_triton, gta_reference, gta_triton, reference_keep_mask  # noqa: E402

SHAPES = [(7,), (1, 1), (33, 65)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
METHODS = list(GTA_METHODS)
RANDOM_METHODS = [m for m, s in GTA_METHODS.items() if s.sparsification in ("random", "della_magprune")]
WEIGHTS = [0.6, 0.35, -0.25]
DENSITIES = [0.5, 0.8, 0.3]
PARAMS = dict(weights=WEIGHTS, densities=DENSITIES, gammas=[0.05, 0.1, 0.0], epsilons=[0.1, 0.15, 0.2])


def _inputs(shape, dtype, k=3, seed=0):
    """A base and k 'fine-tunes' near it (deltas ~ 0.1 of the weights), stored in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    sources = [(base + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]
    return base.to(dtype), sources


def _shared(method):
    spec = GTA_METHODS[method]
    return dict(normalize=spec.default_normalize, rescale=spec.default_rescale, lam=0.9)


def assert_close(actual, expected, tol, what):
    diff = (actual.float() - expected.float()).abs()
    bound = tol * (1 + expected.float().abs())
    if not bool((diff <= bound).all()):
        raise AssertionError(
            f"{what}: max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}, "
            f"{int((diff > bound).sum())} of {diff.numel()} elements beyond {tol:g} * (1 + |expected|)"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_gta_kernel_matches_reference(method, shape, dtype):
    base, sources = _inputs(shape, dtype)
    # block=1024: the (33, 65) case runs 3 programs, the last one partial (the interpreter is slow per program).
    out = gta_triton(method, base, sources, **PARAMS, **_shared(method), seed=11, block=1024)
    masks = None
    if method in RANDOM_METHODS:  # torch's RNG differs from Philox: check everything else given the kernel's masks
        masks = gta_masks_triton(method, base, sources, densities=DENSITIES, gammas=PARAMS["gammas"],
                                 epsilons=PARAMS["epsilons"], seed=11, block=512)
    expected = gta_reference(method, base, sources, **PARAMS, **_shared(method), masks=masks)
    assert out.dtype == dtype and out.shape == base.shape
    assert_close(out, expected, TOL[dtype], f"{method} {shape} {dtype}")


@pytest.mark.parametrize("method", METHODS)
def test_gta_kernel_matches_reference_with_flags_flipped(method):
    # normalize / rescale opposite to the method's defaults (e.g. TIES with L1 rescale of its band mask).
    spec = GTA_METHODS[method]
    flags = dict(normalize=not spec.default_normalize, rescale=not spec.default_rescale, lam=1.3)
    base, sources = _inputs((33, 65), torch.float32)
    out = gta_triton(method, base, sources, **PARAMS, **flags, seed=4, block=1024)
    masks = None
    if method in RANDOM_METHODS:
        masks = gta_masks_triton(method, base, sources, densities=DENSITIES, gammas=PARAMS["gammas"],
                                 epsilons=PARAMS["epsilons"], seed=4, block=1024)
    expected = gta_reference(method, base, sources, **PARAMS, **flags, masks=masks)
    assert_close(out, expected, TOL[torch.float32], f"{method} flipped flags")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_band_masks_match_reference_with_ties(method, dtype):
    # Few distinct magnitudes: many ties at the thresholds. The kernel must keep exactly the reference's set.
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(33, 65)
    sources = [(torch.randint(-4, 5, (33, 65), generator=g) * 0.25).to(dtype) for _ in range(2)]
    dens, gam = [0.37, 0.61], [0.05, 0.2]
    masks = gta_masks_triton(method, base.to(dtype), sources, densities=dens, gammas=gam, epsilons=[0.1, 0.1],
                             block=128)
    sparsification = GTA_METHODS[method].sparsification
    for k, x in enumerate(sources):
        expected = reference_keep_mask(sparsification, x.float(), density=dens[k], gamma=gam[k], epsilon=0.1,
                                       generator=None)
        assert torch.equal(masks[k], expected), f"source {k}: {int((masks[k] != expected).sum())} mismatches"
    n = base.numel()
    expected_count = max(1, int(dens[0] * n)) if method == "ties" else int(dens[0] * n)
    assert int(masks[0].sum()) == expected_count


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_masks_independent_of_block_size(method):
    base, sources = _inputs((33, 65), torch.bfloat16)
    kw = dict(densities=DENSITIES, gammas=PARAMS["gammas"], epsilons=PARAMS["epsilons"], seed=1234)
    small = gta_masks_triton(method, base, sources, block=64, **kw)
    large = gta_masks_triton(method, base, sources, block=1024, **kw)
    for k in range(len(sources)):
        assert torch.equal(small[k], large[k]), f"source {k}: masks differ between BLOCK=64 and BLOCK=1024"
    merged = [gta_triton(method, base, sources, **PARAMS, **_shared(method), seed=1234, block=b) for b in (256, 1024)]
    assert torch.equal(merged[0], merged[1])
    other = gta_masks_triton(method, base, sources, block=1024, **{**kw, "seed": 1235})
    assert not torch.equal(small[0], other[0]), "a different seed must draw a different mask"


def test_dare_drop_fraction_within_three_sigma():
    base, sources = _inputs((257, 129), torch.float32, k=2)
    density = 0.3
    masks = gta_masks_triton("dare_ties", base, sources, densities=[density, density], gammas=[0, 0],
                             epsilons=[0, 0], seed=7, block=4096)
    n = base.numel() * len(sources)
    dropped = sum(int((~m).sum()) for m in masks) / n
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(dropped - (1 - density)) <= 3 * sigma, f"drop fraction {dropped:.4f}, expected 0.7 +- {3 * sigma:.4f}"
    # Sources draw independent masks (the source number is part of the Philox counter).
    assert not torch.equal(masks[0], masks[1])


def test_della_keep_fraction_within_three_sigma():
    base, sources = _inputs((129, 257), torch.float32, k=1)
    density, eps = 0.4, 0.2
    (mask,) = gta_masks_triton("della", base, sources, densities=[density], gammas=[0], epsilons=[eps], seed=3,
                               block=4096)
    cols = base.shape[1]
    p = (density - eps) + torch.arange(cols, dtype=torch.float64) / (cols - 1) * 2 * eps  # keep prob by rank
    var = float((p * (1 - p)).sum()) * base.shape[0]
    kept = int(mask.sum())
    assert abs(kept - density * mask.numel()) <= 3 * math.sqrt(var)
    # Rank-dependence: the largest half of each row is kept more often than the smallest half.
    ranks = torch.argsort(torch.argsort((sources[0] - base).abs(), dim=1), dim=1)
    assert mask[ranks >= cols // 2].float().mean() > mask[ranks < cols // 2].float().mean()


@pytest.mark.parametrize("method", ["ties", "dare_linear", "della"])
def test_out_may_alias_base(method):
    base, sources = _inputs((33, 65), torch.bfloat16)
    expected = gta_triton(method, base, sources, **PARAMS, **_shared(method), seed=5)
    resident = base.clone()
    result = gta_triton(method, resident, sources, **PARAMS, **_shared(method), seed=5, out=resident)
    assert result.data_ptr() == resident.data_ptr()
    assert torch.equal(resident, expected)


def test_mixed_source_dtypes_and_fp32_out():
    base, _ = _inputs((33, 65), torch.float32)
    sources = [(base + 0.1).to(torch.bfloat16), (base - 0.05).to(torch.float16)]
    out = torch.empty_like(base)
    gta_triton("ties", base, sources, weights=[1.0, 0.5], densities=[0.5, 0.5], gammas=[0, 0], epsilons=[0, 0],
               normalize=True, rescale=False, lam=1.0, out=out)
    expected = gta_reference("ties", base, sources, weights=[1.0, 0.5], densities=[0.5, 0.5], gammas=[0, 0],
                             epsilons=[0, 0], normalize=True, rescale=False, lam=1.0)
    assert_close(out, expected, 1e-6, "mixed dtypes")


def test_fused_merge_triton_backend_equals_kernel():
    base, sources = _inputs((7,), torch.float16)
    params = [{}, *({"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITIES, strict=True))]
    got = fused_merge("dare_ties", [base, *sources], base_index=0, params=params, seed=9, backend="triton")
    direct = gta_triton("dare_ties", base, sources, weights=WEIGHTS, densities=DENSITIES, gammas=[0.01] * 3,
                        epsilons=[0.15] * 3, normalize=False, rescale=True, lam=1.0, seed=9)
    assert torch.equal(got, direct)


LARGE_CASES = [
    # (ties, bf16) runs in a few seconds in the interpreter and stays in the default run; the rest is `-m slow`
    # (a random method at this size takes ~20 s: numpy Philox).
    pytest.param(m, d, marks=() if (m, d) == ("ties", torch.bfloat16) else pytest.mark.slow, id=f"{m}-{d}")
    for m in METHODS
    for d in DTYPES
]


@pytest.mark.parametrize(("method", "dtype"), LARGE_CASES)
def test_gta_kernel_large_odd_shape(method, dtype):
    base, sources = _inputs((1151, 4099), dtype, k=2)
    params = dict(weights=[0.7, 0.4], densities=[0.4, 0.6], gammas=[0.01, 0.01], epsilons=[0.1, 0.1])
    out = gta_triton(method, base, sources, **params, **_shared(method), seed=2, block=65536)
    masks = None
    if method in RANDOM_METHODS:
        masks = gta_masks_triton(method, base, sources, densities=params["densities"], gammas=params["gammas"],
                                 epsilons=params["epsilons"], seed=2, block=8192)
    expected = gta_reference(method, base, sources, **params, **_shared(method), masks=masks)
    assert_close(out, expected, TOL[dtype], f"{method} 1151x4099 {dtype}")
