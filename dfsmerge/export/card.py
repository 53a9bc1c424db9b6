"""What an export says about itself: the model card (``README.md``: sources, the path drawn as text, scales, recipe,
scores, loading) and the header of its ``mergekit.yaml`` around the recipe :mod:`dfsmerge.genome.mergekit_yaml`
builds."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from dfsmerge.export.fold import eps_bound
from dfsmerge.export.info import ExportInfo
from dfsmerge.genome import PS_MODEL_IN_PLAN
from dfsmerge.genome.mergekit_yaml import PS_STAGE_NAME, config_gaps, passthrough, passthrough_gaps, ps_stage
from dfsmerge.genome.plan import PathPlan

if TYPE_CHECKING:
    from dfsmerge.arch import Architecture


def draw_path(plan: PathPlan) -> str:
    """The path as one line of text, e.g. ``embed(A) -> A[0] -> A[1] x1.20 -> B[3] -> head(A)``.

    A step's ``xS`` is the scale applied to the hidden state entering it (omitted when 1).
    """
    parts = [f"embed({plan.embed_model})"]
    for s in plan.steps:
        parts.append(str(s.layer) + ("" if s.scale == 1.0 else f" x{s.scale:.4g}"))
    parts.append(f"head({plan.base})")
    return " -> ".join(parts)


def model_card(info: ExportInfo) -> str:
    """The ``README.md`` text of an export."""
    plan = info.plan
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- dfsmerge",
             *(["- evolutionary-model-merge", "- layer-stacking"] if not info.ps_only else []), "---", ""]
    kind = "parameter-space merge" if info.ps_only else (
        "data-flow-space (layer path) merge" + (" over a parameter-space merge" if info.ps_name else ""))
    lines += [f"# dfsmerge export: {kind}", "",
              f"A {info.family} model made with dfsmerge (evolutionary model merging in parameter and data-flow "
              "space, after Akiba et al., *Evolutionary Optimization of Model Merging Recipes*, arXiv 2403.13187).",
              ""]
    lines += ["## Sources", ""]
    for name, src in plan.models.items():
        what = "the parameter-space merge of the recipe below" if src == PS_MODEL_IN_PLAN else f"`{src}`"
        roles = [r for r, m in (("base: tokenizer, final norm, head", plan.base),
                                ("embedding", plan.embed_model)) if m == name]
        lines.append(f"- **{name}**: {what}" + (f" ({'; '.join(roles)})" if roles else ""))
    lines.append("")
    if not info.ps_only:
        lines += ["## Layer path", "",
                  f"{len(plan.steps)} steps over {len(set(plan.layers))} distinct layers. `M[i]` is decoder layer i "
                  "of model M; `xS` scales the hidden state entering the step.", "", "```", draw_path(plan), "```",
                  "", "| step | layer | scale s_k | cumulative C_k | folded divisor D_k |", "|---:|---|---:|---:|---:|"]
        divisors = info.divisors if info.format == "folded" else ("-",) * len(plan.steps)
        for k, (s, c, d) in enumerate(zip(plan.steps, info.cumulative, divisors, strict=True)):
            lines.append(f"| {k} | {s.layer} | {s.scale:.6g} | {c:.6g} | {d if d == '-' else f'{d:.6g}'} |")
        lines.append("")
    if info.ps_recipe is not None:
        lines += ["## Parameter-space recipe", "", "```yaml", yaml.safe_dump(dict(info.ps_recipe),
                                                                              sort_keys=False).rstrip(), "```", ""]
    if info.scores:
        lines += ["## Scores from the search", "", "| objective | value |", "|---|---:|"]
        for k, v in info.scores.items():
            lines.append(f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {json.dumps(v)} |")
        lines.append("")
    lines += ["## How to load", ""]
    if info.format == "compact":
        lines += ["Compact format: each distinct layer is stored once and `config.json` holds the path "
                  "(`input_layers`, `input_scales`, `num_hops`). The bundled `compact_modeling.py` runs it, with "
                  "its own KV-cache slot per hop, so it needs `trust_remote_code=True`:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
                  "tok = AutoTokenizer.from_pretrained(PATH)", "```", ""]
    else:
        lines += ["A plain checkpoint of its architecture: no custom code.", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH)", "tok = AutoTokenizer.from_pretrained(PATH)",
                  "```", ""]
        if not info.ps_only:
            bound = eps_bound(info.divisors, info.eps)
            worst = max(abs(d * d - 1) for d in info.divisors)
            lines += ["### Folded scales", "",
                      "The step scales are folded into the weights (exact for pre-norm blocks up to the RMSNorm "
                      "eps): with C_k = s_1 ... s_k and the embedding stored multiplied by e = "
                      f"{info.embed_factor:.6g} (s_1 when the head is untied, else 1), step k's residual-branch "
                      "outputs are divided by D_k = C_k / e (Gemma-2: the post-norm gain 1 + w becomes "
                      "(1 + w)/D_k). Each norm's output then differs from the unfolded path by at most "
                      "eps |D_k^2 - 1| / (2 mean(u^2)) relative, u being the norm's input in the path. Here "
                      f"eps = {info.eps:g} and max_k |D_k^2 - 1| = {worst:.4g}: the bound is {bound:.3g} for "
                      "mean(u^2) = 1 (scale it by 1/mean(u^2) for smaller hidden states). The compact format "
                      "(`dfsmerge export --format compact`) is exact.", ""]
    lines += ["`mergekit.yaml` beside this card is the same model as a mergekit recipe (its header says when "
              "mergekit cannot express it exactly); `dfsmerge_plan.yaml` / `dfsmerge_recipe.yaml` are dfsmerge's "
              "own description.", ""]
    return "\n".join(lines)


def mergekit_text(info: ExportInfo, paths: Mapping[str, str], configs: Mapping[str, Mapping[str, Any]],
                  arch: Architecture) -> str:
    """The ``mergekit.yaml`` text of an export: a header comment that says how to run it and, when mergekit cannot
    reproduce the export exactly, why; then the PS recipe, the passthrough recipe of the path, or both as two
    ``mergekit-multi`` documents (the path's recipe with this export's fold: ``D_k`` and ``e``).

    Args:
        info: what the export wrote.
        paths: model name -> path used for the export (the PS model is named by its stage name instead).
        configs: model name -> ``config.json`` dict.
        arch: the family's architecture.
    """
    plan = info.plan
    if info.ps_only:
        head = ["# Reproduce this model with: mergekit-yaml mergekit.yaml OUT (or dfsmerge merge mergekit.yaml OUT)"]
        return "\n".join(head) + "\n" + yaml.safe_dump(dict(info.ps_recipe), sort_keys=False)
    ps = [n for n, s in plan.models.items() if s == PS_MODEL_IN_PLAN]
    names = {m: (PS_STAGE_NAME if m in ps else str(p)) for m, p in paths.items()}
    body = passthrough(plan, names, arch, divisors=info.divisors, embed_factor=info.embed_factor, dtype=info.dtype)
    notes = passthrough_gaps(plan, arch, divisors=info.divisors, embed_factor=info.embed_factor) + config_gaps(configs)
    if info.format == "compact":
        notes.append("this export is in the compact format; the YAML describes the equivalent folded checkpoint")
    head = [f"# dfsmerge export of a {len(plan.steps)}-step layer path ({arch.model_type}).",
            "# Passthrough slices, one per step; `scale` divides each step's residual-branch outputs by",
            "# D_k = C_k / e, C_k the cumulative product of the step scales and e the factor the embedding",
            f"# absorbs (e = {info.embed_factor!r}, set on the first slice); the fold of dfsmerge/export/fold.py."]
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
        text += yaml.safe_dump(ps_stage(info.ps_recipe), sort_keys=False) + "---\n"
    return text + yaml.safe_dump(body, sort_keys=False)
