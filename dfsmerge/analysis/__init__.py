"""Analysis of a finished (or running) search: scores that load models again, over the search's own worker.

:mod:`~dfsmerge.analysis.experiment` scores checkpoints, plans and run candidates with per-document outcomes and
paired tests (``dfsmerge eval``; ``dfsmerge.evaluate``, ``dfsmerge.compare``); :mod:`~dfsmerge.analysis.ablation`
scores a candidate's ablations (``dfsmerge ablate``) and the best against the start and the sources
(:func:`~dfsmerge.analysis.ablation.run_significance`, the search command's final step). The report
(:mod:`dfsmerge.report`) only reads the run directory, so the search can write it; this package sits above the search.
"""
