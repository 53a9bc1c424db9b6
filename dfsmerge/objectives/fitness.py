"""Turning scores into values to minimise, direction-aware: a metric with ``higher_is_better: false`` (perplexity,
a cost) is minimised as is, one with ``higher_is_better: true`` is negated, so no weight ever needs a sign."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from dfsmerge.objectives.config import ObjectiveConfig

#: value given to a failed or NaN objective (worst for a minimiser).
WORST = math.inf


def to_minimize(value: float, direction: str) -> float:
    """``value`` as a quantity to minimise; NaN or None becomes :data:`WORST`.

    Args:
        value: the score.
        direction: ``maximize`` or ``minimize``.

    Raises:
        ValueError: unknown direction.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return WORST
    if direction == "minimize":
        return float(value)
    if direction == "maximize":
        return -float(value)
    raise ValueError(f"direction={direction!r} must be 'maximize' or 'minimize'")


def objective_values(scores: Mapping[str, float], objectives: Sequence[ObjectiveConfig],
                     directions: Mapping[str, str]) -> dict[str, float]:
    """Per objective key, its value to minimise (multi-objective optimisers take these as is).

    Args:
        scores: ``{objective key: raw value}`` (see :attr:`ObjectiveConfig.key`).
        objectives: the objectives.
        directions: ``{objective key: direction}`` (resolved from lm-eval's ``higher_is_better``).
    """
    return {o.key: to_minimize(scores.get(o.key, float("nan")), directions[o.key]) for o in objectives}


def scalar_fitness(values: Mapping[str, float], objectives: Sequence[ObjectiveConfig]) -> float:
    """Weighted sum of the values to minimise (single-objective optimisers); any WORST value gives WORST."""
    total = 0.0
    for o in objectives:
        v = values[o.key]
        if not math.isfinite(v):
            return WORST
        total += o.weight * v
    return total
