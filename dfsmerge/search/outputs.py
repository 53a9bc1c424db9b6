"""What a search leaves besides its log: ``best/`` (plan, recipe, mergekit YAML) and the Pareto set.

``best/mergekit.yaml`` is the PS recipe for PS-only candidates; for a layer path it is the mergekit ``passthrough``
recipe of :mod:`dfsmerge.genome.mergekit_yaml` with the step scales folded into the residual-branch outputs
(docs/design.md section 6: step k's branch outputs divided by the cumulative scale C_k; exact up to the norm's eps),
or a header that says why mergekit cannot express the path. In joint/staged mode the path's model A is the PS-merged
model (``@ps`` in the plan), so that passthrough reads ``./merged`` and is run after ``mergekit-yaml recipe.yaml
./merged``.
``dfsmerge export RUN`` is the exact route to a checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dfsmerge.genome import PS_MODEL_IN_PLAN
from dfsmerge.search.state import EvalRecord, atomic_write, jsonable

MERGED_DIR = "./merged"


def _configs(plan, ps: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``config.json`` of each model of the plan (the PS-merged one: of the first model of its recipe)."""
    from dfsmerge.io import open_checkpoint

    out = {}
    for name, ref in plan.models.items():
        if ref == PS_MODEL_IN_PLAN:  # its sources share its architecture
            from dfsmerge.recipe.config import load_merge_config

            ref = load_merge_config(ps).referenced_models()[0]
        out[name] = open_checkpoint(ref, name=name).config
    return out


def passthrough_recipe(path: dict[str, Any], *, ps: dict[str, Any] | None = None,
                       dtype: str = "float32") -> tuple[dict[str, Any] | None, list[str]]:
    """The mergekit passthrough recipe of a plan dict (scales folded, the PS-merged model read from ``./merged``) and
    the notes on it: why it cannot be expressed (the recipe is then None), or why mergekit cannot run it."""
    from dfsmerge.arch import get_architecture
    from dfsmerge.genome.mergekit_yaml import config_gaps, passthrough, passthrough_gaps
    from dfsmerge.genome.plan import PathPlan

    plan = PathPlan.from_dict(path)
    configs = _configs(plan, ps)
    arch = get_architecture(configs[plan.base], source=plan.base)
    gaps = passthrough_gaps(plan, arch)
    if gaps:
        return None, gaps
    models = {k: (MERGED_DIR if v == PS_MODEL_IN_PLAN else v) for k, v in plan.models.items()}
    return passthrough(plan, models, arch, dtype=dtype), config_gaps(configs)


def write_best(best_dir: Path, record: dict[str, Any], space=None) -> dict[str, Path]:
    """Write ``best.json``, ``plan.yaml`` (path), ``recipe.yaml`` (PS) and ``mergekit.yaml`` of a record."""
    best_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    cand = record.get("candidate") or {}
    atomic_write(best_dir / "best.json", json.dumps(jsonable(record), indent=2) + "\n")
    out["best"] = best_dir / "best.json"
    ps, path = cand.get("ps"), cand.get("path")
    dtype = (ps or {}).get("dtype", "float32")
    if ps is not None:
        atomic_write(best_dir / "recipe.yaml", yaml.safe_dump(ps, sort_keys=False))
        out["recipe"] = best_dir / "recipe.yaml"
    if path is not None:
        from dfsmerge.genome.plan import PathPlan

        atomic_write(best_dir / "plan.yaml", PathPlan.from_dict(path).to_yaml())
        out["plan"] = best_dir / "plan.yaml"
    mk = None
    header = f"# best candidate (eval id {record['id']}, fitness {record.get('fitness')}) of a dfsmerge search\n"
    if path is None and ps is not None:
        mk = ps
        header += "# run: mergekit-yaml mergekit.yaml OUT   (or: dfsmerge merge mergekit.yaml OUT)\n"
    elif path is not None:
        mk, notes = passthrough_recipe(path, ps=ps, dtype=dtype)
        uses_ps = PS_MODEL_IN_PLAN in path["models"].values()
        header += ("# first: mergekit-yaml recipe.yaml ./merged   (the PS-merged model A)\n" if uses_ps else "")
        header += "# run: mergekit-yaml mergekit.yaml OUT   (step scales folded into o_proj/down_proj)\n"
        if mk is None:
            header += "# this path cannot be written as a mergekit passthrough; use `dfsmerge export`:\n"
        elif notes:
            header += "# mergekit 0.1.5 cannot run it (`dfsmerge merge mergekit.yaml OUT` can):\n"
        header += "".join(f"#  - {n}\n" for n in notes)
    atomic_write(best_dir / "mergekit.yaml", header + (yaml.safe_dump(mk, sort_keys=False) if mk else ""))
    out["mergekit"] = best_dir / "mergekit.yaml"
    return out


def pareto_records(records: list[EvalRecord], keys: list[str]) -> list[EvalRecord]:
    """Non-dominated records (all values finite), first occurrence of each candidate, in id order."""
    from dfsmerge.optim import pareto_mask

    seen: set[str] = set()
    ok = []
    for r in records:
        if any(not math.isfinite(r.values.get(k, math.inf)) for k in keys) or r.key in seen:
            continue
        seen.add(r.key)
        ok.append(r)
    if not ok:
        return []
    F = np.array([[r.values[k] for k in keys] for r in ok], dtype=np.float64)  # (n, n_obj)
    mask = pareto_mask(F)
    return [r for r, m in zip(ok, mask, strict=True) if m]
