"""NSGA-II adapter over pymoo's ask/tell interface.

K. Deb, A. Pratap, S. Agarwal and T. Meyarivan, "A Fast and Elitist Multiobjective Genetic Algorithm: NSGA-II",
IEEE Transactions on Evolutionary Computation 6(2), 2002. Operators: simulated binary crossover (SBX) and
polynomial mutation (Deb and Agrawal, "Simulated Binary Crossover for Continuous Search Space", Complex Systems
9, 1995), as in the paper.

Mixed genes. Continuous genes use SBX + polynomial mutation. Genes in ``binary_mask`` (the DFS indicators:
on/off) are sampled as fair coins, recombined by uniform crossover and mutated by bit flips (probability
``binary_flip_prob`` per gene, default 1/dim), and always hold exactly ``lo_j`` (off) or ``hi_j`` (on): SBX
and polynomial mutation on a 0/1 variable mostly return values near a parent, so they would almost never flip
a layer in or out, while a bit flip does so in one step. Genes in ``integer_mask`` use SBX + polynomial
mutation followed by rounding (pymoo's recommended treatment of integer variables). One row of the initial
population is ``x0`` when it is given (with binary genes snapped to the nearer bound, integers rounded).

Determinism: every pymoo operator draws from ``algorithm.random_state`` (a numpy Generator seeded by ``seed``),
which is pickled with the algorithm.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Any

import numpy as np
from pydantic import Field
from pymoo.algorithms.moo import nsga2 as _pymoo_nsga2
from pymoo.config import Config as _PymooConfig
from pymoo.core.crossover import Crossover
from pymoo.core.duplicate import DefaultDuplicateElimination, NoDuplicateElimination
from pymoo.core.evaluator import Evaluator
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.problems.static import StaticProblem

from dfsmerge.optim.base import Optimizer, OptimizerOptions, SearchSpace, register_optimizer

_PymooConfig.warnings["not_compiled"] = False  # the pure-Python fallback is fast enough for our pop sizes


class NSGA2Options(OptimizerOptions):
    """Options of ``optimizer: nsga2``."""

    crossover_prob: float = Field(0.9, ge=0, le=1)
    """Probability that a pair of parents is recombined (SBX / uniform crossover)."""
    crossover_eta: float = Field(15.0, gt=0)
    """SBX distribution index (larger: children closer to parents)."""
    mutation_eta: float = Field(20.0, gt=0)
    """Polynomial-mutation distribution index."""
    mutation_prob_var: float | None = Field(None, gt=0, le=1)
    """Per-gene probability of polynomial mutation of continuous/integer genes; None: 1/dim."""
    binary_flip_prob: float | None = Field(None, gt=0, le=1)
    """Per-gene probability of flipping a binary gene; None: 1/dim."""
    eliminate_duplicates: bool = True
    """Never ask a genome twice in a run: offspring equal to a survivor, to each other or to any genome asked
    before are dropped and re-bred (pymoo alone only checks the current population). Matters for binary and
    integer genes; saves evaluations. A run whose genomes are all seen asks 0 rows and stops."""


class _Box(Problem):
    """The box only: fitness comes from the loop through ``StaticProblem``."""

    def __init__(self, space: SearchSpace):
        super().__init__(n_var=space.dim, n_obj=space.n_obj, xl=space.lo.copy(), xu=space.hi.copy())


class _SeenElimination(DefaultDuplicateElimination):
    """pymoo's duplicate elimination plus a run-long record of asked genomes (16-byte BLAKE2 digests of the
    float64 rows, deterministic across processes, pickled with the algorithm)."""

    def __init__(self):
        super().__init__()
        self.seen: set[bytes] = set()

    @staticmethod
    def key(x: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(x, dtype=np.float64).tobytes(), digest_size=16).digest()

    def do(self, pop, *args, return_indices=False, to_itself=True):
        out = super().do(pop, *args, return_indices=return_indices, to_itself=to_itself)
        if return_indices or len(out) == 0 or not self.seen:
            return out
        fresh = np.array([self.key(x) not in self.seen for x in out.get("X")], dtype=bool)  # (n,)
        return out[fresh]


class _MixedSampling(Sampling):
    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        sp = self.space
        U = random_state.random((n_samples, sp.dim))  # (n, dim) in [0, 1)
        X = sp.lo + U * (sp.hi - sp.lo)  # (n, dim)
        b = sp.binary_mask
        X[:, b] = np.where(U[:, b] < 0.5, sp.lo[b], sp.hi[b])  # fair coins
        if sp.x0 is not None:
            X[0] = sp.x0
        return sp.present(X)


class _MixedCrossover(Crossover):
    def __init__(self, space: SearchSpace, prob: float, eta: float):
        super().__init__(2, 2, prob=prob)
        self.space = space
        self.sbx = SBX(eta=eta, prob=1.0)

    def _do(self, problem, X, *args, random_state=None, **kwargs):  # noqa: N803
        # X: (2 parents, n_matings, dim) -> (2 children, n_matings, dim)
        Q = self.sbx._do(problem, X, random_state=random_state)
        b = self.space.binary_mask
        if b.any():
            swap = random_state.random((X.shape[1], int(b.sum()))) < 0.5  # (n_matings, n_bin) uniform crossover
            Q[0][:, b] = np.where(swap, X[1][:, b], X[0][:, b])
            Q[1][:, b] = np.where(swap, X[0][:, b], X[1][:, b])
        return np.stack([self.space.present(Q[0]), self.space.present(Q[1])])


class _MixedMutation(Mutation):
    def __init__(self, space: SearchSpace, eta: float, prob_var: float | None, flip_prob: float | None):
        super().__init__(prob=1.0)
        self.space = space
        self.pm = PM(eta=eta, prob_var=prob_var)
        self.flip_prob = flip_prob if flip_prob is not None else 1.0 / space.dim

    def _do(self, problem, X, *args, random_state=None, **kwargs):  # noqa: N803
        Xp = self.pm._do(problem, X, random_state=random_state)  # (n, dim)
        b = self.space.binary_mask
        if b.any():
            lo, hi = self.space.lo[b], self.space.hi[b]
            flip = random_state.random((X.shape[0], int(b.sum()))) < self.flip_prob  # (n, n_bin)
            cur = X[:, b]
            Xp[:, b] = np.where(flip, np.where(cur == hi, lo, hi), cur)
        return self.space.present(Xp)


@register_optimizer("nsga2")
class NSGA2(Optimizer):
    """NSGA-II for one or more objectives, with optional binary and integer genes; see the module docstring."""

    Options = NSGA2Options
    multi_objective = True

    def _setup(self) -> None:
        sp, o = self.space, self.options
        self._algo = _pymoo_nsga2.NSGA2(
            pop_size=sp.popsize,
            sampling=_MixedSampling(sp),
            crossover=_MixedCrossover(sp, o.crossover_prob, o.crossover_eta),
            mutation=_MixedMutation(sp, o.mutation_eta, o.mutation_prob_var, o.binary_flip_prob),
            eliminate_duplicates=_SeenElimination() if o.eliminate_duplicates else NoDuplicateElimination(),
            seed=sp.seed,
        )
        self._algo.setup(_Box(sp), termination=NoTermination(), verbose=False)
        self._pop = None  # the pymoo Population of the pending ask
        self._exhausted = False

    def _ask(self) -> np.ndarray:
        pop = self._algo.ask()
        if pop is None or len(pop) == 0:
            self._exhausted = True
            self._pop = None
            return np.empty((0, self.space.dim))
        self._pop = pop
        X = np.asarray(pop.get("X"), dtype=np.float64)  # (n, dim)
        elim = self._algo.eliminate_duplicates
        if isinstance(elim, _SeenElimination):
            elim.seen.update(elim.key(x) for x in X)
        return X

    def _tell(self, X: np.ndarray, F: np.ndarray) -> None:  # noqa: N803
        if self._pop is None:
            return
        Evaluator().eval(StaticProblem(self._algo.problem, F=F), self._pop)
        self._algo.tell(infills=self._pop)
        self._pop = None

    def _stop(self) -> str | None:
        if self._exhausted:
            return "nsga2: mating bred no genome that was not asked before (population converged or space exhausted)"
        return None

    def _state_dict(self) -> dict[str, Any]:
        return {"algorithm": pickle.dumps(self._algo), "exhausted": self._exhausted}

    def _load_state_dict(self, d: dict[str, Any]) -> None:
        self._algo = pickle.loads(d["algorithm"])
        self._exhausted = bool(d["exhausted"])
        self._pop = None
