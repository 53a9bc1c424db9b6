"""Random search: uniform samples in the box, the baseline every optimizer must beat.

J. Bergstra and Y. Bengio, "Random Search for Hyper-Parameter Optimization", JMLR 13, 2012.
Binary genes are fair coins over {lo_j, hi_j}; integer genes are uniform over the integers in their bounds.
The first candidate of the first generation is ``x0`` when it is given, so the baseline sees the same start
point as CMA-ES and NSGA-II. Stream: ``numpy.random.Generator(PCG64(seed))``, saved as its JSON state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dfsmerge.optim.base import Optimizer, OptimizerOptions, register_optimizer


@register_optimizer("random")
class RandomSearch(Optimizer):
    """Uniform random search over the box (any number of objectives)."""

    Options = OptimizerOptions
    multi_objective = True

    def _setup(self) -> None:
        self._rng = np.random.Generator(np.random.PCG64(self.space.seed))

    def _ask(self) -> np.ndarray:
        sp = self.space
        n = sp.popsize
        X = self._rng.uniform(sp.lo, sp.hi, size=(n, sp.dim))  # (n, dim)
        if sp.integer_mask.any():
            m = sp.integer_mask
            X[:, m] = self._rng.integers(np.ceil(sp.lo[m]), np.floor(sp.hi[m]), size=(n, int(m.sum())), endpoint=True)
        if sp.binary_mask.any():
            b = sp.binary_mask
            X[:, b] = np.where(self._rng.random((n, int(b.sum()))) < 0.5, sp.lo[b], sp.hi[b])
        if self.generation == 0 and sp.x0 is not None:
            X[0] = sp.present(sp.x0[None])[0]
        return X

    def _tell(self, X: np.ndarray, F: np.ndarray) -> None:  # noqa: N803
        pass

    def _state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def _load_state_dict(self, d: dict[str, Any]) -> None:
        self._rng.bit_generator.state = d["rng"]
