"""Failure isolation: a candidate that raises or returns NaN gets the worst fitness, is logged with its error, and
the search goes on; a run of consecutive failures stops the search with a clear, resumable error."""

from __future__ import annotations

import math

import pytest

from dfsmerge.search import SearchFailedError, load_search_config, register_synthetic, run_search
from dfsmerge.search.worker import SYNTHETIC_OBJECTIVES
from tests.search.conftest import read_evals


@pytest.fixture
def flaky():
    """Synthetic objectives: 'flaky' raises when gene 0 (normalised) > 0.5 and is NaN when gene 1 > 0.5; 'broken'
    always raises."""

    @register_synthetic("flaky")
    def _flaky(u, cand, obj):
        if u[0] > 0.5:
            raise RuntimeError("CUDA out of memory (simulated)")
        return math.nan if u[1] > 0.5 else float(u.sum())

    @register_synthetic("broken")
    def _broken(u, cand, obj):
        raise ValueError("always broken")

    @register_synthetic("broken_paths")
    def _broken_paths(u, cand, obj):
        if getattr(cand, "path", None) is not None:
            raise ValueError("paths broken")
        return float(u.sum())

    yield
    for name in ("flaky", "broken", "broken_paths"):
        SYNTHETIC_OBJECTIVES.pop(name)


def test_failed_candidates_get_worst_fitness_and_search_continues(flaky, make_config, tmp_path):
    cfg = load_search_config(make_config("ps", "random", popsize=6, max_evals=24,
                                         objectives=[{"type": "synthetic", "name": "flaky"}]))
    res = run_search(cfg, tmp_path / "run", progress=False)
    evals = read_evals(tmp_path / "run")
    assert len(evals) == 24 and res.n_evals == 24
    lo = 0.0  # PS weight genes have bounds [0, 1], so u == genome
    raised = [r for r in evals if r["genome"][0] - lo > 0.5]
    nan = [r for r in evals if r["genome"][0] <= 0.5 and r["genome"][1] > 0.5]
    ok = [r for r in evals if r["genome"][0] <= 0.5 and r["genome"][1] <= 0.5]
    assert raised and nan and ok
    for r in raised:
        assert r["fitness"] is None and "out of memory" in r["error"]
    for r in nan:
        assert r["fitness"] is None and "non-finite" in r["error"]
    for r in ok:
        assert r["error"] is None and math.isclose(r["fitness"], sum(r["genome"]), rel_tol=1e-12)
    assert res.best["id"] == min(ok, key=lambda r: (r["fitness"], r["id"]))["id"]


def test_consecutive_failures_stop_the_run(flaky, make_config, tmp_path):
    cfg = load_search_config(make_config("ps", "random", popsize=4, max_evals=40,
                                         objectives=[{"type": "synthetic", "name": "broken"}],
                                         budget={"max_evals": 40, "max_consecutive_failures": 6}))
    with pytest.raises(SearchFailedError, match="6 consecutive candidates failed.*always broken.*--resume"):
        run_search(cfg, tmp_path / "run", progress=False)
    evals = read_evals(tmp_path / "run")
    assert len(evals) == 6 and all(r["error"] == "ValueError: always broken" for r in evals)


def test_stage2_budget_rules_stage2_failures(flaky, make_config, tmp_path):
    """In staged mode the failure limit of stage 2 is stage2.budget's, named so in the error."""
    cfg = load_search_config(make_config("staged", "random", popsize=4, max_evals=8,
                                         objectives=[{"type": "synthetic", "name": "broken_paths"}],
                                         budget={"max_evals": 8, "max_consecutive_failures": 20},
                                         stage2={"budget": {"max_evals": 40, "max_consecutive_failures": 5}}))
    with pytest.raises(SearchFailedError, match=r"5 consecutive candidates failed \(stage2.budget.max_consecutive"):
        run_search(cfg, tmp_path / "run", progress=False)
    evals = read_evals(tmp_path / "run")
    assert [r["stage"] for r in evals] == [1] * 8 + [2] * 5
    assert all(r["error"] is None for r in evals[:8])
    assert all(r["error"] == "ValueError: paths broken" for r in evals[8:])


def test_infeasible_path_is_worst_not_a_crash(make_config, tmp_path):
    """repair off + a min_length no random genome meets: every candidate is infeasible, logged, none crashes."""
    cfg = load_search_config(make_config("dfs", "random", popsize=4, max_evals=8,
                                         dfs={"repetitions": 2, "repair": False, "min_length": 8}))
    res = run_search(cfg, tmp_path / "run", progress=False)
    evals = read_evals(tmp_path / "run")
    assert len(evals) == 8
    assert all(r["infeasible"] and r["error"].startswith("infeasible") for r in evals)
    assert res.best is None and not (tmp_path / "run" / "best").exists()
