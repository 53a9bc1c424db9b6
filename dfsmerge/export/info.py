"""What an export wrote (:class:`ExportInfo`): the record the exporter fills and the model card and the mergekit
YAML read, kept apart from the exporter so that those two modules import it without importing the exporter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dfsmerge.genome.plan import PathPlan


@dataclass(frozen=True)
class ExportInfo:
    """What an export wrote, for the model card and the mergekit YAML.

    Attributes:
        plan: the path with resolved model paths (the PS model under its plan name, path
            :data:`~dfsmerge.genome.PS_MODEL_IN_PLAN`).
        format: ``folded`` or ``compact``.
        family: ``model_type`` of the sources.
        cumulative: ``C_k`` per step.
        embed_factor: ``e``, the factor the folded embedding absorbed (1 for compact or a tied head).
        divisors: ``D_k = C_k / e``, what step ``k``'s residual-branch outputs were divided by (folded).
        dtype: output dtype name.
        ps_recipe: the PS recipe dict (mergekit form) when a model of the plan is PS-merged.
        ps_name: the plan's name of the PS-merged model.
        scores: objectives of the search that found the model (may be empty).
        eps: the base config's norm eps.
    """

    plan: PathPlan
    format: str
    family: str
    cumulative: tuple[float, ...]
    dtype: str
    embed_factor: float = 1.0
    divisors: tuple[float, ...] = ()
    ps_recipe: Mapping[str, Any] | None = None
    ps_name: str | None = None
    scores: Mapping[str, Any] = field(default_factory=dict)
    eps: float = 1e-6
    ps_only: bool = False
