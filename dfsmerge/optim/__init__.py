"""Optimizers behind one ask/tell protocol with explicit, resumable state (see ``base``).

Registry names: ``cma`` (CMA-ES, pycma), ``nsga2`` (NSGA-II, pymoo), ``random`` (uniform random search),
``llm`` (an LLM proposes each generation's mean: EvoLLM, over an OpenAI-compatible endpoint or a local model).
The search loop uses only this package; it never imports ``cma``, ``pymoo`` or ``openai``.
"""

from dfsmerge.optim import cmaes as _cmaes  # noqa: F401  (registers "cma")
from dfsmerge.optim import llm as _llm  # noqa: F401  (registers "llm")
from dfsmerge.optim import nsga2 as _nsga2  # noqa: F401  (registers "nsga2")
from dfsmerge.optim import random_search as _random_search  # noqa: F401  (registers "random")
from dfsmerge.optim.base import (
    OPTIMIZERS,
    Best,
    Optimizer,
    OptimizerOptions,
    SearchSpace,
    default_popsize,
    dumps_state,
    loads_state,
    make_optimizer,
    register_optimizer,
    validate_options,
)
from dfsmerge.optim.pareto import non_dominated_sort, pareto_mask

__all__ = [
    "OPTIMIZERS",
    "Best",
    "Optimizer",
    "OptimizerOptions",
    "SearchSpace",
    "default_popsize",
    "dumps_state",
    "loads_state",
    "make_optimizer",
    "non_dominated_sort",
    "pareto_mask",
    "register_optimizer",
    "validate_options",
]
