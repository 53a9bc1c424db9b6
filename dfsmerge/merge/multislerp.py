"""Multi-SLERP: weighted barycentric interpolation of several tensors on a hypersphere (Goddard,
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as mergekit 0.1.5's ``multislerp``.

    u_i   = v_i / (|v_i| + eps)                       v_i = theta_i (or theta_i - theta_base with a base)
    m     = normalize(sum_i w_i u_i)                  weighted Euclidean mean, projected to the sphere
    g     = sum_i w_i (u_i - (u_i . m) m)             interpolation in the tangent space at m
    theta = (cos|g| m + sin|g| g / |g|) * sum_i w_i |v_i|   exponential map back, rescaled to the mean norm
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dfsmerge.errors import MergeError

__all__ = ["multislerp"]


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Interpolate K tensors (or their task vectors around ``base``) on the hypersphere.

    Args:
        tensors: K tensors (*S); one tensor is returned as is.
        weights: K weights.
        base: optional base tensor; the interpolation runs over task vectors and the base is added back.
        normalize_weights: divide the weights by their sum.
        eps: norm offset for stability (> 0).

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
    stacked = torch.stack(list(tensors), dim=0)  # (K, *S)
    if base is not None:
        stacked -= base
    flat = stacked.reshape(stacked.shape[0], -1)  # (K, N)
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)  # (K,)
    if normalize_weights:
        total = w.sum()
        if total == 0:
            raise MergeError(f"multislerp: weights {list(weights)} sum to 0 with normalize_weights=true; change the "
                             "weights or set normalize_weights: false")
        w = w / total
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (K, 1)
    units = flat / (norms + eps)  # (K, N)
    mean = (units * w.view(-1, 1)).sum(0)  # (N,)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:
            out = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
            return out if base is None else out + base
        raise MergeError("multislerp: the weighted mean of the input directions is zero (antipodal tensors whose "
                         "weights balance out); change the weights")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)  # (K, 1)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)  # (N,)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)  # (N,)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])  # (*S)
    return result if base is None else result + base
