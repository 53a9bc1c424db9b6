"""Export a candidate of a search run directory (``RUN/evals.jsonl``, ``RUN/best/``).

A run directory holds ``evals.jsonl`` (one JSON object per evaluated candidate: ``id``, ``generation``,
``candidate`` = ``{"ps": <mergekit recipe dict or null>, "path": <plan dict or null>}``, ``objectives``) and
``best/plan.yaml`` and/or ``best/recipe.yaml``. In joint and staged runs the plan's PS-merged model appears in its
``models`` mapping with the value ``"@ps"``; the exporter materialises the recipe for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfsmerge.errors import ConfigError
from dfsmerge.export.exporter import _export, resolve_model_paths
from dfsmerge.genome.plan import PathPlan


@dataclass(frozen=True)
class RunCandidate:
    """A candidate read from a run directory: PS recipe dict, plan dict (either may be None) and its scores."""

    id: str
    ps: Mapping[str, Any] | None
    path: Mapping[str, Any] | None
    objectives: Mapping[str, Any]


def load_run_candidate(run_dir: str | Path, candidate: str | int = "best") -> RunCandidate:
    """Read candidate ``candidate`` (``"best"`` or an ``id`` of ``evals.jsonl``) of a run directory (through
    :class:`dfsmerge.rundir.reader.RunReader`).

    Raises:
        ConfigError: the run directory, its best files or the id do not exist (names what is there instead).
    """
    from dfsmerge.errors import CheckpointError
    from dfsmerge.rundir.reader import RunReader

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run directory {str(run)!r} does not exist; give the directory of a `dfsmerge search`")
    try:
        reader = RunReader.open(run, require_evals=False)
    except CheckpointError as e:
        raise ConfigError(str(e)) from e
    if str(candidate) == "best":
        ps, path = reader.best_files()
        rec = reader.find(ps, path)
        return RunCandidate("best", ps, path, dict(rec.objectives) if rec is not None else {})
    rec = reader.record(candidate)
    if rec.candidate.get("infeasible"):
        raise ConfigError(f"candidate {candidate} of {run} is infeasible ({rec.candidate['infeasible']}); "
                          "nothing to export")
    return RunCandidate(str(candidate), rec.ps, rec.path, dict(rec.objectives))


def export_candidate(run_dir: str | Path, candidate: str | int, out_dir: str | Path, *,
                     format: str = "folded", dtype: str | torch.dtype | None = None, force: bool = False,
                     max_shard_size: int | str = "5GB", allow_pickle: bool = False, ps_seed: int | None = 0,
                     quant: str = "f32") -> Path:
    """Export one candidate of a search run (PS, DFS or PS+DFS) with its scores on the model card.

    Args:
        run_dir: the run directory.
        candidate: ``"best"`` or an id of ``evals.jsonl``.
        out_dir, format, dtype, force, max_shard_size, allow_pickle, ps_seed, quant: as
            :func:`dfsmerge.export.export_plan`.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: unknown run/candidate, a candidate with neither recipe nor path; the errors of ``export_plan``.
    """
    run = Path(run_dir)
    cand = load_run_candidate(run, candidate)
    scores = dict(cand.objectives)
    if cand.path is None and cand.ps is None:
        raise ConfigError(f"candidate {candidate} of {run} has neither a PS recipe nor a path; nothing to export")
    plan = None
    if cand.path is not None:
        plan = resolve_model_paths(PathPlan.from_dict(cand.path), run)
    return _export(plan, out_dir, format=format, dtype=dtype, force=force, max_shard_size=max_shard_size,
                   scores=scores, allow_pickle=allow_pickle, ps_recipe=cand.ps, ps_seed=ps_seed, quant=quant)
