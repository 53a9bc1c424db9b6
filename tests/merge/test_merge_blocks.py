"""Properties of the methods and the building blocks against mergekit 0.1.5's lower-level functions."""

from __future__ import annotations

import pytest
import torch

from dfsmerge.errors import MergeError
from dfsmerge.merge import merge_tensor, slerp, truncate_vocabulary
from dfsmerge.merge.sparsify import sparsify

mk_sparsify = pytest.importorskip("mergekit.sparsify", reason="mergekit 0.1.5 is the test oracle")


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-6):
    diff = (a - b).abs()
    assert diff.max().item() <= tol, f"max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("hot", [0, 1, 2])
def test_linear_one_hot_returns_that_tensor(normalize, hot):
    tensors = [_randn(5, 4, seed=i) for i in range(3)]
    params = [{"weight": float(i == hot)} for i in range(3)]
    out = merge_tensor("linear", tensors, base_index=None, params=params, global_params={"normalize": normalize})
    assert torch.equal(out, tensors[hot])


def test_linear_zero_weight_sum_is_an_error_naming_the_fix():
    tensors = [_randn(3, seed=i) for i in range(2)]
    with pytest.raises(MergeError, match="sum to 0 with normalize=true.*normalize: false"):
        merge_tensor("linear", tensors, base_index=None, params=[{"weight": 1}, {"weight": -1}], global_params={})


@pytest.mark.parametrize("base_index", [0, 1])
def test_slerp_endpoints(base_index):
    tensors = [_randn(6, 5, seed=1), _randn(6, 5, seed=2)]
    for t, expected in ((0.0, tensors[base_index]), (1.0, tensors[1 - base_index])):
        out = merge_tensor("slerp", tensors, base_index=base_index, params=[{}, {}], global_params={"t": t})
        _close(out, expected)


def test_slerp_keeps_the_norm_of_unit_vectors():
    a, b = _randn(64, seed=3), _randn(64, seed=4)
    a, b = a / a.norm(), b / b.norm()
    for t in (0.25, 0.5, 0.75):
        assert abs(slerp(t, a, b).norm().item() - 1) < 1e-6


@pytest.mark.parametrize("scale", [None, 0.0, 0.5, 3.0])
def test_passthrough_scale(scale):
    x = _randn(4, 3, seed=5)
    out = merge_tensor("passthrough", [x], base_index=None, params=[{"scale": scale}], global_params={})
    assert torch.equal(out, x if scale is None else x * scale)


@pytest.mark.parametrize("base_index", [None, 0])
def test_nuslerp_one_hot_weights(base_index):
    tensors = [_randn(5, 4, seed=i) for i in range(3 if base_index == 0 else 2)]
    others = tensors[1:] if base_index == 0 else tensors
    for hot in (0, 1):
        params = ([{}] if base_index == 0 else []) + [{"weight": float(i == hot)} for i in range(2)]
        out = merge_tensor("nuslerp", tensors, base_index=base_index, params=params, global_params={})
        _close(out, others[hot], 1e-5)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear"])
def test_gta_single_model_full_density_returns_it(method):
    base, tuned = _randn(6, 6, seed=6), _randn(6, 6, seed=7)
    params = [{}, {"weight": 1.0, "density": 1.0}]
    out = merge_tensor(method, [base, tuned], base_index=0, params=params, global_params={}, seed=0)
    _close(out, tuned)
    zero = merge_tensor(method, [base, tuned], base_index=0, params=params, global_params={"lambda": 0.0}, seed=0)
    assert torch.equal(zero, base)


def test_model_stock_identical_finetunes_return_them():
    base, tuned = _randn(5, 5, seed=8), _randn(5, 5, seed=9)
    out = merge_tensor("model_stock", [base, tuned, tuned.clone()], base_index=0, params=[{}] * 3, global_params={})
    _close(out, tuned)


@pytest.mark.parametrize("shape", [(40, 30), (101,)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 0.97])
@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_matches_mergekit(shape, density, rescale):
    delta = _randn(*shape, seed=10)
    norm = mk_sparsify.RescaleNorm.l1 if rescale else None
    _close(sparsify(delta, "magnitude", density, rescale=rescale), mk_sparsify.magnitude(delta, density, norm))


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_matches_mergekit(gamma, density, rescale):
    delta = _randn(40, 30, seed=11)
    norm = mk_sparsify.RescaleNorm.l1 if rescale else None
    expected = mk_sparsify.magnitude_outliers(delta, density, norm, gamma=gamma)
    _close(sparsify(delta, "magnitude_outliers", density, rescale=rescale, gamma=gamma), expected)


