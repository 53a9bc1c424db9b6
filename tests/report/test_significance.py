"""Paired tests against independent computations: scipy's exact binomial test (McNemar's exact form) and scipy's
bootstrap of the paired differences, on fixed per-document outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from dfsmerge.errors import ConfigError
from dfsmerge.report.significance import mcnemar_exact, paired_bootstrap, paired_test

stats = pytest.importorskip("scipy.stats")


def _binary(seed: int, n: int, pa: float, pb: float):
    rng = np.random.default_rng(seed)
    return (rng.random(n) < pa).astype(float), (rng.random(n) < pb).astype(float)


@pytest.mark.parametrize(("seed", "n", "pa", "pb"), [(0, 200, 0.6, 0.5), (1, 50, 0.3, 0.3), (2, 400, 0.8, 0.6),
                                                     (3, 9, 0.5, 0.5)])
def test_mcnemar_equals_scipy_binomtest_of_the_discordant_pairs(seed, n, pa, pb):
    a, b = _binary(seed, n, pa, pb)
    t = mcnemar_exact(a, b)
    n10, n01 = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    assert (t.n10, t.n01) == (n10, n01)
    want = stats.binomtest(n10, n10 + n01, 0.5).pvalue if n10 + n01 else 1.0
    assert t.p_value == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert t.delta == pytest.approx(a.mean() - b.mean())
    assert paired_test(a, b).method == "mcnemar"


def test_mcnemar_is_symmetric_and_one_when_no_discordant_pair():
    a, b = _binary(4, 120, 0.7, 0.4)
    assert mcnemar_exact(a, b).p_value == mcnemar_exact(b, a).p_value
    assert mcnemar_exact(a, a).p_value == 1.0


def test_paired_bootstrap_ci_matches_scipy_bootstrap_of_the_differences():
    rng = np.random.default_rng(5)
    a = rng.normal(0.3, 1.0, 150)
    b = a - 0.2 + rng.normal(0, 0.5, 150)  # paired: b tracks a
    t = paired_bootstrap(a, b, n_boot=20_000, seed=1)
    ref = stats.bootstrap((a - b,), np.mean, n_resamples=20_000, method="percentile", confidence_level=0.95,
                          rng=np.random.default_rng(2)).confidence_interval
    se = (a - b).std(ddof=1) / np.sqrt(a.size)
    assert abs(t.ci[0] - ref.low) < 0.05 * se * 4 and abs(t.ci[1] - ref.high) < 0.05 * se * 4
    assert t.delta == pytest.approx((a - b).mean())
    # the p-value agrees with the normal approximation of the paired mean (independent of the resampling)
    p_norm = 2 * stats.norm.sf(abs(t.delta) / se)
    assert abs(t.p_value - p_norm) < 0.02 + 0.3 * p_norm
    assert paired_test(a, b).method == "bootstrap"


def test_paired_bootstrap_without_difference_and_reproducible():
    a = np.linspace(0, 1, 30)
    assert paired_bootstrap(a, a).p_value == 1.0
    b = a[::-1].copy()
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)


def test_unpaired_or_empty_outcomes_are_refused():
    with pytest.raises(ConfigError, match="not paired"):
        paired_test([1, 0, 1], [1, 0])
    with pytest.raises(ConfigError, match="no documents"):
        paired_test([], [])
    with pytest.raises(ConfigError, match="0/1"):
        mcnemar_exact([0.5, 1], [1, 0])
