"""Registry-parametrised contract: every optimizer through the same loop and the same checks."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dfsmerge.optim import OPTIMIZERS, dumps_state, loads_state

NAMES = sorted(OPTIMIZERS)
# (name, n_obj) pairs each optimizer supports
CASES = [(n, 1) for n in NAMES] + [(n, 2) for n in NAMES if OPTIMIZERS[n].multi_objective]


def _fn(prob, n_obj):
    return prob.sphere if n_obj == 1 else prob.two_obj


def test_registry_names():
    assert {"cma", "nsga2", "random"} <= set(OPTIMIZERS)


@pytest.mark.parametrize("mixed", [False, True], ids=["continuous", "mixed"])
@pytest.mark.parametrize("name,n_obj", CASES)
def test_loop_shapes_bounds_counters(prob, name, n_obj, mixed):
    opt = prob.make(name, n_obj=n_obj, mixed=mixed)
    lo, hi = opt.space.lo, opt.space.hi
    n_total = 0
    for g in range(5):
        assert opt.generation == g
        X = opt.ask()
        assert X.ndim == 2 and X.shape[1] == prob.dim and X.shape[0] == 6, X.shape
        assert np.array_equal(opt.ask(), X), "ask() must be idempotent until tell()"
        assert ((lo <= X) & (hi >= X)).all(), f"out of bounds: min {X.min(0)}, max {X.max(0)}"
        if mixed:
            i = opt.space.integer_mask
            b = opt.space.binary_mask
            assert np.array_equal(X[:, i], np.round(X[:, i])), X[:, i]
            assert np.isin(X[:, b], [-2.0, 3.0]).all(), X[:, b]
        opt.tell(X, _fn(prob, n_obj)(X))
        n_total += X.shape[0]
        assert opt.n_evals == n_total
    if n_obj == 1:
        assert opt.best is not None and np.isfinite(opt.best.f)
        assert prob.sphere(opt.best.x[None])[0, 0] == pytest.approx(opt.best.f)
    else:
        assert opt.best is None
    assert isinstance(opt.stop(), bool)


@pytest.mark.parametrize("name,n_obj", CASES)
def test_deterministic_and_independent_of_global_rng(prob, name, n_obj):
    fn = _fn(prob, n_obj)
    ref = []
    prob.run(prob.make(name, n_obj=n_obj), fn, 4, ref)
    # Same seed, while other code hammers numpy's global RNG between calls: identical populations,
    # and the optimizer leaves the global RNG exactly where it found it.
    opt = prob.make(name, n_obj=n_obj)
    got = []
    for g in range(4):
        np.random.seed(1000 + g)
        before = np.random.get_state()[1].copy(), np.random.get_state()[2]
        X = opt.ask()
        after = np.random.get_state()[1], np.random.get_state()[2]
        assert np.array_equal(before[0], after[0]) and before[1] == after[1], "optimizer touched np.random"
        np.random.rand(17)
        got.append(X.copy())
        opt.tell(X, fn(X))
    for g, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert np.array_equal(a, b), f"generation {g}: max diff {np.abs(a - b).max()}"
    other = []
    prob.run(prob.make(name, n_obj=n_obj, seed=8), fn, 1, other)
    assert not np.array_equal(other[0], ref[0]), "a different seed must give a different population"


def _roundtrip(state, how, tmp_path):
    if how == "json":
        p = tmp_path / "state.json"
        p.write_text(dumps_state(state))
        return loads_state(p.read_text())
    if how == "pickle":
        p = tmp_path / "state.pkl"
        p.write_bytes(pickle.dumps(state))
        return pickle.loads(p.read_bytes())
    return state


@pytest.mark.parametrize("how", ["dict", "json", "pickle"])
@pytest.mark.parametrize("mixed", [False, True], ids=["continuous", "mixed"])
@pytest.mark.parametrize("name,n_obj", CASES)
def test_resume_between_generations(prob, tmp_path, name, n_obj, mixed, how):
    """2 generations + save + load into a fresh optimizer + 2 generations == 4 uninterrupted."""
    fn = _fn(prob, n_obj)
    ref = []
    full = prob.run(prob.make(name, n_obj=n_obj, mixed=mixed), fn, 4, ref)
    first = []
    opt1 = prob.run(prob.make(name, n_obj=n_obj, mixed=mixed), fn, 2, first)
    state = _roundtrip(opt1.state_dict(), how, tmp_path)
    opt2 = prob.make(name, n_obj=n_obj, mixed=mixed)
    opt2.load_state_dict(state)
    assert (opt2.generation, opt2.n_evals) == (2, opt1.n_evals)
    rest = []
    prob.run(opt2, fn, 2, rest)
    for g, (a, b) in enumerate(zip(ref, first + rest, strict=True)):
        assert np.array_equal(a, b), f"generation {g}: max diff {np.abs(a - b).max()}"
    assert opt2.n_evals == full.n_evals
    if n_obj == 1:
        assert opt2.best.f == full.best.f and opt2.best.index == full.best.index
        assert np.array_equal(opt2.best.x, full.best.x)


@pytest.mark.parametrize("how", ["dict", "json"])
@pytest.mark.parametrize("name,n_obj", CASES)
def test_resume_mid_generation(prob, tmp_path, name, n_obj, how):
    """State saved after ask() and before tell(): the resumed optimizer hands out the same pending
    population, accepts its results, and continues as the uninterrupted one."""
    fn = _fn(prob, n_obj)
    ref = []
    prob.run(prob.make(name, n_obj=n_obj, mixed=True), fn, 4, ref)
    opt1 = prob.run(prob.make(name, n_obj=n_obj, mixed=True), fn, 2)
    X_pending = opt1.ask()
    state = _roundtrip(opt1.state_dict(), how, tmp_path)
    assert state["pending"] is not None
    del opt1  # the process dies here
    opt2 = prob.make(name, n_obj=n_obj, mixed=True)
    opt2.load_state_dict(state)
    assert opt2.pending and opt2.generation == 2
    X = opt2.ask()
    assert np.array_equal(X, X_pending) and np.array_equal(X, ref[2])
    opt2.tell(X, fn(X))
    assert np.array_equal(opt2.ask(), ref[3])
    # saving again mid-generation from a resumed optimizer works too
    opt3 = prob.make(name, n_obj=n_obj, mixed=True)
    opt3.load_state_dict(_roundtrip(opt2.state_dict(), how, tmp_path))
    assert np.array_equal(opt3.ask(), ref[3])


@pytest.mark.parametrize("name,n_obj", CASES)
def test_nonfinite_fitness_is_worst(prob, name, n_obj):
    opt = prob.make(name, n_obj=n_obj)
    fn = _fn(prob, n_obj)
    best_seen = np.inf
    for g in range(4):
        X = opt.ask()
        F = fn(X)
        F[0, 0] = np.nan
        F[1, -1] = np.inf
        F[2, 0] = -np.inf  # -inf is a broken objective, not a perfect candidate
        opt.tell(X, F)
        best_seen = min(best_seen, F[3:, 0].min())
        assert np.isfinite(opt.ask()).all()
        if n_obj == 1:
            assert opt.best.f == best_seen, (opt.best.f, best_seen)
    # a generation where every candidate fails
    X = opt.ask()
    opt.tell(X, np.full((X.shape[0], n_obj), np.nan))
    assert np.isfinite(opt.ask()).all()
    if n_obj == 1:
        assert opt.best.f == best_seen
    fresh = prob.make(name, n_obj=n_obj)
    X = fresh.ask()
    fresh.tell(X, np.full((X.shape[0], n_obj), np.nan))
    assert fresh.best is None


@pytest.mark.parametrize("name", NAMES)
def test_tell_misuse_raises(prob, name):
    opt = prob.make(name)
    with pytest.raises(RuntimeError, match="ask"):
        opt.tell(np.zeros((6, prob.dim)), np.zeros((6, 1)))
    X = opt.ask()
    with pytest.raises(ValueError, match="not the population"):
        opt.tell(X + 0.01, prob.sphere(X))
    with pytest.raises(ValueError, match="F has shape"):
        opt.tell(X, np.zeros((X.shape[0], 3)))
    opt.tell(X, prob.sphere(X)[:, 0])  # (n,) accepted for one objective
    assert opt.generation == 1


_CASES_X = [("cma", 1), ("nsga2", 2), ("random", 2)]
_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from dfsmerge.optim import make_optimizer, dumps_state
    out = sys.argv[1]
    for name, n_obj in [("cma", 1), ("nsga2", 2), ("random", 2)]:
        opt = make_optimizer(name, dim=6, bounds=(np.full(6, -2.0), np.full(6, 3.0)), seed=7, popsize=6,
                             n_obj=n_obj, integer_mask=np.array([0, 0, 1, 0, 0, 0], bool),
                             binary_mask=np.array([0, 0, 0, 1, 1, 0], bool))
        for _ in range(2):
            X = opt.ask()
            F = np.stack([((X - 1.0) ** 2).sum(1), ((X + 1.0) ** 2).sum(1)], 1)[:, :n_obj]
            opt.tell(X, F)
        opt.ask()  # killed mid-generation
        open(f"{out}/{name}.json", "w").write(dumps_state(opt.state_dict()))
    """
)


