"""Karcher (Riemannian / Frechet) mean on the unit hypersphere (Karcher 1977; merging: arXiv 2603.04972), as
mergekit 0.1.5's ``karcher``: the directions of the inputs are averaged by fixed-point iteration, the result
scaled by the mean norm.

    m <- exp_m( sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m) ),  cos(theta_i) = m . u_i
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["karcher_mean"]


def karcher_mean(
    tensors: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Weighted Karcher mean of the tensors' directions, times ``sum_i alpha_i |theta_i|``.

    Tensors of norm ``<= tol`` are left out of the direction average (their weights renormalised over the
    others); iteration stops after ``max_iter`` steps or when the tangent step's norm falls below ``tol``.

    Args:
        tensors: K tensors (*S) in float32 or float64; one tensor is returned as is.
        alphas: K weights.
        max_iter: iterations (>= 0).
        tol: norm and angle tolerance (> 0).

    Returns:
        (*S) merged tensor (zeros when every input has norm <= tol).
    """
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [torch.zeros_like(t) if float(n) == 0.0 else t / n for t, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u, strict=True):
        mean += ai * ui
    mean_norm = torch.linalg.vector_norm(mean)
    mean = u[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)  # log map of u_i at m
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)  # exp map
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(ai * n for ai, n in zip(alphas, norms, strict=True))
    return scale * mean
