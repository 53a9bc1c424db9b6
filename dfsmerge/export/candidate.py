"""Export a candidate of a search run directory (``RUN/evals.jsonl``, ``RUN/best/``).

A run directory holds ``evals.jsonl`` (one JSON object per evaluated candidate: ``id``, ``generation``,
``candidate`` = ``{"ps": <mergekit recipe dict or null>, "path": <plan dict or null>}``, ``objectives``) and
``best/plan.yaml`` and/or ``best/recipe.yaml``. In joint and staged runs the plan's PS-merged model appears in its
``models`` mapping with the value ``"@ps"``; the exporter materialises the recipe for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from dfsmerge.dfs.plan import PathPlan
from dfsmerge.errors import ConfigError
from dfsmerge.export.exporter import _export, resolve_model_paths


@dataclass(frozen=True)
class RunCandidate:
    """A candidate read from a run directory: PS recipe dict, plan dict (either may be None) and its scores."""

    id: str
    ps: Mapping[str, Any] | None
    path: Mapping[str, Any] | None
    objectives: Mapping[str, Any]


def _read_evals(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "evals.jsonl"
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed run
            continue
    return rows


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def load_run_candidate(run_dir: str | Path, candidate: str | int = "best") -> RunCandidate:
    """Read candidate ``candidate`` (``"best"`` or an ``id`` of ``evals.jsonl``) of a run directory.

    Raises:
        ConfigError: the run directory, its best files or the id do not exist (names what is there instead).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run directory {str(run)!r} does not exist; give the directory of a `dfsmerge search`")
    rows = _read_evals(run)
    if str(candidate) == "best":
        best = run / "best"
        plan_f, recipe_f = best / "plan.yaml", best / "recipe.yaml"
        if not (plan_f.is_file() or recipe_f.is_file()):
            raise ConfigError(f"{best} has neither plan.yaml nor recipe.yaml; the run has not finished a generation "
                              "yet, or pass --candidate ID (an id of evals.jsonl)")
        path = yaml.safe_load(plan_f.read_text()) if plan_f.is_file() else None
        ps = yaml.safe_load(recipe_f.read_text()) if recipe_f.is_file() else None
        objectives: Mapping[str, Any] = {}
        for row in rows:
            c = row.get("candidate") or {}
            if _same(c.get("path"), path) and _same(c.get("ps"), ps):
                objectives = row.get("objectives") or {}
                break
        return RunCandidate("best", ps, path, objectives)
    for row in rows:
        if str(row.get("id")) == str(candidate):
            c = row.get("candidate") or {}
            if c.get("infeasible"):
                raise ConfigError(f"candidate {candidate} of {run} is infeasible ({c['infeasible']}); "
                                  "nothing to export")
            return RunCandidate(str(candidate), c.get("ps"), c.get("path"), row.get("objectives") or {})
    ids = [str(r.get("id")) for r in rows]
    shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
    raise ConfigError(f"--candidate {candidate!r} is not in {run / 'evals.jsonl'} (ids: {shown or 'none'}); "
                      "use best or one of the ids")


def export_candidate(run_dir: str | Path, candidate: str | int, out_dir: str | Path, *,
                     format: str = "folded", dtype: str | torch.dtype | None = None, force: bool = False,
                     max_shard_size: int | str = "5GB", allow_pickle: bool = False, ps_seed: int | None = 0) -> Path:
    """Export one candidate of a search run (PS, DFS or PS+DFS) with its scores on the model card.

    Args:
        run_dir: the run directory.
        candidate: ``"best"`` or an id of ``evals.jsonl``.
        out_dir, format, dtype, force, max_shard_size, allow_pickle, ps_seed: as
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
                   scores=scores, allow_pickle=allow_pickle, ps_recipe=cand.ps, ps_seed=ps_seed)
