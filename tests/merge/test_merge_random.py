"""Invariants of the random methods (DARE, DELLA) and of the sparsifiers, TIES consensus and seeding."""

from __future__ import annotations

import math

import pytest
import torch

from dfsmerge.merge import make_generator, merge_tensor, sign_consensus
from dfsmerge.merge.sparsify import (
    Sparsification,
    breadcrumbs_mask,
    della_mask,
    della_probabilities,
    magnitude_mask,
    random_mask,
    sparsify,
)

N = 20_000


def _delta(shape=(100, 200), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _within_3_sigma(kept: int, n: int, p: float) -> bool:
    return abs(kept - n * p) <= 3 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_random_mask_drop_fraction(density):
    mask = random_mask(_delta(), density, generator=torch.Generator().manual_seed(1))
    kept = int(mask.sum())
    assert _within_3_sigma(kept, N, density), (kept, N * density)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_rescale_matches_l1_norm(density):
    delta = _delta()
    out = sparsify(delta, "random", density, rescale=True, generator=torch.Generator().manual_seed(2))
    rel = abs(out.abs().sum() - delta.abs().sum()) / delta.abs().sum()
    assert rel < 1e-5, f"L1 mismatch {rel:.3g}"
    kept = out != 0
    # The kept entries are scaled by one common factor (L1 matching), not by 1/density.
    ratio = out[kept] / delta[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
    plain = sparsify(delta, "random", density, rescale=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(plain != 0, kept) and torch.equal(plain[kept], delta[kept])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.2, 0.7])
def test_dare_merge_of_one_model_keeps_density_and_l1(method, density):
    base, tuned = _delta(seed=3), _delta(seed=4)
    out = merge_tensor(
        method,
        [base, tuned],
        base_index=0,
        params=[{}, {"weight": 1.0, "density": density}],
        global_params={},
        seed=7,
        name="w",
    )
    delta, merged = tuned - base, out - base
    assert _within_3_sigma(int((merged != 0).sum()), N, density)
    rel = abs(merged.abs().sum() - delta.abs().sum()) / delta.abs().sum()
    assert rel < 1e-4, f"L1 mismatch {rel:.3g}"


@pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.2), (0.3, 0.1), (0.8, 0.15)])
def test_della_probabilities_and_drop_fraction(density, epsilon):
    delta = _delta()
    probs = della_probabilities(delta, density, epsilon)  # (100, 200)
    assert torch.allclose(probs.min(dim=1).values, torch.full((100,), density - epsilon))
    assert torch.allclose(probs.max(dim=1).values, torch.full((100,), density + epsilon))
    # Probabilities rise with magnitude within each row.
    order = delta.abs().argsort(dim=1)
    assert (probs.gather(1, order).diff(dim=1) > 0).all()
    mask = della_mask(delta, density, epsilon, generator=torch.Generator().manual_seed(5))
    assert _within_3_sigma(int(mask.sum()), N, density)
    # Large entries survive more often than small ones.
    top = mask.gather(1, order[:, -50:]).mean()
    bottom = mask.gather(1, order[:, :50]).mean()
    assert top > bottom


def test_della_one_dimensional_and_single_column():
    v = _delta((300,))
    assert della_probabilities(v, 0.5, 0.1).shape == (1, 300)
    col = della_probabilities(_delta((4, 1)), 0.5, 0.1)
    assert torch.allclose(col, torch.full((4, 1), 0.5))


@pytest.mark.parametrize("density", [0.01, 0.3, 0.99])
def test_magnitude_mask_keeps_the_largest(density):
    delta = _delta()
    mask = magnitude_mask(delta, density).bool()
    assert int(mask.sum()) == max(1, int(density * N))
    assert delta.abs()[mask].min() >= delta.abs()[~mask].max()


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.9, 0.2), (0.2, 0.0)])
def test_breadcrumbs_mask_drops_outliers_and_small(density, gamma):
    delta = _delta()
    mask = breadcrumbs_mask(delta, density, gamma).bool()
    n_keep, n_top = int(density * N), int(gamma * N)
    n_top = min(n_top, N - n_keep)
    assert int(mask.sum()) == n_keep
    mags = delta.abs().reshape(-1).sort().values
    kept = delta.abs()[mask]
    assert kept.max() <= mags[N - n_top - 1] and kept.min() >= mags[N - n_top - n_keep]


def test_sign_consensus_every_kept_entry_has_the_elected_sign():
    g = torch.Generator().manual_seed(6)
    weighted = torch.randn(4, 30, 20, generator=g) * torch.tensor([0.5, 1.0, -0.3, 2.0]).reshape(4, 1, 1)
    for method in ("sum", "count"):
        mask = sign_consensus(weighted, method)
        score = weighted.sum(0) if method == "sum" else weighted.sign().sum(0)
        elected = torch.where(score >= 0, 1.0, -1.0)
        assert (weighted.sign()[mask] == elected.expand_as(weighted)[mask]).all()
        assert ((weighted.sign() != elected) == ~mask).all()
        assert torch.equal(mask, sign_consensus(weighted, method, int8_mask=True))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_ties_family_output_follows_the_elected_sign(method):
    """Rebuild the pruned deltas with the same generator stream and check the disjoint merge against them."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(40, 30, generator=g)
    tuned = [base + torch.randn(40, 30, generator=g) for _ in range(3)]
    weights, density = [0.5, 1.0, 0.8], 0.6
    params = [{}] + [{"weight": w, "density": density} for w in weights]
    out = merge_tensor(
        method,
        [base, *tuned],
        base_index=0,
        params=params,
        global_params={"normalize": False},
        seed=11,
        name="layers.1.w",
    )
    sparsification = {
        "ties": Sparsification.magnitude,
        "dare_ties": Sparsification.random,
        "della": Sparsification.della_magprune,
        "breadcrumbs_ties": Sparsification.magnitude_outliers,
    }[method]
    rescale = method in ("dare_ties", "della")
    gen = make_generator(11, "layers.1.w")
    pruned = torch.stack(
        [
            w * sparsify(t - base, sparsification, density, rescale=rescale, gamma=0.01, epsilon=0.15, generator=gen)
            for w, t in zip(weights, tuned, strict=True)
        ]
    )  # (3, 40, 30)
    elected = torch.where(pruned.sum(0) >= 0, 1.0, -1.0)
    kept = pruned.sign() == elected
    expected = base + (pruned * kept).sum(0)
    assert (out - expected).abs().max() < 1e-5
    merged = out - base
    nonzero = (pruned * kept).sum(0) != 0
    assert (merged.sign()[nonzero] == elected[nonzero]).all()


def test_seed_stream_is_independent_of_tensor_order():
    base, a = _delta((30, 30), 9), _delta((30, 30), 10)
    kw = {"base_index": 0, "params": [{}, {"weight": 1.0, "density": 0.5}], "global_params": {}, "seed": 3}
    first = [merge_tensor("dare_linear", [base, a], **kw, name=n) for n in ("x", "y")]
    second = [merge_tensor("dare_linear", [base, a], **kw, name=n) for n in ("y", "x")][::-1]
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])


def test_density_one_is_a_no_op_without_drawing():
    delta = _delta((10, 10))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    for method in Sparsification:
        assert torch.equal(sparsify(delta, method, 1.0, rescale=True, generator=g), delta)
    assert torch.equal(g.get_state(), state)
