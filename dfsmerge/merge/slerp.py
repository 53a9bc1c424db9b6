"""Spherical linear interpolation (Shoemake 1985, "Animating rotation with quaternion curves").

``slerp`` treats the whole tensor as one vector (mergekit's ``slerp``); ``nuslerp`` treats rows, columns or
the whole tensor as vectors, weights its two models, and can interpolate task vectors around a base
(mergekit's ``nuslerp``).
"""

from __future__ import annotations

import math

import torch

from dfsmerge.merge.stats import gram

__all__ = ["nuslerp", "slerp"]


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    gram_matrix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1) along the great circle through their directions.

    The tensors are flattened into single vectors. The angle comes from the normalised vectors (a norm
    ``<= eps`` counts as 1); when ``|cos| > dot_threshold`` (nearly colinear or antipodal) it falls back to
    linear interpolation. The unnormalised inputs are combined:
    ``sin((1-t) theta)/sin(theta) * v0 + sin(t theta)/sin(theta) * v1``.
    Norms and the inner product are accumulated in float64 (:mod:`dfsmerge.merge.stats`); the combination is
    computed in float32 (float64 for float64 inputs).

    Args:
        t: interpolation factor (not clipped).
        v0: base tensor.
        v1: other tensor, same shape.
        dot_threshold: colinearity threshold on the cosine.
        eps: smallest norm treated as nonzero.
        gram_matrix: (2, 2) :func:`~dfsmerge.merge.stats.gram` of the whole ``v0``, ``v1`` when these are row
            chunks of larger tensors (default: computed from ``v0``, ``v1``).

    Returns:
        Tensor of ``v0``'s shape, in the working dtype (float32 or float64).
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.to(dtype), v1.to(dtype)
    if a.numel() == 0:
        t_ = torch.tensor(t, dtype=dtype, device=a.device)
        return (1 - t_) * a + t_ * b
    g = gram([a, b]) if gram_matrix is None else gram_matrix
    norm_a, norm_b = float(g[0, 0]) ** 0.5, float(g[1, 1]) ** 0.5
    norm_a = norm_a if norm_a > eps else 1.0
    norm_b = norm_b if norm_b > eps else 1.0
    cos = min(1.0, max(-1.0, float(g[0, 1]) / (norm_a * norm_b)))
    if abs(cos) > dot_threshold:
        coef_a, coef_b = 1 - t, t
    else:
        theta = math.acos(cos)
        coef_a = math.sin((1 - t) * theta) / math.sin(theta)
        coef_b = math.sin(t * theta) / math.sin(theta)
    return _combine(coef_a, a, coef_b, b)


def _combine(coef_a: float, a: torch.Tensor, coef_b: float, b: torch.Tensor) -> torch.Tensor:
    # coefficients rounded once to the working dtype, then one elementwise expression (the same for a whole
    # tensor and for its row chunks)
    ca = torch.tensor(coef_a, dtype=a.dtype, device=a.device)
    cb = torch.tensor(coef_b, dtype=a.dtype, device=a.device)
    return ca * a + cb * b


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
    gram_matrix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slerp over vectors of a tensor: the whole tensor (``flatten``), else along dim 0 (``row_wise``) or -1.

    Vectors are normalised with norms clamped to 1e-7; a vector pair with ``1 - cos^2 <= eps^2`` (colinear
    or antipodal) is interpolated linearly. With ``flatten`` the norms and inner product are accumulated in
    float64 (:mod:`dfsmerge.merge.stats`).

    Args:
        t: weight of ``v1`` (t=0 gives ``v0``).
        v0, v1: tensors of one shape.
        row_wise: vectors run along dim 0 (ignored when ``flatten``).
        flatten: one vector per tensor (mergekit's default ``nuslerp_flatten: true``).
        eps: colinearity tolerance.
        gram_matrix: with ``flatten``, the (2, 2) Gram matrix of the whole tensors when ``v0``, ``v1`` are row
            chunks (default: computed from them).

    Returns:
        Tensor of ``v0``'s shape and dtype.
    """
    if flatten:
        g = gram([v0, v1]) if gram_matrix is None else gram_matrix
        n0, n1 = max(float(g[0, 0]) ** 0.5, 1e-7), max(float(g[1, 1]) ** 0.5, 1e-7)
        cos = min(1.0, max(-1.0, float(g[0, 1]) / (n0 * n1)))
        if 1 - cos * cos <= eps**2:
            return _combine(1 - t, v0, t, v1)
        theta = math.acos(cos)
        return _combine(math.sin((1 - t) * theta) / math.sin(theta), v0, math.sin(t * theta) / math.sin(theta), v1)
    shape = v0.shape
    dim = 0 if row_wise else -1
    if dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)  # vectors on the last axis
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1:
        result = result.transpose(dim, -1)
    return result.reshape(shape)
