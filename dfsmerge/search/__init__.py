"""``dfsmerge search``: an explicit, checkpointed ask/evaluate/tell loop over the PS+DFS genome (DESIGN.md section 7).

Entry points: :func:`load_search_config` (validated before any model is loaded), :func:`run_search`. The loop
never touches ``cma`` or ``pymoo`` directly (see :mod:`dfsmerge.optim`), and evaluates candidates through a
backend: local in-process (default) or Ray actors each holding their own layer pool.

The names are resolved on first use (PEP 562), so the command line can import ``dfsmerge.search.cli`` to build its
parser without importing torch, cma or pymoo.
"""

from importlib import import_module

_EXPORTS = {
    "SearchConfig": "config", "load_search_config": "config", "translate_mergekit_evolve": "config",
    "Search": "loop", "SearchFailedError": "loop", "SearchResult": "loop", "run_search": "loop",
    "SYNTHETIC_OBJECTIVES": "worker", "Worker": "worker", "register_synthetic": "worker",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dfsmerge.search' has no attribute {name!r}")
    value = getattr(import_module(f"dfsmerge.search.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
