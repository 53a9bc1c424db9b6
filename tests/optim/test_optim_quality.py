"""Regression tests of the optimizer wiring: each optimizer beats random search at equal budget on a problem
it is built for. Budgets are small but the margins are orders of magnitude (measured over seeds 0-2)."""

import numpy as np
import pytest
from pymoo.indicators.hv import HV

from dfsmerge.optim import make_optimizer, pareto_mask


def _best_after(name, fn, generations, **kw):
    opt = make_optimizer(name, **kw)
    for _ in range(generations):
        X = opt.ask()
        opt.tell(X, fn(X))
    return opt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cma_beats_random_on_sphere_10d(prob, seed):
    """600 evaluations on a shifted 10-D sphere in [-5, 5]^10: CMA-ES reaches ~1e-3, random search ~20."""
    kw = dict(dim=10, bounds=(-5.0, 5.0), seed=seed, popsize=10)
    cma_f = _best_after("cma", prob.sphere, 60, **kw).best.f
    rnd_f = _best_after("random", prob.sphere, 60, **kw).best.f
    assert cma_f < 1e-2 * rnd_f, f"cma best {cma_f:.3g} vs random best {rnd_f:.3g}"
    assert cma_f < 0.05, cma_f


def _zdt1(X):  # noqa: N803
    """ZDT1 (Zitzler, Deb and Thiele 2000), x in [0, 1]^n, (n_pts, n) -> (n_pts, 2); front f2 = 1 - sqrt(f1)."""
    f1 = X[:, 0]
    g = 1.0 + 9.0 * X[:, 1:].mean(axis=1)
    return np.stack([f1, g * (1.0 - np.sqrt(f1 / g))], axis=1)


def _front_of_run(name, seed):
    opt = make_optimizer(name, dim=6, bounds=(0.0, 1.0), seed=seed, popsize=24, n_obj=2)
    Fs = []
    for _ in range(25):
        X = opt.ask()
        F = _zdt1(X)
        Fs.append(F)
        opt.tell(X, F)
    F = np.concatenate(Fs)  # (600, 2) every evaluation, as evals.jsonl would hold
    return F[pareto_mask(F)]


@pytest.mark.parametrize("seed", [0, 1])
def test_nsga2_beats_random_on_zdt1(seed):
    """600 evaluations on 6-D ZDT1: the NSGA-II front has hypervolume (ref (1.1, 1.1); the true front's is
    ~0.877) around 0.6-0.75 and spreads along f1; random search's front barely enters the reference box."""
    hv = HV(ref_point=np.array([1.1, 1.1]))
    nsga, rnd = _front_of_run("nsga2", seed), _front_of_run("random", seed)
    hv_nsga, hv_rnd = hv(nsga), hv(rnd)
    assert hv_nsga > 0.5 and hv_nsga > hv_rnd + 0.4, (hv_nsga, hv_rnd)
    assert len(nsga) >= 10 and np.ptp(nsga[:, 0]) > 0.5, (len(nsga), np.ptp(nsga[:, 0]))


def test_nsga2_binary_genes_help():
    """40 on/off genes (a target pattern) + 4 continuous ones, 480 evaluations. With ``binary_mask`` NSGA-II
    uses uniform crossover and bit flips on the on/off genes; treating them as continuous genes decoded by
    sign (as without the mask) converges far slower, and random search is hopeless."""
    rng = np.random.default_rng(0)
    target = np.where(rng.random(40) < 0.5, 1.0, -1.0)  # (40,)

    def fn(X):  # noqa: N803
        on = np.where(X[:, :40] > 0, 1.0, -1.0)  # the decoding the DFS genome uses: on iff > 0
        return ((on != target).sum(1) + ((X[:, 40:] - 0.5) ** 2).sum(1))[:, None]

    mask = np.array([True] * 40 + [False] * 4)
    res = {"binary": [], "continuous": [], "random": []}
    for seed in range(3):
        kw = dict(dim=44, bounds=(-1.0, 1.0), seed=seed, popsize=16)
        res["binary"].append(_best_after("nsga2", fn, 30, binary_mask=mask, **kw).best.f)
        res["continuous"].append(_best_after("nsga2", fn, 30, **kw).best.f)
        res["random"].append(_best_after("random", fn, 30, binary_mask=mask, **kw).best.f)
    mean = {k: float(np.mean(v)) for k, v in res.items()}
    assert mean["binary"] < 0.6 * mean["continuous"], res
    assert mean["binary"] < 0.2 * mean["random"], res


def test_cma_stops_when_converged(prob):
    """pycma's own termination criteria surface through stop()/stop_reason (here tolfun/tolx on a 3-D sphere)."""
    opt = make_optimizer("cma", dim=3, bounds=(-5.0, 5.0), seed=0, popsize=6)
    for _ in range(1000):
        if opt.stop():
            break
        X = opt.ask()
        opt.tell(X, prob.sphere(X))
    assert opt.stop() and opt.stop_reason.startswith("cma: tol"), opt.stop_reason
    assert opt.best.f < 1e-8
