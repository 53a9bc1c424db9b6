"""Fixtures of the optimizer tests: small problems, a reference ask/tell loop and a small-optimizer factory."""

from types import SimpleNamespace

import numpy as np
import pytest

from dfsmerge.optim import make_optimizer

MIXED_DIM = 6


def _sphere(X, shift=1.3):  # noqa: N803
    """Shifted sphere, (n, dim) -> (n, 1); optimum 0 at x = shift (not the box centre)."""
    return ((X - shift) ** 2).sum(axis=1, keepdims=True)


def _two_obj(X):  # noqa: N803
    """Squared distances to two points, (n, dim) -> (n, 2)."""
    return np.stack([((X - 1.0) ** 2).sum(1), ((X + 1.0) ** 2).sum(1)], axis=1)


def _run(opt, fn, generations, record=None):
    """The loop the search runs: ask, evaluate, tell; appends every asked X to ``record``."""
    for _ in range(generations):
        X = opt.ask()
        if record is not None:
            record.append(X.copy())
        opt.tell(X, fn(X))
    return opt


def _make(name, n_obj=1, mixed=False, **kw):
    args = dict(
        dim=MIXED_DIM, bounds=(np.full(MIXED_DIM, -2.0), np.full(MIXED_DIM, 3.0)), seed=7, popsize=6, n_obj=n_obj
    )
    if mixed:
        args.update(integer_mask=np.array([0, 0, 1, 0, 0, 0], bool), binary_mask=np.array([0, 0, 0, 1, 1, 0], bool))
    args.update(kw)
    if name == "llm":  # proposals from a scripted OpenAI-compatible server (tests/optim/chat_server.py)
        from tests.optim.chat_server import llm_options, shared_server

        args = {**llm_options(shared_server()), **args}
    return make_optimizer(name, **args)


@pytest.fixture
def prob():
    """Namespace of problems and helpers: sphere, two_obj, run, make, dim."""
    return SimpleNamespace(sphere=_sphere, two_obj=_two_obj, run=_run, make=_make, dim=MIXED_DIM)
