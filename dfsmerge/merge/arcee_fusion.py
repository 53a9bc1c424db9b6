"""Arcee Fusion (https://arcee.ai), as mergekit 0.1.5's ``arcee_fusion``: take the other model's value only where
its change from the base is important, importance being the change times the KL divergence of the rows'
softmaxes, and "important" above a robust outlier threshold.

    s     = |b - a| * KL(softmax(b) || softmax(a))       KL per row (last axis), eps 1e-8 in each softmax
    tau   = median(s) + 1.5 (q3(s) - q1(s))              Tukey's upper fence
    theta = a + (b - a) [s >= tau]                       a: base, b: the other model
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

__all__ = ["QUANTILES", "arcee_fusion", "fusion_fence", "fusion_importance", "quantile_rank"]

QUANTILES = (0.25, 0.5, 0.75)
"""q1, median and q3 of the importance."""


def fusion_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """(*S) importance ``|b - a| * KL(softmax(b) || softmax(a))`` with the KL per row (last axis)."""
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (..., 1)
    return (other - base).abs() * kl


def _quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    # the entry at sorted position floor(q (n - 1)), by selection (O(n)) rather than a sort
    return torch.kthvalue(flat, quantile_rank(q, flat.numel()) + 1).values


def quantile_rank(q: float, n: int) -> int:
    """0-based ascending rank of the ``q`` quantile of ``n`` entries (no interpolation)."""
    return int(q * (n - 1))


def fusion_fence(quantiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Tukey's upper fence ``median + 1.5 (q3 - q1)`` of the importance quantiles (0-d float32 tensors)."""
    q1, median, q3 = quantiles
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, *, fence: torch.Tensor | None = None) -> torch.Tensor:
    """Fuse ``other`` into ``base`` where the importance reaches the upper fence (see the module docstring).

    Args:
        base: (*S) base tensor.
        other: (*S) the other model's tensor.
        fence: the whole tensors' :func:`fusion_fence` when ``base`` and ``other`` are row chunks of larger
            tensors (default: from the inputs).

    Returns:
        (*S) merged tensor.

    Limitations: the quantiles are exact. mergekit 0.1.5 computes them from 1,000,000 entries drawn at random
    (with replacement, torch's global RNG) when a tensor has more, so on such tensors its result is random and
    differs from this one near the threshold.
    """
    importance = fusion_importance(other, base)
    if fence is None:
        flat = importance.reshape(-1)
        fence = fusion_fence(tuple(_quantile(flat, q) for q in QUANTILES))
    keep = importance >= fence
    return base + (other - base) * keep
