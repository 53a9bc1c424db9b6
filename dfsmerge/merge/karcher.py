"""Karcher (Riemannian / Frechet) mean on the unit hypersphere (Karcher 1977; merging: arXiv 2603.04972), as
mergekit 0.1.5's ``karcher``: the directions of the inputs are averaged by fixed-point iteration, the result
scaled by the mean norm.

    m <- exp_m( sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m) ),  cos(theta_i) = m . u_i
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dfsmerge.merge.stats import gram

__all__ = ["karcher_mean"]


def karcher_mean(
    tensors: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5,
    gram_matrix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted Karcher mean of the tensors' directions, times ``sum_i alpha_i |theta_i|``.

    Tensors of norm ``<= tol`` are left out of the direction average (their weights renormalised over the
    others); iteration stops after ``max_iter`` steps or when the tangent step's norm falls below ``tol``.
    The mean stays a linear combination of the inputs through every step, so the iteration runs on K
    coefficients and the Gram matrix ``<theta_i, theta_j>`` (accumulated in float64,
    :mod:`dfsmerge.merge.stats`); the result is one weighted sum of the inputs.

    Args:
        tensors: K tensors (*S) in float32 or float64; one tensor is returned as is.
        alphas: K weights.
        max_iter: iterations (>= 0).
        tol: norm and angle tolerance (> 0).
        gram_matrix: (K, K) Gram matrix of the whole tensors when ``tensors`` are row chunks of larger tensors
            (default: computed from ``tensors``).

    Returns:
        (*S) merged tensor (zeros when every input has norm <= tol).
    """
    if len(tensors) == 1:
        return tensors[0]
    g = (gram(tensors) if gram_matrix is None else gram_matrix).cpu()  # (K, K)
    norms = g.diagonal().clamp(min=0).sqrt()  # (K,)
    valid = [i for i in range(len(tensors)) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = torch.tensor([alphas[i] / total for i in valid], dtype=torch.float64)  # (V,)
    nv = norms[valid]
    u_gram = g[valid][:, valid] / (nv[:, None] * nv[None, :])  # <u_i, u_j> of the valid unit vectors

    def norm(c: torch.Tensor) -> float:
        return float(c @ u_gram @ c) ** 0.5

    mean = a.clone()  # m = sum_j mean_j u_j
    mean_norm = norm(mean)
    mean = torch.eye(len(valid), dtype=torch.float64)[0] if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        dots = (u_gram @ mean).clamp(-1.0, 1.0)  # (V,) m . u_i
        for i in range(len(valid)):
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            step = -float(dots[i]) * mean  # log map of u_i at m: theta / sin(theta) (u_i - cos(theta) m)
            step[i] += 1.0
            tangent += float(a[i]) * (theta / math.sin(theta)) * step
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)  # exp map
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = sum(ai * float(n) for ai, n in zip(alphas, norms, strict=True))
    coefs = [0.0] * len(tensors)
    for j, i in enumerate(valid):
        coefs[i] = scale * float(mean[j]) / float(norms[i])
    dtype = tensors[0].dtype
    out = torch.zeros_like(tensors[0])
    for c, t in zip(coefs, tensors, strict=True):  # one fixed sequence of elementwise operations
        out += torch.tensor(c, dtype=dtype, device=t.device) * t
    return out
