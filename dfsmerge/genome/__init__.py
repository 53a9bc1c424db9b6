"""Genomes: what a candidate is, and the vector the optimizer searches that decodes to it.

- :mod:`~dfsmerge.genome.plan`: layer paths (:class:`PathPlan` of :class:`Step` over :class:`LayerRef`), the decoded
  data-flow-space (DFS) part and its plan file format;
- :mod:`~dfsmerge.genome.dfs`: the DFS genome (Sakana AI, arXiv 2403.13187, sec. 3.2): indicator and scale genes
  -> path;
- :mod:`~dfsmerge.genome.ps`: the parameter-space (PS) genome (as mergekit-evolve's) -> :class:`PSRecipe`, a
  mergekit recipe;
- :mod:`~dfsmerge.genome.space`: :class:`GenomeSpace`, the two joined in one vector per search mode -> a
  :class:`Candidate`.
- :mod:`~dfsmerge.genome.mergekit_yaml`: a candidate as a mergekit recipe (a path's passthrough with its scales
  folded), which a search's ``best/`` and an export both write.

The names are resolved on first use (PEP 562), so importing one part does not import the others.
"""

from dfsmerge._lazy import lazy_getattr

_EXPORTS = {
    "FrozenDict": "plan", "GENE_DECIMALS": "plan", "LayerRef": "plan", "PathPlan": "plan", "Step": "plan",
    "SCALE_MODES": "dfs", "DFSGenome": "dfs", "Infeasible": "dfs",
    "METHOD_GENES": "ps", "PSGenome": "ps", "PSRecipe": "ps", "genome_method_error": "ps",
    "MERGED": "space", "MODE_TABLE": "space", "MODES": "space", "PS_MODEL_IN_PLAN": "space", "Candidate": "space",
    "GenomeSpace": "space", "Mode": "space", "ModeSpec": "space", "stable_key": "space",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
