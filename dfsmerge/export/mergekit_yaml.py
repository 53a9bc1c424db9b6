"""The ``mergekit.yaml`` written beside every export: the same model as a mergekit 0.1.5 recipe.

- DFS path: a ``passthrough`` merge with one slice per step (``layer_range: [i, i + 1]`` of the step's model) and,
  where ``C_k != 1``, a per-slice ``scale`` parameter of ``1 / C_k`` filtered to the residual-branch outputs
  (``o_proj``, ``down_proj``: weight and bias), which is exactly the fold of :mod:`dfsmerge.export.fold`.
- PS recipe only: the recipe itself.
- PS + DFS: two YAML documents for ``mergekit-multi``: the PS recipe named ``ps_merged``, then the passthrough
  over it.

mergekit cannot express everything a path can; the header comment says what, and then the YAML is the closest
recipe, not the export: mergekit takes the embedding from the first slice's model and the final norm and head from
the last slice's model; its ``scale`` multiplies the stored tensor, so Gemma-2's ``1 + w`` post-norms cannot be
folded; 0.1.5 cannot stack configs that carry ``layer_types`` (qwen2, gemma2 and newer configs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from dfsmerge.arch import Architecture
from dfsmerge.export.info import ExportInfo
from dfsmerge.genome import PS_MODEL_IN_PLAN

PS_STAGE_NAME = "ps_merged"


def limitations(info: ExportInfo, configs: Mapping[str, Mapping[str, Any]], arch: Architecture) -> list[str]:
    """Why mergekit 0.1.5 cannot reproduce this export exactly (empty: it can)."""
    if info.ps_only:
        return []
    plan = info.plan
    out = []
    first, last = plan.steps[0].layer.model, plan.steps[-1].layer.model
    if plan.embed_model != first:
        out.append(f"the embedding comes from model {plan.embed_model!r} but mergekit takes it from the first "
                   f"slice's model {first!r}")
    if plan.base != last:
        out.append(f"the final norm and head come from model {plan.base!r} but mergekit takes them from the last "
                   f"slice's model {last!r}")
    if arch.residual_kind == "norm" and arch.norm_offset != 0.0 and any(d != 1.0 for d in info.divisors):
        out.append(f"{arch.model_type}'s residual branches end in norms with gain 1 + w; folding a divisor D needs "
                   "w' = (1 + w)/D - 1, but mergekit's `scale` multiplies the stored w, so the scales are left out "
                   "of this YAML")
    if any("layer_types" in c for c in configs.values()):
        out.append("the config carries `layer_types`, which mergekit 0.1.5 does not renumber when it stacks "
                   "layers (it fails to write the config)")
    if info.format == "compact":
        out.append("this export is in the compact format; the YAML describes the equivalent folded checkpoint")
    return out


def _slices(info: ExportInfo, paths: Mapping[str, str], arch: Architecture) -> list[dict[str, Any]]:
    filters = list(arch.residual_filters)  # self_attn.o_proj, mlp.down_proj
    out = []
    embed_filters = [n.rsplit(".", 1)[0] for n in arch.pre_weights]  # model.embed_tokens (GPT-2: wte and wpe)
    for k, (step, d) in enumerate(zip(info.plan.steps, info.divisors, strict=True)):
        ref = step.layer
        src: dict[str, Any] = {"model": paths[ref.model], "layer_range": [ref.index, ref.index + 1]}
        scale: list[dict[str, Any]] = []
        if k == 0 and info.embed_factor != 1.0:  # mergekit plans the embedding with the first slice's parameters
            scale += [{"filter": f, "value": info.embed_factor} for f in embed_filters]
        # a linear branch end, or a post-norm whose gain is its stored w (GLM-4), folds as mergekit's `scale`
        if d != 1.0 and (arch.residual_kind == "linear" or (arch.residual_kind == "norm" and arch.norm_offset == 0)):
            scale += [{"filter": f, "value": 1.0 / d} for f in filters]
        if scale:
            src["parameters"] = {"scale": scale + [{"value": 1.0}]}
        out.append({"sources": [src]})
    return out


def mergekit_yaml(info: ExportInfo, paths: Mapping[str, str], configs: Mapping[str, Mapping[str, Any]],
                  arch: Architecture) -> str:
    """The ``mergekit.yaml`` text (header comment + recipe) for an export.

    Args:
        info: what the export wrote.
        paths: model name -> path used for the export (the PS model's temporary path is replaced by its stage name).
        configs: model name -> ``config.json`` dict.
        arch: the family's architecture.
    """
    plan = info.plan
    if info.ps_only:
        head = ["# Reproduce this model with: mergekit-yaml mergekit.yaml OUT (or dfsmerge merge mergekit.yaml OUT)"]
        return "\n".join(head) + "\n" + yaml.safe_dump(dict(info.ps_recipe), sort_keys=False)
    ps = [n for n, s in plan.models.items() if s == PS_MODEL_IN_PLAN]
    names = {m: (PS_STAGE_NAME if m in ps else str(p)) for m, p in paths.items()}
    body = {"slices": _slices(info, names, arch), "merge_method": "passthrough", "dtype": info.dtype}
    notes = limitations(info, configs, arch)
    head = [f"# dfsmerge export of a {len(plan.steps)}-step layer path ({arch.model_type}).",
            "# Passthrough slices, one per step; `scale` divides each step's residual-branch outputs by",
            "# D_k = C_k / e, C_k the cumulative product of the step scales and e the factor the embedding",
            f"# absorbs (e = {info.embed_factor!r}, set on the first slice); the fold of docs/design.md section 6."]
    if ps:
        head += ["# Model " + repr(ps[0]) + " is the PS merge (first document, named " + PS_STAGE_NAME + ").",
                 "# Reproduce with: mergekit-multi mergekit.yaml -I INTERMEDIATE_DIR --out-path OUT"]
    else:
        head += ["# Reproduce with: mergekit-yaml mergekit.yaml OUT"]
    if notes:
        head += ["#", "# NOT EXACT: mergekit cannot express this model:"] + [f"#  - {n}" for n in notes]
        head += ["# The checkpoint beside this file is the authority; this YAML is the closest mergekit recipe."]
    else:
        head += ["# mergekit reproduces this export's tensors (up to float rounding of 1/D_k)."]
    text = "\n".join(head) + "\n"
    if ps:
        text += yaml.safe_dump({"name": PS_STAGE_NAME, **dict(info.ps_recipe)}, sort_keys=False) + "---\n"
    return text + yaml.safe_dump(body, sort_keys=False)
