"""A candidate as a mergekit 0.1.5 recipe: the one builder behind a search's ``best/mergekit.yaml`` and the
``mergekit.yaml`` beside an export (each writes its own header comment around what this module builds).

- PS recipe: the recipe itself (:meth:`~dfsmerge.genome.PSRecipe.to_mergekit`, written as it is).
- Layer path: a ``passthrough`` merge with one slice per step (``layer_range: [i, i + 1]`` of the step's model) and,
  where ``D_k != 1``, a per-slice ``scale`` of ``1 / D_k`` filtered to the residual-branch outputs (``o_proj``,
  ``down_proj``: weight and bias), which is the fold of :mod:`dfsmerge.export.fold`: ``D_k = C_k / e`` with ``C_k``
  the cumulative product of the step scales and ``e`` the factor the embedding absorbs (a ``scale`` on the first
  slice's embedding; 1 unless the caller folds it there).
- PS + path: the passthrough names the PS-merged model by what the caller passes for it: a directory the PS recipe
  is merged into first (``./merged``), or :data:`PS_STAGE_NAME`, the document name of the PS recipe in a
  ``mergekit-multi`` file (:func:`ps_stage`).

mergekit cannot express everything a path can (:func:`passthrough_gaps`, :func:`config_gaps`): it takes the
embedding from the first slice's model and the final norm and head from the last slice's; its ``scale`` multiplies
the stored tensor, so Gemma-2's ``1 + w`` post-norms cannot be folded; 0.1.5 cannot stack configs that carry
``layer_types``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dfsmerge.genome.plan import PathPlan, cumulative_scales

if TYPE_CHECKING:
    from dfsmerge.arch import Architecture

PS_STAGE_NAME = "ps_merged"
"""The PS recipe's document name in a two-document ``mergekit-multi`` file, and how the passthrough names it."""


def _divisors(plan: PathPlan, divisors: Sequence[float] | None, embed_factor: float) -> list[float]:
    return list(divisors) if divisors is not None else [c / embed_factor for c in cumulative_scales(plan.scales)]


def _scale_folds(arch: Architecture) -> bool:
    # a linear branch end, or a post-norm whose gain is its stored w (GLM-4), folds as mergekit's `scale`
    return arch.residual_kind == "linear" or (arch.residual_kind == "norm" and arch.norm_offset == 0.0)


def passthrough(plan: PathPlan, models: Mapping[str, str], arch: Architecture, *,
                divisors: Sequence[float] | None = None, embed_factor: float = 1.0,
                dtype: str = "float32") -> dict[str, Any]:
    """The passthrough recipe of a layer path, its step scales folded into the residual-branch outputs.

    Args:
        plan: the layer path.
        models: plan model name -> the reference the recipe names (a path, ``./merged``, :data:`PS_STAGE_NAME`).
        arch: the family's architecture (residual-branch outputs, embedding tensors).
        divisors: ``D_k`` of each step (default ``C_k / embed_factor``).
        embed_factor: ``e``, set as a ``scale`` on the first slice's embedding when it is not 1.
        dtype: the recipe's ``dtype``.

    Returns:
        the recipe as a dict (a valid mergekit YAML; it is the path's model when :func:`passthrough_gaps` is empty).
    """
    filters = list(arch.residual_filters)  # self_attn.o_proj, mlp.down_proj
    embed_filters = [n.rsplit(".", 1)[0] for n in arch.pre_weights]  # model.embed_tokens (GPT-2: wte and wpe)
    slices = []
    for k, (step, d) in enumerate(zip(plan.steps, _divisors(plan, divisors, embed_factor), strict=True)):
        ref = step.layer
        src: dict[str, Any] = {"model": models[ref.model], "layer_range": [ref.index, ref.index + 1]}
        scale: list[dict[str, Any]] = []
        if k == 0 and embed_factor != 1.0:  # mergekit plans the embedding with the first slice's parameters
            scale += [{"filter": f, "value": embed_factor} for f in embed_filters]
        if d != 1.0 and _scale_folds(arch):
            scale += [{"filter": f, "value": 1.0 / d} for f in filters]
        if scale:
            src["parameters"] = {"scale": scale + [{"value": 1.0}]}
        slices.append({"sources": [src]})
    return {"merge_method": "passthrough", "slices": slices, "dtype": dtype}


def passthrough_gaps(plan: PathPlan, arch: Architecture, *, divisors: Sequence[float] | None = None,
                     embed_factor: float = 1.0) -> list[str]:
    """Why :func:`passthrough` of ``plan`` is another model than the path (empty: the same, up to the norms' eps)."""
    out = []
    if not plan.steps:
        return ["the path has no steps, and a passthrough recipe needs one slice at least"]
    first, last = plan.steps[0].layer.model, plan.steps[-1].layer.model
    if plan.embed_model != first:
        out.append(f"the embedding comes from model {plan.embed_model!r} but mergekit takes it from the first "
                   f"slice's model {first!r}")
    if plan.base != last:
        out.append(f"the final norm and head come from model {plan.base!r} but mergekit takes them from the last "
                   f"slice's model {last!r}")
    if any(d != 1.0 for d in _divisors(plan, divisors, embed_factor)) and not _scale_folds(arch):
        if arch.residual_kind == "norm":
            out.append(f"{arch.model_type}'s residual branches end in norms with gain 1 + w; folding a divisor D "
                       "needs w' = (1 + w)/D - 1, but mergekit's `scale` multiplies the stored w, so the scales are "
                       "left out of this YAML")
        else:
            out.append(f"{arch.model_type}'s blocks cannot fold step scales into weights, so the scales are left out "
                       "of this YAML")
    return out


def config_gaps(configs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Why mergekit 0.1.5 cannot write the stacked model's config (``dfsmerge merge`` can); empty: it can."""
    if any("layer_types" in c for c in configs.values()):
        return ["the config carries `layer_types`, which mergekit 0.1.5 does not renumber when it stacks layers "
                "(it fails to write the config)"]
    return []


def ps_stage(ps_recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The PS recipe as the first document of a ``mergekit-multi`` file, named :data:`PS_STAGE_NAME`."""
    return {"name": PS_STAGE_NAME, **dict(ps_recipe)}
