"""CMA-ES adapter over ``cma.CMAEvolutionStrategy`` (pycma).

N. Hansen and A. Ostermeier, "Completely Derandomized Self-Adaptation in Evolution Strategies", Evolutionary
Computation 9(2), 2001; N. Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772, 2016.
Bounds use pycma's ``BoundTransform`` (the default ``BoundaryHandler``): the search runs in an unbounded
genotype space mapped smoothly into the box, so every sample is feasible.

Determinism: pycma draws from numpy's *global* RNG (its ``randn`` option and a few ``np.random.rand`` calls).
The adapter gives pycma its own ``randn`` (a ``RandomState`` held inside the strategy, pickled with it) and swaps
a private state into the global RNG around every call into pycma, so results depend only on ``seed`` and are
unaffected by other code using ``np.random``. Not thread-safe (the swap touches global state).

Binary genes (``binary_mask``) stay continuous for CMA-ES, as in the DFS paper (Akiba et al., arXiv:2403.13187,
which evolves real-valued indicators); the loop sees them snapped to ``hi`` iff above the midpoint of their
bounds (else ``lo``), the same on/off decision as the genome's "on iff I > 0" for the indicator bounds [-1, 1].
Integer genes use
pycma's ``integer_variables`` (a minimal step size so they keep moving) and are rounded for the loop.
"""

from __future__ import annotations

import contextlib
import pickle
from typing import Any

import cma
import numpy as np
from pydantic import Field

from dfsmerge.errors import ConfigError
from dfsmerge.optim.base import Optimizer, OptimizerOptions, register_optimizer

DIAGONAL_ABOVE = 100  # genes; above this the covariance is diagonal unless cma_options says otherwise


class CMAOptions(OptimizerOptions):
    """Options of ``optimizer: cma``."""

    sigma0: float = Field(0.25, gt=0)
    """Initial step size as a fraction of each gene's range: sigma_j = sigma0 * (hi_j - lo_j)."""
    stds: tuple[float, ...] | None = None
    """Initial step size of each gene in its own units (replaces sigma0 * range); a search with no sigma0 of its
    own takes these from the genome (``GenomeSpace.initial_stds``), which keeps a deep model's first generation
    near its start."""
    cma_options: dict[str, Any] = Field(default_factory=dict)
    """Extra pycma options (``cma.CMAOptions()`` lists them), e.g. ``{"tolfun": 1e-8}``. Options the adapter
    owns (bounds, popsize, seed, randn, CMA_stds, integer_variables, verbosity) cannot be set here."""


