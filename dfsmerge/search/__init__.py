"""``dfsmerge search``: an explicit, checkpointed ask/evaluate/tell loop over the PS+DFS genome (docs/design.md
section 7).

Entry points: :func:`load_search_config` (validated before any model is loaded), :func:`run_search`. The loop
never touches ``cma`` or ``pymoo`` directly (see :mod:`dfsmerge.optim`), and evaluates candidates through a
backend: local in-process (default) or Ray actors each holding their own layer pool.

The names are resolved on first use (PEP 562), so the command line can import ``dfsmerge.search.cli`` for its
handlers while it builds its parser, without importing torch, cma or pymoo.
"""

from dfsmerge._lazy import lazy_getattr

_EXPORTS = {
    "SearchConfig": "config", "load_search_config": "config", "translate_mergekit_evolve": "config",
    "Search": "loop", "SearchFailedError": "loop", "SearchResult": "loop", "run_search": "loop",
    "SYNTHETIC_OBJECTIVES": "worker", "Worker": "worker", "register_synthetic": "worker",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
