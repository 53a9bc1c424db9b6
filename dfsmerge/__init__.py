"""dfsmerge: evolutionary model merging in parameter space (PS) and data-flow space (DFS).

The notebook API (resolved on first use, so ``import dfsmerge`` stays light; see docs/api.md):
``open_run(RUN)`` (read-only views of a search run), ``load_plan``, ``evaluate`` and ``compare`` (scores and paired
tests, as ``dfsmerge eval``), ``run_ablation`` (as ``dfsmerge ablate``), ``Pool`` (the resident layer pool) and
``PathPlan``.
"""

from dfsmerge._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "open_run": "rundir.reader", "RunReader": "rundir.reader", "RunRecord": "rundir.reader",
    "load_plan": "analysis.experiment", "evaluate": "analysis.experiment", "compare": "analysis.experiment",
    "eval_options": "analysis.experiment",
    "run_ablation": "analysis.ablation", "LayerPool": "runtime.pool", "PathPlan": "genome.plan",
}
_ALIASES = {"Pool": "LayerPool"}
__all__ = sorted([*_EXPORTS, *_ALIASES])
_resolve = lazy_getattr(__name__, _EXPORTS, globals())


def __getattr__(name: str):
    value = _resolve(_ALIASES.get(name, name))
    globals()[name] = value
    return value
