"""Multi-SLERP: weighted barycentric interpolation of several tensors on a hypersphere (Goddard,
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as mergekit 0.1.5's ``multislerp``.

    u_i   = v_i / (|v_i| + eps)                       v_i = theta_i (or theta_i - theta_base with a base)
    m     = normalize(sum_i w_i u_i)                  weighted Euclidean mean, projected to the sphere
    g     = sum_i w_i (u_i - (u_i . m) m)             interpolation in the tangent space at m
    theta = (cos|g| m + sin|g| g / |g|) * sum_i w_i |v_i|   exponential map back, rescaled to the mean norm
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dfsmerge.errors import MergeError
from dfsmerge.merge.stats import gram

__all__ = ["multislerp"]


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    gram_matrix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Interpolate K tensors (or their task vectors around ``base``) on the hypersphere.

    Every vector of the module docstring is a linear combination of the inputs ``v_i``, so the whole computation
    runs on the K coefficients and the Gram matrix ``<v_i, v_j>`` (accumulated in float64,
    :mod:`dfsmerge.merge.stats`); the result is one weighted sum of the inputs.

    Args:
        tensors: K tensors (*S); one tensor is returned as is.
        weights: K weights.
        base: optional base tensor; the interpolation runs over task vectors and the base is added back.
        normalize_weights: divide the weights by their sum.
        eps: norm offset for stability (> 0).
        gram_matrix: (K, K) Gram matrix of the whole (task) vectors when ``tensors`` are row chunks of larger
            tensors (default: computed from ``tensors``).

    Returns:
        (*S) merged tensor.

    Raises:
        MergeError: ``normalize_weights`` with weights summing to 0, or a weighted mean of the unit vectors that
            vanishes for more than two tensors (antipodal inputs with balancing weights).

    Limitations: whole tensors are treated as single vectors; two inputs whose weighted mean vanishes fall back
    to linear interpolation (as mergekit).
    """
    if len(tensors) == 1:
        return tensors[0]
    vectors = list(tensors) if base is None else [t - base for t in tensors]  # K x (*S)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)  # (K,)
    if normalize_weights:
        total = w.sum()
        if total == 0:
            raise MergeError(f"multislerp: weights {list(weights)} sum to 0 with normalize_weights=true; change the "
                             "weights or set normalize_weights: false")
        w = w / total
    g = (gram(vectors) if gram_matrix is None else gram_matrix).cpu()  # (K, K)
    norms = g.diagonal().clamp(min=0).sqrt()  # (K,)
    inv = 1 / (norms + eps)  # u_i = v_i * inv_i
    u_gram = g * inv[:, None] * inv[None, :]  # <u_i, u_j>
    mean_norm = float(w @ u_gram @ w) ** 0.5  # |sum_i w_i u_i|
    if mean_norm < eps:
        if len(vectors) == 2:
            return _weighted_sum(vectors, w.tolist(), base)
        raise MergeError("multislerp: the weighted mean of the input directions is zero (antipodal tensors whose "
                         "weights balance out); change the weights")
    mu = w / mean_norm  # m = sum_j mu_j u_j
    dots = u_gram @ mu  # (K,) u_i . m
    tau = w - (w @ dots) * mu  # tangent = sum_j tau_j u_j
    tangent_norm = float(tau @ u_gram @ tau) ** 0.5 + eps
    coef = mu * math.cos(tangent_norm) + tau * (math.sin(tangent_norm) / tangent_norm)  # over u
    coef = coef * float((norms * w).sum()) * inv  # over v
    return _weighted_sum(vectors, coef.tolist(), base)


def _weighted_sum(vectors: Sequence[torch.Tensor], coefs: Sequence[float], base: torch.Tensor | None) -> torch.Tensor:
    # one fixed sequence of elementwise operations (the same for a whole tensor and its row chunks)
    dtype = vectors[0].dtype
    out = torch.zeros_like(vectors[0]) if base is None else base.clone()
    for c, v in zip(coefs, vectors, strict=True):
        out += torch.tensor(c, dtype=dtype, device=v.device) * v
    return out
