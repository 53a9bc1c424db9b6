"""What a search leaves besides its log: ``best/`` (plan, recipe, mergekit YAML) and the Pareto set.

``best/mergekit.yaml`` is the PS recipe for PS-only candidates; for a layer path it is a mergekit ``passthrough``
recipe with the step scales folded into the residual-branch outputs (docs/design.md section 6: step k's branch outputs
divided by the cumulative scale C_k; exact up to the norm's eps). In joint/staged mode the path's model A is the
PS-merged model (``@ps`` in the plan), so that passthrough reads ``./merged`` and is run after
``mergekit-yaml recipe.yaml ./merged``. ``dfsmerge export RUN`` is the exact route to a checkpoint.
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


def _residual_filters(model_path: str) -> list[str] | None:
    """Substrings naming the residual-branch outputs of a layer (``self_attn.o_proj``), or None when the
    architecture folds scales into a norm (not expressible as a mergekit ``scale``)."""
    try:
        from dfsmerge.arch import get_architecture
        from dfsmerge.io import open_checkpoint

        arch = get_architecture(open_checkpoint(model_path).config)
    except Exception:  # noqa: BLE001 - any unreadable model: no passthrough YAML
        return None
    if arch.residual_kind != "linear":
        return None
    return list(arch.residual_filters)  # the architecture's own exact filters (fused MoE parameters included)


def passthrough_recipe(path: dict[str, Any], *, dtype: str = "float32") -> dict[str, Any] | None:
    """A mergekit passthrough recipe for a plan dict (scales folded), or None when it cannot be expressed."""
    models = {k: (MERGED_DIR if v == PS_MODEL_IN_PLAN else v) for k, v in path["models"].items()}
    steps = path["path"]
    if path.get("embed") not in (None, path["base"]) or not steps or \
            steps[0]["model"] != path["base"] or steps[-1]["model"] != path["base"]:
        return None  # mergekit takes the embedding from the first slice's model, norm and head from the last's
    probe = next((v for v in models.values() if v != MERGED_DIR), None)
    filters = _residual_filters(probe) if probe else ["self_attn.o_proj", "mlp.down_proj"]
    if filters is None:
        return None
    slices = []
    c = 1.0
    for step in path["path"]:
        c *= float(step["scale"])  # cumulative scale C_k > 0
        src: dict[str, Any] = {"model": models[step["model"]], "layer_range": [step["layer"], step["layer"] + 1]}
        if not math.isclose(c, 1.0, rel_tol=0, abs_tol=1e-12):
            src["parameters"] = {"scale": [*({"filter": f, "value": 1.0 / c} for f in filters), {"value": 1.0}]}
        slices.append({"sources": [src]})
    return {"merge_method": "passthrough", "slices": slices, "dtype": dtype}


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
        mk = passthrough_recipe(path, dtype=dtype)
        uses_ps = PS_MODEL_IN_PLAN in path["models"].values()
        header += ("# first: mergekit-yaml recipe.yaml ./merged   (the PS-merged model A)\n" if uses_ps else "")
        header += "# run: mergekit-yaml mergekit.yaml OUT   (step scales folded into o_proj/down_proj)\n"
        if mk is None:
            header += "# this path cannot be written as a mergekit passthrough; use `dfsmerge export`\n"
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
