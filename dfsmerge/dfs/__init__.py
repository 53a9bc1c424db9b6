"""Data-flow-space merging: layer paths (:class:`PathPlan`) and their genome (Sakana AI, arXiv 2403.13187)."""

from dfsmerge.dfs.genome import SCALE_MODES, DFSGenome, Infeasible
from dfsmerge.dfs.plan import LayerRef, PathPlan, Step

__all__ = ["SCALE_MODES", "DFSGenome", "Infeasible", "LayerRef", "PathPlan", "Step"]
