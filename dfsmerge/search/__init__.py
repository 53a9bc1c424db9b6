"""``dfsmerge search``: the explicit, checkpointed evolutionary loop over the PS+DFS genome (DESIGN.md section 7),
its config, run directory, local and Ray backends."""

from dfsmerge.search.config import SearchConfig, load_search_config, translate_mergekit_evolve
from dfsmerge.search.loop import Search, SearchFailedError, SearchResult, run_search
from dfsmerge.search.worker import SYNTHETIC_OBJECTIVES, Worker, register_synthetic

__all__ = ["SYNTHETIC_OBJECTIVES", "Search", "SearchConfig", "SearchFailedError", "SearchResult", "Worker",
           "load_search_config", "register_synthetic", "run_search", "translate_mergekit_evolve"]