@pytest.mark.parametrize("shape", [(40, 30), (101,), (3, 8, 5)])
@pytest.mark.parametrize("rescale", [False, True])
def test_random_sparsifiers_match_mergekit_with_the_same_stream(shape, rescale):
    delta = _randn(*shape, seed=12)
    norm = mk_sparsify.RescaleNorm.l1 if rescale else None
    torch.manual_seed(99)
    expected = mk_sparsify.bernoulli(delta, 0.4, norm)
    got = sparsify(delta, "random", 0.4, rescale=rescale, generator=torch.Generator().manual_seed(99))
    _close(got, expected)
    torch.manual_seed(99)
    expected = mk_sparsify.della_magprune(delta, 0.4, 0.2, norm)
    got = sparsify(
        delta, "della_magprune", 0.4, rescale=rescale, epsilon=0.2, generator=torch.Generator().manual_seed(99)
    )
    _close(got, expected)


def test_truncate_vocabulary():
    a, b = _randn(10, 4, seed=13), _randn(12, 4, seed=14)
    ta, tb = truncate_vocabulary([a, b], 0, "model.embed_tokens.weight")
    assert ta.shape == tb.shape == (10, 4) and torch.equal(tb, b[:10])
    with pytest.raises(MergeError, match="differ outside the vocabulary axis"):
        truncate_vocabulary([a, _randn(12, 5)], 0, "lm_head.weight")


@pytest.mark.parametrize("levels", [3, 50, 100_000])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_selection_with_tied_magnitudes_matches_mergekit(levels, density):
    """Quantised deltas (as from bf16 checkpoints) tie at the threshold; the sort tie-breaking must agree."""
    g = torch.Generator().manual_seed(15)
    delta = torch.randint(-levels, levels + 1, (50, 40), generator=g).float() / levels
    # magnitude: same count kept and the same entries wherever no tie at the threshold is involved; among tied
    # entries ours keeps the lowest flat indices (mergekit's choice follows its unstable argsort)
    ours, theirs = sparsify(delta, "magnitude", density), mk_sparsify.magnitude(delta, density)
    kept, kept_mk = ours != 0, theirs != 0
    assert int(kept.sum()) == int(kept_mk.sum()) or torch.equal(ours, theirs)
    k = max(1, int(density * delta.numel()))
    w = delta.abs().reshape(-1)
    threshold = w.sort(descending=True).values[k - 1]
    untied = (w != threshold).reshape(delta.shape)
    _close(ours[untied], theirs[untied])
    tied_idx = torch.nonzero(w == threshold).reshape(-1)
    n_tied_kept = int(kept.reshape(-1)[tied_idx].sum())
    assert kept.reshape(-1)[tied_idx[:n_tied_kept]].all(), "tied entries must be kept lowest index first"
    for gamma in (0.0, 0.05):
        expected = mk_sparsify.magnitude_outliers(delta, density, gamma=gamma)
        _close(sparsify(delta, "magnitude_outliers", density, gamma=gamma), expected)


@pytest.mark.parametrize("levels", [7, 300, None])
@pytest.mark.parametrize("density", [0.001, 0.3, 0.5, 0.97])
def test_kth_largest_on_large_inputs_equals_kthvalue(levels, density):
    """The bracketed selection (used above 2**17 entries) is exact, with and without heavy ties."""
    from dfsmerge.merge.sparsify import kth_largest, top_k_mask

    g = torch.Generator().manual_seed(21)
    n = 300_001
    w = torch.randn(n, generator=g).abs() if levels is None else torch.randint(0, levels, (n,), generator=g).float()
    k = max(1, int(density * n))
    assert kth_largest(w, k).item() == torch.kthvalue(w, n - k + 1).values.item()
    keep = top_k_mask(w, k)
    assert int(keep.sum()) == k
    ref = torch.zeros(n, dtype=torch.bool)
    ref[torch.sort(w, descending=True, stable=True).indices[:k]] = True  # stable: ties lowest index first
    assert torch.equal(keep, ref)