def test_resume_in_another_process(prob, tmp_path):
    """The saved state resumes in a process with a different hash seed (pycma keys solutions by hash)."""
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], check=True, env=env)
    for name, n_obj in _CASES_X:
        path = tmp_path / f"{name}.json"
        fn = (lambda x: prob.two_obj(x)[:, :1]) if n_obj == 1 else prob.two_obj
        ref = []
        prob.run(prob.make(name, n_obj=n_obj, mixed=True), fn, 5, ref)
        opt = prob.make(name, n_obj=n_obj, mixed=True)
        opt.load_state_dict(loads_state(path.read_text()))
        rest = []
        prob.run(opt, fn, 3, rest)
        for g, (a, b) in enumerate(zip(ref[2:], rest, strict=True)):
            assert np.array_equal(a, b), f"{name} generation {g + 2}: max diff {np.abs(a - b).max()}"
        json.loads(path.read_text())  # the file is plain JSON


@pytest.mark.parametrize("name,n_obj", CASES)
def test_failed_candidates_tell_as_penalty(prob, name, n_obj):
    """Telling NaN/inf is exactly telling the penalty value: the same next populations."""
    fn = _fn(prob, n_obj)
    a, b = prob.make(name, n_obj=n_obj, penalty=1e6), prob.make(name, n_obj=n_obj, penalty=1e6)
    for _ in range(3):
        Xa, Xb = a.ask(), b.ask()
        assert np.array_equal(Xa, Xb)
        F = fn(Xa)
        Fa, Fb = F.copy(), F.copy()
        Fa[::2, 0] = np.nan
        Fb[::2, 0] = 1e6
        a.tell(Xa, Fa)
        b.tell(Xb, Fb)
    assert np.array_equal(a.ask(), b.ask())