class _Randn:
    """Picklable ``randn(*shape)`` over a private RandomState, given to pycma as its ``randn`` option."""

    def __init__(self, seed: int):
        self.rs = np.random.RandomState(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rs.standard_normal(shape)


_OWNED = {
    "bounds",
    "popsize",
    "seed",
    "randn",
    "CMA_stds",
    "integer_variables",
    "verbose",
    "verb_log",
    "verb_disp",
    "verb_filenameprefix",
    "x0",
    "sigma0",
}


def _rs_to_json(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _rs_from_json(d: dict[str, Any]) -> tuple:
    return ("MT19937", np.asarray(d["keys"], dtype=np.uint32), d["pos"], d["has_gauss"], d["cached_gaussian"])


@register_optimizer("cma")
class CMAES(Optimizer):
    """CMA-ES (single objective) over the box; see the module docstring."""

    Options = CMAOptions
    multi_objective = False

    @classmethod
    def _validate_options(cls, options: CMAOptions) -> None:
        bad = sorted(set(options.cma_options) & _OWNED)
        if bad:
            raise ConfigError(
                f"optimizer 'cma' option cma_options.{bad[0]} is set by dfsmerge; use the optimizer's own "
                "setting (bounds, popsize, seed, sigma0, integer_mask) instead"
            )
        known = cma.CMAOptions()
        unknown = sorted(k for k in options.cma_options if k not in known)
        if unknown:
            raise ConfigError(
                f"optimizer 'cma' option cma_options.{unknown[0]} is not a pycma option; "
                "see cma.CMAOptions() for the list"
            )

    def _setup(self) -> None:
        sp, opts = self.space, self.options
        x0 = sp.x0 if sp.x0 is not None else 0.5 * (sp.lo + sp.hi)
        if opts.stds is not None and (len(opts.stds) != sp.dim or not all(s > 0 for s in opts.stds)):
            raise ConfigError(f"optimizer 'cma' option stds has {len(opts.stds)} values; give {sp.dim} (one per "
                              "gene), each > 0, or leave it out to use sigma0")
        copts = {
            "bounds": [sp.lo.tolist(), sp.hi.tolist()],
            "popsize": sp.popsize,
            "seed": float("nan"),  # pycma must not reseed the global RNG; we own the streams
            "randn": _Randn(sp.seed),
            "CMA_stds": (sp.hi - sp.lo).tolist() if opts.stds is None else list(opts.stds),
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            # A merge search often sees a flat population (every candidate scores 0 on a hard task); pycma's
            # defaults stop after one such iteration (tolflatfitness) or a few (tolfun). Keep going (pycma widens
            # sigma on flat fitness); the loop's budget decides when to stop. cma_options can set either back.
            "tolflatfitness": 10**6,
            "tolfun": 0.0,
        }
        if sp.integer_mask.any():
            copts["integer_variables"] = np.flatnonzero(sp.integer_mask).tolist()
        if sp.dim > DIAGONAL_ABOVE:
            # Separable CMA-ES (Ros & Hansen 2008, "A simple modification in CMA-ES achieving linear time and space
            # complexity"): a diagonal covariance costs O(n) per sample instead of O(n^2) plus eigendecompositions,
            # and a full covariance needs O(n^2) evaluations to pay off, far beyond a merge search's budget.
            # cma_options={"CMA_diagonal": False} restores the full matrix.
            copts["CMA_diagonal"] = True
        copts.update(opts.cma_options)
        # A second stream for pycma's direct np.random calls (integer centering, rare repairs).
        self._aux = np.random.RandomState(sp.seed + 1).get_state()
        with self._global_rng():
            self._es = cma.CMAEvolutionStrategy(x0.tolist(), opts.sigma0 if opts.stds is None else 1.0, copts)

    @contextlib.contextmanager
    def _global_rng(self):
        saved = np.random.get_state()
        np.random.set_state(self._aux)
        try:
            yield
        finally:
            self._aux = np.random.get_state()
            np.random.set_state(saved)

    def _ask(self) -> np.ndarray:
        with self._global_rng():
            X = np.asarray(self._es.ask(), dtype=np.float64)  # (popsize, dim)
        if self._es.countiter == 0 and self.space.x0 is not None:
            # Candidate 0 is the start itself (the source's own path, the initial PS weights), scored like the
            # others, so a search never ends below where it started; pycma takes it as an injected solution.
            X[0] = self.space.x0
        return X

    def _tell(self, X: np.ndarray, F: np.ndarray) -> None:  # noqa: N803
        with self._global_rng():
            # pycma looks solutions up by identity of content to recover their genotypes: pass its own arrays.
            self._es.tell(list(X), F[:, 0].tolist())

    @property
    def elite_size(self) -> int:
        """mu: the candidates whose ranks move the mean (racing may stop the others early). The others still count
        a little: active CMA's negative weights (``CMA_active``, on by default) and pycma's flat-fitness check read
        their values, which a race replaces by partial estimates, so a raced search can take another trajectory."""
        return int(self._es.sp.weights.mu)

    def _stop(self) -> str | None:
        if self._es.countiter == 0:
            return None
        with self._global_rng():
            d = self._es.stop()
        return None if not d else "cma: " + ", ".join(f"{k}={v}" for k, v in d.items())

    def _state_dict(self) -> dict[str, Any]:
        return {"es": self._es.pickle_dumps(), "aux_rng": _rs_to_json(self._aux)}

    def _load_state_dict(self, d: dict[str, Any]) -> None:
        self._es = pickle.loads(d["es"])
        self._aux = _rs_from_json(d["aux_rng"])
