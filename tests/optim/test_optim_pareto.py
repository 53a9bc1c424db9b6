"""Pareto helpers against pymoo's non-dominated sorting and a brute-force definition."""

import numpy as np
import pytest
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from dfsmerge.optim import non_dominated_sort, pareto_mask


def _brute_mask(F):  # noqa: N803
    n = len(F)
    return np.array([not any((F[j] <= F[i]).all() and (F[j] < F[i]).any() for j in range(n)) for i in range(n)])


@pytest.mark.parametrize("n_obj", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_sort_matches_pymoo(n_obj, seed):
    rng = np.random.default_rng(seed)
    F = rng.integers(0, 6, size=(80, n_obj)).astype(float)  # small integers: many ties and duplicates
    ours = non_dominated_sort(F)
    ref = NonDominatedSorting().do(F)
    assert len(ours) == len(ref)
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert sorted(a.tolist()) == sorted(np.asarray(b).tolist()), f"front {k} differs"
    assert np.array_equal(pareto_mask(F), _brute_mask(F))
    assert np.array_equal(np.flatnonzero(pareto_mask(F)), np.sort(ours[0]))
    assert sorted(np.concatenate(ours).tolist()) == list(range(len(F)))


def test_nan_rows_are_dominated():
    F = np.array([[1.0, 2.0], [np.nan, 0.0], [2.0, 1.0], [3.0, 3.0], [np.inf, np.inf]])
    fronts = non_dominated_sort(F)
    assert fronts[0].tolist() == [0, 2]
    assert fronts[1].tolist() == [3]
    assert sorted(fronts[2].tolist()) == [1, 4]
    assert pareto_mask(F).tolist() == [True, False, True, False, False]
    assert pareto_mask(np.array([3.0, 1.0, 1.0])).tolist() == [False, True, True]  # (n,) = one objective