def test_nsga2_runs_out_of_distinct_genomes():
    """3 binary genes have 8 genomes: NSGA-II (duplicate elimination) asks fewer, then none, and says stop."""
    from dfsmerge.optim import make_optimizer

    opt = make_optimizer("nsga2", dim=3, bounds=(-1.0, 1.0), seed=0, popsize=6, binary_mask=np.ones(3, bool))
    seen = []
    for _ in range(40):
        X = opt.ask()
        assert X.shape[0] <= 6
        seen += [tuple(x) for x in X]
        opt.tell(X, (X**2).sum(1))
        if X.shape[0] == 0:
            break
    assert len(seen) == len(set(seen)) <= 8, "a genome was asked twice"
    assert opt.stop() and "nsga2" in opt.stop_reason


@pytest.mark.parametrize("name", ["nsga2", "random"])
def test_x0_is_evaluated_first_with_binary_genes_snapped(name):
    """x0 is row 0 of the first population; binary genes are on iff above the midpoint of their bounds (the
    DFS genome's "on iff I > 0" for indicator bounds [-1, 1]), so I = 0 stays off."""
    from dfsmerge.optim import make_optimizer

    x0 = np.array([0.0, 0.5, -0.2, 0.25, 0.7])
    mask = np.array([True, True, True, False, False])
    opt = make_optimizer(name, dim=5, bounds=(-1.0, 1.0), x0=x0, seed=0, popsize=4, binary_mask=mask)
    assert opt.ask()[0].tolist() == [-1.0, 1.0, -1.0, 0.25, 0.7]


def test_cma_binary_genes_follow_the_sign_rule():
    from dfsmerge.optim import make_optimizer

    x0 = np.array([0.0, 0.3, -0.3, 0.1])
    mask = np.array([True, True, True, False])
    opt = make_optimizer("cma", dim=4, bounds=(-1.0, 1.0), x0=x0, seed=0, popsize=8, binary_mask=mask, sigma0=0.01)
    X = opt.ask()
    raw = opt._pending  # CMA-ES's continuous samples behind the snapped population
    assert np.array_equal(X[:, :3], np.where(raw[:, :3] > 0, 1.0, -1.0))
    assert np.array_equal(X[:, 3], raw[:, 3])
