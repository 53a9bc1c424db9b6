"""mergekit 0.1.5 as a test oracle (never imported by the package): run a recipe with its own ``run_merge`` and read
a checkpoint directory's tensors, for the tests that compare ``dfsmerge merge`` with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfsmerge.merge import get_method


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (all safetensors shards)."""
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_mergekit(recipe: dict, out: Path, *, copy_tokenizer: bool = False) -> Path:
    """Merge ``recipe`` (a mergekit YAML as a dict) into ``out`` with mergekit's own ``run_merge``."""
    mk_config = pytest.importorskip("mergekit.config")
    from mergekit.merge import run_merge as mk_run
    from mergekit.options import MergeOptions

    cfg = mk_config.MergeConfiguration.model_validate(recipe)
    mk_run(cfg, str(out), options=MergeOptions(copy_tokenizer=copy_tokenizer, write_model_card=False, quiet=True))
    return out


def oracle_recipe(method: str, m: dict[str, Path], **extra) -> dict:
    """A mergekit recipe exercising ``method`` over tiny models ``m`` (``base``, ``ft1``..``ft3``): per-model
    gradients and filtered densities where the method takes them, the method's own global parameters, ``extra``
    merged in at the top level."""
    spec = get_method(method)
    per_model = {p.name for p in spec.params if p.per_model}
    models = []
    names = ["ft1", "ft2", "ft3"]
    if spec.max_inputs == 2 or method in ("slerp", "nuslerp"):
        names = ["ft1"] if spec.base == "required" else ["ft1", "ft2"]
    for i, name in enumerate(names):
        params = {}
        if "weight" in per_model:
            params["weight"] = [0.3 + 0.2 * i, 0.9 - 0.1 * i]  # a gradient across layers
        if "density" in per_model:
            params["density"] = [{"filter": "mlp", "value": 0.4 + 0.1 * i}, {"value": 0.7}]
        if "epsilon" in per_model:
            params["epsilon"] = 0.1
        if "gamma" in per_model:
            params["gamma"] = 0.05
        models.append({"model": str(m[name]), **({"parameters": params} if params else {})})
    recipe = {"merge_method": method, "models": models, "dtype": "float32"}
    if spec.base != "none":
        recipe["base_model"] = str(m["base"])
    if method == "slerp":
        recipe["parameters"] = {"t": [{"filter": "self_attn", "value": [0.1, 0.8]}, {"value": 0.35}]}
    if method == "nearswap":
        recipe["parameters"] = {"t": [{"filter": "mlp", "value": [0.01, 0.2]}, {"value": 0.05}]}
    if method == "passthrough":
        recipe["models"] = [{"model": str(m["ft1"]), "parameters": {"scale": 0.5}}]
    recipe.update(extra)
    return recipe
