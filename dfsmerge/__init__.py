"""dfsmerge: evolutionary model merging in parameter space (PS) and data-flow space (DFS)."""

__version__ = "0.1.0"
