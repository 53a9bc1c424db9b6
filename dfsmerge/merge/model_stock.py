"""Model Stock (Jang et al. 2024, arXiv 2403.19522): interpolate the average of fine-tunes towards the base
by a ratio derived from the angle between their task vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["model_stock"]


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """``t * mean(theta_i) + (1 - t) * theta_base`` with ``t = N cos / (1 + (N - 1) cos)`` (Eq. (3)).

    ``cos`` is the mean pairwise cosine between the task vectors ``theta_i - theta_base`` (norm products
    clamped to 1e-6, cosines clipped to [-1, 1]), over the whole tensor, or per vector along the last axis
    with ``filter_wise`` (a 1-D tensor is one vector). Where ``|1 + (N - 1) cos| < 1e-6`` the base is kept.

    Args:
        base: (*S) base tensor.
        tensors: N >= 2 fine-tuned tensors (*S).
        filter_wise: one ratio per row (last-axis vector) instead of one per tensor.

    Returns:
        (*S) merged tensor.

    Limitations: needs at least two fine-tunes; the ratio is not clipped to [0, 1].
    """
    shape = base.shape
    if filter_wise:
        w0 = base if base.dim() > 1 else base.unsqueeze(0)  # (..., D)
        ws = [w if w.dim() > 1 else w.unsqueeze(0) for w in tensors]
    else:
        w0 = base.reshape(-1)  # (N,)
        ws = [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (..., 1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(
        singular,
        torch.zeros_like(cos),
        (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    average = sum(ws) / n
    return (ratio * average + (1 - ratio) * w0).reshape(shape)
