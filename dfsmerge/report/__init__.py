"""The run report (``RUN/report/``, also ``dfsmerge inspect RUN``): best-so-far curve, Pareto front (2–3 objectives),
the best path as a layer diagram and as the networkx layer-path graph, and ``report.md`` with the best candidates.

Reads only the run directory (``evals.jsonl``, ``config.yaml``, ``best/``), so it works on a finished, stopped or
still running search. Plots use matplotlib's Agg backend (no display needed).
"""

from dfsmerge.report.report import describe_best, load_evals, summarize, write_report

__all__ = ["describe_best", "load_evals", "summarize", "write_report"]
