"""Subset fitness (issue 26): the estimators against direct computations, and a search that scores its candidates
on few documents: estimates marked, the elite rescored in full, the best never an estimate, resume exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from dfsmerge.errors import ConfigError
from dfsmerge.objectives.config import ObjectiveConfig
from dfsmerge.objectives.subset import (
    allocate,
    estimate,
    fit_irt,
    fit_subset,
    fit_theta,
    kmedoids,
    low_signal,
)
from tests.search.conftest import MC_TASK, make_config, mc_task_dir, read_evals, stable_evals, tiny_models  # noqa: F401


def _clustered(rng, n_models=12, n_patterns=6, copies=(5, 9, 3, 7, 11, 4)):
    """Responses whose documents come in ``n_patterns`` groups answered alike by every model."""
    base = (rng.random((n_models, n_patterns)) < 0.5).astype(float)
    cols = np.repeat(np.arange(n_patterns), copies)
    return base[:, cols], cols


def test_anchor_weights_are_cluster_shares_and_exact_on_clustered_documents():
    rng = np.random.default_rng(0)
    R, cols = _clustered(rng)
    fit = fit_subset("anchor", R, 12, seed=1)
    assert np.isclose(sum(fit["weights"]), 1.0) and len(set(fit["positions"])) == 12
    assert sorted(set(cols[fit["positions"]].tolist())) == list(range(6))  # every group drawn from
    for g, count in enumerate(np.bincount(cols)):  # a group's weight is its share of the documents
        assert np.isclose(sum(w for p, w in zip(fit["positions"], fit["weights"]) if cols[p] == g), count / len(cols))
    new = (rng.random(6) < 0.5).astype(float)[cols]  # a new model that also answers each group alike
    assert np.isclose(estimate(fit, new[fit["positions"]]), new.mean())


def test_anchor_spreads_a_large_cluster_over_many_documents():
    """Fitted on models that solve almost nothing, nearly every document is in one "never solved" cluster; its
    share goes to many documents drawn from it, not to one medoid, so a candidate's progress on those documents
    shows in the estimate (one medoid per cluster gave one document 99% of the weight and 47 of 50 weight 0)."""
    R = np.zeros((12, 300))
    R[0, 0] = R[1, 1] = R[1, 2] = 1.0  # three documents solved once; 297 never
    fit = fit_subset("anchor", R, 50, seed=0)
    pos, w = np.asarray(fit["positions"]), np.asarray(fit["weights"])
    assert len(set(pos.tolist())) == 50 and np.isclose(w.sum(), 1.0)
    never = pos >= 3
    assert never.sum() >= 45 and np.allclose(w[never], 297 / 300 / never.sum())  # drawn and weighted alike
    assert w.max() < 3 / 50  # no document carries a cluster alone
    for k in (0, 5, 20):  # a model solving k of the drawn never-solved documents: the stratified mean
        r = np.zeros(50)
        r[np.flatnonzero(never)[:k]] = 1.0
        assert estimate(fit, r) == pytest.approx(297 / 300 * k / never.sum())


def test_allocate_one_per_cluster_then_heaviest_first():
    counts = np.array([297, 2, 1])
    a = allocate(counts, 50)
    assert a.sum() == 50 and (a >= 1).all() and (a <= counts).all()
    assert a.tolist() == [48, 1, 1]
    a = allocate(np.array([30, 30, 3]), 10)  # proportional where room allows; never more draws than documents
    assert a.sum() == 10 and a[2] == 1 and abs(a[0] - a[1]) <= 1


def test_random_subset_estimate_is_its_mean_and_fits_are_deterministic():
    rng = np.random.default_rng(1)
    R = (rng.random((8, 40)) < 0.4).astype(float)
    for method in ("random", "anchor", "irt"):
        a, b = fit_subset(method, R, 7, seed=3), fit_subset(method, R, 7, seed=3)
        assert a == b and len(set(a["positions"])) == 7
    fit = fit_subset("random", R, 7, seed=3)
    r = R[0, fit["positions"]]
    assert estimate(fit, r) == pytest.approx(r.mean())


def test_kmedoids_returns_k_distinct_medoids_even_with_duplicate_points():
    X = np.array([[0.0], [0.0], [0.0], [1.0]])
    med, assign = kmedoids(X, 3, seed=0)
    assert len(set(med.tolist())) == 3 and assign.shape == (4,)


def test_irt_recovers_the_generating_model():
    rng = np.random.default_rng(2)
    theta, a, b = rng.normal(0, 1, 150), np.exp(rng.normal(0, 0.3, 120)), rng.normal(0, 1, 120)
    P = 1 / (1 + np.exp(-(a * theta[:, None] - b)))
    R = (rng.random(P.shape) < P).astype(float)
    th, _, bh = fit_irt(R)
    assert np.corrcoef(th, theta)[0, 1] > 0.9 and np.corrcoef(bh, b)[0, 1] > 0.9
    # ability from a model's responses: more correct answers, higher ability
    assert fit_theta(np.ones(10), a[:10], b[:10]) > fit_theta(np.zeros(10), a[:10], b[:10])
    fit = fit_subset("irt", R, 30, seed=0)
    full = R.mean(1)
    est = np.array([estimate(fit, r[fit["positions"]]) for r in R])
    assert np.corrcoef(est, full)[0, 1] > 0.9


def test_low_signal_is_a_generation_near_0_or_1_in_subset_documents():
    assert low_signal([0.0, 0.02, 0.04], 50, 5)  # its best answers ~2 of 50 documents
    assert not low_signal([0.0, 0.12], 50, 5)  # 6 of 50
    assert low_signal([0.95, 0.99], 50, 5) and not low_signal([0.2, 0.95], 50, 5)  # near 1: too few misses
    assert low_signal([0.4], 4, 5) and not low_signal([0.25, 0.5], 4, 5)  # floor capped at half the subset
    assert not low_signal([0.0], 50, None) and not low_signal([], 50, 5)


def test_subset_needs_a_native_task_objective():
    with pytest.raises(ValidationError, match="native"):
        ObjectiveConfig(name="t", subset={"method": "anchor", "size": 5})
    with pytest.raises(ValidationError, match="size"):
        ObjectiveConfig(name="t", native=True, subset={"method": "anchor", "size": 0})


@pytest.fixture
def subset_search(make_config, mc_task_dir):  # noqa: F811
    def make(method="anchor", size=4, full_below=None, max_evals=12, **extra):
        obj = {"name": MC_TASK, "split": "validation", "native": True,
               "subset": {"method": method, "size": size, "elite": 2, "full_below": full_below}}
        return make_config("dfs", "cma", popsize=4, max_evals=max_evals, task_paths=[str(mc_task_dir)],
                           objectives=[obj], dfs={"repetitions": 2, "max_length": 4}, eval_dtype="float32", **extra)
    return make


def _rec(gen, score, ok=True):
    from types import SimpleNamespace

    return SimpleNamespace(generation=gen, ok=ok, fitness=-score if ok else float("inf"),
                           objectives={MC_TASK: score if ok else None})


def test_a_generation_after_one_the_subset_cannot_rank_is_scored_in_full(subset_search, tmp_path):
    from dfsmerge.search import load_search_config
    from dfsmerge.search.subset_fitness import SubsetFitness

    sf = SubsetFitness(load_search_config(subset_search(full_below=5, size=4)), tmp_path)
    assert sf.keys == {MC_TASK: [MC_TASK]}
    assert sf.is_full(0, [])  # the fitting generation
    assert sf.is_full(1, [_rec(0, 0.0), _rec(0, 0.25)])  # best 1 of 4 documents: below the floor of 2
    assert not sf.is_full(1, [_rec(0, 0.0), _rec(0, 0.5)])
    assert sf.is_full(2, [_rec(0, 0.5), _rec(1, 0.75), _rec(1, 1.0)])  # only the previous generation counts
    assert not sf.is_full(2, [_rec(1, 0.0, ok=False), _rec(1, 0.5), _rec(1, 0.25)])  # failures do not count
    off = SubsetFitness(load_search_config(subset_search(full_below=None, size=4)), tmp_path / "off")
    assert not off.is_full(1, [_rec(0, 0.0), _rec(0, 0.25)])


def test_refusals_come_before_the_run_directory(subset_search, tmp_path):
    from dfsmerge.search import load_search_config, run_search

    for extra, match in (({"racing": {"enabled": True}}, "racing"), ({}, "subset.size=10")):
        cfg = subset_search(size=10, **extra) if not extra else subset_search(**extra)
        with pytest.raises(ConfigError, match=match):
            run_search(load_search_config(cfg), tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_search_on_estimates_rescores_the_elite_and_resumes_exactly(subset_search, tmp_path):
    from dfsmerge.search import load_search_config, run_search
    from dfsmerge.search.worker import Worker

    cfg = load_search_config(subset_search())
    res = run_search(cfg, tmp_path / "run", progress=False)
    recs = read_evals(tmp_path / "run")
    for r in recs:
        if r["cached"] or r["error"]:
            continue
        if r["generation"] == 0:  # the fitting generation: every document, no estimate
            assert "estimate" not in r and r["cost"]["docs"] == 10
        else:
            assert r["estimate"]["docs"] == {MC_TASK: 4} and r["cost"]["docs"] == 4
    rescored = [json.loads(x) for x in (tmp_path / "run/subset/rescored.jsonl").read_text().splitlines()]
    assert 1 <= len(rescored) <= 2 and all(x["cost"]["docs"] == 10 for x in rescored)
    best = json.loads((tmp_path / "run/best/best.json").read_text())
    assert best == res.best and ("estimate" not in best or best.get("rescored"))
    report = next((tmp_path / "run/report").glob("*.md")).read_text()
    for x in rescored:  # the report shows each rescored candidate's estimate beside its full-set score
        est, full = x["estimated"][MC_TASK], x["objectives"][MC_TASK]
        assert f"candidate {x['id']}: {MC_TASK} {est:.4g} -> {full:.4g}" in report
    # the best's score is a full-set score: the same candidate scored by a worker without subset agrees
    plain = load_search_config({**subset_search(), "objectives": [
        {"name": MC_TASK, "split": "validation", "native": True}]})
    full = Worker(plain).evaluate(np.asarray(best["genome"]))
    assert full.scores == pytest.approx(best["objectives"])
    _resumed_run_equals(cfg, tmp_path / "part", tmp_path / "run", stop_at=8)  # 8 evaluations, then on to 12
    assert json.loads((tmp_path / "part/best/best.json").read_text())["objectives"] == best["objectives"]


def _resumed_run_equals(cfg, part, ref, *, stop_at: int) -> None:
    """A search stopped after ``stop_at`` evaluations and resumed writes the records and subset fits of ``ref``, its
    uninterrupted run."""
    from dfsmerge.search import run_search

    run_search(cfg, part, progress=False, **{"budget.max_evals": stop_at})
    run_search(cfg, part, progress=False, resume=True)
    assert stable_evals(part) == stable_evals(ref)
    assert (part / "subset/fits.json").read_text() == (ref / "subset/fits.json").read_text()


def test_search_scores_in_full_after_a_low_signal_generation_and_resumes_exactly(subset_search, tmp_path,
                                                                                  monkeypatch):
    """``full_below``: each generation is scored in full exactly when :meth:`SubsetFitness.is_full` says so from the
    records before it; each estimated generation uses the fit after the last full one; a resumed run takes the same
    decisions. (The tiny task's scores sit at 0.5, which no floor reaches, so the decision is replaced by another
    function of the previous generation's scores, one that goes both ways here; the floor itself is tested above.)"""
    from types import SimpleNamespace

    import dfsmerge.search.subset_fitness as subset_fitness
    from dfsmerge.search import load_search_config, run_search
    from dfsmerge.search.subset_fitness import SubsetFitness

    monkeypatch.setattr(subset_fitness, "low_signal", lambda scores, size, floor: round(100 * sum(scores)) % 3 == 0)
    cfg = load_search_config(subset_search(full_below=2, max_evals=24))
    run_search(cfg, tmp_path / "run", progress=False)
    recs = read_evals(tmp_path / "run")
    sf = SubsetFitness(cfg, tmp_path / "probe")
    views = [SimpleNamespace(generation=r["generation"], ok=r["error"] is None, fitness=r["fitness"],
                             objectives=r["objectives"]) for r in recs]
    full_gens = []
    for g in sorted({r["generation"] for r in recs}):
        fresh = [r for r in recs if r["generation"] == g and not r["cached"] and r["error"] is None]
        if not fresh:
            continue
        full = all("estimate" not in r for r in fresh)
        assert full or all("estimate" in r for r in fresh)
        assert full == sf.is_full(g, [v for v in views if v.generation < g]), g
        assert all(r["cost"]["docs"] == (10 if full else 4) for r in fresh)
        if full:
            full_gens.append(g)
        else:  # estimated with the fit made after the last generation scored in full
            assert {r["estimate"]["fit"] for r in fresh} == {max(x for x in full_gens if x < g)}
    assert len(full_gens) > 1 and len(full_gens) < len({r["generation"] for r in recs})  # the rule fired, not always
    _resumed_run_equals(cfg, tmp_path / "part", tmp_path / "run", stop_at=12)
